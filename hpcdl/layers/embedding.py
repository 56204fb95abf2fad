"""Embedding tables: token lookup, learned positions, and ViT's class token."""
from __future__ import annotations

from hpcdl.arena import Initializer, Param
from hpcdl.backend import array_module
from hpcdl.layers.base import Module, normal


class Embedding(Module):
    """Integer indices (any shape) -> rows of `weight` (num, dim). No input gradient (returns None).

    Default init is N(0, 0.02^2), as in BERT and GPT-2.
    """

    def __init__(self, num: int, dim: int, weight_init: Initializer | None = None, flags=()):
        self.num, self.dim = int(num), int(dim)
        self.weight = Param((num, dim), weight_init or normal(0.02), flags=flags)
        self._indices = None

    def forward(self, indices):
        self._indices = indices if self.training else None
        return self.weight.data[indices]

    def backward(self, dy):
        xp = array_module(dy)
        flat = self._indices.reshape(-1)
        self._indices = None
        # Repeated indices must accumulate, which fancy-index += would not do.
        xp.add.at(self.weight.grad, flat, dy.reshape(-1, self.dim))
        return None

    def __repr__(self):
        return f"Embedding({self.num}, {self.dim})"


class PositionalEmbedding(Module):
    """(N, T, D) -> x + P[:T], with P a learned Embedding of positions 0..T-1."""

    def __init__(self, num_positions: int, dim: int, flags=()):
        self.table = Embedding(num_positions, dim, flags=flags)

    def forward(self, x):
        xp = array_module(x)
        tokens = x.shape[1]
        if tokens > self.table.num:
            raise ValueError(f"sequence of {tokens} tokens exceeds the {self.table.num} learned positions")
        return x + self.table.forward(xp.arange(tokens))[None]

    def backward(self, dy):
        self._backward_child(self.table, dy.sum(axis=0))
        return dy


class ClassToken(Module):
    """(N, T, D) -> (N, 1 + T, D): a learned token in front of every sequence (BERT's [CLS], ViT's class token).

    Init N(0, 0.02^2) as the positions. Pair with `ClassTokenPool`, which
    reads the classifier's features off that token after the encoder.
    """

    def __init__(self, dim: int, flags=()):
        self.dim = int(dim)
        self.token = Param((1, 1, dim), normal(0.02), flags=flags)

    def forward(self, x):
        xp = array_module(x)
        n, t, d = x.shape
        out = xp.empty((n, t + 1, d), dtype=x.dtype)
        out[:, :1] = self.token.data
        out[:, 1:] = x
        return out

    def backward(self, dy):
        self.token.grad += dy[:, :1].sum(axis=0, keepdims=True)
        return dy[:, 1:]

    def __repr__(self):
        return f"ClassToken({self.dim})"


class ClassTokenPool(Module):
    """(N, T, D) -> (N, D): token 0 alone; the other tokens get a zero gradient."""

    def __init__(self):
        self._shape = None

    def forward(self, x):
        self._shape = x.shape
        return x[:, 0]

    def backward(self, dy):
        xp = array_module(dy)
        dx = xp.zeros(self._shape, dtype=dy.dtype)
        dx[:, 0] = dy
        return dx

    def __repr__(self):
        return "ClassTokenPool()"
