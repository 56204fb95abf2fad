"""Stall report: rank 0 waits in a Barrier while rank 1 is still "computing".

    mpiexec -n 3 python tests/mpi_scripts/guard_stall.py straggler|silent|none OUT_DIR

straggler  rank 1 marks step 7 phase backward and sleeps 3 s; ranks 0 and 2
           wait in the Barrier under `watchdog.waiting("barrier")` with
           timeout_s=1. Expected: one report (rank 0's; rank 2 defers to it)
           naming rank 1 and its phase.
silent     as straggler, but rank 2 closes its watchdog first and then sleeps,
           so it cannot answer: the report says rank 2 gave no answer.
none       nobody is late: no report.
Each rank writes OUT_DIR/rank<r>.json with the reports its watchdog printed
(files, not stdout: mpiexec may interleave the ranks' lines).
"""
import json
import os
import sys
import time

from mpi4py import MPI

from hpcdl.guard import StallWatchdog

mode = sys.argv[1]
comm = MPI.COMM_WORLD
watchdog = StallWatchdog(comm, timeout_s=1.0, poll_s=0.25)
watchdog.mark(7, "forward")
started = time.monotonic()
if mode in ("straggler", "silent") and comm.rank == 1:
    watchdog.mark(7, "backward")
    time.sleep(3.0)
    comm.Barrier()
elif mode == "silent" and comm.rank == 2:
    watchdog.close()
    watchdog.mark(7, "backward")
    time.sleep(3.0)
    comm.Barrier()
else:
    with watchdog.waiting("barrier"):
        comm.Barrier()
watchdog.close()
result = {"rank": comm.rank, "reports": watchdog.reports, "seconds": time.monotonic() - started}
with open(os.path.join(sys.argv[2], f"rank{comm.rank}.json"), "w") as f:
    json.dump(result, f)
