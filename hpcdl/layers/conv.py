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
  by all convolutions (hpcdl/layers/memory.py), a few images at a time so
  the GEMM finds the columns in cache. Backward builds the columns again
  instead of keeping them: a k*k-fold copy of every input alive from
  forward to backward is what made per-layer buffers cost gigabytes;
* stride-1 3x3 convolutions with enough input channels use Winograd
  F(2x2, 3x3) instead (Lavin & Gray 2016; kernels/layers_cpu.py): 16
  GEMMs over transformed tiles, U (16, O, C) from the weights kept from
  forward to backward, the transformed input V built again in backward;
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
from hpcdl.kernels import layers_cpu

# im2col chunk size per thread for the channel-major path: measured on a
# 2 MB-L2 Xeon, 4-8 MB chunks beat one full-batch column matrix by 10-20% per
# convolution on one thread (the GEMM reads columns im2col has just written,
# still in cache).
CHUNK_BYTES = 8 << 20

# Winograd F(2x2, 3x3) for stride-1 3x3 convolutions on the channel-major
# path (kernels/layers_cpu.py): 16*C*O multiply-adds per 2x2 output tile
# where im2col does 36*C*O, and transforms that move 4x the input instead of
# the 9x im2col columns. Measured per layer (forward + backward, one thread,
# batch 128 at 28 to 4 pixels) it took 0.6-0.85x the time of im2col at 64 to
# 512 channels. Below MIN_CHANNELS im2col stays: at 1 or 3 channels (a
# stem) the GEMMs' inner dimension is too short for BLAS, and at 32
# (fmnist_cnn's second convolution, 1.1x faster by Winograd) its float32
# rounding moved 1-rank and 2-rank training apart by 4.9e-5 in 20 steps,
# beyond the 1e-5 that tests/test_train.py holds for the main job.
WINOGRAD_MIN_CHANNELS = 64
# chunk of the (16, C, tiles) transformed input: 4 MB measured best on one
# thread (3-8 MB within 3%, 10% ahead of the whole batch at 64 channels and
# 28x28). On several threads the 16 GEMMs of a chunk scale better when
# wider: ResNet-50 (batch 16) on two threads ran 2.58-2.62 s a step with
# 16 MB per thread, 2.68-2.74 s with 4 MB. 8 MB ran as fast as 16 (6.38 and
# 6.29 images/s in two runs) with 31 MB less peak RSS, which on this step
# is the margin against PyTorch's.
WINOGRAD_CHUNK_BYTES = 4 << 20
WINOGRAD_CHUNK_BYTES_PER_THREAD = 8 << 20


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
        self._wino_u = None
        self._wino_buffer = None  # U's memory, reused from step to step

    def uses_winograd(self) -> bool:
        """Whether the channel-major path computes this convolution with Winograd F(2x2, 3x3)."""
        return (self.kernel == 3 and self.stride == 1 and self.padding <= 2
                and self.in_channels >= WINOGRAD_MIN_CHANNELS)

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

    def _chunk(self, c: int, n: int, out_h: int, out_w: int, itemsize: int) -> int:
        """Images per im2col chunk: columns of about CHUNK_BYTES, so the GEMM reads them from cache."""
        per_image = c * self.kernel ** 2 * out_h * out_w * itemsize
        # more threads want wider GEMMs: a 64-row product 3136 columns wide
        # gains 1.6x from a second BLAS thread, 50176 wide 1.85x (measured)
        return max(1, min(n, CHUNK_BYTES * layers_cpu.threads() // per_image))

    def _subsampled(self, xv, out_h: int, out_w: int):
        """The (C, N*Ho*Wo) GEMM operand of a 1x1 convolution: the input itself, or its strided pixels."""
        c, n = xv.shape[:2]
        if self.stride == 1 and xv.flags.c_contiguous:
            return xv.reshape(c, -1)
        sub = memory.workspace(c * n * out_h * out_w, xv.dtype).reshape(c, n, out_h, out_w)
        layers_cpu.subsample(xv, sub, self.stride)
        return sub.reshape(c, -1)

    def _chunks(self, xv, out_h: int, out_w: int):
        """(first image, image count, columns (K, count*Ho*Wo)) per chunk, built in the shared workspace."""
        c, n = xv.shape[:2]
        k = self.kernel
        step = self._chunk(c, n, out_h, out_w, xv.itemsize)
        buf = memory.workspace(c * k * k * step * out_h * out_w, xv.dtype)
        for n0 in range(0, n, step):
            count = min(step, n - n0)
            cols = buf[:c * k * k * count * out_h * out_w].reshape(c, k, k, count, out_h, out_w)
            layers_cpu.im2col(xv, cols, k, self.stride, self.padding, n0)
            yield n0, count, cols.reshape(c * k * k, -1)

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
        w2 = self.weight.data.reshape(self.out_channels, -1)
        plane = out_h * out_w
        self._wino_u = None
        if self.kernel == 1 and self.padding == 0:
            np.matmul(w2, self._subsampled(xv, out_h, out_w), out=y2)
        elif self.uses_winograd() and xv.flags.c_contiguous:
            self._forward_winograd(xv, y)
        else:
            for n0, count, cols in self._chunks(xv, out_h, out_w):
                # a column block of y is a strided view: BLAS writes it in place
                np.matmul(w2, cols, out=y2[:, n0 * plane:(n0 + count) * plane])
        if self.has_bias or self.relu:
            layers_cpu.bias_relu(y2, self.bias.data if self.has_bias else None, self.relu)
        self._cache = (xv, y2, (h, w, out_h, out_w)) if self.training else None
        return y

    def _winograd_chunks(self, n: int, out_h: int, out_w: int, dtype, rows: int):
        """(first image, count, V, M) per chunk: V (16, C, T) and M (16, rows, T) in the shared workspace."""
        th, tw = layers_cpu.winograd_tiles(out_h, out_w)
        c = self.in_channels
        per_image = 16 * c * th * tw * dtype.itemsize
        threads = layers_cpu.threads()
        budget = WINOGRAD_CHUNK_BYTES if threads == 1 else WINOGRAD_CHUNK_BYTES_PER_THREAD * threads
        step = max(1, min(n, budget // per_image))
        tiles = step * th * tw
        buf = memory.workspace(16 * (c + rows) * tiles, dtype)
        for n0 in range(0, n, step):
            count = min(step, n - n0)
            t = count * th * tw
            v = buf[:16 * c * t].reshape(16, c, t)
            m = buf[16 * c * tiles:16 * c * tiles + 16 * rows * t].reshape(16, rows, t)
            yield n0, count, v, m

    def _forward_winograd(self, xv, y):
        o, n, out_h, out_w = y.shape
        u = self._wino_buffer
        if u is None or u.shape != (16, o, self.in_channels) or u.dtype != xv.dtype:
            u = self._wino_buffer = np.empty((16, o, self.in_channels), xv.dtype)
        layers_cpu.winograd_weight(self.weight.data, u)
        for n0, count, v, m in self._winograd_chunks(n, out_h, out_w, xv.dtype, o):
            layers_cpu.winograd_input(xv, v, self.padding, n0)
            np.matmul(u, v, out=m)
            layers_cpu.winograd_output(m, y, n0)
        # the weights do not change before backward, which needs U^T
        self._wino_u = u if self.training else None

    def _backward_winograd(self, xv, dy, dw, dx):
        u, self._wino_u = self._wino_u, None
        o, n, out_h, out_w = dy.shape
        du = memory.pool.take(u.shape, dy.dtype)
        part = memory.pool.take(u.shape, dy.dtype)
        ut = u.transpose(0, 2, 1)
        for n0, count, v, m in self._winograd_chunks(n, out_h, out_w, dy.dtype, o):
            layers_cpu.winograd_output_adjoint(dy, m, n0)
            layers_cpu.winograd_input(xv, v, self.padding, n0)
            np.matmul(m, v.transpose(0, 2, 1), out=du if n0 == 0 else part)
            if n0:
                du += part
            if dx is not None:
                # V is spent: its gradient takes the same workspace
                np.matmul(ut, m, out=v)
                layers_cpu.winograd_input_adjoint(v, dx, self.padding, n0)
        layers_cpu.winograd_weight_adjoint(du, dw.reshape(self.weight.shape))
        memory.pool.give(du)
        memory.pool.give(part)

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
        grad2 = self.weight.grad.reshape(o, -1)
        dw = memory.pool.take(w2.shape, dy.dtype)
        dx = memory.pool.take((c, n, h, w), dy.dtype) if self.input_grad else None
        plane = out_h * out_w
        if self._wino_u is not None:
            self._backward_winograd(xv, dy2.reshape(o, n, out_h, out_w), dw, dx)
            grad2 += dw
        elif k == 1 and p == 0:
            np.matmul(dy2, self._subsampled(xv, out_h, out_w).T, out=dw)
            grad2 += dw
            if dx is not None and s == 1:
                np.matmul(w2.T, dy2, out=dx.reshape(c, -1))
            elif dx is not None:
                dsub = memory.workspace(c * n * plane, dy.dtype)
                np.matmul(w2.T, dy2, out=dsub.reshape(c, -1))
                layers_cpu.upsample(dsub.reshape(c, n, out_h, out_w), dx, s)
        else:
            for n0, count, cols in self._chunks(xv, out_h, out_w):
                dy_block = dy2[:, n0 * plane:(n0 + count) * plane]
                np.matmul(dy_block, cols.T, out=dw)
                grad2 += dw
                if dx is not None:
                    # the columns are spent: their gradient takes the same workspace
                    np.matmul(w2.T, dy_block, out=cols)
                    layers_cpu.col2im(cols.reshape(c, k, k, count, out_h, out_w), dx, k, s, p, n0)
        memory.pool.give(dw)
        memory.pool.give(masked)
        if dx is None:
            return None
        if self.takes_nchw:
            nchw = np.ascontiguousarray(dx.transpose(1, 0, 2, 3))
            memory.pool.give(dx)
            return nchw
        return dx

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.has_bias})")
