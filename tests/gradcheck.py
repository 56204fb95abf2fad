"""Central-difference gradient checks for layers whose parameters live in a real Arena.

The scalar under test is L = sum(forward(x) * R) for a fixed random R, so
backward(R) must return dL/dx and leave dL/dparams in the arena's gradient
buffer. Everything runs in float64.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from hpcdl.arena import Arena


def rel_error(a, b) -> float:
    """||a - b|| / (||a|| + ||b||), with 0 when both are zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / max(denom, 1e-300))


def numeric_grad(f: Callable[[], float], array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f / d array by central differences, perturbing `array` in place (it may be an arena view)."""
    flat = array.reshape(-1)
    assert np.shares_memory(flat, array), "array must be contiguous so perturbations reach the module"
    grad = np.zeros(flat.size)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = f()
        flat[i] = saved - eps
        down = f()
        flat[i] = saved
        grad[i] = (up - down) / (2 * eps)
    return grad.reshape(array.shape)


def arena_for(module, seed: int = 0, jitter: float = 0.1) -> Arena:
    """A float64 Arena bound to `module`'s parameters, with every value jittered.

    Jitter moves zero-initialised tensors (biases, beta) off zero so their
    gradient paths are exercised with non-trivial values.
    """
    params = [p for _, p in module.named_parameters()]
    arena = Arena(params, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for seg in arena.segments:
        arena.params[seg.offset:seg.end] += jitter * rng.standard_normal(seg.size)
    return arena


def check_module(module, x, *, seed: int = 0, check_input: bool = True,
                 before_forward: Callable[[], None] | None = None, eps: float = 1e-6) -> dict[str, float]:
    """Relative errors of analytic vs numeric gradients: key "input" and one key per parameter."""
    arena = arena_for(module, seed)
    module.train()
    prepare = before_forward or (lambda: None)
    prepare()
    y = module.forward(x)
    r = np.random.default_rng(seed + 2).standard_normal(y.shape)

    def loss() -> float:
        prepare()
        return float(np.sum(module.forward(x) * r))

    arena.zero_grads()
    prepare()
    module.forward(x)
    dx = module.backward(r.copy())
    analytic = {seg.name: arena.grads[seg.offset:seg.end].copy() for seg in arena.segments}

    errors = {}
    if check_input:
        errors["input"] = rel_error(dx, numeric_grad(loss, x, eps))
    for seg in arena.segments:
        numeric = numeric_grad(loss, arena.params[seg.offset:seg.end], eps)
        errors[seg.name] = rel_error(analytic[seg.name], numeric)
    return errors
