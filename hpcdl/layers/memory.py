"""Reused host memory for the channel-major layer path: one shared column workspace and a gradient pool.

Why: a fresh large NumPy array is fresh pages from the kernel, and faulting
them in (zero-filled) costs about as much as writing them once more. A
ResNet-50 step at 224x224 touches gigabytes of activations and gradients,
so allocating them anew every step costs several per cent of the step, and
per-layer im2col buffers kept alive between steps cost gigabytes of RSS.

* `workspace(count, dtype)`: one flat buffer shared by every convolution
  (im2col columns in forward, columns again and then their gradient in
  backward), grown to the largest request. Only one convolution uses it at
  a time, and nobody keeps a view of it past its own call.
* `GradientPool`: free lists of gradient buffers by size. A layer's input
  gradient is taken from it; the container that passes that gradient on to
  the previous layer gives it back once that layer's backward has returned
  (see Sequential.backward), so a step's gradients recycle a few buffers.
  Only arrays the pool handed out (tracked by weak reference) are taken back.

Forward outputs are not pooled: every one of them is kept for backward
anyway, so each layer keeps its own output buffer between steps
(`layer_buffer`).
"""
from __future__ import annotations

import weakref

import numpy as np

_workspace: dict = {}


def workspace(count: int, dtype) -> np.ndarray:
    """A flat, uninitialised array of `count` elements, shared by all callers (contents not preserved)."""
    dtype = np.dtype(dtype)
    buf = _workspace.get(dtype)
    if buf is None or buf.size < count:
        _workspace.pop(dtype, None)  # drop the old one before allocating the larger one
        buf = np.empty(int(count), dtype=dtype)
        _workspace[dtype] = buf
    return buf[:count]


def release_workspace() -> None:
    """Free the shared workspace (it is allocated again on the next convolution)."""
    _workspace.clear()


class GradientPool:
    def __init__(self):
        self._free: dict = {}                       # (nbytes, dtype) -> [flat arrays]
        self._lent: dict = {}                       # id(view) -> (weakref(view), flat array)

    def take(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        stack = self._free.get((count, dtype))
        flat = stack.pop() if stack else np.empty(count, dtype=dtype)
        view = flat.reshape(shape)
        key = id(view)
        lent = self._lent

        def forget(ref, key=key):
            # a lent array nobody gave back died: drop the entry, and with it the buffer
            if key in lent and lent[key][0] is ref:
                del lent[key]

        lent[key] = (weakref.ref(view, forget), flat)
        return view

    def give(self, array, unless_shared_with=None) -> None:
        """Take back `array` if this pool lent it, unless it overlaps `unless_shared_with` (an alias of it)."""
        if array is None:
            return
        entry = self._lent.get(id(array))
        if entry is None or entry[0]() is not array:
            return
        if unless_shared_with is not None and np.may_share_memory(array, unless_shared_with):
            return
        del self._lent[id(array)]
        flat = entry[1]
        self._free.setdefault((flat.size, flat.dtype), []).append(flat)

    def clear(self) -> None:
        self._free.clear()
        self._lent.clear()

    def held_bytes(self) -> int:
        return sum(a.nbytes for stack in self._free.values() for a in stack)


pool = GradientPool()


def layer_buffer(owner, slot: str, shape, dtype) -> np.ndarray:
    """The array `owner.<slot>` reused across steps while shape and dtype stay the same (training mode)."""
    buf = getattr(owner, slot, None)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        setattr(owner, slot, None)
        buf = np.empty(shape, dtype=dtype)
        setattr(owner, slot, buf)
    return buf
