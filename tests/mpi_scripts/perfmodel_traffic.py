"""The cost model's byte terms against what hpcdl's communicators actually post, at p = 2, 3, 4 in one launch.

    mpiexec -n 4 python tests/mpi_scripts/perfmodel_traffic.py

The first p ranks of the world form a sub-communicator for each p in 2, 3, 4;
each algorithm reduces one float32 vector on it with `comm.traffic` reset
before, and every rank's (sent, received) is compared exactly with
`perfmodel.wire_bytes` (the element count is divisible by 12, so every chunk
split is even). The vector is larger than one reduce piece, so the pieces'
extra messages are in the count too. Rank 0 prints one JSON line:
{"cases": [...], "failures": [...]}; exit status 1 on any failure.
"""
import json
import sys

import numpy as np
from mpi4py import MPI

import hpcdl.comm
from hpcdl import perfmodel

ELEMENTS = 12 * 2**16  # 3 MiB of float32: several 1 MiB pieces per step, even chunks for p = 2, 3, 4
# (label, algorithm, communicator options, ranks per node the model is told)
VARIANTS = [
    ("ring", "ring", {}, 1),
    ("recursive_doubling", "recursive_doubling", {}, 1),
    ("rabenseifner", "rabenseifner", {}, 1),
    ("hierarchical/rpn=2", "hierarchical", {"ranks_per_node": 2}, 2),  # p = 3: nodes of 2 + 1, the fallback
    ("hierarchical/rpn=1", "hierarchical", {"ranks_per_node": 1}, 1),
]


def main() -> int:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    cases, failures = [], []
    for p in (2, 3, 4):
        if p > world.Get_size():
            continue
        sub = world.Split(color=0 if rank < p else MPI.UNDEFINED, key=rank)
        if sub != MPI.COMM_NULL:
            for label, name, options, rpn in VARIANTS:
                comm = hpcdl.comm.create(name, sub, **options)
                buf = np.full(ELEMENTS, float(rank + 1), dtype=np.float32)
                comm.traffic.reset()
                comm.allreduce(buf)
                mine = (comm.traffic.sent, comm.traffic.received)
                everyone = sub.gather(mine, root=0)
                if not np.all(buf == p * (p + 1) / 2):
                    failures.append(f"{label} p={p} rank {rank}: wrong sum")
                if rank == 0:
                    nbytes = ELEMENTS * 4
                    model = [perfmodel.wire_bytes(name, nbytes, p, r, rpn) for r in range(p)]
                    cases.append({"p": p, "algorithm": label, "traffic": everyone, "model": model})
                    for r, (got, want) in enumerate(zip(everyone, model)):
                        if tuple(float(x) for x in got) != tuple(want):
                            failures.append(f"{label} p={p} rank {r}: comm.traffic {got} != model {want}")
            sub.Free()
        world.Barrier()
    failures = sum(world.allgather(failures), [])
    if rank == 0:
        print(json.dumps({"cases": cases, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
