"""How fast a 2-rank `hpcdl train` job goes down when a rank fails: a measurement, not a test.

    python tests/failure_drill.py [--repeats 3] [--config jobs/configs/fmnist_cnn.toml]

Two failures, each after 30 steps of the main job:

* an uncaught exception on rank 1 (HPCDL_FAULT_INJECT=raise-at-step:30 on that rank only,
  through the launcher's MPMD syntax): time from the rank's one-line report to mpiexec's exit;
* `kill -9` of rank 1: time from the kill to mpiexec's exit.

tests/test_train.py asserts the 10-second bound on both; this prints the actual times.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from trainer_runs import HPCDL, child_pids_running, mpiexec

REPO = Path(__file__).resolve().parents[1]


def exception_on_rank_1(train: list[str]) -> tuple[int, float]:
    command = [mpiexec(), "-n", "1", *train, ":", "-n", "1", "env", "HPCDL_FAULT_INJECT=raise-at-step:30", *train]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    reported = None
    for line in proc.stderr:
        if reported is None and "uncaught" in line:
            reported = time.perf_counter()
    proc.wait()
    if reported is None:
        raise RuntimeError("rank 1 never reported its exception")
    return proc.returncode, time.perf_counter() - reported


def kill_rank_1(train: list[str], metrics: Path) -> tuple[int, float]:
    proc = subprocess.Popen([mpiexec(), "-n", "2", *train], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    while not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 30):
        if proc.poll() is not None:
            raise RuntimeError(f"training ended (exit {proc.returncode}) before the kill")
        time.sleep(0.05)
    ranks = child_pids_running("hpcdl", proc.pid)
    killed = time.perf_counter()
    os.kill(ranks[-1], signal.SIGKILL)
    proc.wait()
    return proc.returncode, time.perf_counter() - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "jobs" / "configs" / "fmnist_cnn.toml"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            train = [*HPCDL, "train", "--config", args.config, "--set", "log.every_steps=1", "--out", out]
            code, seconds = exception_on_rank_1(train)
        print(f"exception on rank 1 at step 30: mpiexec exit {code}, {1e3 * seconds:.1f} ms after the report")
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            train = [*HPCDL, "train", "--config", args.config, "--set", "log.every_steps=1", "--out", out]
            code, seconds = kill_rank_1(train, Path(out) / "metrics.jsonl")
        print(f"kill -9 of rank 1 after step 30: mpiexec exit {code}, {1e3 * seconds:.1f} ms after the kill")


if __name__ == "__main__":
    main()
