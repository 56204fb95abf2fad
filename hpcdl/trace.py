"""A timeline of chosen steps in Chrome-trace JSON, one track per rank.

`hpcdl train --trace FILE` (or `log.trace_steps = [first, last]`) records
what every rank did in steps first..last: the step, its phases (data wait,
forward, backward, allreduce, optimizer), each gradient bucket's allreduce from
its start to its completion, evaluation and checkpoints. At the end rank 0
gathers the events and writes one file, which chrome://tracing, Perfetto
(ui.perfetto.dev, "Open trace file") and speedscope open directly.

Layout of the file: process `pid = rank` is named "rank r", so each rank is
one group of tracks; in it, thread 0 holds the steps with their phases nested
inside, and thread 100 + k holds bucket k's allreduce, which overlaps backward
and its neighbours and so cannot share a track with them. A straggler shows as
one rank's phase running long while the others sit in "allreduce".

Clocks. Every rank records its own `MPI_Wtime` (or `time.perf_counter`
without MPI). At start-up rank 0 estimates each rank's offset by Cristian's
method: several ping-pongs, and the one with the shortest round trip gives
offset = t_rank - (t_send + t_reply) / 2, good to half that round trip
(microseconds within a node, a few more across a network). Timestamps in the
file are rank 0's clock, in microseconds from the first recorded event.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

STEP_TRACK = 0
BUCKET_TRACK_BASE = 100
FORMAT = "hpcdl-trace/1"


def default_clock():
    """MPI_Wtime when mpi4py is loaded (the clock the offsets are measured on), else perf_counter."""
    try:
        from mpi4py import MPI

        return MPI.Wtime
    except ImportError:  # pragma: no cover - mpi4py is a dependency
        return time.perf_counter


class Tracer:
    """Collects complete events ("X": name, start, end) of the steps in [first, last] (1-based)."""

    enabled = True

    def __init__(self, rank: int, first: int, last: int, clock=None):
        if not 1 <= first <= last:
            raise ValueError(f"trace steps must satisfy 1 <= first <= last, got [{first}, {last}]")
        self.rank, self.first, self.last = int(rank), int(first), int(last)
        self.clock = clock or default_clock()
        self.events: list[tuple] = []  # (name, category, track, start_s, end_s, args)
        self.offsets: list[float] = [0.0]  # every rank's clock minus rank 0's (`clock_offsets`)
        self.recording = False
        self.model = None  # set by `trace_layers`: its layers get spans in the traced steps
        self._in_step = False
        self._step = 0
        self._wrapped: list = []  # (module, attribute name) of the wrappers installed
        self._open: dict[int, list[tuple[str, str, float, dict, float]]] = {}

    # -- what the trainer calls -----------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """`step` is the 1-based number of the step about to run."""
        self.recording = self.first <= step <= self.last
        self._step = step
        if self.model is not None and self.recording != bool(self._wrapped):
            self._wrap_layers() if self.recording else self._unwrap_layers()
        if self.recording:
            self.begin(f"step {step}", "step", args={"step": step})
            self._in_step = True

    def end_step(self) -> None:
        """Closes the step; what follows it before the next step (evaluation, a checkpoint) is still recorded."""
        self._in_step = False
        if self.recording:
            self.close_track(STEP_TRACK)
        if self._wrapped and self._step >= self.last:
            self._unwrap_layers()

    # -- per-layer spans ------------------------------------------------------------------------
    def trace_layers(self, model) -> None:
        """Give each layer of `model` a forward and a backward span in the traced steps.

        The module instances' `forward`/`backward` are shadowed by timing wrappers at the start
        of the first traced step and the wrappers removed after the last, so untraced steps run
        the layers' own methods: nothing is paid when it is off or outside the window. Only
        calls inside a step are recorded (not evaluation's forward passes after it).
        """
        self.model = model

    def _wrap_layers(self) -> None:
        for name, module in _named_modules(self.model):
            for method in ("forward", "backward"):
                if method in vars(module):
                    continue  # already shadowed on the instance: leave that one alone
                setattr(module, method, self._timed(getattr(module, method), name, method, type(module).__name__))
                self._wrapped.append((module, method))

    def _unwrap_layers(self) -> None:
        for module, method in self._wrapped:
            vars(module).pop(method, None)
        self._wrapped = []

    def _timed(self, call, layer: str, method: str, kind: str):
        label = f"{layer} {method}"
        args = {"layer": layer, "type": kind}

        def timed(*a, **kw):
            if not self._in_step:
                return call(*a, **kw)
            self.begin(label, "layer", args=args)
            try:
                return call(*a, **kw)
            finally:
                self.end()

        return timed

    def begin(self, name: str, category: str, track: int = STEP_TRACK, args: dict | None = None) -> None:
        """Open a span on `track`; spans on one track nest (a stack per track)."""
        if self.recording:
            self._open.setdefault(track, [])
            self._open[track].append((name, category, self.clock(), args or {}, time.process_time()))

    def end(self, track: int = STEP_TRACK) -> None:
        stack = self._open.get(track)
        if self.recording and stack:
            name, category, start, args, cpu = stack.pop()
            # CPU seconds of the whole process (every thread) during the span: with ranks
            # time-sharing cores, wall time minus this is the time the rank waited for a core
            args = dict(args, cpu_s=round(time.process_time() - cpu, 6))
            self.events.append((name, category, track, start, self.clock(), args))

    def close_track(self, track: int) -> None:
        while self._open.get(track):
            self.end(track)

    def complete(self, name: str, category: str, start: float, end: float, track: int = STEP_TRACK,
                 args: dict | None = None) -> None:
        """A span measured elsewhere (a bucket's start and completion times, on this tracer's clock)."""
        if self.recording:
            self.events.append((name, category, track, float(start), float(end), args or {}))

    @contextlib.contextmanager
    def span(self, name: str, category: str, track: int = STEP_TRACK, args: dict | None = None):
        self.begin(name, category, track, args)
        try:
            yield
        finally:
            self.end(track)

    def record_buckets(self, reducer) -> None:
        """Each bucket's allreduce of the step just finished (`BucketReducer.timeline`, on this tracer's
        clock), from its start during backward to its completion, on the bucket's own track."""
        if not self.recording:
            return
        itemsize = reducer.arena.dtype.itemsize
        for index, start, end in reducer.timeline:
            bucket = reducer.buckets[index]
            self.complete(f"bucket {index}", "allreduce", start, end, track=BUCKET_TRACK_BASE + index,
                          args={"bytes": bucket.size * itemsize, "tensors": len(bucket.segments)})

    def phase(self, name: str | None) -> None:
        """Switch the current phase inside the open step: closes the previous phase span."""
        if not self.recording:
            return
        stack = self._open.get(STEP_TRACK, [])
        while len(stack) > 1:  # leave the step span open
            self.end(STEP_TRACK)
        if name is not None:
            self.begin(name, "phase")


def _named_modules(model, prefix: str = ""):
    """(dotted name, module) of every module under `model`, not the model itself (its span is the phase)."""
    for key, child in model.named_children():
        name = f"{prefix}{key}"
        yield name, child
        yield from _named_modules(child, name + ".")


class NullTracer:
    """What every rank holds when no trace was asked for: every call does nothing."""

    enabled = recording = False
    clock = staticmethod(time.perf_counter)
    offsets: tuple = ()

    def __getattr__(self, name):
        return _nothing

    def span(self, *args, **kwargs):
        return contextlib.nullcontext()


def _nothing(*args, **kwargs):
    return None


def for_run(trace_steps, trace_file: str, world, total_steps: int, layers=None):
    """The trainer's tracer: a Tracer of `trace_steps` ([1, 20] when only a file is given), clamped to the
    run, with the ranks' clock offsets measured (collective); a NullTracer when no timeline was asked for.
    `layers`: a model whose layers get their own spans (`Tracer.trace_layers`)."""
    if not trace_steps and not trace_file:
        return NullTracer()
    first, last = trace_steps or (1, 20)
    tracer = Tracer(world.rank, min(first, total_steps), min(last, total_steps))
    if layers is not None:
        tracer.trace_layers(layers)
    if world.size > 1:
        tracer.offsets = clock_offsets(world.mpi_comm, tracer.clock)
    return tracer


# -- clocks -----------------------------------------------------------------------------------

def clock_offsets(mpi_comm, clock=None, rounds: int = 8) -> list[float]:
    """Every rank's clock minus rank 0's, in seconds (Cristian's method); the same list on every rank."""
    clock = clock or default_clock()
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    offsets = [0.0] * size
    for peer in range(1, size):
        if rank == 0:
            best_rtt, best = float("inf"), 0.0
            for _ in range(rounds):
                sent = clock()
                mpi_comm.send(None, dest=peer, tag=7001)
                theirs = mpi_comm.recv(source=peer, tag=7002)
                back = clock()
                if back - sent < best_rtt:
                    best_rtt, best = back - sent, theirs - (sent + back) / 2
            offsets[peer] = best
        elif rank == peer:
            for _ in range(rounds):
                mpi_comm.recv(source=0, tag=7001)
                mpi_comm.send(clock(), dest=0, tag=7002)
    return mpi_comm.bcast(offsets, root=0)


# -- the file ---------------------------------------------------------------------------------

def chrome_trace(per_rank_events: list[list[tuple]], offsets: list[float], metadata: dict | None = None) -> dict:
    """The Chrome-trace object for events gathered from every rank (index = rank)."""
    starts = [start - offsets[rank] for rank, events in enumerate(per_rank_events) for _, _, _, start, _, _ in events]
    origin = min(starts) if starts else 0.0
    trace_events = []
    for rank, events in enumerate(per_rank_events):
        trace_events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        trace_events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                             "args": {"sort_index": rank}})
        tracks = sorted({track for _, _, track, _, _, _ in events} | {STEP_TRACK})
        for track in tracks:
            label = "steps" if track == STEP_TRACK else f"bucket {track - BUCKET_TRACK_BASE} allreduce"
            trace_events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": track, "args": {"name": label}})
        # Longer spans first at equal start, so viewers nest children under their parents.
        for name, category, track, start, end, args in sorted(events, key=lambda e: (e[2], e[3], -(e[4] - e[3]))):
            trace_events.append({
                "name": name, "cat": category, "ph": "X", "pid": rank, "tid": track,
                "ts": round((start - offsets[rank] - origin) * 1e6, 3),
                "dur": round(max(end - start, 0.0) * 1e6, 3),
                "args": args,
            })
    return {"traceEvents": trace_events, "displayTimeUnit": "ms",
            "otherData": {"format": FORMAT, "ranks": len(per_rank_events),
                          "clock_offsets_s": [round(o, 9) for o in offsets], **(metadata or {})}}


def write(mpi_comm, tracer, offsets: list[float], path: str | os.PathLike, metadata: dict | None = None) -> Path | None:
    """Gather every rank's events to rank 0, which writes the file atomically; returns its path on rank 0."""
    gathered = mpi_comm.gather(list(tracer.events) if tracer.enabled else [], root=0)
    if mpi_comm.Get_rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        json.dump(chrome_trace(gathered, offsets, metadata), f)
    os.replace(temporary, path)
    return path


def problems(trace: dict) -> list[str]:
    """What is wrong with a trace object: missing fields, negative durations, spans on one track that overlap
    without nesting. Empty when it is well formed."""
    found = []
    spans: dict[tuple, list[tuple[float, float, str]]] = {}
    for i, event in enumerate(trace.get("traceEvents", [])):
        if event.get("ph") == "M":
            continue
        if event.get("ph") != "X" or not all(k in event for k in ("name", "ts", "dur", "pid", "tid")):
            found.append(f"event {i}: not a complete event with name, ts, dur, pid and tid: {event}")
            continue
        if event["dur"] < 0:
            found.append(f"event {i} ({event['name']}): negative duration")
        spans.setdefault((event["pid"], event["tid"]), []).append((event["ts"], event["ts"] + event["dur"], event["name"]))
    tolerance_us = 0.01
    for (pid, tid), items in spans.items():
        stack: list[tuple[float, float, str]] = []
        for start, end, name in sorted(items, key=lambda s: (s[0], -(s[1] - s[0]))):
            while stack and start >= stack[-1][1] - tolerance_us:
                stack.pop()
            if stack and end > stack[-1][1] + tolerance_us:
                found.append(f"rank {pid} track {tid}: {name!r} [{start}, {end}] overlaps {stack[-1][2]!r} "
                             f"[{stack[-1][0]}, {stack[-1][1]}] without nesting")
            stack.append((start, end, name))
    return found
