"""Bucketed gradient allreduce, overlapped with backward.

Reducing each layer's gradient separately pays one latency per tensor (161
for ResNet-50); reducing the whole arena at the end leaves the network idle
during backward. Buckets are the middle road (PyTorch DDP: 25 MB; Horovod
tensor fusion: up to 128 MiB): contiguous slices of `arena.grads` made of
whole segments, cut from the end of the arena because backward finishes
the last layers first. As soon as every segment of a bucket has reported
ready, the bucket's allreduce starts, non-blocking. What moves it forward
afterwards is `progress`:

* "thread": a communication thread (`hpcdl.comm.progress`) polls every
  bucket in flight until it completes, sleeping `poll_interval_s` between
  polls that find nothing done. Completion no longer depends on how many
  hooks backward has or on P.
* "hooks": every later hook call polls the buckets in flight, and keeps
  polling for up to `budget_s` seconds (0: one poll). No extra thread, so
  nothing competes with backward for the core, but a bucket needs
  (P-1)(pieces+1) completed steps, i.e. at least as many polls.

Typical step with gradient accumulation::

    reducer = BucketReducer(comm, arena, op="mean").attach(model)
    for i, micro in enumerate(micro_batches):
        reducer.begin(sync=(i == len(micro_batches) - 1))
        loss.backward(model.backward(...))   # hooks fire inside
    reducer.finish()                          # arena.grads now equal on all ranks
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from hpcdl.arena import Arena, Segment
from hpcdl.comm.base import OPS
from hpcdl.errors import ConfigError

DEFAULT_BUCKET_BYTES = 25 * 2**20
PROGRESS = ("thread", "hooks")


@dataclass(frozen=True)
class Bucket:
    index: int
    start: int  # element offsets into the flat gradient buffer
    end: int
    segments: tuple[str, ...]  # in the order backward completes them (last layer first)

    @property
    def size(self) -> int:
        return self.end - self.start


TAPER_MIN_BYTES = 2**20


def plan_buckets(segments: Sequence[Segment], total: int, itemsize: int, bucket_bytes: int,
                 taper: bool = False) -> list[Bucket]:
    """Cut [0, total) into buckets of whole segments, walking from the end.

    A bucket closes once it holds at least `bucket_bytes`, so a segment larger
    than that gets a bucket of its own. Each segment's extent runs to the next
    segment's offset, so the alignment padding rides along (it is zero on
    every rank) and the buckets tile the buffer exactly.

    `taper` also closes a bucket once it is as large as everything before it
    (but at least 1 MiB): a bucket can only hide behind the backward of the
    layers still to come, which are the ones before it, so near the first
    layers the buckets shrink by halves instead of leaving one full-size
    bucket to start moments before backward ends.
    """
    buckets, names, end = [], [], total
    for i in range(len(segments) - 1, -1, -1):
        names.append(segments[i].name)
        start = segments[i].offset if i else 0
        limit = min(bucket_bytes, max(TAPER_MIN_BYTES, start * itemsize)) if taper else bucket_bytes
        if (end - start) * itemsize >= limit or i == 0:
            buckets.append(Bucket(len(buckets), start, end, tuple(names)))
            names, end = [], start
    return buckets


class _HandedOver:
    """Marks a bucket whose reduction the communication thread starts and owns (until it has)."""

    done = False

    def abandon(self) -> None:  # nothing was posted yet
        pass


_HANDED_OVER = _HandedOver()


class BucketReducer:
    """Allreduce of `arena.grads` in buckets, started from backward's gradient-ready hooks.

    `stats` describes the last finished step: `bytes` reduced, number of
    `buckets`, how many were `started_in_backward` and how many had
    `completed_in_backward` (finished before `finish()` was called), seconds
    spent in the hooks (`hook_s`: starting and polling) and in `finish()`
    (`wait_s`: starting the rest and waiting for all).

    With progress="thread" call `close()` when done (it joins the thread);
    everything else is rebuilt from (comm, arena) by constructing anew.
    """

    def __init__(self, comm, arena: Arena, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True, op: str = "sum",
                 progress: str = "hooks", budget_s: float = 0.0, poll_interval_s: float = 50e-6, taper: bool = False):
        if not bucket_bytes > 0:
            raise ConfigError(f"comm.bucket_mb: bucket size must be positive, got {bucket_bytes} bytes")
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if progress not in PROGRESS:
            raise ConfigError(f"comm.progress: expected one of {PROGRESS}, got {progress!r}")
        if budget_s < 0 or poll_interval_s < 0:
            raise ConfigError("comm.progress_budget_ms and comm.progress_interval_us must be >= 0")
        self.comm, self.arena, self.overlap, self.op = comm, arena, bool(overlap), op
        self.progress, self.budget_s = progress, float(budget_s)
        self._thread = None
        if progress == "thread" and self.overlap and comm.size > 1:
            from hpcdl.comm.progress import ProgressThread, available

            if not available():
                raise ConfigError("comm.progress = 'thread' needs MPI_THREAD_MULTIPLE, which this MPI did not grant; "
                                  "use comm.progress = 'hooks'")
            self._thread = ProgressThread(poll_interval_s, clock=lambda: self.clock())
        self._events: list = []
        # When each bucket's reduction started and was seen complete, on `clock` (the trainer sets
        # its timeline's clock); `timeline` holds the last finished step's (index, start, end).
        self.clock = time.perf_counter
        self.timeline: list[tuple[int, float, float]] = []
        self.buckets = plan_buckets(arena.segments, arena.total, arena.dtype.itemsize, int(bucket_bytes), taper)
        self._bucket_of = {name: b.index for b in self.buckets for name in b.segments}
        self._views = [arena.grads[b.start:b.end] for b in self.buckets]
        self._tags = [1 + b.index % comm.tag_ub for b in self.buckets]
        self._pending: list = [None] * len(self.buckets)
        self._events = [None] * len(self.buckets)
        self._times = [[0.0, 0.0] for _ in self.buckets]
        self._hook_s = 0.0
        self._started_in_backward = 0
        self.stats: dict = {}
        self.begin(sync=True)

    def attach(self, model) -> "BucketReducer":
        """Route `model`'s gradient-ready notifications to this reducer."""
        model.set_grad_ready_hook(self.on_grads_ready)
        return self

    def begin(self, sync: bool = True) -> None:
        """Call before each micro-batch's backward; sync=False makes the hooks do nothing."""
        if any(h is not None for h in self._pending):
            raise RuntimeError("BucketReducer.begin() while buckets are still in flight: call finish() first")
        self._sync = bool(sync)
        self._missing = [len(b.segments) for b in self.buckets]
        self._reported: set[str] = set()

    def on_grads_ready(self, params) -> None:
        """Gradient-ready hook: the gradients of `params` (one leaf module's) are final."""
        if not (self._sync and self.overlap) or self.comm.size == 1:
            return
        t0 = time.perf_counter()
        for p in params:
            index = self._bucket_of.get(p.name)
            if index is None:
                raise ValueError(f"parameter {p.name!r} is not in the arena this BucketReducer reduces")
            if p.name in self._reported:
                if self._pending[index] is not None:
                    raise RuntimeError(
                        f"gradient of {p.name!r} reported ready twice after its bucket started reducing "
                        "(a module used twice in one forward?); use overlap=False for such models"
                    )
                continue
            self._reported.add(p.name)
            self._missing[index] -= 1
            if self._missing[index] == 0:
                self._start(index)
                self._started_in_backward += 1
        self._poll()
        if self.budget_s and self._thread is None:
            # A time-based budget: keep polling while there is work in flight, up to budget_s.
            while time.perf_counter() - t0 < self.budget_s and self._in_flight():
                self._poll()
        self._hook_s += time.perf_counter() - t0

    def finish(self) -> dict:
        """Reduce what has not started, wait for everything; returns this step's stats."""
        if not self._sync:
            raise RuntimeError("BucketReducer.finish() after begin(sync=False): finish only the step's last micro-batch")
        t0 = time.perf_counter()
        completed = sum(1 for e in self._events if e is not None and e.is_set()) if self._thread is not None \
            else sum(1 for h in self._pending if h is not None and h.done)
        if self.comm.size > 1:
            for index, handle in enumerate(self._pending):
                if handle is None:
                    self._start(index)
            # Complete in bucket order on every rank: each bucket depends only on its
            # own messages, so this order cannot deadlock; polling the others while
            # we block keeps them moving.
            for index, handle in enumerate(self._pending):
                if self._thread is not None:
                    self._thread.wait(self._events[index])
                    self._times[index][1] = getattr(self._events[index], "completed_at", None) or self.clock()
                else:
                    self._poll()
                    handle.wait()
                    self._times[index][1] = self._times[index][1] or self.clock()
            self.timeline = [(i, start, end) for i, (start, end) in enumerate(self._times)]
        waited = time.perf_counter() - t0
        self.stats = {
            "algorithm": self.comm.name,
            "bytes": int(self.arena.total * self.arena.dtype.itemsize),
            "buckets": len(self.buckets),
            "started_in_backward": self._started_in_backward,
            "completed_in_backward": completed,
            "progress": self.progress,
            "hook_s": self._hook_s,
            "wait_s": waited,
        }
        self._pending = [None] * len(self.buckets)
        self._events = [None] * len(self.buckets)
        self._hook_s, self._started_in_backward = 0.0, 0
        self.begin(sync=True)
        return self.stats

    def close(self) -> None:
        """Stop and join the communication thread (if any). The reducer is unusable afterwards."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def _start(self, index: int) -> None:
        self._times[index] = [self.clock(), 0.0]
        if self._thread is not None:
            # The thread starts it (in the order submitted, the same on every rank): a hook that made
            # MPI calls itself would trade the GIL and MPI's lock with the thread, 30 -> 170 us a start.
            self._pending[index] = _HANDED_OVER
            self._events[index] = self._thread.submit(lambda: self._start_here(index))
        else:
            self._pending[index] = self.comm.start(self._views[index], self.op, tag=self._tags[index])

    def _start_here(self, index: int):
        # Runs on the communication thread; the handle is kept for recovery to abandon.
        handle = self.comm.start(self._views[index], self.op, tag=self._tags[index])
        self._pending[index] = handle
        return handle

    def _in_flight(self) -> bool:
        return any(h is not None and not h.done for h in self._pending)

    def _poll(self) -> None:
        if self._thread is not None:
            return  # the thread owns every handle it was given
        for index, handle in enumerate(self._pending):
            if handle is not None and not handle.done and handle.test():
                self._times[index][1] = self.clock()  # seen complete by this poll

    def describe(self) -> str:
        sizes = ", ".join(f"{b.size * self.arena.dtype.itemsize / 2**20:.2f}" for b in self.buckets)
        how = f", progress={self.progress}" + (f" (budget {self.budget_s * 1e3:g} ms)" if self.budget_s else "")
        return f"{len(self.buckets)} bucket(s) of [{sizes}] MiB, overlap={'on' if self.overlap else 'off'}{how}, op={self.op}"
