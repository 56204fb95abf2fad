"""The step timeline: events, nesting, the Chrome-trace file, and clocks aligned across real ranks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import trace

SCRIPTS = Path(__file__).parent / "mpi_scripts"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def recorded_steps(first=2, last=3, steps=4):
    clock = FakeClock()
    tracer = trace.Tracer(rank=0, first=first, last=last, clock=clock)
    for step in range(1, steps + 1):
        tracer.begin_step(step)
        for phase, seconds in (("data", 0.001), ("forward", 0.010), ("backward", 0.020)):
            tracer.phase(phase)
            clock.advance(seconds)
        bucket_start = clock() - 0.005
        tracer.phase("allreduce")
        clock.advance(0.004)
        tracer.complete("bucket 0", "allreduce", bucket_start, clock(), track=trace.BUCKET_TRACK_BASE)
        tracer.phase("optimizer")
        clock.advance(0.002)
        tracer.phase(None)
        tracer.end_step()
    return tracer


def test_only_the_chosen_steps_are_recorded_and_phases_tile_the_step():
    tracer = recorded_steps(first=2, last=3, steps=4)
    steps = [e for e in tracer.events if e[1] == "step"]
    assert [e[5]["step"] for e in steps] == [2, 3]
    for name, _, _, start, end, _ in steps:
        phases = sorted((e for e in tracer.events if e[1] == "phase" and start <= e[3] and e[4] <= end),
                        key=lambda e: e[3])
        assert [p[0] for p in phases] == ["data", "forward", "backward", "allreduce", "optimizer"]
        assert phases[0][3] == start and phases[-1][4] == end  # the phases cover the step exactly
        assert all(a[4] == b[3] for a, b in zip(phases, phases[1:]))  # and leave no gaps
        assert end - start == pytest.approx(0.037)


def test_chrome_trace_is_well_formed_one_process_per_rank_with_offsets_applied():
    rank0 = recorded_steps().events
    rank1 = [(n, c, t, s + 7.0, e + 7.0, a) for n, c, t, s, e, a in rank0]  # same moments, clock 7 s ahead
    obj = trace.chrome_trace([rank0, rank1], offsets=[0.0, 7.0])
    assert trace.problems(obj) == []
    complete = [e for e in obj["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in complete} == {0, 1}
    names = {(e["pid"], e["args"]["name"]) for e in obj["traceEvents"] if e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}
    by_rank = [sorted((e["name"], e["ts"], e["dur"]) for e in complete if e["pid"] == r) for r in (0, 1)]
    assert [x[0] for x in by_rank[0]] == [x[0] for x in by_rank[1]]
    for a, b in zip(*by_rank):
        assert a[1] == pytest.approx(b[1], abs=1e-3) and a[2] == pytest.approx(b[2], abs=1e-3)
    assert min(e["ts"] for e in complete) == 0.0
    bucket = [e for e in complete if e["name"] == "bucket 0"]
    assert len(bucket) == 4 and all(e["tid"] == trace.BUCKET_TRACK_BASE for e in bucket)
    json.dumps(obj)  # serialisable as it stands


def test_problems_finds_overlap_without_nesting_and_bad_events():
    events = [("a", "phase", 0, 0.0, 2.0, {}), ("b", "phase", 0, 1.0, 3.0, {})]
    found = trace.problems(trace.chrome_trace([events], [0.0]))
    assert len(found) == 1 and "'b'" in found[0] and "without nesting" in found[0]
    nested = [("a", "step", 0, 0.0, 3.0, {}), ("b", "phase", 0, 1.0, 3.0, {})]
    assert trace.problems(trace.chrome_trace([nested], [0.0])) == []
    assert trace.problems({"traceEvents": [{"ph": "X", "name": "x", "ts": 0}]})  # no dur, pid, tid


def test_null_tracer_does_nothing():
    null = trace.NullTracer()
    null.begin_step(1)
    null.phase("forward")
    with null.span("x", "y"):
        pass
    null.end_step()
    assert not null.recording and not null.enabled


def test_bad_step_window_is_an_error():
    with pytest.raises(ValueError, match="first <= last"):
        trace.Tracer(0, 5, 2)


@pytest.mark.mpi
def test_offsets_found_and_events_aligned_on_three_real_ranks(tmp_path):
    out = tmp_path / "trace.json"
    run = subprocess.run(["mpiexec", "-n", "3", sys.executable, str(SCRIPTS / "trace_clocks.py"), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["offsets"] == pytest.approx([0.0, 5.0, 10.0], abs=2e-3)
    obj = json.loads(out.read_text())
    assert trace.problems(obj) == []
    after = {e["pid"]: e for e in obj["traceEvents"] if e.get("name") == "after barrier"}
    assert sorted(after) == [0, 1, 2]
    starts = [after[r]["ts"] for r in range(3)]
    # the barrier releases every rank within a few ms on this machine; 5 s of skew would show as 5e6 µs
    assert max(starts) - min(starts) < 50_000, starts


@pytest.mark.mpi
def test_two_rank_training_trace_has_a_track_per_rank_and_phases_that_cover_each_step(tmp_path):
    """`mpiexec -n 2 hpcdl train --trace` on the main job's model: 20 steps, every rank, nested, covering."""
    out, path = tmp_path / "run", tmp_path / "timeline.json"
    config = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fmnist_cnn.toml"
    run = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, "-m", "hpcdl", "train", "--config", str(config), "--out", str(out),
         "--trace", str(path), "--set", "data.dataset='synthetic'", "--set", "data.synthetic_samples=4096",
         "--set", "train.max_steps=24", "--set", "schedule.warmup_epochs=0", "--set", "log.every_steps=8",
         "--set", "log.plots=false", "--set", "checkpoint.every_steps=0", "--set", "log.progress=false"],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["trace"] == str(path)
    obj = json.loads(path.read_text())
    assert trace.problems(obj) == []
    complete = [e for e in obj["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in complete} == {0, 1}
    for rank in (0, 1):
        steps = [e for e in complete if e["pid"] == rank and e["cat"] == "step"]
        assert [e["args"]["step"] for e in steps] == list(range(1, 21))  # the default window, [1, 20]
        for s in steps:
            inside = sorted((e for e in complete if e["pid"] == rank and e["cat"] == "phase" and e["tid"] == 0
                             and s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 0.01),
                            key=lambda e: e["ts"])
            assert [e["name"] for e in inside] == ["data", "forward", "backward", "allreduce", "optimizer"]
            covered = sum(e["dur"] for e in inside)
            # the phases cover the step but for the batch hand-over before the first one (microseconds)
            assert covered <= s["dur"] + 0.01 and covered >= 0.9 * s["dur"], (s, inside)
        # every bucket's allreduce, on its own track, starts inside its step and ends by the step's optimizer
        buckets = [e for e in complete if e["pid"] == rank and e["cat"] == "allreduce"]
        assert buckets and all(e["tid"] >= trace.BUCKET_TRACK_BASE for e in buckets)
        per_step = len(buckets) / len(steps)
        assert per_step == int(per_step) >= 1
        for s in steps:
            mine = [e for e in buckets if s["ts"] <= e["ts"] <= s["ts"] + s["dur"]]
            assert len(mine) == per_step
            assert all(e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 0.01 for e in mine)
    # the slowest rank's phase times ride beside rank 0's in metrics.jsonl
    windows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"kind": "step"' in line]
    assert len(windows) == 3
    for w in windows:
        assert set(w["seconds"]) == set(w["seconds_max"]) >= {"forward", "backward", "allreduce", "other"}
        assert all(w["seconds_max"][k] >= w["seconds"][k] for k in w["seconds"])


def test_layer_spans_nest_inside_the_steps_forward_and_backward_and_vanish_outside_the_window():
    from hpcdl.layers.base import Module, Sequential

    clock = FakeClock()

    class Slow(Module):
        def forward(self, x):
            clock.advance(0.001)
            return x

        def backward(self, dy):
            clock.advance(0.002)
            return dy

    model = Sequential(Slow(), Sequential(Slow(), Slow()))
    tracer = trace.Tracer(rank=0, first=2, last=2, clock=clock)
    tracer.trace_layers(model)
    for step in (1, 2, 3):
        tracer.begin_step(step)
        tracer.phase("forward")
        model.forward(0)
        tracer.phase("backward")
        model.backward(0)
        tracer.phase(None)
        tracer.end_step()
        if step != 2:
            assert all("forward" not in vars(m) for m in model.modules())  # the layers' own methods run
    layers = [e for e in tracer.events if e[1] == "layer"]
    assert sorted({e[0] for e in layers}) == sorted(f"{n} {m}" for n in ("layers.0", "layers.1", "layers.1.layers.0",
                                                                          "layers.1.layers.1") for m in ("forward", "backward"))
    obj = trace.chrome_trace([tracer.events], [0.0])
    assert trace.problems(obj) == []
    phases = {e[0]: e for e in tracer.events if e[1] == "phase"}
    for name, _, _, start, end, _ in layers:
        outer = phases[name.rsplit(" ", 1)[1]]
        assert outer[3] <= start and end <= outer[4]
    inner = next(e for e in layers if e[0] == "layers.1.layers.0 backward")
    parent = next(e for e in layers if e[0] == "layers.1 backward")
    assert parent[3] <= inner[3] and inner[4] <= parent[4]
