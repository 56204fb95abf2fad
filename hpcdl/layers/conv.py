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
"""
from __future__ import annotations

from hpcdl.arena import Initializer, Param
from hpcdl.backend import array_module
from hpcdl.layers.base import Module, he_normal, zeros
from hpcdl.layers.linear import BIAS_FLAGS
from hpcdl.layers.windows import WindowPlan, col2im, im2col


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

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.has_bias})")
