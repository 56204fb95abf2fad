"""Inverted dropout (Srivastava et al. 2014): scale kept units by 1/(1-p) in training, identity in eval."""
from __future__ import annotations

import numpy as np

from hpcdl.backend import array_module
from hpcdl.layers.base import Module


class Dropout(Module):
    """Drops each unit with probability p, using its own generator seeded with `seed`.

    The mask is drawn with NumPy on the host and copied to the input's
    device, so a CPU and a GPU run with the same seed drop the same units.
    Give each rank a different seed (e.g. seed + rank) unless identical masks
    across ranks are wanted.
    """

    def __init__(self, p: float, seed: int = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.reseed(seed)
        self._mask = None

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        xp = array_module(x)
        keep = self.rng.random(x.shape) >= self.p
        mask = xp.asarray(keep.astype(x.dtype) * (1.0 / (1.0 - self.p)))
        self._mask = mask
        return x * mask

    def backward(self, dy):
        mask, self._mask = self._mask, None
        return dy if mask is None else dy * mask

    def __repr__(self):
        return f"Dropout(p={self.p})"
