"""What a run tells people: JSONL metrics, a progress line, a timing breakdown, plots.

Only rank 0 writes or prints; the other ranks get objects whose methods do
nothing, so the step loop needs no `if rank == 0` around every call.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path


class PhaseTimer:
    """Wall time per phase of a step (data, forward, backward, comm, optimizer)."""

    def __init__(self):
        self.totals = defaultdict(float)
        self._phase = None
        self._since = 0.0

    def switch(self, phase: str | None) -> None:
        # Device kernels run asynchronously: without a sync, backward's kernels would be
        # booked to whatever phase the host reaches next (typically the allreduce).
        from hpcdl import backend

        if backend.device == "gpu":
            backend.synchronize()
        now = time.perf_counter()
        if self._phase is not None:
            self.totals[self._phase] += now - self._since
        self._phase, self._since = phase, now

    def drain(self) -> dict[str, float]:
        """Totals since the last drain, in seconds; the current phase keeps running."""
        self.switch(self._phase)
        out = dict(self.totals)
        self.totals.clear()
        return out


class MetricsLog:
    """Appends one JSON object per line to `path`; every record has `kind` and `time`."""

    def __init__(self, path: Path | None, truncate: bool = False):
        """`truncate` starts a fresh log; a resumed run appends to the one it continues."""
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w" if truncate else "a", buffering=1)

    def write(self, kind: str, **fields) -> None:
        if self._file is None:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Progress:
    """One self-overwriting status line on a terminal, plain lines otherwise (batch logs)."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=sys.stderr):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self.started = time.perf_counter()

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        done = step / max(self.total, 1)
        width = 24
        bar = "#" * int(done * width) + "." * (width - int(done * width))
        eta = elapsed / done - elapsed if done > 0 else float("nan")
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        line = f"[{bar}] {step}/{self.total}  {shown}  eta {_duration(eta)}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * 160 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_run(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss, test accuracy and LR against step; None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    records = read_jsonl(metrics_path)
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps])
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].plot([r["step"] for r in evals], [100 * r["test_accuracy"] for r in evals], marker="o")
    axes[1].set(title="test accuracy (%)", xlabel="step")
    axes[2].plot([r["step"] for r in steps], [r["lr"] for r in steps])
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_layer_stats(metrics_path: Path, out_png: Path, top: int = 12) -> Path | None:
    """Per-layer trust ratio against step (the LARS/LAMB picture of per-layer LR)."""
    plt = _pyplot()
    if plt is None:
        return None
    records = [r for r in read_jsonl(metrics_path) if r["kind"] == "layers"]
    if not records:
        return None
    names = records[0]["names"]
    shown = names if len(names) <= top else names[:: max(1, len(names) // top)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in shown:
        i = names.index(name)
        ax.plot([r["step"] for r in records], [r["trust"][i] for r in records], label=name)
    ax.set(title="per-layer trust ratio", xlabel="step", yscale="log")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# -- large-batch study figures (hpcdl.study_report prepares their data) ------------------------------

def _save(fig, plt, out_png: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_accuracy_vs_batch(panels: dict, out_png: Path) -> Path | None:
    """Goyal-style figure. panels: {title: {label: [(batch, mean %, spread %), ...]}}; labels ending
    in "(steps)" are drawn dashed with square markers (the fixed-step budget). The label "diverged"
    holds [(batch, optimizer)]: red crosses at 10% (chance), named, so that no run drops out of sight."""
    plt = _pyplot()
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            if label == "diverged":
                ax.scatter([p[0] for p in points], [10.0] * len(points), marker="x", color="red", label=label)
                for batch, name in points:
                    ax.annotate(name, (batch, 10.0), textcoords="offset points", xytext=(4, 4), fontsize=6,
                                color="red")
                continue
            points = sorted(points)
            style = dict(linestyle="--", marker="s") if label.endswith("(steps)") else dict(marker="o")
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] / 2 for p in points],
                        label=label, capsize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set(title=title, xlabel="global batch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, out_png)


def plot_gap_vs_epoch(panels: dict, out_png: Path) -> Path | None:
    """Generalization-gap figure. panels: {title: {label: [(epoch, accuracy %), ...]}}."""
    plt = _pyplot()
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                    linestyle="-" if "128" in label.split(",")[-1] else "--", label=label)
        ax.set(title=title, xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, out_png)


def plot_trust_heatmap(panels: dict, out_png: Path) -> Path | None:
    """Trust ratio over iterations x layers. panels: {title: (steps, layer names, trust [layers][records])}."""
    import numpy as np

    plt = _pyplot()
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 0.9 + 0.28 * max(
        len(names) for _, names, _ in panels.values())), squeeze=False)
    for ax, (title, (steps, names, trust)) in zip(axes[0], panels.items()):
        values = np.log10(np.maximum(np.asarray(trust, dtype=float), 1e-12))
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0], steps[-1], len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set(title=title, xlabel="iteration")
        fig.colorbar(image, ax=ax, label="log10 trust ratio")
    return _save(fig, plt, out_png)


def plot_lr_dynamics(panels: dict, out_png: Path) -> Path | None:
    """Effective per-layer LR (lr x trust) against epoch. panels: {title: {layer: (epochs, lrs, is_bias)}}."""
    plt = _pyplot()
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, layers) in zip(axes[0], panels.items()):
        for name, (epochs, lrs, is_bias) in layers.items():
            ax.plot(epochs, lrs, linestyle="--" if is_bias else "-", label=name + (" (bias)" if is_bias else ""))
        ax.set(title=title, xlabel="epoch", ylabel="lr x trust", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, plt, out_png)
