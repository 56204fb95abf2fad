"""`hpcdl scaling`: measure compute and communication of one training step, predict it at P ranks.

Run it under the launcher with the rank count you have:

    mpiexec -n 2 hpcdl scaling --model resnet18 --per-rank-batch 32
    mpiexec -n 2 hpcdl bench allreduce --json ar.json   # then fit the model to your network:
    mpiexec -n 2 hpcdl scaling --model resnet50 --input-shape 3,224,224 --bench-json ar.json
    hpcdl scaling predict --help                        # a whole run on a machine you do not have
    hpcdl scaling sweep --ranks 1,2,3,4 --out DIR       # measured vs modelled step at each rank count

What it does, on synthetic data so nothing else varies:

1. times forward + backward of `--model` at the per-rank batch (the compute),
2. times the bucketed allreduce of that model's gradient arena with the chosen
   algorithm at the current P (the communication, nothing overlapped),
3. fits the α-β-γ cost model (`hpcdl.perfmodel`) to `--bench-json` results,
   or uses the shipped constants, and checks its prediction at this P
   against step 2,
4. predicts step time, images/s and parallel efficiency for weak scaling
   (per-rank batch fixed, global batch = per-rank batch × P) up to
   `--predict` ranks. Holding accuracy at those global batches is what
   LARS/LAMB are for.

Compute time is assumed to stay what this rank measured; on a node shared
by several ranks (or this 2-core machine) it is the per-rank compute under
that sharing.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="hpcdl scaling", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    parser.add_argument("--model", default="resnet18", help="model name (hpcdl info --models)")
    parser.add_argument("--input-shape", default="3,32,32", help="C,H,W of the synthetic images")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--per-rank-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--algorithm", default="auto", help="allreduce algorithm to time and model")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--bench-json", nargs="*", default=[], help="`hpcdl bench allreduce --json` files to fit")
    parser.add_argument("--predict", default="1,2,4,8,16,32,64,128,256,512,1024",
                        help="rank counts to predict, comma-separated")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="share of the allreduce hidden behind backward in the prediction (0 = none)")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON")
    return parser.parse_args(argv)


def measure(args, world):
    """Median compute and allreduce seconds per step at this world size."""
    from hpcdl import models
    from hpcdl.arena import Arena
    from hpcdl.comm.buckets import BucketReducer
    from hpcdl.layers import softmax_cross_entropy

    shape = tuple(int(v) for v in args.input_shape.split(","))
    model = models.build(args.model, input_shape=shape, num_classes=args.num_classes)
    arena = Arena(model.parameters(), seed=0)
    reducer = BucketReducer(world, arena, bucket_bytes=int(args.bucket_mb * 2**20), overlap=False, op="sum")
    rng = np.random.default_rng(world.rank)
    x = rng.standard_normal((args.per_rank_batch, *shape)).astype(np.float32)
    y = rng.integers(0, args.num_classes, args.per_rank_batch)
    compute, comm = [], []
    for i in range(args.steps + 1):
        arena.zero_grads()
        t0 = time.perf_counter()
        _, dlogits = softmax_cross_entropy(model.forward(x), y, normalizer=args.per_rank_batch * world.size)
        model.backward(dlogits)
        t1 = time.perf_counter()
        world.barrier()  # time the allreduce alone, not the wait for a slower rank's compute
        t2 = time.perf_counter()
        reducer.begin(sync=True)
        reducer.finish()
        t3 = time.perf_counter()
        if i:  # the first step pays for allocation and page faults
            compute.append(t1 - t0)
            comm.append(t3 - t2)
    # the slowest rank sets the pace of a synchronous step
    compute_s = max(world.allgather_obj(float(np.median(compute))))
    comm_s = max(world.allgather_obj(float(np.median(comm))))
    return model, arena, compute_s, comm_s


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:  # a whole run on a machine you do not have: no MPI needed
        from hpcdl.projection import main as predict_main

        return predict_main(argv[1:])
    if argv[:1] == ["sweep"]:  # launches its own mpiexec runs, one per rank count
        from hpcdl.sweep import main as sweep_main

        return sweep_main(argv[1:])
    from hpcdl import comm, perfmodel

    args = _parse_args(argv)
    world = comm.create(args.algorithm)
    model, arena, compute_s, comm_s = measure(args, world)
    grad_bytes = arena.total * arena.dtype.itemsize

    if args.bench_json:
        results = [json.load(open(path)) for path in args.bench_json]
        costs = perfmodel.fit_bench(results, large_bytes=16 * 2**20)
        costs_source = f"fitted to {', '.join(args.bench_json)}"
    else:
        costs = perfmodel.DEFAULT_COSTS
        costs_source = "shipped constants of the 2-core development host (pass --bench-json to fit yours)"
    algorithm = args.algorithm if args.algorithm != "auto" else "ring"
    if algorithm not in costs:
        algorithm = "ring"
    predicted_here = perfmodel.allreduce_time(algorithm, grad_bytes, world.size, costs[algorithm])

    rows = []
    for p in (int(v) for v in args.predict.split(",")):
        step_s = perfmodel.predict_step_time(p, compute_s, grad_bytes, algorithm, costs, overlap=args.overlap)
        rows.append({"ranks": p, "global_batch": args.per_rank_batch * p, "step_s": step_s,
                     "images_per_s": args.per_rank_batch * p / step_s, "efficiency": compute_s / step_s})
    result = {
        "model": args.model, "parameters": arena.num_parameters, "gradient_bytes": grad_bytes,
        "per_rank_batch": args.per_rank_batch, "world_size": world.size, "algorithm": args.algorithm,
        "modelled_algorithm": algorithm, "compute_s": compute_s, "allreduce_s": comm_s,
        "allreduce_predicted_s": predicted_here, "costs": {k: v.as_dict() for k, v in costs.items()},
        "costs_source": costs_source, "prediction": rows,
    }
    if world.rank == 0:
        print(_table(result))
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0


def _table(r: dict) -> str:
    lines = [
        f"{r['model']}: {r['parameters']:,} parameters, {r['gradient_bytes'] / 2**20:.1f} MiB of gradients, "
        f"per-rank batch {r['per_rank_batch']}",
        f"measured at P={r['world_size']}: compute {1e3 * r['compute_s']:.1f} ms/step, "
        f"{r['algorithm']} allreduce {1e3 * r['allreduce_s']:.1f} ms "
        f"(model: {1e3 * r['allreduce_predicted_s']:.1f} ms, {r['modelled_algorithm']}; "
        f"measured/model = {r['allreduce_s'] / max(r['allreduce_predicted_s'], 1e-12):.2f})",
        f"cost model: {r['costs_source']}",
        "",
        f"{'ranks':>6} {'global batch':>13} {'step ms':>9} {'images/s':>11} {'efficiency':>11}",
    ]
    for row in r["prediction"]:
        lines.append(f"{row['ranks']:>6} {row['global_batch']:>13} {1e3 * row['step_s']:>9.1f} "
                     f"{row['images_per_s']:>11.0f} {100 * row['efficiency']:>10.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
