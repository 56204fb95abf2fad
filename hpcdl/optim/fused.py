"""Fused optimizers over the arena: one kernel launch per stage for all layers.

`create(name, arena, **hyper)` returns an `Optimizer` that updates
`arena.params` in place from `arena.grads`, with the Numba kernels
(hpcdl.kernels.optim_cpu) for NumPy arenas and the CuPy RawModule
(hpcdl.kernels.optim_gpu) for CuPy arenas. The numerics are those of
hpcdl.optim.reference, which the tests hold these to.

Step protocol. `step(lr)` first computes per-segment gradient norms (the
pass every algorithm needs anyway). If the global gradient norm is not
finite it leaves parameters and state untouched and returns False, so the
trainer can skip the step (and, say, lower a loss scale); otherwise it
applies the update and returns True. Either way `last_stats` and
`global_grad_norm` describe the gradients it saw.

Passes over memory per step, N = parameter count (the benchmark prints these):

    sgd, nesterov  ‖g‖ (read g) + update (read w g v, write w v)      6N
    adamw          ‖g‖ + update (read w g m v, write w m v)            8N
    lars           ‖w‖,‖g‖ (read w g) + update (read w g v, write w v) 7N
    lamb           ‖g‖ + stage 1 (read w g m v, write m v; Σw², Σu²)
                   + stage 2 (read w m v, write w)                    11N

apex's FusedLAMB moves 13N for LAMB: it stores the update u (into the
gradient buffer) and reads it twice more, for ‖u‖ and for the apply.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np

from hpcdl.arena import Arena
from hpcdl.errors import ConfigError, UserError
from hpcdl.optim import reference
from hpcdl.optim.reference import DEFAULT_NO_ADAPT, DEFAULT_NO_DECAY, exclusion_masks

NAMES = ("sgd", "nesterov", "adamw", "lars", "lamb")
LAMB_MODES = ("paper", "nvlamb")

# Elements per chunk. Host: 32K gives ~800 prange iterations at 25M
# parameters (plenty for any core count) while the per-chunk cost (slices,
# 64 float64 partial sums) stays negligible. GPU: one 256-thread block per
# 16K elements, 64 per thread, ~1500 blocks at 25M to fill an H100's SMs.
CPU_CHUNK = 32 * 1024
GPU_CHUNK = 16 * 1024

# Exclusion rules (flags or name globs, see reference.exclusion_masks); every optimizer takes both.
_EXCLUSIONS = {"no_adapt": DEFAULT_NO_ADAPT, "no_decay": DEFAULT_NO_DECAY}
DEFAULTS = {
    "sgd": {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False, **_EXCLUSIONS},
    "nesterov": {"momentum": 0.9, "weight_decay": 0.0, "nesterov": True, **_EXCLUSIONS},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, **_EXCLUSIONS},
    "lars": {"momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 1e-3, "eps": 1e-7,
             "nesterov": False, "trust_clamp": None, **_EXCLUSIONS},
    "lamb": {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "mode": "paper",
             "max_grad_norm": 1.0, "trust_clamp": None, **_EXCLUSIONS},
}


@dataclass(frozen=True)
class ChunkTable:
    """Fixed-size chunks of the segments, in segment order (apex's multi-tensor chunking).

    Chunk c covers elements start[c]:stop[c] of segment segment[c]; segment s
    owns chunks first_chunk[s]:first_chunk[s+1]. A segment of size 0 still
    gets one (empty) chunk so that np.add.reduceat sees every segment.
    Padding between segments belongs to no chunk and is never touched.
    """

    start: np.ndarray
    stop: np.ndarray
    segment: np.ndarray
    first_chunk: np.ndarray

    @classmethod
    def build(cls, offsets: np.ndarray, sizes: np.ndarray, chunk: int) -> "ChunkTable":
        counts = np.maximum(1, -(-sizes // chunk))
        segment = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
        first_chunk = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        index_in_segment = np.arange(segment.size, dtype=np.int64) - first_chunk[segment]
        start = offsets[:-1][segment] + index_in_segment * chunk
        stop = np.minimum(start + chunk, offsets[:-1][segment] + sizes[segment])
        return cls(start.astype(np.int64), stop.astype(np.int64), segment, first_chunk)

    def per_segment(self, chunk_sums: np.ndarray) -> np.ndarray:
        if not self.first_chunk.size:
            return np.zeros(0)
        return np.add.reduceat(chunk_sums, self.first_chunk)


class Optimizer:
    """A fused optimizer bound to one arena. Build it with `create`.

    After each `step`, `last_stats` holds per-segment float64 arrays: `g_norm`
    (all), `w_norm` and `trust` (lars, lamb; trust is 1 where excluded or
    where a norm is 0), `u_norm` (lamb), plus the float `global_grad_norm`
    (before any nvlamb clipping).
    """

    name = ""
    state_names: tuple[str, ...] = ()
    passes = 0  # full-array streams per step (reads + writes), see the module docstring

    def __init__(self, arena: Arena, hyper: dict, *, chunk: int | None = None):
        self.arena = arena
        self.hyper = dict(hyper)
        self.adapt, self.decay = exclusion_masks(arena.segments, no_adapt=hyper["no_adapt"], no_decay=hyper["no_decay"])
        self.xp = arena.xp
        self.on_device = self.xp is not np
        if self.on_device:
            from hpcdl.kernels import optim_gpu as kernels
        else:
            from hpcdl.kernels import optim_cpu as kernels
        self.kernels = kernels
        chunk = chunk or (GPU_CHUNK if self.on_device else CPU_CHUNK)
        if int(chunk) < 1:
            raise ValueError(f"chunk must be a positive number of elements, got {chunk}")
        self.table = ChunkTable.build(arena.offsets(), arena.sizes(), int(chunk))
        # The kernels' copy of the table (device arrays on the GPU).
        self._start, self._stop, self._segment = (
            self.xp.asarray(a) for a in (self.table.start, self.table.stop, self.table.segment))
        n_chunks = self.table.start.size
        self._partials = [self.xp.zeros(n_chunks, dtype=np.float64) for _ in range(2)]
        self.state = {k: self.xp.zeros(arena.total, dtype=arena.dtype) for k in self.state_names}
        self.steps = 0
        self.last_stats: dict = {}
        self.global_grad_norm = float("nan")

    # -- helpers ---------------------------------------------------------------
    def _per_segment(self, partials) -> np.ndarray:
        host = partials.get() if self.on_device else partials
        return self.table.per_segment(host)

    def _segment_values(self, values: np.ndarray):
        """Per-segment scalars in the arena dtype, where the kernels can read them."""
        return self.xp.asarray(np.asarray(values, dtype=self.arena.dtype))

    def _grad_sumsq(self) -> np.ndarray:
        self.kernels.sumsq_chunks(self.arena.grads, self._start, self._stop, self._partials[0])
        return self._per_segment(self._partials[0])

    def _seg_decay(self) -> np.ndarray:
        return np.where(self.decay, self.hyper["weight_decay"], 0.0)

    # -- public ---------------------------------------------------------------
    def grad_norm(self) -> float:
        """Global L2 norm of arena.grads (one read of the gradients, float64 sums)."""
        return math.sqrt(float(np.sum(self._grad_sumsq())))

    def step(self, lr: float) -> bool:
        """Apply one update at learning rate `lr`; False (nothing changed) if gradients are not finite."""
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
        applied = self._step(lr)
        self.global_grad_norm = self.last_stats["global_grad_norm"]
        if applied:
            self.steps += 1
        return applied

    def _step(self, lr: float) -> bool:
        raise NotImplementedError

    @staticmethod
    def _grad_stats(g_sumsq: np.ndarray) -> dict:
        return {"g_norm": np.sqrt(g_sumsq), "global_grad_norm": math.sqrt(float(np.sum(g_sumsq)))}

    def state_dict(self) -> dict:
        """Flat state buffers (host copies, arena layout) and the step count."""
        out: dict = {"step": self.steps}
        for k, buf in self.state.items():
            out[k] = buf.get() if self.on_device else buf.copy()
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("step", *self.state_names) if k not in state]
        if missing:
            raise UserError(f"optimizer state for {self.name!r} lacks {missing[0]!r} (has {sorted(state)})")
        for k in self.state_names:
            value = np.asarray(state[k])
            if value.shape != (self.arena.total,):
                raise UserError(f"optimizer state {k!r} has shape {value.shape}, expected ({self.arena.total},): "
                                "was it saved for another model?")
        for k in self.state_names:
            self.state[k][...] = self.xp.asarray(np.asarray(state[k], dtype=self.arena.dtype))
        self.steps = int(state["step"])

    def to_reference(self):
        """The hpcdl.optim.reference optimizer with the same settings and masks."""
        raise NotImplementedError

    @staticmethod
    def _mask_tuple(mask: np.ndarray) -> tuple[bool, ...]:
        return tuple(bool(x) for x in mask)

    def __repr__(self):
        shown = {k: v for k, v in self.hyper.items() if k not in _EXCLUSIONS}
        excluded = f"{int((~self.adapt).sum())} no-adapt / {int((~self.decay).sum())} no-decay segments"
        return f"{type(self).__name__}({self.name}, {shown}, {excluded})"


class Sgd(Optimizer):
    name = "sgd"
    state_names = ("momentum",)
    passes = 6

    def _step(self, lr):
        g_sumsq = self._grad_sumsq()
        self.last_stats = self._grad_stats(g_sumsq)
        if not math.isfinite(self.last_stats["global_grad_norm"]):
            return False
        h = self.hyper
        self.kernels.sgd_update(self.arena.params, self.arena.grads, self.state["momentum"],
                                self._start, self._stop, self._segment, self._segment_values(self._seg_decay()),
                                lr=lr, momentum=h["momentum"], nesterov=h["nesterov"])
        return True

    def to_reference(self):
        h = self.hyper
        return reference.Sgd(momentum=h["momentum"], weight_decay=h["weight_decay"], nesterov=h["nesterov"],
                             decay=self._mask_tuple(self.decay))


class AdamW(Optimizer):
    name = "adamw"
    state_names = ("exp_avg", "exp_avg_sq")
    passes = 8

    def _step(self, lr):
        g_sumsq = self._grad_sumsq()
        self.last_stats = self._grad_stats(g_sumsq)
        if not math.isfinite(self.last_stats["global_grad_norm"]):
            return False
        (b1, b2), t = self.hyper["betas"], self.steps + 1
        keep = 1.0 - lr * self._seg_decay()
        self.kernels.adamw_update(self.arena.params, self.arena.grads, self.state["exp_avg"], self.state["exp_avg_sq"],
                                  self._start, self._stop, self._segment, self._segment_values(keep),
                                  lr=lr, beta1=b1, beta2=b2, inv_bc1=1 / (1 - b1**t), inv_bc2=1 / (1 - b2**t),
                                  eps=self.hyper["eps"])
        return True

    def to_reference(self):
        h = self.hyper
        return reference.AdamW(betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"],
                               decay=self._mask_tuple(self.decay))


def _clamped(trust: np.ndarray, adapt: np.ndarray, clamp) -> np.ndarray:
    if clamp is None:
        return trust
    return np.where(adapt, np.clip(trust, clamp[0], clamp[1]), trust)


class Lars(Optimizer):
    name = "lars"
    state_names = ("momentum",)
    passes = 7

    def _step(self, lr):
        k, h = self.kernels, self.hyper
        k.sumsq2_chunks(self.arena.params, self.arena.grads, self._start, self._stop, *self._partials)
        w_sumsq, g_sumsq = (self._per_segment(p) for p in self._partials)
        stats = self._grad_stats(g_sumsq)
        w_norm, g_norm = np.sqrt(w_sumsq), stats["g_norm"]
        seg_decay = self._seg_decay()
        usable = self.adapt & (w_norm > 0) & (g_norm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = h["trust_coefficient"] * w_norm / (g_norm + seg_decay * w_norm + h["eps"])
        trust = _clamped(np.where(usable, ratio, 1.0), self.adapt, h["trust_clamp"])
        self.last_stats = {**stats, "w_norm": w_norm, "trust": trust}
        if not math.isfinite(stats["global_grad_norm"]):
            return False
        k.lars_update(self.arena.params, self.arena.grads, self.state["momentum"],
                      self._start, self._stop, self._segment,
                      self._segment_values(seg_decay), self._segment_values(lr * trust),
                      momentum=h["momentum"], nesterov=h["nesterov"])
        return True

    def to_reference(self):
        h = self.hyper
        return reference.Lars(momentum=h["momentum"], weight_decay=h["weight_decay"],
                              trust_coefficient=h["trust_coefficient"], eps=h["eps"], nesterov=h["nesterov"],
                              trust_clamp=h["trust_clamp"],
                              adapt=self._mask_tuple(self.adapt), decay=self._mask_tuple(self.decay))


class Lamb(Optimizer):
    name = "lamb"
    state_names = ("exp_avg", "exp_avg_sq")
    passes = 11

    def _step(self, lr):
        k, h = self.kernels, self.hyper
        g_sumsq = self._grad_sumsq()
        stats = self._grad_stats(g_sumsq)
        global_norm = stats["global_grad_norm"]
        if not math.isfinite(global_norm):
            self.last_stats = stats
            return False
        grad_scale = 1.0
        if h["mode"] == "nvlamb" and global_norm > h["max_grad_norm"]:
            grad_scale = h["max_grad_norm"] / global_norm
        (b1, b2), t = h["betas"], self.steps + 1
        bias = dict(inv_bc1=1 / (1 - b1**t), inv_bc2=1 / (1 - b2**t), eps=h["eps"])
        seg_decay = self._segment_values(self._seg_decay())
        w, m, v = self.arena.params, self.state["exp_avg"], self.state["exp_avg_sq"]
        k.lamb_stage1(w, self.arena.grads, m, v, self._start, self._stop, self._segment, seg_decay,
                      *self._partials, beta1=b1, beta2=b2, grad_scale=grad_scale, **bias)
        w_norm, u_norm = (np.sqrt(self._per_segment(p)) for p in self._partials)
        usable = self.adapt & (w_norm > 0) & (u_norm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            trust = _clamped(np.where(usable, w_norm / u_norm, 1.0), self.adapt, h["trust_clamp"])
        k.lamb_stage2(w, m, v, self._start, self._stop, self._segment, seg_decay,
                      self._segment_values(lr * trust), **bias)
        self.last_stats = {**stats, "w_norm": w_norm, "u_norm": u_norm, "trust": trust}
        return True

    def to_reference(self):
        h = self.hyper
        return reference.Lamb(betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"], mode=h["mode"],
                              max_grad_norm=h["max_grad_norm"], trust_clamp=h["trust_clamp"],
                              adapt=self._mask_tuple(self.adapt), decay=self._mask_tuple(self.decay))


_CLASSES = {"sgd": Sgd, "nesterov": Sgd, "adamw": AdamW, "lars": Lars, "lamb": Lamb}


# -- construction and validation ------------------------------------------------------------


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _number(key: str, value, *, low: float, high: float = math.inf, low_open=False, high_open=False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"optim.{key}: expected a number, got {value!r}") from None
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if not math.isfinite(x) or too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"optim.{key} = {value!r} is outside {lo}{low}, {high}{hi}")
    return x


def _validated(name: str, hyper: dict) -> dict:
    h = dict(hyper)
    checks = {
        "momentum": dict(low=0.0, high=1.0, high_open=True),
        "weight_decay": dict(low=0.0),
        "trust_coefficient": dict(low=0.0, low_open=True),
        "max_grad_norm": dict(low=0.0, low_open=True),
        "eps": dict(low=0.0, low_open=name != "lars"),
    }
    for key, bounds in checks.items():
        if key in h:
            h[key] = _number(key, h[key], **bounds)
    if "betas" in h:
        betas = h["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers [beta1, beta2], got {betas!r}")
        h["betas"] = tuple(_number("betas", b, low=0.0, high=1.0, high_open=True) for b in betas)
    if "nesterov" in h and not isinstance(h["nesterov"], (bool, np.bool_)):
        raise ConfigError(f"optim.nesterov: expected true or false, got {h['nesterov']!r}")
    if h.get("trust_clamp") is not None:
        clamp = h["trust_clamp"]
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ConfigError(f"optim.trust_clamp: expected [low, high] or none, got {clamp!r}")
        lo, hi = (_number("trust_clamp", c, low=0.0, low_open=True) for c in clamp)
        if lo > hi:
            raise ConfigError(f"optim.trust_clamp: low {lo} is above high {hi}")
        h["trust_clamp"] = (lo, hi)
    if "mode" in h and h["mode"] not in LAMB_MODES:
        raise ConfigError(f"optim.mode: unknown LAMB mode {h['mode']!r}; expected one of {list(LAMB_MODES)}"
                          + _did_you_mean(h["mode"], LAMB_MODES))
    for key in _EXCLUSIONS:
        if not isinstance(h[key], str):  # exclusion_masks reports a bare string
            h[key] = tuple(h[key])
    return h


def create(name: str, arena: Arena, *, chunk: int | None = None, **hyper) -> Optimizer:
    """A fused optimizer by name (one of NAMES); `hyper` overrides DEFAULTS[name].

    `chunk` overrides the elements per chunk (tests use it to get many chunks
    per segment on small arenas).
    """
    if name not in DEFAULTS:
        raise ConfigError(f"optim.name: unknown optimizer {name!r}; known: {', '.join(NAMES)}"
                          + _did_you_mean(name, NAMES))
    settings = dict(DEFAULTS[name])
    for key, value in hyper.items():
        if key not in settings:
            raise ConfigError(f"optim.{key}: not a setting of {name!r} (settings: {', '.join(sorted(settings))})"
                              + _did_you_mean(key, settings))
        settings[key] = value
    optimizer = _CLASSES[name](arena, _validated(name, settings), chunk=chunk)
    optimizer.name = name
    return optimizer
