"""Multi-head scaled dot-product self-attention (Vaswani et al. 2017)."""
from __future__ import annotations

import math

from hpcdl.backend import array_module
from hpcdl.layers.base import Module, normal
from hpcdl.layers.linear import Linear


class MultiHeadSelfAttention(Module):
    """(N, T, D) -> (N, T, D). One fused Linear makes Q, K and V; a second projects the heads back.

    `causal=True` lets position t attend only to positions <= t.
    Attention probabilities are materialised (N, H, T, T): fine for the short
    sequences this package trains, not a FlashAttention substitute.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False):
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.causal = int(dim), int(heads), bool(causal)
        self.head_dim = dim // heads
        init = normal(1.0 / math.sqrt(dim))
        self.qkv = Linear(dim, 3 * dim, weight_init=init)
        self.proj = Linear(dim, dim, weight_init=init)
        self._cache = None

    def forward(self, x):
        xp = array_module(x)
        n, t, d = x.shape
        qkv = self.qkv.forward(x).reshape(n, t, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                            # (N, H, T, dh) each
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = (q @ k.transpose(0, 1, 3, 2)) * scale               # (N, H, T, T)
        if self.causal:
            scores += xp.triu(xp.full((t, t), -xp.inf, dtype=scores.dtype), k=1)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = xp.exp(scores, out=scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
        self._cache = (q, k, v, probs, scale) if self.training else None
        return self.proj.forward(context)

    def backward(self, dy):
        q, k, v, probs, scale = self._cache
        self._cache = None
        n, h, t, dh = q.shape
        d_context = self._backward_child(self.proj, dy).reshape(n, t, h, dh).transpose(0, 2, 1, 3)
        d_probs = d_context @ v.transpose(0, 1, 3, 2)
        dv = probs.transpose(0, 1, 3, 2) @ d_context
        # softmax backward: dS = P * (dP - rowsum(dP * P))
        d_scores = d_probs
        d_scores -= (d_probs * probs).sum(axis=-1, keepdims=True)
        d_scores *= probs
        d_scores *= scale
        dq = d_scores @ k
        dk = d_scores.transpose(0, 1, 3, 2) @ q
        xp = array_module(dy)
        d_qkv = xp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(n, t, 3 * h * dh)
        return self._backward_child(self.qkv, d_qkv)

    def __repr__(self):
        return f"MultiHeadSelfAttention(dim={self.dim}, heads={self.heads}, causal={self.causal})"
