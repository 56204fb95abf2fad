"""Allreduce benchmark: every algorithm over a size sweep, plus the ResNet-50 gradient set.

    mpiexec -n 2 hpcdl bench allreduce
    mpiexec -n 2 python -m hpcdl.bench.allreduce --sizes 1MiB,100MiB --repeats 5 --json out.json

For each size the algorithms take turns inside every repetition, so machine
noise hits them alike. One sample is the slowest rank's time between a
barrier and the end of the call. Reported per (algorithm, size): median,
min/max and quartiles, algorithm bandwidth (bytes / time), bus bandwidth
(× 2(p-1)/p, the share of the data each rank must move in any
bandwidth-optimal allreduce, as in nccl-tests), and the time relative to
`native` in the same run.

`ring+window` and `hierarchical+window` are those algorithms with their
shared-window transport (`comm.shared_window`, the trainer's default): the
buffer is allocated in the communicator's MPI-3 shared window and on-node
links are loads instead of messages. Plain `ring` is point-to-point.
`--unpipelined ring` adds the point-to-point ring with one piece in flight.

The ResNet-50 part reduces the 161 gradient tensors of ResNet-50 (25.56 M
float32 parameters): one `MPI_Allreduce` per tensor versus hpcdl's
`BucketReducer` over an arena of the same shapes. With `--backward-ms` it
also runs a simulated backward (busy matrix products spread over the layers
in proportion to their parameter counts, gradient-ready hooks in backward
order) with overlap off and on, to measure what overlap buys.

Rank 0 prints a table and one JSON line; `--save-crossovers PATH` turns the
sweep into the size rules `comm.algorithm = "auto"` uses.
"""
from __future__ import annotations

from hpcdl.threads import pin_threads

if __name__ == "__main__":
    pin_threads()  # before NumPy loads, as the `hpcdl` entry point does

import argparse
import json
import re
import sys
import time

import numpy as np

from hpcdl.errors import UserError

ALGORITHMS = ("native", "ring", "recursive_doubling", "rabenseifner", "hierarchical")
DEFAULT_SIZES = "4KiB,16KiB,64KiB,256KiB,1MiB,4MiB,16MiB,64MiB,100MiB"
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20, "g": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """'4KiB' -> 4096, '100MiB' -> 104857600, '1000' -> 1000 (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"--sizes: cannot read size {text!r}; use e.g. 4KiB, 1MiB, 100MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[str, tuple]]:
    """Parameter shapes of ResNet-50 v1.5 (He et al. 2016; torchvision layout), forward order.

    Convolutions have no bias (batch norm follows each); every batch norm has
    a weight and a bias. 161 tensors, 25,557,032 parameters for 1000 classes.
    """
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            width_in = inplanes if block == 0 else planes * 4
            for i, (cin, cout, k) in enumerate(((width_in, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)), start=1):
                shapes += [(f"{prefix}.conv{i}.weight", (cout, cin, k, k)),
                           (f"{prefix}.bn{i}.weight", (cout,)), (f"{prefix}.bn{i}.bias", (cout,))]
            if block == 0:
                shapes += [(f"{prefix}.downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                           (f"{prefix}.downsample.1.weight", (planes * 4,)), (f"{prefix}.downsample.1.bias", (planes * 4,))]
        inplanes = planes * 4
    shapes += [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]
    return shapes


def _arena_of(shapes, dtype):
    from hpcdl.arena import Arena, Param
    from hpcdl.layers.base import zeros

    params = []
    for name, shape in shapes:
        p = Param(shape, zeros)
        p.name = name
        params.append(p)
    return Arena(params, dtype=dtype), params


def _summary(samples: list[float]) -> dict:
    s = np.asarray(samples)
    q1, median, q3 = np.percentile(s, [25, 50, 75])
    return {"median_s": float(median), "min_s": float(s.min()), "max_s": float(s.max()),
            "q1_s": float(q1), "q3_s": float(q3), "repeats": len(samples)}


class _Timer:
    """Slowest rank's wall time of one call, every rank starting together."""

    def __init__(self, mpi_comm):
        from mpi4py import MPI

        self.comm, self.MPI = mpi_comm, MPI
        self._local = np.zeros(1)
        self._slowest = np.zeros(1)

    def __call__(self, fn) -> float:
        self.comm.Barrier()
        t0 = time.perf_counter()
        fn()
        self._local[0] = time.perf_counter() - t0
        self.comm.Allreduce(self._local, self._slowest, op=self.MPI.MAX)
        return float(self._slowest[0])

    def interleaved(self, variants: dict, repeats: int, warmup: int, before=None) -> dict[str, list[float]]:
        """Times of every variant, taking turns within each repetition so machine noise hits all alike.

        `before()` runs untimed ahead of each call (e.g. to reset the buffer).
        """
        samples = {key: [] for key in variants}
        for rep in range(warmup + repeats):
            for key, fn in variants.items():
                if before is not None:
                    before()
                t = self(fn)
                if rep >= warmup:
                    samples[key].append(t)
        return samples


# Algorithms with a shared-window transport: "ring+window" is the ring reducing a buffer in its window.
WINDOWED = ("ring", "hierarchical")
MEMCPY = "memcpy"  # not an allreduce: a copy of the buffer on every rank at once, the yardstick


def sweep(comms: dict, timer: _Timer, sizes: list[int], dtype, repeats: int, warmup: int,
          memcpy: bool = True) -> list[dict]:
    p = timer.comm.Get_size()
    itemsize = np.dtype(dtype).itemsize
    buf = np.ones(max(sizes) // itemsize + 1, dtype=dtype)
    copy = np.ones_like(buf) if memcpy else None
    # A communicator that reads its peers' memory directly reduces a buffer in its shared window.
    own = {name: comm.zeros(buf.size, dtype) for name, comm in comms.items() if comm.shared_memory}
    for b in own.values():
        b.fill(1)
    # First calls pay for connection set-up and page faults; keep that out of the smallest size.
    for name, comm in comms.items():
        for _ in range(5):
            comm.allreduce(own.get(name, buf)[: min(sizes) // itemsize])
    rows = []
    for nbytes in sizes:
        n = nbytes // itemsize
        view = buf[:n]
        views = {name: own[name][:n] if name in own else view for name in comms}
        variants = {name: (lambda c=comm, v=views[name]: c.allreduce(v)) for name, comm in comms.items()}
        if memcpy:
            variants[MEMCPY] = lambda: np.copyto(copy[:n], view)

        def refill():  # keeps values bounded, outside the timed region
            view.fill(1)
            for v in own.values():
                v[:n].fill(1)

        samples = timer.interleaved(variants, repeats, warmup, before=refill)
        for name in variants:
            row = {"algorithm": name, "bytes": n * itemsize, **_summary(samples[name])}
            row["algbw_GBps"] = row["bytes"] / row["median_s"] / 1e9 if row["median_s"] > 0 else 0.0
            row["busbw_GBps"] = row["algbw_GBps"] * 2 * (p - 1) / p
            rows.append(row)
        if "native" in comms:
            base = next(r["median_s"] for r in rows if r["bytes"] == n * itemsize and r["algorithm"] == "native")
            for r in rows:
                if r["bytes"] == n * itemsize:
                    r["vs_native"] = r["median_s"] / base if base > 0 else float("nan")
        # Bytes each rank put on (and took off) the wire in one more call, against the
        # bandwidth-optimal 2(p-1)/p·n; MPI's own allreduce is not counted.
        for name, comm in comms.items():
            traffic = getattr(comm, "traffic", None)
            if traffic is None or name == "native" or name == "auto" or comm.shared_memory or p == 1:
                continue
            refill()
            traffic.reset()
            comm.allreduce(views[name])
            per_rank = timer.comm.allgather((traffic.sent, traffic.received))
            optimal = 2 * (p - 1) / p * n * itemsize
            row = next(r for r in rows if r["bytes"] == n * itemsize and r["algorithm"] == name)
            row["sent_bytes_by_rank"] = [s for s, _ in per_rank]
            row["received_bytes_by_rank"] = [r for _, r in per_rank]
            row["traffic_vs_optimal"] = max(max(a, b) for a, b in per_rank) / optimal if optimal else 0.0
        if memcpy:
            base = next(r["median_s"] for r in rows if r["bytes"] == n * itemsize and r["algorithm"] == MEMCPY)
            for r in rows:
                if r["bytes"] == n * itemsize:
                    r["vs_memcpy"] = r["median_s"] / base if base > 0 else float("nan")
    return rows


def _busy_work(calibrate_s: float = 0.2):
    """A compute kernel and its measured cost per call (stands in for backward's GEMMs)."""
    a = np.random.default_rng(0).standard_normal((96, 96))
    out = np.empty_like(a)

    def work(calls: int):
        for _ in range(calls):
            np.dot(a, a, out=out)

    work(20)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < calibrate_s:
        work(50)
        calls += 50
    return work, (time.perf_counter() - t0) / calls


def local_add_cost(timer: _Timer, dtype, nbytes: int = 16 * 2**20, repeats: int = 5) -> float:
    """Seconds per byte of `a += b` on this host: the γ of the α-β-γ model (`hpcdl.perfmodel`)."""
    n = nbytes // np.dtype(dtype).itemsize
    a, b = np.ones(n, dtype=dtype), np.ones(n, dtype=dtype)
    np.add(a, b, out=a)
    return min(timer(lambda: np.add(a, b, out=a)) for _ in range(repeats)) / (n * np.dtype(dtype).itemsize)


def resnet50_study(comm_factory, timer: _Timer, dtype, repeats: int, warmup: int, bucket_bytes: int,
                   bucketed_algorithms: list[str], backward_ms: float, overlap_bucket_bytes: int | None = None,
                   overlap_algorithms: list[str] | None = None) -> dict:
    from mpi4py import MPI

    from hpcdl.comm.buckets import BucketReducer

    shapes = resnet50_shapes()
    arena, params = _arena_of(shapes, dtype)
    comms = {name: comm_factory(name) for name in bucketed_algorithms}
    shared = [name for name, c in comms.items() if c.shared_memory]
    # As the trainer does, a communicator with a shared window reduces gradients that live in it: the
    # first one's window holds the arena the MPI baselines reduce too (same memory for all), every other
    # one gets a copy of the arena in its own window.
    arenas = {name: (arena, params) for name in comms}
    for i, name in enumerate(shared):
        if i:
            arenas[name] = _arena_of(shapes, dtype)
        arenas[name][0].rehome_grads(comms[name].zeros(arena.total, arena.dtype))
    mpi_comm = timer.comm
    mpi_type = MPI.FLOAT if np.dtype(dtype) == np.float32 else MPI.DOUBLE
    per_tensor = [arena.grad_view(name).reshape(-1) for name, _ in shapes]

    def per_tensor_native():
        for g in per_tensor:
            mpi_comm.Allreduce(MPI.IN_PLACE, [g, mpi_type], op=MPI.SUM)

    variants = {"per_tensor_native": per_tensor_native}
    flat_native = comm_factory("native")
    variants["flat_native"] = lambda: flat_native.allreduce(arena.grads)
    reducers = {}
    for name in bucketed_algorithms:
        reducer = BucketReducer(comms[name], arenas[name][0], bucket_bytes=bucket_bytes, overlap=False)
        reducers[name] = reducer

        def bucketed(reducer=reducer):
            reducer.begin(True)
            reducer.finish()

        variants[f"bucketed_{name}"] = bucketed

    def refill():
        for a in {id(a): a for a, _ in arenas.values()}.values():
            a.grads.fill(1)

    samples = timer.interleaved(variants, repeats, warmup, before=refill)
    result = {
        "tensors": len(shapes),
        "parameters": int(arena.num_parameters),
        "bytes": int(arena.num_parameters * arena.dtype.itemsize),
        "bucket_bytes": bucket_bytes,
        "buckets": {name: len(r.buckets) for name, r in reducers.items()},
        "times": {k: _summary(v) for k, v in samples.items()},
    }
    base = result["times"]["per_tensor_native"]["median_s"]
    result["vs_per_tensor_native"] = {k: v["median_s"] / base for k, v in result["times"].items()}
    if backward_ms > 0 and bucketed_algorithms:
        studied = overlap_algorithms or bucketed_algorithms[:1]
        result["overlap_by_algorithm"] = {}
        for name in studied:
            study = overlap_study(comms[name], name, *arenas[name], timer, repeats, warmup,
                                  overlap_bucket_bytes or bucket_bytes, backward_ms)
            study["bucket_bytes"] = overlap_bucket_bytes or bucket_bytes
            result["overlap_by_algorithm"][name] = study
        result["overlap"] = result["overlap_by_algorithm"][studied[0]]  # the first, under the documented key
    return result


def overlap_study(comm, algorithm, arena, params, timer: _Timer, repeats, warmup, bucket_bytes, backward_ms,
                  progress_modes=(("thread", 0.0), ("hooks", 0.0), ("hooks", 0.002)), taper: bool = True) -> dict:
    """Step time (simulated backward + finish) with overlap off and on, for two kinds of backward.

    "compute": busy matrix products, spread over the layers in proportion to
    their parameter counts: the backward holds the core, as a CPU backward does.
    "sleep": the same time slept: the core is free, as while a GPU computes or a
    NIC's DMA engine moves the data. Each kind reports `backward_s` (alone),
    `allreduce_s` (the bucketed reduction alone), `step_s` (backward with
    overlap, plus finish) and `hidden_fraction` = (backward + allreduce - step)
    / allreduce, for the first progress mode and, under `modes`, for each.
    """
    from hpcdl.comm.buckets import BucketReducer

    work, per_call = _busy_work()
    total_calls = max(1, int(backward_ms / 1e3 / per_call))
    # Leaves in backward order: a layer's parameters (weight, then bias) report together.
    leaves: dict[str, list] = {}
    for p in params:
        leaves.setdefault(p.name.rsplit(".", 1)[0], []).append(p)
    order = list(leaves.values())[::-1]
    weights = np.array([sum(p.size for p in leaf) for leaf in order], dtype=float)
    calls = np.maximum(1, np.round(weights / weights.sum() * total_calls)).astype(int)
    naps = weights / weights.sum() * backward_ms / 1e3

    def compute_backward(reducer=None):
        for leaf, n_calls in zip(order, calls):
            work(int(n_calls))
            if reducer is not None:
                reducer.on_grads_ready(leaf)

    def sleep_backward(reducer=None):
        for leaf, nap in zip(order, naps):
            time.sleep(nap)
            if reducer is not None:
                reducer.on_grads_ready(leaf)

    off = BucketReducer(comm, arena, bucket_bytes=bucket_bytes, overlap=False, taper=taper)
    reducers = {f"{mode}" + (f"+{budget * 1e3:g}ms" if budget else ""):
                BucketReducer(comm, arena, bucket_bytes=bucket_bytes, overlap=True, progress=mode, budget_s=budget,
                              taper=taper)
                for mode, budget in progress_modes}

    def step(reducer, backward):
        reducer.begin(True)
        backward(reducer)
        return reducer.finish()

    def allreduce_only():
        off.begin(True)
        off.finish()

    result = {"algorithm": algorithm, "backward_target_ms": backward_ms, "taper": taper,
              "bucket_mib": [round(b.size * arena.dtype.itemsize / 2**20, 3) for b in off.buckets]}
    try:
        for kind, backward in (("sleep", sleep_backward), ("compute", compute_backward)):
            variants = {"backward_only": backward, "allreduce_only": allreduce_only,
                        "overlap_off": lambda b=backward: step(off, b)}
            variants.update({f"overlap_{key}": (lambda r=r, b=backward: step(r, b)) for key, r in reducers.items()})
            samples = timer.interleaved(variants, repeats, warmup, before=lambda: arena.grads.fill(1))
            times = {k: _summary(v) for k, v in samples.items()}
            backward_s, allreduce_s = times["backward_only"]["median_s"], times["allreduce_only"]["median_s"]
            modes = {}
            for key, r in reducers.items():
                step_s = times[f"overlap_{key}"]["median_s"]
                hidden = (backward_s + allreduce_s - step_s) / allreduce_s if allreduce_s > 0 else 0.0
                last = step(r, backward)  # one more step for its stats (not timed)
                modes[key] = {"step_s": step_s, "hidden_fraction": max(0.0, min(1.0, hidden)),
                              "step_vs_max": step_s / max(backward_s, allreduce_s),
                              "completed_in_backward": last["completed_in_backward"], "buckets": last["buckets"]}
            first = next(iter(modes))
            result[kind] = {"backward_s": backward_s, "allreduce_s": allreduce_s,
                            "step_s": modes[first]["step_s"], "hidden_fraction": modes[first]["hidden_fraction"],
                            "progress": first, "overlap_off_step_s": times["overlap_off"]["median_s"],
                            "modes": modes, "times": times}
    finally:
        for r in reducers.values():
            r.close()
    return result


def _print_table(world: int, rows: list[dict], resnet: dict | None, dtype_name: str) -> None:
    print(f"allreduce sweep: {world} ranks, {dtype_name}; median of the slowest rank, [min, max]")
    print(f"{'bytes':>12} {'algorithm':>24} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'algbw GB/s':>10} "
          f"{'busbw GB/s':>10} {'vs native':>9} {'vs memcpy':>9}")
    for r in rows:
        vs, vm = r.get("vs_native"), r.get("vs_memcpy")
        print(f"{r['bytes']:>12} {r['algorithm']:>24} {r['median_s'] * 1e3:>10.3f} {r['min_s'] * 1e3:>9.3f} "
              f"{r['max_s'] * 1e3:>9.3f} {r['algbw_GBps']:>10.2f} {r['busbw_GBps']:>10.2f} "
              f"{'' if vs is None else f'{vs:.2f}x':>9} {'' if vm is None else f'{vm:.2f}x':>9}"
              + (f"  wire {r['traffic_vs_optimal']:.3f}x of 2(p-1)/p·n" if "traffic_vs_optimal" in r else ""))
    if resnet:
        print(f"\nResNet-50 gradients: {resnet['tensors']} tensors, {resnet['parameters']:,} parameters, "
              f"{resnet['bytes'] / 1e6:.1f} MB, buckets of {resnet['bucket_bytes'] / 2**20:g} MiB {resnet['buckets']}")
        for key, t in resnet["times"].items():
            print(f"{key:>28} {t['median_s'] * 1e3:>10.2f} ms  [{t['min_s'] * 1e3:.2f}, {t['max_s'] * 1e3:.2f}]"
                  f"  {resnet['vs_per_tensor_native'][key]:.2f}x per-tensor native")
        for ov in (resnet.get("overlap_by_algorithm") or {}).values():
            for kind in ("sleep", "compute"):
                o = ov[kind]
                print(f"\nOverlap, {kind} backward ({ov['algorithm']}, ~{ov['backward_target_ms']:g} ms): backward alone "
                      f"{o['backward_s'] * 1e3:.1f} ms, allreduce alone {o['allreduce_s'] * 1e3:.1f} ms, "
                      f"overlap off {o['overlap_off_step_s'] * 1e3:.1f} ms")
                for key, m in o["modes"].items():
                    print(f"{'progress ' + key:>28} step {m['step_s'] * 1e3:>8.1f} ms  hidden {m['hidden_fraction']:.2f}  "
                          f"step/max(backward, allreduce) {m['step_vs_max']:.2f}  "
                          f"buckets done in backward {m['completed_in_backward']}/{m['buckets']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcdl bench allreduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help="comma-separated algorithms to sweep (default: %(default)s; 'auto' allowed)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated message sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per point (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--save-crossovers", metavar="PATH", help="write/merge the fastest-algorithm rules for this world size")
    parser.add_argument("--crossovers", metavar="PATH", help="crossover table for 'auto' (default: the shipped one)")
    parser.add_argument("--ranks-per-node", type=int, help="fake nodes of this many ranks for 'hierarchical'")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 gradient set")
    parser.add_argument("--unpipelined", default="", metavar="ALGS",
                        help="also time these algorithms with one piece in flight (pipeline_depth=1), e.g. ring")
    parser.add_argument("--piece-kb", type=int, help="reduce piece size in KiB (default: a quarter of the L2 cache)")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size for the ResNet-50 set (default: %(default)s)")
    parser.add_argument("--bucketed", default="ring,auto", help="algorithms behind the BucketReducer (default: %(default)s)")
    parser.add_argument("--overlap-bucket-mb", type=float, default=8.0,
                        help="bucket size for the overlap study (default: %(default)s): the bucket holding the first "
                             "layers starts only when backward ends, so its size bounds what can be hidden")
    parser.add_argument("--overlap", default="", metavar="ALGS",
                        help="with --backward-ms: the --bucketed algorithms to run the overlap study on (default: the "
                             "first); the first one's result is also under resnet50.overlap in the JSON")
    parser.add_argument("--backward-ms", type=float, default=0.0,
                        help="also measure overlap with a simulated backward of this many ms (default: off)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mpi4py import MPI

    import hpcdl.comm
    from hpcdl.comm.auto import rules_from_timings, save_rules

    algorithms = [a for a in args.algorithms.split(",") if a]
    bucketed = [a for a in args.bucketed.split(",") if a]
    for label in algorithms + bucketed:
        name, plus, transport = label.partition("+")
        if name not in hpcdl.comm.ALGORITHMS:
            raise UserError(f"--algorithms/--bucketed: unknown algorithm {name!r}; known: {', '.join(hpcdl.comm.ALGORITHMS)}")
        if plus and (transport != "window" or name not in WINDOWED):
            raise UserError(f"--algorithms/--bucketed: {label!r}: only {' and '.join(WINDOWED)} take '+window'")
    overlap = [a for a in args.overlap.split(",") if a]
    if any(name not in bucketed for name in overlap):
        raise UserError(f"--overlap: {', '.join(n for n in overlap if n not in bucketed)} not among --bucketed")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.repeats < 1 or not sizes:
        raise UserError("--repeats must be >= 1 and --sizes non-empty")
    dtype = np.dtype(args.dtype)
    world = MPI.COMM_WORLD

    def factory(label):
        name, _, transport = label.partition("+")
        return hpcdl.comm.create(name, world, ranks_per_node=args.ranks_per_node, crossovers=args.crossovers,
                                 piece_kb=args.piece_kb, shared_window=transport == "window" or None)

    comms = {name: factory(name) for name in algorithms}
    for name in [a for a in args.unpipelined.split(",") if a]:
        if name not in hpcdl.comm.ALGORITHMS or name in ("native", "auto"):
            raise UserError(f"--unpipelined: {name!r} is not one of hpcdl's own algorithms")
        comms[f"{name}_unpipelined"] = hpcdl.comm.create(name, world, ranks_per_node=args.ranks_per_node,
                                                         pipeline_depth=1, piece_kb=args.piece_kb)
    timer = _Timer(world)
    gamma = local_add_cost(timer, dtype)
    rows = sweep(comms, timer, sizes, dtype, args.repeats, args.warmup)
    resnet = None
    if not args.no_resnet:
        resnet = resnet50_study(factory, timer, dtype, args.repeats, args.warmup, int(args.bucket_mb * 2**20),
                                bucketed, args.backward_ms, int(args.overlap_bucket_mb * 2**20), overlap)

    medians: dict[int, dict[str, float]] = {}
    for r in rows:
        # shm is timed on a buffer in its window, as auto then uses it; "ring+window" is no algorithm name
        if r["algorithm"] in hpcdl.comm.ALGORITHMS and r["algorithm"] != "auto":
            medians.setdefault(r["bytes"], {})[r["algorithm"]] = r["median_s"]
    rules = rules_from_timings(medians) if medians else []
    result = {"world": world.Get_size(), "dtype": dtype.name, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
              "gamma_s_per_byte": gamma, "sweep": rows, "resnet50": resnet, "crossover_rules": rules}
    if "auto" in comms:
        result["auto"] = comms["auto"].describe()
    if world.Get_rank() == 0:
        _print_table(world.Get_size(), rows, resnet, dtype.name)
        print(f"local add (the model's gamma): {gamma * 1e12:.1f} ps/byte = {1e-9 / gamma:.1f} GB/s")
        print("crossover rules:", json.dumps(rules))
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        if args.save_crossovers and world.Get_size() == 1:
            print("not saving crossovers: one rank communicates nothing")
        elif args.save_crossovers and rules:
            from hpcdl import perfmodel
            from hpcdl.comm.auto import machine_fingerprint

            source = f"hpcdl bench allreduce, {result['mpi']}, {dtype.name}, repeats={args.repeats}"
            try:  # the model auto falls back to at other P, fitted to this sweep
                costs = {k: c.as_dict() for k, c in perfmodel.fit_bench(result, large_bytes=16 * 2**20).items()}
            except ValueError:
                costs = None
            save_rules(args.save_crossovers, world.Get_size(), rules, source, machine=machine_fingerprint(), costs=costs)
            print(f"crossover rules for P={world.Get_size()} saved to {args.save_crossovers}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"hpcdl bench allreduce: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
