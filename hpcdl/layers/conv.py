"""2-D convolution (groups=1, square kernels) as im2col + one GEMM per pass.

Shapes, with K = C*kh*kw and M = N*Ho*Wo:

    forward   Y (O, M)  = W (O, K) @ cols (K, M)         then (O, N, ...) -> NCHW
    weight    dW (O, K) = dY (O, M) @ cols^T (M, K)
    input     dcols     = W^T (K, O) @ dY (O, M)          then col2im

Each pass is a single large BLAS call rather than N per-sample products, so
it keeps BLAS efficient at small spatial sizes, never needs an (N, O, K)
temporary for the weight gradient, and lets a multi-threaded BLAS split one
big problem. The price is one transposing copy of the output in forward and
of dY in backward, both K times smaller than the column buffer.

The column buffer is kept between steps (training mode only): it is needed
by backward anyway, and reusing it avoids re-faulting tens of MB per layer
per step. Its padding entries are written once (zero) and never touched.

Channel-major path (`channel_major=True`, NumPy arrays; see
docs/layers-cpu.md). Input and output are (C, N, H, W), so the GEMM output
W (O, K) @ cols (K, N*Ho*Wo) is the output, with no transposing copy:

* 1x1 stride-1 convolutions are that one GEMM on the input itself, no
  im2col; strided 1x1 ones gather the strided pixels first;
* other kernels im2col (a parallel Numba kernel) into one workspace shared
  by all convolutions (hpcdl/layers/memory.py). Backward builds the columns
  again instead of keeping them: a k*k-fold copy of every input alive from
  forward to backward is what made the per-layer buffers cost gigabytes;
* `takes_nchw=True` (a network's first convolution) reads NCHW input
  through a transposed view and returns an NCHW input gradient;
* `relu=True` applies the following ReLU in the bias pass after the GEMM
  (that ReLU module then passes through), and masks dy in backward.

On CuPy arrays the NCHW path above runs regardless.
"""
from __future__ import annotations

import numpy as np

from hpcdl.arena import Initializer, Param
from hpcdl.backend import array_module
from hpcdl.layers import memory
from hpcdl.layers.base import Module, he_normal, zeros
from hpcdl.layers.linear import BIAS_FLAGS
from hpcdl.layers.windows import WindowPlan, col2im, im2col, output_size
from kernels import layers_cpu


class Conv2d(Module):
    """NCHW convolution; `weight` is (out, in, k, k) as in PyTorch.

    `input_grad=False` skips dL/dx (backward returns None): set it on a
    network's first layer, whose input gradient nobody uses.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, weight_init: Initializer | None = None, bias_init: Initializer = zeros,
                 input_grad: bool = True):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel, self.stride, self.padding = int(kernel), int(stride), int(padding)
        fan_in = self.in_channels * self.kernel ** 2
        self.weight = Param((out_channels, in_channels, kernel, kernel), weight_init or he_normal(fan_in))
        if bias:
            self.bias = Param((out_channels,), bias_init, flags=BIAS_FLAGS)
        self.has_bias = bias
        self.input_grad = input_grad
        self._plans: dict = {}
        self._cols = None          # reusable column buffer, valid for `_cols_key`
        self._cols_key = None
        self._cache = None         # (input shape, plan, cols) for backward
        self.channel_major = False
        self.takes_nchw = False
        self.relu = False
        self._out = None

    def _plan(self, height: int, width: int) -> WindowPlan:
        plan = self._plans.get((height, width))
        if plan is None:
            plan = WindowPlan.build(height, width, self.kernel, self.stride, self.padding)
            self._plans[(height, width)] = plan
        return plan

    def _column_buffer(self, xp, x, plan):
        n, c = x.shape[:2]
        shape = (c, self.kernel, self.kernel, n, plan.out_h, plan.out_w)
        if not self.training:
            return xp.zeros(shape, dtype=x.dtype)
        key = (xp.__name__, x.shape, x.dtype)
        if self._cols_key != key:
            self._cols = None  # release the old buffer before allocating its replacement
            self._cols = xp.zeros(shape, dtype=x.dtype)
            self._cols_key = key
        return self._cols

    def forward(self, x):
        if self.channel_major and isinstance(x, np.ndarray):
            return self._forward_cm(x)
        xp = array_module(x)
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got input of shape {x.shape}")
        plan = self._plan(h, w)
        cols = self._column_buffer(xp, x, plan)
        im2col(x, cols, plan)
        cols2 = cols.reshape(-1, n * plan.out_h * plan.out_w)
        y = self.weight.data.reshape(self.out_channels, -1) @ cols2
        if self.has_bias:
            y += self.bias.data[:, None]
        out = xp.ascontiguousarray(y.reshape(self.out_channels, n, plan.out_h, plan.out_w).transpose(1, 0, 2, 3))
        self._cache = (x.shape, plan, cols2) if self.training else None
        return out

    def backward(self, dy):
        if self.channel_major and isinstance(dy, np.ndarray):
            return self._backward_cm(dy)
        xp = array_module(dy)
        x_shape, plan, cols2 = self._cache
        self._cache = None
        dy_t = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(self.out_channels, -1)
        if self.has_bias:
            self.bias.grad += dy_t.sum(axis=1)
        w2 = self.weight.data.reshape(self.out_channels, -1)
        self.weight.grad += (dy_t @ cols2.T).reshape(self.weight.shape)
        if not self.input_grad:
            return None
        dcols = (w2.T @ dy_t).reshape(x_shape[1], self.kernel, self.kernel, x_shape[0], plan.out_h, plan.out_w)
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        col2im(dcols, dx, plan)
        return dx

    # -- channel-major path ---------------------------------------------------------------------

    def _columns(self, xv, out_h: int, out_w: int):
        """The (K, N*Ho*Wo) GEMM operand for input xv (C, N, H, W): xv itself, or built in the workspace."""
        c, n = xv.shape[:2]
        k, s, p = self.kernel, self.stride, self.padding
        m = n * out_h * out_w
        if k == 1 and p == 0:
            if s == 1 and xv.flags.c_contiguous:
                return xv.reshape(c, m)
            sub = memory.workspace(c * m, xv.dtype).reshape(c, n, out_h, out_w)
            layers_cpu.subsample(xv, sub, s)
            return sub.reshape(c, m)
        cols = memory.workspace(c * k * k * m, xv.dtype).reshape(c, k, k, n, out_h, out_w)
        layers_cpu.im2col(xv, cols, k, s, p)
        return cols.reshape(c * k * k, m)

    def _forward_cm(self, x):
        xv = x.transpose(1, 0, 2, 3) if self.takes_nchw else x
        c, n, h, w = xv.shape
        if c != self.in_channels:
            layout = "NCHW" if self.takes_nchw else "channel-major CNHW"
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {layout} input of shape {x.shape}")
        out_h = output_size(h, self.kernel, self.stride, self.padding)
        out_w = output_size(w, self.kernel, self.stride, self.padding)
        shape = (self.out_channels, n, out_h, out_w)
        y = memory.layer_buffer(self, "_out", shape, x.dtype) if self.training else np.empty(shape, x.dtype)
        y2 = y.reshape(self.out_channels, -1)
        np.matmul(self.weight.data.reshape(self.out_channels, -1), self._columns(xv, out_h, out_w), out=y2)
        if self.has_bias or self.relu:
            layers_cpu.bias_relu(y2, self.bias.data if self.has_bias else None, self.relu)
        self._cache = (xv, y2, (h, w, out_h, out_w)) if self.training else None
        return y

    def _backward_cm(self, dy):
        xv, y2, (h, w, out_h, out_w) = self._cache
        self._cache = None
        c, n = xv.shape[:2]
        o, k, s, p = self.out_channels, self.kernel, self.stride, self.padding
        dy2 = dy.reshape(o, -1)
        masked = None
        if self.relu:
            masked = memory.pool.take(dy2.shape, dy.dtype)
            sums = np.empty(o) if self.has_bias else None
            layers_cpu.relu_mask(dy2, y2, masked, sums)
            dy2 = masked
        elif self.has_bias:
            sums = np.empty(o)
            layers_cpu.row_sums(dy2, sums)
        if self.has_bias:
            self.bias.grad += sums.astype(dy.dtype)
        w2 = self.weight.data.reshape(o, -1)
        dw = memory.pool.take(w2.shape, dy.dtype)
        np.matmul(dy2, self._columns(xv, out_h, out_w).T, out=dw)
        self.weight.grad += dw.reshape(self.weight.shape)
        memory.pool.give(dw)
        if not self.input_grad:
            memory.pool.give(masked)
            return None
        dx = memory.pool.take((c, n, h, w), dy.dtype)
        m = n * out_h * out_w
        if k == 1 and p == 0 and s == 1:
            np.matmul(w2.T, dy2, out=dx.reshape(c, m))
        elif k == 1 and p == 0:
            dsub = memory.workspace(c * m, dy.dtype)
            np.matmul(w2.T, dy2, out=dsub.reshape(c, m))
            layers_cpu.upsample(dsub.reshape(c, n, out_h, out_w), dx, s)
        else:
            dcols = memory.workspace(c * k * k * m, dy.dtype)
            np.matmul(w2.T, dy2, out=dcols.reshape(c * k * k, m))
            layers_cpu.col2im(dcols.reshape(c, k, k, n, out_h, out_w), dx, k, s, p)
        memory.pool.give(masked)
        if self.takes_nchw:
            nchw = np.ascontiguousarray(dx.transpose(1, 0, 2, 3))
            memory.pool.give(dx)
            return nchw
        return dx

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.has_bias})")
