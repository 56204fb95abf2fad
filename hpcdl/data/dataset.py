"""Datasets that hand out rows on demand, and building one from its config name.

A `Dataset` is a train and a test `Split` plus what describes them (class
names, per-channel mean and std, the converter's short side). A split knows
its row count, image shape and labels, and reads any rows into a caller's
buffer:

* `ArraySplit`: the images are in memory. For small sources only (IDX,
  Fashion-MNIST, synthetic): Fashion-MNIST's 60,000 images are 47 MB.
* `HDF5Split`: the images stay in an hpcdl HDF5 file and every read is a
  `pread` of exactly the rows asked for (`hdf5.ImageRows`), into the
  caller's reused buffer, so a rank's memory does not grow with the file.
  Its labels and per-row CRC-32s are in memory: 12 bytes per image
  (15 MB for ImageNet's 1.28 M training images).

Nothing here knows about ranks, batches or augmentation; those come after
(sampler, then loader).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hpcdl.data.validate import channel_stats, validate_images_labels
from hpcdl.errors import ConfigError, DataError

DATASETS = ("fashion_mnist", "hdf5", "idx", "synthetic")


class ArraySplit:
    """A split whose uint8 N×C×H×W images are a NumPy array in this process."""

    streams = False

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str, name: str):
        self.images = images
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.source, self.name = source, name
        self.count = int(len(images))
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.row_bytes = int(np.prod(self.image_shape, dtype=np.int64))
        self.bytes_read = 0  # nothing is read from storage after loading

    @property
    def resident_bytes(self) -> int:
        return int(self.images.nbytes + self.labels.nbytes)

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            return self.images[rows]
        return np.take(self.images, rows, axis=0, out=out)

    def close(self) -> None:
        pass

    def __reduce__(self):
        # Pickling would copy the whole array into every worker process.
        raise TypeError(f"{self.source}: {self.name} split is in memory; process workers need an HDF5 dataset "
                        "(data.worker_kind = 'thread' shares it instead)")


class HDF5Split:
    """A split of an hpcdl HDF5 file, read on demand; pickles as its (path, split) and reopens.

    `random_access` switches readahead off (the training order is a random
    permutation); evaluation reads its shard front to back and keeps it.
    """

    streams = True

    def __init__(self, path, split: str, random_access: bool = True):
        from hpcdl.data.hdf5 import ImageRows

        self._rows = ImageRows(path, split, random_access=random_access)
        self.path, self.name, self.random_access = str(path), split, bool(random_access)
        self.source = self.path
        self.labels = self._rows.labels
        self.count = self._rows.count
        self.image_shape = self._rows.image_shape
        self.row_bytes = self._rows.row_bytes
        self.layout = self._rows.layout
        self.meta = self._rows.meta

    @property
    def bytes_read(self) -> int:
        return self._rows.bytes_read

    @property
    def images(self) -> np.ndarray:
        """The whole split read into memory, for small files and tests; training never asks for it."""
        return self.read(np.arange(self.count))

    @property
    def resident_bytes(self) -> int:
        crc = self._rows.crc32
        return int(self.labels.nbytes + (crc.nbytes if crc is not None else 0))

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        return self._rows.read(rows, out)

    def close(self) -> None:
        self._rows.close()

    def __reduce__(self):
        return (HDF5Split, (self.path, self.name, self.random_access))


@dataclass
class Dataset:
    """Train and test splits plus what describes them.

    mean and std are per channel, of the training split, in [0, 1] pixel units
    (what `normalize` expects). short_side > 0 says the file stores squares
    cut from images resized to that short side, for crops at train time.
    """

    train: object  # ArraySplit | HDF5Split
    test: object
    mean: np.ndarray
    std: np.ndarray
    class_names: tuple
    source: str
    short_side: int = 0

    def __post_init__(self):
        self.class_names = tuple(str(n) for n in self.class_names)
        self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(self.std, dtype=np.float32).reshape(-1)
        if self.test.image_shape != self.train.image_shape:
            raise DataError(f"{self.source}: test images are {self.test.image_shape}, "
                            f"train images {self.train.image_shape}")
        if self.mean.shape != (self.input_shape[0],) or self.std.shape != self.mean.shape:
            raise DataError(f"{self.source}: mean/std need one value per channel ({self.input_shape[0]}), "
                            f"got {self.mean.shape} and {self.std.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W as stored (the transforms decide what the model sees)."""
        return self.train.image_shape

    @property
    def streams(self) -> bool:
        return bool(self.train.streams)

    @property
    def resident_bytes(self) -> int:
        return int(self.train.resident_bytes + self.test.resident_bytes)

    # Whole splits as arrays (converters and tests; a streamed split is read in full on each access).
    @property
    def train_images(self) -> np.ndarray:
        return self.train.images

    @property
    def test_images(self) -> np.ndarray:
        return self.test.images

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels

    def summary(self) -> str:
        shape = "×".join(str(d) for d in self.input_shape)
        where = "streamed from disk" if self.streams else "in memory"
        return (f"{self.source}: {self.train.count:,} train / {self.test.count:,} test images "
                f"{shape}, {self.num_classes} classes, {where}")

    def close(self) -> None:
        self.train.close()
        self.test.close()


def in_memory_dataset(train_images, train_labels, test_images, test_labels, mean, std, class_names,
                      source: str) -> Dataset:
    """A Dataset over arrays, validated like every file source."""
    class_names = tuple(class_names)
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        labels = np.asarray(labels)
        validate_images_labels(images, labels, len(class_names), source, f"{split} images", f"{split} labels")
    return Dataset(ArraySplit(train_images, train_labels, source, "train"),
                   ArraySplit(test_images, test_labels, source, "test"), mean, std, class_names, source)


def dataset_from_idx_dir(directory, class_names: Sequence[str] | None = None) -> Dataset:
    """A Dataset from the four MNIST-layout IDX files (raw or .gz) in `directory`."""
    from hpcdl.data.idx import read_idx_dir

    arrays, found = read_idx_dir(directory)
    if class_names is None:
        top = max(int(arrays["train_labels"].max(initial=0)), int(arrays["test_labels"].max(initial=0)))
        class_names = [str(i) for i in range(top + 1)]
    for split in ("train", "test"):
        images_file, labels_file = found[f"{split}_images"], found[f"{split}_labels"]
        validate_images_labels(arrays[f"{split}_images"][:, None], arrays[f"{split}_labels"], len(class_names),
                               str(directory), images_file.name, labels_file.name)
    train_images = arrays["train_images"][:, None]  # IDX stores N×H×W; add the channel axis
    mean, std = channel_stats(train_images)
    return in_memory_dataset(train_images, arrays["train_labels"], arrays["test_images"][:, None],
                             arrays["test_labels"], mean, std, class_names, str(directory))


def load_fashion_mnist(data_dir=None, download: bool = True) -> Dataset:
    """Fashion-MNIST in memory: 60,000 train and 10,000 test images, 1×28×28, 10 classes."""
    from hpcdl.data.fashion_mnist import CLASS_NAMES, locate_fashion_mnist

    return dataset_from_idx_dir(locate_fashion_mnist(data_dir, download=download), CLASS_NAMES)


def dataset_from_hdf5(path) -> Dataset:
    """Both splits of an hpcdl HDF5 file, streamed: only labels and checksums are loaded."""
    train = HDF5Split(path, "train", random_access=True)
    try:
        test = HDF5Split(path, "test", random_access=False)
    except BaseException:
        train.close()
        raise
    meta = train.meta
    return Dataset(train, test, meta["mean"], meta["std"], tuple(meta["class_names"]), str(path),
                   short_side=int(meta["short_side"]))


def synthetic_dataset(size: int | tuple[int, int] = 4096, shape: Sequence[int] = (1, 28, 28),
                      num_classes: int = 10, seed: int = 0) -> Dataset:
    """Deterministic learnable images in memory; `size` is the train count (test gets a quarter) or (train, test)."""
    from hpcdl.data.synthetic import make_synthetic_split

    num_train, num_test = (size, max(1, size // 4)) if np.isscalar(size) else size
    if num_train < 1 or num_test < 0 or len(shape) != 3 or min(shape) < 1 or num_classes < 1:
        raise ConfigError(f"data.synthetic: need ≥1 train samples, C, H, W ≥ 1 and ≥1 class; "
                          f"got size {size}, shape {tuple(shape)}, {num_classes} classes")
    train = make_synthetic_split(int(num_train), shape, num_classes, seed, 0)
    test = make_synthetic_split(int(num_test), shape, num_classes, seed, 1)
    mean, std = channel_stats(train[0])
    std = np.maximum(std, np.float32(1e-3))
    return in_memory_dataset(*train, *test, mean, std, tuple(f"class{i}" for i in range(num_classes)),
                             f"synthetic(seed={seed})")


def load_dataset(name: str, path=None, data_dir=None, download: bool = True,
                 synthetic_size: int | tuple[int, int] = 4096, synthetic_shape: Sequence[int] = (1, 28, 28),
                 synthetic_classes: int = 10, seed: int = 0) -> Dataset:
    """The dataset named by `data.dataset`: fashion_mnist, hdf5 (needs path), idx (needs data_dir) or synthetic."""
    if name == "fashion_mnist":
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
