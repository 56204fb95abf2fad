"""`hpcdl scaling sweep`: the breakdown it reads, the model it fits, the CSV it writes, end to end."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from hpcdl import perfmodel, sweep
from hpcdl.perfmodel import Costs


def write_metrics(path, world, batch, windows):
    lines = [{"kind": "start", "world_size": world, "global_batch": batch, "algorithm": "ring"}]
    for step, seconds in windows:
        lines.append({"kind": "step", "step": step, "seconds": seconds})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_breakdown_skips_the_warm_up_window_and_averages_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, 2, 128, [(10, {"forward": 9.0, "allreduce": 9.0}),  # warm-up: ignored
                                 (20, {"forward": 1.0, "backward": 2.0, "allreduce": 0.5}),
                                 (30, {"forward": 1.2, "backward": 1.8, "allreduce": 0.3, "data": 0.2})])
    result = sweep.step_breakdown(path)
    assert result["phases"] == pytest.approx({"forward": 0.11, "backward": 0.19, "allreduce": 0.04, "data": 0.01})
    assert result["step_s"] == pytest.approx(0.35)
    assert result["compute_max_s"] == pytest.approx(0.31)  # without compute_max: rank 0's non-allreduce phases
    assert (result["world_size"], result["global_batch"]) == (2, 128)


def bench_result(world, costs, sizes=(2**16, 2**20, 2**24)):
    return {"world": world, "gamma_s_per_byte": costs.gamma,
            "sweep": [{"algorithm": "ring", "bytes": n, "median_s": perfmodel.allreduce_time("ring", n, world, costs)}
                      for n in sizes]}


def test_each_regime_gets_its_own_fit_over_all_its_rank_counts():
    dedicated = Costs(alpha=5e-6, beta=1e-10, gamma=3e-11)
    crowded = Costs(alpha=4e-4, beta=3e-10, gamma=3e-11)
    bench = [bench_result(2, dedicated), bench_result(3, crowded), bench_result(4, crowded)]
    fitted = sweep.fit_regimes(bench, "ring", threads=1, cores=2)
    assert set(fitted) == {"dedicated", "oversubscribed"}
    assert fitted["dedicated"].alpha == pytest.approx(5e-6, rel=1e-6)
    assert fitted["oversubscribed"].alpha == pytest.approx(4e-4, rel=1e-6)
    assert fitted["oversubscribed"].beta == pytest.approx(3e-10, rel=1e-6)
    assert sweep.regime(2, 1, 2) == "dedicated" and sweep.regime(2, 2, 2) == "oversubscribed"


def test_rows_predict_measured_compute_plus_the_modelled_buckets(tmp_path):
    costs = {"dedicated": Costs(1e-5, 1e-10, 0.0), "oversubscribed": Costs(1e-3, 2e-10, 0.0)}
    buckets = [25 * 2**20, 3 * 2**20]
    results = {1: {"phases": {"forward": 0.1, "backward": 0.2}, "step_s": 0.3, "global_batch": 64, "compute_max_s": 0.3},
               3: {"phases": {"forward": 0.1, "backward": 0.2, "allreduce": 0.05}, "step_s": 0.36, "global_batch": 192,
                   "compute_max_s": 0.3}}
    rows = sweep.rows_for(results, buckets, costs, "ring", threads=1, cores=2)
    assert rows[0]["predicted_step_s"] == pytest.approx(0.3) and rows[0]["allreduce_s"] == 0
    modelled = sum(perfmodel.allreduce_time("ring", b, 3, costs["oversubscribed"]) for b in buckets)
    assert rows[1]["allreduce_s"] == pytest.approx(modelled) and rows[1]["oversubscribed"]
    assert rows[1]["predicted_step_s"] == pytest.approx(0.3 + modelled)
    assert rows[1]["error"] == pytest.approx((0.3 + modelled) / 0.36 - 1)
    path = sweep.write_csv(rows, tmp_path / "scaling.csv")
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == sweep.COLUMNS
    assert [r["oversubscribed"] for r in table] == ["False", "True"]


@pytest.mark.mpi
def test_sweep_end_to_end_on_one_and_two_ranks(tmp_path):
    out = tmp_path / "sweep"
    run = subprocess.run(
        [sys.executable, "-m", "hpcdl", "scaling", "sweep", "--ranks", "1,2", "--model", "mlp",
         "--per-rank-batch", "32", "--steps", "12", "--log-every", "4", "--bench-repeats", "2", "--out", str(out),
         "--set", "data.dataset='synthetic'", "--set", "data.synthetic_samples=1024"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["ranks"]) for r in table] == [1, 2]
    assert [int(r["global_batch"]) for r in table] == [32, 64]  # weak scaling
    assert all(float(r["measured_step_s"]) > 0 and float(r["predicted_step_s"]) > 0 for r in table)
    assert float(table[1]["allreduce_s"]) > 0
    for png in ("efficiency.png", "breakdown.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(run.stdout.strip().splitlines()[-1])["rows"][1]["ranks"] == 2


def test_shared_core_pace_between_its_two_limits_by_hand():
    # 3 ranks on 2 cores, 1 s of CPU each: pinned, the pair takes 2 s and the mean is (2 + 2 + 1) / 3
    assert perfmodel.shared_core_pace(3, 2, 5 / 3, 1.0) == pytest.approx((2.0, 1.0))
    # fair sharing: every rank 1.5 s, which is also the slowest
    assert perfmodel.shared_core_pace(3, 2, 1.5, 1.0) == pytest.approx((1.5, 0.0))
    # 4 on 2 cores: the limits coincide, the mean wall compute is the pace
    assert perfmodel.shared_core_pace(4, 2, 2.2, 1.0) == pytest.approx((2.2, 0.0))
    assert perfmodel.core_occupancy(5, 2) == [3, 2]


def test_csv_columns_types_and_oversubscribed_marking(tmp_path):
    costs = {"dedicated": Costs(1e-5, 1e-10, 0.0), "oversubscribed": Costs(1e-3, 2e-10, 0.0)}
    shared = {"mean_wall_s": 5 / 3, "mean_cpu_s": 1.0, "max_wall_s": 2.1}
    results = {2: {"phases": {"forward": 1.0}, "step_s": 1.0, "global_batch": 64, "compute_max_s": 1.0},
               3: {"phases": {"forward": 1.5, "allreduce": 0.5}, "step_s": 2.1, "global_batch": 96,
                   "compute_max_s": 1.7, "trace": shared}}
    rows = sweep.rows_for(results, [2**20], costs, "ring", threads=1, cores=2)
    assert rows[1]["compute_s"] == pytest.approx(2.0)  # the pinned pair, not the window's 1.7
    with open(sweep.write_csv(rows, tmp_path / "s.csv")) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == sweep.COLUMNS
    for row in table:
        int(row["ranks"]), int(row["global_batch"])
        assert row["oversubscribed"] in ("True", "False")
        for key in ("measured_step_s", "predicted_step_s", "compute_s", "allreduce_s", "exposed_allreduce_s"):
            assert float(row[key]) >= 0
    assert [r["oversubscribed"] for r in table] == ["False", "True"]
    assert [r["regime"] for r in table] == ["dedicated", "oversubscribed"]
