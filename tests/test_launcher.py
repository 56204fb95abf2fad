"""The launcher consistency check: MPI's world against the launcher's variables."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hpcdl import launcher
from trainer_runs import HPCDL, TINY

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL", "HYDRA_")


def clean_env(**extra) -> dict:
    """This process's environment without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **extra}


def train(args, env, timeout=120):
    started = time.perf_counter()
    proc = subprocess.run([*HPCDL, "train", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return proc, time.perf_counter() - started


# -- which variables count -------------------------------------------------------------------

def test_mpi_launchers_come_before_slurm_and_an_allocation_alone_is_no_launch():
    slurm_step = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
                  "SLURM_LOCALID": "0"}
    # Open MPI's mpirun in an allocation: its daemons' srun step counts nodes, not ranks
    said = launcher.announced({**slurm_step, "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"})
    assert (said.size, said.rank, said.kind) == (8, 5, "openmpi")
    assert launcher.announced({"PMI_SIZE": "3", "PMI_RANK": "2"}).kind == "pmi"
    assert launcher.announced({"PMIX_RANK": "3"}) == launcher.Announced(None, 3, "PMIX_RANK=3", "pmix")
    assert (launcher.announced(slurm_step).size, launcher.announced(slurm_step).rank) == (2, 1)
    in_step = {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "3", "SLURM_LOCALID": "1", "SLURM_PROCID": "1"}
    assert launcher.announced(in_step).size == 4
    # salloc / sbatch without srun: the allocation's task count says nothing about this process
    assert launcher.announced({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "17"}) is None
    assert launcher.announced({}) is None


def test_mismatch_names_both_sizes_and_the_fix():
    said = launcher.announced({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"})
    text = launcher.mismatch(said, 1, 0)
    assert "4 processes" in text and "world of 1" in text and "srun --mpi=pmix" in text
    assert "\n" not in text
    assert launcher.mismatch(said, 4, 0) is None
    ompi = launcher.announced({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"})
    assert "build mpi4py against the site MPI" in launcher.mismatch(ompi, 1, 0)
    # PMIx gives only a rank: rank 3 in a world of 1 is a mismatch, rank 0 is not
    assert launcher.mismatch(launcher.announced({"PMIX_RANK": "3"}), 1, 0) is not None
    assert launcher.mismatch(launcher.announced({"PMIX_RANK": "0"}), 1, 0) is None


# -- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("variables, names", [
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE=4"),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
      "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}, "SLURM_STEP_NUM_TASKS=4"),
], ids=["openmpi-mpirun", "srun-step"])
def test_a_world_of_one_under_a_launcher_of_four_exits_2_before_training(tmp_path, variables, names):
    out = tmp_path / "run"
    proc, seconds = train(["--config", "jobs/configs/fmnist_cnn.toml", "--out", str(out)], clean_env(**variables))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert names in lines[0] and "world of 1" in lines[0] and "4 processes" in lines[0]
    assert not out.exists()  # no data read, no run directory made
    print(f"exit 2 after {seconds:.2f} s")


def test_only_the_launchers_rank_0_prints_it():
    env = clean_env(SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3", SLURM_STEP_ID="0", SLURM_LOCALID="3")
    proc, _ = train(["--config", "jobs/configs/fmnist_cnn.toml"], env)
    assert proc.returncode == 2 and proc.stderr.strip() == ""


@pytest.mark.mpi
def test_a_plain_process_inside_an_allocation_still_trains(tmp_path):
    env = clean_env(SLURM_NTASKS="4", SLURM_JOB_ID="1", SLURM_NNODES="1")
    proc, _ = train([*TINY, "--set", "train.max_steps=4", "--set", "schedule.warmup_epochs=0", "--out", str(tmp_path / "run")], env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"world_size": 1' in proc.stdout
