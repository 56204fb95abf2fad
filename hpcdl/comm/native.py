"""The MPI library's own allreduce: the baseline every other algorithm is measured against."""
from __future__ import annotations

from hpcdl.comm.base import Communicator, Schedule, fence, is_host, mpi


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
        if blocking or not (is_host(buf) or self._device_nbc()):
            # A device buffer where MPI_Iallreduce does not take one: block, correct if not overlapped.
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return
        yield [self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)]

    @staticmethod
    def _device_nbc() -> bool:
        from hpcdl.comm.gpu import device_nonblocking_collectives

        return device_nonblocking_collectives()
