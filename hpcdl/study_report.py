"""The large-batch study's tables and figures, from the cells' result.json and metrics.jsonl files.

`write_outputs(out, cells, results, state)` writes, in OUT:

* results.json / results.md: test accuracy per (model, optimizer, batch,
  budget) with mean and spread over seeds, steps and wall time; diverged
  runs marked, never dropped; whether LARS and LAMB hold within 1 point of
  batch 128, which budget closes the gap; the LR x warmup search;
* accuracy_vs_batch.png, gap_vs_epoch.png, trust_heatmap.png,
  lars_lr_dynamics.png (plots, when matplotlib is there);
* layer_table.md (per-layer ||w||, ||g||, ||w||/||g|| of the CNN at three
  points in training) and lamb_no_retuning.md (batch x2, LR x sqrt 2,
  warmup x2 per row).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from hpcdl import metrics
from hpcdl.study import BASE_BATCH, Cell

HOLD_POINTS = 1.0  # "holds" = within this many accuracy points of batch 128
STALLED_BELOW = 20.0  # test accuracy (%) under twice chance: the run learned next to nothing


def _records(out: Path, name: str) -> list[dict]:
    path = out / "cells" / name / "run" / "metrics.jsonl"
    return metrics.read_jsonl(path) if path.exists() else []


def _accuracy(result: dict) -> float | None:
    summary = result.get("summary") or {}
    return 100 * summary["test_accuracy"] if "test_accuracy" in summary else None


def _group_key(cell: Cell) -> tuple:
    return (cell.model, cell.optimizer, cell.batch, cell.budget, cell.amount, cell.lr_factor, cell.warmup_factor)


def summarize(cells: list[Cell], results: list[dict]) -> list[dict]:
    """One row per (model, optimizer, batch, budget, LR and warmup factors): seeds pooled."""
    groups: dict[tuple, list] = {}
    for cell, result in zip(cells, results):
        groups.setdefault(_group_key(cell), []).append((cell, result))
    rows = []
    for key, members in groups.items():
        model, optimizer, batch, budget, amount, lr_factor, warmup_factor = key
        accuracies = [_accuracy(r) for _, r in members if r["status"] == "ok" and _accuracy(r) is not None]
        statuses = [r["status"] for _, r in members]
        steps = [(r.get("summary") or {}).get("steps") for _, r in members]
        rows.append({
            "model": model, "optimizer": optimizer, "batch": batch, "budget": budget, "amount": amount,
            "lr_factor": lr_factor, "warmup_factor": warmup_factor, "parts": sorted({c.part for c, _ in members}),
            "seeds": len(members), "ok": len(accuracies), "diverged": statuses.count("diverged"),
            "failed": statuses.count("failed"),
            "stalled": sum(1 for a in accuracies if a < STALLED_BELOW),
            "accuracy_mean": round(statistics.fmean(accuracies), 3) if accuracies else None,
            "accuracy_std": round(statistics.stdev(accuracies), 3) if len(accuracies) > 1 else None,
            "accuracy_range": round(max(accuracies) - min(accuracies), 3) if accuracies else None,
            "accuracies": [None if a is None else round(a, 3) for a in (_accuracy(r) for _, r in members)],
            "steps": next((s for s in steps if s), None),
            "epochs": round(members[0][0].epochs, 3),
            "wall_s_mean": round(statistics.fmean(r["wall_s"] for _, r in members), 1),
            "peak_lr": members[0][1]["schedule"]["peak_lr"],
            "warmup_steps": members[0][1]["schedule"]["warmup_steps"],
            "warmup_capped": members[0][1]["schedule"]["warmup_capped"],
        })
    return rows


def _rule_rows(rows, model, budget="epochs"):
    return [r for r in rows if r["model"] == model and r["budget"] == budget
            and (r["lr_factor"], r["warmup_factor"]) == (1.0, 1.0)]


def _text(row: dict | None) -> str:
    if row is None:
        return "-"
    parts = []
    if row["accuracy_mean"] is not None:
        spread = f" ± {row['accuracy_std']:.2f}" if row["accuracy_std"] is not None else ""
        parts.append(f"{row['accuracy_mean']:.2f}{spread}")
    if row["stalled"]:
        parts.append(f"(stalled {row['stalled']}/{row['seeds']})")
    if row["diverged"]:
        parts.append(f"**diverged** {row['diverged']}/{row['seeds']}")
    if row["failed"]:
        parts.append(f"failed {row['failed']}/{row['seeds']}")
    return " ".join(parts) or "-"


def holds(rows: list[dict]) -> list[dict]:
    """Per (model, optimizer): the largest batch's accuracy against batch 128's, and what closes a gap."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        main = _rule_rows(rows, model)
        for optimizer in dict.fromkeys(r["optimizer"] for r in main):
            mine = {r["batch"]: r for r in main if r["optimizer"] == optimizer}
            small = mine.get(BASE_BATCH)
            if small is None or small["accuracy_mean"] is None or len(mine) < 2:
                continue
            largest = max(mine)
            big = mine[largest]
            gap = None if big["accuracy_mean"] is None else round(small["accuracy_mean"] - big["accuracy_mean"], 3)
            entry = {"model": model, "optimizer": optimizer, "small_batch": BASE_BATCH, "large_batch": largest,
                     "small": small["accuracy_mean"], "large": big["accuracy_mean"], "gap_points": gap,
                     "large_diverged": big["diverged"], "holds": gap is not None and gap <= HOLD_POINTS,
                     "closed_by": [], "best_tried": None}
            tried = [r for r in rows if (r["model"], r["optimizer"], r["batch"]) == (model, optimizer, largest)
                     and r["accuracy_mean"] is not None]
            if tried:
                entry["best_tried"] = _describe(max(tried, key=lambda r: r["accuracy_mean"]))
            for r in rows:  # other budgets and search points at the same batch that come within 1 point
                if (r["model"], r["optimizer"]) != (model, optimizer) or r["batch"] != largest or r is big:
                    continue
                if r["accuracy_mean"] is not None and small["accuracy_mean"] - r["accuracy_mean"] <= HOLD_POINTS:
                    entry["closed_by"].append(_describe(r))
            out.append(entry)
    return out


def _describe(r: dict) -> str:
    budget = f"{r['amount']:g} epochs" if r["budget"] == "epochs" else f"{r['amount']:g} steps ({r['epochs']:g} epochs)"
    factors = "" if (r["lr_factor"], r["warmup_factor"]) == (1.0, 1.0) else \
        f", LR x{r['lr_factor']:g}, warmup x{r['warmup_factor']:g}"
    return f"batch {r['batch']}, {budget}{factors}: {r['accuracy_mean']:.2f}%"


def search_table(rows: list[dict]) -> list[dict]:
    """The LR x warmup search at each model's largest batch: rule point, best point, spread."""
    out = []
    searched = {(r["model"], r["optimizer"], r["batch"]) for r in rows if "search" in r["parts"]}
    for model, optimizer, batch in sorted(searched):
        points = [r for r in rows if (r["model"], r["optimizer"], r["batch"], r["budget"]) ==
                  (model, optimizer, batch, "epochs")]
        rule = next((r for r in points if (r["lr_factor"], r["warmup_factor"]) == (1.0, 1.0)), None)
        finished = [r for r in points if r["accuracy_mean"] is not None]
        best = max(finished, key=lambda r: r["accuracy_mean"], default=None)
        values = [r["accuracy_mean"] for r in finished]
        out.append({"model": model, "optimizer": optimizer, "batch": batch, "points": len(points),
                    "diverged_points": sum(1 for r in points if r["diverged"]),
                    "rule": rule["accuracy_mean"] if rule else None,
                    "best": best["accuracy_mean"] if best else None,
                    "best_lr_factor": best["lr_factor"] if best else None,
                    "best_warmup_factor": best["warmup_factor"] if best else None,
                    "best_peak_lr": best["peak_lr"] if best else None,
                    "spread": round(max(values) - min(values), 3) if values else None})
    return out


def noise_notes(rows: list[dict]) -> list[str]:
    """Where the best and second-best optimizer at a batch differ by less than their seeds' spread."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        main = _rule_rows(rows, model)
        for batch in sorted({r["batch"] for r in main}):
            ranked = sorted((r for r in main if r["batch"] == batch and r["accuracy_mean"] is not None),
                            key=lambda r: -r["accuracy_mean"])
            if len(ranked) < 2:
                continue
            a, b = ranked[0], ranked[1]
            diff = a["accuracy_mean"] - b["accuracy_mean"]
            if a["ok"] < 2 or b["ok"] < 2:
                notes.append(f"{model} batch {batch}: {a['optimizer']} leads {b['optimizer']} by {diff:.2f} points "
                             "(one seed: the noise is unknown)")
                continue
            noise = max(a["accuracy_range"], b["accuracy_range"])
            verdict = "inside the noise" if diff <= noise else "outside the noise"
            notes.append(f"{model} batch {batch}: {a['optimizer']} leads {b['optimizer']} by {diff:.2f} points, "
                         f"{verdict} (seed range up to {noise:.2f})")
    return notes


# -- tables ------------------------------------------------------------------------------------

def results_markdown(rows, hold, search, notes, state, cells) -> str:
    lines = ["# Large-batch study: results", "",
             f"Command: `{state.get('command', '?')}`  ", f"Started: {state.get('started', '?')}  "]
    for estimate in state.get("estimates_s", []):
        parts = [f"estimated {estimate.get('before_start', 0) / 60:.1f} min for {estimate.get('cells_to_run')} cells"]
        if "after_calibration" in estimate:
            parts.append(f"{estimate['after_calibration'] / 60:.1f} min after calibration")
        if "actual" in estimate:
            parts.append(f"actual {estimate['actual'] / 60:.1f} min")
        lines.append("Time: " + ", ".join(parts) + "  ")
    lines += ["", "Test accuracy (%) on Fashion-MNIST's 10,000 test images: mean ± standard deviation over "
              "seeds (no ± with one seed). **diverged** = training stopped on non-finite gradients or ended "
              "with a loss above twice the chance loss; such runs are counted, not averaged. "
              "**stalled** = finished, but under 20% test accuracy (chance is 10%); averaged as measured.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        main = _rule_rows(rows, model)
        if not main:
            continue
        batches = sorted({r["batch"] for r in main})
        epochs = main[0]["amount"]
        lines += [f"## {model}: fixed budget of {epochs:g} epochs", "",
                  "| optimizer | " + " | ".join(str(b) for b in batches) + " | steps at largest | holds within 1 pt |",
                  "|---" * (len(batches) + 3) + "|"]
        for optimizer in dict.fromkeys(r["optimizer"] for r in main):
            mine = {r["batch"]: r for r in main if r["optimizer"] == optimizer}
            entry = next((h for h in hold if (h["model"], h["optimizer"]) == (model, optimizer)), None)
            if entry is None:
                verdict = "-"
            elif entry["gap_points"] is None:
                verdict = "**no** (diverged)"
            else:
                verdict = f"{'yes' if entry['holds'] else '**no**'} ({-entry['gap_points']:+.2f})"
            lines.append(f"| {optimizer} | " + " | ".join(_text(mine.get(b)) for b in batches)
                         + f" | {mine[max(mine)]['steps'] or '-'} | {verdict} |")
        lines.append("")
        steps = _rule_rows(rows, model, "steps")
        if steps:
            lines += [f"### {model}: fixed number of steps at a large batch", "",
                      "| optimizer | batch | steps | epochs | accuracy | same batch, fixed epochs | batch 128 |",
                      "|---|---|---|---|---|---|---|"]
            for r in steps:
                same = next((m for m in main if (m["optimizer"], m["batch"]) == (r["optimizer"], r["batch"])), None)
                small = next((m for m in main if (m["optimizer"], m["batch"]) == (r["optimizer"], BASE_BATCH)), None)
                lines.append(f"| {r['optimizer']} | {r['batch']} | {r['amount']:g} | {r['epochs']:g} | {_text(r)} | "
                             f"{_text(same)} | {_text(small)} |")
            lines.append("")
    if search:
        lines += ["## LR x warmup search at the largest batch", "",
                  "LR x {1/4, 1/2, 2, 4} at the rule's warmup and warmup x {1/2, 2} at the rule's LR "
                  "(warmup capped at half the run); one seed per point.", "",
                  "| model | optimizer | batch | points | diverged | rule's point | best | best at | spread |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in search:
            at = "-" if s["best"] is None else \
                f"LR x{s['best_lr_factor']:g} ({s['best_peak_lr']:.4g}), warmup x{s['best_warmup_factor']:g}"
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {s['model']} | {s['optimizer']} | {s['batch']} | {s['points']} | {s['diverged_points']} "
                         f"| {fmt(s['rule'])} | {fmt(s['best'])} | {at} | {fmt(s['spread'])} |")
        lines.append("")
    lines += ["## Does the large batch hold?", ""]
    for h in hold:
        if h["holds"]:
            lines.append(f"- {h['model']} / {h['optimizer']}: holds at {h['large_batch']} "
                         f"({h['large']:.2f}% against {h['small']:.2f}% at {h['small_batch']}).")
        else:
            what = "diverged" if h["gap_points"] is None else \
                f"{h['large']:.2f}% against {h['small']:.2f}% at {h['small_batch']}, {h['gap_points']:.2f} points below"
            closed = "; closed by: " + "; ".join(h["closed_by"]) if h["closed_by"] else \
                "; no budget or search point tried closes the gap" + \
                (f" (best tried: {h['best_tried']})" if h["best_tried"] else "")
            lines.append(f"- {h['model']} / {h['optimizer']}: does **not** hold at {h['large_batch']} "
                         f"({what}){closed}.")
    if notes:
        lines += ["", "## Differences between optimizers and the noise", ""] + [f"- {n}" for n in notes]
    lines += ["", f"{len(cells)} cells; every cell's config, command and metrics are in cells/NAME/.", ""]
    return "\n".join(lines)


def _layer_cell(cells, results, optimizer: str, prefer=("fmnist_cnn_bn", "mlp", "vit"), batch="largest"):
    """The layer-logging cell of `optimizer` for the first model in `prefer` that has one."""
    logged = [(c, r) for c, r in zip(cells, results) if c.layer_stats and c.optimizer == optimizer
              and r["status"] != "failed"]
    for model in prefer:
        mine = [(c, r) for c, r in logged if c.model == model]
        if mine:
            pick = max if batch == "largest" else min
            return pick(mine, key=lambda cr: cr[0].batch)[0]
    return None


def layer_table(out: Path, cells, results) -> str:
    lines = ["# Per-layer norms and trust ratios", "",
             "‖w‖ and ‖g‖ per parameter tensor (‖g‖ of the global-batch gradient, after the allreduce), "
             "‖w‖/‖g‖ and the trust ratio LARS applied (η‖w‖/(‖g‖ + wd‖w‖), 1 for biases and batch-norm "
             "parameters, which LARS skips), at the first, middle and last logged step: the talk's AlexNet "
             "table, for this study's CNN.", ""]
    found = False
    for which in ("smallest", "largest"):
        cell = _layer_cell(cells, results, "lars", batch=which)
        records = [r for r in _records(out, cell.name) if r["kind"] == "layers"] if cell else []
        if not records:
            continue
        found = True
        names = records[0]["names"]
        points = [records[0], records[len(records) // 2], records[-1]]
        lines += [f"## {cell.model}, LARS, batch {cell.batch} ({cell.name})", ""]
        columns = (f"step {p['step']}: ‖w‖ / ‖g‖ / ‖w‖/‖g‖ / trust" for p in points)
        header = "| layer | " + " | ".join(columns) + " |"
        lines += [header, "|---" * (len(points) + 1) + "|"]
        for i, name in enumerate(names):
            cols = []
            for p in points:
                w, g, t = p["w_norm"][i], p["g_norm"][i], p["trust"][i]
                ratio = w / g if g > 0 else float("inf")
                cols.append(f"{w:.3g} / {g:.3g} / {ratio:.3g} / {t:.3g}")
            lines.append(f"| {name} | " + " | ".join(cols) + " |")
        weights = [i for i, n in enumerate(names) if n.endswith("weight")]
        last = points[-1]
        ratios = [last["w_norm"][i] / last["g_norm"][i] for i in weights if last["g_norm"][i] > 0]
        if ratios:
            lines += ["", f"‖w‖/‖g‖ over weight tensors at step {last['step']}: {min(ratios):.3g} to "
                          f"{max(ratios):.3g}, a factor of {max(ratios) / min(ratios):.3g}.", ""]
    if not found:
        lines.append("No LARS cell logged layer statistics in this grid.")
    return "\n".join(lines) + "\n"


def lamb_no_retuning(rows) -> str:
    lines = ["# LAMB without retuning", "",
             "Each row doubles the batch; the LAMB rule (You et al. 2020) multiplies the LR by √2 and the "
             "warmup (in epochs) by 2, so the warmup stays the same number of steps; nothing else changes. "
             "Warmup is capped at half the run (marked *).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lamb = sorted((r for r in _rule_rows(rows, model) if r["optimizer"] == "lamb"), key=lambda r: r["batch"])
        if len(lamb) < 2:
            continue
        base = next((r for r in lamb if r["batch"] == BASE_BATCH), lamb[0])
        lines += [f"## {model}, {lamb[0]['amount']:g} epochs", "",
                  "| batch | x batch | peak LR | warmup steps | warmup epochs | steps | accuracy (%) | vs batch 128 |",
                  "|---|---|---|---|---|---|---|---|"]
        previous = None
        for r in lamb:
            factor = "-" if previous is None else f"x{r['batch'] / previous['batch']:g}"
            warmup_epochs = r["warmup_steps"] * r["batch"] / 60_000
            delta = "-" if r["accuracy_mean"] is None or base["accuracy_mean"] is None else \
                f"{r['accuracy_mean'] - base['accuracy_mean']:+.2f}"
            cap = "*" if r["warmup_capped"] else ""
            lines.append(f"| {r['batch']} | {factor} | {r['peak_lr']:.4g} | {r['warmup_steps']}{cap} | "
                         f"{warmup_epochs:.3g} | {r['steps'] or '-'} | {_text(r)} | {delta} |")
            previous = r
        lines.append("")
    return "\n".join(lines) + "\n"


# -- figures -------------------------------------------------------------------------------------

def _accuracy_panels(rows):
    panels = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        lines = {}
        for budget in ("epochs", "steps"):
            for r in _rule_rows(rows, model, budget):
                if r["diverged"]:
                    suffix = " (steps)" if budget == "steps" else ""
                    lines.setdefault("diverged", []).append(
                        (r["batch"], f"{r['optimizer']}{suffix} {r['diverged']}/{r['seeds']}"))
                if r["accuracy_mean"] is None:
                    continue
                label = f"{r['optimizer']} ({budget})" if budget == "steps" else r["optimizer"]
                lines.setdefault(label, []).append((r["batch"], r["accuracy_mean"], r["accuracy_range"] or 0.0))
        if lines:
            panels[f"{model}"] = lines
    return panels


def _gap_panels(out, cells, results):
    panels = {}
    for model in dict.fromkeys(c.model for c in cells):
        main = [(c, r) for c, r in zip(cells, results) if c.model == model and c.part == "main" and c.seed == 0]
        if not main:
            continue
        largest = max(c.batch for c, _ in main)
        lines = {}
        for c, r in main:
            if c.batch not in (BASE_BATCH, largest):
                continue
            evals = [(e["epoch"], 100 * e["test_accuracy"]) for e in _records(out, c.name) if e["kind"] == "eval"]
            if evals:
                lines[f"{c.optimizer}, {c.batch}"] = evals
        if lines:
            title = f"{model}: batch {BASE_BATCH} (solid) vs {largest} (dashed)" if largest != BASE_BATCH else \
                f"{model}: batch {BASE_BATCH}"
            panels[title] = lines
    return panels


def _heatmap_panels(out, cells, results):
    panels = {}
    for optimizer in ("lars", "lamb"):
        cell = _layer_cell(cells, results, optimizer)
        records = [r for r in _records(out, cell.name) if r["kind"] == "layers"] if cell else []
        if not records:
            continue
        names = records[0]["names"]
        adapted = [i for i in range(len(names)) if any(rec["trust"][i] != 1.0 for rec in records)] or \
            list(range(len(names)))
        trust = [[rec["trust"][i] for rec in records] for i in adapted]
        panels[f"{optimizer.upper()} trust ratio, {cell.model}, batch {cell.batch}"] = (
            [rec["step"] for rec in records], [names[i] for i in adapted], trust)
    return panels


def _lr_dynamics_panels(out, cells, results):
    logged = [c for c, r in zip(cells, results) if c.layer_stats and c.optimizer == "lars" and r["status"] != "failed"]
    if not logged:
        return {}
    model = next((m for m in ("mlp", "fmnist_cnn_bn", "vit") if any(c.model == m for c in logged)))
    mine = sorted((c for c in logged if c.model == model), key=lambda c: c.batch)
    picks = list(dict.fromkeys([mine[0], mine[len(mine) // 2], mine[-1]]))
    panels = {}
    for cell in picks:
        records = _records(out, cell.name)
        steps = [(r["step"], r["lr"]) for r in records if r["kind"] == "step"]
        layers = [r for r in records if r["kind"] == "layers"]
        start = next((r for r in records if r["kind"] == "start"), None)
        if not layers or not steps or start is None:
            continue
        per_epoch = start["steps_per_epoch"]
        lr_at = dict(steps)
        names = layers[0]["names"]
        shown = {}
        for i, name in enumerate(names):
            points = [(rec["step"] / per_epoch, lr_at[rec["step"]] * rec["trust"][i]) for rec in layers
                      if rec["step"] in lr_at and lr_at[rec["step"]] > 0]
            if points:
                shown[name] = ([p[0] for p in points], [p[1] for p in points], not name.endswith("weight"))
        panels[f"LARS, {model}, batch {cell.batch}"] = shown
    return panels


def write_outputs(out: Path, cells: list[Cell], results: list[dict], state: dict) -> list[Path]:
    out = Path(out)
    rows = summarize(cells, results)
    hold, search, notes = holds(rows), search_table(rows), noise_notes(rows)
    payload = {"format": "hpcdl-study-results/1", "grid": state.get("grid"), "command": state.get("command"),
               "estimates_s": state.get("estimates_s", []), "groups": rows, "holds": hold, "search": search,
               "noise": notes,
               "cells": [{"name": r["name"], **r["cell"], "status": r["status"], "error": r["error"],
                          "test_accuracy": _accuracy(r), "steps": (r.get("summary") or {}).get("steps"),
                          "wall_s": r["wall_s"], "ranks": r["ranks"], "schedule": r["schedule"]}
                         for r in results]}
    written = []

    def text(name: str, content: str):
        (out / name).write_text(content)
        written.append(out / name)

    text("results.json", json.dumps(payload, indent=1, default=_finite))
    text("results.md", results_markdown(rows, hold, search, notes, state, cells))
    text("layer_table.md", layer_table(out, cells, results))
    text("lamb_no_retuning.md", lamb_no_retuning(rows))
    figures = [
        (metrics.plot_accuracy_vs_batch, _accuracy_panels(rows), "accuracy_vs_batch.png"),
        (metrics.plot_gap_vs_epoch, _gap_panels(out, cells, results), "gap_vs_epoch.png"),
        (metrics.plot_trust_heatmap, _heatmap_panels(out, cells, results), "trust_heatmap.png"),
        (metrics.plot_lr_dynamics, _lr_dynamics_panels(out, cells, results), "lars_lr_dynamics.png"),
    ]
    for plot, panels, name in figures:
        if plot(panels, out / name) is not None:
            written.append(out / name)
    return written


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
