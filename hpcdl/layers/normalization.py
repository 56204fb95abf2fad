"""Batch normalisation (optionally synchronised across ranks) and layer normalisation."""
from __future__ import annotations

from typing import Callable

import numpy as np

from hpcdl.arena import Param
from hpcdl.backend import array_module
from hpcdl.layers import memory
from hpcdl.layers.base import Module, ones, zeros
from hpcdl.kernels import layers_cpu

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

    Channel-major (`channel_major=True`, 4-D NumPy input in (C, N, H, W)
    layout): statistics, normalisation and the gradient are parallel Numba
    kernels over each channel's contiguous N*H*W run (kernels/layers_cpu.py),
    two passes over memory forward and two backward. `relu=True` applies the
    following ReLU in the same pass (the ReLU module then passes through) and
    masks dy with it in backward. Synchronised layers take the same layout
    through the NumPy code below.
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
        self.channel_major = False
        self.relu = False
        self._out = None

    @property
    def synchronized(self) -> bool:
        return self.sync and self.allreduce is not None

    def _channel_major_input(self, x) -> bool:
        return self.channel_major and x.ndim == 4 and isinstance(x, np.ndarray)

    def _layout(self, x):
        if self._channel_major_input(x):
            axes, shape, channels = (1, 2, 3), (self.num_features, 1, 1, 1), x.shape[0]
        elif x.ndim == 2:
            axes, shape, channels = (0,), (1, self.num_features), x.shape[1]
        elif x.ndim == 4:
            axes, shape, channels = (0, 2, 3), (1, self.num_features, 1, 1), x.shape[1]
        else:
            raise ValueError(f"BatchNorm takes (N, C) or (N, C, H, W) input, got shape {x.shape}")
        if channels != self.num_features:
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

    def _fused_relu(self, x) -> bool:
        return self.relu and self._channel_major_input(x)

    def forward(self, x):
        xp = array_module(x)
        axes, shape = self._layout(x)
        self._match_buffers(xp, x.dtype)
        cm = self._channel_major_input(x)
        if not self.training:
            scale = self.gamma.data / xp.sqrt(self.running_var.astype(x.dtype) + self.eps)
            shift = self.beta.data - self.running_mean.astype(x.dtype) * scale
            if cm:
                y = np.empty_like(x)
                layers_cpu.scale_shift(x.reshape(x.shape[0], -1), scale.astype(x.dtype), shift.astype(x.dtype),
                                       y.reshape(x.shape[0], -1), self.relu)
                return y
            return x * scale.reshape(shape) + shift.reshape(shape)
        if cm and not self.synchronized:
            return self._forward_cm(x)

        mean, centred, var, count = self._batch_stats(x, axes, shape, xp)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = centred
        xhat *= inv_std.reshape(shape)          # reuse the centred buffer
        y = xhat * self.gamma.data.reshape(shape)
        y += self.beta.data.reshape(shape)
        if self._fused_relu(x):
            xp.maximum(y, 0, out=y)
        self._update_running(mean, var, count)
        self._cache = (xhat, inv_std, count, axes, shape, y if self._fused_relu(x) else None)
        return y

    def _update_running(self, mean, var, count):
        m = self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean *= 1.0 - m
        self.running_mean += m * mean.astype(self.running_mean.dtype)
        self.running_var *= 1.0 - m
        self.running_var += m * unbiased.astype(self.running_var.dtype)

    def _forward_cm(self, x):
        channels = x.shape[0]
        x2 = x.reshape(channels, -1)
        count = x2.shape[1]
        mean, var = np.empty(channels), np.empty(channels)
        layers_cpu.bn_stats(x2, mean, var)
        inv_std = 1.0 / np.sqrt(var + self.eps)
        gamma = self.gamma.data.astype(np.float64)
        scale = gamma * inv_std
        shift = self.beta.data - mean * scale
        y = memory.layer_buffer(self, "_out", x.shape, x.dtype)
        y2 = y.reshape(channels, -1)
        layers_cpu.scale_shift(x2, scale.astype(x.dtype), shift.astype(x.dtype), y2, self.relu)
        self._update_running(mean, var, count)
        self._cache = ("cm", x2, y2, mean, inv_std)
        return y

    def _backward_cm(self, dy):
        _, x2, y2, mean, inv_std = self._cache
        self._cache = None
        channels, count = x2.shape
        dy2 = dy.reshape(channels, -1)
        sum_g, sum_gxc = np.empty(channels), np.empty(channels)
        layers_cpu.bn_backward_sums(dy2, x2, y2, mean, self.relu, sum_g, sum_gxc)
        sum_g_xhat = sum_gxc * inv_std
        self.gamma.grad += sum_g_xhat.astype(dy.dtype)
        self.beta.grad += sum_g.astype(dy.dtype)
        # dx = a*g + b*(x - mean) + c: gamma*inv_std*(g - sum_g/count - xhat*sum_g_xhat/count)
        a = self.gamma.data.astype(np.float64) * inv_std
        b = -a * inv_std * sum_g_xhat / count
        c = -a * sum_g / count
        dx = memory.pool.take(dy.shape, dy.dtype)
        t = dy.dtype
        layers_cpu.bn_backward_dx(dy2, x2, y2, self.relu, mean.astype(t), a.astype(t), b.astype(t), c.astype(t),
                                  dx.reshape(channels, -1))
        return dx

    def backward(self, dy):
        if self._cache is not None and isinstance(self._cache[0], str):
            return self._backward_cm(dy)
        xp = array_module(dy)
        xhat, inv_std, count, axes, shape, relu_out = self._cache
        self._cache = None
        if relu_out is not None:
            dy = dy * (relu_out > 0)
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
