"""hpcdl's HDF5 image dataset format, and random access to its rows.

One file holds a whole dataset, laid out for data-parallel random reads::

    /                 attrs: format = "hpcdl-images", format_version = 2, layout = "NCHW",
                             class_names (str [K]), mean, std (float32 [C], of the
                             training split, in [0, 1] pixel units),
                             short_side (int: the converter's resize target; 0 = images
                             stored at their final size)
    /train/images     uint8 [N, C, H, W], contiguous (no chunks, no filters), or a
                      virtual dataset whose sources are contiguous datasets of shard files
    /train/labels     int64 [N]
    /train/crc32      uint32 [N]: CRC-32 of each image row's C·H·W bytes
    /test/...         the same

Why contiguous. Training draws rows from a global permutation, so every
read is one random image. In a chunked dataset a row costs its whole chunk
(256 rows of 150 KB at 224 pixels: 256× read amplification), and every
read goes through h5py, which holds one lock per process. A contiguous
dataset has a file offset (`dset.id.get_offset()`); `ImageRows` reads each
row with one `pread` of exactly its bytes, outside h5py and its lock, from
any number of threads or processes, and the kernel's readahead is switched
off (`POSIX_FADV_RANDOM`) so the bytes read from storage are the bytes
delivered. Contiguous datasets cannot carry HDF5's Fletcher-32 filter, so a
per-row CRC-32 takes its place: a flipped bit on disk still becomes a
one-line error naming the file and the row, never a silently wrong image.

Format version 1 (chunked, Fletcher-32) files are still read, through h5py,
with the amplification their chunking implies; `hpcdl data info` says so.

Files are written atomically (temp file in the same directory, fsync,
rename): a converter killed half-way leaves no file that looks complete.
h5py is imported inside the functions that need it, to keep `hpcdl.data`
light to import.
"""
from __future__ import annotations

import os
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hpcdl.atomic import atomic_output
from hpcdl.data.validate import channel_histogram, stats_from_histogram, validate_images_labels
from hpcdl.errors import DataError

FORMAT = "hpcdl-images"
FORMAT_VERSION = 2
SPLITS = ("train", "test")
DEFAULT_CHUNK_ROWS = 256  # only for layout="chunked" (format version 1 files)
LAYOUTS = ("contiguous", "chunked")
PAGE = 4096
# h5py.File keywords that start every dataset of 64 KiB or more on a page boundary. A row
# whose size is a whole number of pages (3×256×256 = 48 pages) then never shares a page with
# its neighbours, so a cold read fetches exactly its bytes (measured: 1.000× instead of 1.02×).
PAGE_ALIGNED = {"alignment_threshold": 1 << 16, "alignment_interval": PAGE}


def row_checksums(images: np.ndarray) -> np.ndarray:
    """uint32 CRC-32 of each row's bytes of a C-contiguous N×C×H×W uint8 batch."""
    images = np.ascontiguousarray(images)
    return np.fromiter((zlib.crc32(row) for row in images.reshape(len(images), -1)), dtype=np.uint32,
                       count=len(images))


# -- writing ------------------------------------------------------------------------

class SplitWriter:
    """Fills pre-sized splits block by block; the training split's statistics accumulate exactly.

    layout "contiguous" (the default, format version 2) stores per-row CRC-32s
    beside the images; "chunked" writes the version-1 layout (Fletcher-32
    chunks of `chunk_rows` rows), kept for comparisons and old readers.
    """

    def __init__(self, h5file, path: Path, layout: str = "contiguous"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: choose from {', '.join(LAYOUTS)}")
        self._file = h5file
        self._path = path
        self.layout = layout
        self._filled: dict[str, np.ndarray] = {}
        self._train_hist = None

    def create_split(self, split: str, count: int, image_shape: Sequence[int],
                     chunk_rows: int = DEFAULT_CHUNK_ROWS, compression=None) -> None:
        c, h, w = (int(d) for d in image_shape)
        group = self._file.create_group(split)
        if self.layout == "contiguous":
            if compression:
                raise ValueError("compression needs layout='chunked'; contiguous rows are read by offset")
            _create_contiguous(group, "images", (count, c, h, w), np.uint8)
            group.create_dataset("labels", shape=(count,), dtype=np.int64)
            group.create_dataset("crc32", shape=(count,), dtype=np.uint32)
        else:
            # HDF5 refuses chunks larger than a fixed-size dataset, and any chunk for an empty one.
            rows = min(chunk_rows, count)
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
        images = np.ascontiguousarray(images, dtype=np.uint8)
        group["images"][start:stop] = images
        group["labels"][start:stop] = labels
        if "crc32" in group:
            group["crc32"][start:stop] = row_checksums(images)
        self._filled[split][start:stop] = True
        if split == "train":
            hist = channel_histogram(images)
            self._train_hist = hist if self._train_hist is None else self._train_hist + hist

    def finish(self, class_names: Sequence[str], mean=None, std=None, short_side: int = 0) -> None:
        for split, filled in self._filled.items():
            if not filled.all():
                raise DataError(f"{self._path}: {split}: {int((~filled).sum())} rows were never written")
        if mean is None or std is None:
            if self._train_hist is None:
                raise DataError(f"{self._path}: no training images to compute mean/std from")
            mean, std = stats_from_histogram(self._train_hist)
        write_root_attrs(self._file, class_names, mean, std, short_side,
                         version=FORMAT_VERSION if self.layout == "contiguous" else 1)


def _create_contiguous(group, name: str, shape, dtype):
    """A contiguous dataset whose storage is allocated now and never pre-filled.

    Early allocation gives the dataset its file offset before the first
    write; skipping the fill avoids writing every byte twice.
    """
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(tuple(shape))
    dsid = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def write_root_attrs(h5file, class_names: Sequence[str], mean, std, short_side: int = 0,
                     version: int = FORMAT_VERSION) -> None:
    """The root attributes every hpcdl image file carries (see the module docstring)."""
    attrs = h5file.attrs
    attrs["format"] = FORMAT
    attrs["format_version"] = version
    attrs["layout"] = "NCHW"
    attrs["class_names"] = [str(n) for n in class_names]
    attrs["mean"] = np.asarray(mean, dtype=np.float32)
    attrs["std"] = np.asarray(std, dtype=np.float32)
    attrs["short_side"] = int(short_side)


@contextmanager
def hdf5_writer(path, layout: str = "contiguous", temp=None):
    """Yield a SplitWriter onto a temp file that becomes `path` once the block completes."""
    import h5py

    path = Path(path)
    with atomic_output(path, temp=temp) as tmp:
        with h5py.File(tmp, "w", **PAGE_ALIGNED) as f:
            yield SplitWriter(f, path, layout)


def write_hdf5(path, splits: Mapping[str, tuple], class_names: Sequence[str], *, mean=None, std=None,
               layout: str = "contiguous", chunk_rows: int = DEFAULT_CHUNK_ROWS, compression=None,
               short_side: int = 0) -> None:
    """Write {split: (images uint8 N×C×H×W, labels)} to `path`, atomically.

    mean/std default to the exact per-channel statistics of the "train" split.
    """
    path = Path(path)
    for split, (images, labels) in splits.items():
        validate_images_labels(np.asarray(images), np.asarray(labels), len(class_names), str(path),
                               f"{split}/images", f"{split}/labels")
    with hdf5_writer(path, layout) as writer:
        for split, (images, labels) in splits.items():
            writer.create_split(split, len(images), images.shape[1:], chunk_rows, compression)
            if len(images):
                writer.write(split, 0, images, np.asarray(labels, dtype=np.int64))
        writer.finish(class_names, mean, std, short_side)


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
    return {"format_version": version, "class_names": names, "mean": mean, "std": std, "splits": splits,
            "short_side": int(f.attrs.get("short_side", 0))}


def _dataset(f, path: Path, split: str, name: str):
    if split not in f:
        raise DataError(f"{path}: missing group '{split}'")
    key = f"{split}/{name}"
    if name not in f[split]:
        raise DataError(f"{path}: missing dataset '{key}'")
    return f[key]


def _checked_labels(f, path: Path, split: str, meta: dict) -> np.ndarray:
    """All labels of a split, after the checks every reader needs (dtype, shape, range, channels)."""
    images_ds = _dataset(f, path, split, "images")
    labels_ds = _dataset(f, path, split, "labels")
    if not np.issubdtype(labels_ds.dtype, np.integer):
        raise DataError(f"{path}: {split}/labels: dtype {labels_ds.dtype}, expected int64 or int32")
    labels = np.ascontiguousarray(labels_ds[...], dtype=np.int64)
    validate_images_labels(images_ds, labels, len(meta["class_names"]), str(path),
                           f"{split}/images", f"{split}/labels")
    if images_ds.shape[1] != len(meta["mean"]):
        raise DataError(f"{path}: {split}/images has {images_ds.shape[1]} channels but 'mean' has {len(meta['mean'])}")
    return labels


# -- random access to rows ----------------------------------------------------------------

@dataclass(frozen=True)
class Extent:
    """Rows [first, first + count) of a split live at byte `offset` of `file`, back to back."""

    file: str
    offset: int
    first: int
    count: int


def _contiguous_offset(dset) -> int | None:
    import h5py

    plist = dset.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
        return None
    offset = dset.id.get_offset()
    if offset is None and dset.shape[0] > 0:
        return None  # never allocated: nothing was written
    return int(offset or 0)


def _first_selected_row(space) -> int:
    import h5py

    if space.get_select_type() == h5py.h5s.SEL_ALL:
        return 0
    (lo, *_), _ = space.get_select_bounds()
    return int(lo)


def resolve_extents(dset, path: Path) -> list[Extent] | None:
    """Where each row of an images dataset is in which file, or None when rows are not at fixed offsets.

    A contiguous dataset is one extent; a virtual dataset is one extent per
    source, each of which must itself be a contiguous dataset covering whole
    rows. Chunked or filtered storage (format version 1) has no fixed offsets.
    """
    import h5py

    if not dset.is_virtual:
        offset = _contiguous_offset(dset)
        return None if offset is None else [Extent(str(path), offset, 0, int(dset.shape[0]))]
    extents = []
    for source in dset.virtual_sources():
        (v_lo, *_), (v_hi, *_) = source.vspace.get_select_bounds()
        s_lo = _first_selected_row(source.src_space)
        source_path = Path(source.file_name)
        if not source_path.is_absolute():
            source_path = path.parent / source_path  # HDF5 resolves relative sources the same way
        try:
            with h5py.File(source_path, "r", locking=False) as src:
                offset = _contiguous_offset(src[source.dset_name])
        except (OSError, KeyError) as exc:
            raise DataError(f"{path}: virtual dataset source {source_path}:{source.dset_name} "
                            f"unreadable: {_first_line(exc)}") from None
        if offset is None:
            return None
        row_bytes = int(np.prod(dset.shape[1:], dtype=np.int64))
        extents.append(Extent(str(source_path), offset + int(s_lo) * row_bytes, int(v_lo), int(v_hi) - int(v_lo) + 1))
    extents.sort(key=lambda e: e.first)
    covered = 0
    for extent in extents:
        if extent.first != covered:
            raise DataError(f"{path}: virtual dataset {dset.name} has no source for rows "
                            f"[{covered}, {extent.first})")
        covered += extent.count
    if covered != dset.shape[0]:
        raise DataError(f"{path}: virtual dataset {dset.name} has no source for rows [{covered}, {dset.shape[0]})")
    return extents


class ImageRows:
    """Random access to the image rows of one split, reading exactly the bytes asked for.

    `read(rows)` returns uint8 [len(rows), C, H, W] in the order asked.
    Contiguous and virtual-over-contiguous datasets (format version 2) are
    read with `os.preadv` at each row's offset, outside h5py; runs of
    consecutive rows become one read. Chunked datasets (version 1) fall back
    to h5py and read whole chunks. `bytes_read` counts what was requested
    from the file system (read amplification = bytes_read / bytes delivered;
    for chunked files it counts each touched chunk's uncompressed size).

    `random_access` switches the kernel's readahead off for the files
    (`POSIX_FADV_RANDOM`), which is what makes bytes read from storage equal
    bytes delivered under a shuffled training order; leave it off for
    sequential scans (evaluation), where readahead helps.

    Safe to share between threads (pread has no file position; opening
    files and counting bytes take a lock). A process that forks should open
    its own with `ImageRows(*rows.spec)`.
    """

    def __init__(self, path, split: str, *, verify: bool = True, random_access: bool = True):
        path = Path(path)
        self.path, self.split = path, split
        self.verify, self.random_access = bool(verify), bool(random_access)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._h5 = None
        with _open(path) as f:
            meta = _meta(f, path)
            self.labels = _checked_labels(f, path, split, meta)
            images = f[f"{split}/images"]
            self.count = int(images.shape[0])
            self.image_shape = tuple(int(d) for d in images.shape[1:])
            self.row_bytes = int(np.prod(self.image_shape, dtype=np.int64))
            self.extents = resolve_extents(images, path)
            if self.extents is not None:
                self.crc32 = self._read_checksums(f, path, split) if verify else None
                self.layout = "virtual" if images.is_virtual else "contiguous"
                self.chunk_rows = 0
            else:
                self.crc32 = None  # chunked files carry Fletcher-32, which HDF5 checks itself
                self.layout = "chunked"
                self.chunk_rows = int(images.chunks[0]) if images.chunks else self.count
        self.meta = meta
        self._starts = np.array([e.first for e in self.extents or []], dtype=np.int64)

    @property
    def spec(self) -> tuple:
        return (str(self.path), self.split)

    def _read_checksums(self, f, path: Path, split: str) -> np.ndarray:
        if "crc32" not in f[split]:
            raise DataError(f"{path}: missing dataset '{split}/crc32' (per-row checksums of contiguous images)")
        crc = f[f"{split}/crc32"][...]
        if crc.shape != (self.count,) or crc.dtype != np.uint32:
            raise DataError(f"{path}: {split}/crc32: shape {crc.shape} dtype {crc.dtype}, "
                            f"expected ({self.count},) uint32")
        return crc

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise DataError(f"{file}: cannot open: {exc.strerror or exc}") from None
                if self.random_access and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[file] = fd
        return fd

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"{self.path}: {self.split}: rows outside [0, {self.count})")
        shape = (len(rows), *self.image_shape)
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
        if self.extents is None:
            return self._read_chunked(rows, out)
        flat = out.reshape(len(rows), self.row_bytes)
        i = 0
        while i < len(rows):
            extent = self.extents[int(np.searchsorted(self._starts, rows[i], side="right")) - 1]
            end = extent.first + extent.count
            j = i + 1  # extend the run while rows stay consecutive inside this extent
            while j < len(rows) and rows[j] == rows[j - 1] + 1 and rows[j] < end:
                j += 1
            offset = extent.offset + (int(rows[i]) - extent.first) * self.row_bytes
            self._pread(extent.file, memoryview(flat[i:j]).cast("B"), offset)
            i = j
        if self.crc32 is not None:
            self._check(rows, flat)
        return out

    def _pread(self, file: str, buffer: memoryview, offset: int) -> None:
        fd, done = self._fd(file), 0
        while done < len(buffer):
            try:
                n = os.preadv(fd, [buffer[done:]], offset + done)
            except OSError as exc:
                raise DataError(f"{file}: read failed at byte {offset + done}: {exc.strerror or exc}") from None
            if n == 0:
                raise DataError(f"{file}: truncated: {len(buffer) - done} bytes missing at byte {offset + done} "
                                f"(rows of {self.path}:{self.split})")
            done += n
        with self._lock:
            self.bytes_read += done

    def _check(self, rows: np.ndarray, flat: np.ndarray) -> None:
        for k, row in enumerate(rows):
            if zlib.crc32(flat[k]) != self.crc32[row]:
                raise DataError(f"{self.path}: {self.split}/images row {int(row)}: CRC-32 mismatch "
                                "(damaged on disk?)")

    def _read_chunked(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        import h5py

        with self._lock:
            if self._h5 is None:
                self._h5 = h5py.File(self.path, "r", locking=False)
        try:
            out[...] = _read_rows(self._h5[f"{self.split}/images"], rows)
        except (OSError, KeyError, RuntimeError) as exc:
            raise DataError(f"{self.path}: read failed (corrupt or truncated file?): {_first_line(exc)}") from None
        chunks = np.unique(rows // max(self.chunk_rows, 1))
        touched = int(sum(min(self.chunk_rows, self.count - c * self.chunk_rows) for c in chunks)) * self.row_bytes
        with self._lock:
            self.bytes_read += touched
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        raise TypeError("ImageRows holds open files; pass `rows.spec` and reopen with ImageRows(*spec)")


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
    """format_version, class_names, mean, std, short_side and {split: {count, shape}} without reading pixels."""
    path = Path(path)
    with _open(path) as f:
        return _meta(f, path)


def read_hdf5(path, split: str, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×C×H×W, labels int64) of one split; `rows` (slice or indices) reads a subset.

    Every label of the split is range-checked, whichever rows are read: the
    labels are small, and a bad label on another rank is still a bad file.
    This reads into memory; training on large files goes through `ImageRows`.
    """
    with ImageRows(path, split, random_access=False) as reader:
        if rows is None:
            rows = np.arange(reader.count)
        elif isinstance(rows, slice):
            rows = np.arange(reader.count)[rows]
        rows = np.asarray(rows, dtype=np.int64)
        return reader.read(rows), np.ascontiguousarray(reader.labels[rows])


def _alignment(reader: ImageRows) -> str:
    """How a row lies against 4 KiB pages: what a cold read of one row costs beyond its bytes."""
    rows_aligned = all(e.offset % PAGE == 0 for e in reader.extents) and reader.row_bytes % PAGE == 0
    if rows_aligned:
        return f"rows of {reader.row_bytes:,} B start on page boundaries (cold reads fetch exactly a row)"
    pages = -(-reader.row_bytes // PAGE) + 1
    return (f"rows of {reader.row_bytes:,} B are not page-aligned (a cold read fetches up to {pages} pages, "
            f"{pages * PAGE / reader.row_bytes:.3f}× a row)")


def describe_hdf5(path) -> str:
    """Human-readable summary for `hpcdl data info`: splits, storage layout, statistics, classes."""
    path = Path(path)
    meta = read_hdf5_meta(path)
    short = f", stored at short side {meta['short_side']}" if meta["short_side"] else ""
    lines = [f"{path}: {FORMAT} v{meta['format_version']}, {len(meta['class_names'])} classes{short}"]
    for split, info in meta["splits"].items():
        shape = "×".join(str(d) for d in info["shape"])
        with ImageRows(path, split, verify=False) as reader:
            if reader.layout == "chunked":
                storage = (f"chunked, {reader.chunk_rows} rows per chunk: one random row reads its whole chunk "
                           f"(up to {reader.chunk_rows}× read amplification); re-convert for random access")
            elif reader.layout == "virtual":
                files = len({e.file for e in reader.extents})
                storage = (f"virtual over {len(reader.extents)} contiguous sources in {files} file(s), rows read by "
                           f"offset, CRC-32 per row; {_alignment(reader)}")
            else:
                storage = (f"contiguous at byte {reader.extents[0].offset:,}, rows read by offset, CRC-32 per row; "
                           f"{_alignment(reader)}")
        mb = info["count"] * int(np.prod(info["shape"])) / 1e6
        lines.append(f"  {split:5s} {info['count']:>9,} images {shape} uint8 (NCHW), {mb:,.1f} MB; {storage}")
    lines.append("  mean  " + ", ".join(f"{m:.4f}" for m in meta["mean"]))
    lines.append("  std   " + ", ".join(f"{s:.4f}" for s in meta["std"]))
    names = meta["class_names"]
    shown = ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
    lines.append(f"  classes {shown}")
    return "\n".join(lines)
