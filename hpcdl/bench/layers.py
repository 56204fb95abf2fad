"""Training throughput of hpcdl layers, side by side with PyTorch on the CPU.

    OMP_NUM_THREADS=1 python -m hpcdl.bench.layers --models fmnist_cnn --threads 1

One step = forward, softmax cross-entropy, backward, and a plain SGD update
over the whole arena (for PyTorch: torch.optim.SGD). Models and inputs:
`fmnist_cnn` on 1x28x28 and `resnet18` (CIFAR stem) on 3x28x28, random
data, batch 128 by default. Warm-up steps are excluded; each repeat times
`--steps` steps and the table reports the median and spread over repeats.

Threads: BLAS reads its thread count when NumPy is first imported. Run as
`python -m hpcdl.bench.layers` (or through the `hpcdl` CLI, which pins
threads first) so that `--threads` reaches BLAS; if NumPy was imported
earlier with another OMP_NUM_THREADS the result says so
(`blas_threads_pinned: false`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

INPUT_SHAPES = {"fmnist_cnn": (1, 28, 28), "resnet18": (3, 28, 28)}
NUM_CLASSES = 10
LEARNING_RATE = 0.01


def parse_args(argv):
    p = argparse.ArgumentParser(prog="hpcdl bench layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fmnist_cnn,resnet18",
                   help=f"comma-separated, from {', '.join(INPUT_SHAPES)} (default: both)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="BLAS/torch threads (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in INPUT_SHAPES]
    if unknown:
        p.error(f"--models: unknown model {unknown[0]!r}; choose from {', '.join(INPUT_SHAPES)}")
    for name in ("batch", "threads", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def _measure(steps_by_framework: dict, steps: int, warmup: int, repeats: int, batch: int) -> dict:
    """Images per second of each repeat, per framework.

    Frameworks take turns repeat by repeat, so a noisy neighbour on a shared
    machine slows both sides of the comparison rather than one.
    """
    for step in steps_by_framework.values():
        for _ in range(warmup):
            step()
    rates = {name: [] for name in steps_by_framework}
    for _ in range(repeats):
        for name, step in steps_by_framework.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rates[name].append(batch * steps / (time.perf_counter() - start))
    return rates


def hpcdl_step(model_name: str, batch: int, seed: int = 0):
    """A closure running one hpcdl training step on fixed random data."""
    import numpy as np

    from hpcdl import models
    from hpcdl.arena import Arena
    from hpcdl.layers import softmax_cross_entropy

    shape = INPUT_SHAPES[model_name]
    model = models.build(model_name, shape, NUM_CLASSES)
    arena = Arena([p for _, p in model.named_parameters()], dtype=np.float32, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch)
    scaled = np.empty_like(arena.grads)

    def step():
        arena.zero_grads()
        logits = model.forward(x)
        _, dlogits = softmax_cross_entropy(logits, labels)
        model.backward(dlogits)
        np.multiply(arena.grads, LEARNING_RATE, out=scaled)
        arena.params -= scaled

    return step


def _torch_model(name: str, channels: int):
    from torch import nn

    if name == "fmnist_cnn":
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return (self.body(x) + self.shortcut(x)).relu()

    layers, cin = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for stage, planes in enumerate((64, 128, 256, 512)):
        for i in range(2):
            layers.append(Block(cin, planes, 2 if stage > 0 and i == 0 else 1))
            cin = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, NUM_CLASSES)]
    return nn.Sequential(*layers)


def torch_step(model_name: str, batch: int, threads: int, seed: int = 0):
    """The same architecture and step in PyTorch, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    shape = INPUT_SHAPES[model_name]
    model = _torch_model(model_name, shape[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, *shape)
    labels = torch.randint(0, NUM_CLASSES, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss_fn(model(x), labels).backward()
        optimizer.step()

    return step


def _summary(framework: str, model: str, rates: list[float]) -> dict:
    return {"model": model, "framework": framework, "input_shape": list(INPUT_SHAPES[model]),
            "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": [round(r, 2) for r in rates]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    numpy_was_loaded = "numpy" in sys.modules
    threads_before = os.environ.get("OMP_NUM_THREADS")
    from hpcdl.threads import pin_threads

    threads = pin_threads(args.threads)
    pinned = not numpy_was_loaded or threads_before == str(threads)
    if not pinned:
        print(f"warning: NumPy was imported with OMP_NUM_THREADS={threads_before}; BLAS may not use "
              f"{threads} thread(s). Run `OMP_NUM_THREADS={threads} python -m hpcdl.bench.layers`.",
              file=sys.stderr)

    results, ratios = [], {}
    for name in args.models:
        contenders = {"hpcdl": hpcdl_step(name, args.batch)}
        theirs = None if args.no_torch else torch_step(name, args.batch, threads)
        if theirs is not None:
            contenders["torch"] = theirs
        rates = _measure(contenders, args.steps, args.warmup, args.repeats, args.batch)
        summaries = {fw: _summary(fw, name, r) for fw, r in rates.items()}
        results.extend(summaries.values())
        if "torch" in summaries:
            ratios[name] = summaries["hpcdl"]["images_per_s"] / summaries["torch"]["images_per_s"]

    print(f"batch {args.batch}, {threads} thread(s), {args.steps} steps x {args.repeats} repeats "
          f"(median [min, max] images/s)")
    print(f"{'model':<12} {'framework':<9} {'images/s':>10} {'spread':>20} {'hpcdl/torch':>12}")
    for r in results:
        ratio = f"{ratios[r['model']]:.2f}" if r["framework"] == "hpcdl" and r["model"] in ratios else ""
        spread = f"[{r['min']:.1f}, {r['max']:.1f}]"
        print(f"{r['model']:<12} {r['framework']:<9} {r['images_per_s']:>10.1f} {spread:>20} {ratio:>12}")
    versions = {m: sys.modules[m].__version__ for m in ("numpy", "torch") if m in sys.modules}
    report = {"bench": "layers", "batch": args.batch, "threads": threads, "blas_threads_pinned": pinned,
              "steps": args.steps, "repeats": args.repeats, "versions": versions, "results": results,
              "ratio_hpcdl_over_torch": ratios}
    line = json.dumps(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
