"""The MPI library's own allreduce: the baseline every other algorithm is measured against."""
from __future__ import annotations

from hpcdl.comm.base import Communicator, Schedule, fence, mpi


class NativeCommunicator(Communicator):
    """`MPI_Allreduce(MPI_IN_PLACE, ...)`, or `MPI_Iallreduce` when started non-blocking.

    Identical results on every rank are the MPI library's promise here: the
    standard asks implementations for it (MPI 4.0, section 6.9.1, advice to
    implementors), and MPICH's and Open MPI's default algorithms keep it.
    """

    name = "native"

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        MPI = mpi()
        fence(buf)
        if blocking:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return
        yield [self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)]
