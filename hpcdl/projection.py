"""`hpcdl scaling predict`: a whole training run projected onto a machine you do not have.

    hpcdl scaling predict --model resnet50 --dataset-size 1281167 --epochs 90 \\
        --batches 8192,32768 --nodes 64,256,1024 --network hdr --compute-per-sample-s 0.06

One row per (global batch, nodes): iterations = epochs × dataset ÷ batch, and per iteration

    t1  compute     = per-rank batch × compute per sample   (per-rank batch = batch ÷ ranks)
    t2  allreduce   of the model's gradients, per algorithm, from the α-β-γ model (hpcdl.perfmodel)
    time            = t1 + t2 without overlap; with it t1 + max(t2 − backward share × t1, t2 of the
                      last bucket), since the last bucket cannot start before backward ends

then the run's total time, and the parallel efficiency t1 ÷ time (the share of the iteration spent
computing) with the best algorithm, with and without overlap. This is the seed talk's argument in numbers: while t1 ≫ t2,
the iteration time of weak scaling stays flat as p grows and the total time falls with the
iteration count; at a fixed global batch t1 shrinks as 1/p while the ring's t2 does not, so
efficiency falls once t1 approaches t2, and at per-rank batches of a few images compute stops
scaling linearly anyway (the table marks per-rank batches below `--min-per-rank-batch`).

Two levels of network: ranks on one node talk through shared memory (the costs of `--node-costs`,
by default this machine's shipped fit), nodes through `--network`. With `--ranks-per-node k > 1`
the hierarchical allreduce is modelled as its bandwidth-optimal form (node-local reduce-scatter,
k concurrent inter-node allreduces of n/k bytes sharing the node's NIC, node-local allgather), and
the flat algorithms run over all p ranks with the NIC shared by k ranks (β × k between nodes).
Contention inside the fabric, congestion and stragglers are not modelled: the figures are lower
bounds on communication.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from hpcdl import perfmodel
from hpcdl.perfmodel import Costs

# Point-to-point MPI figures for one process per node, from the vendors' published link rates
# (bytes/s = Gb/s ÷ 8) and typical MPI ping-pong latencies quoted for each fabric. β is the link's
# time per byte; real allreduces reach 80-95 % of it. Override with --network alpha=...,beta=...
NETWORKS = {
    "edr": (Costs(alpha=1.5e-6, beta=8.0e-11), "InfiniBand EDR, 100 Gb/s (12.5 GB/s), ~1.5 µs MPI latency"),
    "hdr": (Costs(alpha=1.2e-6, beta=4.0e-11), "InfiniBand HDR, 200 Gb/s (25 GB/s), ~1.2 µs MPI latency"),
    "100gbe": (Costs(alpha=5.0e-6, beta=8.0e-11), "100 Gb Ethernet with RoCE v2, 12.5 GB/s, ~5 µs MPI latency"),
    "slingshot11": (Costs(alpha=2.0e-6, beta=4.0e-11), "HPE Slingshot 11, 200 Gb/s (25 GB/s), ~2 µs MPI latency"),
}
FLAT = ("ring", "recursive_doubling", "rabenseifner")


@dataclass(frozen=True)
class Machine:
    network: Costs  # between nodes, one rank per node
    node: Costs  # between ranks of one node (shared memory)
    ranks_per_node: int = 1
    gamma: float = perfmodel.DEFAULT_COSTS["ring"].gamma  # seconds per byte reduced, one core


def allreduce_s(algorithm: str, nbytes: float, nodes: int, machine: Machine) -> float:
    """One allreduce of `nbytes` over nodes × ranks_per_node ranks."""
    k = machine.ranks_per_node
    p = nodes * k
    if p == 1 or nbytes == 0:
        return 0.0
    if algorithm == "hierarchical":
        if k == 1:
            return allreduce_s("ring", nbytes, nodes, machine)
        # node-local reduce-scatter and allgather: each a ring's half over k ranks in shared memory
        a, b, c = perfmodel.coefficients("ring", nbytes, k)
        local = a * machine.node.alpha + b * machine.node.beta + c * machine.gamma
        # k shards of n/k bytes cross the NIC at once: the NIC moves n in all, as one rank per node would
        a, b, c = perfmodel.coefficients("ring", nbytes / k, nodes)
        inter = a * machine.network.alpha + b * k * machine.network.beta + c * machine.gamma
        return local + inter
    if algorithm not in FLAT:
        raise ValueError(f"no model for {algorithm!r}; choose from {FLAT + ('hierarchical',)}")
    a, b, c = perfmodel.coefficients(algorithm, nbytes, p)
    if nodes == 1:
        return a * machine.node.alpha + b * machine.node.beta + c * machine.gamma
    # Flat over all ranks: the slowest link sets the pace, and k ranks share one NIC.
    return a * machine.network.alpha + b * k * machine.network.beta + c * machine.gamma


def algorithms(machine: Machine) -> tuple[str, ...]:
    return FLAT + (("hierarchical",) if machine.ranks_per_node > 1 else ())


def table(model_bytes: float, compute_per_sample_s: float, dataset_size: int, epochs: float,
          batches: list[int], nodes: list[int], machine: Machine, backward_share: float = 2 / 3,
          min_per_rank_batch: int = 4, bucket_bytes: float = 25 * 2**20) -> list[dict]:
    """The rows of the projection, one per (global batch, node count)."""
    rows = []
    for batch in batches:
        iterations = math.ceil(epochs * dataset_size / batch)
        for n in nodes:
            ranks = n * machine.ranks_per_node
            per_rank = batch / ranks
            compute = per_rank * compute_per_sample_s
            comm = {name: allreduce_s(name, model_bytes, n, machine) for name in algorithms(machine)}
            hidden_budget = backward_share * compute
            last_bucket = min(bucket_bytes, model_bytes)
            exposed = {name: max(t - hidden_budget, allreduce_s(name, last_bucket, n, machine), 0.0)
                       for name, t in comm.items()}
            best = min(comm, key=lambda name: (exposed[name], comm[name]))
            iteration = compute + exposed[best]
            no_overlap = compute + min(comm.values())
            rows.append({
                "batch": batch, "epochs": epochs, "iterations": iterations, "nodes": n, "ranks": ranks,
                "per_rank_batch": per_rank, "compute_s": compute,
                "allreduce_s": comm, "exposed_allreduce_s": exposed, "best_algorithm": best,
                "iteration_s": iteration, "iteration_no_overlap_s": no_overlap,
                "total_s": iterations * iteration, "efficiency": compute / iteration if iteration else 1.0,
                "efficiency_no_overlap": compute / no_overlap if no_overlap else 1.0,
                "valid": per_rank >= min_per_rank_batch,
            })
    return rows


def parse_network(text: str) -> tuple[Costs, str]:
    if text in NETWORKS:
        return NETWORKS[text]
    try:
        values = dict(part.split("=", 1) for part in text.split(","))
        costs = Costs(alpha=float(values.pop("alpha")), beta=float(values.pop("beta")))
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"--network: {text!r} is neither a preset ({', '.join(NETWORKS)}) "
                                         "nor alpha=SECONDS,beta=SECONDS_PER_BYTE") from None
    if values:
        raise argparse.ArgumentTypeError(f"--network: unknown field(s) {', '.join(values)}; give alpha and beta")
    return costs, f"given: α = {costs.alpha:.3g} s, β = {costs.beta:.3g} s/B ({1 / costs.beta / 1e9:.1f} GB/s)"


def int_list(text: str) -> list[int]:
    """'256,8K,32K' -> [256, 8192, 32768]: K is 1024, as in the large-batch papers' "batch 32K"."""
    def one(value: str) -> int:
        value = value.strip()
        if value[-1:] in ("k", "K"):
            return int(float(value[:-1]) * 1024)
        return int(float(value))

    try:
        values = [one(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="hpcdl scaling predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default="resnet50", help="model whose gradient size is reduced (hpcdl info --models)")
    parser.add_argument("--input-shape", default="3,224,224", help="C,H,W (for --model and the compute measurement)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--model-bytes", type=float, help="gradient bytes per allreduce (default: --model's float32 arena)")
    parser.add_argument("--compute-per-sample-s", type=float,
                        help="forward + backward seconds per image on one rank (default: measured here, 1 rank)")
    parser.add_argument("--dataset-size", type=int, default=1_281_167, help="training images (ImageNet-1k: 1,281,167)")
    parser.add_argument("--epochs", type=float, default=90)
    parser.add_argument("--batches", type=int_list, default=int_list("256,8192,32768,65536"), help="global batches")
    parser.add_argument("--nodes", type=int_list, default=int_list("1,16,64,256,1024,4096"), help="node counts")
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--network", type=parse_network, default=parse_network("edr"),
                        help=f"preset ({', '.join(NETWORKS)}) or alpha=1.5e-6,beta=8e-11 (default edr)")
    parser.add_argument("--backward-share", type=float, default=2 / 3,
                        help="share of compute that is backward, the time an overlapped allreduce can hide in")
    parser.add_argument("--bucket-mb", type=float, default=25.0,
                        help="gradient bucket size: the last bucket's allreduce is never hidden (comm.bucket_mb)")
    parser.add_argument("--min-per-rank-batch", type=int, default=4,
                        help="rows below this per-rank batch are marked: compute stops scaling linearly there")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and assumptions as JSON")
    args = parser.parse_args(argv)
    if args.ranks_per_node < 1:
        parser.error("--ranks-per-node must be >= 1")
    if not 0 <= args.backward_share <= 1:
        parser.error("--backward-share must be in [0, 1]")
    return args


def _measure_compute_per_sample(args, shape) -> float:
    """Median forward + backward seconds per image at a small batch on this process."""
    import time

    import numpy as np

    from hpcdl import models
    from hpcdl.arena import Arena
    from hpcdl.layers import softmax_cross_entropy

    model = models.build(args.model, input_shape=shape, num_classes=args.num_classes)
    Arena(model.parameters(), seed=0)
    batch = 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, args.num_classes, batch)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _, dlogits = softmax_cross_entropy(model.forward(x), y, normalizer=batch)
        model.backward(dlogits)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])) / batch


def main(argv=None) -> int:
    args = _parse_args(argv)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    network, network_source = args.network
    if args.model_bytes is None:
        from hpcdl import models
        from hpcdl.arena import Arena

        arena = Arena(models.build(args.model, input_shape=shape, num_classes=args.num_classes).parameters(), seed=0)
        model_bytes, bytes_source = float(arena.total * arena.dtype.itemsize), f"{args.model}'s float32 gradients"
    else:
        model_bytes, bytes_source = args.model_bytes, "given"
    if args.compute_per_sample_s is None:
        compute, compute_source = _measure_compute_per_sample(args, shape), "measured here (1 process, batch 4)"
    else:
        compute, compute_source = args.compute_per_sample_s, "given"
    machine = Machine(network=network, node=perfmodel.DEFAULT_COSTS["ring"], ranks_per_node=args.ranks_per_node)
    rows = table(model_bytes, compute, args.dataset_size, args.epochs, args.batches, args.nodes, machine,
                 args.backward_share, args.min_per_rank_batch, args.bucket_mb * 2**20)
    assumptions = {
        "model_bytes": model_bytes, "model_bytes_source": bytes_source,
        "compute_per_sample_s": compute, "compute_source": compute_source,
        "network": network.as_dict(), "network_source": network_source,
        "node_costs": machine.node.as_dict(), "node_costs_source": "hpcdl.perfmodel.DEFAULT_COSTS['ring'] "
        "(shared memory of the 2-core development host)", "gamma_s_per_byte": machine.gamma,
        "ranks_per_node": args.ranks_per_node, "backward_share": args.backward_share,
        "bucket_bytes": args.bucket_mb * 2**20,
        "dataset_size": args.dataset_size, "epochs": args.epochs,
    }
    print(format_table(rows, assumptions))
    result = {"assumptions": assumptions, "rows": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def _count(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


SHORT = {"ring": "ring", "recursive_doubling": "rec. doubling", "rabenseifner": "rabenseifner",
         "hierarchical": "hierarchical"}


def format_table(rows: list[dict], a: dict) -> str:
    names = list(rows[0]["allreduce_s"]) if rows else []
    lines = [
        "assumptions:",
        f"  gradients {a['model_bytes'] / 2**20:.1f} MiB ({a['model_bytes_source']}); compute "
        f"{1e3 * a['compute_per_sample_s']:.2f} ms per image per rank ({a['compute_source']})",
        f"  network α = {a['network']['alpha']:.3g} s, β = {a['network']['beta']:.3g} s/B: {a['network_source']}",
        f"  within a node α = {a['node_costs']['alpha']:.3g} s, β = {a['node_costs']['beta']:.3g} s/B; "
        f"reduction γ = {a['gamma_s_per_byte']:.3g} s/B; {a['ranks_per_node']} rank(s) per node",
        f"  overlap hides the allreduce behind backward = {a['backward_share']:.2f} of compute, all but the "
        f"last {a['bucket_bytes'] / 2**20:g} MiB bucket; "
        f"{a['dataset_size']:,} images",
        "",
        "per iteration, ms; allreduce columns: without overlap / exposed with overlap; "
        "iteration and total with overlap and the best algorithm",
        f"{'batch':>7} {'epochs':>6} {'iters':>7} {'nodes':>6} {'per rank':>8} {'compute':>8} "
        + " ".join(f"{SHORT.get(n, n):>15}" for n in names)
        + f" {'iteration':>9} {'total':>8} {'eff.':>6} {'no ovl.':>7}",
    ]
    for row in rows:
        comm = " ".join(f"{_ms(row['allreduce_s'][n]) + ' / ' + _ms(row['exposed_allreduce_s'][n]):>15}" for n in names)
        mark = "" if row["valid"] else "  (per-rank batch below the linear-compute range)"
        lines.append(f"{row['batch']:>7} {row['epochs']:>6g} {row['iterations']:>7} {row['nodes']:>6} "
                     f"{_count(row['per_rank_batch']):>8} {_ms(row['compute_s']):>8} {comm} {_ms(row['iteration_s']):>9} "
                     f"{_duration(row['total_s']):>8} {100 * row['efficiency']:>5.1f}% "
                     f"{100 * row['efficiency_no_overlap']:>6.1f}%{mark}")
    return "\n".join(lines)
