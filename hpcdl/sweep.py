"""`hpcdl scaling sweep`: train at several rank counts, compare each step with the cost model.

    hpcdl scaling sweep --ranks 1,2,3,4 --model fmnist_cnn --per-rank-batch 64 --out sweep/

For every rank count P it launches, through `--launcher` (default `mpiexec -n {ranks}`):

1. `hpcdl bench allreduce` of `--algorithm` over the gradient buckets' sizes and a spread
   around them (P > 1; skipped where `--bench-json` files are given);
2. `hpcdl train` of `--config` (default: the main job's) with the model, the global batch
   (weak: per-rank batch × P; strong: per-rank batch × the largest P) and `--steps` steps.

Then it fits the α-β-γ model (`hpcdl.perfmodel.fit`) to all the benchmark runs together, one
fit per regime: *dedicated* (ranks × threads ≤ cores) and *oversubscribed* (more, as with 3 and
4 ranks on this 2-core machine, where ranks time-share cores and every message waits for its
peer to be scheduled: a different machine, so it gets its own α, β, γ). Each step is predicted
as the compute pace, plus rank 0's `other` (logging), plus the model's allreduce of every
gradient bucket. No overlap is assumed: with one core per rank the copies that move the data
need the core that computes. The compute pace: with dedicated cores, the compute the trainer
measured at that P (data wait + forward + backward + optimizer of the rank that computed longest
in each logging window, `compute_max` in metrics.jsonl); oversubscribed, the slowest rank of each
step from ranks ÷ cores and the ranks' mean wall and CPU seconds of compute, read from the run's
timeline (`hpcdl.perfmodel.shared_core_pace`).

`--reuse` keeps what an earlier sweep into the same `--out` measured (bench-pN.json, train-pN/)
and runs only the missing rank counts, so a sweep can be run in pieces (`--ranks 1,2`, then
`--ranks 1,2,3,4 --reuse`), each short enough for an exclusive slot on a shared machine.

Writes `scaling.csv` (columns below), `efficiency.png` (measured and predicted efficiency
against ranks) and `breakdown.png` (stacked compute and exposed allreduce against ranks), and
prints the table. `measured_step_s` is the mean step time after the first logging window.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ("ranks", "oversubscribed", "global_batch", "measured_step_s", "predicted_step_s", "error",
           "compute_s", "allreduce_s", "exposed_allreduce_s", "measured_allreduce_s", "regime",
           "mean_wall_compute_s", "mean_cpu_compute_s", "pinned_weight", "measured_pace_s")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fmnist_cnn.toml"


def _rank_counts(text: str) -> list[int]:
    from hpcdl.projection import int_list

    return sorted(set(int_list(text)))


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="hpcdl scaling sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--ranks", type=_rank_counts, default=_rank_counts("1,2,3,4"), help="rank counts (default 1,2,3,4)")
    parser.add_argument("--model", default="fmnist_cnn")
    parser.add_argument("--per-rank-batch", type=int, default=64)
    parser.add_argument("--mode", choices=("weak", "strong"), default="weak",
                        help="weak: global batch = per-rank batch × P; strong: per-rank batch × the largest P")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base training config (data, optimizer)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--steps", type=int, default=60, help="training steps per rank count")
    parser.add_argument("--log-every", type=int, default=10, help="steps per logging window (the first is warm-up)")
    parser.add_argument("--algorithm", default="ring", help="allreduce algorithm, trained with and modelled")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--launcher", default="mpiexec -n {ranks}",
                        help="launch template, e.g. 'srun -n {ranks} --cpu-bind=cores' or 'mpirun --oversubscribe -n {ranks}'")
    parser.add_argument("--bench-json", nargs="*", default=None,
                        help="fit to these `hpcdl bench allreduce --json` files instead of running the benchmark")
    parser.add_argument("--bench-repeats", type=int, default=8)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="cores the ranks share (default: this process's affinity mask)")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--out", required=True, help="directory for the runs, scaling.csv and the plots")
    parser.add_argument("--reuse", action="store_true",
                        help="keep benchmark and training results already in --out; run only the missing rank counts")
    return parser.parse_args(argv)


def _launch(template: str, ranks: int, argv: list[str], log: Path, threads: int, timeout: float) -> None:
    command = shlex.split(template.format(ranks=ranks)) + argv
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w") as out:
        out.write(" ".join(shlex.quote(c) for c in command) + "\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"hpcdl scaling sweep: {command[0]} exited {proc.returncode} at {ranks} rank(s): "
                         f"{tail[0]} (full log: {log})")


def bucket_sizes(model: str, input_shape: tuple, num_classes: int, bucket_mb: float) -> list[int]:
    """The bytes of each gradient bucket the trainer will reduce (the reducer's own plan)."""
    from hpcdl import models
    from hpcdl.arena import Arena
    from hpcdl.comm.buckets import plan_buckets

    arena = Arena(models.build(model, input_shape=input_shape, num_classes=num_classes).parameters(), seed=0)
    buckets = plan_buckets(arena.segments, arena.total, arena.dtype.itemsize, int(bucket_mb * 2**20))
    return [b.size * arena.dtype.itemsize for b in buckets]


def step_breakdown(metrics_path: Path) -> dict:
    """Mean seconds per step by phase over the logging windows after the first (warm-up)."""
    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    windows = [r for r in records if r.get("kind") == "step"]
    start = next((r for r in records if r.get("kind") == "start"), {})
    if len(windows) < 2:
        raise SystemExit(f"hpcdl scaling sweep: {metrics_path}: fewer than two logging windows; raise --steps")
    totals: dict[str, float] = {}
    steps = windows[-1]["step"] - windows[0]["step"]
    compute_max = 0.0
    for window in windows[1:]:
        for phase, seconds in window["seconds"].items():
            totals[phase] = totals.get(phase, 0.0) + seconds
        compute_max += window.get("compute_max", sum(v for k, v in window["seconds"].items()
                                                     if k not in ("allreduce", "other")))
    per_step = {phase: total / steps for phase, total in totals.items()}
    return {"phases": per_step, "step_s": sum(per_step.values()), "compute_max_s": compute_max / steps,
            "world_size": start.get("world_size"), "global_batch": start.get("global_batch"),
            "algorithm": start.get("algorithm")}


def trace_compute(trace_path: Path) -> dict:
    """Per-rank compute of the traced steps (every phase but the allreduce), from the run's timeline.

    mean_wall_s and mean_cpu_s average over ranks and steps (the CPU seconds are the rank's
    process, every thread, during those phases); max_wall_s averages each step's slowest rank:
    the measured pace, for comparison with the model. The first traced step is left out (warm-up).
    """
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if e.get("ph") == "X" and e["tid"] == 0]
    steps: dict[tuple, tuple] = {(e["pid"], e["args"]["step"]): (e["ts"], e["ts"] + e["dur"])
                                 for e in events if e.get("cat") == "step"}
    wall: dict[tuple, float] = {key: 0.0 for key in steps}
    cpu: dict[tuple, float] = {key: 0.0 for key in steps}
    by_rank: dict[int, list] = {}
    for (rank, step), span in steps.items():
        by_rank.setdefault(rank, []).append((span, step))
    for e in events:
        if e.get("cat") != "phase" or e["name"] == "allreduce":
            continue
        for (start, end), step in by_rank.get(e["pid"], []):
            if start <= e["ts"] < end:
                wall[(e["pid"], step)] += e["dur"] * 1e-6
                cpu[(e["pid"], step)] += e["args"].get("cpu_s", 0.0)
                break
    numbers = sorted({step for _, step in steps})[1:]
    ranks = sorted(by_rank)
    if not numbers or any((r, s) not in wall for r in ranks for s in numbers):
        raise SystemExit(f"hpcdl scaling sweep: {trace_path}: need two or more traced steps on every rank")
    cells = [(wall[(r, s)], cpu[(r, s)]) for r in ranks for s in numbers]
    return {"mean_wall_s": sum(w for w, _ in cells) / len(cells), "mean_cpu_s": sum(c for _, c in cells) / len(cells),
            "max_wall_s": sum(max(wall[(r, s)] for r in ranks) for s in numbers) / len(numbers),
            "steps": len(numbers), "ranks": len(ranks)}


def regime(ranks: int, threads: int, cores: int) -> str:
    return "oversubscribed" if ranks * threads > cores else "dedicated"


def fit_regimes(bench_results: list[dict], algorithm: str, threads: int, cores: int) -> dict:
    """{regime: Costs} for `algorithm`, each fitted to all the benchmark runs of that regime at once."""
    import numpy as np

    from hpcdl import perfmodel

    by_regime: dict[str, list] = {}
    gammas = [r["gamma_s_per_byte"] for r in bench_results if r.get("gamma_s_per_byte")]
    for result in bench_results:
        for row in result["sweep"]:
            if row["algorithm"] == algorithm:
                by_regime.setdefault(regime(result["world"], threads, cores), []).append(
                    (result["world"], row["bytes"], row["median_s"]))
    gamma = float(np.median(gammas)) if gammas else None
    model = "native" if algorithm in ("native", "auto") else algorithm
    return {name: perfmodel.fit(samples, model, gamma) for name, samples in by_regime.items() if len(samples) >= 2}


def predict_allreduce(buckets: list[int], ranks: int, algorithm: str, costs) -> float:
    from hpcdl import perfmodel

    model = "native" if algorithm in ("native", "auto") else algorithm
    return sum(perfmodel.allreduce_time(model, nbytes, ranks, costs) for nbytes in buckets)


def rows_for(results: dict[int, dict], buckets: list[int], costs: dict, algorithm: str, threads: int,
             cores: int) -> list[dict]:
    from hpcdl import perfmodel

    rows = []
    for ranks, result in sorted(results.items()):
        phases = result["phases"]
        # the step's pace is set by the rank that computes longest; "other" (logging) is not modelled
        compute = result.get("compute_max_s", sum(v for k, v in phases.items() if k not in ("allreduce", "other")))
        measured_allreduce = phases.get("allreduce", 0.0)
        name = regime(ranks, threads, cores)
        shared = result.get("trace")
        weight = 0.0
        if name == "oversubscribed" and shared:
            # which ranks share a core changes from step to step, so the window's slowest
            # rank (compute_max) is not each step's slowest: model the step's pace instead
            compute, weight = perfmodel.shared_core_pace(ranks, max(1, cores // threads), shared["mean_wall_s"],
                                                         shared["mean_cpu_s"])
        if ranks == 1:
            modelled = 0.0
        elif name in costs:
            modelled = predict_allreduce(buckets, ranks, algorithm, costs[name])
        else:
            raise SystemExit(f"hpcdl scaling sweep: no benchmark in the {name} regime to model {ranks} ranks")
        predicted = compute + phases.get("other", 0.0) + modelled
        rows.append({
            "ranks": ranks, "oversubscribed": name == "oversubscribed", "global_batch": result["global_batch"],
            "measured_step_s": result["step_s"], "predicted_step_s": predicted,
            "error": predicted / result["step_s"] - 1.0, "compute_s": compute, "allreduce_s": modelled,
            "exposed_allreduce_s": modelled, "measured_allreduce_s": measured_allreduce, "regime": name,
            "mean_wall_compute_s": shared["mean_wall_s"] if shared else "",
            "mean_cpu_compute_s": shared["mean_cpu_s"] if shared else "", "pinned_weight": weight,
            "measured_pace_s": shared["max_wall_s"] if shared else "",
        })
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS})
    return path


def plot(rows: list[dict], out: Path, title: str, mode: str) -> list[Path]:
    from hpcdl.metrics import _pyplot

    plt = _pyplot()
    if plt is None:
        return []
    ranks = [r["ranks"] for r in rows]
    base = rows[0]

    def efficiency(row, key):
        # weak: the same work per rank, so ideal is a constant step; strong: ideal is 1/P of one rank's step
        ideal = base[key] if mode == "weak" else base[key] * base["ranks"] / row["ranks"]
        return 100 * ideal / row[key]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, [efficiency(r, "measured_step_s") for r in rows], marker="o", label="measured")
    ax.plot(ranks, [efficiency(r, "predicted_step_s") for r in rows], marker="s", ls="--", label="model")
    for r in rows:
        if r["oversubscribed"]:
            ax.annotate("oversubscribed", (r["ranks"], efficiency(r, "measured_step_s")), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set(title=f"{title}: {mode}-scaling efficiency", xlabel="ranks", ylabel="efficiency (%)", xticks=ranks)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    efficiency_png = out / "efficiency.png"
    fig.savefig(efficiency_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    left = [x - width / 2 for x in ranks]
    right = [x + width / 2 for x in ranks]
    compute = [1e3 * r["compute_s"] for r in rows]
    ax.bar(left, compute, width, label="compute (measured)", color="#4c72b0")
    ax.bar(left, [1e3 * r["measured_allreduce_s"] for r in rows], width, bottom=compute,
           label="allreduce, exposed (measured)", color="#dd8452")
    ax.bar(right, compute, width, color="#4c72b0", alpha=0.5)
    ax.bar(right, [1e3 * r["allreduce_s"] for r in rows], width, bottom=compute, color="#dd8452", alpha=0.5,
           label="allreduce (model)")
    ax.set(title=f"{title}: step time (left measured, right model)", xlabel="ranks", ylabel="ms per step",
           xticks=ranks)
    ax.legend(fontsize=8)
    fig.tight_layout()
    breakdown_png = out / "breakdown.png"
    fig.savefig(breakdown_png, dpi=110)
    plt.close(fig)
    return [efficiency_png, breakdown_png]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'':>14} {'batch':>6} {'measured ms':>12} {'model ms':>9} {'error':>7} "
             f"{'compute ms':>11} {'allreduce ms: model':>20} {'measured':>9}"]
    for r in rows:
        lines.append(f"{r['ranks']:>5} {'oversubscribed' if r['oversubscribed'] else '':>14} {r['global_batch']:>6} "
                     f"{1e3 * r['measured_step_s']:>12.2f} {1e3 * r['predicted_step_s']:>9.2f} "
                     f"{100 * r['error']:>+6.1f}% {1e3 * r['compute_s']:>11.2f} {1e3 * r['allreduce_s']:>20.2f} "
                     f"{1e3 * r['measured_allreduce_s']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hpcdl = [sys.executable, "-m", "hpcdl"]
    from hpcdl import config as config_mod

    base = config_mod.load(args.config, list(args.set) + [f"model.name={args.model!r}"])
    input_shape, num_classes = _data_shape(base)
    buckets = bucket_sizes(args.model, input_shape, num_classes, args.bucket_mb)
    largest = max(args.ranks)
    started = time.perf_counter()

    bench_files = [Path(p) for p in args.bench_json] if args.bench_json is not None else []
    if args.bench_json is None:
        sizes = sorted({*buckets, *(max(4096, b // 4) for b in buckets), 2**20, 16 * 2**20})
        for ranks in (p for p in args.ranks if p > 1):
            path = out / f"bench-p{ranks}.json"
            if args.reuse and path.exists():
                bench_files.append(path)
                continue
            print(f"hpcdl scaling sweep: allreduce benchmark on {ranks} ranks", file=sys.stderr, flush=True)
            _launch(args.launcher, ranks, hpcdl + ["bench", "allreduce", "--algorithms", args.algorithm,
                                                   "--sizes", ",".join(map(str, sizes)),
                                                   "--repeats", str(args.bench_repeats), "--no-resnet",
                                                   "--json", str(path)],
                    out / f"bench-p{ranks}.log", args.threads, timeout=1800)
            bench_files.append(path)
    bench = [json.loads(p.read_text()) for p in bench_files]
    costs = fit_regimes(bench, args.algorithm, args.threads, args.cores)

    results = {}
    for ranks in args.ranks:
        global_batch = args.per_rank_batch * (ranks if args.mode == "weak" else largest)
        run_dir = out / f"train-p{ranks}"
        overrides = [*args.set, f"model.name={args.model!r}", f"train.global_batch={global_batch}",
                     "train.accumulate_steps=1", f"train.max_steps={args.steps}", "train.eval_every_epochs=0",
                     "schedule.warmup_epochs=0",
                     "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.at_end=false",
                     f"log.every_steps={args.log_every}", "log.plots=false", f"comm.algorithm={args.algorithm!r}",
                     f"comm.bucket_mb={args.bucket_mb}",
                     # the timeline of every step after the warm-up window: each rank's compute per step
                     f"log.trace_steps=[{min(args.log_every + 1, args.steps)}, {args.steps}]",
                     f"log.trace_file={str(run_dir / 'trace.json')!r}"]
        metrics, timeline = run_dir / "metrics.jsonl", run_dir / "trace.json"
        if args.reuse and timeline.exists() and metrics.exists():
            print(f"hpcdl scaling sweep: {ranks} rank(s): reusing {run_dir}", file=sys.stderr, flush=True)
            results[ranks] = dict(step_breakdown(metrics), trace=trace_compute(timeline))
            continue
        if metrics.exists():
            metrics.unlink()  # a fresh run, not lines appended to an older one
        print(f"hpcdl scaling sweep: training on {ranks} rank(s), global batch {global_batch}", file=sys.stderr,
              flush=True)
        _launch(args.launcher, ranks, hpcdl + ["train", "--config", args.config, "--out", str(run_dir),
                                               *[a for o in overrides for a in ("--set", o)]],
                out / f"train-p{ranks}.log", args.threads, timeout=3600)
        results[ranks] = dict(step_breakdown(metrics), trace=trace_compute(timeline))

    rows = rows_for(results, buckets, costs, args.algorithm, args.threads, args.cores)
    write_csv(rows, out / "scaling.csv")
    pngs = plot(rows, out, args.model, args.mode)
    summary = {"model": args.model, "mode": args.mode, "algorithm": args.algorithm, "cores": args.cores,
               "threads": args.threads, "bucket_bytes": buckets, "costs": {k: v.as_dict() for k, v in costs.items()},
               "bench": [str(p) for p in bench_files], "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    print(format_table(rows))
    print(f"wrote {out / 'scaling.csv'}" + "".join(f", {p}" for p in pngs), file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _data_shape(config) -> tuple[tuple, int]:
    """Input shape and class count the trainer will see (an HDF5 file is opened, not read)."""
    from hpcdl.data.dataset import load_dataset

    d = config.data
    data = load_dataset(d.dataset, path=d.path or None, data_dir=d.data_dir or None, download=d.download,
                        synthetic_size=d.synthetic_samples, synthetic_shape=tuple(d.synthetic_shape),
                        seed=config.train.seed)
    try:
        channels, height, width = data.input_shape
        if d.image_size:
            height = width = d.image_size
        return (channels, height, width), data.num_classes
    finally:
        data.close()
