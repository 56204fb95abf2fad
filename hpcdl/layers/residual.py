"""Residual connection: post(body(x) + shortcut(x)), He et al. 2016."""
from __future__ import annotations

from hpcdl.layers.base import Module


class Residual(Module):
    """A container; `shortcut=None` is the identity, `post` (often ReLU) is optional."""

    def __init__(self, body: Module, shortcut: Module | None = None, post: Module | None = None):
        self.body = body
        self.shortcut = shortcut
        self.post = post

    def forward(self, x):
        y = self.body.forward(x)
        y = y + (x if self.shortcut is None else self.shortcut.forward(x))
        return y if self.post is None else self.post.forward(y)

    def backward(self, dy):
        if self.post is not None:
            dy = self._backward_child(self.post, dy)
        # Shortcut first: its parameters come after the body's in the arena,
        # so gradients become ready in reverse arena order, as buckets expect.
        d_short = dy if self.shortcut is None else self._backward_child(self.shortcut, dy)
        d_body = self._backward_child(self.body, dy)
        return d_body + d_short
