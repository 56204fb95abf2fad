"""Streaming under real mpiexec: rows delivered exactly once, resume on another rank count, workers die with ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from trainer_runs import HPCDL, child_pids_running, launch, mpiexec, relative_difference

pytestmark = pytest.mark.mpi

ROWS, CLASSES, SHAPE = 240, 6, (3, 8, 8)


@pytest.fixture(scope="module")
def numbered_file(tmp_path_factory):
    """Row i's first three pixels spell i in base 256, so a delivered image names its row."""
    from hpcdl.data.hdf5 import write_hdf5

    def split(count, offset):
        rng = np.random.default_rng(offset)
        images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
        ids = np.arange(count)
        images[:, 0, 0, :3] = np.stack([ids // 65536, ids // 256 % 256, ids % 256], axis=1)
        return images, ids % CLASSES

    path = tmp_path_factory.mktemp("numbered") / "numbered.h5"
    write_hdf5(path, {"train": split(ROWS, 0), "test": split(50, 1)}, [f"c{i}" for i in range(CLASSES)],
               mean=[0.0] * 3, std=[1 / 255] * 3)  # normalization is then the identity on pixel values
    return path


STREAM_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mpi4py import MPI
    from hpcdl.data.augment import Normalize
    from hpcdl.data.dataset import dataset_from_hdf5
    from hpcdl.data.loader import BatchLoader
    from hpcdl.data.sampler import ShardedSampler

    path, accumulate, steps, state_in, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    comm = MPI.COMM_WORLD
    data = dataset_from_hdf5(path)
    sampler = ShardedSampler(data.train.count, 24, comm.rank, comm.size, seed=3, accumulate_steps=accumulate)
    identity = Normalize((0.0,) * 3, (1 / 255,) * 3)
    with BatchLoader(data, sampler, identity, identity, prefetch=3, workers=1, worker_kind="process") as loader:
        if state_in != "-":
            loader.load_state_dict(json.load(open(state_in)))
        mine = []
        for _ in range(steps):
            batch = loader.next_step()
            for micro in range(batch.micro_steps):
                x, y = batch.take(micro)
                ids = (x[:, 0, 0, 0].astype(np.int64) * 65536 + x[:, 0, 0, 1].astype(np.int64) * 256
                       + x[:, 0, 0, 2].astype(np.int64))
                assert (y == ids % 6).all(), "labels travel with their rows"
                positions = sampler.batch_positions(batch.epoch, batch.step)[micro]
                mine.append([batch.epoch, batch.step, positions.tolist(), ids.tolist()])
        evaluated = [int(v) for x, _ in loader.eval_batches() for v in x[:, 0, 0, 2] + 256 * x[:, 0, 0, 1]]
        state = loader.state_dict()
    gathered = comm.gather((mine, evaluated), root=0)
    if comm.rank == 0:
        json.dump({"ranks": gathered, "state": state}, open(out, "w"))
""")


def _run_stream(tmp_path, path, ranks, accumulate, steps, state_in, name):
    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT)
    out = tmp_path / f"{name}.json"
    result = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(script), str(path), str(accumulate),
                             str(steps), state_in, str(out)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def _global_batches(run) -> dict:
    """{(epoch, step): row ids by global position}, checking no position is delivered twice."""
    batches = {}
    for mine, _ in run["ranks"]:
        for epoch, step, positions, ids in mine:
            batch = batches.setdefault((epoch, step), {})
            for position, row in zip(positions, ids):
                assert position not in batch, f"position {position} of step {(epoch, step)} delivered twice"
                batch[position] = row
    return {key: [batch[p] for p in sorted(batch)] for key, batch in batches.items()}


def test_every_row_once_per_global_batch_and_resume_on_another_rank_count(tmp_path, numbered_file):
    from hpcdl.data.sampler import ShardedSampler

    reference = ShardedSampler(ROWS, 24, 0, 1, seed=3)  # 10 steps per epoch
    first = _run_stream(tmp_path, numbered_file, ranks=2, accumulate=1, steps=7, state_in="-", name="first")
    state = tmp_path / "state.json"
    state.write_text(json.dumps(first["state"]))
    assert first["state"]["step_in_epoch"] == 7  # mid-epoch
    resumed = _run_stream(tmp_path, numbered_file, ranks=3, accumulate=2, steps=6, state_in=str(state),
                          name="resumed")
    delivered = {**_global_batches(first), **_global_batches(resumed)}
    expected_steps = [(0, s) for s in range(10)] + [(1, s) for s in range(3)]
    assert sorted(delivered) == expected_steps  # 7 steps on 2 ranks, then 6 on 3 ranks crossing into epoch 1
    for epoch, step in expected_steps:
        rows = delivered[(epoch, step)]
        assert len(rows) == len(set(rows)) == 24, "every row of a global batch exactly once"
        assert rows == reference.global_batch_indices(epoch, step).tolist()
    for run, ranks in ((first, 2), (resumed, 3)):  # evaluation: each rank its shard, all 50 rows once
        assert sorted(v for _, evaluated in run["ranks"] for v in evaluated) == list(range(50))


# -- workers die with the job -----------------------------------------------------------------

@pytest.fixture(scope="module")
def learnable_file(tmp_path_factory):
    from hpcdl.data.hdf5 import write_hdf5
    from hpcdl.data.synthetic import make_synthetic_split

    path = tmp_path_factory.mktemp("learnable") / "learnable.h5"
    write_hdf5(path, {"train": make_synthetic_split(320, (3, 32, 32), 10, 0, 0),
                      "test": make_synthetic_split(64, (3, 32, 32), 10, 0, 1)},
               [f"class{i}" for i in range(10)], short_side=32)
    return path


def _streaming_job(path, steps, workers="process"):
    return ["--set", "data.dataset='hdf5'", "--set", f"data.path='{path}'", "--set", "data.image_size=28",
            "--set", "data.random_resized_crop=true", "--set", "data.random_flip=true",
            "--set", f"data.worker_kind='{workers}'", "--set", "data.workers=1",
            "--set", "train.global_batch=32", "--set", f"train.max_steps={steps}",
            "--set", "schedule.warmup_epochs=0.5", "--set", "log.every_steps=1", "--set", "log.plots=false"]


def _start(job, out, env=None):
    command = [mpiexec(), "-n", "2", *HPCDL, "train", *job, "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _wait_for_steps(out, proc, count, timeout=60):
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} steps logged; stderr: {proc.stderr.read()[-2000:] if proc.poll() else ''}")


def _ranks_and_workers(proc):
    workers = child_pids_running("hpcdl.data.prefetch", proc.pid)
    ranks = [pid for pid in child_pids_running("train", proc.pid) if pid not in workers]
    return ranks, workers


def _alive(pids):
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _gone_soon(pids, seconds=5.0):
    deadline = time.time() + seconds
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.05)
    return _alive(pids)


@pytest.mark.parametrize("how", ["sigkill-rank", "worker-dies", "trainer-raises", "sigterm-everyone"])
def test_no_worker_outlives_its_rank(tmp_path, learnable_file, how):
    job = _streaming_job(learnable_file, 10_000 if how == "worker-dies" else 400)
    proc = _start(job, tmp_path, env={"HPCDL_FAULT_INJECT": "raise-at-step:80"} if how == "trainer-raises" else None)
    try:
        _wait_for_steps(tmp_path, proc, 3)
        ranks, workers = _ranks_and_workers(proc)
        assert len(ranks) == 2 and len(workers) == 2, (ranks, workers)
        if how == "sigkill-rank":
            os.kill(ranks[1], signal.SIGKILL)
        elif how == "worker-dies":  # its rank raises a DataError, the job aborts
            os.kill(workers[-1], signal.SIGKILL)
        elif how == "sigterm-everyone":  # what a batch system does at the time limit
            for pid in ranks + workers:
                os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert _gone_soon(workers) == [], f"workers left after {how}: {_alive(workers)}"
    if how == "sigterm-everyone":
        assert proc.returncode == 0, stderr[-3000:]
        assert "SIGTERM received: checkpoint written" in stderr
    else:
        assert proc.returncode != 0, stderr[-3000:]
    if how == "worker-dies":
        assert "data worker process" in stderr and "died (killed by SIGKILL)" in stderr, stderr[-3000:]
    if how == "trainer-raises":  # an uncaught exception: MPI_Abort, then the kernel's PDEATHSIG
        assert "raise-at-step:80" in stderr


@pytest.mark.slow  # the loader-level test above covers the stream; this adds the trainer's checkpoint around it
def test_streamed_run_resumes_on_another_rank_count(tmp_path, learnable_file):
    job = [*_streaming_job(learnable_file, 20), "--set", "checkpoint.every_steps=10", "--set", "log.every_steps=5",
           "--set", "data.workers=2"]
    reference = launch([*job, "--out", str(tmp_path / "ref"), "--set", "data.worker_kind='thread'"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    crashed = launch([*job, "--out", str(tmp_path / "run")], ranks=2, env={"HPCDL_FAULT_INJECT": "raise-at-step:11"},
                     timeout=120)
    assert crashed.returncode != 0 and "raise-at-step:11" in crashed.stderr
    resumed = launch([*job, "--out", str(tmp_path / "run"), "--resume", "auto", "--set", "data.workers=1",
                      "--set", "data.worker_kind='thread'"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-00000010.h5" in resumed.stderr
    for key in ("param_norm", "final_loss", "test_loss"):
        assert relative_difference(resumed.summary[key], reference.summary[key]) <= 1e-5, key
