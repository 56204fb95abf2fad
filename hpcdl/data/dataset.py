"""The in-memory dataset every trainer sees, and loading one by its config name.

Every rank loads the whole (small) dataset and the sampler decides which
rows it uses; for data sets too big for that, `read_hdf5(path, split, rows)`
reads only a rank's rows.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcdl.data.validate import channel_stats, validate_images_labels
from hpcdl.errors import ConfigError, DataError

DATASETS = ("fashion_mnist", "hdf5", "idx", "synthetic")


@dataclass
class Dataset:
    """Train and test splits as uint8 N×C×H×W images and int64 labels, plus what describes them.

    mean and std are per channel, of the training split, in [0, 1] pixel units
    (what `normalize` expects).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: tuple
    source: str

    def __post_init__(self):
        self.class_names = tuple(str(n) for n in self.class_names)
        self.train_labels = np.ascontiguousarray(self.train_labels, dtype=np.int64)
        self.test_labels = np.ascontiguousarray(self.test_labels, dtype=np.int64)
        self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(self.std, dtype=np.float32).reshape(-1)
        for split in ("train", "test"):
            validate_images_labels(getattr(self, f"{split}_images"), getattr(self, f"{split}_labels"),
                                   self.num_classes, self.source, f"{split} images", f"{split} labels")
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise DataError(f"{self.source}: test images are {self.test_images.shape[1:]}, "
                            f"train images {self.train_images.shape[1:]}")
        if self.mean.shape != (self.input_shape[0],) or self.std.shape != self.mean.shape:
            raise DataError(f"{self.source}: mean/std need one value per channel ({self.input_shape[0]}), "
                            f"got {self.mean.shape} and {self.std.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])

    def summary(self) -> str:
        shape = "×".join(str(d) for d in self.input_shape)
        return (f"{self.source}: {len(self.train_images):,} train / {len(self.test_images):,} test images "
                f"{shape}, {self.num_classes} classes")


def dataset_from_idx_dir(directory, class_names: Sequence[str] | None = None) -> Dataset:
    """A Dataset from the four MNIST-layout IDX files (raw or .gz) in `directory`."""
    from hpcdl.data.idx import find_idx_files, read_idx

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    found, missing = find_idx_files(directory)
    if missing:
        raise DataError(f"{directory}: missing IDX file(s) {', '.join(m + '(.gz)' for m in missing)}")
    arrays = {role: read_idx(path) for role, path in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{found[f'{split}_images']}: expected N×H×W images and N labels, "
                            f"got {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{found[f'{split}_labels']}: {len(labels)} labels for {len(images)} images "
                            f"in {found[f'{split}_images'].name}")
    if class_names is None:
        top = max(int(arrays["train_labels"].max(initial=0)), int(arrays["test_labels"].max(initial=0)))
        class_names = [str(i) for i in range(top + 1)]
    for split in ("train", "test"):
        images_file, labels_file = found[f"{split}_images"], found[f"{split}_labels"]
        validate_images_labels(arrays[f"{split}_images"][:, None], arrays[f"{split}_labels"], len(class_names),
                               str(directory), images_file.name, labels_file.name)
    train_images = arrays["train_images"][:, None]  # IDX stores N×H×W; add the channel axis
    mean, std = channel_stats(train_images)
    return Dataset(train_images, arrays["train_labels"], arrays["test_images"][:, None], arrays["test_labels"],
                   mean, std, tuple(class_names), str(directory))


def dataset_from_hdf5(path) -> Dataset:
    from hpcdl.data.hdf5 import read_hdf5, read_hdf5_meta

    meta = read_hdf5_meta(path)
    train = read_hdf5(path, "train")
    test = read_hdf5(path, "test")
    return Dataset(*train, *test, meta["mean"], meta["std"], tuple(meta["class_names"]), str(path))


def synthetic_dataset(size: int | tuple[int, int] = 4096, shape: Sequence[int] = (1, 28, 28),
                      num_classes: int = 10, seed: int = 0) -> Dataset:
    """Deterministic learnable images; `size` is the train count (test gets a quarter) or (train, test)."""
    from hpcdl.data.synthetic import make_synthetic_split

    num_train, num_test = (size, max(1, size // 4)) if np.isscalar(size) else size
    if num_train < 1 or num_test < 0 or len(shape) != 3 or min(shape) < 1 or num_classes < 1:
        raise ConfigError(f"data.synthetic: need ≥1 train samples, C, H, W ≥ 1 and ≥1 class; "
                          f"got size {size}, shape {tuple(shape)}, {num_classes} classes")
    train = make_synthetic_split(int(num_train), shape, num_classes, seed, 0)
    test = make_synthetic_split(int(num_test), shape, num_classes, seed, 1)
    mean, std = channel_stats(train[0])
    std = np.maximum(std, np.float32(1e-3))
    return Dataset(*train, *test, mean, std, tuple(f"class{i}" for i in range(num_classes)),
                   f"synthetic(seed={seed})")


def load_dataset(name: str, path=None, data_dir=None, download: bool = True,
                 synthetic_size: int | tuple[int, int] = 4096, synthetic_shape: Sequence[int] = (1, 28, 28),
                 synthetic_classes: int = 10, seed: int = 0) -> Dataset:
    """The dataset named by `data.dataset`: fashion_mnist, hdf5 (needs path), idx (needs data_dir) or synthetic."""
    if name == "fashion_mnist":
        from hpcdl.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(data_dir or None, download=download)
    if name == "hdf5":
        if not path:
            raise ConfigError("data.path: dataset = 'hdf5' needs the path of an HDF5 file (see `hpcdl data convert`)")
        return dataset_from_hdf5(path)
    if name == "idx":
        if not data_dir:
            raise ConfigError("data.data_dir: dataset = 'idx' needs a directory with the four IDX files")
        return dataset_from_idx_dir(data_dir)
    if name == "synthetic":
        return synthetic_dataset(synthetic_size, synthetic_shape, synthetic_classes, seed)
    close = difflib.get_close_matches(str(name), DATASETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"data.dataset: unknown dataset {name!r}{hint} (choose from {', '.join(DATASETS)})")
