"""Residual connection: post(body(x) + shortcut(x)), He et al. 2016."""
from __future__ import annotations

import numpy as np

from hpcdl.layers import memory
from hpcdl.layers.activations import ReLU
from hpcdl.layers.base import Module, Sequential


def _last_leaf(module: Module) -> Module:
    while isinstance(module, Sequential) and module.layers:
        module = module.layers[-1]
    return module


class Residual(Module):
    """A container; `shortcut=None` is the identity, `post` (often ReLU) is optional.

    `channel_major=True` (NumPy arrays): the sum and a ReLU `post` are one
    parallel pass, written over the body's output when the body ends in a
    layer whose backward does not read its own output (a BatchNorm or Conv2d
    without a fused ReLU), which saves one activation per block; backward
    masks dy once and hands the same masked gradient to both branches.
    """

    def __init__(self, body: Module, shortcut: Module | None = None, post: Module | None = None):
        self.body = body
        self.shortcut = shortcut
        self.post = post
        self.channel_major = False
        self._cm_y = None
        self._out = None

    def _fast(self, x) -> bool:
        return (self.channel_major and isinstance(x, np.ndarray) and x.flags.c_contiguous
                and (self.post is None or isinstance(self.post, ReLU)))

    def forward(self, x):
        if self._fast(x):
            return self._forward_cm(x)
        self._cm_y = None
        y = self.body.forward(x)
        y = y + (x if self.shortcut is None else self.shortcut.forward(x))
        return y if self.post is None else self.post.forward(y)

    def _forward_cm(self, x):
        from hpcdl.kernels import layers_cpu
        from hpcdl.layers.conv import Conv2d
        from hpcdl.layers.normalization import BatchNorm

        yb = self.body.forward(x)
        ys = x if self.shortcut is None else self.shortcut.forward(x)
        if yb.shape != ys.shape:
            raise ValueError(f"Residual: body output {yb.shape} and shortcut output {ys.shape} differ")
        last = _last_leaf(self.body)
        in_place = (self.training and isinstance(last, (BatchNorm, Conv2d)) and not last.relu
                    and yb is last._out and yb.flags.c_contiguous and ys.flags.c_contiguous)
        if in_place:
            out = yb
        elif self.training:
            out = memory.layer_buffer(self, "_out", yb.shape, yb.dtype)
        else:
            out = np.empty_like(yb)
        relu = self.post is not None
        layers_cpu.add_relu(np.ascontiguousarray(yb), np.ascontiguousarray(ys), out, relu)
        self._cm_y = (out, relu) if self.training else None
        return out

    def backward(self, dy):
        if self._cm_y is not None:
            return self._backward_cm(dy)
        if self.post is not None:
            dy = self._backward_child(self.post, dy)
        # Shortcut first: its parameters come after the body's in the arena,
        # so gradients become ready in reverse arena order, as buckets expect.
        d_short = dy if self.shortcut is None else self._backward_child(self.shortcut, dy)
        d_body = self._backward_child(self.body, dy)
        return d_body + d_short

    def _backward_cm(self, dy):
        from hpcdl.kernels import layers_cpu

        y, relu = self._cm_y
        self._cm_y = None
        if relu:
            d = memory.pool.take(dy.shape, dy.dtype)
            layers_cpu.relu_mask(dy.reshape(dy.shape[0], -1), y.reshape(y.shape[0], -1), d.reshape(d.shape[0], -1))
        else:
            d = dy
        d_short = d if self.shortcut is None else self._backward_child(self.shortcut, d)
        d_body = self._backward_child(self.body, d)
        if np.may_share_memory(d_body, d_short) or not d_body.flags.c_contiguous or not d_short.flags.c_contiguous:
            total = d_body + d_short
        else:
            total = d_body
            layers_cpu.add_relu(d_body, d_short, total, False)
        if self.shortcut is not None:
            memory.pool.give(d_short, unless_shared_with=total)
        if relu:
            memory.pool.give(d, unless_shared_with=total)
        return total
