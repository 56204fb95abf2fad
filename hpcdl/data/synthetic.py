"""Deterministic, learnable synthetic images for tests and benchmarks.

Each class gets a blocky prototype (a coarse random grid scaled up, so a
small crop or a flip does not erase it); every image is its class prototype
plus uniform noise. A linear model separates the classes, a CNN more easily,
and the same seed gives the same bytes on every rank and every machine.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Prototype values stay in [0, 192) and noise in [0, 64): the sum fits uint8 without clipping.
_PROTOTYPE_RANGE = 192
_NOISE_RANGE = 64
_GRID = 7


def make_synthetic_split(count: int, shape: Sequence[int], num_classes: int, seed: int,
                         split_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [count, C, H, W], labels int64) for one split; split_index keeps splits independent."""
    c, h, w = (int(d) for d in shape)
    prototypes = _prototypes(c, h, w, num_classes, seed)
    rng = np.random.default_rng((seed, 1 + split_index))
    labels = rng.permutation(np.arange(count, dtype=np.int64) % num_classes)
    images = rng.integers(0, _NOISE_RANGE, size=(count, c, h, w), dtype=np.uint8)
    images += prototypes[labels]
    return images, labels


def _prototypes(c: int, h: int, w: int, num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng((seed, 0))
    gh, gw = min(_GRID, h), min(_GRID, w)
    coarse = rng.integers(0, _PROTOTYPE_RANGE, size=(num_classes, c, gh, gw), dtype=np.uint8)
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    return coarse[:, :, rows[:, None], cols[None, :]]


# ImageNet-like sizes (ILSVRC-2012 images are mostly 500 px on the long side, 3:4 to 4:3).
_JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 500), (333, 500), (500, 500))


def write_jpeg_tree(root, count: int, num_classes: int = 10, seed: int = 0, quality: int = 90,
                    sizes=_JPEG_SIZES) -> list:
    """`count` JPEG files in ROOT/<class>/ (ImageNet's folder layout); returns their paths.

    Each image is a smooth colour field (bilinear upsampling of a coarse
    random grid, so it compresses like a photograph, not like noise) plus a
    little noise; at quality 90 a file is some 90 KB, near ImageNet's average of 110 KB.
    Deterministic in (seed, index).
    """
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    paths = []
    for i in range(count):
        rng = np.random.default_rng((seed, i))
        width, height = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (rng.integers(4, 12), rng.integers(4, 12), 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
        folder = root / f"class{i % num_classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:07d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def write_synthetic_hdf5(path, train_count: int, test_count: int, shape: Sequence[int] = (3, 256, 256),
                         num_classes: int = 10, seed: int = 0, short_side: int = 0, block: int = 512) -> None:
    """An hpcdl HDF5 file of learnable synthetic images, written block by block (any size, little memory).

    For scale tests (a file larger than RAM): each block is the class
    prototypes plus a noise block drawn once and rotated per block, so
    writing costs about a copy of the bytes, not a random draw of each.
    """
    from hpcdl.data.hdf5 import hdf5_writer

    c, h, w = (int(d) for d in shape)
    prototypes = _prototypes(c, h, w, num_classes, seed)
    rng = np.random.default_rng((seed, 2))
    noise = rng.integers(0, _NOISE_RANGE, size=(block, c, h, w), dtype=np.uint8)
    with hdf5_writer(path) as writer:
        for split, count in (("train", train_count), ("test", test_count)):
            writer.create_split(split, count, (c, h, w))
            for k, start in enumerate(range(0, count, block)):
                n = min(block, count - start)
                labels = rng.integers(0, num_classes, n).astype(np.int64)
                images = np.roll(noise, k, axis=0)[:n]
                images += prototypes[labels]
                writer.write(split, start, images, labels)
        writer.finish([f"class{i}" for i in range(num_classes)], short_side=short_side)
