"""One flat buffer for all parameters, one for all gradients.

Layers declare `Param`s (shape, initialiser, flags) but never allocate them.
`Arena(params)` lays the declared tensors out one after another in forward
order, allocates `arena.params` and `arena.grads` once, and rebinds every
`Param.data` / `Param.grad` to a view into them. That is what makes the rest
of the data path simple:

* one allreduce (or a few buckets) covers every gradient;
* one fused optimizer kernel walks every layer through the segment table;
* a checkpoint is one dataset.

Segments start on 64-byte boundaries (16 float32) so that vector loads and
CUDA blocks never straddle two layers. The padding holds zeros in both
buffers; reducing or updating it is harmless.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

# What a segment may be marked with. Optimizers read `no_decay` and
# `no_adapt`; `bias` and `norm` describe what the tensor is so exclusion
# rules ("skip biases and batch-norm parameters") can be written by kind.
FLAGS = frozenset({"bias", "norm", "no_decay", "no_adapt"})
ALIGN_ELEMENTS = 16

Initializer = Callable[[np.random.Generator, tuple], np.ndarray]


class Param:
    """A trainable tensor declared by a layer. Storage arrives when an Arena binds it."""

    __slots__ = ("shape", "init", "flags", "name", "data", "grad")

    def __init__(self, shape: Sequence[int], init: Initializer, flags: Iterable[str] = ()):
        self.shape = tuple(int(d) for d in shape)
        self.init = init
        self.flags = frozenset(flags)
        unknown = self.flags - FLAGS
        if unknown:
            raise ValueError(f"unknown parameter flags {sorted(unknown)}; known: {sorted(FLAGS)}")
        self.name = ""
        self.data = None
        self.grad = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __repr__(self):
        return f"Param({self.name or '?'}, shape={self.shape}, flags={sorted(self.flags)})"


@dataclass(frozen=True)
class Segment:
    name: str
    offset: int
    size: int
    shape: tuple
    flags: frozenset

    @property
    def end(self) -> int:
        return self.offset + self.size


def _aligned(n: int) -> int:
    return -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


class Arena:
    """Flat parameter and gradient storage for a list of named Params.

    `params` must already carry unique names (see `Module.named_parameters`).
    Initial values come from each Param's initialiser, drawn from one
    generator seeded with `seed`, in segment order, so every rank builds the
    same weights without communication.
    """

    def __init__(self, params: Sequence[Param], *, dtype=np.float32, xp=np, seed: int = 0):
        names = [p.name for p in params]
        if any(not n for n in names):
            raise ValueError("every Param needs a name before it enters an Arena")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate parameter names: {duplicates}")

        segments, offset = [], 0
        for p in params:
            segments.append(Segment(p.name, offset, p.size, p.shape, p.flags))
            offset = _aligned(offset + p.size)
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.total = offset
        self.dtype = np.dtype(dtype)
        self.xp = xp
        self.params = xp.zeros(self.total, dtype=self.dtype)
        self.grads = xp.zeros(self.total, dtype=self.dtype)
        self._by_name = {s.name: s for s in self.segments}
        self._bound = list(params)

        rng = np.random.default_rng(seed)
        for p, seg in zip(params, self.segments):
            value = np.asarray(p.init(rng, p.shape), dtype=self.dtype)
            if value.shape != p.shape:
                raise ValueError(f"initialiser of {p.name} returned shape {value.shape}, expected {p.shape}")
            self.view(seg.name)[...] = xp.asarray(value)
        self._bind()

    def _bind(self):
        for p in self._bound:
            p.data = self.view(p.name)
            p.grad = self.grad_view(p.name)

    # -- views -------------------------------------------------------------
    def segment(self, name: str) -> Segment:
        return self._by_name[name]

    def view(self, name: str):
        seg = self._by_name[name]
        return self.params[seg.offset:seg.end].reshape(seg.shape)

    def grad_view(self, name: str):
        seg = self._by_name[name]
        return self.grads[seg.offset:seg.end].reshape(seg.shape)

    def rehome_grads(self, buffer) -> None:
        """Move the gradients into `buffer` (same size and dtype), e.g. a shared-memory window
        whose peers read it directly (`hpcdl.comm.shm`); every Param.grad is rebound to it."""
        if buffer.shape != (self.total,) or buffer.dtype != self.dtype:
            raise ValueError(f"rehome_grads needs a 1-D {self.dtype} buffer of {self.total} elements, "
                             f"got {buffer.dtype} {buffer.shape}")
        buffer[...] = self.grads
        self.grads = buffer
        self._bind()

    def zero_grads(self) -> None:
        self.grads.fill(0)

    @property
    def num_parameters(self) -> int:
        return sum(s.size for s in self.segments)

    # -- tables for kernels --------------------------------------------------
    def offsets(self) -> np.ndarray:
        """int64 [n_segments + 1]: segment i spans offsets[i] : offsets[i] + sizes[i]."""
        return np.array([s.offset for s in self.segments] + [self.total], dtype=np.int64)

    def sizes(self) -> np.ndarray:
        return np.array([s.size for s in self.segments], dtype=np.int64)

    def mask(self, predicate: Callable[[Segment], bool]) -> np.ndarray:
        """bool [n_segments]: which segments satisfy `predicate`."""
        return np.array([bool(predicate(s)) for s in self.segments], dtype=bool)

    def has_flag(self, flag: str) -> np.ndarray:
        if flag not in FLAGS:
            raise ValueError(f"unknown flag {flag!r}; known: {sorted(FLAGS)}")
        return self.mask(lambda s: flag in s.flags)

    # -- identity ------------------------------------------------------------
    def signature(self) -> str:
        """Hash of names, shapes, dtype and layout: equal on ranks that built the same model."""
        h = hashlib.sha256(str(self.dtype).encode())
        for s in self.segments:
            h.update(f"{s.name}|{s.shape}|{s.offset}|{sorted(s.flags)};".encode())
        return h.hexdigest()[:16]

    def describe(self) -> list[dict]:
        return [
            {"name": s.name, "shape": list(s.shape), "offset": s.offset, "size": s.size, "flags": sorted(s.flags)}
            for s in self.segments
        ]

    def __repr__(self):
        return f"Arena({len(self.segments)} segments, {self.num_parameters:,} parameters, {self.dtype})"
