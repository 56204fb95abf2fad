"""LeCun's IDX format (MNIST, Fashion-MNIST), plain or gzip-compressed.

Layout, all big-endian: two zero bytes, a dtype code, the number of
dimensions, one uint32 per dimension, then the row-major payload
(Y. LeCun, C. Cortes, C. Burges, "The MNIST database", file format section).
The reader checks every part of that and says what is wrong in one line,
because a half-downloaded file is the most common data bug there is.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from hpcdl.atomic import atomic_output
from hpcdl.errors import DataError

# IDX dtype code -> big-endian NumPy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(d.kind, d.itemsize): code for code, d in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _raw_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            # gzip reports a bad CRC or length as BadGzipFile (an OSError), a cut stream as EOFError
            raise DataError(f"{path}: corrupt gzip stream: {exc}") from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: not a gzip file (magic bytes {data[:2].hex() or 'missing'})")
    return data


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (gzip detected by its magic bytes), native byte order."""
    path = Path(path)
    data = _raw_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00":
        raise DataError(f"{path}: bad magic {data[:4].hex()}: an IDX file starts with 0000, dtype code, ndim")
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}; known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header says 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated: header needs {header_len} bytes for {ndim} dimensions, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "trailing garbage"
        product = "×".join(str(d) for d in dims) + (f" × {dtype.itemsize}" if dtype.itemsize > 1 else "")
        size = f"{product} = {expected}" if product != str(expected) else str(expected)
        raise DataError(f"{path}: {what}: header says {size} payload bytes, file has {payload}")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return array.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array) -> None:
    """Store `array` as IDX (gzip-compressed when `path` ends in .gz), atomically."""
    path = Path(path)
    array = np.asarray(array)
    code = _CODE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX cannot store dtype {array.dtype} with {array.ndim} dimensions")
    header = b"\x00\x00" + bytes((code, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    with atomic_output(path) as tmp:
        if path.suffix == ".gz":
            # mtime=0 keeps the bytes reproducible (same array, same file, same checksum)
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                gz.write(body)
        else:
            tmp.write_bytes(body)


# -- the four-file MNIST layout -------------------------------------------------------

# role -> file stem; each file may be stored raw or as <stem>.gz
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_files(directory) -> tuple[dict[str, Path], list[str]]:
    """({role: existing path}, [stems not found]) for the four MNIST-layout files in `directory`.

    The uncompressed file wins when both forms are present: it is the faster read.
    """
    directory = Path(directory)
    found, missing = {}, []
    for role, stem in IDX_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(stem)
    return found, missing


def read_idx_dir(directory) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """The four MNIST-layout arrays of `directory` (images N×H×W, labels N) and the files they came from.

    Checks what the IDX headers alone cannot: every file present, images
    three-dimensional, labels one-dimensional, one label per image.
    """
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
    return arrays, found
