"""Fully connected layer: y = x W^T + b over the last axis."""
from __future__ import annotations

from hpcdl.arena import Initializer, Param
from hpcdl.layers.base import Module, he_normal, zeros

BIAS_FLAGS = ("bias", "no_decay", "no_adapt")


class Linear(Module):
    """`weight` is (out, in) as in PyTorch, so shapes and parameter counts compare directly.

    Accepts any number of leading axes: (N, in) for classifiers, (N, T, in)
    for token sequences. The default weight initialiser is He-normal, which
    suits the ReLU networks this package trains; pass `weight_init` for
    others (transformers use a small normal). `input_grad=False` skips
    dL/dx (backward returns None), for a network's first layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_init: Initializer | None = None, bias_init: Initializer = zeros, input_grad: bool = True):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Param((out_features, in_features), weight_init or he_normal(in_features))
        if bias:
            self.bias = Param((out_features,), bias_init, flags=BIAS_FLAGS)
        self.has_bias = bias
        self.input_grad = input_grad
        self._x = None

    def forward(self, x):
        y = x @ self.weight.data.T
        if self.has_bias:
            y += self.bias.data
        self._x = x if self.training else None
        return y

    def backward(self, dy):
        x = self._x
        dy2 = dy.reshape(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        self.weight.grad += dy2.T @ x2
        if self.has_bias:
            self.bias.grad += dy2.sum(axis=0)
        self._x = None
        return dy @ self.weight.data if self.input_grad else None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.has_bias})"
