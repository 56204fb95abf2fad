"""Training throughput of hpcdl layers, side by side with PyTorch on the CPU.

    hpcdl bench layers --models resnet50 --threads 1,2 --batch resnet50=16

One step = forward, softmax cross-entropy, backward, and a plain SGD update
over the whole arena (for PyTorch: torch.optim.SGD). Models and inputs:
`fmnist_cnn` on 1x28x28, `resnet18` (CIFAR stem) on 3x28x28 and `resnet50`
(ImageNet stem) on 3x224x224, random data. Warm-up steps are excluded; each
repeat times `--steps` steps and the table reports the median and spread
over repeats.

Every (model, framework, thread count) runs in a fresh process: BLAS, Numba
and torch size their thread pools when they load, and each framework's peak
RSS is then its own (`peak_rss_mb`, from getrusage). The same is done for
the GEMM roofline: one large float32 matmul at each thread count. Each
model's achieved GFLOP/s comes from a count of its convolution and linear
layers' multiply-adds (3 GEMMs per layer and step, 2 for the first layer,
which computes no input gradient), as a fraction of that roofline.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

INPUT_SHAPES = {"fmnist_cnn": (1, 28, 28), "resnet18": (3, 28, 28), "resnet50": (3, 224, 224)}
MODEL_OPTIONS = {"fmnist_cnn": {}, "resnet18": {"stem": "cifar"}, "resnet50": {"stem": "imagenet"}}
DEFAULT_BATCH = {"fmnist_cnn": 128, "resnet18": 128, "resnet50": 16}
# (warm-up steps, timed steps per repeat): about a second or more per repeat on one core
DEFAULT_STEPS = {"fmnist_cnn": (3, 10), "resnet18": (2, 2), "resnet50": (2, 1)}
NUM_CLASSES = 10
LEARNING_RATE = 0.01
GEMM_SIZE = 2048


def _int_list(text: str, flag: str, p) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"{flag}: values must be at least 1, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(prog="hpcdl bench layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fmnist_cnn,resnet18",
                   help=f"comma-separated, from {', '.join(INPUT_SHAPES)} (default: fmnist_cnn,resnet18)")
    p.add_argument("--batch", default="",
                   help="N for every model, or per model: resnet50=16,resnet18=128 (defaults: "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_BATCH.items()) + ")")
    p.add_argument("--threads", default="1", help="comma-separated thread counts, each run in fresh processes")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default per model)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default per model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-roofline", action="store_true", help="skip the GEMM roofline")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in INPUT_SHAPES]
    if unknown:
        p.error(f"--models: unknown model {unknown[0]!r}; choose from {', '.join(INPUT_SHAPES)}")
    args.threads = _int_list(args.threads, "--threads", p)
    batch = dict(DEFAULT_BATCH)
    for part in [b.strip() for b in args.batch.split(",") if b.strip()]:
        name, sep, value = part.rpartition("=")
        if sep and name not in INPUT_SHAPES:
            p.error(f"--batch: unknown model {name!r} in {part!r}; choose from {', '.join(INPUT_SHAPES)}")
        if not value.isdigit() or int(value) < 1:
            p.error(f"--batch: expected a positive integer in {part!r}")
        for m in ([name] if sep else INPUT_SHAPES):
            batch[m] = int(value)
    args.batch = batch
    for name in ("steps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be at least {0 if name == 'warmup' else 1}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


# -- the steps ------------------------------------------------------------------------------------

def hpcdl_step(model_name: str, batch: int, seed: int = 0):
    """(step closure, model) running one hpcdl training step on fixed random data."""
    import numpy as np

    from hpcdl import models
    from hpcdl.arena import Arena
    from hpcdl.layers import softmax_cross_entropy

    shape = INPUT_SHAPES[model_name]
    model = models.build(model_name, shape, NUM_CLASSES, **MODEL_OPTIONS[model_name])
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

    return step, model


def train_flops_per_image(model, input_shape) -> float:
    """Multiply-adds of every Conv2d and Linear, x2 FLOPs, x3 GEMMs per step (x2 where no input gradient)."""
    import numpy as np

    from hpcdl.layers import Conv2d, Linear

    shapes = {}
    for m in model.modules():
        if isinstance(m, (Conv2d, Linear)):
            def record(x, m=m, forward=m.forward):
                y = forward(x)
                shapes[id(m)] = y.shape
                return y
            m.forward = record
    model.eval()
    try:
        model.forward(np.zeros((1, *input_shape), dtype=np.float32))
    finally:
        model.train()
        for m in model.modules():
            m.__dict__.pop("forward", None)
    total = 0.0
    for m in model.modules():
        if id(m) in shapes:
            fan_in = m.in_channels * m.kernel ** 2 if isinstance(m, Conv2d) else m.in_features
            outputs = float(np.prod(shapes[id(m)]))
            total += 2.0 * fan_in * outputs * (3 if m.input_grad else 2)
    return total


def _torch_model(name: str, channels: int):
    from torch import nn

    if name == "fmnist_cnn":
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))

    def conv_bn(cin, cout, k, stride):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin, planes, stride, bottleneck):
            super().__init__()
            cout = 4 * planes if bottleneck else planes
            if bottleneck:  # stride on the 3x3 convolution, as hpcdl and torchvision do
                body = [*conv_bn(cin, planes, 1, 1), nn.ReLU(), *conv_bn(planes, planes, 3, stride), nn.ReLU(),
                        *conv_bn(planes, cout, 1, 1)]
            else:
                body = [*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3, 1)]
            self.body = nn.Sequential(*body)
            self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                             if stride != 1 or cin != cout else nn.Identity())
            self.cout = cout

        def forward(self, x):
            return (self.body(x) + self.shortcut(x)).relu()

    bottleneck = name == "resnet50"
    if bottleneck:
        layers = [*conv_bn(channels, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    else:
        layers = [*conv_bn(channels, 64, 3, 1), nn.ReLU()]
    cin = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2))):
        for i in range(count):
            block = Block(cin, planes, 2 if stage > 0 and i == 0 else 1, bottleneck)
            layers.append(block)
            cin = block.cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES)]
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _time_steps(step, warmup: int, steps: int, repeats: int, batch: int) -> list[float]:
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates


def _worker(spec: dict) -> dict:
    """One measurement in this process: a model step for one framework, or the GEMM roofline."""
    threads = spec["threads"]
    from hpcdl.threads import pin_threads

    pin_threads(threads)
    if spec["kind"] == "gemm":
        import numpy as np

        a = np.random.default_rng(0).standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
        out = np.empty_like(a)
        rates = []
        np.matmul(a, a, out=out)
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            for _ in range(5):
                np.matmul(a, a, out=out)
            rates.append(5 * 2.0 * GEMM_SIZE ** 3 / (time.perf_counter() - start) / 1e9)
        return {"kind": "gemm", "threads": threads, "gflops": statistics.median(rates), "repeats": rates}
    model, framework, batch = spec["model"], spec["framework"], spec["batch"]
    if framework == "torch":
        step = torch_step(model, batch, threads)
        if step is None:
            return {"kind": "missing"}
        flops = None
    else:
        step, net = hpcdl_step(model, batch)
        flops = train_flops_per_image(net, INPUT_SHAPES[model])
    rates = _time_steps(step, spec["warmup"], spec["steps"], spec["repeats"], batch)
    return {"kind": "model", "model": model, "framework": framework, "threads": threads, "batch": batch,
            "input_shape": list(INPUT_SHAPES[model]), "images_per_s": statistics.median(rates),
            "min": min(rates), "max": max(rates), "repeats": [round(r, 3) for r in rates],
            "peak_rss_mb": round(_peak_rss_mb(), 1), "train_gflop_per_image": flops and flops / 1e9}


def _run_worker(spec: dict) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.pop(var, None)  # the worker's pin_threads decides, from --threads
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", "hpcdl.bench.layers", "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"bench layers: worker {spec} failed with exit {proc.returncode}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    roofline, results = {}, []
    frameworks = ["hpcdl"] + ([] if args.no_torch else ["torch"])
    for threads in args.threads:
        if not args.no_roofline:
            roofline[threads] = _run_worker({"kind": "gemm", "threads": threads, "repeats": args.repeats})["gflops"]
        for name in args.models:
            warmup, steps = DEFAULT_STEPS[name]
            spec = {"kind": "model", "model": name, "threads": threads, "batch": args.batch[name],
                    "warmup": warmup if args.warmup is None else args.warmup,
                    "steps": steps if args.steps is None else args.steps, "repeats": args.repeats}
            for fw in frameworks:
                row = _run_worker({**spec, "framework": fw})
                if row["kind"] == "missing":
                    continue
                row.pop("kind")
                results.append(row)

    by_key = {(r["model"], r["framework"], r["threads"]): r for r in results}
    for r in results:
        mine = by_key[(r["model"], "hpcdl", r["threads"])]
        flops = mine["train_gflop_per_image"]
        r["train_gflop_per_image"] = flops
        r["gflops"] = flops * r["images_per_s"] if flops else None
        r["roofline_gflops"] = roofline.get(r["threads"])
        r["fraction_of_roofline"] = r["gflops"] / r["roofline_gflops"] if r["gflops"] and r["roofline_gflops"] else None
        theirs = by_key.get((r["model"], "torch", r["threads"]))
        if r["framework"] == "hpcdl" and theirs:
            r["ratio_hpcdl_over_torch"] = r["images_per_s"] / theirs["images_per_s"]
            r["rss_ratio_hpcdl_over_torch"] = r["peak_rss_mb"] / theirs["peak_rss_mb"]
        single = by_key.get((r["model"], r["framework"], min(args.threads)))
        if single and r["threads"] != single["threads"]:
            r["speedup_over_threads_%d" % single["threads"]] = r["images_per_s"] / single["images_per_s"]

    print(f"{args.repeats} repeats, each in fresh processes per (model, framework, threads); "
          f"median [min, max] images/s")
    if roofline:
        print("GEMM roofline (float32 %d^2 matmul): " % GEMM_SIZE
              + ", ".join(f"{t} thread(s) {g:.0f} GFLOP/s" for t, g in roofline.items()))
    print(f"{'model':<11} {'batch':>5} {'thr':>3} {'framework':<9} {'images/s':>9} {'spread':>18} "
          f"{'GFLOP/s':>8} {'of roof':>7} {'RSS MB':>7} {'vs torch':>8} {'x thr':>6}")
    for r in results:
        ratio = f"{r['ratio_hpcdl_over_torch']:.2f}" if "ratio_hpcdl_over_torch" in r else ""
        speed = next((f"{v:.2f}" for k, v in r.items() if k.startswith("speedup_over")), "")
        spread = f"[{r['min']:.2f}, {r['max']:.2f}]"
        gf = f"{r['gflops']:.0f}" if r["gflops"] else ""
        roof = f"{r['fraction_of_roofline']:.0%}" if r["fraction_of_roofline"] else ""
        print(f"{r['model']:<11} {r['batch']:>5} {r['threads']:>3} {r['framework']:<9} {r['images_per_s']:>9.2f} "
              f"{spread:>18} {gf:>8} {roof:>7} {r['peak_rss_mb']:>7.0f} {ratio:>8} {speed:>6}")
    import numpy  # noqa: F401  (versions for the record)
    versions = {"numpy": sys.modules["numpy"].__version__, "python": sys.version.split()[0]}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    report = {"bench": "layers", "threads": args.threads, "repeats": args.repeats, "versions": versions,
              "roofline_gflops": {str(k): v for k, v in roofline.items()}, "results": results}
    line = json.dumps(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
