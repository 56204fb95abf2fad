"""Batch normalisation (optionally synchronised across ranks) and layer normalisation."""
from __future__ import annotations

from typing import Callable

import numpy as np

from hpcdl.arena import Param
from hpcdl.backend import array_module
from hpcdl.layers.base import Module, ones, zeros

NORM_FLAGS = ("norm", "no_decay", "no_adapt")


class BatchNorm(Module):
    """Batch normalisation over N (2-D input) or N, H, W (4-D NCHW input), Ioffe & Szegedy 2015.

    Training uses batch statistics and updates the running estimates with
    `momentum` (PyTorch convention, unbiased variance); eval uses the
    running estimates.

    Synchronised mode (`sync=True` and an `allreduce` attached, see
    `hpcdl.layers.attach_sync_batchnorm`) normalises with statistics of the
    global batch: forward reduces [sum x, count] and then sum (x - mean)^2
    (two passes, so it agrees with one process holding the whole batch to
    rounding), backward reduces [sum dy, sum dy * xhat]. `allreduce(buf)`
    sums a 1-D float64 array in place across ranks; it receives an array of
    the input's array module. gamma and beta receive only this rank's share
    of their gradient, like every other parameter: the trainer's gradient
    allreduce adds the shares up.
    """

    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5, sync: bool = False,
                 zero_init: bool = False):
        self.num_features = int(num_features)
        self.momentum, self.eps, self.sync = float(momentum), float(eps), bool(sync)
        # zero_init: start the affine scale at 0, so a residual branch ending
        # here starts as the identity (Goyal et al. 2017).
        self.gamma = Param((num_features,), zeros if zero_init else ones, flags=NORM_FLAGS)
        self.beta = Param((num_features,), zeros, flags=NORM_FLAGS)
        self.running_mean = np.zeros(num_features, dtype=np.float32)
        self.running_var = np.ones(num_features, dtype=np.float32)
        self.allreduce: Callable | None = None
        self._cache = None

    @property
    def synchronized(self) -> bool:
        return self.sync and self.allreduce is not None

    def _layout(self, x):
        if x.ndim == 2:
            axes, shape = (0,), (1, self.num_features)
        elif x.ndim == 4:
            axes, shape = (0, 2, 3), (1, self.num_features, 1, 1)
        else:
            raise ValueError(f"BatchNorm takes (N, C) or (N, C, H, W) input, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm expects {self.num_features} channels, got input of shape {x.shape}")
        return axes, shape

    def _match_buffers(self, xp, dtype):
        """Keep running statistics on the input's device, in float64 only when the input is float64."""
        want = np.float64 if dtype == np.float64 else np.float32
        for name in self.buffer_names:
            buf = getattr(self, name)
            if array_module(buf) is not xp or buf.dtype != want:
                setattr(self, name, xp.asarray(buf, dtype=want))

    def _batch_stats(self, x, axes, shape, xp):
        """Mean, centred input, variance (biased) and sample count, global when synchronised."""
        if not self.synchronized:
            count = x.size // self.num_features
            mean = x.mean(axis=axes)
            centred = x - mean.reshape(shape)
            var = (centred * centred).mean(axis=axes)
            return mean, centred, var, count
        buf = xp.zeros(self.num_features + 1, dtype=np.float64)
        buf[:-1] = x.sum(axis=axes, dtype=np.float64)
        buf[-1] = x.size // self.num_features
        self.allreduce(buf)
        count = int(round(float(buf[-1])))
        mean = (buf[:-1] / count).astype(x.dtype)
        centred = x - mean.reshape(shape)
        sq = (centred * centred).sum(axis=axes, dtype=np.float64)
        self.allreduce(sq)
        return mean, centred, (sq / count).astype(x.dtype), count

    def forward(self, x):
        xp = array_module(x)
        axes, shape = self._layout(x)
        self._match_buffers(xp, x.dtype)
        if not self.training:
            scale = self.gamma.data / xp.sqrt(self.running_var.astype(x.dtype) + self.eps)
            shift = self.beta.data - self.running_mean.astype(x.dtype) * scale
            return x * scale.reshape(shape) + shift.reshape(shape)

        mean, centred, var, count = self._batch_stats(x, axes, shape, xp)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = centred
        xhat *= inv_std.reshape(shape)          # reuse the centred buffer
        y = xhat * self.gamma.data.reshape(shape)
        y += self.beta.data.reshape(shape)

        m = self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean *= 1.0 - m
        self.running_mean += m * mean.astype(self.running_mean.dtype)
        self.running_var *= 1.0 - m
        self.running_var += m * unbiased.astype(self.running_var.dtype)
        self._cache = (xhat, inv_std, count, axes, shape)
        return y

    def backward(self, dy):
        xp = array_module(dy)
        xhat, inv_std, count, axes, shape = self._cache
        self._cache = None
        sum_dy = dy.sum(axis=axes)
        sum_dy_xhat = (dy * xhat).sum(axis=axes)
        self.gamma.grad += sum_dy_xhat
        self.beta.grad += sum_dy
        if self.synchronized:
            buf = xp.concatenate([sum_dy, sum_dy_xhat]).astype(np.float64)
            self.allreduce(buf)
            sum_dy = buf[:self.num_features].astype(dy.dtype)
            sum_dy_xhat = buf[self.num_features:].astype(dy.dtype)
        # dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the (global) batch
        dx = xhat * (-sum_dy_xhat / count).reshape(shape)
        dx += dy
        dx -= (sum_dy / count).reshape(shape)
        dx *= (self.gamma.data * inv_std).reshape(shape)
        return dx

    def __repr__(self):
        return f"BatchNorm({self.num_features}, momentum={self.momentum}, eps={self.eps}, sync={self.sync})"


class LayerNorm(Module):
    """Normalise over the last axis, then scale and shift (Ba, Kiros & Hinton 2016)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.dim, self.eps = int(dim), float(eps)
        self.gamma = Param((dim,), ones, flags=NORM_FLAGS)
        self.beta = Param((dim,), zeros, flags=NORM_FLAGS)
        self._cache = None

    def forward(self, x):
        xp = array_module(x)
        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(axis=-1, keepdims=True)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = centred
        xhat *= inv_std
        y = xhat * self.gamma.data
        y += self.beta.data
        self._cache = (xhat, inv_std) if self.training else None
        return y

    def backward(self, dy):
        xhat, inv_std = self._cache
        self._cache = None
        lead = tuple(range(dy.ndim - 1))
        self.gamma.grad += (dy * xhat).sum(axis=lead)
        self.beta.grad += dy.sum(axis=lead)
        g = dy * self.gamma.data
        dx = g - g.mean(axis=-1, keepdims=True)
        dx -= xhat * (g * xhat).mean(axis=-1, keepdims=True)
        dx *= inv_std
        return dx

    def __repr__(self):
        return f"LayerNorm({self.dim}, eps={self.eps})"
