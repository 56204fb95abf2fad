"""Image folders as a data source: which files, which labels, and the pixels to store.

The ImageNet layout: ROOT/<class>/<image>, one subfolder per class (sorted
names -> labels 0..K-1), images at any depth below their class folder.
Validation images come the same way, or as one folder of files labelled by
a CSV of `file,label` lines.

`decode` turns one file into the uint8 C×N×N rows the converter stores: the
file's content decides how it is read (a PNG named .JPEG is still read), every
mode Pillow opens becomes RGB (or L), and a file that cannot be decoded raises
`BadImage` with a one-line reason, which the converter reports and skips.
Nothing here knows about HDF5, ranks or shards.
"""
from __future__ import annotations

import csv
import difflib
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcdl.errors import DataError

# torchvision's IMG_EXTENSIONS, compared case-insensitively (ImageNet's files end in .JPEG).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
CHANNELS = {"RGB": 3, "L": 1}
# What a transparent pixel shows: the page colour these images were made to sit on.
ALPHA_BACKGROUND = (255, 255, 255)


class BadImage(Exception):
    """This file cannot be turned into pixels; the message is the reason, one line."""


# -- listing -------------------------------------------------------------------------------

@dataclass
class ImageList:
    """The files of one split, in a fixed order: paths relative to `base`, labels, sizes, mtimes.

    Paths are kept as one NUL-joined string (no POSIX path contains NUL), so
    ImageNet's 1.28 M names cost ~40 MB instead of ~110 MB of Python objects
    on every rank they are broadcast to.
    """

    base: str
    _joined: str = ""
    _starts: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    mtimes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, base, paths: Sequence[str], labels, sizes, mtimes) -> "ImageList":
        lengths = np.fromiter((len(p) + 1 for p in paths), dtype=np.int64, count=len(paths))
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(str(base), "\0".join(paths) + ("\0" if paths else ""), starts,
                   np.asarray(labels, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                   np.asarray(mtimes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        stop = len(self) if stop is None else stop
        if stop <= start:
            return []
        return self._joined[self._starts[start]:self._starts[stop] - 1].split("\0")

    def take(self, order: np.ndarray) -> "ImageList":
        """The entries at `order`, in that order."""
        paths = self.paths()
        return ImageList.build(self.base, [paths[i] for i in order], self.labels[order], self.sizes[order],
                               self.mtimes[order])


def _walk_images(folder: Path) -> tuple[list[str], list[int], list[int], int]:
    """(relative paths, sizes, mtimes, ignored non-image files) below `folder`, sorted by path.

    Hidden files and folders are skipped; symbolic links to files are
    followed, links to folders are not (no cycles).
    """
    paths, sizes, mtimes, ignored = [], [], [], 0
    stack = [""]
    while stack:
        prefix = stack.pop()
        try:
            entries = list(os.scandir(folder / prefix if prefix else folder))
        except OSError as exc:
            raise DataError(f"{folder / prefix}: cannot list: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            elif entry.is_file():
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                    ignored += 1
                    continue
                stat = entry.stat()
                paths.append(rel)
                sizes.append(stat.st_size)
                mtimes.append(stat.st_mtime_ns)
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return [paths[i] for i in order], [sizes[i] for i in order], [mtimes[i] for i in order], ignored


def class_folders(root, class_names: Sequence[str] | None = None) -> list[str]:
    """The sorted class subfolders of ROOT; with `class_names` (a validation tree) each must be one of them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    try:
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{root}: cannot list: {exc.strerror or exc}") from None
    if class_names is None and not found:
        raise DataError(f"{root}: no class subfolders (expected one subfolder of images per class)")
    if class_names is not None:
        known = set(class_names)
        unknown = [name for name in found if name not in known]
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown[:5])} not among the "
                            f"{len(class_names)} training classes")
    return found


@dataclass
class FolderListing:
    """The image files of one class folder: paths relative to it, sizes, mtimes; non-images ignored."""

    name: str
    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    ignored: int


def list_class_folder(root, name: str) -> FolderListing:
    """ROOT/NAME's image files at any depth, or an error naming the folder when it has none."""
    rel, sizes, mtimes, ignored = _walk_images(Path(root) / name)
    if not rel:
        raise DataError(f"{Path(root) / name}: class folder has no image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FolderListing(name, rel, sizes, mtimes, ignored)


def join_listings(root, listings: Sequence[FolderListing], class_names: Sequence[str]) -> tuple[ImageList, int]:
    """One ImageList (labels from `class_names`) of class-folder listings, and the ignored-file count."""
    label_of = {name: i for i, name in enumerate(class_names)}
    paths, labels, sizes, mtimes = [], [], [], []
    for listing in listings:
        paths += [f"{listing.name}/{r}" for r in listing.paths]
        labels += [label_of[listing.name]] * len(listing.paths)
        sizes += listing.sizes
        mtimes += listing.mtimes
    return ImageList.build(root, paths, labels, sizes, mtimes), sum(listing.ignored for listing in listings)


def list_class_folders(root, class_names: Sequence[str] | None = None) -> tuple[list[str], ImageList, int]:
    """(class names, the images with their labels, ignored non-image files) of ROOT/<class>/... .

    Without `class_names` the sorted subfolder names are the classes. With
    them (a validation tree), every subfolder must be one of them. A class
    folder without a single image file is an error naming it.
    """
    found = class_folders(root, class_names)
    names = found if class_names is None else list(class_names)
    images, ignored = join_listings(root, [list_class_folder(root, name) for name in found], names)
    return names, images, ignored


def read_label_csv(csv_path, image_dir, class_names: Sequence[str]) -> tuple[ImageList, int]:
    """(the images a CSV of `file,label` lines names, files in `image_dir` it does not name).

    `file` is relative to `image_dir`; `label` is a class name or an index
    into `class_names` (a name wins where both would match). A first line
    whose label is neither and whose file does not exist, such as
    `file,label`, is a header. Blank lines and lines starting with # are
    skipped. Any other problem is a one-line error naming the CSV and the line.
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such file")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such directory (the folder the files in {csv_path} are relative to)")
    label_of = {name: i for i, name in enumerate(class_names)}
    paths, labels, sizes, mtimes = [], [], [], []
    first_line: dict[str, int] = {}
    header_allowed = True
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                where = f"{csv_path}:{number}"
                if len(row) != 2:
                    raise DataError(f"{where}: expected 2 fields (file,label), found {len(row)}")
                name, label_text = row[0].strip(), row[1].strip()
                label = _parse_label(label_text, label_of, len(class_names))
                if label is None and header_allowed and not (image_dir / name).is_file():
                    header_allowed = False  # the first line: `file,label` or any other header
                    continue
                header_allowed = False
                if label is None:
                    close = difflib.get_close_matches(label_text, list(label_of), n=1)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    raise DataError(f"{where}: unknown class {label_text!r}{hint}; labels are class names "
                                    f"or indices 0..{len(class_names) - 1}")
                rel = Path(os.path.normpath(name)).as_posix()
                if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
                    raise DataError(f"{where}: {name!r} must be a path relative to {image_dir}")
                if rel in first_line:
                    raise DataError(f"{where}: {name} is listed again (first on line {first_line[rel]})")
                try:
                    stat = (image_dir / rel).stat()
                except OSError:
                    raise DataError(f"{where}: {image_dir / rel}: no such file") from None
                first_line[rel] = number
                paths.append(rel)
                labels.append(label)
                sizes.append(stat.st_size)
                mtimes.append(stat.st_mtime_ns)
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV: {exc}") from None
    if not paths:
        raise DataError(f"{csv_path}: no file,label lines")
    listed = set(paths)
    unlisted = sum(1 for rel in _walk_images(image_dir)[0] if rel not in listed)
    return ImageList.build(image_dir, paths, labels, sizes, mtimes), unlisted


def _parse_label(text: str, label_of: dict, num_classes: int) -> int | None:
    if text in label_of:
        return label_of[text]
    if text.isdigit() and int(text) < num_classes:
        return int(text)
    return None


def split_holdout(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """bool mask: a seeded `fraction` of each class's files go to the test split."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * len(members)))
        test[rng.choice(members, size=take, replace=False)] = True
    return test


# -- decoding -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """What `decode` makes of an image: the shorter side scaled to `resize`, the centre `size`² kept."""

    size: int
    resize: int
    mode: str = "RGB"

    def __post_init__(self):
        if self.size < 1 or self.resize < self.size:
            raise ValueError(f"need resize ({self.resize}) ≥ size ({self.size}) ≥ 1")
        if self.mode not in CHANNELS:
            raise ValueError(f"mode {self.mode!r}: choose from {', '.join(CHANNELS)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return CHANNELS[self.mode], self.size, self.size


@dataclass
class Decoded:
    """One stored row and what the converter records about it."""

    pixels: np.ndarray      # uint8 C×N×N, C-contiguous
    crc32: int              # zlib CRC-32 of the row's bytes, as hdf5.row_checksums computes it
    histogram: np.ndarray   # int64 [C, 256]
    source_mode: str        # the file's own mode (RGB, L, CMYK, P, RGBA, I;16, ...)
    decoded_size: tuple     # (w, h) the decoder delivered: smaller than the file's when JPEG draft scaled it
    decode_s: float
    resize_s: float


def decode(path, geometry: Geometry) -> Decoded:
    """The stored row for one image file, or BadImage with the reason it cannot be one.

    Geometry: the centre square of side min(w, h)·size/resize is resampled
    (bilinear, antialiased) straight to size×size, which equals scaling the
    shorter side to `resize` and cropping the centre size×size, without
    resampling the parts a crop would throw away. JPEGs are first decoded
    at 1/2, 1/4 or 1/8 scale (`Image.draft`) whenever that still leaves the
    shorter side ≥ `resize`.
    """
    from PIL import Image

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd but readable files (EXIF, palettes, sizes); the pixels decide.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                source_mode = image.mode
                image.draft(geometry.mode, (geometry.resize, geometry.resize))
                image.load()
                image = to_mode(image, geometry.mode)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise BadImage(f"cannot read: {exc.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError) as exc:
        # What Pillow's decoders raise on damaged data: "image file is truncated", "broken data stream", ...
        raise BadImage(f"cannot decode: {_one_line(exc)}") from None
    decoded = time.perf_counter()
    w, h = decoded_size = image.size
    side = min(w, h) * geometry.size / geometry.resize
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    image = image.resize((geometry.size, geometry.size), Image.BILINEAR, box=box)
    histogram = np.asarray(image.histogram(), dtype=np.int64).reshape(CHANNELS[geometry.mode], 256)
    array = np.asarray(image, dtype=np.uint8)
    pixels = np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    finished = time.perf_counter()
    return Decoded(pixels, zlib.crc32(pixels), histogram, source_mode, decoded_size, decoded - started,
                   finished - decoded)


def to_mode(image, mode: str):
    """`image` in `mode` (RGB or L), flattening transparency onto ALPHA_BACKGROUND.

    Pillow's own convert("RGB") drops alpha and shows whatever colour the
    transparent pixels happen to hold (often black, sometimes noise), so an
    image with transparency is composited onto white first. Integer
    grayscale (16-bit PNG and TIFF: modes I;16 and I) keeps the high byte of
    each 16-bit value, which is what Pillow itself does with 16-bit RGB PNGs;
    float (F) is clipped to 0..255; CMYK, YCbCr, LAB, HSV and 1-bit use
    Pillow's conversions (no ICC colour management).
    """
    from PIL import Image

    if image.mode.startswith("I"):
        high_byte = np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8)
        image = Image.fromarray(high_byte, "L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode in ("P", "L", "RGB")
                                                           and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == mode else image.convert(mode)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def decoder_versions() -> dict[str, str]:
    """The library versions that decide the decoded bytes; ranks and resumed shards must agree on them."""
    import PIL
    from PIL import features

    versions = {"Pillow": PIL.__version__}
    for name in ("libjpeg_turbo", "zlib", "libtiff", "webp"):
        try:
            versions[name] = str(features.version(name))
        except (ValueError, KeyError):
            versions[name] = "absent"
    return versions


# -- many files, in order ---------------------------------------------------------------------

def decode_or_reason(path, geometry: Geometry) -> Decoded | str:
    """`decode(path)`, or the one-line reason it is unusable."""
    try:
        return decode(path, geometry)
    except BadImage as exc:
        return str(exc)


def _decode_files(paths: Sequence[str], geometry: Geometry) -> list:
    return [decode_or_reason(path, geometry) for path in paths]


class DecodePool:
    """Decode files in the order given, here (workers ≤ 1) or in `workers` processes.

    Processes, not threads: Pillow releases the GIL in its decoders but the
    per-image Python around them does not scale in threads. They are
    spawned, not forked, because forking a process that has initialised MPI
    is unsafe with several MPI libraries. At most `2 × workers` chunks are in
    flight, so memory stays bounded whatever the number of files.
    """

    def __init__(self, workers: int = 1, chunk: int = 16):
        self.workers, self.chunk = int(workers), int(chunk)
        self._pool = None
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, paths: Sequence[str], geometry: Geometry):
        """Yield `decode_or_reason(path)` for each path, in order."""
        if self._pool is None:
            for path in paths:
                yield decode_or_reason(path, geometry)
            return
        from collections import deque

        pending = deque()
        for start in range(0, len(paths), self.chunk):
            pending.append(self._pool.submit(_decode_files, paths[start:start + self.chunk], geometry))
            if len(pending) >= 2 * self.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
