"""One rank fails; the job must end at once instead of hanging in the others' Barrier.

    mpiexec -n 3 python tests/mpi_scripts/guard_abort.py raise|thread|user-error|abort|kill [stamp_file]

raise       rank 1 raises RuntimeError after install_abort_on_exception()
thread      a helper thread on rank 1 raises while its main thread waits
user-error  rank 1 raises DataError: the job must exit 2 (no retry)
abort       rank 2 calls guard.abort(...): one line, exit 2
kill        rank 1 SIGKILLs itself mid-run while every rank runs a watchdog
unguarded   rank 1 raises with no hook installed (hangs under MPICH; run it
            only with a timeout)

The failing rank writes time.time() to stamp_file just before failing, so
the caller can measure failure-to-exit latency. Without the guard, modes
raise/thread/user-error hang forever.
"""
import os
import signal
import sys
import threading
import time

from mpi4py import MPI

from hpcdl import guard
from hpcdl.errors import DataError

mode = sys.argv[1]
stamp = sys.argv[2] if len(sys.argv) > 2 else os.devnull
comm = MPI.COMM_WORLD
if mode != "unguarded":
    guard.install_abort_on_exception()


def stamp_now():
    with open(stamp, "w") as f:
        f.write(repr(time.time()))


comm.Barrier()
if mode in ("raise", "unguarded") and comm.rank == 1:
    stamp_now()
    raise RuntimeError("rank one failed on purpose")
if mode == "user-error" and comm.rank == 1:
    stamp_now()
    raise DataError("data file /no/such/shard.h5: no such file")
if mode == "abort" and comm.rank == 2:
    stamp_now()
    guard.abort("train.h5 on this node is truncated", code=2)
if mode == "thread" and comm.rank == 1:
    batch_ready = threading.Event()

    def helper():
        stamp_now()
        raise ValueError("prefetch thread failed on purpose")

    threading.Thread(target=helper, name="prefetch").start()
    batch_ready.wait()  # the main thread waits for a batch that never comes
if mode == "kill":
    watchdog = guard.StallWatchdog(comm, timeout_s=30.0)
    buffer = bytearray(8)
    for step in range(10_000):
        watchdog.mark(step, "forward")
        time.sleep(0.01)
        if step == 20 and comm.rank == 1:
            stamp_now()
            os.kill(os.getpid(), signal.SIGKILL)
        with watchdog.waiting("allreduce"):
            comm.Allreduce(MPI.IN_PLACE, [buffer, MPI.BYTE], op=MPI.BOR)
comm.Barrier()
print(f"rank {comm.rank}: unreachable barrier passed", flush=True)
