"""Start-up consistency check: every rank must raise the same ConsistencyError, fast.

    mpiexec -n 3 python tests/mpi_scripts/guard_consistency.py OUT_DIR [odd_rank [field]]

Every rank passes the same fields except `odd_rank` (default: none), whose
`field` value differs. Each rank writes OUT_DIR/rank<r>.json: whether it
raised, the message, and how long check_consistency took.
"""
import json
import os
import sys
import time

from mpi4py import MPI

from hpcdl.guard import ConsistencyError, check_consistency

comm = MPI.COMM_WORLD
out_dir = sys.argv[1]
odd_rank = int(sys.argv[2]) if len(sys.argv) > 2 else -1
odd_field = sys.argv[3] if len(sys.argv) > 3 else "model"
fields = {
    "model": "3f9a1c0e27d4b6a8",  # an arena signature
    "config": "lr=0.1;batch=256;optimizer=lars;" * 4,
    "hpcdl_version": "0.1.0",
    "world_batch": "256",
}
if comm.rank == odd_rank:
    fields[odd_field] = fields[odd_field][::-1] + "x"
comm.Barrier()
start = time.perf_counter()
try:
    check_consistency(comm, fields)
    result = {"raised": False}
except ConsistencyError as exc:
    result = {"raised": True, "message": str(exc), "collective": exc.collective, "mismatches": exc.mismatches}
result.update(rank=comm.rank, seconds=time.perf_counter() - start)
with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
    json.dump(result, f)
