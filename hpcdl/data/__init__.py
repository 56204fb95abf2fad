"""Training data, in one direction: sources → dataset → sampler → transforms → prefetch → loader.

    validate, idx, fashion_mnist,   sources: arrays in memory, image rows by file offset,
    imagefolder, hdf5 (ImageRows),  JPEG/PNG class folders (what the converter reads)
    synthetic
        ↓
    dataset                         ArraySplit (in memory) | HDF5Split (streamed): rows on demand
        ↓
    sampler                         which rows each rank's micro-step takes
        ↓
    resize, augment                 pad crop, flip, RandomResizedCrop, centre crop, normalize
        ↓
    batches                         one job: sampler rows → read → transform into a buffer
        ↓
    prefetch                        worker threads or processes fill a fixed pool of slots ahead
        ↓
    loader                          BatchLoader: memory plan, training and evaluation batches → train.py

Rows flow down, and so do imports: each module imports only modules before
it in `LAYERS` (tests/test_data_layers.py walks the imports to prove it), so
reading the data path from `train.py` never comes back to a module already
read.

* `validate`: checks every image source shares; exact per-channel statistics.
* `idx`: LeCun's IDX format and the four-file MNIST layout.
* `fashion_mnist`: find (or download, checksum-verified) the Fashion-MNIST files.
* `imagefolder`: one-subfolder-per-class image trees: listing, `file,label` CSVs,
  decoding any mode to RGB at a short side (the converter's source).
* `hdf5`: hpcdl's HDF5 format (contiguous rows, CRC-32 per row) and `ImageRows`,
  random access by `pread` outside h5py.
* `synthetic`: deterministic learnable images for tests and benchmarks.
* `dataset`: `Dataset` of two splits that read rows on demand (`ArraySplit` in
  memory, `HDF5Split` streamed) and `load_dataset(name, ...)` by config name.
* `sampler`: the same permutation on every rank, each rank its slice.
* `resize`: the crop-resize-flip-normalize kernel (Numba, GIL released) and its NumPy reference.
* `augment`: the transforms, keyed by (seed, epoch, step, global position).
* `batches`: one batch job (rows → read → transform) that any thread or process can run.
* `prefetch`: worker threads or processes running jobs ahead into a fixed pool of slots.
* `loader`: `BatchLoader`, this rank's training and evaluation batches within `data.memory_mb`.

`convert` (`hpcdl data convert`, `hpcdl data info`) and `shards` (its sharded
output: plan, write, verify on resume, stitch by virtual datasets) sit outside
the line: they write files for the sources to read.

Names below are exported lazily so `import hpcdl.data` stays free of NumPy,
which matters because the CLI pins BLAS threads before NumPy loads.
"""
from __future__ import annotations

import importlib

# The data path's modules in import order: each may import only those before it.
LAYERS = ("validate", "idx", "fashion_mnist", "imagefolder", "hdf5", "synthetic", "dataset", "sampler", "resize", "augment",
          "batches", "prefetch", "loader")

_EXPORTS = {
    "Dataset": "hpcdl.data.dataset",
    "ArraySplit": "hpcdl.data.dataset",
    "HDF5Split": "hpcdl.data.dataset",
    "load_dataset": "hpcdl.data.dataset",
    "load_fashion_mnist": "hpcdl.data.dataset",
    "read_idx": "hpcdl.data.idx",
    "write_idx": "hpcdl.data.idx",
    "read_hdf5": "hpcdl.data.hdf5",
    "write_hdf5": "hpcdl.data.hdf5",
    "ImageRows": "hpcdl.data.hdf5",
    "locate_fashion_mnist": "hpcdl.data.fashion_mnist",
    "ShardedSampler": "hpcdl.data.sampler",
    "Augmenter": "hpcdl.data.augment",
    "RandomResizedCrop": "hpcdl.data.augment",
    "CentreCrop": "hpcdl.data.augment",
    "build_transforms": "hpcdl.data.augment",
    "normalize": "hpcdl.data.augment",
    "BatchLoader": "hpcdl.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpcdl.data' has no attribute {name!r}")
