"""hpcdl's HDF5 image dataset format.

One file holds a whole dataset, laid out for data-parallel reading::

    /                 attrs: format = "hpcdl-images", format_version = 1, layout = "NCHW",
                             class_names (str [K]), mean, std (float32 [C], of the
                             training split, in [0, 1] pixel units)
    /train/images     uint8 [N, C, H, W], chunked (min(256, N), C, H, W), Fletcher-32 checksums
    /train/labels     int64 [N], chunked along N, Fletcher-32 checksums
    /test/images      as above
    /test/labels

Images are NCHW because that is what the layers consume: a batch read from
the file needs no transpose. Chunks run along N so a rank that reads a
contiguous block of rows touches only the chunks it needs.

Files are written atomically (temp file in the same directory, fsync,
rename): a converter killed half-way leaves no file that looks complete.
h5py is imported inside the functions that need it, to keep `hpcdl.data`
light to import.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hpcdl.atomic import atomic_output
from hpcdl.data.validate import channel_histogram, stats_from_histogram, validate_images_labels
from hpcdl.errors import DataError

FORMAT = "hpcdl-images"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
DEFAULT_CHUNK_ROWS = 256


# -- writing ------------------------------------------------------------------------

class SplitWriter:
    """Fills pre-sized splits chunk by chunk; the training split's statistics accumulate exactly."""

    def __init__(self, h5file, path: Path):
        self._file = h5file
        self._path = path
        self._filled: dict[str, np.ndarray] = {}
        self._train_hist = None

    def create_split(self, split: str, count: int, image_shape: Sequence[int],
                     chunk_rows: int = DEFAULT_CHUNK_ROWS, compression=None) -> None:
        c, h, w = (int(d) for d in image_shape)
        group = self._file.create_group(split)
        # HDF5 refuses chunks larger than a fixed-size dataset, and any chunk for an empty one.
        rows = min(chunk_rows, count)
        # Fletcher-32 per chunk: a flipped bit on disk becomes a read error, not a silently wrong image.
        chunked = {"fletcher32": True} if rows else {}
        group.create_dataset("images", shape=(count, c, h, w), dtype=np.uint8,
                             chunks=(rows, c, h, w) if rows else None,
                             compression=compression if rows else None, **chunked)
        group.create_dataset("labels", shape=(count,), dtype=np.int64,
                             chunks=(min(16 * chunk_rows, count),) if rows else None, **chunked)
        self._filled[split] = np.zeros(count, dtype=bool)

    def write(self, split: str, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Store rows [start, start + len(images)) of `split`."""
        group = self._file[split]
        stop = start + len(images)
        group["images"][start:stop] = images
        group["labels"][start:stop] = labels
        self._filled[split][start:stop] = True
        if split == "train":
            hist = channel_histogram(images)
            self._train_hist = hist if self._train_hist is None else self._train_hist + hist

    def finish(self, class_names: Sequence[str], mean=None, std=None) -> None:
        for split, filled in self._filled.items():
            if not filled.all():
                raise DataError(f"{self._path}: {split}: {int((~filled).sum())} rows were never written")
        if mean is None or std is None:
            if self._train_hist is None:
                raise DataError(f"{self._path}: no training images to compute mean/std from")
            mean, std = stats_from_histogram(self._train_hist)
        attrs = self._file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["layout"] = "NCHW"
        attrs["class_names"] = [str(n) for n in class_names]
        attrs["mean"] = np.asarray(mean, dtype=np.float32)
        attrs["std"] = np.asarray(std, dtype=np.float32)


@contextmanager
def hdf5_writer(path):
    """Yield a SplitWriter onto a temp file that becomes `path` once the block completes."""
    import h5py

    path = Path(path)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            yield SplitWriter(f, path)


def write_hdf5(path, splits: Mapping[str, tuple], class_names: Sequence[str], *, mean=None, std=None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, compression=None) -> None:
    """Write {split: (images uint8 N×C×H×W, labels)} to `path`, atomically.

    mean/std default to the exact per-channel statistics of the "train" split.
    """
    path = Path(path)
    for split, (images, labels) in splits.items():
        validate_images_labels(np.asarray(images), np.asarray(labels), len(class_names), str(path),
                               f"{split}/images", f"{split}/labels")
    with hdf5_writer(path) as writer:
        for split, (images, labels) in splits.items():
            writer.create_split(split, len(images), images.shape[1:], chunk_rows, compression)
            if len(images):
                writer.write(split, 0, images, np.asarray(labels, dtype=np.int64))
        writer.finish(class_names, mean, std)


# -- reading ------------------------------------------------------------------------

@contextmanager
def _open(path: Path):
    import h5py

    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        # No HDF5 file lock: writers never touch a published file (they rename a finished
        # temp file over it), and flock fails on many Lustre/NFS mounts where ranks read.
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (corrupt or truncated?): {_first_line(exc)}") from None
    try:
        yield f
    except (OSError, KeyError, RuntimeError) as exc:
        # HDF5 notices damaged metadata or chunks only when it reaches them, and h5py
        # reports that as OSError, or KeyError for a mangled object header.
        raise DataError(f"{path}: read failed (corrupt or truncated file?): {_first_line(exc)}") from None
    finally:
        f.close()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _attr(f, path: Path, key: str):
    if key not in f.attrs:
        raise DataError(f"{path}: missing attribute '{key}' (not written by `hpcdl data convert`?)")
    return f.attrs[key]


def _meta(f, path: Path) -> dict:
    version = int(_attr(f, path, "format_version"))
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version} is newer than this hpcdl reads ({FORMAT_VERSION})")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(_attr(f, path, "class_names"))]
    mean = np.atleast_1d(np.asarray(_attr(f, path, "mean"), dtype=np.float32))
    std = np.atleast_1d(np.asarray(_attr(f, path, "std"), dtype=np.float32))
    if mean.shape != std.shape or mean.ndim != 1:
        raise DataError(f"{path}: attributes 'mean' {mean.shape} and 'std' {std.shape} must be per-channel vectors")
    if not (std > 0).all():
        raise DataError(f"{path}: attribute 'std' has non-positive entries {std.tolist()}")
    splits = {}
    for split in SPLITS:
        if split in f and "images" in f[split]:
            splits[split] = {"count": int(f[split]["images"].shape[0]), "shape": tuple(f[split]["images"].shape[1:])}
    return {"format_version": version, "class_names": names, "mean": mean, "std": std, "splits": splits}


def _dataset(f, path: Path, split: str, name: str):
    if split not in f:
        raise DataError(f"{path}: missing group '{split}'")
    key = f"{split}/{name}"
    if name not in f[split]:
        raise DataError(f"{path}: missing dataset '{key}'")
    return f[key]


def _read_rows(dset, rows):
    if rows is None:
        return dset[...]
    if isinstance(rows, slice):
        return dset[rows]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(dset)):
        raise IndexError(f"rows outside [0, {len(dset)})")
    # h5py point selections must be increasing and unique; read those, then restore the order.
    unique, inverse = np.unique(rows, return_inverse=True)
    return dset[unique][inverse] if unique.size else dset[:0]


def read_hdf5_meta(path) -> dict:
    """format_version, class_names, mean, std and {split: {count, shape}} without reading pixels."""
    path = Path(path)
    with _open(path) as f:
        return _meta(f, path)


def read_hdf5(path, split: str, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×C×H×W, labels int64) of one split; `rows` (slice or indices) reads a subset.

    Every label of the split is range-checked, whichever rows are read: the
    labels are small, and a bad label on another rank is still a bad file.
    """
    path = Path(path)
    with _open(path) as f:
        meta = _meta(f, path)
        images_ds = _dataset(f, path, split, "images")
        labels_ds = _dataset(f, path, split, "labels")
        if not np.issubdtype(labels_ds.dtype, np.integer):
            raise DataError(f"{path}: {split}/labels: dtype {labels_ds.dtype}, expected int64 or int32")
        labels = labels_ds[...].astype(np.int64, copy=False)
        validate_images_labels(images_ds, labels, len(meta["class_names"]), str(path),
                               f"{split}/images", f"{split}/labels")
        if images_ds.shape[1] != len(meta["mean"]):
            raise DataError(f"{path}: {split}/images has {images_ds.shape[1]} channels but 'mean' has {len(meta['mean'])}")
        images = _read_rows(images_ds, rows)
        labels = labels[rows] if rows is not None else labels
        return images, np.ascontiguousarray(labels)


def describe_hdf5(path) -> str:
    """Human-readable summary for `hpcdl data info`."""
    meta = read_hdf5_meta(path)
    lines = [f"{path}: {FORMAT} v{meta['format_version']}, {len(meta['class_names'])} classes"]
    for split, info in meta["splits"].items():
        shape = "×".join(str(d) for d in info["shape"])
        lines.append(f"  {split:5s} {info['count']:>9,} images {shape} uint8 (NCHW)")
    lines.append("  mean  " + ", ".join(f"{m:.4f}" for m in meta["mean"]))
    lines.append("  std   " + ", ".join(f"{s:.4f}" for s in meta["std"]))
    names = meta["class_names"]
    shown = ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
    lines.append(f"  classes {shown}")
    return "\n".join(lines)
