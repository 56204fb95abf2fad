"""Shared fixtures: tiny IDX and HDF5 datasets written into tmp_path (nothing is downloaded).

The suite's arrays are tiny: BLAS threads only contend for the cores (with
each other and with the mpiexec ranks the tests launch), so one thread per
process, set before NumPy loads. Tests that need more set it themselves.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings on purpose)
import pytest

TINY_CLASSES = 4


def tiny_split(count: int, shape=(1, 6, 5), seed: int = 0, num_classes: int = TINY_CLASSES):
    """Deterministic uint8 N×C×H×W images (non-square, to catch transposes) and int64 labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=count).astype(np.int64)
    return images, labels


@pytest.fixture(name="tiny_split")
def tiny_split_fixture():
    """The `tiny_split(count, shape, seed)` generator, for tests that rebuild a fixture's arrays."""
    return tiny_split


@pytest.fixture
def tiny_idx_dir(tmp_path):
    """A directory with the four MNIST-layout .gz IDX files: 40 train and 12 test 6×5 images, 4 classes."""
    from hpcdl.data.idx import IDX_FILES, write_idx

    directory = tmp_path / "idx"
    directory.mkdir()
    for split, count, seed in (("train", 40, 1), ("test", 12, 2)):
        images, labels = tiny_split(count, seed=seed)
        write_idx(directory / f"{IDX_FILES[split + '_images']}.gz", images[:, 0])
        write_idx(directory / f"{IDX_FILES[split + '_labels']}.gz", labels.astype(np.uint8))
    return directory


@pytest.fixture
def tiny_hdf5(tmp_path):
    """An hpcdl HDF5 file: 40 train and 12 test RGB 6×5 images, 4 classes, chunks of 16 rows."""
    from hpcdl.data.hdf5 import write_hdf5

    path = tmp_path / "tiny.h5"
    write_hdf5(path, {"train": tiny_split(40, (3, 6, 5), seed=3), "test": tiny_split(12, (3, 6, 5), seed=4)},
               [f"c{i}" for i in range(TINY_CLASSES)], chunk_rows=16)
    return path


@pytest.fixture
def cupy():
    """CuPy with a usable CUDA device, or the test is skipped (the suite must pass without a GPU)."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy
