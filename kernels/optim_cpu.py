"""Fused optimizer kernels for the host: Numba, parallel over chunks of the flat arena.

The layout follows apex's multi-tensor kernels (NVIDIA/apex,
csrc/multi_tensor_lamb.cu): the arena is cut into fixed-size chunks that
never straddle two segments, a table maps chunk -> segment, and `prange`
runs over chunks. Per-chunk float64 partial sums of squares go into a small
array; the caller reduces them per segment (np.add.reduceat), which keeps
the result independent of the thread count.

Elementwise arithmetic runs in the arena's dtype (float32 normally), as in
apex; only the sums of squares are float64. Scalars arrive as a small array
of that dtype so that Numba does not promote the inner loops to float64.
Inner loops run over a per-chunk slice from index 0: with the raw
start..stop indices Numba's negative-index wraparound check keeps LLVM
from vectorising them (about 3x slower for LAMB).

Every kernel has a plain NumPy twin (`*_numpy`) right after it; the tests
compare the two. The algorithm-level oracle is hpcdl/optim/reference.py.

Chunk table arguments: `start`, `stop` (int64, element ranges) and
`segment` (int64, owning segment of each chunk). Per-segment arguments
(`seg_*`) are arrays of the arena dtype indexed by segment.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

JIT = dict(parallel=True, fastmath=False, cache=True)


def _as_scalars(dtype, *values) -> np.ndarray:
    return np.array(values, dtype=dtype)


# -- sums of squares ------------------------------------------------------------------------
#
# Reductions run in LANES float64 partial sums, one per column of the chunk
# seen as rows of LANES elements. Each row is then an elementwise loop that
# LLVM vectorises without fastmath, and the summation order is fixed by the
# code, not by the vector width of the CPU: ranks on different nodes compute
# the same norms, hence the same trust ratios, bit for bit.

LANES = 64


@njit(**JIT)
def _sumsq_chunks(x, start, stop, out):
    for c in prange(start.size):
        acc = np.zeros(LANES)
        for row in range(start[c], stop[c], LANES):
            xr = x[row:min(row + LANES, stop[c])]
            for lane in range(xr.size):
                xl = np.float64(xr[lane])
                acc[lane] += xl * xl
        out[c] = acc.sum()


def sumsq_chunks(x, start, stop, out) -> None:
    """out[c] = Σ x[start[c]:stop[c]]², accumulated in float64."""
    _sumsq_chunks(x, start, stop, out)


def sumsq_chunks_numpy(x, start, stop) -> np.ndarray:
    return np.array([np.sum(np.square(x[a:b], dtype=np.float64)) for a, b in zip(start, stop)])


@njit(**JIT)
def _sumsq2_chunks(x, y, start, stop, out_x, out_y):
    for c in prange(start.size):
        acc_x = np.zeros(LANES)
        acc_y = np.zeros(LANES)
        for row in range(start[c], stop[c], LANES):
            end = min(row + LANES, stop[c])
            xr = x[row:end]
            yr = y[row:end]
            for lane in range(xr.size):
                xl = np.float64(xr[lane])
                yl = np.float64(yr[lane])
                acc_x[lane] += xl * xl
                acc_y[lane] += yl * yl
        out_x[c] = acc_x.sum()
        out_y[c] = acc_y.sum()


def sumsq2_chunks(x, y, start, stop, out_x, out_y) -> None:
    """Per-chunk sums of squares of two arrays in one pass over both."""
    _sumsq2_chunks(x, y, start, stop, out_x, out_y)


# -- SGD with momentum (PyTorch convention) -------------------------------------------------


@njit(**JIT)
def _sgd_update(w, g, v, start, stop, segment, seg_decay, scalars, nesterov):
    lr = scalars[0]
    mom = scalars[1]
    for c in prange(start.size):
        wd = seg_decay[segment[c]]
        a, b = start[c], stop[c]
        wc, gc, vc = w[a:b], g[a:b], v[a:b]
        if nesterov:
            for i in range(wc.size):
                d = gc[i] + wd * wc[i]
                vi = mom * vc[i] + d
                vc[i] = vi
                wc[i] = wc[i] - lr * (d + mom * vi)
        else:
            for i in range(wc.size):
                vi = mom * vc[i] + (gc[i] + wd * wc[i])
                vc[i] = vi
                wc[i] = wc[i] - lr * vi


def sgd_update(w, g, v, start, stop, segment, seg_decay, *, lr, momentum, nesterov) -> None:
    """v = m·v + (g + wd·w); w -= lr·v (Nesterov: w -= lr·(g + wd·w + m·v))."""
    _sgd_update(w, g, v, start, stop, segment, seg_decay, _as_scalars(w.dtype, lr, momentum), bool(nesterov))


def sgd_update_numpy(w, g, v, start, stop, segment, seg_decay, *, lr, momentum, nesterov) -> None:
    for a, b, s in zip(start, stop, segment):
        d = g[a:b] + seg_decay[s] * w[a:b]
        v[a:b] = momentum * v[a:b] + d
        w[a:b] -= lr * (d + momentum * v[a:b] if nesterov else v[a:b])


# -- AdamW ----------------------------------------------------------------------------------


@njit(**JIT)
def _adamw_update(w, g, m, v, start, stop, segment, seg_keep, scalars):
    beta1, one_minus_beta1, beta2, one_minus_beta2 = scalars[0], scalars[1], scalars[2], scalars[3]
    inv_bc1, inv_bc2, eps, lr = scalars[4], scalars[5], scalars[6], scalars[7]
    for c in prange(start.size):
        keep = seg_keep[segment[c]]
        a, b = start[c], stop[c]
        wc, gc, mc, vc = w[a:b], g[a:b], m[a:b], v[a:b]
        for i in range(wc.size):
            gi = gc[i]
            mi = beta1 * mc[i] + one_minus_beta1 * gi
            vi = beta2 * vc[i] + one_minus_beta2 * gi * gi
            mc[i] = mi
            vc[i] = vi
            wc[i] = wc[i] * keep - lr * ((mi * inv_bc1) / (np.sqrt(vi * inv_bc2) + eps))


def adamw_update(w, g, m, v, start, stop, segment, seg_keep, *, lr, beta1, beta2, inv_bc1, inv_bc2, eps) -> None:
    """Adam moments, then w = w·keep − lr·m̂/(√v̂ + ε), keep = 1 − lr·wd per segment."""
    scalars = _as_scalars(w.dtype, beta1, 1 - beta1, beta2, 1 - beta2, inv_bc1, inv_bc2, eps, lr)
    _adamw_update(w, g, m, v, start, stop, segment, seg_keep, scalars)


def adamw_update_numpy(w, g, m, v, start, stop, segment, seg_keep, *, lr, beta1, beta2, inv_bc1, inv_bc2, eps):
    for a, b, s in zip(start, stop, segment):
        m[a:b] = beta1 * m[a:b] + (1 - beta1) * g[a:b]
        v[a:b] = beta2 * v[a:b] + (1 - beta2) * g[a:b] ** 2
        w[a:b] = w[a:b] * seg_keep[s] - lr * (m[a:b] * inv_bc1) / (np.sqrt(v[a:b] * inv_bc2) + eps)


# -- LARS (MLPerf ResNet-50 semantics) --------------------------------------------------------


@njit(**JIT)
def _lars_update(w, g, v, start, stop, segment, seg_decay, seg_lr, scalars, nesterov):
    mom = scalars[0]
    for c in prange(start.size):
        s = segment[c]
        wd = seg_decay[s]
        scaled_lr = seg_lr[s]
        a, b = start[c], stop[c]
        wc, gc, vc = w[a:b], g[a:b], v[a:b]
        if nesterov:
            for i in range(wc.size):
                wi = wc[i]
                step = scaled_lr * (gc[i] + wd * wi)
                vi = mom * vc[i] - step
                vc[i] = vi
                wc[i] = wi + mom * vi - step
        else:
            for i in range(wc.size):
                wi = wc[i]
                vi = mom * vc[i] - scaled_lr * (gc[i] + wd * wi)
                vc[i] = vi
                wc[i] = wi + vi


def lars_update(w, g, v, start, stop, segment, seg_decay, seg_lr, *, momentum, nesterov) -> None:
    """v = m·v − lr_s·(g + wd_s·w); w += v (Nesterov: w += m·v − lr_s·(g + wd_s·w)).

    seg_lr holds lr·trust per segment, seg_decay the weight decay per segment.
    """
    _lars_update(w, g, v, start, stop, segment, seg_decay, seg_lr, _as_scalars(w.dtype, momentum), bool(nesterov))


def lars_update_numpy(w, g, v, start, stop, segment, seg_decay, seg_lr, *, momentum, nesterov) -> None:
    for a, b, s in zip(start, stop, segment):
        step = seg_lr[s] * (g[a:b] + seg_decay[s] * w[a:b])
        v[a:b] = momentum * v[a:b] - step
        w[a:b] += momentum * v[a:b] - step if nesterov else v[a:b]


# -- LAMB: stage 1 (moments, ‖w‖, ‖u‖) and stage 2 (apply) ----------------------------------
#
# Stage 1 updates m and v and sums w² and u² per chunk but does not store u;
# stage 2 recomputes u from m, v, w with the same operations (so the same
# bits) and applies it. Storing u instead would cost the same traffic (a u
# write + read instead of an m, v re-read) plus a full-size scratch buffer
# (or clobbered gradients, as in apex); the price is a second sqrt and
# division per element, which two cores hide behind memory traffic.


@njit(**JIT)
def _lamb_stage1(w, g, m, v, start, stop, segment, seg_decay, scalars, w_sumsq, u_sumsq):
    beta1, one_minus_beta1, beta2, one_minus_beta2 = scalars[0], scalars[1], scalars[2], scalars[3]
    inv_bc1, inv_bc2, eps, grad_scale = scalars[4], scalars[5], scalars[6], scalars[7]
    for c in prange(start.size):
        wd = seg_decay[segment[c]]
        acc_w = np.zeros(LANES)
        acc_u = np.zeros(LANES)
        for row in range(start[c], stop[c], LANES):
            end = min(row + LANES, stop[c])
            wr, gr, mr, vr = w[row:end], g[row:end], m[row:end], v[row:end]
            for lane in range(wr.size):
                gi = gr[lane] * grad_scale
                mi = beta1 * mr[lane] + one_minus_beta1 * gi
                vi = beta2 * vr[lane] + one_minus_beta2 * gi * gi
                mr[lane] = mi
                vr[lane] = vi
                wi = wr[lane]
                ui = (mi * inv_bc1) / (np.sqrt(vi * inv_bc2) + eps) + wd * wi
                w64 = np.float64(wi)
                u64 = np.float64(ui)
                acc_w[lane] += w64 * w64
                acc_u[lane] += u64 * u64
        w_sumsq[c] = acc_w.sum()
        u_sumsq[c] = acc_u.sum()


def lamb_stage1(w, g, m, v, start, stop, segment, seg_decay, w_sumsq, u_sumsq, *,
                beta1, beta2, inv_bc1, inv_bc2, eps, grad_scale) -> None:
    """m, v updated in place from g·grad_scale; per-chunk Σw² and Σu², u = m̂/(√v̂+ε) + wd_s·w."""
    scalars = _as_scalars(w.dtype, beta1, 1 - beta1, beta2, 1 - beta2, inv_bc1, inv_bc2, eps, grad_scale)
    _lamb_stage1(w, g, m, v, start, stop, segment, seg_decay, scalars, w_sumsq, u_sumsq)


def lamb_stage1_numpy(w, g, m, v, start, stop, segment, seg_decay, *,
                      beta1, beta2, inv_bc1, inv_bc2, eps, grad_scale):
    w_sumsq, u_sumsq = [], []
    for a, b, s in zip(start, stop, segment):
        gs = g[a:b] * grad_scale
        m[a:b] = beta1 * m[a:b] + (1 - beta1) * gs
        v[a:b] = beta2 * v[a:b] + (1 - beta2) * gs * gs
        u = (m[a:b] * inv_bc1) / (np.sqrt(v[a:b] * inv_bc2) + eps) + seg_decay[s] * w[a:b]
        w_sumsq.append(np.sum(np.square(w[a:b], dtype=np.float64)))
        u_sumsq.append(np.sum(np.square(u, dtype=np.float64)))
    return np.array(w_sumsq), np.array(u_sumsq)


@njit(**JIT)
def _lamb_stage2(w, m, v, start, stop, segment, seg_decay, seg_step, scalars):
    inv_bc1, inv_bc2, eps = scalars[0], scalars[1], scalars[2]
    for c in prange(start.size):
        s = segment[c]
        wd = seg_decay[s]
        step = seg_step[s]
        a, b = start[c], stop[c]
        wc, mc, vc = w[a:b], m[a:b], v[a:b]
        for i in range(wc.size):
            wi = wc[i]
            ui = (mc[i] * inv_bc1) / (np.sqrt(vc[i] * inv_bc2) + eps) + wd * wi
            wc[i] = wi - step * ui


def lamb_stage2(w, m, v, start, stop, segment, seg_decay, seg_step, *, inv_bc1, inv_bc2, eps) -> None:
    """w -= step_s·u with u recomputed from m, v, w; seg_step holds lr·trust per segment."""
    _lamb_stage2(w, m, v, start, stop, segment, seg_decay, seg_step, _as_scalars(w.dtype, inv_bc1, inv_bc2, eps))


def lamb_stage2_numpy(w, m, v, start, stop, segment, seg_decay, seg_step, *, inv_bc1, inv_bc2, eps) -> None:
    for a, b, s in zip(start, stop, segment):
        u = (m[a:b] * inv_bc1) / (np.sqrt(v[a:b] * inv_bc2) + eps) + seg_decay[s] * w[a:b]
        w[a:b] -= seg_step[s] * u


# -- roofline -----------------------------------------------------------------------------------


@njit(**JIT)
def _add_inplace(a, b, start, stop):
    for c in prange(start.size):
        ac, bc = a[start[c]:stop[c]], b[start[c]:stop[c]]
        for i in range(ac.size):
            ac[i] += bc[i]


def add_inplace(a, b, start, stop) -> None:
    """a += b over the same chunks: the streaming bandwidth the kernels are measured against."""
    _add_inplace(a, b, start, stop)
