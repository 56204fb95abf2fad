"""Every allreduce algorithm against a NumPy sum, on whatever world size it is launched with.

    mpiexec -n 3 python tests/mpi_scripts/comm_exact.py [--ranks-per-node 2]

Values are integers (distinct per rank and element) small enough that every
partial sum is exact in float32, so any wrong, missing or doubled
contribution shows as a mismatch instead of hiding in rounding. Rank 0
prints one JSON line: {"cases": N, "failures": [...]}; exit status 1 on failure.
"""
import argparse
import hashlib
import json
import sys

import numpy as np
from mpi4py import MPI

import hpcdl.comm

ALGORITHMS = ("native", "ring", "recursive_doubling", "rabenseifner", "hierarchical", "auto")


def contribution(rank: int, n: int, dtype, round_: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return (((i * 131 + rank * 977 + round_ * 61) % 8191) - 4095).astype(dtype)


def expected(world: int, n: int, dtype, round_: int, op: str) -> np.ndarray:
    total = sum(contribution(r, n, dtype, round_) for r in range(world)).astype(dtype)
    return total / dtype(world) if op == "mean" else total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks-per-node", type=int, default=None)
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    sizes = sorted({0, 1, max(p - 1, 0), 1001, 2**20 + 3})
    failures, cases = [], 0

    comms = {name: hpcdl.comm.create(name, ranks_per_node=args.ranks_per_node) for name in ALGORITHMS}
    for name, comm in comms.items():
        assert comm.rank == rank and comm.size == p and comm.mpi_comm is world and comm.name == name
        for dtype in (np.float32, np.float64):
            for op in ("sum", "mean"):
                for round_ in range(2):  # twice in a row: reused scratch must not leak state
                    for n in sizes:
                        cases += 1
                        buf = contribution(rank, n, dtype, round_)
                        out = comm.allreduce(buf, op=op)
                        want = expected(p, n, dtype, round_, op)
                        digests = world.allgather(hashlib.sha1(buf.tobytes()).hexdigest())
                        if out is not buf or buf.dtype != dtype:
                            failures.append(f"{name} {np.dtype(dtype).name} {op} n={n}: not in place")
                        elif not np.array_equal(buf, want):
                            bad = int(np.flatnonzero(buf != want)[0])
                            failures.append(f"{name} {np.dtype(dtype).name} {op} n={n} round {round_}: "
                                            f"rank {rank} element {bad} is {buf[bad]}, want {want[bad]}")
                        elif len(set(digests)) != 1:
                            failures.append(f"{name} {np.dtype(dtype).name} {op} n={n}: ranks differ bitwise")

        # Non-blocking path: several reductions in flight at once, each with its own tag.
        cases += 1
        bufs = [contribution(rank, n, np.float32, k) for k, n in enumerate((1001, 7, 2**16 + 1))]
        handles = [comm.start(b, "sum", tag=k + 1) for k, b in enumerate(bufs)]
        while not all(h.test() for h in handles):
            pass
        for k, b in enumerate(bufs):
            if not np.array_equal(b, expected(p, b.size, np.float32, k, "sum")):
                failures.append(f"{name} start(tag={k + 1}) n={b.size}: wrong sum on rank {rank}")

        # Broadcast and object gather.
        cases += 1
        data = np.full(1003, float(rank + 5), dtype=np.float64)
        comm.bcast(data, root=p - 1)
        if not np.all(data == p + 4):
            failures.append(f"{name} bcast: rank {rank} got {data[0]}")
        gathered = comm.allgather_obj({"rank": rank})
        if gathered != [{"rank": r} for r in range(p)]:
            failures.append(f"{name} allgather_obj: {gathered}")
        comm.barrier()

    gathered_failures = world.gather(failures)
    all_failures = [f for fs in gathered_failures for f in fs] if rank == 0 else []
    if rank == 0:
        print(json.dumps({"cases": cases, "world": p, "failures": all_failures}))
    ok = world.bcast(not all_failures if rank == 0 else None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
