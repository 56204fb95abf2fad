"""CuPy launchers for the fused optimizer kernels in optim_cuda.cu.

Same functions and arguments as hpcdl.kernels.optim_cpu, with CuPy arrays
(table and per-segment arrays on the device too). The module compiles on
first use, once per dtype, through cupy.RawModule (NVRTC). Importing this
file needs neither CuPy nor a GPU.
"""
from __future__ import annotations

import functools
import os

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optim_cuda.cu")
KERNELS = ("sumsq_chunks", "sumsq2_chunks", "sgd_update", "adamw_update", "lars_update",
           "lamb_stage1", "lamb_stage2", "add_inplace")
THREADS = 256
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def source() -> str:
    with open(SOURCE, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _module(ctype: str):
    import cupy

    names = [f"{k}<{ctype}>" for k in KERNELS]
    module = cupy.RawModule(code=source(), options=("--std=c++14",), name_expressions=names)
    module.compile()
    return module


def _kernel(name: str, dtype):
    dtype = np.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"fused optimizer kernels support float32 and float64, not {dtype}")
    return _module(_CTYPES[dtype]).get_function(f"{name}<{_CTYPES[dtype]}>")


def _launch(name, dtype, start, args):
    if start.size:
        _kernel(name, dtype)((int(start.size),), (THREADS,), args)


def compile_all(dtype=np.float32) -> None:
    """Compile every kernel for `dtype` now (raises what NVRTC reports)."""
    for name in KERNELS:
        _kernel(name, dtype)


def _scalars(dtype, *values):
    t = np.dtype(dtype).type
    return tuple(t(v) for v in values)


def sumsq_chunks(x, start, stop, out) -> None:
    _launch("sumsq_chunks", x.dtype, start, (x, start, stop, out))


def sumsq2_chunks(x, y, start, stop, out_x, out_y) -> None:
    _launch("sumsq2_chunks", x.dtype, start, (x, y, start, stop, out_x, out_y))


def sgd_update(w, g, v, start, stop, segment, seg_decay, *, lr, momentum, nesterov) -> None:
    _launch("sgd_update", w.dtype, start,
            (w, g, v, start, stop, segment, seg_decay, *_scalars(w.dtype, lr, momentum), np.int32(bool(nesterov))))


def adamw_update(w, g, m, v, start, stop, segment, seg_keep, *, lr, beta1, beta2, inv_bc1, inv_bc2, eps) -> None:
    scalars = _scalars(w.dtype, beta1, 1 - beta1, beta2, 1 - beta2, inv_bc1, inv_bc2, eps, lr)
    _launch("adamw_update", w.dtype, start, (w, g, m, v, start, stop, segment, seg_keep, *scalars))


def lars_update(w, g, v, start, stop, segment, seg_decay, seg_lr, *, momentum, nesterov) -> None:
    _launch("lars_update", w.dtype, start,
            (w, g, v, start, stop, segment, seg_decay, seg_lr, *_scalars(w.dtype, momentum), np.int32(bool(nesterov))))


def lamb_stage1(w, g, m, v, start, stop, segment, seg_decay, w_sumsq, u_sumsq, *,
                beta1, beta2, inv_bc1, inv_bc2, eps, grad_scale) -> None:
    scalars = _scalars(w.dtype, beta1, 1 - beta1, beta2, 1 - beta2, inv_bc1, inv_bc2, eps, grad_scale)
    _launch("lamb_stage1", w.dtype, start, (w, g, m, v, start, stop, segment, seg_decay, w_sumsq, u_sumsq, *scalars))


def lamb_stage2(w, m, v, start, stop, segment, seg_decay, seg_step, *, inv_bc1, inv_bc2, eps) -> None:
    _launch("lamb_stage2", w.dtype, start,
            (w, m, v, start, stop, segment, seg_decay, seg_step, *_scalars(w.dtype, inv_bc1, inv_bc2, eps)))


def add_inplace(a, b, start, stop) -> None:
    _launch("add_inplace", a.dtype, start, (a, b, start, stop))
