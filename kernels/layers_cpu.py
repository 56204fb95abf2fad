"""Parallel Numba kernels for the channel-major (C, N, H, W) layer path on the host.

Layout: every activation between the first convolution and the network's
exit (Flatten / GlobalAvgPool) is "CNHW": channel-major, so each channel's
N*H*W values are one contiguous run. That is what a convolution's GEMM
W (O, K) @ cols (K, N*Ho*Wo) produces, so it is the next layer's input with
no transposing copy, and per-channel work (batch norm statistics, bias)
runs over contiguous memory. Kernels parallelise (`prange`) over channels,
or over (channel, sample) planes where the channel count alone would leave
threads idle.

Every kernel has a plain NumPy twin (`*_numpy`) right after it, written for
clarity; tests/test_kernels_cpu.py compares the two. The twins accept any
array module with NumPy's API, so the CuPy path can use them as well.

Reductions (batch norm sums) accumulate in float64 over LANES independent
partial sums, as in kernels/optim_cpu.py: the loop vectorises without
fastmath and the summation order does not depend on the CPU's vector width.
"""
from __future__ import annotations

import os

# Numba's OpenMP pool spins after each parallel region by default; between
# these kernels run multi-threaded BLAS calls whose own workers then find
# every core taken. With two threads on two cores that made a ResNet-50 step
# slower than on one thread; sleeping workers cost a wake-up (microseconds)
# per kernel instead. libgomp reads this when Numba first starts its pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

JIT = dict(parallel=True, fastmath=False, cache=True, nogil=True)
LANES = 32


def threads() -> int:
    """Threads of Numba's pool for this thread of the process (set by hpcdl.threads)."""
    import numba

    return int(numba.get_num_threads())


def _array_module(x):
    from hpcdl.backend import array_module

    return array_module(x)


# -- im2col / col2im ------------------------------------------------------------------------------

@njit(**JIT)
def _im2col(x, cols, k, stride, pad, n0):
    c_in, height, width = x.shape[0], x.shape[2], x.shape[3]
    n_img, out_h, out_w = cols.shape[3], cols.shape[4], cols.shape[5]
    for t in prange(c_in * k * k):
        c, i, j = t // (k * k), (t // k) % k, t % k
        # output columns whose input column lies inside the image: lo <= ow < hi
        lo = 0
        while lo < out_w and lo * stride + j - pad < 0:
            lo += 1
        hi = out_w
        while hi > lo and (hi - 1) * stride + j - pad >= width:
            hi -= 1
        for n in range(n_img):
            for oh in range(out_h):
                row = cols[c, i, j, n, oh]
                h = oh * stride + i - pad
                if h < 0 or h >= height or hi <= lo:
                    row[:] = 0
                    continue
                src = x[c, n0 + n, h]
                row[:lo] = 0
                row[hi:] = 0
                w0 = lo * stride + j - pad
                if stride == 1:
                    row[lo:hi] = src[w0:w0 + hi - lo]
                else:
                    for ow in range(lo, hi):
                        row[ow] = src[w0 + (ow - lo) * stride]


@njit(**JIT)
def _im2col_same(x, cols, k, pad, n0):
    # Stride 1 and output size = input size: for each offset (i, j) the
    # columns of one image are its plane shifted by di*W + dj, so they are
    # one contiguous copy, then the few entries that wrapped around a row
    # edge or fell off the top or bottom are zeroed. Per-row copies of
    # W elements were twice as slow at W = 28.
    c_in, n_all, height, width = x.shape
    n_img = cols.shape[3]
    plane = height * width
    xf, cf = x.reshape(-1), cols.reshape(-1)
    for t in prange(c_in * k * k):
        c, i, j = t // (k * k), (t // k) % k, t % k
        di, dj = i - pad, j - pad
        r0, r1 = max(0, -di), min(height, height - di)
        for n in range(n_img):
            out0 = t * n_img * plane + n * plane
            in0 = (c * n_all + n0 + n) * plane
            lo, hi = r0 * width, max(r0, r1) * width
            for o in range(0, lo):
                cf[out0 + o] = 0
            for o in range(hi, plane):
                cf[out0 + o] = 0
            shift = di * width + dj
            a, b = max(lo, -shift), min(hi, plane - shift)
            for o in range(lo, a):
                cf[out0 + o] = 0
            for o in range(a, b):
                cf[out0 + o] = xf[in0 + o + shift]
            for o in range(max(a, b), hi):
                cf[out0 + o] = 0
            if dj != 0:
                w_lo, w_hi = (width - dj, width) if dj > 0 else (0, -dj)
                for r in range(r0, r1):
                    for q in range(w_lo, w_hi):
                        cf[out0 + r * width + q] = 0


def im2col(x, cols, kernel: int, stride: int, pad: int, first: int = 0) -> None:
    """cols[c, i, j, n, oh, ow] = x[c, first + n, oh*s + i - p, ow*s + j - p], 0 where that reads padding.

    x is (C, N, H, W), any strides (an NCHW array's transpose(1, 0, 2, 3) works);
    cols is a C-contiguous (C, k, k, count, Ho, Wo) array for images
    first..first+count-1, every entry written.
    """
    if stride == 1 and cols.shape[4:] == x.shape[2:] and x.flags.c_contiguous:
        _im2col_same(x, cols, kernel, pad, first)
    else:
        _im2col(x, cols, kernel, stride, pad, first)


def im2col_numpy(x, cols, kernel: int, stride: int, pad: int, first: int = 0) -> None:
    xp = _array_module(x)
    x = x[:, first:first + cols.shape[3]]
    c, n, h, w = x.shape
    out_h, out_w = cols.shape[4], cols.shape[5]
    padded = xp.zeros((c, n, h + 2 * pad + stride * kernel, w + 2 * pad + stride * kernel), dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    for i in range(kernel):
        for j in range(kernel):
            cols[:, i, j] = padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]


@njit(**JIT)
def _col2im(dcols, dx, k, stride, pad, n0):
    c_in, height, width = dx.shape[0], dx.shape[2], dx.shape[3]
    n_img, out_h, out_w = dcols.shape[3], dcols.shape[4], dcols.shape[5]
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        plane = dx[c, n0 + n]
        plane[:, :] = 0
        for i in range(k):
            for oh in range(out_h):
                h = oh * stride + i - pad
                if h < 0 or h >= height:
                    continue
                dst = plane[h]
                for j in range(k):
                    src = dcols[c, i, j, n, oh]
                    for ow in range(out_w):
                        w = ow * stride + j - pad
                        if 0 <= w < width:
                            dst[w] += src[ow]


@njit(**JIT)
def _col2im_same(dcols, dx, k, pad, n0):
    # adjoint of _im2col_same: each offset adds one shifted contiguous run;
    # entries that wrapped around a row edge are skipped row by row
    c_in, height, width = dx.shape[0], dx.shape[2], dx.shape[3]
    n_img = dcols.shape[3]
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        dst = dx[c, n0 + n]
        dst[:, :] = 0
        for i in range(k):
            di = i - pad
            r0, r1 = max(0, -di), min(height, height - di)
            for j in range(k):
                dj = j - pad
                src = dcols[c, i, j, n]
                q0, q1 = max(0, -dj), min(width, width - dj)
                for r in range(r0, r1):
                    d_row, s_row = dst[r + di], src[r]
                    for q in range(q0, q1):
                        d_row[q + dj] += s_row[q]


def col2im(dcols, dx, kernel: int, stride: int, pad: int, first: int = 0) -> None:
    """Adjoint of im2col: dx[:, first:first+count] = dcols (C, k, k, count, Ho, Wo) summed over the windows.

    Overwrites those images of dx (C, N, H, W) and leaves the others alone.
    """
    if stride == 1 and dcols.shape[4:] == dx.shape[2:] and dcols.flags.c_contiguous:
        _col2im_same(dcols, dx, kernel, pad, first)
    else:
        _col2im(dcols, dx, kernel, stride, pad, first)


def col2im_numpy(dcols, dx, kernel: int, stride: int, pad: int, first: int = 0) -> None:
    xp = _array_module(dx)
    dx = dx[:, first:first + dcols.shape[3]]
    c, n, h, w = dx.shape
    out_h, out_w = dcols.shape[4], dcols.shape[5]
    padded = xp.zeros((c, n, h + 2 * pad + stride * kernel, w + 2 * pad + stride * kernel), dtype=dx.dtype)
    for i in range(kernel):
        for j in range(kernel):
            padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride] += dcols[:, i, j]
    dx[...] = padded[:, :, pad:pad + h, pad:pad + w]


@njit(**JIT)
def _subsample(x, out, stride):
    c_in, n_img, out_h, out_w = out.shape
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        for oh in range(out_h):
            src, dst = x[c, n, oh * stride], out[c, n, oh]
            for ow in range(out_w):
                dst[ow] = src[ow * stride]


def subsample(x, out, stride: int) -> None:
    """out = x[:, :, ::stride, ::stride] (cropped to out's shape): the input of a strided 1x1 convolution."""
    _subsample(x, out, stride)


def subsample_numpy(x, out, stride: int) -> None:
    out_h, out_w = out.shape[2:]
    out[...] = x[:, :, :stride * out_h:stride, :stride * out_w:stride]


@njit(**JIT)
def _upsample(dy, dx, stride):
    c_in, n_img, out_h, out_w = dy.shape
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        dx[c, n, :, :] = 0
        for oh in range(out_h):
            src, dst = dy[c, n, oh], dx[c, n, oh * stride]
            for ow in range(out_w):
                dst[ow * stride] = src[ow]


def upsample(dy, dx, stride: int) -> None:
    """Adjoint of subsample: dx zero except dx[:, :, ::s, ::s] = dy. Overwrites dx."""
    _upsample(dy, dx, stride)


def upsample_numpy(dy, dx, stride: int) -> None:
    out_h, out_w = dy.shape[2:]
    dx[...] = 0
    dx[:, :, :stride * out_h:stride, :stride * out_w:stride] = dy


# -- bias, ReLU and residual sums over (C, M) views --------------------------------------------------

@njit(**JIT)
def _bias_relu(y, bias, relu, zero):
    rows, m = y.shape
    for r in prange(rows):
        b = bias[r]
        yr = y[r]
        for i in range(m):
            v = yr[i] + b
            yr[i] = max(v, zero) if relu else v


def bias_relu(y, bias, relu: bool) -> None:
    """In place on y (C, M): add bias[c] to row c (bias may be None), then ReLU if asked."""
    if bias is None:
        bias = np.zeros(y.shape[0], dtype=y.dtype)
    _bias_relu(y, bias, bool(relu), y.dtype.type(0))


def bias_relu_numpy(y, bias, relu: bool) -> None:
    xp = _array_module(y)
    if bias is not None:
        y += bias[:, None]
    if relu:
        xp.maximum(y, 0, out=y)


@njit(**JIT)
def _relu_mask(dy, y, out, rowsum, want_sum, zero):
    rows, m = dy.shape
    for r in prange(rows):
        dr, yr, o = dy[r], y[r], out[r]
        for i in range(m):
            o[i] = dr[i] if yr[i] > zero else zero
        if want_sum:
            acc = np.zeros(LANES)
            for start in range(0, m, LANES):
                block = o[start:min(start + LANES, m)]
                for lane in range(block.size):
                    acc[lane] += block[lane]
            rowsum[r] = acc.sum()


def relu_mask(dy, y, out, rowsum=None) -> None:
    """out = dy where y > 0 else 0 (ReLU backward from its output), over (C, M) views; rowsum[c] = sum of row c."""
    want = rowsum is not None
    _relu_mask(dy, y, out, rowsum if want else np.zeros(1), want, dy.dtype.type(0))


def relu_mask_numpy(dy, y, out, rowsum=None) -> None:
    xp = _array_module(dy)
    xp.multiply(dy, y > 0, out=out)
    if rowsum is not None:
        rowsum[...] = out.sum(axis=1, dtype=np.float64)


@njit(**JIT)
def _row_sums(x, out):
    rows, m = x.shape
    for r in prange(rows):
        acc = np.zeros(LANES)
        xr = x[r]
        for start in range(0, m, LANES):
            block = xr[start:min(start + LANES, m)]
            for lane in range(block.size):
                acc[lane] += block[lane]
        out[r] = acc.sum()


def row_sums(x, out) -> None:
    """out[c] = sum of row c of x (C, M), accumulated in float64 (a bias gradient)."""
    _row_sums(x, out)


def row_sums_numpy(x, out) -> None:
    out[...] = x.sum(axis=1, dtype=np.float64)


@njit(**JIT)
def _add_relu(a, b, out, relu, zero):
    size = a.size
    chunks = (size + 16383) // 16384
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    for c in prange(chunks):
        for i in range(c * 16384, min(size, (c + 1) * 16384)):
            v = fa[i] + fb[i]
            fo[i] = max(v, zero) if relu else v


def add_relu(a, b, out, relu: bool = True) -> None:
    """out = relu(a + b) (or a + b), elementwise over contiguous arrays; out may be a or b."""
    _add_relu(a, b, out, bool(relu), a.dtype.type(0))


def add_relu_numpy(a, b, out, relu: bool = True) -> None:
    xp = _array_module(a)
    xp.add(a, b, out=out)
    if relu:
        xp.maximum(out, 0, out=out)


# -- batch normalisation over (C, M) views --------------------------------------------------------------

@njit(**JIT)
def _bn_stats(x, mean, var):
    channels, m = x.shape
    for c in prange(channels):
        xc = x[c]
        # shifted sums: with the shift near the mean, the variance does not
        # suffer cancellation when |mean| >> std
        shift = np.float64(xc[0])
        s1, s2 = np.zeros(LANES), np.zeros(LANES)
        for start in range(0, m, LANES):
            block = xc[start:min(start + LANES, m)]
            for lane in range(block.size):
                d = np.float64(block[lane]) - shift
                s1[lane] += d
                s2[lane] += d * d
        t1, t2 = s1.sum() / m, s2.sum() / m
        mean[c] = shift + t1
        var[c] = max(t2 - t1 * t1, 0.0)


def bn_stats(x, mean, var) -> None:
    """Per-row mean and biased variance of x (C, M) into float64 mean[c], var[c]."""
    _bn_stats(x, mean, var)


def bn_stats_numpy(x, mean, var) -> None:
    x64 = x.astype(np.float64)
    mean[...] = x64.mean(axis=1)
    var[...] = ((x64 - mean[:, None]) ** 2).mean(axis=1)


@njit(**JIT)
def _scale_shift(x, scale, shift, y, relu, zero):
    channels, m = x.shape
    for c in prange(channels):
        a, b = scale[c], shift[c]
        xc, yc = x[c], y[c]
        for i in range(m):
            v = xc[i] * a + b
            yc[i] = max(v, zero) if relu else v


def scale_shift(x, scale, shift, y, relu: bool) -> None:
    """y[c] = x[c] * scale[c] + shift[c], then ReLU if asked: batch norm's forward once statistics are known.

    scale and shift are in x's dtype, so float32 input stays float32 arithmetic.
    """
    _scale_shift(x, scale, shift, y, bool(relu), y.dtype.type(0))


def scale_shift_numpy(x, scale, shift, y, relu: bool) -> None:
    xp = _array_module(x)
    xp.multiply(x, scale[:, None], out=y)
    y += shift[:, None]
    if relu:
        xp.maximum(y, 0, out=y)


@njit(**JIT)
def _bn_backward_sums(dy, x, y, mean, relu, sum_dy, sum_dy_xc, zero):
    channels, m = x.shape
    for c in prange(channels):
        dc, xc, yc = dy[c], x[c], y[c]
        mu = mean[c]
        s1, s2 = np.zeros(LANES), np.zeros(LANES)
        for start in range(0, m, LANES):
            stop = min(start + LANES, m)
            for lane in range(stop - start):
                i = start + lane
                g = dc[i]
                if relu and not yc[i] > zero:
                    g = zero
                g64 = np.float64(g)
                s1[lane] += g64
                s2[lane] += g64 * (np.float64(xc[i]) - mu)
        sum_dy[c] = s1.sum()
        sum_dy_xc[c] = s2.sum()


def bn_backward_sums(dy, x, y, mean, relu: bool, sum_dy, sum_dy_xc) -> None:
    """Per channel: sum of g and of g * (x - mean), g = dy masked by y > 0 when the ReLU is fused (float64 out)."""
    _bn_backward_sums(dy, x, y, mean, bool(relu), sum_dy, sum_dy_xc, dy.dtype.type(0))


def bn_backward_sums_numpy(dy, x, y, mean, relu: bool, sum_dy, sum_dy_xc) -> None:
    g = (dy * (y > 0) if relu else dy).astype(np.float64)
    sum_dy[...] = g.sum(axis=1)
    sum_dy_xc[...] = (g * (x.astype(np.float64) - mean[:, None])).sum(axis=1)


@njit(**JIT)
def _bn_backward_dx(dy, x, y, relu, mean, a, b, c0, dx, zero):
    channels, m = x.shape
    for c in prange(channels):
        dc, xc, yc, oc = dy[c], x[c], y[c], dx[c]
        mu, ac, bc, cc = mean[c], a[c], b[c], c0[c]
        for i in range(m):
            g = dc[i]
            if relu and not yc[i] > zero:
                g = zero
            oc[i] = ac * g + bc * (xc[i] - mu) + cc


def bn_backward_dx(dy, x, y, relu: bool, mean, a, b, c, dx) -> None:
    """dx = a[c] * g + b[c] * (x - mean[c]) + c[c], g = dy masked by y > 0 when the ReLU is fused.

    Batch norm's input gradient gamma*inv_std*(g - mean(g) - xhat*mean(g*xhat))
    is affine in (g, x - mean) per channel; the caller folds the sums into
    a, b, c (all in x's dtype), so this is one pass over memory.
    """
    _bn_backward_dx(dy, x, y, bool(relu), mean, a, b, c, dx, dy.dtype.type(0))


def bn_backward_dx_numpy(dy, x, y, relu: bool, mean, a, b, c, dx) -> None:
    g = dy * (y > 0) if relu else dy
    dx[...] = a[:, None] * g + b[:, None] * (x - mean[:, None]) + c[:, None]


# -- max pooling over (C, N, H, W) ------------------------------------------------------------------------

@njit(**JIT)
def _maxpool(x, y, winner, k, stride, pad, record):
    c_in, n_img, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        src, dst, won_plane = x[c, n], y[c, n], winner[c, n] if record else winner[0, 0]
        for oh in range(out_h):
            h0 = oh * stride - pad
            i_lo, i_hi = max(0, -h0), min(k, height - h0)
            for ow in range(out_w):
                w0 = ow * stride - pad
                j_lo, j_hi = max(0, -w0), min(k, width - w0)
                # the first in-bounds offset starts the scan, so ties keep the first maximum
                best = src[h0 + i_lo, w0 + j_lo]
                won = i_lo * k + j_lo
                for i in range(i_lo, i_hi):
                    row = src[h0 + i]
                    for j in range(j_lo, j_hi):
                        v = row[w0 + j]
                        if v > best:
                            best = v
                            won = i * k + j
                dst[oh, ow] = best
                if record:
                    won_plane[oh, ow] = won


@njit(**JIT)
def _maxpool_2x2(x, y, winner, record):
    # the common 2x2 stride-2 window without padding: no bounds to test, and
    # a branch-light body over row pairs (2.5x the general kernel's speed on
    # fmnist_cnn's first pooling, measured)
    c_in, n_img = x.shape[0], x.shape[1]
    out_h, out_w = y.shape[2], y.shape[3]
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        src, dst, won_plane = x[c, n], y[c, n], winner[c, n] if record else winner[0, 0]
        for oh in range(out_h):
            r0, r1, out = src[2 * oh], src[2 * oh + 1], dst[oh]
            won_row = won_plane[oh] if record else won_plane[0]
            for ow in range(out_w):
                a, b, c2, d = r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]
                best, won = a, 0
                if b > best:
                    best, won = b, 1
                if c2 > best:
                    best, won = c2, 2
                if d > best:
                    best, won = d, 3
                out[ow] = best
                if record:
                    won_row[ow] = won


def maxpool(x, y, winner, kernel: int, stride: int, pad: int) -> None:
    """y = max over k x k windows of x (C, N, H, W); winner (uint8) = i*k + j of the first maximum, or None."""
    record = winner is not None
    won = winner if record else np.zeros((1, 1, 1, 1), np.uint8)
    if kernel == 2 and stride == 2 and pad == 0:
        _maxpool_2x2(x, y, won, record)
    else:
        _maxpool(x, y, won, kernel, stride, pad, record)


def maxpool_numpy(x, y, winner, kernel: int, stride: int, pad: int) -> None:
    xp = _array_module(x)
    c, n, h, w = x.shape
    out_h, out_w = y.shape[2:]
    padded = xp.full((c, n, h + 2 * pad + stride * kernel, w + 2 * pad + stride * kernel), -xp.inf, dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    windows = xp.stack([padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
                        for i in range(kernel) for j in range(kernel)])
    y[...] = windows.max(axis=0)
    if winner is not None:
        winner[...] = windows.argmax(axis=0)  # argmax returns the first maximum


@njit(**JIT)
def _maxpool_backward(dy, winner, dx, k, stride, pad):
    c_in, n_img, height, width = dx.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    for t in prange(c_in * n_img):
        c, n = t // n_img, t % n_img
        plane = dx[c, n]
        plane[:, :] = 0
        for oh in range(out_h):
            for ow in range(out_w):
                won = winner[c, n, oh, ow]
                plane[oh * stride + won // k - pad, ow * stride + won % k - pad] += dy[c, n, oh, ow]


def maxpool_backward(dy, winner, dx, kernel: int, stride: int, pad: int) -> None:
    """dx = dy routed to each window's recorded winner (summed where windows overlap). Overwrites dx."""
    _maxpool_backward(dy, winner, dx, kernel, stride, pad)


def maxpool_backward_numpy(dy, winner, dx, kernel: int, stride: int, pad: int) -> None:
    xp = _array_module(dy)
    c, n, h, w = dx.shape
    out_h, out_w = dy.shape[2:]
    padded = xp.zeros((c, n, h + 2 * pad + stride * kernel, w + 2 * pad + stride * kernel), dtype=dx.dtype)
    for i in range(kernel):
        for j in range(kernel):
            padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride] += dy * (winner == i * kernel + j)
    dx[...] = padded[:, :, pad:pad + h, pad:pad + w]


# -- Winograd F(2x2, 3x3) for stride-1 3x3 convolutions ----------------------------------------------------
#
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016):
# each 2x2 output tile of a 3x3 cross-correlation is A^T [(G g G^T) * (B^T d B)] A
# for the 4x4 input patch d starting at (2*ti - pad, 2*tj - pad). Over all
# tiles that is 16 independent GEMMs, one per patch position xi = 4*a + b:
#
#     M[xi] (O, T) = U[xi] (O, C) @ V[xi] (C, T),   U = G g G^T,  V = B^T d B
#
# 16*C*O multiply-adds per tile instead of 36*C*O for im2col. Backward is the
# exact adjoint: dM = A dY A^T, dU[xi] = dM[xi] @ V[xi]^T, dV[xi] = U[xi]^T @ dM[xi],
# dx = overlap-add of B dV B^T, dg = G^T dU G.
#
# Tiles are numbered (image, tile row, tile column); V and M are (16, C or O, T)
# with T = count * tiles_h * tiles_w for the images first..first+count-1.

WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def winograd_tiles(out_h: int, out_w: int) -> tuple[int, int]:
    """Tile rows and columns covering an out_h x out_w output with 2x2 tiles."""
    return (out_h + 1) // 2, (out_w + 1) // 2


@njit(**JIT)
def _wino_input(x, v, pad, n0, th, tw):
    c_in, height, width = x.shape[0], x.shape[2], x.shape[3]
    count = v.shape[2] // (th * tw)
    wp = 2 * tw + 2
    for t in prange(c_in * count):
        c, n = t // count, t % count
        src = x[c, n0 + n]
        rows = np.zeros((4, wp), dtype=v.dtype)   # the patch rows, padded columns zero
        q0, q1 = max(0, pad), min(wp, pad + width)  # padded columns that hold real input
        tcol = np.empty((4, wp), dtype=v.dtype)
        base = n * th * tw
        for ti in range(th):
            for a in range(4):
                h = 2 * ti - pad + a
                if 0 <= h < height:
                    row = src[h]
                    for q in range(q0, q1):
                        rows[a, q] = row[q - pad]
                else:
                    rows[a, :] = 0
            for q in range(wp):  # B^T on the rows
                tcol[0, q] = rows[0, q] - rows[2, q]
                tcol[1, q] = rows[1, q] + rows[2, q]
                tcol[2, q] = rows[2, q] - rows[1, q]
                tcol[3, q] = rows[1, q] - rows[3, q]
            col0 = base + ti * tw
            for a in range(4):
                ta = tcol[a]
                va0, va1, va2, va3 = v[4 * a, c], v[4 * a + 1, c], v[4 * a + 2, c], v[4 * a + 3, c]
                for tj in range(tw):  # B on the columns
                    q = 2 * tj
                    col = col0 + tj
                    va0[col] = ta[q] - ta[q + 2]
                    va1[col] = ta[q + 1] + ta[q + 2]
                    va2[col] = ta[q + 2] - ta[q + 1]
                    va3[col] = ta[q + 1] - ta[q + 3]


def winograd_input(x, v, pad: int, first: int = 0) -> None:
    """V[xi, c, tile] = (B^T d B)[xi] for the 4x4 patch of each 2x2 output tile; x (C, N, H, W) C-contiguous.

    v is (16, C, count * tiles_h * tiles_w) for images first..first+count-1 of a
    3x3 stride-1 convolution with padding `pad`; every entry is written.
    """
    height, width = x.shape[2:]
    th, tw = winograd_tiles(height + 2 * pad - 2, width + 2 * pad - 2)
    _wino_input(x, v, pad, first, th, tw)


def _patches(padded, th: int, tw: int):
    """(4, 4, ..., th, tw) view-stack of the 4x4 patches at stride 2 of a padded (..., H, W) array."""
    xp = _array_module(padded)
    return xp.stack([xp.stack([padded[..., a:a + 2 * th:2, b:b + 2 * tw:2] for b in range(4)]) for a in range(4)])


def winograd_input_numpy(x, v, pad: int, first: int = 0) -> None:
    xp = _array_module(x)
    c, _, h, w = x.shape
    th, tw = winograd_tiles(h + 2 * pad - 2, w + 2 * pad - 2)
    count = v.shape[2] // (th * tw)
    padded = xp.zeros((c, count, 2 * th + 2, 2 * tw + 2), dtype=x.dtype)
    hh, ww = min(h, 2 * th + 2 - pad), min(w, 2 * tw + 2 - pad)
    padded[:, :, pad:pad + hh, pad:pad + ww] = x[:, first:first + count, :hh, :ww]
    bt = xp.asarray(WINO_BT, dtype=x.dtype)
    d = _patches(padded, th, tw)                                   # (4, 4, C, count, th, tw)
    v[...] = xp.einsum("ia,abcnyx,jb->ijcnyx", bt, d, bt).reshape(16, c, -1)


@njit(**JIT)
def _wino_output(m, y, n0, th, tw):
    o_out, out_h, out_w = y.shape[0], y.shape[2], y.shape[3]
    count = m.shape[2] // (th * tw)
    for t in prange(o_out * count):
        o, n = t // count, t % count
        dst = y[o, n0 + n]
        base = n * th * tw
        r = np.empty((2, 4, tw), dtype=m.dtype)
        for ti in range(th):
            col0 = base + ti * tw
            for b in range(4):  # A^T on the rows of each tile, all tiles of the tile row at once
                m0, m1, m2, m3 = m[b, o], m[4 + b, o], m[8 + b, o], m[12 + b, o]
                for tj in range(tw):
                    col = col0 + tj
                    r[0, b, tj] = m0[col] + m1[col] + m2[col]
                    r[1, b, tj] = m1[col] - m2[col] - m3[col]
            for a in range(2):
                h = 2 * ti + a
                if h >= out_h:
                    continue
                row = dst[h]
                ra = r[a]
                for tj in range(tw):  # A on the columns
                    row[2 * tj] = ra[0, tj] + ra[1, tj] + ra[2, tj]
                    if 2 * tj + 1 < out_w:
                        row[2 * tj + 1] = ra[1, tj] - ra[2, tj] - ra[3, tj]


def winograd_output(m, y, first: int = 0) -> None:
    """y[o, first + n] = the 2x2 tiles A^T M A, cropped to y's (Ho, Wo); y (O, N, Ho, Wo), m (16, O, T)."""
    th, tw = winograd_tiles(*y.shape[2:])
    _wino_output(m, y, first, th, tw)


def _output_geometry(images, transformed) -> tuple[int, int, int, int, int, int]:
    """(O, Ho, Wo, tile rows, tile columns, images in this chunk) of y or dy (O, N, Ho, Wo) and its
    transformed tiles m or dm (16, O, T); the NumPy twins of the output transform and its adjoint share it."""
    o, _, out_h, out_w = images.shape
    th, tw = winograd_tiles(out_h, out_w)
    return o, out_h, out_w, th, tw, transformed.shape[2] // (th * tw)


def winograd_output_numpy(m, y, first: int = 0) -> None:
    xp = _array_module(m)
    o, out_h, out_w, th, tw, count = _output_geometry(y, m)
    at = xp.asarray(WINO_AT, dtype=m.dtype)
    tiles = xp.einsum("ia,abonyx,jb->ijonyx", at, m.reshape(4, 4, o, count, th, tw), at)  # (2, 2, O, n, th, tw)
    full = tiles.transpose(2, 3, 4, 0, 5, 1).reshape(o, count, 2 * th, 2 * tw)
    y[:, first:first + count] = full[:, :, :out_h, :out_w]


@njit(**JIT)
def _wino_output_adjoint(dy, dm, n0, th, tw):
    o_out, out_h, out_w = dy.shape[0], dy.shape[2], dy.shape[3]
    count = dm.shape[2] // (th * tw)
    for t in prange(o_out * count):
        o, n = t // count, t % count
        src = dy[o, n0 + n]
        base = n * th * tw
        g = np.zeros((2, 2 * tw), dtype=dm.dtype)  # the tile row's two dy rows, zero past the edge
        r = np.empty((4, 2, tw), dtype=dm.dtype)
        for ti in range(th):
            for a in range(2):
                h = 2 * ti + a
                if h < out_h:
                    for q in range(out_w):
                        g[a, q] = src[h, q]
                else:
                    g[a, :] = 0
            for a in range(2):  # A on the columns: (v0, v1) -> (v0, v0 + v1, v0 - v1, -v1)
                for tj in range(tw):
                    u0, u1 = g[a, 2 * tj], g[a, 2 * tj + 1]
                    r[0, a, tj] = u0
                    r[1, a, tj] = u0 + u1
                    r[2, a, tj] = u0 - u1
                    r[3, a, tj] = -u1
            col0 = base + ti * tw
            for b in range(4):  # and on the rows
                d0, d1, d2, d3 = dm[b, o], dm[4 + b, o], dm[8 + b, o], dm[12 + b, o]
                for tj in range(tw):
                    col = col0 + tj
                    u0, u1 = r[b, 0, tj], r[b, 1, tj]
                    d0[col] = u0
                    d1[col] = u0 + u1
                    d2[col] = u0 - u1
                    d3[col] = -u1


def winograd_output_adjoint(dy, dm, first: int = 0) -> None:
    """Adjoint of winograd_output: dm (16, O, T) = A dY A^T per tile, dy (O, N, Ho, Wo) zero past the edge."""
    th, tw = winograd_tiles(*dy.shape[2:])
    _wino_output_adjoint(dy, dm, first, th, tw)


def winograd_output_adjoint_numpy(dy, dm, first: int = 0) -> None:
    xp = _array_module(dy)
    o, out_h, out_w, th, tw, count = _output_geometry(dy, dm)
    full = xp.zeros((o, count, 2 * th, 2 * tw), dtype=dy.dtype)
    full[:, :, :out_h, :out_w] = dy[:, first:first + count]
    tiles = full.reshape(o, count, th, 2, tw, 2).transpose(3, 5, 0, 1, 2, 4)  # (2, 2, O, n, th, tw)
    at = xp.asarray(WINO_AT, dtype=dy.dtype)
    dm[...] = xp.einsum("ai,abonyx,bj->ijonyx", at, tiles, at).reshape(16, o, -1)


@njit(**JIT)
def _wino_input_adjoint(dv, dx, pad, n0, th, tw):
    c_in, height, width = dx.shape[0], dx.shape[2], dx.shape[3]
    count = dv.shape[2] // (th * tw)
    wp = 2 * tw + 2
    for t in prange(c_in * count):
        c, n = t // count, t % count
        # the padded plane, two rows of it at a time: tile row ti adds to padded rows 2ti..2ti+3
        acc = np.zeros((2 * th + 2, wp), dtype=dx.dtype)
        r = np.empty((4, wp), dtype=dx.dtype)
        base = n * th * tw
        for ti in range(th):
            col0 = base + ti * tw
            r[:, :] = 0
            for a in range(4):  # B on the columns: u -> (u0, u1 - u2 + u3, -u0 + u1 + u2, -u3), overlap-added
                d0, d1, d2, d3 = dv[4 * a, c], dv[4 * a + 1, c], dv[4 * a + 2, c], dv[4 * a + 3, c]
                ra = r[a]
                for tj in range(tw):
                    col = col0 + tj
                    u0, u1, u2, u3 = d0[col], d1[col], d2[col], d3[col]
                    q = 2 * tj
                    ra[q] += u0
                    ra[q + 1] += u1 - u2 + u3
                    ra[q + 2] += -u0 + u1 + u2
                    ra[q + 3] += -u3
            h0 = 2 * ti
            for q in range(wp):  # B on the rows
                u0, u1, u2, u3 = r[0, q], r[1, q], r[2, q], r[3, q]
                acc[h0, q] += u0
                acc[h0 + 1, q] += u1 - u2 + u3
                acc[h0 + 2, q] += -u0 + u1 + u2
                acc[h0 + 3, q] += -u3
        dst = dx[c, n0 + n]
        for h in range(height):
            ph = h + pad
            for w in range(width):
                pw = w + pad
                dst[h, w] = acc[ph, pw] if ph < 2 * th + 2 and pw < wp else 0


def winograd_input_adjoint(dv, dx, pad: int, first: int = 0) -> None:
    """Adjoint of winograd_input: dx[:, first:first+count] = overlap-add of B dV B^T, padding dropped.

    Overwrites those images of dx (C, N, H, W) and leaves the others alone.
    """
    height, width = dx.shape[2:]
    th, tw = winograd_tiles(height + 2 * pad - 2, width + 2 * pad - 2)
    _wino_input_adjoint(dv, dx, pad, first, th, tw)


def winograd_input_adjoint_numpy(dv, dx, pad: int, first: int = 0) -> None:
    xp = _array_module(dv)
    c, _, h, w = dx.shape
    th, tw = winograd_tiles(h + 2 * pad - 2, w + 2 * pad - 2)
    count = dv.shape[2] // (th * tw)
    bt = xp.asarray(WINO_BT, dtype=dv.dtype)
    dd = xp.einsum("ia,ijcnyx,jb->abcnyx", bt, dv.reshape(4, 4, c, count, th, tw), bt)
    padded = xp.zeros((c, count, 2 * th + 2, 2 * tw + 2), dtype=dx.dtype)
    for a in range(4):
        for b in range(4):
            padded[..., a:a + 2 * th:2, b:b + 2 * tw:2] += dd[a, b]
    hh, ww = min(h, 2 * th + 2 - pad), min(w, 2 * tw + 2 - pad)
    dx[:, first:first + count] = 0
    dx[:, first:first + count, :hh, :ww] = padded[:, :, pad:pad + hh, pad:pad + ww]


@njit(**JIT)
def _wino_weight(weight, u):
    o_out, c_in = weight.shape[:2]
    for o in prange(o_out):
        gm = np.empty((4, 3), dtype=weight.dtype)
        for c in range(c_in):
            g = weight[o, c]
            for j in range(3):  # G g: rows (g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2)
                gm[0, j] = g[0, j]
                gm[1, j] = (g[0, j] + g[1, j] + g[2, j]) * 0.5
                gm[2, j] = (g[0, j] - g[1, j] + g[2, j]) * 0.5
                gm[3, j] = g[2, j]
            for a in range(4):  # then G^T on the right, the same on columns
                r = gm[a]
                u[4 * a, o, c] = r[0]
                u[4 * a + 1, o, c] = (r[0] + r[1] + r[2]) * 0.5
                u[4 * a + 2, o, c] = (r[0] - r[1] + r[2]) * 0.5
                u[4 * a + 3, o, c] = r[2]


def winograd_weight(weight, u) -> None:
    """u (16, O, C) = G g G^T of each 3x3 filter of weight (O, C, 3, 3)."""
    _wino_weight(weight, u)


def winograd_weight_numpy(weight, u) -> None:
    xp = _array_module(weight)
    g = xp.asarray(WINO_G, dtype=weight.dtype)
    u[...] = xp.einsum("ai,ocij,bj->aboc", g, weight, g).reshape(u.shape)


@njit(**JIT)
def _wino_weight_adjoint(du, out):
    o_out, c_in = out.shape[:2]
    for o in prange(o_out):
        r = np.empty((4, 3), dtype=out.dtype)
        for c in range(c_in):
            for a in range(4):  # . G on the right: (v0 + (v1+v2)/2, (v1-v2)/2, (v1+v2)/2 + v3)
                v0, v1, v2, v3 = du[4 * a, o, c], du[4 * a + 1, o, c], du[4 * a + 2, o, c], du[4 * a + 3, o, c]
                r[a, 0] = v0 + (v1 + v2) * 0.5
                r[a, 1] = (v1 - v2) * 0.5
                r[a, 2] = (v1 + v2) * 0.5 + v3
            g = out[o, c]
            for j in range(3):  # G^T on the left, the same on rows
                g[0, j] = r[0, j] + (r[1, j] + r[2, j]) * 0.5
                g[1, j] = (r[1, j] - r[2, j]) * 0.5
                g[2, j] = (r[1, j] + r[2, j]) * 0.5 + r[3, j]


def winograd_weight_adjoint(du, out) -> None:
    """out (O, C, 3, 3) = G^T dU G: the filter gradient from dU (16, O, C)."""
    _wino_weight_adjoint(du, out)


def winograd_weight_adjoint_numpy(du, out) -> None:
    xp = _array_module(du)
    g = xp.asarray(WINO_G, dtype=du.dtype)
    o, c = du.shape[1:]
    out[...] = xp.einsum("ai,aboc,bj->ocij", g, du.reshape(4, 4, o, c), g)
