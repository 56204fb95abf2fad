"""Fault-tolerance drills too long for the test suite; run them in the Open MPI 5 environment.

    V/bin/python tests/ulfm_drill.py accuracy [--epochs 15]   # 4 ranks, rank 0 and rank 2 killed at
                                                             # different epochs, vs an uninterrupted run
    V/bin/python tests/ulfm_drill.py overhead [--steps 150]  # step time, shrink vs abort, no failure

Both launch `mpirun --with-ft ulfm` from the interpreter's own bin/ (the
Open MPI venv), print one JSON object and a table. Figures go to
docs/fault-tolerance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("HPCDL_FAULT_INJECT", None)


def launch(contexts: list[tuple[int, str | None]], args: list[str]) -> tuple[dict, str]:
    """mpirun --with-ft ulfm with one app context per (ranks, HPCDL_FAULT_INJECT or None)."""
    command = [str(BIN / "mpirun"), "--with-ft", "ulfm", "--oversubscribe"]
    for i, (n, fault) in enumerate(contexts):
        if i:
            command.append(":")
        command += ["-n", str(n)] + (["env", f"HPCDL_FAULT_INJECT={fault}"] if fault else [])
        command += [str(BIN / "hpcdl"), "train", *args]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"ulfm_drill: run failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1]), done.stderr


def accuracy(epochs: float, out: Path) -> dict:
    steps_per_epoch = 60000 // 128
    first, second = round(1.0 * steps_per_epoch) + 1, round(2.0 * steps_per_epoch) + 1
    common = ["--config", "jobs/configs/fmnist_cnn.toml", "--set", f"train.epochs={epochs}",
              "--set", "log.progress=false", "--set", "log.plots=false", "--set", "comm.algorithm=ring"]
    t0 = time.time()
    base, _ = launch([(4, None)], [*common, "--out", str(out / "uninterrupted")])
    t1 = time.time()
    # rank 0 dies at the start of epoch 2, rank 2 at the start of epoch 3: 4 -> 3 -> 2 ranks
    got, err = launch([(1, f"kill-at-step:{first}"), (1, None), (1, f"kill-at-step:{second}"), (1, None)],
                      [*common, "--set", "comm.fault_tolerance=shrink", "--out", str(out / "shrink")])
    kills = [float(t) for t in re.findall(r"fault drill: pid \d+ SIGKILL .* at (\d+\.\d+)", err)]
    checkpoints = sorted(p.name for p in (out / "shrink" / "checkpoints").glob("ckpt-*.h5"))
    failures = got["failure_log"]
    result = {
        "epochs": epochs, "kill_steps": [first, second],
        "uninterrupted": {k: base[k] for k in ("test_accuracy", "final_loss", "world_size", "seconds")},
        "shrink": {k: got[k] for k in ("test_accuracy", "final_loss", "world_size", "seconds", "failures")},
        "accuracy_difference_points": round(100 * (got["test_accuracy"] - base["test_accuracy"]), 3),
        "failures": [{"failed_ranks": f["failed_ranks"], "step": f["step"], "phase": f["phase"],
                      "new_size": f["new_size"],
                      "kill_to_detect_s": round(f["detected_at"] - kill, 4),
                      "recovery_s": f["recovery_s"],
                      "kill_to_first_step_s": round(f["first_step_at"] - kill, 4)}
                     for f, kill in zip(failures, kills)],
        "checkpoints_after": checkpoints,
        "wall_s": [round(t1 - t0, 1), round(time.time() - t1, 1)],
    }
    return result


def overhead(steps: int, rounds: int, out: Path) -> dict:
    """Alternate abort and shrink runs of the main job on 2 ranks: images/s of the logging windows
    after the first (start-up and the first steps excluded), from each run's metrics.jsonl."""
    every = max(1, steps // 5)
    common = ["--config", "jobs/configs/fmnist_cnn.toml", "--set", f"train.max_steps={steps}",
              "--set", "log.progress=false", "--set", "log.plots=false", "--set", "checkpoint.at_end=false",
              "--set", f"log.every_steps={every}", "--set", "schedule.warmup_epochs=0"]
    rates = {"abort": [], "shrink": []}
    for i in range(rounds):
        for mode in ("abort", "shrink"):
            run_dir = out / f"{mode}-{i}"
            launch([(2, None)], [*common, "--set", f"comm.fault_tolerance={mode}", "--out", str(run_dir)])
            windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            windows = [w["images_per_s"] for w in windows if w["kind"] == "step"][1:]
            rates[mode].append(round(sum(windows) / len(windows), 1))
    median = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    return {"steps": steps, "rounds": rounds, "images_per_s": rates, "median": median,
            "shrink_vs_abort_step_time": round(median["abort"] / median["shrink"], 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "overhead"])
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ulfm-drill-") as tmp:
        result = accuracy(args.epochs, Path(tmp)) if args.what == "accuracy" else overhead(args.steps, args.rounds,
                                                                                           Path(tmp))
    print(json.dumps(result))
    for key, value in result.items():
        print(f"{key:>28}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
