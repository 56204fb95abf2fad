"""Every allreduce algorithm against a NumPy sum, on whatever world size it is launched with.

    mpiexec -n 3 python tests/mpi_scripts/comm_exact.py [--ranks-per-node 2]
    mpiexec -n 7 python tests/mpi_scripts/comm_exact.py --quick   # the 4..8-rank CI run

Values are integers (distinct per rank and element) small enough that every
partial sum is exact in float32, so any wrong, missing or doubled
contribution shows as a mismatch instead of hiding in rounding. Sizes: 0, 1,
p - 1, p + 1, 1001, 300007 and 2^20 + 3 (odd, not divisible by p, larger
than one reduce piece). `--quick` keeps every size and algorithm but runs
float64 and op="mean" only on the small sizes: those paths differ from the
float32 sum in the dtype and the final division, not in the schedule, and
oversubscribed ranks make every large case slow. The hierarchical allreduce
runs on one real node and on fake nodes of 2 and 3 ranks (uneven nodes when
p is odd), and it and the ring also run with their shared-window transport
(`shared_window=True`; uneven nodes fall back to point-to-point). Rank 0 prints one JSON line: {"cases": N, "failures": [...]};
exit status 1 on failure.
"""
import argparse
import hashlib
import json
import sys
from functools import lru_cache

import numpy as np
from mpi4py import MPI

import hpcdl.comm

ALGORITHMS = ("native", "ring", "recursive_doubling", "rabenseifner", "hierarchical", "shm", "auto")
SMALL = 2000  # sizes up to this run in every dtype and op in --quick mode


def contribution(rank: int, n: int, dtype, round_: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return (((i * 131 + rank * 977 + round_ * 61) % 8191) - 4095).astype(dtype)


@lru_cache(maxsize=None)
def _total(world: int, n: int, round_: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return sum((((i * 131 + r * 977 + round_ * 61) % 8191) - 4095) for r in range(world)) if world else i


def expected(world: int, n: int, dtype, round_: int, op: str) -> np.ndarray:
    total = np.asarray(_total(world, n, round_)).astype(dtype)
    return total / dtype(world) if op == "mean" else total


def variants(p: int, ranks_per_node):
    """(label, algorithm, options): every algorithm, the hierarchical one on several node layouts, and
    the ring, the hierarchical allreduce and auto with their shared-window transport."""
    out = []
    for name in ALGORITHMS:
        out.append((name, name, {"ranks_per_node": ranks_per_node}))
        if name == "hierarchical" and ranks_per_node is None and p >= 4:
            out += [(f"hierarchical/rpn={k}", name, {"ranks_per_node": k}) for k in (2, 3)]
        if name in ("ring", "hierarchical", "auto"):
            out.append((f"{name}+window", name, {"ranks_per_node": ranks_per_node, "shared_window": True}))
        if name == "hierarchical" and ranks_per_node is None and p >= 4:
            out += [(f"hierarchical+window/rpn={k}", name, {"ranks_per_node": k, "shared_window": True})
                    for k in (2, 3)]
    return out


def window_reference(label: str, comm, p: int):
    """What a shared-window reduction of random floats must equal bit for bit, or None (ranks must agree).

    shm, and the hierarchical allreduce on one node, sum in rank order (`reference_sum`); the ring over
    the window adds in the point-to-point ring's order, so it must match that ring exactly.
    """
    from hpcdl.comm.window import reference_sum

    if comm.name == "shm" or (comm.name == "hierarchical" and comm.num_nodes == 1):
        return lambda mine: reference_sum(MPI.COMM_WORLD.allgather(mine))
    if comm.name == "ring" or (comm.name == "auto" and comm.window_owner.name == "ring"
                               and comm.choose(300007 * 4) == "ring"):
        p2p = hpcdl.comm.create("ring")
        return lambda mine: p2p.allreduce(mine.copy())
    return None


def window_checks(label: str, comm, pool, rank: int, p: int) -> list[str]:
    """Random floats against the exact reference (or, where there is none, the float64 sum and agreement
    of all ranks), the non-blocking path, and a slice mismatch that every rank must report."""
    failures = []
    n = 300007
    mine = np.random.default_rng(rank).standard_normal(n).astype(np.float32)
    reference = window_reference(label, comm, p)
    want = reference(mine) if reference else None
    buf = pool[3:3 + n]
    buf[...] = mine
    comm.allreduce(buf)
    blocking = buf.copy()
    if want is not None and not np.array_equal(buf, want):
        failures.append(f"{label} random floats: rank {rank} differs from the exact reference at "
                        f"{int(np.flatnonzero(buf != want)[0])}")
    total = np.sum(MPI.COMM_WORLD.allgather(mine.astype(np.float64)), axis=0)
    if not np.allclose(buf, total, rtol=1e-5, atol=1e-5):
        failures.append(f"{label} random floats: rank {rank} is not the sum")
    if len(set(MPI.COMM_WORLD.allgather(hashlib.sha1(buf.tobytes()).hexdigest()))) != 1:
        failures.append(f"{label} random floats: ranks differ bitwise")
    buf[...] = mine  # non-blocking: adds and copies in blocks, yielding the core between them
    comm.start(buf, tag=9).wait()
    if not np.array_equal(buf, blocking):
        failures.append(f"{label} random floats, start(): rank {rank} differs from the blocking call")
    # Rank 0 passes another slice: every rank must raise (none may hang in a later barrier).
    # Large enough that auto hands it to the algorithm that owns the window.
    if comm.name == "auto" and comm.choose(n * 4) != comm.window_owner.name:
        return failures
    wrong = pool[1:1 + n] if rank == 0 else pool[0:n]
    try:
        comm.allreduce(wrong)
        failures.append(f"{label} slice mismatch: rank {rank} did not raise")
    except RuntimeError as exc:
        if "different slices" not in str(exc):
            failures.append(f"{label} slice mismatch: rank {rank} raised {exc!r}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="float64 and mean on the small sizes only")
    parser.add_argument("--piece-kb", type=int, default=None, help="reduce piece size (default: from the cache)")
    parser.add_argument("--pipeline-depth", type=int, default=None, help="pieces in flight (1 = not pipelined)")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    sizes = sorted({0, 1, max(p - 1, 0), p + 1, 1001, 300007, 2**20 + 3})
    failures, cases = [], 0

    for label, name, options in variants(p, args.ranks_per_node):
        comm = hpcdl.comm.create(name, piece_kb=args.piece_kb, pipeline_depth=args.pipeline_depth, **options)
        assert comm.rank == rank and comm.size == p and comm.mpi_comm is world and comm.name == name
        if options.get("shared_window") and p > 1 and name != "auto":
            # One machine: the ring always gets a window, the hierarchical allreduce on equal nodes of 2+.
            should = comm.name == "ring" or (comm.balanced and comm.local_size > 1)
            if comm.shared_memory != should:
                failures.append(f"{label}: shared window {comm.shared_memory}, expected {should} ({comm.describe()})")
        if comm.shared_memory:
            pool32 = comm.zeros(2 * (max(sizes) + 8), np.float32)
            pool = {"float32": pool32, "float64": pool32.view(np.float64)}
        for dtype in (np.float32, np.float64):
            for op in ("sum", "mean"):
                for round_ in range(2):  # twice in a row: reused scratch must not leak state
                    for n in sizes:
                        if args.quick and n > SMALL and (dtype is np.float64 or op == "mean" or round_):
                            continue
                        cases += 1
                        buf = contribution(rank, n, dtype, round_)
                        if comm.shared_memory:  # in the shared window, at an offset that is no block boundary
                            window = pool[np.dtype(dtype).name][5:5 + n]
                            window[...] = buf
                            buf = window
                        out = comm.allreduce(buf, op=op)
                        want = expected(p, n, dtype, round_, op)
                        digests = world.allgather(hashlib.sha1(buf.tobytes()).hexdigest())
                        if out is not buf or buf.dtype != dtype:
                            failures.append(f"{label} {np.dtype(dtype).name} {op} n={n}: not in place")
                        elif not np.array_equal(buf, want):
                            bad = int(np.flatnonzero(buf != want)[0])
                            failures.append(f"{label} {np.dtype(dtype).name} {op} n={n} round {round_}: "
                                            f"rank {rank} element {bad} is {buf[bad]}, want {want[bad]}")
                        elif len(set(digests)) != 1:
                            failures.append(f"{label} {np.dtype(dtype).name} {op} n={n}: ranks differ bitwise")

        # Non-blocking path: several reductions in flight at once, each with its own tag.
        cases += 1
        bufs = [contribution(rank, n, np.float32, k) for k, n in enumerate((1001, 7, 2**16 + 1))]
        if comm.shared_memory:  # three disjoint slices of the window, reduced concurrently
            slices = []
            for offset, b in zip((0, 2000, 3000), bufs):
                slices.append(pool["float32"][offset:offset + b.size])
                slices[-1][...] = b
            bufs = slices
        handles = [comm.start(b, "sum", tag=k + 1) for k, b in enumerate(bufs)]
        while not all(h.test() for h in handles):
            pass
        for k, b in enumerate(bufs):
            if not np.array_equal(b, expected(p, b.size, np.float32, k, "sum")):
                failures.append(f"{label} start(tag={k + 1}) n={b.size}: wrong sum on rank {rank}")

        # Wire bytes: the ring and the sharded hierarchical move 2(p-1)/p·n each way per rank.
        sharded = name == "hierarchical" and getattr(comm, "balanced", False)
        if p > 1 and (name == "ring" or sharded):
            cases += 1
            buf = contribution(rank, 300007, np.float32, 0)
            comm.traffic.reset()
            comm.allreduce(buf)
            optimal = 2 * (p - 1) / p * buf.nbytes
            for what, count in comm.traffic.as_dict().items():
                if abs(count / optimal - 1) > 0.05:
                    failures.append(f"{label}: rank {rank} {what} {count} bytes, 2(p-1)/p·n = {optimal:.0f}")

        if comm.shared_memory:
            cases += 3
            failures += window_checks(label, comm, pool["float32"], rank, p)

        # Broadcast and object gather.
        cases += 1
        data = np.full(1003, float(rank + 5), dtype=np.float64)
        comm.bcast(data, root=p - 1)
        if not np.all(data == p + 4):
            failures.append(f"{label} bcast: rank {rank} got {data[0]}")
        gathered = comm.allgather_obj({"rank": rank})
        if gathered != [{"rank": r} for r in range(p)]:
            failures.append(f"{label} allgather_obj: {gathered}")
        comm.barrier()

    gathered_failures = world.gather(failures)
    all_failures = [f for fs in gathered_failures for f in fs] if rank == 0 else []
    if rank == 0:
        print(json.dumps({"cases": cases, "world": p, "failures": all_failures,
                          "pieces": [comm.pieces.bytes, comm.pieces.depth]}))
    ok = world.bcast(not all_failures if rank == 0 else None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
