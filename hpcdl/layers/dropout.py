"""Inverted dropout (Srivastava et al. 2014): scale kept units by 1/(1-p) in training, identity in eval.

Masks keyed by global sample position. A data-parallel step splits one
global batch over ranks and micro-steps; for a P-rank run to follow the
1-rank run, the unit dropped for a sample must depend only on *which sample
of the global batch* it is, not on the rank or micro-step that holds it. So
the trainer calls `key_dropout(model, seed, epoch, step, positions)` before
each micro-batch's forward, and every Dropout layer draws its mask from the
same counter-based SplitMix64 stream the augmentation uses
(`hpcdl.data.augment.random_bits`), at counters derived from
(position, unit): any rank computes any sample's mask directly.

One 64-bit word gives four 16-bit uniforms, so the generator runs once per
four units; the keep test `field >= round(p * 65536)` has a resolution of
1/65536 in p, far below anything training notices.

Used outside the trainer (no keys given), a layer numbers its own forward
calls and keys the mask by (call count, row): deterministic, but then the
rows of each call are the "positions".
"""
from __future__ import annotations

import numpy as np

from hpcdl.backend import array_module
from hpcdl.data.augment import random_bits
from hpcdl.layers.base import Module

# Stream tags of the augmentation transforms are small integers (1, 2); dropout
# layers take tags from this base on, one per layer seed, so no two streams meet.
_DROPOUT_STREAM = 0xD50F_0000
_FIELDS = 4  # 16-bit uniforms per 64-bit word


def _threshold(p: float) -> np.uint64:
    return np.uint64(int(round(p * 65536)))


def keep_mask(seed: int, stream: int, epoch: int, step: int, positions, units: int, p: float) -> np.ndarray:
    """bool [n, units]: which units each sample at `positions` keeps (vectorized)."""
    positions = np.asarray(positions, dtype=np.uint64).reshape(-1, 1)
    words = -(-units // _FIELDS)
    counters = positions * np.uint64(words) + np.arange(words, dtype=np.uint64)[None, :]
    bits = random_bits(seed, epoch, step, counters.reshape(-1), stream).reshape(len(positions), words)
    shifts = np.arange(_FIELDS, dtype=np.uint64) * np.uint64(16)
    fields = (bits[:, :, None] >> shifts[None, None, :]) & np.uint64(0xFFFF)
    return (fields.reshape(len(positions), words * _FIELDS)[:, :units] >= _threshold(p))


def keep_mask_reference(seed: int, stream: int, epoch: int, step: int, positions, units: int,
                        p: float) -> np.ndarray:
    """The per-sample, per-unit loop `keep_mask` must match exactly (the test oracle)."""
    words = -(-units // _FIELDS)
    out = np.zeros((len(positions), units), dtype=bool)
    for i, position in enumerate(positions):
        for u in range(units):
            word = random_bits(seed, epoch, step, [int(position) * words + u // _FIELDS], stream)[0]
            field = (int(word) >> (16 * (u % _FIELDS))) & 0xFFFF
            out[i, u] = field >= int(_threshold(p))
    return out


class Dropout(Module):
    """Drops each unit with probability p; the mask is a function of (seed, layer seed, epoch, step, position).

    The mask is drawn with NumPy on the host and copied to the input's
    device, so a CPU and a GPU run drop the same units. Layers with
    different `seed`s draw independent masks.
    """

    def __init__(self, p: float, seed: int = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"Dropout seed must be >= 0, got {seed}")
        self._keys = None
        self._calls = 0
        self._mask = None

    def set_keys(self, run_seed: int, epoch: int, step: int, positions) -> None:
        """Key the next forward's mask: row i of its input is sample `positions[i]` of the global batch."""
        self._keys = (int(run_seed), int(epoch), int(step), np.asarray(positions, dtype=np.int64))

    def forward(self, x):
        keys, self._keys = self._keys, None
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if keys is None:  # standalone use: each call is its own "step", rows are positions
            keys = (0, 0, self._calls, np.arange(x.shape[0]))
            self._calls += 1
        run_seed, epoch, step, positions = keys
        if len(positions) != x.shape[0]:
            raise ValueError(f"Dropout keyed for {len(positions)} samples got a batch of {x.shape[0]}")
        units = int(np.prod(x.shape[1:], dtype=np.int64))
        keep = keep_mask(run_seed, _DROPOUT_STREAM + self.seed, epoch, step, positions, units, self.p)
        xp = array_module(x)
        mask = xp.asarray(keep.reshape(x.shape).astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p)))
        self._mask = mask
        return x * mask

    def backward(self, dy):
        mask, self._mask = self._mask, None
        return dy if mask is None else dy * mask

    def __repr__(self):
        return f"Dropout(p={self.p})"


def key_dropout(model: Module, run_seed: int, epoch: int, step: int, positions) -> int:
    """Key every Dropout in `model` for the next forward; returns how many there are (0: nothing to do)."""
    layers = [m for m in model.modules() if isinstance(m, Dropout)]
    for layer in layers:
        layer.set_keys(run_seed, epoch, step, positions)
    return len(layers)
