"""Threads per rank: the decision with a faked environment and mask, then real mpiexec runs.

The unit tests fake the launcher's variables, the affinity mask, the
launcher's own mask and the core topology, so they describe a 48-core node on
any machine. The mpiexec tests run with every thread variable removed from the
environment (conftest.py sets OMP_NUM_THREADS=1 for the suite) and check what
each rank really got: the count, the loaded BLAS's count and Numba's.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpcdl import threads
from hpcdl.errors import ConfigError
from hpcdl.threads import RankThreads, core_share, decide, expand_slurm_counts, review_job, review_node

ROOT = Path(__file__).resolve().parents[1]
NODE = frozenset(range(48))  # one 48-core node, no SMT, unless a test says otherwise
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "SLURM_CPUS_PER_TASK")


def plan(env: dict, cpus=NODE, parent=None, core_of=lambda cpu: cpu, threads_arg=None):
    return decide(threads_arg, env=env, cpus=cpus, parent_cpus=parent, core_of=core_of)


# -- the default: cores in the mask / local ranks ---------------------------------------------

def test_48_cores_and_2_local_ranks_give_24_each():
    p = plan({"MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0", "PMI_SIZE": "2"})
    assert p.threads == 24 and not p.explicit
    assert p.why == "24 = 48 cores in affinity mask / 2 local ranks (MPI_LOCALNRANKS)"


def test_open_mpi_local_size_is_read_and_wins_over_the_allocation_s_slurm_variables():
    # mpirun inside an sbatch job: the SLURM_* variables describe the batch job, not mpirun's layout.
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_SIZE": "8", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_NTASKS": "1"}
    p = plan(env)
    assert p.threads == 12 and p.local_ranks_from == "OMPI_COMM_WORLD_LOCAL_SIZE"


@pytest.mark.parametrize("per_node, node_id, expected_ranks", [
    ("2(x3),1", "0", 2), ("2(x3),1", "2", 2), ("2(x3),1", "3", 1), ("4,8", "1", 8)])
def test_slurm_step_tasks_per_node_is_read_for_this_node(per_node, node_id, expected_ranks):
    env = {"SLURM_LOCALID": "0", "SLURM_NODEID": node_id, "SLURM_STEP_TASKS_PER_NODE": per_node,
           "SLURM_NTASKS": "7"}
    p = plan(env)
    assert (p.local_ranks, p.local_ranks_from) == (expected_ranks, "SLURM_STEP_TASKS_PER_NODE")
    assert p.threads == 48 // expected_ranks


def test_slurm_ntasks_per_node_is_the_fallback_and_only_inside_a_step():
    inside = plan({"SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "3", "SLURM_NTASKS": "6"})
    assert (inside.threads, inside.local_ranks_from) == (16, "SLURM_NTASKS_PER_NODE")
    # The batch shell of an allocation is not an srun step: no SLURM_LOCALID, so the
    # per-node count says nothing about this process.
    batch_shell = plan({"SLURM_NTASKS_PER_NODE": "3", "SLURM_JOB_ID": "1"})
    assert batch_shell.threads == 48 and batch_shell.local_ranks is None


def test_expand_slurm_counts():
    assert expand_slurm_counts("2(x3),1") == [2, 2, 2, 1]
    assert expand_slurm_counts("16") == [16]
    with pytest.raises(ValueError):
        expand_slurm_counts("2(x)")


@pytest.mark.parametrize("cores, ranks, expected", [(48, 5, 9), (3, 2, 1), (1, 4, 1), (48, 48, 1), (48, 96, 1)])
def test_odd_counts_round_down_and_never_reach_zero(cores, ranks, expected):
    p = plan({"MPI_LOCALNRANKS": str(ranks)}, cpus=range(cores))
    assert p.threads == expected


def test_one_process_uses_every_core_of_its_mask():
    p = plan({}, cpus=range(8, 16))
    assert p.threads == 8 and p.why == "8 = 8 cores in affinity mask (one process)"


def test_unknown_local_count_under_a_launcher_assumes_every_rank_is_local():
    p = plan({"PMI_SIZE": "4", "PMI_RANK": "0"})
    assert p.threads == 12 and "node-local count unknown" in p.why


def test_hardware_threads_of_one_core_count_once():
    # 2-way SMT: CPUs 2k and 2k+1 are one core; 96 hardware threads, 48 cores.
    p = plan({"MPI_LOCALNRANKS": "2"}, cpus=range(96), core_of=lambda cpu: cpu // 2)
    assert p.threads == 24
    assert p.why == "24 = 48 cores (96 hardware threads) in affinity mask / 2 local ranks (MPI_LOCALNRANKS)"


# -- masks the launcher bound ---------------------------------------------------------------

def test_a_mask_the_launcher_narrowed_is_this_rank_s_own():
    p = plan({"MPI_LOCALNRANKS": "2"}, cpus=range(24), parent=NODE)
    assert p.threads == 24 and "own affinity mask" in p.why


def test_a_narrowed_mask_too_small_to_be_disjoint_is_still_divided():
    # Open MPI's default for > 2 ranks binds to the package: 4 ranks, two per 24-core package.
    p = plan({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, cpus=range(24), parent=NODE)
    assert p.threads == 6  # the guess before MPI starts; comparing masks gives 12 (next test)


def test_core_share_counts_each_core_once_per_rank_that_may_run_on_it():
    package0, package1 = frozenset(range(24)), frozenset(range(24, 48))
    assert core_share(package0, [package0, package0, package1, package1], lambda c: c) == 12
    assert core_share(package0, [package0, package1], lambda c: c) == 24
    assert core_share(NODE, [NODE, NODE], lambda c: c) == 24
    # Partial overlap: {0-3} and {2-5} share cores 2 and 3.
    a, b = frozenset(range(4)), frozenset(range(2, 6))
    assert core_share(a, [a, b], lambda c: c) == 3


class FakeNode:
    """The shared-memory communicator of one node whose other ranks have the given masks and settings."""

    def __init__(self, rank: int, others: dict):
        self.rank, self.others = rank, others

    def Get_rank(self):
        return self.rank

    def allgather(self, mine):
        return [mine if r == self.rank else self.others[r] for r in range(len(self.others) + 1)]

    def Free(self):
        pass


class FakeWorld:
    """COMM_WORLD of one node, seen from `rank`; gather hands back this rank's row and the given ones."""

    def __init__(self, rank: int, others: dict, other_rows=()):
        self.node, self.other_rows = FakeNode(rank, others), list(other_rows)

    def Get_rank(self):
        return self.node.rank

    def Split_type(self, split_type, key=0):
        return self.node

    def gather(self, row, root=0):
        return [row, *self.other_rows] if self.node.rank == root else None


def test_settle_divides_masks_shared_by_ranks_bound_to_one_package():
    # Open MPI's default for 4 ranks on 2 x 24 cores: two ranks on each package's 24 cores.
    package0, package1 = "0-23", "24-47"
    before = plan({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, cpus=range(24), parent=NODE)
    others = {1: (package0, None), 2: (package1, None), 3: (package1, None)}
    after = threads.settle(before, FakeWorld(0, others), core_of=lambda c: c, host="n1")
    assert after.threads == 12
    assert after.why == ("12 = 24 cores in affinity mask / 2 local ranks sharing it "
                         "(of 4 local ranks, OMPI_COMM_WORLD_LOCAL_SIZE)")
    assert [(row.rank, row.cpus, row.threads) for row in after.ranks] == [(0, package0, 12)]


def test_settle_keeps_disjoint_masks_whole_and_flags_overlap_and_oversubscription():
    own = threads.settle(plan({"MPI_LOCALNRANKS": "2"}, cpus=range(24)), FakeWorld(0, {1: ("24-47", None)}),
                         core_of=lambda c: c, host="n1")
    assert own.threads == 24 and own.notes == ()
    assert own.why == "24 = 24 cores in this rank's own affinity mask (2 local ranks on separate cores, MPI_LOCALNRANKS)"

    uneven = threads.settle(plan({"MPI_LOCALNRANKS": "2"}, cpus=range(4)), FakeWorld(0, {1: ("2-5", None)}),
                            core_of=lambda c: c, host="n1")
    assert uneven.threads == 3 and uneven.why.startswith("3 = 3 of 4 cores in affinity mask, shared in part")
    assert uneven.notes == ("n1: local ranks 0 and 1 share some but not all CPUs (0-3 vs 2-5): the binding is uneven",)

    # Rank 1 asked for 48 threads on the 48 cores both ranks share; rank 0 takes the default.
    crowded = threads.settle(plan({"MPI_LOCALNRANKS": "2"}), FakeWorld(0, {1: ("0-47", 48)}, [
        RankThreads(1, "n1", 1, "0-47", 48)]), core_of=lambda c: c, host="n1")
    assert crowded.threads == 24
    assert crowded.notes[0].startswith("n1: 2 local rank(s) run 72 threads on 48 cores (oversubscribed 1.5x)")
    assert crowded.notes[1] == ("threads per rank differ: 24 on rank 0, 48 on rank 1; "
                                "every step waits for the slowest rank")


# -- explicit settings win, in order ---------------------------------------------------------

@pytest.mark.parametrize("argument, env, expected, source", [
    (6, {"OMP_NUM_THREADS": "4", "SLURM_CPUS_PER_TASK": "2"}, 6, "--threads/runtime.threads"),
    (None, {"OMP_NUM_THREADS": "4", "SLURM_CPUS_PER_TASK": "2"}, 4, "OMP_NUM_THREADS"),
    (None, {"SLURM_CPUS_PER_TASK": "2", "MPI_LOCALNRANKS": "2"}, 2, "SLURM_CPUS_PER_TASK"),
    (None, {"OMP_NUM_THREADS": "8,2"}, 8, "OMP_NUM_THREADS"),  # one count per nesting level
    (None, {"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "3"}, 3, "SLURM_CPUS_PER_TASK"),
])
def test_explicit_settings_win_in_the_documented_order(argument, env, expected, source):
    p = plan({"MPI_LOCALNRANKS": "2", **env}, threads_arg=argument)
    assert (p.threads, p.explicit, p.why) == (expected, True, f"{expected} from {source}")


@pytest.mark.parametrize("var, value", [("OMP_NUM_THREADS", "abc"), ("OMP_NUM_THREADS", "0"),
                                        ("SLURM_CPUS_PER_TASK", "-1")])
def test_a_bad_thread_variable_is_a_one_line_error_naming_it(var, value):
    with pytest.raises(ConfigError, match=rf"^{var}='{re.escape(value)}': expected a positive whole number"):
        plan({var: value})


# -- findings worth a warning --------------------------------------------------------------

def test_review_node_reports_oversubscription_and_uneven_masks():
    notes = review_node("n1", [NODE, NODE], [48, 48], lambda c: c)
    assert len(notes) == 1 and notes[0].startswith("n1: 2 local rank(s) run 96 threads on 48 cores (oversubscribed 2.0x)")
    a, b = frozenset(range(4)), frozenset(range(2, 6))
    notes = review_node("n2", [a, b], [3, 3], lambda c: c)
    assert notes == ("n2: local ranks 0 and 1 share some but not all CPUs (0-3 vs 2-5): the binding is uneven",)
    assert review_node("n3", [frozenset(range(24)), frozenset(range(24, 48))], [24, 24], lambda c: c) == ()


def test_review_job_names_the_ranks_whose_counts_differ():
    rows = [RankThreads(r, "a" if r < 4 else "b", r % 4, "0-47", 24 if r < 4 else 12) for r in range(6)]
    rows[1] = RankThreads(1, "a", 1, "0-47", 24, ("a: something about node a",))
    assert review_job(rows) == ["a: something about node a",
                                "threads per rank differ: 24 on ranks 0-3, 12 on ranks 4-5; "
                                "every step waits for the slowest rank"]
    assert review_job([RankThreads(0, "a", 0, "0-1", 1), RankThreads(1, "a", 1, "0-1", 1)]) == []


def test_cpulist_round_trip():
    cpus = {0, 1, 2, 5, 7, 8, 9, 47}
    assert threads.format_cpulist(cpus) == "0-2,5,7-9,47"
    assert threads.parse_cpulist("0-2,5,7-9,47") == frozenset(cpus)


# -- applying it: the environment, the loaded BLAS, Numba --------------------------------------

def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(extra)
    return env


def test_pin_exports_the_count_and_raises_a_lower_numba_pool_and_resizes_a_loaded_blas():
    # OpenBLAS never starts more threads than the CPUs it sees, so 2 is the most this can ask for.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    code = textwrap.dedent("""
        import json, os
        from hpcdl.threads import pin_threads, loaded_blas
        pin_threads(2)
        exported = {v: os.environ.get(v) for v in
                    ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
        import numba, numpy
        before = (loaded_blas().threads(), numba.get_num_threads())
        pin_threads(1)  # late: NumPy is loaded, so the BLAS is resized through its own API
        print(json.dumps({"exported": exported, "before": before,
                          "after": (loaded_blas().threads(), numba.get_num_threads())}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(NUMBA_NUM_THREADS="1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exported"] == {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                  "NUMBA_NUM_THREADS": "2"}
    assert result["before"] == [2, 2]
    assert result["after"] == [1, 1]


def test_pin_sets_a_passive_openmp_pool_before_numba_loads_it_unless_the_user_chose():
    # libgomp reads OMP_WAIT_POLICY once, when it loads; numba.set_num_threads in pin_threads loads it
    code = textwrap.dedent("""
        import os, sys
        from hpcdl.threads import pin_threads
        pin_threads(1)
        from numba.np.ufunc import parallel
        print(os.environ.get("OMP_WAIT_POLICY"), parallel._is_initialized)
    """)
    env = {k: v for k, v in clean_env().items() if k != "OMP_WAIT_POLICY"}
    for extra, want in (({}, "PASSIVE True"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE True")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == want


# -- real mpiexec runs ----------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys
    from hpcdl.threads import count_cores, current, loaded_blas, pin_threads
    threads = pin_threads(settle_with_mpi=True)
    import numba, numpy
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    mask = sorted(os.sched_getaffinity(0))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"threads": threads, "mask": mask, "cores": count_cores(mask), "why": current().why,
                   "blas": loaded_blas().threads(), "numba": numba.get_num_threads(),
                   "env": os.environ["OMP_NUM_THREADS"], "notes": list(current().notes)}, f)
""")


def run_group(command: list[str], env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run in a process group of its own; kill the group on timeout so no rank outlives the test."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{command} still running after {timeout} s (hang).\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def probe(tmp_path: Path, *mpiexec_options: str, ranks: int = 2, env: dict | None = None) -> list[dict]:
    result = run_group(["mpiexec", "-n", str(ranks), *mpiexec_options, sys.executable, "-c", PROBE, str(tmp_path)],
                       env=env or clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.mpi
def test_under_mpiexec_with_no_thread_variables_each_rank_gets_half_its_cores(tmp_path):
    for rank in probe(tmp_path):
        half = max(1, rank["cores"] // 2)
        assert rank["threads"] == half, rank
        assert (rank["blas"], rank["numba"], rank["env"]) == (half, half, str(half)), rank
        assert rank["why"] == (f"{half} = {rank['cores']} cores in affinity mask / 2 local ranks sharing it "
                               f"(MPI_LOCALNRANKS)"), rank


@pytest.mark.mpi
def test_ranks_bound_to_separate_cores_each_use_their_own_mask(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to bind 2 ranks apart")
    ranks = probe(tmp_path, "-bind-to", "core")
    masks = [set(r["mask"]) for r in ranks]
    assert not masks[0] & masks[1], f"hydra's -bind-to core did not bind apart: {masks}"
    for rank in ranks:
        assert rank["threads"] == rank["cores"] == rank["blas"], rank
        assert "own affinity mask (2 local ranks on separate cores" in rank["why"], rank


@pytest.mark.mpi
def test_hpcdl_info_under_mpiexec_shows_each_rank_and_warns_when_counts_differ():
    # MPMD: rank 1 alone asks for 2 threads; rank 0 takes the default.
    command = ["mpiexec", "-n", "1", sys.executable, "-m", "hpcdl", "info", ":",
               "-n", "1", "env", "OMP_NUM_THREADS=2", sys.executable, "-m", "hpcdl", "info"]
    result = run_group(command, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("threads_per_rank") == 1, "rank 0 alone prints"
    cores = threads.count_cores(os.sched_getaffinity(0))
    default = max(1, cores // 2)
    assert f"threads_per_rank      {default} = {cores} cores in affinity mask / 2 local ranks sharing it" in out
    rows = re.findall(r"^\s+(\d)\s+\S+\s+(\d)\s+(\S+)\s+(\d+)$", out, flags=re.M)
    assert [(r, local, int(t)) for r, local, _, t in rows] == [("0", "0", default), ("1", "1", 2)]
    assert f"threads per rank differ: {default} on rank 0, 2 on rank 1" in out
    if default + 2 > cores:
        assert f"run {default + 2} threads on {cores} cores (oversubscribed" in out


@pytest.mark.mpi
def test_a_bad_thread_variable_on_one_rank_stops_every_rank_with_one_line():
    command = ["mpiexec", "-n", "1", sys.executable, "-m", "hpcdl", "info", ":",
               "-n", "1", "env", "OMP_NUM_THREADS=lots", sys.executable, "-m", "hpcdl", "info"]
    result = run_group(command, env=clean_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("hpcdl: error: rank 1: OMP_NUM_THREADS='lots': expected a positive whole "
                                     "number of threads per rank")


@pytest.mark.mpi
def test_train_banner_shows_the_count_and_why(tmp_path):
    from trainer_runs import HPCDL, TINY

    command = ["mpiexec", "-n", "2", *HPCDL, "train", *TINY, "--set", "train.max_steps=2", "--set", "schedule.warmup_epochs=0", "--out", str(tmp_path)]
    result = run_group(command, env=clean_env(), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    cores = threads.count_cores(os.sched_getaffinity(0))
    half = max(1, cores // 2)
    assert f"2 rank(s) x {half} thread(s)" in result.stderr
    assert (f"hpcdl: threads {half} = {cores} cores in affinity mask / 2 local ranks sharing it (MPI_LOCALNRANKS)"
            in result.stderr.splitlines())
