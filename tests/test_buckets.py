"""Bucket planning and the bucketed, overlapped gradient reducer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hpcdl.comm
from hpcdl.arena import Arena, Param
from hpcdl.comm.buckets import BucketReducer, plan_buckets
from hpcdl.errors import ConfigError
from hpcdl.layers.base import zeros

ROOT = Path(__file__).resolve().parents[1]


def arena_of(sizes, dtype=np.float32):
    params = []
    for i, n in enumerate(sizes):
        p = Param((n,), zeros)
        p.name = f"p{i}"
        params.append(p)
    return Arena(params, dtype=dtype), params


@pytest.mark.parametrize("bucket_bytes", [1, 64, 300, 4000, 10**9])
def test_buckets_tile_the_buffer_with_whole_segments_from_the_end(bucket_bytes):
    arena, _ = arena_of([5, 100, 1, 17, 64, 3, 250, 16])
    buckets = plan_buckets(arena.segments, arena.total, 4, bucket_bytes)
    # contiguous, covering [0, total), listed from the end of the arena
    assert buckets[0].end == arena.total and buckets[-1].start == 0
    for later, earlier in zip(buckets, buckets[1:]):
        assert earlier.end == later.start
    # each segment lies wholly inside the one bucket that names it, in backward order
    names = [n for b in buckets for n in b.segments]
    assert names == [s.name for s in reversed(arena.segments)]
    for b in buckets:
        for name in b.segments:
            seg = arena.segment(name)
            assert b.start <= seg.offset and seg.end <= b.end
    # every bucket but the one holding the first layer reaches the size, and closes as soon as it does
    for b in buckets[:-1]:
        assert b.size * 4 >= bucket_bytes
        if len(b.segments) > 1:
            without_last = b.end - arena.segment(b.segments[-2]).offset
            assert without_last * 4 < bucket_bytes


def test_taper_halves_the_buckets_towards_the_first_layers():
    from hpcdl.comm.buckets import TAPER_MIN_BYTES

    mib = 2**20 // 4  # float32 elements per MiB
    arena, _ = arena_of([mib // 4] * 8 + [mib] * 4 + [8 * mib] * 8)
    plain = plan_buckets(arena.segments, arena.total, 4, 16 * 2**20)
    tapered = plan_buckets(arena.segments, arena.total, 4, 16 * 2**20, taper=True)
    for buckets in (plain, tapered):  # both tile the buffer with whole segments
        assert buckets[0].end == arena.total and buckets[-1].start == 0
        assert all(a.start == b.end for a, b in zip(buckets, buckets[1:]))
    assert [b.size // mib for b in plain] == [16, 16, 16, 16, 6]
    # 3 MiB = all before it; then halves, down to the 1 MiB floor, and the remainder
    assert [b.size / mib for b in tapered] == [16, 16, 16, 16, 3, 1.5, 1, 0.5]
    assert TAPER_MIN_BYTES == 2**20


def test_one_bucket_when_everything_fits_and_none_for_an_empty_arena():
    arena, _ = arena_of([3, 4, 5])
    assert len(plan_buckets(arena.segments, arena.total, 4, 10**6)) == 1
    assert plan_buckets((), 0, 4, 100) == []


def test_reducer_validates_and_is_a_no_op_on_one_rank():
    arena, params = arena_of([10, 20, 30])
    comm = hpcdl.comm.create("ring")
    with pytest.raises(ConfigError, match="bucket"):
        BucketReducer(comm, arena, bucket_bytes=0)
    with pytest.raises(ValueError, match="op"):
        BucketReducer(comm, arena, op="max")
    reducer = BucketReducer(comm, arena, bucket_bytes=64, op="mean")
    arena.grads[:] = np.arange(arena.total)
    before = arena.grads.copy()
    reducer.begin(sync=False)
    reducer.on_grads_ready(params)
    with pytest.raises(RuntimeError, match="sync=False"):
        reducer.finish()
    reducer.begin(sync=True)
    reducer.on_grads_ready(params)
    stats = reducer.finish()
    np.testing.assert_array_equal(arena.grads, before)
    assert stats["buckets"] == len(reducer.buckets) == 3
    assert stats["bytes"] == arena.total * 4
    assert set(stats) >= {"algorithm", "bytes", "buckets", "wait_s", "hook_s", "started_in_backward",
                          "completed_in_backward", "progress"}
    assert "3 bucket(s)" in reducer.describe()
    reducer.close()
    with pytest.raises(ConfigError, match="comm.progress"):
        BucketReducer(comm, arena, progress="interrupts")


def test_progress_thread_completes_what_it_is_given_and_joins():
    from hpcdl.comm.progress import ProgressThread

    class Countdown:  # stands in for a Pending: done after a few polls
        def __init__(self, polls):
            self.left, self.done = polls, False

        def test(self):
            self.left -= 1
            self.done = self.left <= 0
            return self.done

    thread = ProgressThread(interval_s=1e-4)
    items = [Countdown(n) for n in (1, 5, 50)]
    events = [thread.submit(item) for item in items]
    for event in events:
        thread.wait(event)
    assert all(item.done for item in items) and thread.polls >= 50
    thread.close()
    assert not thread.alive
    with pytest.raises(RuntimeError, match="after close"):
        thread.submit(Countdown(1))

    class Broken:
        done = False

        def test(self):
            raise OSError("MPI_ERR_PROC_FAILED")

    thread = ProgressThread()
    event = thread.submit(Broken())
    with pytest.raises(RuntimeError, match="MPI_ERR_PROC_FAILED"):
        thread.wait(event)
    thread.close()


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, progress", [(2, "hooks"), (3, "thread"), (5, "thread")])
def test_bucketed_reduction_equals_numpy_sum_over_ranks_and_micro_batches(ranks, progress):
    """Every algorithm; overlap on/off; hook-driven and finish-only; accumulation; sum/mean; two steps;
    buckets *completed* (not only started) during a backward that sleeps, by thread and by hook budget."""
    proc = subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, str(ROOT / "tests/mpi_scripts/comm_buckets.py"),
                           "--progress", progress],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["world"] == ranks
    assert report["failures"] == []
    assert report["cases"] > 300


@pytest.mark.gpu
@pytest.mark.mpi
def test_cupy_buffers_reduce_exactly_with_and_without_staging(cupy):
    for aware in ("0", "auto"):
        env = dict(os.environ)
        if aware != "auto":
            env["HPCDL_CUDA_AWARE"] = aware
        proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, str(ROOT / "tests/mpi_scripts/comm_gpu.py")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        assert report["failures"] == [] and report["cases"] > 0
