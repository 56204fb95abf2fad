"""CuPy buffers through every algorithm and the BucketReducer, against a NumPy sum.

    mpiexec -n 2 python tests/mpi_scripts/comm_gpu.py          # CUDA-aware if MPI says so
    HPCDL_CUDA_AWARE=0 mpiexec -n 2 python tests/mpi_scripts/comm_gpu.py   # force pinned staging

Each rank uses device (rank mod device count). Rank 0 prints
{"cases": N, "cuda_aware": ..., "failures": [...]}; exit status 1 on failure.
"""
import json
import sys

import cupy
import numpy as np
from mpi4py import MPI

import hpcdl.comm
from hpcdl.arena import Arena, Param
from hpcdl.comm.buckets import BucketReducer
from hpcdl.layers.base import zeros


def contribution(rank, n, dtype):
    i = np.arange(n, dtype=np.int64)
    return (((i * 131 + rank * 977) % 8191) - 4095).astype(dtype)


def main() -> int:
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    cupy.cuda.Device(rank % cupy.cuda.runtime.getDeviceCount()).use()
    failures, cases = [], 0
    for name in ("native", "ring", "recursive_doubling", "rabenseifner", "hierarchical", "auto"):
        comm = hpcdl.comm.create(name, ranks_per_node=1)
        for dtype in (np.float32, np.float64):
            for n in (0, 1, 1001, 2**20 + 3):
                for op in ("sum", "mean"):
                    cases += 1
                    want = sum(contribution(r, n, dtype) for r in range(p)).astype(dtype)
                    if op == "mean":
                        want = want / dtype(p)
                    buf = cupy.asarray(contribution(rank, n, dtype))
                    buf *= 1  # leave a kernel pending on the stream: the fence must wait for it
                    comm.allreduce(buf, op=op)
                    if not np.array_equal(cupy.asnumpy(buf), want):
                        failures.append(f"{name} {np.dtype(dtype).name} {op} n={n}: wrong on rank {rank}")
        cases += 1
        data = cupy.full(1000, rank + 1.0, dtype=cupy.float32)
        comm.bcast(data, root=p - 1)
        if not bool((data == p).all()):
            failures.append(f"{name} bcast: wrong on rank {rank}")

        cases += 1
        params = []
        for i, size in enumerate((300, 7, 5000, 64, 1)):
            q = Param((size,), zeros)
            q.name = f"w{i}"
            params.append(q)
        arena = Arena(params, xp=cupy)
        reducer = BucketReducer(comm, arena, bucket_bytes=1024, overlap=True)
        arena.grads[:] = cupy.asarray(contribution(rank, arena.total, np.float32))
        for q in reversed(params):
            reducer.on_grads_ready([q])
        reducer.finish()
        want = sum(contribution(r, arena.total, np.float32) for r in range(p))
        if not np.array_equal(cupy.asnumpy(arena.grads), want):
            failures.append(f"{name} BucketReducer on CuPy: wrong on rank {rank}")

    gathered = world.gather(failures)
    ok = None
    if rank == 0:
        everything = [f for fs in gathered for f in fs]
        print(json.dumps({"cases": cases, "cuda_aware": hpcdl.comm.cuda_aware(), "failures": everything}))
        ok = not everything
    return 0 if world.bcast(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
