"""Fail-fast guards under real mpiexec, the stall report, and the restart wrappers in jobs/."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcdl.errors import UserError
from hpcdl.guard import ConsistencyError, check_consistency, format_ranks

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi_scripts"
JOBS = ROOT / "jobs"


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_group(command: list[str], *, timeout: float = 60, env: dict | None = None) -> Finished:
    """Run `command` in its own process group; on timeout kill the whole group, so no rank outlives the test."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{command} still running after {timeout} s; killed.\n{out[-2000:]}\n{err[-2000:]}")
    return Finished(proc.returncode, out, err, time.monotonic() - started)


def mpiexec(n: int, script: str, *args: str, timeout: float = 60) -> Finished:
    return run_group(["mpiexec", "-n", str(n), sys.executable, str(SCRIPTS / script), *args], timeout=timeout)


def rank_results(directory: Path, n: int) -> list[dict]:
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(n)]


# -- one rank fails: the job ends at once ----------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("mode, header", [
    ("raise", "hpcdl: rank 1/3 on {host}: uncaught RuntimeError: rank one failed on purpose — aborting all ranks"),
    ("thread", "hpcdl: rank 1/3 on {host}: uncaught ValueError in thread 'prefetch': prefetch thread failed on purpose"
               " — aborting all ranks"),
], ids=["main-thread", "helper-thread"])
def test_an_uncaught_exception_on_one_rank_aborts_every_rank(tmp_path, mode, header):
    import socket

    stamp = tmp_path / "failed_at"
    result = mpiexec(3, "guard_abort.py", mode, str(stamp), timeout=30)
    failure_to_exit = time.time() - float(stamp.read_text())
    assert result.returncode == 1, result.stderr
    assert result.seconds < 10 and failure_to_exit < 10
    headers = [line for line in result.stderr.splitlines() if line.startswith("hpcdl: rank")]
    assert headers == [header.format(host=socket.gethostname())]
    assert "Traceback (most recent call last)" in result.stderr
    assert "unreachable barrier passed" not in result.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("mode, failing_rank", [("user-error", 1), ("abort", 2)])
def test_user_errors_on_one_rank_abort_with_exit_code_2(tmp_path, mode, failing_rank):
    result = mpiexec(3, "guard_abort.py", mode, str(tmp_path / "stamp"), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.seconds < 10
    assert f"hpcdl: rank {failing_rank}/3 on " in result.stderr
    assert ("uncaught DataError: data file /no/such/shard.h5" if mode == "user-error"
            else "train.h5 on this node is truncated — aborting all ranks") in result.stderr


@pytest.mark.mpi
def test_a_sigkilled_rank_ends_the_job_quickly(tmp_path):
    """hydra's mpiexec kills the survivors itself; the watchdog threads must not stand in its way."""
    stamp = tmp_path / "killed_at"
    result = mpiexec(3, "guard_abort.py", "kill", str(stamp), timeout=30)
    kill_to_exit = time.time() - float(stamp.read_text())
    assert result.returncode != 0
    assert kill_to_exit < 10, f"mpiexec needed {kill_to_exit:.1f} s after the kill"
    assert "unreachable barrier passed" not in result.stdout


@pytest.mark.mpi
@pytest.mark.slow
def test_without_the_guard_one_failing_rank_hangs_the_job(tmp_path):
    """The measurement that motivates install_abort_on_exception (MPICH 5.0 wheel)."""
    with pytest.raises(AssertionError, match="still running after 8 s"):
        mpiexec(3, "guard_abort.py", "unguarded", str(tmp_path / "stamp"), timeout=8)


def test_without_mpi_the_hook_exits_1_and_never_imports_mpi4py():
    code = textwrap.dedent("""
        import sys, threading
        from hpcdl import guard
        guard.install_abort_on_exception()
        assert "mpi4py" not in sys.modules
        if sys.argv[1] == "thread":
            threading.Thread(target=lambda: 1 / 0, name="loader").start()
            threading.Event().wait()  # waits for the dead thread forever without the hook
        raise KeyError("missing")
    """)
    for mode, expected in (("main", "uncaught KeyError: 'missing'"), ("thread", "uncaught ZeroDivisionError in thread 'loader'")):
        result = run_group([sys.executable, "-c", code, mode], timeout=30, env={"PMI_RANK": "", "PMI_SIZE": ""})
        assert result.returncode == 1, result.stderr
        assert "hpcdl: rank 0/1 on " in result.stderr and expected in result.stderr


def test_abort_without_mpi_exits_with_its_code():
    result = run_group([sys.executable, "-c", "from hpcdl import guard; guard.abort('shard 3 unreadable', code=2)"],
                       timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("shard 3 unreadable — aborting all ranks")


# -- start-up consistency ---------------------------------------------------------------------------


@pytest.mark.mpi
def test_ranks_that_disagree_all_raise_the_same_error_within_a_second(tmp_path):
    mpiexec(3, "guard_consistency.py", str(tmp_path), "1", "model", timeout=60)
    results = rank_results(tmp_path, 3)
    assert all(r["raised"] and r["collective"] for r in results)
    assert len({r["message"] for r in results}) == 1
    message = results[0]["message"]
    assert message.startswith("ranks disagree on model: ranks 0,2 have '3f9a1c0e27d4b6a8', rank 1 has ")
    assert "config" not in message.split(";")[0]
    assert max(r["seconds"] for r in results) < 1.0


@pytest.mark.mpi
def test_ranks_that_agree_pass(tmp_path):
    mpiexec(3, "guard_consistency.py", str(tmp_path), timeout=60)
    assert not any(r["raised"] for r in rank_results(tmp_path, 3))


class GatheredComm:
    """What allgather would return on each rank, for message-formatting cases without MPI."""

    def __init__(self, per_rank_fields):
        from hpcdl.guard import _fingerprint

        self.gathered = [{k: _fingerprint(v) for k, v in fields.items()} for fields in per_rank_fields]

    def allgather(self, mine):
        return self.gathered


def test_message_groups_ranks_shows_short_values_and_hashes_long_ones():
    signature_a, signature_b = "a" * 40, "b" * 40
    fields = [{"arena": signature_a, "world_batch": "256", "seed": "0"} for _ in range(6)]
    fields[4]["arena"] = signature_b
    fields[1]["world_batch"] = fields[2]["world_batch"] = fields[3]["world_batch"] = "128"
    del fields[5]["seed"]
    with pytest.raises(ConsistencyError) as info:
        check_consistency(GatheredComm(fields), fields[0])
    error = info.value
    assert isinstance(error, UserError) and error.collective
    message = str(error)
    assert "\n" not in message
    assert message.startswith("ranks disagree on arena, world_batch, seed: arena: ranks 0-3,5 have ")
    assert "rank 4 has " in message and signature_b not in message  # long values show as a short hash
    assert "world_batch: ranks 0,4-5 have '256', ranks 1-3 have '128'" in message  # a tie: rank 0's group first
    assert "seed: ranks 0-4 have '0', rank 5 has <missing>" in message
    assert error.mismatches["world_batch"] == {"'256'": [0, 4, 5], "'128'": [1, 2, 3]}


def test_format_ranks_collapses_runs():
    assert format_ranks([3]) == "rank 3"
    assert format_ranks([5, 0, 1, 2, 7, 8]) == "ranks 0-2,5,7-8"


# -- stall report ------------------------------------------------------------------------------------


def stall_reports(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hpcdl: stall:")]


@pytest.mark.mpi
def test_stall_report_names_the_straggler_and_its_phase_once(tmp_path):
    result = mpiexec(3, "guard_stall.py", "straggler", str(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    reports = stall_reports(result.stderr)
    assert len(reports) == 1, result.stderr  # rank 2 waits in the same barrier and leaves the report to rank 0
    report = reports[0]
    assert report.startswith("hpcdl: stall: rank 0 waiting 1 s in barrier at step 7; ")
    assert "rank 1 last at step 7 phase backward for " in report and "(answered, not waiting)" in report
    assert "rank 2 waiting in barrier at step 7" in report
    assert report.endswith("suspects: rank 1")
    per_rank = rank_results(tmp_path, 3)
    assert [len(r["reports"]) for r in per_rank] == [1, 0, 0]


@pytest.mark.mpi
def test_stall_report_names_a_rank_that_does_not_answer(tmp_path):
    import socket

    result = mpiexec(3, "guard_stall.py", "silent", str(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    reports = stall_reports(result.stderr)
    assert len(reports) == 1, result.stderr
    assert "rank 1 last at step 7 phase backward" in reports[0]
    assert f"rank 2 ({socket.gethostname()}) no answer (dead or hung)" in reports[0]
    assert reports[0].endswith("suspects: ranks 1-2")


@pytest.mark.mpi
def test_no_report_when_nobody_is_late(tmp_path):
    result = mpiexec(3, "guard_stall.py", "none", str(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert stall_reports(result.stderr) == []


# -- restart wrappers ---------------------------------------------------------------------------------

FAKE_HPCDL = """#!/usr/bin/env bash
# Stands in for `hpcdl train`: logs its arguments and world size, exits with
# the FAKE_EXIT_CODES entry of this attempt ("wait": run until SIGUSR1).
read -r -a codes <<<"$FAKE_EXIT_CODES"
i=$((HPCDL_RESTART_ATTEMPT - 1))
(( i < ${#codes[@]} )) || i=$((${#codes[@]} - 1))
if [[ ${codes[$i]} == wait ]]; then
    # The handler is in place before the attempt is logged: the tests signal once they see the line.
    sleep 60 & sleeper=$!
    trap 'kill $sleeper 2>/dev/null; echo "rank=${PMI_RANK:-0} got USR1" >> "$FAKE_LOG"; exit 1' USR1
fi
echo "attempt=$HPCDL_RESTART_ATTEMPT size=${PMI_SIZE:-1} rank=${PMI_RANK:-0} args=$*" >> "$FAKE_LOG"
if [[ ${codes[$i]} == wait ]]; then
    wait $sleeper
    exit 0
fi
exit "${codes[$i]}"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: logs its options, runs the command as one task of --ntasks.
echo "srun $*" >> "$FAKE_LOG"
while [[ $1 == --* ]]; do
    [[ $1 == --ntasks=* ]] && export PMI_SIZE=${1#--ntasks=}
    shift
done
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


@pytest.fixture
def fakes(tmp_path):
    """A fake `hpcdl`, `srun` and `scontrol`, and the log they write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("hpcdl", FAKE_HPCDL), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    return bin_dir, log


def wrapper(script: str, fakes, exit_codes: str, *args: str, env: dict | None = None, timeout: float = 60):
    bin_dir, log = fakes
    # The launchers are given the fake by absolute path: pyenv-style shims
    # rewrite PATH before mpiexec starts its ranks.
    return run_group([str(JOBS / script), *args, str(bin_dir / "hpcdl"), "train", "--config", "x.toml"],
                     timeout=timeout, env={"FAKE_LOG": str(log), "FAKE_EXIT_CODES": exit_codes, "RESTART_DELAY": "0",
                                           **(env or {})})


def attempts(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("attempt=")]


@pytest.mark.mpi
def test_mpirun_wrapper_relaunches_on_fewer_ranks_and_resumes(fakes):
    result = wrapper("restart_mpirun.sh", fakes, "9 0", "--np", "2 1", "--", env={"MAX_RESTARTS": "3"})
    assert result.returncode == 0, result.stderr
    assert sorted(attempts(fakes[1])) == [
        "attempt=1 size=2 rank=0 args=train --config x.toml --resume auto",
        "attempt=1 size=2 rank=1 args=train --config x.toml --resume auto",
        "attempt=2 size=1 rank=0 args=train --config x.toml --resume auto",
    ]
    log = result.stderr
    assert "attempt 1/4 on 2 ranks:" in log and "attempt 1/4 exited with code 9" in log
    assert "attempt 2/4 on 1 ranks:" in log and "finished" in log


@pytest.mark.mpi
def test_mpirun_wrapper_keeps_an_explicit_resume_only_for_the_first_attempt(fakes, tmp_path):
    bin_dir, log = fakes
    restart_log = tmp_path / "restarts.log"
    result = run_group([str(JOBS / "restart_mpirun.sh"), str(bin_dir / "hpcdl"), "train", "--resume", "run/ckpt-00000100.h5"],
                       timeout=60, env={"FAKE_LOG": str(log), "FAKE_EXIT_CODES": "1 0", "RESTART_DELAY": "0",
                                        "RESTART_LOG": str(restart_log)})
    assert result.returncode == 0, result.stderr
    assert attempts(log) == [
        "attempt=1 size=1 rank=0 args=train --resume run/ckpt-00000100.h5",
        "attempt=2 size=1 rank=0 args=train --resume auto",
    ]
    assert "attempt 2/4 exited with code 0" in restart_log.read_text()


@pytest.mark.mpi
def test_mpirun_wrapper_does_not_retry_a_user_error(fakes):
    result = wrapper("restart_mpirun.sh", fakes, "2 0", env={"NP_SEQUENCE": "2"})
    assert result.returncode == 2
    assert len(attempts(fakes[1])) == 2  # one attempt, two ranks
    assert "not retrying" in result.stderr


@pytest.mark.mpi
def test_mpirun_wrapper_gives_up_after_max_restarts(fakes):
    result = wrapper("restart_mpirun.sh", fakes, "1", "--max-restarts", "2", env={"NP_SEQUENCE": "1"})
    assert result.returncode == 1
    assert [line.split()[0] for line in attempts(fakes[1])] == ["attempt=1", "attempt=2", "attempt=3"]
    assert "giving up after 3 attempts (last exit code 1)" in result.stderr


@pytest.mark.mpi
def test_mpirun_wrapper_forwards_a_stop_signal_and_does_not_relaunch(fakes):
    bin_dir, log = fakes
    proc = subprocess.Popen([str(JOBS / "restart_mpirun.sh"), str(bin_dir / "hpcdl"), "train"], cwd=ROOT,
                            env={**os.environ, "FAKE_LOG": str(log), "FAKE_EXIT_CODES": "wait 0", "NP_SEQUENCE": "2",
                                 "RESTART_DELAY": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while (not log.exists() or len(attempts(log)) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let the fake install its trap
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1
    lines = log.read_text().splitlines()
    assert sorted(line for line in lines if "got USR1" in line) == ["rank=0 got USR1", "rank=1 got USR1"]
    assert len(attempts(log)) == 2  # attempt 1 on two ranks, no relaunch
    assert "stopped by SIGUSR1" in err


def test_srun_wrapper_uses_kill_on_bad_exit_and_the_np_sequence(fakes):
    bin_dir, log = fakes
    result = wrapper("restart_srun.sh", fakes, "1 0",
                     env={"SRUN": str(bin_dir / "srun"), "SLURM_NTASKS": "8", "NP_SEQUENCE": "8 4", "SRUN_FLAGS": "--cpu-bind=cores"})
    assert result.returncode == 0, result.stderr
    srun_calls = [line for line in log.read_text().splitlines() if line.startswith("srun ")]
    assert [c.split(str(bin_dir))[0].strip() for c in srun_calls] == [
        "srun --ntasks=8 --kill-on-bad-exit=1 --cpu-bind=cores",
        "srun --ntasks=4 --kill-on-bad-exit=1 --cpu-bind=cores",
    ]
    assert [a.split(" args=")[0] for a in attempts(log)] == ["attempt=1 size=8 rank=0", "attempt=2 size=4 rank=0"]


def test_srun_wrapper_requeues_after_a_stop_signal(fakes):
    bin_dir, log = fakes
    proc = subprocess.Popen([str(JOBS / "restart_srun.sh"), str(bin_dir / "hpcdl"), "train"], cwd=ROOT,
                            env={**os.environ, "FAKE_LOG": str(log), "FAKE_EXIT_CODES": "wait", "SRUN": str(bin_dir / "srun"),
                                 "SCONTROL": str(bin_dir / "scontrol"), "SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242",
                                 "REQUEUE_ON_SIGNAL": "1", "RESTART_DELAY": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while (not log.exists() or not attempts(log)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    lines = log.read_text().splitlines()
    assert "rank=0 got USR1" in lines and "scontrol requeue 4242" in lines
    assert len(attempts(log)) == 1


def test_wrappers_reject_bad_settings_with_exit_code_2(fakes):
    result = wrapper("restart_mpirun.sh", fakes, "0", env={"NP_SEQUENCE": "4 zero"})
    assert result.returncode == 2 and "NP_SEQUENCE='4 zero'" in result.stderr
    result = run_group([str(JOBS / "restart_mpirun.sh"), "--bogus", "hpcdl"], timeout=30)
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
