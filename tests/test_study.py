"""The large-batch study: cell configs and rules, the estimate, resume, and (slow) the quick grid end to end."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from hpcdl import study
from hpcdl.config import from_dict
from hpcdl.optim import build_schedule
from trainer_runs import HPCDL

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("results.md", "results.json", "accuracy_vs_batch.png", "gap_vs_epoch.png", "layer_table.md",
           "trust_heatmap.png", "lars_lr_dynamics.png", "lamb_no_retuning.md")


def _study(*args, timeout=300):
    return subprocess.run([*HPCDL, "study", "large-batch", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.mark.parametrize("name", sorted(study.GRIDS))
@pytest.mark.parametrize("ranks", [1, 2])
def test_every_cell_of_every_grid_is_a_valid_train_config(name, ranks):
    """Each cell's TOML parses into a Config and its schedule builds (warmup fits the run) at its step count."""
    cells = study.grid(name)
    assert len({c.name for c in cells}) == len(cells)
    for cell in cells:
        text = study.to_toml(study.cell_config(cell, ranks))
        config = from_dict(tomllib.loads(text), cell.name)
        train = config.train
        assert train.global_batch == cell.batch and train.global_batch % (ranks * train.accumulate_steps) == 0
        steps_per_epoch = math.ceil(study.TRAIN_SAMPLES / cell.batch)
        total = train.max_steps or math.ceil(train.epochs * steps_per_epoch)
        schedule = build_schedule(config.schedule, global_batch=cell.batch, steps_per_epoch=steps_per_epoch,
                                  total_steps=total)
        assert math.isclose(schedule.peak_lr, study.schedule_of(cell)["peak_lr"], rel_tol=1e-9)
        assert schedule.warmup_steps < total


def test_the_rules_lamb_doubles_warmup_epochs_and_scales_lr_by_sqrt2_sgd_scales_linearly():
    lamb = [study.Cell("mlp", "lamb", b, "epochs", 15) for b in (128, 256, 512, 1024)]
    plans = [study.schedule_of(c) for c in lamb]
    for a, b in zip(plans, plans[1:]):
        assert math.isclose(b["peak_lr"] / a["peak_lr"], math.sqrt(2))
        assert math.isclose(b["warmup_epochs"] / a["warmup_epochs"], 2)
    sgd = [study.schedule_of(study.Cell("mlp", "sgd", b, "epochs", 5)) for b in (128, 8192)]
    assert math.isclose(sgd[1]["peak_lr"] / sgd[0]["peak_lr"], 64)
    assert sgd[0]["warmup_epochs"] == sgd[1]["warmup_epochs"] == study.LINEAR_WARMUP_EPOCHS
    lars = [study.schedule_of(study.Cell("mlp", "lars", b, "epochs", 5)) for b in (128, 8192)]
    assert math.isclose(lars[1]["peak_lr"] / lars[0]["peak_lr"], 8)  # sqrt(64), warmup fixed in epochs
    assert lars[0]["warmup_epochs"] == lars[1]["warmup_epochs"] == study.LINEAR_WARMUP_EPOCHS
    capped = study.schedule_of(study.Cell("mlp", "lamb", 16384, "epochs", 2))
    assert capped["warmup_capped"] and capped["warmup_epochs"] == 1.0


def test_standard_grid_has_every_part_the_issue_asks_for():
    cells = study.grid("standard")
    mlp = [c for c in cells if c.model == "mlp" and c.part == "main"]
    assert {c.batch for c in mlp} == {128, 1024, 4096, 8192, 16384}
    assert {c.optimizer for c in mlp} == {"sgd", "lars", "lamb", "adamw_linear", "adamw_sqrt"}
    assert {c.seed for c in mlp} == {0, 1}
    assert {c.model for c in cells} == {"mlp", "fmnist_cnn_bn", "vit"}
    assert all(c.amount >= 200 for c in cells if c.part == "steps")
    searched = {c.optimizer for c in cells if c.part == "search"}
    assert searched == {c.optimizer for c in mlp}  # every optimizer, SGD included
    lamb = sorted({c.batch for c in cells
                   if c.model == "mlp" and c.optimizer == "lamb" and c.part != "search" and c.budget == "epochs"})
    assert lamb == [128 * 2 ** i for i in range(8)]  # the no-retuning table doubles the batch per row


def test_estimate_calibrates_on_finished_cells():
    estimate = study.Estimator()
    mlp, vit = study.Cell("mlp", "sgd", 128, "epochs", 1), study.Cell("vit", "lamb", 128, "epochs", 1)
    before = estimate(mlp), estimate(vit)
    estimate.record(mlp, 2 * estimate.prior(mlp))
    assert math.isclose(estimate(mlp), 2 * before[0]) and math.isclose(estimate(vit), 2 * before[1])
    estimate.record(vit, 0.5 * estimate.prior(vit))
    assert math.isclose(estimate(vit), 0.5 * before[1]) and math.isclose(estimate(mlp), 2 * before[0])


TINY_GRID = {"models": {"mlp": {"batches": [32, 64], "optimizers": ["lamb", "lars"], "epochs": 1, "seeds": 1}}}
TINY_SET = ["--set", "data.dataset='synthetic'", "--set", "data.synthetic_samples=256",
            "--set", "model.options={hidden = [16]}"]


def test_resume_skips_finished_cells_and_bad_arguments_fail_at_once(tmp_path):
    grid = tmp_path / "tiny.json"
    grid.write_text(json.dumps(TINY_GRID))
    out = tmp_path / "study"
    first = _study("--grid", str(grid), "--out", str(out), *TINY_SET)
    assert first.returncode == 0, first.stderr[-3000:]
    names = [c.name for c in study.grid(str(grid))]
    assert len(names) == 4 and first.stdout.count("] mlp-") == 4
    for name in names:
        result = json.loads((out / "cells" / name / "result.json").read_text())
        assert result["status"] == "ok" and result["summary"]["steps"] > 0
        assert (out / "cells" / name / "config.toml").exists() and (out / "cells" / name / "command.txt").exists()
    results = json.loads((out / "results.json").read_text())
    assert sorted(c["name"] for c in results["cells"]) == sorted(names)

    # as if the study had been killed during the third cell: its result never got written
    kept = {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in names[:3]}
    (out / "cells" / names[3] / "result.json").unlink()
    again = _study("--grid", str(grid), "--out", str(out), *TINY_SET)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = _study("--grid", str(grid), "--out", str(out), "--resume", *TINY_SET)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 done, 1 to run" in resumed.stdout
    assert resumed.stdout.count("] mlp-") == 1 and f"] {names[3]}:" in resumed.stdout
    assert {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in names[:3]} == kept
    assert (out / "cells" / names[3] / "result.json").exists()
    assert len(json.loads((out / "study.json").read_text())["estimates_s"]) == 2

    wrong = _study("--grid", "quick", "--out", str(out), "--resume", *TINY_SET)
    assert wrong.returncode == 2 and "--resume needs --grid" in wrong.stderr
    typo = _study("--grid", str(grid), "--out", str(tmp_path / "typo"), "--set", "train.epoch=3")
    assert typo.returncode == 2 and "train.epoch" in typo.stderr and len(typo.stderr.splitlines()) == 1
    ranks = _study("--grid", "standard", "--out", str(tmp_path / "r"), "--ranks", "3", "--plan")
    assert ranks.returncode == 2 and "--ranks 3: does not divide" in ranks.stderr


def test_a_signal_stops_the_study_at_a_checkpoint_and_resume_finishes_the_cell(tmp_path):
    """SIGTERM mid-cell (a batch system's time limit): the cell is not recorded as done, resume completes it."""
    grid = tmp_path / "long.json"
    grid.write_text(json.dumps({"models": {"mlp": {"batches": [32], "optimizers": ["lamb"], "epochs": 400,
                                                   "seeds": 1}}}))
    out = tmp_path / "study"
    proc = subprocess.Popen([*HPCDL, "study", "large-batch", "--grid", str(grid), "--out", str(out), *TINY_SET],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        metrics = None
        deadline = time.monotonic() + 120
        while metrics is None and time.monotonic() < deadline and proc.poll() is None:
            metrics = next(out.glob("cells/*/run/metrics.jsonl"), None)
            time.sleep(0.05)
        assert metrics is not None, "the cell never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    cell = metrics.parent.parent
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by" in stderr and "--resume" in stderr and cell.name in stderr
    assert not (cell / "result.json").exists()
    stopped = [json.loads(line) for line in metrics.read_text().splitlines() if '"stopped"' in line]
    assert stopped and 0 < stopped[-1]["step"] < 400 * 8

    resumed = _study("--grid", str(grid), "--out", str(out), "--resume", *TINY_SET)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "0 done, 1 to run" in resumed.stdout
    result = json.loads((cell / "result.json").read_text())
    assert result["status"] == "ok" and result["summary"]["steps"] == 400 * 8
    assert not result["summary"]["stopped_early"]


@pytest.mark.mpi
def test_a_cell_under_mpiexec_trains_as_the_same_cell_in_process(tmp_path):
    grid = tmp_path / "one.json"
    grid.write_text(json.dumps({"models": {"mlp": {"batches": [32], "optimizers": ["lamb"], "epochs": 1,
                                                   "seeds": 1}}}))
    runs = {}
    for ranks in (1, 2):
        result = _study("--grid", str(grid), "--out", str(tmp_path / f"r{ranks}"), "--ranks", str(ranks), *TINY_SET)
        assert result.returncode == 0, result.stderr[-3000:]
        cell = json.loads(next((tmp_path / f"r{ranks}" / "cells").glob("*/result.json")).read_text())
        runs[ranks] = cell
    assert runs[2]["summary"]["world_size"] == 2 and runs[2]["ranks"] == 2
    assert runs[1]["summary"]["steps"] == runs[2]["summary"]["steps"] == 8
    a, b = runs[1]["summary"]["param_norm"], runs[2]["summary"]["param_norm"]
    assert abs(a - b) <= 1e-5 * abs(a)
    command = next((tmp_path / "r2" / "cells").glob("*/command.txt")).read_text()
    assert command.startswith("mpiexec -n 2 ")


def test_plan_prints_cells_and_an_estimate_and_runs_nothing(tmp_path):
    result = _study("--grid", "standard", "--out", str(tmp_path / "s"), "--plan")
    assert result.returncode == 0, result.stderr
    assert "estimated" in result.stdout.splitlines()[0]
    assert len(result.stdout.splitlines()) == 2 + len(study.grid("standard"))
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_quick_grid_end_to_end_writes_every_output(tmp_path):
    """`--grid quick` on the real Fashion-MNIST, in under 10 minutes on 2 cores."""
    out = tmp_path / "quick"
    result = _study("--grid", "quick", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for png in (n for n in OUTPUTS if n.endswith(".png")):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "results.json").read_text())
    cells = study.grid("quick")
    assert len(payload["cells"]) == len(cells)
    assert all(c["status"] in ("ok", "diverged") for c in payload["cells"])
    assert {g["model"] for g in payload["groups"]} == {"mlp", "fmnist_cnn_bn", "vit"}
    ok = [c for c in payload["cells"] if c["status"] == "ok"]
    assert all(0 <= c["test_accuracy"] <= 100 for c in ok)
    assert max(c["test_accuracy"] for c in ok if c["model"] == "mlp") > 75  # it really trained
    assert payload["search"] and all(s["points"] >= 2 for s in payload["search"])
    estimate = json.loads((out / "study.json").read_text())["estimates_s"][-1]
    assert {"before_start", "after_calibration", "actual"} <= set(estimate)
    md = (out / "results.md").read_text()
    for heading in ("## mlp: fixed budget", "## fmnist_cnn_bn", "## vit", "fixed number of steps",
                    "LR x warmup search", "Does the large batch hold?"):
        assert heading in md
    table = (out / "layer_table.md").read_text()
    assert "fmnist_cnn_bn, LARS" in table and table.count("| layers.") >= 8
    lamb = (out / "lamb_no_retuning.md").read_text()
    assert all(f"| {b} | x2 |" in lamb for b in (256, 512, 1024, 2048, 4096))
