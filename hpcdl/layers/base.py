"""The layer contract: explicit forward and backward, parameters in the arena.

A `Module` has

* `forward(x)`: computes and caches what backward needs (in training mode);
* `backward(dy)`: returns dL/dx and *adds* dL/dparam into each `Param.grad`
  (adding, not assigning, is what lets gradient accumulation and the
  arena-wide `zero_grads()` work without per-layer bookkeeping);
* parameters as `Param` attributes, children as `Module` attributes or lists
  of Modules, discovered in attribute order, which is forward order;
* buffers (running statistics) named in `buffer_names`: state that is saved
  and restored but not trained.

Containers run children's backward through `_backward_child`, which tells
the gradient-ready hook (installed by the bucketed reducer) that a leaf's
gradients are final, so its bucket can start reducing while backward goes on.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from hpcdl.arena import Param
from hpcdl.layers.memory import pool


class Module:
    buffer_names: tuple = ()
    training: bool = True
    _grad_ready_hook: Callable | None = None

    # -- computation ----------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- structure --------------------------------------------------------------
    def own_params(self) -> list[tuple[str, Param]]:
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Param)]

    def named_children(self) -> list[tuple[str, "Module"]]:
        out = []
        for key, value in vars(self).items():
            if isinstance(value, Module):
                out.append((key, value))
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                out.extend((f"{key}.{i}", v) for i, v in enumerate(value))
        return out

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Param]]:
        """All parameters in forward order, named by their path; also stamps Param.name."""
        out = []
        for key, p in self.own_params():
            p.name = f"{prefix}{key}"
            out.append((p.name, p))
        for key, child in self.named_children():
            out.extend(child.named_parameters(f"{prefix}{key}."))
        return out

    def parameters(self) -> list[Param]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> list[tuple[str, object]]:
        out = [(f"{prefix}{n}", getattr(self, n)) for n in self.buffer_names]
        for key, child in self.named_children():
            out.extend(child.named_buffers(f"{prefix}{key}."))
        return out

    def set_buffer(self, dotted: str, value) -> None:
        """Overwrite a buffer in place by its dotted name (checkpoint restore)."""
        owner = self
        *path, leaf = dotted.split(".")
        i = 0
        while i < len(path):
            part = path[i]
            value_at = getattr(owner, part)
            if isinstance(value_at, (list, tuple)):
                owner = value_at[int(path[i + 1])]
                i += 2
            else:
                owner = value_at
                i += 1
        getattr(owner, leaf)[...] = value

    # -- modes and hooks ----------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def set_grad_ready_hook(self, hook: Callable[[list[Param]], None] | None) -> None:
        """hook(params) runs once a leaf's parameter gradients are complete."""
        for m in self.modules():
            m._grad_ready_hook = hook

    def _backward_child(self, child: "Module", dy):
        dx = child.backward(dy)
        if self._grad_ready_hook is not None and not child.named_children():
            params = [p for _, p in child.own_params()]
            if params:
                self._grad_ready_hook(params)
        return dx

    def __repr__(self):
        kids = self.named_children()
        if not kids:
            return f"{type(self).__name__}()"
        inner = "\n".join(f"  ({k}): " + repr(v).replace("\n", "\n  ") for k, v in kids)
        return f"{type(self).__name__}(\n{inner}\n)"


class Sequential(Module):
    def __init__(self, *layers: Module):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for i, layer in enumerate(reversed(self.layers)):
            dx = self._backward_child(layer, dy)
            if i:
                # dy came from our own previous child and nobody else holds it:
                # back to the pool, unless dx is (a view of) it
                pool.give(dy, unless_shared_with=dx)
            dy = dx
        return dy

    def __repr__(self):
        inner = "\n".join(f"  ({i}): " + repr(v).replace("\n", "\n  ") for i, v in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


# -- initialisers: (rng, shape) -> float64 ndarray ------------------------------

def zeros(rng, shape):
    return np.zeros(shape)


def ones(rng, shape):
    return np.ones(shape)


def he_normal(fan_in: int):
    """Kaiming He et al. 2015 normal init for ReLU networks: std = sqrt(2 / fan_in)."""
    std = float(np.sqrt(2.0 / fan_in))
    return lambda rng, shape: rng.normal(0.0, std, size=shape)


def uniform_fan_in(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the classic default for Linear/Conv biases."""
    bound = float(1.0 / np.sqrt(fan_in))
    return lambda rng, shape: rng.uniform(-bound, bound, size=shape)


def normal(std: float):
    return lambda rng, shape: rng.normal(0.0, std, size=shape)
