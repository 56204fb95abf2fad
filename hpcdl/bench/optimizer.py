"""Optimizer step benchmark: NumPy reference vs fused Numba (and CuPy) against a roofline.

    hpcdl bench optimizer --sizes 1M,25M --optimizers lamb,lars --threads 1,2 --repeats 7

Arenas hold a ResNet-50 parameter list (161 tensors: convolutions, batch
norm scale/shift, classifier) with the channel widths scaled so the total
reaches each size. For each size and optimizer it times one `step`:

* `numpy`:    hpcdl.optim.reference on per-layer float32 views (one thread);
* `numba`:    the fused kernels at each thread count;
* `cupy`:     the fused CUDA kernels, when a GPU is present;

and, at the same size and thread count, `a += b` over the same elements,
which reads two arrays and writes one: the streaming roofline. Bandwidth is
the bytes the fused design must move (Optimizer.passes arrays of N values,
printed per row) over the median time; the NumPy reference moves far more
than that, so its figure is an effective bandwidth. Each variant is timed
right after its own `a += b` run (same thread count), and the variants run
in a fresh random order every round, so a slow spell of a shared machine
hits a variant and its roofline alike; the first round is warmup and is
discarded. The `of roof` column is median bandwidth over the median of the
paired `a += b` bandwidth.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import numpy as np

from hpcdl.arena import Arena, Param

# ResNet-50 (He et al. 2016) bottleneck stages: (blocks, width); output = 4·width.
_RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
_SIZE_SUFFIX = {"K": 10**3, "M": 10**6, "G": 10**9}


def resnet50_shapes(width: float = 1.0, classes: int = 1000) -> list[tuple[str, tuple, tuple]]:
    """(name, shape, flags) of every ResNet-50 parameter with channels scaled by `width`."""
    def ch(c):
        return max(1, int(round(c * width)))

    shapes = []

    def conv_bn(prefix, cin, cout, k):
        shapes.append((f"{prefix}.conv", (cout, cin, k, k), ()))
        shapes.append((f"{prefix}.bn.gamma", (cout,), ("norm",)))
        shapes.append((f"{prefix}.bn.beta", (cout,), ("norm",)))

    conv_bn("stem", 3, ch(64), 7)
    cin = ch(64)
    for s, (blocks, w) in enumerate(_RESNET50_STAGES):
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            conv_bn(f"{p}.a", cin, ch(w), 1)
            conv_bn(f"{p}.b", ch(w), ch(w), 3)
            conv_bn(f"{p}.c", ch(w), ch(4 * w), 1)
            if b == 0:
                conv_bn(f"{p}.downsample", cin, ch(4 * w), 1)
            cin = ch(4 * w)
    shapes.append(("fc.weight", (classes, cin), ()))
    shapes.append(("fc.bias", (classes,), ("bias",)))
    return shapes


def _count(shapes) -> int:
    return sum(math.prod(shape) for _, shape, _ in shapes)


def resnet_like_arena(target: int, *, xp=np, seed: int = 0) -> Arena:
    """An arena of ResNet-50 shapes whose width is bisected so the parameter count is close to `target`."""
    lo, hi = 0.01, 64.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _count(resnet50_shapes(mid)) < target else (lo, mid)
    params = []
    for name, shape, flags in resnet50_shapes(hi):
        p = Param(shape, lambda rng, s: rng.standard_normal(s, dtype=np.float32) * np.float32(0.05), flags)
        p.name = name
        params.append(p)
    arena = Arena(params, xp=xp, seed=seed)
    rng = np.random.default_rng(seed + 1)
    arena.grads[...] = xp.asarray(rng.standard_normal(arena.total, dtype=np.float32) * np.float32(1e-3))
    return arena


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = _SIZE_SUFFIX.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _SIZE_SUFFIX else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 1M, 25M, 250K") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


class _Variant:
    """One timed thing: a callable, the thread count it needs, and how to wait for it.

    `roof` is the `a += b` run timed right before this one at the same thread
    count, so a slow spell of the (shared) machine hits both of the pair.
    """

    def __init__(self, label, run, threads=1, sync=None, roof=None):
        self.label, self.run, self.threads, self.sync, self.roof = label, run, threads, sync, roof
        self.times: list[float] = []
        self.roof_times: list[float] = []

    def _time(self, run, numba):
        if numba is not None:
            numba.set_num_threads(self.threads)
        t0 = time.perf_counter()
        run()
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - t0

    def time_once(self, numba):
        if self.roof is not None:
            self.roof_times.append(self._time(self.roof, numba))
        self.times.append(self._time(self.run, numba))


def _reference_runner(optimizer, lr):
    ref = optimizer.to_reference()
    arena = optimizer.arena
    params = [arena.view(s.name) for s in arena.segments]
    grads = [arena.grad_view(s.name) for s in arena.segments]
    box = {"params": [p.copy() for p in params], "state": ref.init(params)}

    def run():
        box["params"], box["state"], _ = ref.update(grads, box["state"], box["params"], lr)

    return run


def _variants(arena, optimizers, threads, lr, *, with_reference, with_gpu):
    """Everything to time at one size: per optimizer numpy, numba per thread count, cupy; plus a += b alone."""
    from hpcdl.kernels import optim_cpu
    from hpcdl.optim import create

    a, b = np.ones(arena.total, arena.dtype), np.full(arena.total, 1e-7, arena.dtype)
    variants, passes = [], {}
    for name in optimizers:
        opt = create(name, arena)
        passes[name] = opt.passes
        start, stop = opt.table.start, opt.table.stop

        def add():
            optim_cpu.add_inplace(a, b, start, stop)

        if with_reference:
            variants.append(_Variant((name, "numpy", 1), _reference_runner(opt, lr), roof=add))
        for t in threads:
            variants.append(_Variant((name, "numba", t), lambda opt=opt: opt.step(lr), threads=t, roof=add))
    for t in threads:
        variants.append(_Variant(("a+=b", "numba", t), add, threads=t))
    if with_gpu:
        import cupy

        from hpcdl.kernels import optim_gpu

        gpu_arena = resnet_like_arena(arena.num_parameters, xp=cupy)
        sync = cupy.cuda.get_current_stream().synchronize
        for name in optimizers:
            opt = create(name, gpu_arena)
            ga, gb, gstart, gstop = (cupy.asarray(x) for x in (a, b, opt.table.start, opt.table.stop))

            def gpu_add(ga=ga, gb=gb, gstart=gstart, gstop=gstop):
                optim_gpu.add_inplace(ga, gb, gstart, gstop)

            variants.append(_Variant((name, "cupy", 0), lambda opt=opt: opt.step(lr), sync=sync, roof=gpu_add))
        variants.append(_Variant(("a+=b", "cupy", 0), gpu_add, sync=sync))
    return variants, passes


def bench_size(size, optimizers, threads, repeats, *, with_reference=True, with_gpu=False, lr=0.01, seed=0):
    """Rows of results (dicts) for one arena size."""
    import numba

    arena = resnet_like_arena(size)
    variants, passes = _variants(arena, optimizers, threads, lr, with_reference=with_reference, with_gpu=with_gpu)
    order = np.random.default_rng(seed)
    threads_before = numba.get_num_threads()
    try:
        for round_ in range(repeats + 1):  # round 0 compiles and warms caches, and is dropped
            for i in (order.permutation(len(variants)) if round_ else range(len(variants))):
                v = variants[i]
                v.time_once(numba if v.label[1] in ("numba", "numpy") else None)
    finally:
        numba.set_num_threads(threads_before)

    n, itemsize = arena.num_parameters, arena.dtype.itemsize
    roof_bytes = 3 * n * itemsize
    median = {v.label: statistics.median(v.times[1:]) for v in variants}
    rows = []
    for v in variants:
        (name, kind, t), seconds = v.label, median[v.label]
        row = {"size": n, "segments": len(arena.segments), "optimizer": name, "variant": kind, "threads": t,
               "median_ms": seconds * 1e3, "times_ms": [round(x * 1e3, 3) for x in v.times[1:]]}
        if v.roof is None:
            row.update(passes=3, bytes=roof_bytes, gb_per_s=roof_bytes / seconds / 1e9)
        else:
            nbytes = passes[name] * n * itemsize
            roof_gbs = roof_bytes / statistics.median(v.roof_times[1:]) / 1e9
            ref_time = median.get((name, "numpy", 1))
            row.update(passes=passes[name], bytes=nbytes, gb_per_s=nbytes / seconds / 1e9,
                       roofline_gb_per_s=roof_gbs, of_roofline=nbytes / seconds / 1e9 / roof_gbs,
                       speedup_vs_numpy=ref_time / seconds if ref_time else None)
        rows.append(row)
    return rows


def format_table(rows) -> str:
    head = (f"{'params':>11} {'optimizer':<9} {'variant':<6} {'thr':>3} {'median ms':>10} {'moved':>14} "
            f"{'GB/s':>7} {'roof GB/s':>9} {'of roof':>7} {'vs numpy':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        moved = f"{r['passes']}N = {r['bytes'] / 1e9:.2f} GB"
        roof = f"{r['roofline_gb_per_s']:9.2f}" if "roofline_gb_per_s" in r else " " * 9
        frac = f"{r['of_roofline']:7.2f}" if "of_roofline" in r else " " * 7
        speed = f"{r['speedup_vs_numpy']:7.1f}×" if r.get("speedup_vs_numpy") else " " * 8
        thr = str(r["threads"]) if r["variant"] != "cupy" else "-"
        lines.append(f"{r['size']:>11,} {r['optimizer']:<9} {r['variant']:<6} {thr:>3} {r['median_ms']:10.2f} "
                     f"{moved:>14} {r['gb_per_s']:7.2f} {roof} {frac} {speed}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from hpcdl.optim import NAMES

    parser = argparse.ArgumentParser(prog="hpcdl bench optimizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_csv(parse_size), default=[10**6, 25 * 10**6, 100 * 10**6],
                        help="parameter counts, e.g. 1M,25M,100M (default; 100M needs about 8 GB of memory)")
    parser.add_argument("--optimizers", type=_csv(str), default=["lamb", "lars"],
                        help=f"comma-separated, from {','.join(NAMES)} (default lamb,lars)")
    parser.add_argument("--threads", type=_csv(int), default=None,
                        help="Numba thread counts (default 1 and every core Numba may use)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant after one warmup round")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) NumPy reference")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)

    import numba

    unknown = [o for o in args.optimizers if o not in NAMES]
    if unknown:
        parser.error(f"--optimizers: unknown {unknown[0]!r}; known: {','.join(NAMES)}")
    threads = args.threads or sorted({1, numba.config.NUMBA_NUM_THREADS})
    if any(t < 1 or t > numba.config.NUMBA_NUM_THREADS for t in threads):
        parser.error(f"--threads: each must be in 1..{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    with_gpu = _gpu_available()
    rows = []
    for size in args.sizes:
        rows += bench_size(size, args.optimizers, threads, args.repeats,
                           with_reference=not args.no_reference, with_gpu=with_gpu)
        print(f"[size {size:,} done]", file=sys.stderr, flush=True)

    print(format_table(rows))
    report = {
        "benchmark": "optimizer",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "numba_threads": numba.config.NUMBA_NUM_THREADS, "threading_layer": numba.threading_layer(),
                    "gpu": with_gpu},
        "repeats": args.repeats,
        "results": rows,
    }
    line = json.dumps(report)
    print(line)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            from hpcdl.errors import UserError

            raise UserError(f"--json {args.json}: {exc.strerror}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
