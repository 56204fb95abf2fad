"""Layers that only rearrange data: Flatten and ImageToTokens."""
from __future__ import annotations

import numpy as np

from hpcdl.layers import memory
from hpcdl.layers.base import Module


class Flatten(Module):
    """(N, ...) -> (N, prod(...)).

    `channel_major=True`: 4-D NumPy input is (C, N, H, W), the exit of the
    channel-major trunk; the output is the (N, C*H*W) of the NCHW input all
    the same, so the Linear layer after it sees PyTorch's feature order.
    """

    def __init__(self):
        self._shape = None
        self.channel_major = False
        self._cm = False

    def forward(self, x):
        self._shape = x.shape
        self._cm = self.channel_major and isinstance(x, np.ndarray) and x.ndim == 4
        if self._cm:
            return x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        if dy is None:  # the layer after us skipped its input gradient
            return None
        if self._cm:
            c, n, h, w = self._shape
            dx = memory.pool.take(self._shape, dy.dtype)
            dx[...] = dy.reshape(n, c, h, w).transpose(1, 0, 2, 3)
            return dx
        return dy.reshape(self._shape)


class ImageToTokens(Module):
    """(N, C, H, W) -> (N, T, F) token sequence for a transformer.

    `patch=None`: one token per pixel row (T = H, F = C*W).
    `patch=p`: non-overlapping p x p patches in row-major order, as in ViT
    (Dosovitskiy et al. 2020): T = (H/p)*(W/p), F = C*p*p.
    """

    def __init__(self, patch: int | None = None):
        self.patch = int(patch) if patch else None
        self._shape = None

    def forward(self, x):
        n, c, h, w = x.shape
        self._shape = x.shape
        if self.patch is None:
            return x.transpose(0, 2, 1, 3).reshape(n, h, c * w)
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"ImageToTokens: patch {p} does not divide image size {h}x{w}")
        grid = x.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        return grid.reshape(n, (h // p) * (w // p), c * p * p)

    def backward(self, dy):
        if dy is None:  # the layer after us skipped its input gradient
            return None
        n, c, h, w = self._shape
        if self.patch is None:
            return dy.reshape(n, h, c, w).transpose(0, 2, 1, 3)
        p = self.patch
        grid = dy.reshape(n, h // p, w // p, c, p, p).transpose(0, 3, 1, 4, 2, 5)
        return grid.reshape(n, c, h, w)

    def __repr__(self):
        return f"ImageToTokens(patch={self.patch})"
