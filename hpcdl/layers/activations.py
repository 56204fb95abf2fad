"""Pointwise activations: ReLU and GELU."""
from __future__ import annotations

import math

import numpy as np

from hpcdl.backend import array_module
from hpcdl.layers.base import Module


class ReLU(Module):
    """max(x, 0).

    `fused=True` means the layer before applies this ReLU itself on the
    channel-major NumPy path (Conv2d.relu, BatchNorm.relu): there this module
    passes values and gradients through untouched. Elsewhere (CuPy arrays)
    it computes as usual, and so does the layer before.
    """

    def __init__(self):
        self._y = None
        self.fused = False
        self._passed = False

    def forward(self, x):
        self._passed = self.fused and isinstance(x, np.ndarray) and x.ndim == 4
        if self._passed:
            return x
        y = array_module(x).maximum(x, 0)
        # The output alone decides the gradient (y > 0 exactly where x > 0),
        # and the next layer keeps it alive anyway, so caching it is free.
        self._y = y if self.training else None
        return y

    def backward(self, dy):
        if self._passed:
            return dy
        y, self._y = self._y, None
        return dy * (y > 0)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


class GELU(Module):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; as used by BERT and GPT-2).

    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). It differs from the
    exact x * Phi(x) by < 1e-3; the exact form needs erf, which NumPy lacks.
    """

    def __init__(self):
        self._cache = None

    def forward(self, x):
        xp = array_module(x)
        t = xp.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x ** 3))
        self._cache = (x, t) if self.training else None
        return 0.5 * x * (1.0 + t)

    def backward(self, dy):
        x, t = self._cache
        self._cache = None
        inner_grad = _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner_grad)
