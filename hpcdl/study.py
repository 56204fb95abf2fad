"""`hpcdl study large-batch`: the large-batch results of Goyal et al., LARS and LAMB, as one command.

A study is a list of *cells*. Each cell is an ordinary `hpcdl train` run with
its own directory, `config.toml` and `command.txt` (the equivalent command
line), run in this process (`--ranks 1`) or under `mpiexec -n N`. A cell is
finished when its `result.json` exists; `--resume` skips those and continues
an interrupted cell from its own checkpoint (`hpcdl train --resume auto`).
When the cells are done the study reads their `metrics.jsonl` files and
writes the tables and figures (see `write_outputs`).

Tuning rules (docs/study.md says why):

* every optimizer has a base LR tuned at batch 128 (`RECIPES`); the batch
  rule then sets the LR at batch B, k = B / 128:
  SGD (Goyal et al. 2017) and AdamW-linear: lr = base·k, warmup a fixed
  number of epochs; LAMB (You et al. 2020) and AdamW-sqrt: lr = base·√k,
  warmup epochs × k (a constant number of warmup steps); LARS: lr = base·√k
  with a fixed warmup in epochs (MLPerf's LARS LR grows far slower than the
  batch: about 10 from 3K to 16K); every warmup capped at half the run;
* one decay for all: linear warmup from 0, then polynomial decay of power 2
  to 0 (the MLPerf LARS schedule), so that the optimizer and its rule are
  the only differences;
* at the largest batch, for every optimizer, a small search: LR × {1/4,
  1/2, 2, 4} at the rule's warmup and warmup × {1/2, 2} at the rule's LR.
  It reports the best point and the spread, so no optimizer loses to a bad
  guess of the rule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpcdl.config import from_dict, parse_override
from hpcdl.errors import ConfigError, UserError

TRAIN_SAMPLES = 60_000  # Fashion-MNIST's training split: epochs <-> samples for the estimate
BASE_BATCH = 128
CHANCE_LOSS = math.log(10)

# Optimizer recipes: the config an optimizer gets at batch 128 and the rule that scales it.
RECIPES = {
    "mlp": {  # the best of 3-4 LRs x2-4 apart, 2 epochs at batch 128 (docs/study.md)
        "sgd": dict(optim="sgd", base_lr=0.1, rule="linear", weight_decay=1e-4),
        "lars": dict(optim="lars", base_lr=2.0, rule="sqrt", warmup="epochs", weight_decay=1e-4),
        "lamb": dict(optim="lamb", base_lr=0.005, rule="sqrt", weight_decay=0.01),
        "adamw_linear": dict(optim="adamw", base_lr=0.003, rule="linear", weight_decay=0.01),
        "adamw_sqrt": dict(optim="adamw", base_lr=0.003, rule="sqrt", weight_decay=0.01),
    },
    # Not swept: fmnist_cnn_bn's SGD LR is the one jobs/configs/fmnist_cnn.toml was measured with, LAMB's
    # that of jobs/configs/fmnist_cnn_lamb_8k.toml, LARS's the mlp's; vit's are common AdamW/LAMB values.
    "fmnist_cnn_bn": {
        "sgd": dict(optim="sgd", base_lr=0.05, rule="linear", weight_decay=1e-4),
        "lars": dict(optim="lars", base_lr=2.0, rule="sqrt", warmup="epochs", weight_decay=1e-4),
        "lamb": dict(optim="lamb", base_lr=0.002, rule="sqrt", weight_decay=0.01),
    },
    "vit": {
        "adamw_linear": dict(optim="adamw", base_lr=0.001, rule="linear", weight_decay=0.05),
        "adamw_sqrt": dict(optim="adamw", base_lr=0.001, rule="sqrt", weight_decay=0.05),
        "lamb": dict(optim="lamb", base_lr=0.002, rule="sqrt", weight_decay=0.05),
    },
}
MODEL_OPTIONS = {"mlp": {}, "fmnist_cnn_bn": {}, "vit": {"patch": 7, "dim": 32, "depth": 2, "heads": 4,
                                                         "dropout": 0.1}}
# Samples per micro-batch on one rank: larger batches are accumulated (the fast size per model here).
MICRO_BATCH = {"mlp": 2048, "fmnist_cnn_bn": 256, "vit": 256}
# Cost model before calibration, from the quick grid on this 2-core machine: training images/s,
# seconds of fixed cost per optimizer step, evaluation images/s. Calibration scales it per model.
PRIOR_COST = {"mlp": (60_000.0, 0.010, 100_000.0), "fmnist_cnn_bn": (800.0, 0.05, 1500.0),
              "vit": (1500.0, 0.02, 3000.0)}
TEST_SAMPLES = 10_000
CELL_OVERHEAD_S = 2.0
LINEAR_WARMUP_EPOCHS = 1.0   # Goyal et al.: the warmup is a fixed number of epochs
SQRT_WARMUP_BASE_EPOCHS = 0.025  # at batch 128 (12 steps); x k under the sqrt rule
SEARCH_LR = (0.25, 0.5, 2.0, 4.0)
SEARCH_WARMUP = (0.5, 2.0)


@dataclass(frozen=True)
class Cell:
    model: str
    optimizer: str           # a RECIPES key
    batch: int
    budget: str              # "epochs" or "steps"
    amount: float            # epochs, or optimizer steps
    seed: int = 0
    lr_factor: float = 1.0   # the search's multiplier of the rule's LR
    warmup_factor: float = 1.0
    part: str = "main"       # main, search, steps, no_retune
    layer_stats: bool = False

    @property
    def name(self) -> str:
        amount = f"{self.amount:g}"
        text = f"{self.model}-{self.optimizer}-b{self.batch}-{self.budget[0]}{amount}-s{self.seed}"
        if (self.lr_factor, self.warmup_factor) != (1.0, 1.0):
            text += f"-lr{self.lr_factor:g}-wu{self.warmup_factor:g}"
        return text

    @property
    def samples(self) -> float:
        return self.amount * TRAIN_SAMPLES if self.budget == "epochs" else self.amount * self.batch

    @property
    def epochs(self) -> float:
        return self.samples / TRAIN_SAMPLES


# -- grids -----------------------------------------------------------------------------------

def _grid_cells(spec: dict) -> list[Cell]:
    cells: list[Cell] = []

    def add(cell: Cell):
        if cell not in cells and all(c.name != cell.name for c in cells):
            cells.append(cell)

    for model, plan in spec["models"].items():
        for optimizer in plan["optimizers"]:
            for batch in plan["batches"]:
                for seed in range(plan["seeds"]):
                    add(Cell(model, optimizer, batch, "epochs", plan["epochs"], seed,
                             layer_stats=seed == 0 and optimizer in ("lars", "lamb")))
    for model, batches in spec.get("no_retune", {}).items():
        plan = spec["models"][model]
        for batch in batches:
            add(Cell(model, "lamb", batch, "epochs", plan["epochs"], 0, part="no_retune"))
    for model, (batch, steps, optimizers) in spec.get("steps", {}).items():
        for optimizer in optimizers:
            add(Cell(model, optimizer, batch, "steps", steps, 0, part="steps"))
    for model, (lr_factors, warmup_factors) in spec.get("search", {}).items():
        plan = spec["models"][model]
        batch = max(plan["batches"])
        for optimizer in plan["optimizers"]:
            points = [(f, 1.0) for f in lr_factors] + [(1.0, w) for w in warmup_factors]
            for lr_factor, warmup_factor in points:
                add(Cell(model, optimizer, batch, "epochs", plan["epochs"], 0, lr_factor, warmup_factor,
                         part="search"))
    return cells


GRIDS = {
    # Every output file, in a few minutes: tiny budgets, one seed, batches to 4K.
    "quick": {
        "models": {
            "mlp": {"batches": [128, 1024, 4096], "optimizers": ["sgd", "lars", "lamb", "adamw_sqrt"],
                    "epochs": 1, "seeds": 1},
            "fmnist_cnn_bn": {"batches": [128, 4096], "optimizers": ["lars"], "epochs": 0.1, "seeds": 1},
            "vit": {"batches": [128], "optimizers": ["lamb"], "epochs": 0.1, "seeds": 1},
        },
        "no_retune": {"mlp": [256, 512, 2048]},
        "steps": {"mlp": (4096, 40, ["lars", "lamb"])},
        "search": {"mlp": ((0.25, 4.0), ())},
    },
    # About 90 minutes on 2 cores (the printed estimate says how long here).
    "standard": {
        "models": {
            "mlp": {"batches": [128, 1024, 4096, 8192, 16384],
                    "optimizers": ["sgd", "lars", "lamb", "adamw_linear", "adamw_sqrt"], "epochs": 10, "seeds": 2},
            "fmnist_cnn_bn": {"batches": [128, 8192], "optimizers": ["sgd", "lars", "lamb"], "epochs": 3,
                              "seeds": 1},
            "vit": {"batches": [128, 4096], "optimizers": ["adamw_linear", "adamw_sqrt", "lamb"], "epochs": 3,
                    "seeds": 1},
        },
        "no_retune": {"mlp": [256, 512, 2048]},
        "steps": {"mlp": (16384, 300, ["sgd", "lars", "lamb", "adamw_linear", "adamw_sqrt"])},
        "search": {"mlp": (SEARCH_LR, SEARCH_WARMUP)},
    },
    # A cluster allocation: more epochs and seeds, every model on batches to 16K, the search for all.
    "full": {
        "models": {
            "mlp": {"batches": [128, 256, 512, 1024, 2048, 4096, 8192, 16384],
                    "optimizers": ["sgd", "lars", "lamb", "adamw_linear", "adamw_sqrt"], "epochs": 15, "seeds": 3},
            "fmnist_cnn_bn": {"batches": [128, 1024, 4096, 8192, 16384], "optimizers": ["sgd", "lars", "lamb"],
                              "epochs": 15, "seeds": 2},
            "vit": {"batches": [128, 1024, 4096, 8192, 16384], "optimizers": ["adamw_linear", "adamw_sqrt", "lamb"],
                    "epochs": 15, "seeds": 2},
        },
        "steps": {"mlp": (16384, 600, ["sgd", "lars", "lamb", "adamw_linear", "adamw_sqrt"]),
                  "fmnist_cnn_bn": (16384, 400, ["sgd", "lars", "lamb"]),
                  "vit": (16384, 400, ["adamw_linear", "adamw_sqrt", "lamb"])},
        "search": {"mlp": (SEARCH_LR, SEARCH_WARMUP), "fmnist_cnn_bn": (SEARCH_LR, SEARCH_WARMUP),
                   "vit": (SEARCH_LR, SEARCH_WARMUP)},
    },
}


def grid(name: str) -> list[Cell]:
    """A named grid, or a JSON file holding a grid in the shape of GRIDS' entries."""
    if name in GRIDS:
        return _grid_cells(GRIDS[name])
    path = Path(name)
    if not name.endswith(".json"):
        raise ConfigError(f"--grid: unknown grid {name!r}; expected one of {', '.join(GRIDS)} or a .json file")
    try:
        spec = json.loads(path.read_text())
        cells = _grid_cells(spec)
    except FileNotFoundError:
        raise ConfigError(f"--grid {name}: file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--grid {name}: not a grid ({type(exc).__name__}: {exc}); see GRIDS in hpcdl/study.py") \
            from None
    unknown = sorted({f"{c.model}/{c.optimizer}" for c in cells if c.optimizer not in RECIPES.get(c.model, {})})
    if unknown:
        raise ConfigError(f"--grid {name}: no recipe for {', '.join(unknown)}; known: "
                          + ", ".join(f"{m}/{o}" for m in RECIPES for o in RECIPES[m]))
    return cells


# -- one cell's config ---------------------------------------------------------------------------

def schedule_of(cell: Cell) -> dict:
    """Peak LR and warmup (epochs, steps, whether capped) of the cell: its rule times the search's factors."""
    recipe = RECIPES[cell.model][cell.optimizer]
    k = cell.batch / BASE_BATCH
    rule = recipe["rule"]
    peak = recipe["base_lr"] * (k if rule == "linear" else math.sqrt(k)) * cell.lr_factor
    fixed = recipe.get("warmup", "epochs" if rule == "linear" else "steps") == "epochs"
    warmup_epochs = (LINEAR_WARMUP_EPOCHS if fixed else SQRT_WARMUP_BASE_EPOCHS * k) * cell.warmup_factor
    capped = min(warmup_epochs, 0.5 * cell.epochs)
    return {"rule": rule, "peak_lr": peak, "warmup_epochs": capped, "warmup_capped": capped < warmup_epochs,
            "warmup_steps": round(capped * TRAIN_SAMPLES / cell.batch)}


def _accumulation(cell: Cell, ranks: int) -> int:
    per_rank = cell.batch // ranks
    acc = 1
    while per_rank // (acc * 2) >= MICRO_BATCH[cell.model] and cell.batch % (ranks * acc * 2) == 0:
        acc *= 2
    return acc


def cell_config(cell: Cell, ranks: int, data_dir: str = "", overrides: tuple = ()) -> dict:
    """The TOML document of one cell: an ordinary `hpcdl train` config; `overrides` as `--set` takes them."""
    recipe = RECIPES[cell.model][cell.optimizer]
    sched = schedule_of(cell)
    if cell.batch % ranks:
        raise ConfigError(f"--ranks {ranks}: does not divide the global batch {cell.batch} of cell {cell.name}")
    total_steps = cell.amount if cell.budget == "steps" else math.ceil(cell.samples / cell.batch)
    every = max(1, int(total_steps) // 60)
    train = {"global_batch": cell.batch, "accumulate_steps": _accumulation(cell, ranks), "seed": cell.seed,
             "eval_every_epochs": 1.0 if cell.epochs >= 2 else round(max(cell.epochs / 4, 1e-3), 4),
             "eval_batch": 1000}
    if cell.budget == "steps":
        train.update(max_steps=int(cell.amount), epochs=1.0, eval_every_epochs=round(max(cell.epochs / 10, 0.01), 4))
    else:
        train["epochs"] = float(cell.amount)
    # The schedule names the rule: base_lr and base_batch are the recipe's, the search's factor rides on base_lr.
    schedule = {"base_lr": recipe["base_lr"] * cell.lr_factor, "base_batch": BASE_BATCH, "scaling": sched["rule"],
                "warmup_epochs": sched["warmup_epochs"] / (cell.batch / BASE_BATCH if sched["rule"] == "sqrt" else 1),
                "warmup_from": "zero", "decay": "poly", "power": 2.0, "end_lr": 0.0}
    config = {
        "model": {"name": cell.model, "options": dict(MODEL_OPTIONS[cell.model])},
        "data": {"dataset": "fashion_mnist", "download": False, **({"data_dir": data_dir} if data_dir else {})},
        "train": train,
        "optim": {"name": recipe["optim"], "weight_decay": recipe["weight_decay"]},
        "schedule": schedule,
        "checkpoint": {"every_minutes": 10.0, "at_end": False, "keep": 1},
        "log": {"every_steps": every, "progress": False, "layer_stats_every": every if cell.layer_stats else 0,
                "plots": False},
    }
    for text in overrides:
        section, key, value = parse_override(text)
        table = config.setdefault(section, {})
        *path, leaf = key.split(".")
        for part in path:  # model.options.dim=16
            table = table.setdefault(part, {})
        table[leaf] = value
    from_dict(json.loads(json.dumps(config)), f"cell {cell.name}")  # a bad key fails before any cell runs
    return config


def to_toml(document: dict) -> str:
    """TOML for the plain documents `cell_config` makes (tables of scalars, lists and inline tables)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"no TOML for {v}")
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"no TOML for {type(v).__name__}")

    lines = []
    for section, table in document.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


# -- time estimate --------------------------------------------------------------------------------

class Estimator:
    """Seconds per cell from images/s per model, scaled by what finished cells actually took."""

    def __init__(self):
        self.actual: dict[str, float] = {}
        self.predicted: dict[str, float] = {}

    def prior(self, cell: Cell) -> float:
        rate, per_step, eval_rate = PRIOR_COST[cell.model]
        if cell.budget == "steps":
            evals = 10
        else:
            evals = max(1, round(cell.epochs)) if cell.epochs >= 2 else 4
        steps = cell.samples / cell.batch
        return CELL_OVERHEAD_S + cell.samples / rate + steps * per_step + evals * TEST_SAMPLES / eval_rate

    def record(self, cell: Cell, seconds: float) -> None:
        self.actual[cell.model] = self.actual.get(cell.model, 0.0) + seconds
        self.predicted[cell.model] = self.predicted.get(cell.model, 0.0) + self.prior(cell)

    def factor(self, model: str) -> float:
        if model in self.actual:
            return self.actual[model] / self.predicted[model]
        if self.actual:
            return sum(self.actual.values()) / sum(self.predicted.values())
        return 1.0

    def __call__(self, cell: Cell) -> float:
        return self.prior(cell) * self.factor(cell.model)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def plan_table(cells: list[Cell], estimate: Estimator, done: set[str]) -> str:
    lines = [f"{'#':>3} {'cell':<52} {'part':<9} {'LR':>9} {'warmup':>8} {'steps':>6} {'est':>7}"]
    for i, cell in enumerate(cells, 1):
        sched = schedule_of(cell)
        steps = int(cell.amount) if cell.budget == "steps" else math.ceil(cell.samples / cell.batch)
        mark = "done" if cell.name in done else f"{estimate(cell):.0f}s"
        lines.append(f"{i:>3} {cell.name:<52} {cell.part:<9} {sched['peak_lr']:>9.4g} "
                     f"{sched['warmup_steps']:>8} {steps:>6} {mark:>7}")
    return "\n".join(lines)


# -- running cells -----------------------------------------------------------------------------------

def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")  # shards of one study write study.json side by side
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)  # a study killed mid-write never leaves a half result behind


def _status(summary: dict | None, error: str | None) -> str:
    if error is not None:
        return "diverged" if "non-finite" in error else "failed"
    loss = summary.get("final_loss", float("nan"))
    if not math.isfinite(loss) or loss > 2 * CHANCE_LOSS:
        return "diverged"
    return "ok"


def run_cell(cell: Cell, directory: Path, ranks: int, mpiexec: str, data_dir: str = "", overrides: tuple = ()) -> dict:
    """Train one cell; returns its result (also written to directory/result.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.toml"
    config_path.write_text(f"# study cell {cell.name}\n" + to_toml(cell_config(cell, ranks, data_dir, overrides)))
    run_dir = directory / "run"
    train_args = ["train", "--config", str(config_path), "--out", str(run_dir), "--resume", "auto"]
    launch = [*shlex.split(mpiexec), "-n", str(ranks)] if ranks > 1 else []
    command = [*launch, sys.executable, "-m", "hpcdl", *train_args]
    (directory / "command.txt").write_text(shlex.join(["hpcdl", *train_args] if ranks == 1 else command) + "\n")
    started = time.perf_counter()
    summary, error = None, None
    if ranks == 1:
        summary, error = _run_in_process(config_path, run_dir)
    else:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _RUNNING.append(proc)
        try:
            stdout, stderr = proc.communicate()
        finally:
            _RUNNING.remove(proc)
        (directory / "stderr.txt").write_text(stderr)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            summary = json.loads(lines[-1])
        else:
            errors = [line for line in stderr.splitlines() if "error" in line.lower()]
            error = (errors or stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    result = {"cell": asdict(cell), "name": cell.name, "status": _status(summary, error), "error": error,
              "summary": summary, "wall_s": round(time.perf_counter() - started, 2), "ranks": ranks,
              "schedule": schedule_of(cell)}
    if error is None and summary is not None and summary.get("stopped_early"):
        # A signal stopped the trainer at a checkpoint: the cell is unfinished, and recording it would put a
        # partly trained cell into the results. Without result.json, --resume continues it from the checkpoint.
        result["status"] = "stopped"
        return result
    _write_json(directory / "result.json", result)
    return result


# The cell launched under mpiexec, so that a signal sent to the study alone reaches the ranks too.
_RUNNING: list = []


class _StopRequest:
    """SIGTERM/SIGUSR1 (Slurm's time limit, scancel, Ctrl-C's cousins) stop the study after the current cell.

    An in-process cell installs the trainer's own handlers for its duration, which checkpoint and stop it at
    the next step; a cell under mpiexec gets the signal forwarded. Either way the study then stops, writes its
    state and says how to resume, instead of dying between files.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        for proc in _RUNNING:
            proc.send_signal(signum)


def _run_in_process(config_path: Path, run_dir: Path):
    from hpcdl import config as config_mod
    from hpcdl import train

    import warnings

    import numpy as np

    config = config_mod.load(config_path)
    try:
        # overflow in a diverging cell is a result, recorded as such; the warnings would only bury the log
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return train.run(config, out=str(run_dir), resume="auto", config_path=str(config_path)), None
    except UserError as exc:
        return None, str(exc)


# -- the command -------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpcdl study large-batch",
        description="SGD (Goyal linear rule), LARS, LAMB (sqrt rule) and AdamW at global batches from 128 to 16K "
                    "on Fashion-MNIST with mlp, fmnist_cnn_bn and vit: fixed-epoch and fixed-step budgets, an "
                    "LR x warmup search at the largest batch, seeds. Each cell is an `hpcdl train` run in "
                    "OUT/cells/NAME/; then OUT/results.md, results.json and the figures. See docs/study.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  hpcdl study large-batch --grid quick --out runs/study-quick\n"
               "  hpcdl study large-batch --grid standard --out docs/study --resume\n"
               "  hpcdl study large-batch --grid full --ranks 8 --mpiexec 'srun --cpu-bind=cores' --out runs/full\n")
    p.add_argument("--grid", default="quick", metavar="|".join(GRIDS) + "|FILE.json",
                   help="which cells (default quick); a JSON file holds a grid shaped as GRIDS in hpcdl/study.py")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="ranks per cell: 1 trains in this process, N > 1 launches MPIEXEC -n N per cell")
    p.add_argument("--mpiexec", default="mpiexec", metavar="CMD", help="launcher for --ranks > 1 (default mpiexec)")
    p.add_argument("--resume", action="store_true", help="continue a study in OUT: finished cells are skipped")
    p.add_argument("--plan", action="store_true", help="print the cells and the time estimate, run nothing")
    p.add_argument("--data-dir", default="", metavar="DIR", help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--only", default="", metavar="TEXT", help="run only cells whose name contains TEXT")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run cells I, I+N, I+2N, ... (one job-array task each); the report covers every finished cell")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key in every cell, as `hpcdl train --set` (e.g. data.path=... for HDF5)")
    return p


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "large-batch":
        raise ConfigError("hpcdl study: expected a study name: large-batch (try: hpcdl study large-batch --help)")
    args = parser().parse_args(argv[1:])
    if args.ranks < 1:
        raise ConfigError(f"--ranks: expected a positive integer, got {args.ranks}")
    out = Path(args.out)
    every = grid(args.grid)
    shard, shards = _shard(args.shard)
    cells = [c for i, c in enumerate(every) if args.only in c.name and i % shards == shard]
    if not cells:
        raise ConfigError(f"--only {args.only!r} --shard {args.shard}: matches no cell of grid {args.grid!r}")
    for cell in cells:  # a rank count that does not divide a batch, or a bad --set, fails here, not an hour in
        cell_config(cell, args.ranks, args.data_dir, tuple(args.overrides))
    state_path = out / "study.json"
    state = _open_state(state_path, args, cells, argv)
    estimate = Estimator()
    done = {}
    for cell in every:  # other shards' results too: they calibrate the estimate and go into the report
        result_path = out / "cells" / cell.name / "result.json"
        if result_path.exists():
            done[cell.name] = json.loads(result_path.read_text())
            estimate.record(cell, done[cell.name]["wall_s"])
    todo = _calibration_order([c for c in cells if c.name not in done])
    total = sum(estimate(c) for c in todo)
    print(f"hpcdl study large-batch --grid {args.grid}: {len(cells)} cells, {len(cells) - len(todo)} done, "
          f"{len(todo)} to run; "
          f"estimated {_minutes(total)} at --ranks {args.ranks} (the first cells calibrate it)")
    print(plan_table(cells, estimate, set(done)), flush=True)
    if args.plan:
        return 0
    state.setdefault("estimates_s", []).append({"time": time.time(), "before_start": round(total, 1),
                                                "cells_to_run": len(todo)})
    _write_json(state_path, state)
    started = time.perf_counter()
    with _StopRequest() as stop:
        for i, cell in enumerate(todo, 1):
            result = run_cell(cell, out / "cells" / cell.name, args.ranks, args.mpiexec, args.data_dir,
                              tuple(args.overrides))
            if result["status"] == "stopped" or stop.signum is not None:
                name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal"
                print(f"hpcdl study: stopped by {name} during cell {cell.name} ({i - 1} of {len(todo)} cells "
                      f"finished this time); its checkpoint is kept; continue with the same command and --resume",
                      file=sys.stderr, flush=True)
                return 128 + (stop.signum or signal.SIGTERM)
            done[cell.name] = result
            estimate.record(cell, result["wall_s"])
            remaining = sum(estimate(c) for c in todo[i:])
            accuracy = (result["summary"] or {}).get("test_accuracy")
            shown = f"{100 * accuracy:.2f}%" if accuracy is not None else "-"
            print(f"[{i}/{len(todo)}] {cell.name}: {result['status']} {shown} in {result['wall_s']:.0f}s; "
                  f"remaining ~{_minutes(remaining)}", flush=True)
            if i == min(len(todo), len({c.model for c in todo})):  # one cell of every model has run
                state["estimates_s"][-1]["after_calibration"] = round(time.perf_counter() - started + remaining, 1)
                _write_json(state_path, state)
    state["estimates_s"][-1]["actual"] = round(time.perf_counter() - started, 1)
    _write_json(state_path, state)
    from hpcdl.study_report import write_outputs

    finished = [c for c in every if c.name in done]
    written = write_outputs(out, finished, [done[c.name] for c in finished], state)
    print("hpcdl study: wrote " + ", ".join(str(p.relative_to(out)) for p in written))
    failed = [name for name, r in done.items() if r["status"] == "failed"]
    if failed:
        print(f"hpcdl study: {len(failed)} cell(s) failed (not diverged): {', '.join(failed)}; see their "
              f"result.json", file=sys.stderr)
        return 1
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/8") from None
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard {text!r}: expected 0 <= I < N")
    return shard, shards


def _calibration_order(cells: list[Cell]) -> list[Cell]:
    """The cheapest cell of each model first, so the estimate knows every model's speed early."""
    first = []
    for model in dict.fromkeys(c.model for c in cells):
        first.append(min((c for c in cells if c.model == model), key=lambda c: c.samples))
    return first + [c for c in cells if c not in first]


def _open_state(path: Path, args, cells: list[Cell], argv: list[str]) -> dict:
    names = [c.name for c in cells]
    if path.exists():
        if not args.resume:
            raise ConfigError(f"{path.parent}: holds a study already; pass --resume to continue it or choose "
                              f"another --out")
        state = json.loads(path.read_text())
        if state.get("grid") != args.grid:
            raise ConfigError(f"{path}: a study of grid {state.get('grid')!r}; --resume needs --grid "
                              f"{state.get('grid')}")
        return state
    if args.plan:
        return {}
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "hpcdl study " + shlex.join(argv)
    return {"format": "hpcdl-study/1", "grid": args.grid, "command": command, "cells": names,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


__all__ = ["Cell", "GRIDS", "RECIPES", "cell_config", "grid", "main", "run_cell", "schedule_of", "to_toml"]
