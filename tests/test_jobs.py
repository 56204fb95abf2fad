"""The job scripts in jobs/: shellcheck, and each one's DRY_RUN launch line with its binding and thread exports.

Each dry run describes a compute node with NODE_CORES/NODE_SOCKETS/NODE_NUMA
(2 sockets x 24 cores unless a test says otherwise) and fakes the Slurm or PBS
variables the script reads, so the lines are the ones a cluster would run. A
launcher that records its calls stands in for mpirun/srun: a dry run must
never start it. One test then runs a script's launch line for real under
MPICH's mpiexec and checks where each rank may run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SCRIPTS = sorted(p for p in JOBS.iterdir() if p.suffix in (".sh", ".sbatch", ".pbs"))
XEON = {"NODE_CORES": "48", "NODE_SOCKETS": "2", "NODE_NUMA": "2"}
THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LAUNCHER_VARS = ("SLURM_", "PBS_", "OMPI_", "PMI_", "MPI_LOCAL")


@pytest.fixture
def recorder(tmp_path):
    """A launcher that logs every call: the dry runs below must leave its log empty."""
    log = tmp_path / "launched.log"
    fake = tmp_path / "launcher"
    fake.write_text(f'#!/usr/bin/env bash\necho "$0 $*" >> {log}\n')
    fake.chmod(0o755)
    return fake, log


def dry_run(script: str, *args: str, env: dict | None = None, expect_rc: int = 0) -> list[str]:
    """Run `script` with DRY_RUN=1 and a clean environment; return its stdout lines."""
    base = {k: v for k, v in os.environ.items()
            if k not in THREAD_VARS and not k.startswith(LAUNCHER_VARS) and k not in XEON}
    result = subprocess.run([str(JOBS / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**base, "DRY_RUN": "1", **(env or {})})
    assert result.returncode == expect_rc, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines() if expect_rc == 0 else [result.stderr.strip()]


def exports(threads: int) -> list[str]:
    return [f"export OMP_NUM_THREADS={threads}", f"export NUMBA_NUM_THREADS={threads}"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    result = subprocess.run(["shellcheck", "-x", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_script_is_covered_by_a_dry_run_test():
    sourced = {"binding.sh", "restart_common.sh"}
    assert {p.name for p in SCRIPTS} - sourced == {
        "mpirun_fmnist.sh", "mpirun_xeon.sh", "slurm_train.sbatch", "pbs_train.pbs", "scaling_study.sh",
        "restart_mpirun.sh", "restart_srun.sh", "study_full.sh",
        "mpirun_ulfm.sh", "slurm_ulfm.sbatch"}  # the ULFM two: dry runs in tests/test_elastic.py


# -- one machine --------------------------------------------------------------------------

@pytest.mark.parametrize("flavor, binding", [
    ("hydra", "-ppn 2 -bind-to core:4 -map-by core:4 -genv OMP_NUM_THREADS 4 -genv NUMBA_NUM_THREADS 4"),
    ("openmpi", "--map-by ppr:2:node:PE=4 --bind-to core -x OMP_NUM_THREADS -x NUMBA_NUM_THREADS"),
])
def test_mpirun_fmnist_splits_the_cores_among_the_ranks(recorder, flavor, binding):
    launcher, log = recorder
    lines = dry_run("mpirun_fmnist.sh", "--set", "train.epochs=1",
                    env={"MPIEXEC": str(launcher), "MPI_FLAVOR": flavor, "NODE_CORES": "8"})
    assert lines == exports(4) + [
        f"{launcher} -n 2 {binding} hpcdl train --config jobs/configs/fmnist_cnn.toml --out runs/fmnist_cnn "
        "--set train.epochs=1"]
    assert not log.exists(), "a dry run started the launcher"


def test_mpirun_fmnist_tells_the_mpi_from_its_version_and_quotes_arguments():
    lines = dry_run("mpirun_fmnist.sh", "--set", "model.name='mlp'", env={"NP": "1", "NODE_CORES": "2"})
    assert lines[-1] == ("mpiexec -n 1 -ppn 1 -bind-to core:2 -map-by core:2 -genv OMP_NUM_THREADS 2 "
                         "-genv NUMBA_NUM_THREADS 2 hpcdl train --config jobs/configs/fmnist_cnn.toml "
                         "--out runs/fmnist_cnn --set 'model.name='\\''mlp'\\'''")


def test_mpirun_fmnist_does_not_bind_ranks_that_do_not_fit(recorder):
    launcher, _ = recorder
    lines = dry_run("mpirun_fmnist.sh", env={"MPIEXEC": str(launcher), "MPI_FLAVOR": "hydra", "NODE_CORES": "2",
                                             "NP": "3"})
    assert lines == exports(1) + [f"{launcher} -n 3 -genv OMP_NUM_THREADS 1 -genv NUMBA_NUM_THREADS 1 hpcdl train "
                                  "--config jobs/configs/fmnist_cnn.toml --out runs/fmnist_cnn"]


# -- Xeon nodes with mpirun -------------------------------------------------------------------

@pytest.mark.parametrize("flavor, env, np, binding, threads", [
    ("openmpi", {}, 2, "--map-by ppr:1:socket:PE=24 --bind-to core -x OMP_NUM_THREADS -x NUMBA_NUM_THREADS", 24),
    ("hydra", {}, 2, "-ppn 2 -bind-to core:24 -map-by socket -genv OMP_NUM_THREADS 24 -genv NUMBA_NUM_THREADS 24",
     24),
    ("openmpi", {"BIND_UNIT": "numa", "NODE_NUMA": "4"}, 4,
     "--map-by ppr:1:numa:PE=12 --bind-to core -x OMP_NUM_THREADS -x NUMBA_NUM_THREADS", 12),
    ("hydra", {"BIND_UNIT": "numa", "NODE_NUMA": "4"}, 4,
     "-ppn 4 -bind-to core:12 -map-by numa -genv OMP_NUM_THREADS 12 -genv NUMBA_NUM_THREADS 12", 12),
    ("openmpi", {"RANKS_PER_UNIT": "2"}, 4,
     "--map-by ppr:2:socket:PE=12 --bind-to core -x OMP_NUM_THREADS -x NUMBA_NUM_THREADS", 12),
    ("openmpi", {"BIND_UNIT": "none"}, 2, "-x OMP_NUM_THREADS -x NUMBA_NUM_THREADS", 24),
])
def test_mpirun_xeon_puts_one_rank_per_socket_or_numa_domain(recorder, flavor, env, np, binding, threads):
    launcher, log = recorder
    lines = dry_run("mpirun_xeon.sh", "--config", "c.toml",
                    env={**XEON, "MPIEXEC": str(launcher), "MPI_FLAVOR": flavor, **env})
    assert lines == exports(threads) + [f"{launcher} -n {np} {binding} hpcdl train --config c.toml"]
    assert not log.exists()


@pytest.mark.parametrize("flavor, hosts", [("openmpi", "--hostfile {file}"), ("hydra", "-f {file}")])
def test_mpirun_xeon_counts_the_nodes_of_a_hostfile(recorder, tmp_path, flavor, hosts):
    launcher, _ = recorder
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the allocation\nnode1 slots=2\nnode2 slots=2\n\nnode3 slots=2\n")
    lines = dry_run("mpirun_xeon.sh", env={**XEON, "MPIEXEC": str(launcher), "MPI_FLAVOR": flavor,
                                           "HOSTFILE": str(hostfile)})
    assert lines[-1].startswith(f"{launcher} -n 6 {hosts.format(file=hostfile)} ")


@pytest.mark.parametrize("env, message", [
    ({"BIND_UNIT": "board"}, "mpirun_xeon.sh: BIND_UNIT=board: expected socket, numa or node"),
    ({"RANKS_PER_UNIT": "two"}, "mpirun_xeon.sh: RANKS_PER_UNIT=two must be a positive whole number"),
    ({"MPI_FLAVOR": "lam"}, "mpirun_xeon.sh: MPI_FLAVOR=lam: expected openmpi or hydra"),
    ({"HOSTFILE": "/nonexistent/hosts"}, "mpirun_xeon.sh: HOSTFILE=/nonexistent/hosts: cannot read it"),
    ({"MPI_FLAVOR": "", "MPIEXEC": "/bin/true"},
     "mpirun_xeon.sh: cannot tell which MPI '/bin/true --version' belongs to; set MPI_FLAVOR=openmpi or "
     "MPI_FLAVOR=hydra"),
])
def test_mpirun_xeon_rejects_bad_settings_with_one_line(env, message):
    assert dry_run("mpirun_xeon.sh", env={**XEON, "MPI_FLAVOR": "hydra", **env}, expect_rc=2) == [message]


# -- Slurm ---------------------------------------------------------------------------------

SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "hpcdl-train", "SLURM_NTASKS": "4",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "24", "SLURM_JOB_NUM_NODES": "2"}


def test_slurm_batch_script_binds_each_rank_to_its_cores(recorder):
    launcher, log = recorder
    lines = dry_run("slurm_train.sbatch", env={**SLURM_JOB, "SRUN": str(launcher)})
    assert lines == exports(24) + [
        f"{launcher} --ntasks=4 --kill-on-bad-exit=1 --cpus-per-task=24 --cpu-bind=cores hpcdl train "
        "--config jobs/configs/fmnist_cnn.toml --out runs/hpcdl-train --resume auto"]
    assert not log.exists() and not (ROOT / "runs" / "hpcdl-train" / "restarts.log").exists()


def test_slurm_batch_script_takes_the_thread_count_apart_from_the_cpus_on_smt_nodes(recorder):
    launcher, _ = recorder
    lines = dry_run("slurm_train.sbatch", env={**SLURM_JOB, "SLURM_CPUS_PER_TASK": "48", "THREADS_PER_RANK": "24",
                                               "SRUN": str(launcher)})
    assert lines[:2] == exports(24) and "--cpus-per-task=48 --cpu-bind=cores" in lines[2]


def test_batch_scripts_outside_their_scheduler_say_so_in_one_line():
    assert dry_run("slurm_train.sbatch", expect_rc=2) == [
        "slurm_train.sbatch: SLURM_NTASKS is not set: submit this with sbatch (for DRY_RUN=1, set SLURM_NTASKS, "
        "SLURM_NTASKS_PER_NODE, SLURM_CPUS_PER_TASK, SLURM_JOB_NAME)"]
    assert dry_run("pbs_train.pbs", env={"PBS_O_WORKDIR": str(ROOT)}, expect_rc=2) == [
        "pbs_train.pbs: PBS_NODEFILE is not set: submit this with qsub (for DRY_RUN=1, point it at a file of "
        "host names)"]


def test_srun_wrapper_binds_by_default_and_exports_the_cpus_per_task(recorder):
    launcher, _ = recorder
    lines = dry_run("restart_srun.sh", "hpcdl", "train", env={"SRUN": str(launcher), "SLURM_NTASKS": "8",
                                                              "SLURM_CPUS_PER_TASK": "12"})
    assert lines == exports(12) + [
        f"{launcher} --ntasks=8 --kill-on-bad-exit=1 --cpus-per-task=12 --cpu-bind=cores hpcdl train --resume auto"]


# -- PBS and the mpirun wrapper ------------------------------------------------------------------

@pytest.mark.parametrize("flavor, flags", [
    ("openmpi", "--hostfile {nodes} --map-by ppr:1:socket:PE=24 --bind-to core -x OMP_NUM_THREADS "
                "-x NUMBA_NUM_THREADS"),
    ("hydra", "-f {nodes} -ppn 2 -bind-to core:24 -map-by socket -genv OMP_NUM_THREADS 24 "
              "-genv NUMBA_NUM_THREADS 24"),
])
def test_pbs_script_binds_one_rank_per_socket(recorder, tmp_path, flavor, flags):
    launcher, log = recorder
    nodes = tmp_path / "nodefile"
    nodes.write_text("cn01\ncn01\ncn02\ncn02\n")  # select=2:mpiprocs=2
    lines = dry_run("pbs_train.pbs", env={**XEON, "MPIEXEC": str(launcher), "MPI_FLAVOR": flavor,
                                          "PBS_NODEFILE": str(nodes), "PBS_JOBNAME": "hpcdl-train",
                                          "PBS_O_WORKDIR": str(ROOT)})
    assert lines == exports(24) + [
        f"{launcher} -n 4 {flags.format(nodes=nodes)} hpcdl train --config jobs/configs/fmnist_cnn.toml "
        "--out runs/hpcdl-train --resume auto"]
    assert not log.exists()


def test_pbs_script_honours_the_ompthreads_pbs_sets(recorder, tmp_path):
    launcher, _ = recorder
    nodes = tmp_path / "nodefile"
    nodes.write_text("cn01\n" * 4)
    lines = dry_run("pbs_train.pbs", env={**XEON, "MPIEXEC": str(launcher), "MPI_FLAVOR": "openmpi",
                                          "PBS_NODEFILE": str(nodes), "OMP_NUM_THREADS": "12"})
    assert lines[:2] == exports(12) and "--map-by ppr:2:socket:PE=12 --bind-to core" in lines[2]


def test_mpirun_wrapper_dry_run_prints_the_first_attempt(recorder):
    launcher, log = recorder
    lines = dry_run("restart_mpirun.sh", "--np", "4 2", "--", "hpcdl", "train", "--config", "c.toml",
                    env={"MPIEXEC": str(launcher), "MPIEXEC_FLAGS": "-bind-to core:2 -map-by socket"})
    assert lines == [f"{launcher} -n 4 -bind-to core:2 -map-by socket hpcdl train --config c.toml --resume auto"]
    assert not log.exists()


# -- the scaling study -------------------------------------------------------------------------

def test_scaling_study_binds_each_rank_count(recorder):
    launcher, log = recorder
    lines = dry_run("scaling_study.sh", env={**XEON, "MPIEXEC": str(launcher), "MPI_FLAVOR": "openmpi",
                                             "RANKS": "2 4", "RANKS_PER_NODE": "2", "OUT": "out"})
    binding = "--map-by ppr:2:node:PE=24 --bind-to core -x OMP_NUM_THREADS -x NUMBA_NUM_THREADS"
    assert lines == (
        exports(24) + [f"{launcher} -n 2 {binding} hpcdl bench allreduce --json out/allreduce-2.json "
                       "--save-crossovers out/crossovers.json"]
        + exports(24) + [f"{launcher} -n 4 {binding} hpcdl bench allreduce --json out/allreduce-4.json "
                         "--save-crossovers out/crossovers.json"]
        + exports(24) + [f"{launcher} -n 2 {binding} hpcdl scaling --model resnet18 --input-shape 3,32,32 "
                         "--per-rank-batch 32 --bench-json 'out/allreduce-*.json' --json out/scaling-2.json"]
        + exports(24) + [f"{launcher} -n 4 {binding} hpcdl scaling --model resnet18 --input-shape 3,32,32 "
                         "--per-rank-batch 32 --bench-json 'out/allreduce-*.json' --json out/scaling-4.json"])
    assert not log.exists() and not (ROOT / "out").exists()


# -- a launch line run for real ----------------------------------------------------------------

def real_mpiexec() -> str:
    """Hydra's own binary: a pyenv shim named mpiexec would put its own bin first on PATH."""
    for candidate in (Path(sys.prefix) / "bin" / "mpiexec", Path(sys.base_prefix) / "bin" / "mpiexec"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("mpiexec")
    assert found, "mpiexec not found (pip install mpich)"
    return found


@pytest.mark.mpi
def test_mpirun_fmnist_launch_line_binds_each_rank_to_its_own_cores(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to bind 2 ranks apart")
    # A stand-in `hpcdl` on PATH reports where each rank may run and what it was told.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    probe = ("import json, os, sys; r = os.environ['PMI_RANK']; "
             "json.dump({'cpus': sorted(os.sched_getaffinity(0)), 'omp': os.environ['OMP_NUM_THREADS'], "
             "'numba': os.environ['NUMBA_NUM_THREADS'], 'args': sys.argv[1:]}, "
             f"open(os.path.join({str(tmp_path)!r}, 'rank' + r + '.json'), 'w'))")
    (bin_dir / "hpcdl").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -c \"{probe}\" \"$@\"\n")
    (bin_dir / "hpcdl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and not k.startswith(LAUNCHER_VARS)}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", MPIEXEC=real_mpiexec(), NODE_CORES=str(len(cpus)), NP="2")
    result = subprocess.run([str(JOBS / "mpirun_fmnist.sh"), "--set", "train.epochs=1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    per_rank = len(cpus) // 2
    assert [len(r["cpus"]) for r in ranks] == [per_rank, per_rank]
    assert not set(ranks[0]["cpus"]) & set(ranks[1]["cpus"]), ranks
    assert all(r["omp"] == r["numba"] == str(per_rank) for r in ranks)
    assert ranks[0]["args"] == ["train", "--config", "jobs/configs/fmnist_cnn.toml", "--out", "runs/fmnist_cnn",
                                "--set", "train.epochs=1"]


# -- the large-batch study ---------------------------------------------------------------------

def test_study_full_runs_one_shard_per_array_task_with_srun_per_cell(recorder):
    launcher, log = recorder
    lines = dry_run("study_full.sh", env={"SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "12", "SRUN": str(launcher),
                                          "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"})
    assert lines == exports(12) + [
        f"hpcdl study large-batch --grid full --out runs/study-full --resume --ranks 4 --mpiexec '{launcher} "
        "--kill-on-bad-exit=1 --cpus-per-task=12 --cpu-bind=cores' --shard 3/8"]
    assert "--shard" not in dry_run("study_full.sh", env={"SLURM_NTASKS": "2", "SRUN": str(launcher)})[-1]
    assert not log.exists()
    assert dry_run("study_full.sh", env={"SLURM_NTASKS": "2", "SLURM_ARRAY_TASK_ID": "4", "SHARDS": "4"},
                   expect_rc=2) == ["study_full.sh: array task 4 >= SHARDS=4: use --array=0-3"]
