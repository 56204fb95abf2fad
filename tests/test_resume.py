"""Checkpoints from real runs: resume on another rank count, survive a kill mid-write, stop on a signal."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from trainer_runs import HPCDL, TINY, launch, mpiexec, relative_difference

pytestmark = pytest.mark.mpi

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY_10 = ["--set", "checkpoint.every_steps=10"]


def _assert_same_training(resumed: dict, uninterrupted: dict):
    assert resumed["steps"] == uninterrupted["steps"]
    assert relative_difference(resumed["param_norm"], uninterrupted["param_norm"]) <= 1e-5
    assert relative_difference(resumed["final_loss"], uninterrupted["final_loss"]) <= 1e-5


@pytest.mark.parametrize("first_ranks, second_ranks, optimizer", [
    (2, 1, "sgd"),
    (1, 2, "lamb"),
])
def test_resume_on_a_different_rank_count(tmp_path, first_ranks, second_ranks, optimizer):
    job = [*TINY, *CHECKPOINT_EVERY_10, "--set", f"optim.name='{optimizer}'", "--set", "schedule.base_lr=0.01"]
    reference = launch([*job, "--out", str(tmp_path / "ref")])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "run"
    crashed = launch([*job, "--out", str(run_dir)], ranks=first_ranks,
                     env={"HPCDL_FAULT_INJECT": "raise-at-step:11"}, timeout=120)
    assert crashed.returncode != 0 and "raise-at-step:11" in crashed.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-00000010.h5"]

    resumed = launch([*job, "--out", str(run_dir), "--resume", "auto"], ranks=second_ranks)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "ckpt-00000010.h5" in resumed.stderr
    assert resumed.summary["world_size"] == second_ranks
    _assert_same_training(resumed.summary, reference.summary)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    job = [*TINY, "--set", "checkpoint.every_steps=5"]
    reference = launch([*job, "--out", str(tmp_path / "ref")])
    run_dir = tmp_path / "run"
    killed = launch([*job, "--out", str(run_dir)], ranks=2, env={"HPCDL_FAULT_INJECT": "checkpoint-write:2"})
    assert killed.returncode != 0
    assert "killing pid" in killed.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "ckpt-00000005.h5" in names and "ckpt-00000010.h5" not in names
    assert any(".tmp-" in name for name in names), names  # the half-written file is still there

    resumed = launch([*job, "--out", str(run_dir), "--resume", "auto"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-00000005.h5" in resumed.stderr
    _assert_same_training(resumed.summary, reference.summary)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    job = [*TINY, "--set", "checkpoint.every_steps=5", "--set", "train.max_steps=10",
           "--set", "schedule.warmup_epochs=0"]
    first = launch([*job, "--out", str(tmp_path)])
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "checkpoints" / "ckpt-00000010.h5"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    newest.write_bytes(bytes(data))
    resumed = launch([*job, "--out", str(tmp_path), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt-00000010.h5" in resumed.stderr  # named in the warning
    assert "resuming from" in resumed.stderr and "ckpt-00000005.h5" in resumed.stderr
    assert resumed.summary["steps"] == 10


def test_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    long_job = [*TINY, "--set", "train.max_steps=400", "--set", "schedule.warmup_epochs=0",
                "--set", "log.every_steps=1"]
    command = [mpiexec(), "-n", "2", *HPCDL, "train", *long_job, "--out", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what Slurm's --signal=USR1@T sends before the walltime
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGUSR1 received" in stderr
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].stem.split("-")[1])
    assert 5 <= stopped_at < 400
    assert '"stopped_early": true' in stdout

    resumed = launch([*long_job, "--out", str(tmp_path), "--resume", "auto"], ranks=2)
    reference = launch([*long_job, "--out", str(tmp_path / "ref")])
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-3000:]
    _assert_same_training(resumed.summary, reference.summary)


def test_restart_wrapper_relaunches_on_fewer_ranks(tmp_path):
    job = [*TINY, "--set", "train.max_steps=30", *CHECKPOINT_EVERY_10]
    reference = launch([*job, "--out", str(tmp_path / "ref")])
    env = dict(os.environ, OMP_NUM_THREADS="1", HPCDL_FAULT_INJECT="checkpoint-write:2", NP_SEQUENCE="2 1",
               RESTART_DELAY="0", MAX_RESTARTS="3")
    proc = subprocess.run([str(REPO / "jobs" / "restart_mpirun.sh"), *HPCDL, "train", *job,
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("killing pid") == 2  # two attempts died mid-write, the third finished
    final = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    import json

    summary = json.loads(final)
    assert summary["world_size"] == 1
    _assert_same_training(summary, reference.summary)


def test_time_triggered_checkpoints_follow_the_clock(tmp_path):
    # 0.005 min = 0.3 s: a few checkpoints over the run, never one per step
    result = launch([*TINY, "--set", "train.max_steps=60", "--set", "checkpoint.every_minutes=0.005",
                     "--set", "checkpoint.keep=1000", "--set", "checkpoint.at_end=false", "--out", str(tmp_path)],
                    ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("ckpt-*.h5"))
    assert steps, "no time-triggered checkpoint"
    assert len(steps) <= result.summary["seconds"] / 0.3 + 1
    assert len(steps) < 60
