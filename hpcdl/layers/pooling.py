"""Pooling: max and average over square windows, and global averages."""
from __future__ import annotations

import numpy as np

from hpcdl.backend import array_module
from hpcdl.layers import memory
from hpcdl.layers.base import Module
from hpcdl.layers.windows import WindowPlan, output_size
from hpcdl.kernels import layers_cpu


class MaxPool2d(Module):
    """Max over k x k windows of NCHW input; padding counts as -inf, as in PyTorch.

    Forward remembers which kernel offset won in each window (uint8); on
    ties the first offset in row-major order wins and alone gets the gradient.
    `channel_major=True`: NumPy input is (C, N, H, W) and a parallel Numba
    kernel does both passes, one (channel, image) plane per task.
    """

    def __init__(self, kernel: int, stride: int | None = None, padding: int = 0):
        self.kernel = int(kernel)
        self.stride = int(stride) if stride else self.kernel
        self.padding = int(padding)
        if 2 * self.padding > self.kernel:
            raise ValueError(f"MaxPool2d padding {padding} must be at most half the kernel {kernel}")
        self._cache = None
        self.channel_major = False
        self._out = self._winner = None

    def forward(self, x):
        if self.channel_major and isinstance(x, np.ndarray):
            return self._forward_cm(x)
        xp = array_module(x)
        n, c, h, w = x.shape
        plan = WindowPlan.build(h, w, self.kernel, self.stride, self.padding)
        y = xp.full((n, c, plan.out_h, plan.out_w), -xp.inf, dtype=x.dtype)
        winner = xp.zeros(y.shape, dtype=xp.uint8) if self.training else None
        # Plain ufuncs on strided views only: masked assignment (copyto with
        # where=, boolean indexing) is several times slower in NumPy.
        for index, (_, _, oh, ow, ih, iw) in enumerate(plan.offsets):
            window, best = x[:, :, ih, iw], y[:, :, oh, ow]
            if winner is not None:
                won = winner[:, :, oh, ow]
                # `index` exceeds every offset recorded so far, so max() overwrites exactly where better.
                xp.maximum(won, xp.greater(window, best) * xp.uint8(index), out=won)
            xp.maximum(best, window, out=best)
        self._cache = (x.shape, plan, winner) if self.training else None
        return y

    def _forward_cm(self, x):
        c, n, h, w = x.shape
        k, s, p = self.kernel, self.stride, self.padding
        shape = (c, n, output_size(h, k, s, p), output_size(w, k, s, p))
        if self.training:
            y = memory.layer_buffer(self, "_out", shape, x.dtype)
            winner = memory.layer_buffer(self, "_winner", shape, np.uint8)
        else:
            y, winner = np.empty(shape, x.dtype), None
        layers_cpu.maxpool(x, y, winner, k, s, p)
        self._cache = ("cm", x.shape, winner) if self.training else None
        return y

    def backward(self, dy):
        if isinstance(self._cache[0], str):
            _, x_shape, winner = self._cache
            self._cache = None
            dx = memory.pool.take(x_shape, dy.dtype)
            layers_cpu.maxpool_backward(dy, winner, dx, self.kernel, self.stride, self.padding)
            return dx
        xp = array_module(dy)
        x_shape, plan, winner = self._cache
        self._cache = None
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        disjoint = self.stride >= self.kernel
        for index, (_, _, oh, ow, ih, iw) in enumerate(plan.offsets):
            won = winner[:, :, oh, ow] == index
            if disjoint:  # each input pixel lies in at most one window: write, no read-modify-write
                xp.multiply(dy[:, :, oh, ow], won, out=dx[:, :, ih, iw])
            else:
                dx[:, :, ih, iw] += dy[:, :, oh, ow] * won
        return dx

    def __repr__(self):
        return f"MaxPool2d(kernel={self.kernel}, stride={self.stride}, padding={self.padding})"


class AvgPool2d(Module):
    """Mean over k x k windows of NCHW input (no padding)."""

    def __init__(self, kernel: int, stride: int | None = None):
        self.kernel = int(kernel)
        self.stride = int(stride) if stride else self.kernel
        self._cache = None

    def forward(self, x):
        xp = array_module(x)
        n, c, h, w = x.shape
        plan = WindowPlan.build(h, w, self.kernel, self.stride, 0)
        y = xp.zeros((n, c, plan.out_h, plan.out_w), dtype=x.dtype)
        for _, _, oh, ow, ih, iw in plan.offsets:
            y[:, :, oh, ow] += x[:, :, ih, iw]
        y *= 1.0 / self.kernel ** 2
        self._cache = (x.shape, plan) if self.training else None
        return y

    def backward(self, dy):
        xp = array_module(dy)
        x_shape, plan = self._cache
        self._cache = None
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        share = dy * (1.0 / self.kernel ** 2)
        for _, _, oh, ow, ih, iw in plan.offsets:
            dx[:, :, ih, iw] += share[:, :, oh, ow]
        return dx

    def __repr__(self):
        return f"AvgPool2d(kernel={self.kernel}, stride={self.stride})"


class GlobalAvgPool(Module):
    """(N, C, H, W) -> (N, C): mean over all spatial positions.

    `channel_major=True`: NumPy input is (C, N, H, W), the exit of the
    channel-major trunk; the output is (N, C) all the same.
    """

    def __init__(self):
        self._shape = None
        self.channel_major = False
        self._cm = False

    def forward(self, x):
        self._shape = x.shape
        self._cm = self.channel_major and isinstance(x, np.ndarray)
        if self._cm:
            c, n = x.shape[:2]
            return np.ascontiguousarray(x.reshape(c, n, -1).mean(axis=2).T)
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        if self._cm:
            c, n, h, w = self._shape
            dx = memory.pool.take(self._shape, dy.dtype)
            dx.reshape(c, n, h * w)[...] = (dy.T * (1.0 / (h * w)))[:, :, None]
            return dx
        xp = array_module(dy)
        n, c, h, w = self._shape
        dx = xp.empty(self._shape, dtype=dy.dtype)
        dx[...] = (dy * (1.0 / (h * w)))[:, :, None, None]
        return dx


class TokenMeanPool(Module):
    """(N, T, D) -> (N, D): mean over the token axis."""

    def __init__(self):
        self._shape = None

    def forward(self, x):
        self._shape = x.shape
        return x.mean(axis=1)

    def backward(self, dy):
        xp = array_module(dy)
        dx = xp.empty(self._shape, dtype=dy.dtype)
        dx[...] = (dy * (1.0 / self._shape[1]))[:, None, :]
        return dx
