"""A converted dataset as shard files: plan, write, verify on resume, stitch into one file.

Next to the output X.h5 the converter keeps::

    X.h5.shards/manifest.json    what is being converted: arguments, decoder versions,
                                 class names, a digest of each split's file list
    X.h5.shards/train-00000.h5   one shard: the rows of files [0, n) of the shuffled train list
    X.h5.shards/train-00001.h5   ...
    X.h5.shards/test-00000.h5
    X.h5                         the stitched file: per split, `images` is a virtual dataset over
                                 the shards' contiguous `images`; labels, crc32, files are copies

A shard is a complete hpcdl format-version-2 file with one split (readable
alone by `ImageRows` and `hpcdl data info`; its mean/std are its own
pixels'), plus::

    /<split>/histogram      int64 [C, 256]: exact per-channel pixel counts of its rows
    /<split>/source_index   int64 [rows]: each row's position in the split's file list
    /<split>/skipped        str [k, 2]: (file, reason) of the files it could not use
    attr "hpcdl.shard"      JSON: fingerprint, split, index, planned files, rows, source
                            modes, CRC-32s of the small datasets

The fingerprint is a SHA-256 of the conversion's arguments, the decoder
versions and the shard's own files (path, label, size, mtime): a shard is
reused only when everything that decides its bytes is unchanged. Shards are
written under a temporary name and renamed when complete, so a killed
conversion leaves complete shards and at most one `.part` file per rank.

What a shard holds does not depend on how many ranks wrote the shards, or
in which order: the shuffled file list and its cut into shards are fixed by
the arguments alone, and a file that cannot be decoded is left out the same
way wherever it is met. That is what makes the stitched file the same for
any number of ranks, and for a resumed conversion.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hpcdl.atomic import atomic_output
from hpcdl.data.hdf5 import PAGE_ALIGNED, ImageRows, write_root_attrs
from hpcdl.data.imagefolder import Decoded, DecodePool, Geometry, ImageList
from hpcdl.data.validate import stats_from_histogram
from hpcdl.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hpcdl-conversion"
SHARD_ATTR = "hpcdl.shard"
CONVERSION_ATTR = "hpcdl.conversion"
WRITE_BLOCK = 64  # rows per h5py write: ~12 MB at 256², large enough to stream at disk speed
VERIFY_BLOCK = 256


def shard_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


@dataclass(frozen=True)
class ShardSpec:
    """Files [start, stop) of `split`'s list go into shard `index`; `fingerprint` names its exact content."""

    split: str
    index: int
    start: int
    stop: int
    fingerprint: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.h5"

    @property
    def planned(self) -> int:
        return self.stop - self.start


@dataclass
class ShardInfo:
    """What a complete shard holds, read back from its file (no pixels)."""

    spec: ShardSpec
    rows: int
    labels: np.ndarray
    crc32: np.ndarray
    histogram: np.ndarray
    source_index: np.ndarray
    skipped: list[tuple[str, str]]
    source_modes: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


class StaleShard(Exception):
    """An existing shard file cannot be reused; the message says why."""


# -- plan ---------------------------------------------------------------------------------------

def _digest_entries(h, images: ImageList, start: int, stop: int, with_stat: bool) -> None:
    for i, path in enumerate(images.paths(start, stop), start=start):
        h.update(path.encode("utf-8", "surrogateescape"))
        stat = f"\0{images.sizes[i]}\0{images.mtimes[i]}" if with_stat else ""
        h.update(f"\0{images.labels[i]}{stat}\n".encode())


def file_list_digest(images: ImageList) -> str:
    """SHA-256 of the ordered (path, label) list: what the manifest compares on resume."""
    h = hashlib.sha256()
    _digest_entries(h, images, 0, len(images), with_stat=False)
    return h.hexdigest()


def plan_shards(splits: dict[str, ImageList], core: dict, shard_images: int) -> list[ShardSpec]:
    """Cut each split's file list into shards of `shard_images` files, fingerprinting each."""
    if shard_images < 1:
        raise ValueError("shard_images must be ≥ 1")
    core_bytes = json.dumps(core, sort_keys=True).encode()
    specs = []
    for split, images in splits.items():
        for index, start in enumerate(range(0, len(images), shard_images)):
            stop = min(start + shard_images, len(images))
            h = hashlib.sha256(core_bytes)
            h.update(f"\0{split}\0{index}\0".encode())
            _digest_entries(h, images, start, stop, with_stat=True)
            specs.append(ShardSpec(split, index, start, stop, h.hexdigest()))
    return specs


# -- manifest -----------------------------------------------------------------------------------

def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable conversion manifest ({exc}); remove it or rerun with --restart") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not an hpcdl conversion manifest; remove it or rerun with --restart")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    path = directory / MANIFEST_NAME
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(dict(manifest, format=MANIFEST_FORMAT), indent=1, sort_keys=True) + "\n")


def manifest_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between an earlier conversion's manifest and this one's."""
    problems = []
    for key in sorted(set(old.get("arguments", {})) | set(new["arguments"])):
        then, now = old.get("arguments", {}).get(key), new["arguments"].get(key)
        if then != now:
            problems.append(f"{key} was {then!r}, now {now!r}")
    for key in sorted(set(old.get("decoder", {})) | set(new["decoder"])):
        then, now = old.get("decoder", {}).get(key), new["decoder"].get(key)
        if then != now:
            problems.append(f"decoder {key} was {then}, now {now}")
    if old.get("class_names") != new["class_names"]:
        then, now = old.get("class_names") or [], new["class_names"]
        problems.append(f"classes changed ({len(then)} then, {len(now)} now)")
    for split, files in new["files"].items():
        before = old.get("files", {}).get(split, {})
        if before.get("sha256") != files["sha256"]:
            problems.append(f"the {split} file list changed ({before.get('count', 0):,} files then, "
                            f"{files['count']:,} now)")
    return problems


_SHARD_FILE = re.compile(r"^(train|test)-\d{5,}\.h5$")
_PARTIAL_FILE = re.compile(r"^\.(train|test)-\d{5,}\.h5\.(part|compact)$")


def shard_files(directory: Path) -> list[str]:
    """Names of the (complete) shard files in `directory`, sorted."""
    return sorted(p.name for p in directory.iterdir() if _SHARD_FILE.match(p.name) and p.is_file())


def remove_conversion_files(directory: Path) -> int:
    """Delete what a conversion wrote into `directory` (never anything else); returns the count."""
    if not directory.is_dir():
        return 0
    ours = [p for p in directory.iterdir() if p.is_file() and (p.name == MANIFEST_NAME or _SHARD_FILE.match(p.name)
                                                                or _PARTIAL_FILE.match(p.name))]
    for path in ours:
        path.unlink()
    return len(ours)


def remove_partial_files(directory: Path) -> int:
    """Delete the temporary files of shards a killed conversion was writing."""
    partial = [p for p in directory.iterdir() if _PARTIAL_FILE.match(p.name) and p.is_file()]
    for path in partial:
        path.unlink()
    return len(partial)


# -- write --------------------------------------------------------------------------------------

def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def _text_crc(rows: Sequence[tuple[str, str]]) -> int:
    return zlib.crc32("\n".join(f"{a}\t{b}" for a, b in rows).encode("utf-8", "surrogateescape"))


class _ShardRecord:
    """What a shard being written holds besides its pixels, filled row by row."""

    def __init__(self, spec: ShardSpec, channels: int):
        self.spec = spec
        self.rows = 0
        self.labels = np.empty(spec.planned, np.int64)
        self.crc32 = np.empty(spec.planned, np.uint32)
        self.source_index = np.empty(spec.planned, np.int64)
        self.histogram = np.zeros((channels, 256), np.int64)
        self.skipped: list[tuple[str, str]] = []
        self.modes: dict[str, int] = {}
        self.seconds = {"decode": 0.0, "resize": 0.0, "write": 0.0}

    def add(self, result: Decoded, label: int, index: int) -> None:
        self.labels[self.rows], self.crc32[self.rows], self.source_index[self.rows] = label, result.crc32, index
        self.rows += 1
        self.histogram += result.histogram
        self.modes[result.source_mode] = self.modes.get(result.source_mode, 0) + 1
        self.seconds["decode"] += result.decode_s
        self.seconds["resize"] += result.resize_s

    def info(self) -> ShardInfo:
        n = self.rows
        return ShardInfo(self.spec, n, self.labels[:n], self.crc32[:n], self.histogram, self.source_index[:n],
                         self.skipped, self.modes, self.seconds)

    def write(self, f, class_names: Sequence[str], short_side: int) -> None:
        """The small datasets and the attributes, into the shard file `f` whose images are written."""
        info = self.info()
        group = f[self.spec.split]
        group["labels"] = info.labels
        group["crc32"] = info.crc32
        group["histogram"] = info.histogram
        group["source_index"] = info.source_index
        group.create_dataset("skipped", data=_text_array(info.skipped).reshape(len(info.skipped), 2),
                             dtype=_str_dtype())
        mean, std = _shard_stats(info.histogram)
        write_root_attrs(f, class_names, mean, std, short_side)
        f.attrs[SHARD_ATTR] = json.dumps({
            "fingerprint": self.spec.fingerprint, "split": self.spec.split, "index": self.spec.index,
            "planned": self.spec.planned, "rows": info.rows, "source_modes": dict(sorted(info.source_modes.items())),
            "crc32": {"labels": _crc(info.labels), "crc32": _crc(info.crc32), "histogram": _crc(info.histogram),
                      "source_index": _crc(info.source_index), "skipped": _text_crc(info.skipped)},
        }, sort_keys=True)


def _shard_stats(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A shard's own mean/std, for a shard read alone; a shard of one flat colour gets std 1."""
    if histogram.sum() == 0:
        return np.zeros(len(histogram), np.float32), np.ones(len(histogram), np.float32)
    mean, std = stats_from_histogram(histogram)
    return mean, np.where(std > 0, std, 1.0).astype(np.float32)


def write_shard(directory: Path, spec: ShardSpec, images: ImageList, geometry: Geometry,
                class_names: Sequence[str], short_side: int, pool: DecodePool, *,
                warn: Callable[[str], None] = print, halfway: Callable[[Path], None] | None = None) -> ShardInfo:
    """Decode the shard's files and write its file atomically; returns what it holds.

    Unusable files are reported through `warn` (one line each, naming the
    file) and left out. `halfway(temp_path)` runs once when half the rows
    are on disk (fault injection for tests).
    """
    import h5py

    started = time.perf_counter()
    path = directory / spec.name
    record = _ShardRecord(spec, geometry.shape[0])
    block = np.empty((min(WRITE_BLOCK, spec.planned), *geometry.shape), np.uint8)
    filled = 0
    paths = images.paths(spec.start, spec.stop)
    full_paths = [os.path.join(images.base, p) for p in paths]
    try:
        with atomic_output(path, temp=directory / f".{spec.name}.part") as tmp:
            with h5py.File(tmp, "w", locking=False, **PAGE_ALIGNED) as f:  # rows on page boundaries: 1.0x cold reads
                dset = f.create_group(spec.split).create_dataset("images", shape=(spec.planned, *geometry.shape),
                                                                 dtype=np.uint8)
                for k, result in enumerate(pool.map(full_paths, geometry)):
                    if isinstance(result, str):
                        record.skipped.append((paths[k], result))
                        warn(f"skipped {full_paths[k]}: {result}")
                    else:
                        block[filled] = result.pixels
                        filled += 1
                        record.add(result, images.labels[spec.start + k], spec.start + k)
                    if filled and (filled == len(block) or k == spec.planned - 1):
                        t = time.perf_counter()
                        dset[record.rows - filled:record.rows] = block[:filled]
                        record.seconds["write"] += time.perf_counter() - t
                        filled = 0
                        if halfway is not None and 2 * record.rows >= spec.planned:
                            f.flush()
                            halfway(tmp)
                            halfway = None
                if record.rows == spec.planned:
                    record.write(f, class_names, short_side)
            if record.rows < spec.planned:
                t = time.perf_counter()
                _compact(tmp, spec, record.rows, geometry, lambda g: record.write(g, class_names, short_side))
                record.seconds["write"] += time.perf_counter() - t
    except OSError as exc:
        raise DataError(f"{path}: cannot write shard: {exc.strerror or exc}") from None
    record.seconds["wall"] = time.perf_counter() - started
    return record.info()


def _compact(tmp: Path, spec: ShardSpec, rows: int, geometry: Geometry, finish: Callable) -> None:
    """Rewrite `tmp` with exactly `rows` image rows: contiguous datasets cannot shrink."""
    import h5py

    compact = tmp.with_name(tmp.name.replace(".part", ".compact"))
    with h5py.File(tmp, "r", locking=False) as src, h5py.File(compact, "w", locking=False, **PAGE_ALIGNED) as dst:
        source = src[f"{spec.split}/images"]
        target = dst.create_group(spec.split).create_dataset("images", shape=(rows, *geometry.shape), dtype=np.uint8)
        for start in range(0, rows, VERIFY_BLOCK):
            stop = min(start + VERIFY_BLOCK, rows)
            target[start:stop] = source[start:stop]
        finish(dst)
    os.replace(compact, tmp)


def _str_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


def _text_array(items) -> np.ndarray:
    """Strings as UTF-8 bytes for h5py; a file name that is not valid UTF-8 keeps its bytes (surrogateescape)."""
    flat = [str(t).encode("utf-8", "surrogateescape") for row in items
            for t in (row if isinstance(row, tuple) else (row,))]
    return np.array(flat, dtype=object)


# -- read back, verify --------------------------------------------------------------------------

def read_shard(directory: Path, spec: ShardSpec, geometry: Geometry) -> ShardInfo:
    """The summary of an existing shard, if it is exactly the shard `spec` asks for; else StaleShard."""
    import h5py

    path = directory / spec.name
    try:
        with h5py.File(path, "r", locking=False) as f:
            try:
                meta = json.loads(f.attrs[SHARD_ATTR])
            except (KeyError, ValueError, TypeError):
                raise StaleShard("no shard record (not written by this converter?)") from None
            if meta.get("fingerprint") != spec.fingerprint:
                raise StaleShard("made from other files or arguments (a source file changed since?)")
            group = f[spec.split]
            rows = int(meta["rows"])
            shape = group["images"].shape
            if shape != (rows, *geometry.shape):
                raise StaleShard(f"images {shape}, expected {(rows, *geometry.shape)}")
            labels, crc32 = group["labels"][...], group["crc32"][...]
            histogram, source_index = group["histogram"][...], group["source_index"][...]
            skipped = [(_text(a), _text(b)) for a, b in group["skipped"][...].reshape(-1, 2)]
        expected_crc = {name: int(meta["crc32"][name]) for name in
                        ("labels", "crc32", "histogram", "source_index", "skipped")}
        planned = int(meta["planned"])
    except StaleShard:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise StaleShard(f"unreadable ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    checks = {"labels": labels, "crc32": crc32, "histogram": histogram, "source_index": source_index}
    for name, array in checks.items():
        if _crc(array) != expected_crc[name]:
            raise StaleShard(f"{spec.split}/{name}: CRC-32 mismatch (damaged on disk?)")
    if _text_crc(skipped) != expected_crc["skipped"]:
        raise StaleShard(f"{spec.split}/skipped: CRC-32 mismatch (damaged on disk?)")
    if not (len(labels) == len(crc32) == len(source_index) == rows and rows + len(skipped) == spec.planned
            and planned == spec.planned):
        raise StaleShard(f"{rows} rows + {len(skipped)} skipped files do not add up to {spec.planned}")
    if histogram.shape != (geometry.shape[0], 256) or \
            (histogram.sum(axis=1) != rows * geometry.size * geometry.size).any():
        raise StaleShard("histogram does not count every pixel of its rows")
    return ShardInfo(spec, rows, labels.astype(np.int64), crc32.astype(np.uint32), histogram.astype(np.int64),
                     source_index.astype(np.int64), skipped, dict(meta.get("source_modes", {})))


def verify_shard(directory: Path, spec: ShardSpec, geometry: Geometry) -> ShardInfo:
    """`read_shard`, then every image row checked against its CRC-32."""
    info = read_shard(directory, spec, geometry)
    try:
        with ImageRows(directory / spec.name, spec.split, random_access=False) as reader:
            if not np.array_equal(reader.crc32, info.crc32):
                raise StaleShard("crc32 differs from the shard record")
            for start in range(0, info.rows, VERIFY_BLOCK):
                reader.read(np.arange(start, min(start + VERIFY_BLOCK, info.rows)))
    except DataError as exc:
        raise StaleShard(str(exc).split(": ", 1)[-1]) from None
    return info


def _text(value) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# -- stitch -------------------------------------------------------------------------------------

def _vds_name(name: str) -> str:
    # HDF5 expands printf-style %b in virtual source file names; a literal % must be doubled.
    return name.replace("%", "%%")


def _create_virtual_images(group, sources: Sequence[tuple[str, int]], source_dataset: str, shape) -> None:
    """`group/images`: rows stacked from each (shard file, rows) source, or an empty dataset.

    Built on the low-level API rather than `h5py.VirtualLayout`, whose
    property list records the creation time: without it the stitched file
    is byte-identical however (and whenever) the shards were made.
    """
    import h5py

    if not sources:
        group.create_dataset("images", shape=shape, dtype=np.uint8)
        return
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    row_shape = tuple(shape[1:])
    at = 0
    for file_name, rows in sources:
        selection = h5py.h5s.create_simple(tuple(shape))
        selection.select_hyperslab((at,) + (0,) * len(row_shape), (rows, *row_shape))
        dcpl.set_virtual(selection, _vds_name(file_name).encode(), source_dataset.encode(),
                         h5py.h5s.create_simple((rows, *row_shape)))
        at += rows
    space = h5py.h5s.create_simple(tuple(shape))
    h5py.h5d.create(group.id, b"images", h5py.h5t.py_create(np.dtype(np.uint8)), space, dcpl=dcpl).close()


def stitch(out: Path, infos: Sequence[ShardInfo], splits: dict[str, ImageList], geometry: Geometry,
           class_names: Sequence[str], short_side: int, conversion: dict) -> dict:
    """Write `out` atomically: per split a virtual dataset over the shards' images, plus copies of the rest.

    Returns {"mean", "std", split: rows}. The mean/std are exact: the
    training shards' histograms add up to the histogram of the whole split.
    """
    import h5py

    out = Path(out)
    directory = shard_dir(out)
    train_hist = sum((i.histogram for i in infos if i.spec.split == "train"),
                     np.zeros((geometry.shape[0], 256), np.int64))
    mean, std = stats_from_histogram(train_hist)
    if not (std > 0).all():
        raise DataError(f"{out}: the training images have no variation in channel(s) "
                        f"{np.flatnonzero(std <= 0).tolist()} (std 0); hpcdl cannot normalise them")
    counts = {}
    with atomic_output(out, temp=out.with_name(f".{out.name}.part")) as tmp:
        with h5py.File(tmp, "w", locking=False) as f:
            for split, images in splits.items():
                parts = sorted((i for i in infos if i.spec.split == split), key=lambda i: i.spec.index)
                total = sum(i.rows for i in parts)
                group = f.create_group(split)
                sources = [(f"{directory.name}/{i.spec.name}", i.rows) for i in parts if i.rows]
                _create_virtual_images(group, sources, f"{split}/images", (total, *geometry.shape))
                index = np.concatenate([i.source_index for i in parts] or [np.zeros(0, np.int64)])
                group["labels"] = np.concatenate([i.labels for i in parts] or [np.zeros(0, np.int64)])
                group["crc32"] = np.concatenate([i.crc32 for i in parts] or [np.zeros(0, np.uint32)])
                all_paths = images.paths()
                group.create_dataset("files", data=_text_array([all_paths[k] for k in index]), dtype=_str_dtype())
                skipped = [row for i in parts for row in i.skipped]
                group.create_dataset("skipped", data=_text_array(skipped).reshape(len(skipped), 2),
                                     dtype=_str_dtype())
                counts[split] = total
            write_root_attrs(f, class_names, mean, std, short_side)
            f.attrs[CONVERSION_ATTR] = json.dumps(conversion, sort_keys=True)
    return {"mean": mean, "std": std, **counts}
