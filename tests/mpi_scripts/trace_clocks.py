"""Under mpiexec: rank r's clock runs r × 5 s ahead of rank 0's; the offsets must find it, and one
event recorded at the same moment on every rank (after a barrier) must land at the same place."""
import json
import sys
import time

from mpi4py import MPI

from hpcdl import trace

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
skew = 5.0 * rank


def clock():
    return MPI.Wtime() + skew


offsets = trace.clock_offsets(comm, clock=clock)
tracer = trace.Tracer(rank, 1, 1, clock=clock)
tracer.begin_step(1)
comm.Barrier()
tracer.begin("after barrier", "phase")
time.sleep(0.01)
tracer.end()
tracer.end_step()
path = trace.write(comm, tracer, offsets, sys.argv[1], metadata={"test": True})
if rank == 0:
    print(json.dumps({"offsets": offsets, "path": str(path)}))
