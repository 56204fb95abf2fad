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
