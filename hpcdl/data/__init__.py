"""Training data: readers, converters, the rank-sharded sampler, augmentation.

Modules, one job each:

* `idx`: LeCun's IDX format (MNIST, Fashion-MNIST), plain or gzipped.
* `hdf5`: hpcdl's HDF5 image format (NCHW uint8, per-row chunks, atomic writes).
* `validate`: the checks both formats share, and exact per-channel statistics.
* `fashion_mnist`: find (or download, checksum-verified) the Fashion-MNIST files.
* `synthetic`: deterministic learnable images for tests and benchmarks.
* `dataset`: the in-memory `Dataset` and `load_dataset(name, ...)` by config name.
* `convert`: `hpcdl data convert idx|folder` and `hpcdl data info`.
* `sampler`: the same permutation on every rank, each rank its slice.
* `augment`: vectorized random crop, flip and normalization, rank-count invariant.
* `loader`: sampler + arrays + augmenter -> ready micro-batches, optional prefetch.

Names below are exported lazily so `import hpcdl.data` stays free of NumPy,
which matters because the CLI pins BLAS threads before NumPy loads.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Dataset": "hpcdl.data.dataset",
    "load_dataset": "hpcdl.data.dataset",
    "read_idx": "hpcdl.data.idx",
    "write_idx": "hpcdl.data.idx",
    "read_hdf5": "hpcdl.data.hdf5",
    "write_hdf5": "hpcdl.data.hdf5",
    "locate_fashion_mnist": "hpcdl.data.fashion_mnist",
    "load_fashion_mnist": "hpcdl.data.fashion_mnist",
    "ShardedSampler": "hpcdl.data.sampler",
    "Augmenter": "hpcdl.data.augment",
    "normalize": "hpcdl.data.augment",
    "BatchLoader": "hpcdl.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpcdl.data' has no attribute {name!r}")
