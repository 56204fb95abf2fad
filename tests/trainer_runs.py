"""Launch real `hpcdl train` runs (1 process or under mpiexec) for the end-to-end tests."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

HPCDL = [sys.executable, "-m", "hpcdl"]

# A small, fast, deterministic job: synthetic 28x28 images, the main-job CNN.
TINY = [
    "--set", "data.dataset='synthetic'",
    "--set", "data.synthetic_samples=640",
    "--set", "train.global_batch=32",
    "--set", "train.max_steps=20",
    "--set", "schedule.warmup_epochs=0.5",
    "--set", "log.every_steps=5",
    "--set", "log.plots=false",
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def summary(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, f"no JSON summary line; stderr:\n{self.stderr[-3000:]}"
        return json.loads(lines[-1])


def mpiexec() -> str:
    found = shutil.which("mpiexec")
    assert found, "mpiexec not on PATH (pip install mpich)"
    return found


def launch(args: list[str], ranks: int = 1, env: dict | None = None, rank_env: dict | None = None,
           timeout: float = 240) -> Result:
    """`hpcdl train ARGS` on `ranks` processes; `rank_env` = extra environment for the last rank only."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    command = HPCDL + ["train", *args]
    if ranks > 1 or rank_env:
        if rank_env:  # MPMD: ranks 0..n-2 plain, rank n-1 with the extra variables
            extra = [f"{k}={v}" for k, v in rank_env.items()]
            head = ["-n", str(ranks - 1), *command, ":"] if ranks > 1 else []
            command = [mpiexec(), *head, "-n", "1", "env", *extra, *command]
        else:
            command = [mpiexec(), "-n", str(ranks), *command]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def child_pids_running(needle: str, root: int) -> list[int]:
    """PIDs of descendants of `root` whose command line contains `needle`, sorted."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        children.setdefault(parent, []).append((int(entry), cmdline))
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child, cmdline in children.get(pid, []):
            frontier.append(child)
            if needle in cmdline and "mpiexec" not in cmdline and "hydra" not in cmdline:
                found.append(child)
    return sorted(found)
