"""Readable NumPy optimizers: the test oracle for the fused kernels.

Each optimizer is a small frozen dataclass of hyperparameters with two pure
functions in the style of optax (DeepMind): `init(params) -> state` and
`update(grads, state, params, lr) -> (params, state, stats)`. Parameters are
a list of per-tensor arrays; nothing is modified in place. Pass float64
arrays to get a float64 oracle; norms always accumulate in float64.

`adapt` and `decay` are per-tensor booleans (None means "every tensor"):
a tensor with adapt=False gets no trust ratio (trust = 1) and one with
decay=False gets no weight decay. `exclusion_masks` builds both from an
arena's segments and two rule lists (flags or name globs); the fused
optimizers use the same helper.

`stats` holds per-tensor float64 arrays (`g_norm` always; `w_norm` and
`trust` for LARS and LAMB; `u_norm` for LAMB) and `global_grad_norm`.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from hpcdl.arena import FLAGS, Segment
from hpcdl.errors import ConfigError

# Bias and normalisation parameters are the usual exclusions (MLPerf LARS
# skips 'batch_normalization' and 'bias'; BERT's LAMB skips LayerNorm and
# bias); the explicit flags let a layer opt out on its own.
DEFAULT_NO_ADAPT = ("bias", "norm", "no_adapt")
DEFAULT_NO_DECAY = ("bias", "norm", "no_decay")
_GLOB_CHARACTERS = frozenset("*?[")


def exclusion_masks(
    segments: Sequence[Segment],
    *,
    no_adapt: Iterable[str] = DEFAULT_NO_ADAPT,
    no_decay: Iterable[str] = DEFAULT_NO_DECAY,
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve exclusion rules into (adapt, decay), two bool arrays over segments.

    Each rule is either a flag from hpcdl.arena.FLAGS ("bias", "norm",
    "no_decay", "no_adapt"), which excludes the segments carrying it, or an
    fnmatch glob on segment names ("*.bias", "embed.*"). A segment matching
    any rule of `no_adapt` gets no trust ratio; any rule of `no_decay`, no
    weight decay. A plain word that is neither a flag nor a parameter name is
    a ConfigError (a typo would otherwise silently exclude nothing).
    """
    return ~_excluded(segments, no_adapt, "no_adapt"), ~_excluded(segments, no_decay, "no_decay")


def _excluded(segments: Sequence[Segment], rules: Iterable[str], key: str) -> np.ndarray:
    if isinstance(rules, str):
        raise ConfigError(f"optim.{key}: expected a list of flags or name patterns, got the string {rules!r}")
    hit = np.zeros(len(segments), dtype=bool)
    for rule in rules:
        if not isinstance(rule, str):
            raise ConfigError(f"optim.{key}: expected flags or name patterns (strings), got {rule!r}")
        if rule in FLAGS:
            matches = [rule in s.flags for s in segments]
        else:
            matches = [fnmatch.fnmatchcase(s.name, rule) for s in segments]
            if not any(matches) and not _GLOB_CHARACTERS & set(rule):
                known = sorted(FLAGS) + [s.name for s in segments]
                close = difflib.get_close_matches(rule, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"optim.{key}: {rule!r} is neither a flag ({', '.join(sorted(FLAGS))}) "
                                  f"nor a parameter name{hint}")
        hit |= np.array(matches, dtype=bool)
    return hit


def _norm(x: np.ndarray) -> float:
    # einsum rather than np.dot: no BLAS threads, so the reference stays one-threaded.
    flat = np.ravel(x).astype(np.float64, copy=False)
    return math.sqrt(float(np.einsum("i,i->", flat, flat)))


def _mask(mask, n: int) -> list[bool]:
    return [True] * n if mask is None else [bool(b) for b in mask]


def _zeros_like(params) -> list[np.ndarray]:
    return [np.zeros_like(p) for p in params]


def _grad_stats(grads) -> dict:
    g_norm = np.array([_norm(g) for g in grads])
    return {"g_norm": g_norm, "global_grad_norm": float(np.sqrt(np.sum(g_norm**2)))}


@dataclass(frozen=True)
class Sgd:
    """SGD with momentum in the PyTorch convention: v = m·v + (g + wd·w); w -= lr·v.

    Nesterov (PyTorch form): w -= lr·(g + wd·w + m·v) with v already updated.
    """

    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    decay: Sequence[bool] | None = None

    def init(self, params):
        return {"step": 0, "momentum": _zeros_like(params)}

    def update(self, grads, state, params, lr):
        decay = _mask(self.decay, len(params))
        new_w, new_v = [], []
        for w, g, v, dec in zip(params, grads, state["momentum"], decay):
            d = g + self.weight_decay * w if dec else g
            v = self.momentum * v + d
            direction = d + self.momentum * v if self.nesterov else v
            new_w.append(w - lr * direction)
            new_v.append(v)
        return new_w, {"step": state["step"] + 1, "momentum": new_v}, _grad_stats(grads)


@dataclass(frozen=True)
class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch convention:
    w ← w·(1 − lr·wd) − lr·m̂/(√v̂ + ε)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay: Sequence[bool] | None = None

    def init(self, params):
        return {"step": 0, "exp_avg": _zeros_like(params), "exp_avg_sq": _zeros_like(params)}

    def update(self, grads, state, params, lr):
        b1, b2 = self.betas
        t = state["step"] + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        decay = _mask(self.decay, len(params))
        new_w, new_m, new_v = [], [], []
        for w, g, m, v, dec in zip(params, grads, state["exp_avg"], state["exp_avg_sq"], decay):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            if dec:
                w = w * (1 - lr * self.weight_decay)
            new_w.append(w - lr * (m / bc1) / (np.sqrt(v / bc2) + self.eps))
            new_m.append(m)
            new_v.append(v)
        return new_w, {"step": t, "exp_avg": new_m, "exp_avg_sq": new_v}, _grad_stats(grads)


def _clamp(trust: float, clamp) -> float:
    return trust if clamp is None else min(max(trust, clamp[0]), clamp[1])


@dataclass(frozen=True)
class Lars:
    """LARS as in the MLPerf ResNet-50 TF2 reference (mlcommons/training, lars_optimizer.py).

    trust = η·‖w‖/(‖g‖ + wd·‖w‖ + ε) if ‖w‖ > 0 and ‖g‖ > 0 else 1;
    g ← g + wd·w;  v ← m·v − lr·trust·g (the LR lives inside the momentum);
    w ← w + v, or with Nesterov w ← w + m·v − lr·trust·g.
    Tensors with adapt=False use trust = 1; decay=False drops wd (in both places).
    ε defaults to 1e-7, what the MLPerf file gets from Keras' backend epsilon.
    """

    momentum: float = 0.9
    weight_decay: float = 1e-4
    trust_coefficient: float = 1e-3
    eps: float = 1e-7
    nesterov: bool = False
    trust_clamp: tuple[float, float] | None = None
    adapt: Sequence[bool] | None = None
    decay: Sequence[bool] | None = None

    def init(self, params):
        return {"step": 0, "momentum": _zeros_like(params)}

    def update(self, grads, state, params, lr):
        adapt, decay = _mask(self.adapt, len(params)), _mask(self.decay, len(params))
        stats = _grad_stats(grads)
        w_norms, trusts, new_w, new_v = [], [], [], []
        for w, g, v, g_norm, ada, dec in zip(params, grads, state["momentum"], stats["g_norm"], adapt, decay):
            wd = self.weight_decay if dec else 0.0
            w_norm = _norm(w)
            trust = 1.0
            if ada:
                if w_norm > 0 and g_norm > 0:
                    trust = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
                trust = _clamp(trust, self.trust_clamp)
            g = g + wd * w
            scaled_lr = lr * trust
            v = self.momentum * v - scaled_lr * g
            w = w + self.momentum * v - scaled_lr * g if self.nesterov else w + v
            new_w.append(w)
            new_v.append(v)
            w_norms.append(w_norm)
            trusts.append(trust)
        stats.update(w_norm=np.array(w_norms), trust=np.array(trusts))
        return new_w, {"step": state["step"] + 1, "momentum": new_v}, stats


@dataclass(frozen=True)
class Lamb:
    """LAMB (You et al. 2019) in two modes.

    `paper` follows TF-addons' LAMB: m, v as in Adam; bias-correct both;
    u = m̂/(√v̂ + ε) + wd·w; trust = ‖w‖/‖u‖ if both > 0 else 1; w ← w − lr·trust·u.
    `nvlamb` follows apex FusedLAMB: first scale every gradient by
    max_grad_norm/‖G‖ when the global norm ‖G‖ exceeds max_grad_norm, then as above.
    The optional trust clamp (DeepSpeed uses [0.01, 10]) is off by default.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    mode: str = "paper"
    max_grad_norm: float = 1.0
    trust_clamp: tuple[float, float] | None = None
    adapt: Sequence[bool] | None = None
    decay: Sequence[bool] | None = None

    def init(self, params):
        return {"step": 0, "exp_avg": _zeros_like(params), "exp_avg_sq": _zeros_like(params)}

    def update(self, grads, state, params, lr):
        if self.mode not in ("paper", "nvlamb"):
            raise ValueError(f"unknown LAMB mode {self.mode!r}; expected 'paper' or 'nvlamb'")
        b1, b2 = self.betas
        t = state["step"] + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        adapt, decay = _mask(self.adapt, len(params)), _mask(self.decay, len(params))
        stats = _grad_stats(grads)
        scale = 1.0
        if self.mode == "nvlamb" and stats["global_grad_norm"] > self.max_grad_norm:
            scale = self.max_grad_norm / stats["global_grad_norm"]
        w_norms, u_norms, trusts, new_w, new_m, new_v = [], [], [], [], [], []
        for w, g, m, v, ada, dec in zip(params, grads, state["exp_avg"], state["exp_avg_sq"], adapt, decay):
            g = g * scale
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            u = (m / bc1) / (np.sqrt(v / bc2) + self.eps)
            if dec:
                u = u + self.weight_decay * w
            w_norm, u_norm = _norm(w), _norm(u)
            trust = 1.0
            if ada:
                if w_norm > 0 and u_norm > 0:
                    trust = w_norm / u_norm
                trust = _clamp(trust, self.trust_clamp)
            new_w.append(w - lr * trust * u)
            new_m.append(m)
            new_v.append(v)
            w_norms.append(w_norm)
            u_norms.append(u_norm)
            trusts.append(trust)
        stats.update(w_norm=np.array(w_norms), u_norm=np.array(u_norms), trust=np.array(trusts))
        return new_w, {"step": t, "exp_avg": new_m, "exp_avg_sq": new_v}, stats
