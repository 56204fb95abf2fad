"""Node-local allreduce through an MPI-3 shared window: every rank reduces one shard of all ranks' buffers.

When the buffer lives in a shared window (`hpcdl.comm.window`), no message
needs to carry data. With k ranks on the node, after a fence that makes
everyone's gradients visible, rank q

1. sums shard q of all k buffers, read in place, block by block, and
2. stores each finished block, still in cache, into shard q of every
   rank's buffer,

and a second fence tells everyone that all shards are everywhere. Nobody
else reads or writes shard q of any buffer in between, so the two fences
are the only synchronisation. Every input byte is read once and every
output byte written once: 2n bytes of traffic per rank, a memcpy's, whatever
k is. (An earlier version added into the owner's buffer and then had every
rank copy the others' shards out of their owners: 2.5n at k = 2, 2.75n at
k = 4, and a third fence.)

The fences are `MPI_Win_sync` plus a dissemination barrier of tiny messages
carrying the caller's tag, so several bucketed reductions can be in flight
at once. The messages also carry the slice's offset and length: a rank that
passed a different slice makes every rank raise, not hang.

Exactness: each shard's sum is formed once, by its owner, in rank order
(((b0 + b1) + b2) + ...), and stored as those bytes everywhere, so every rank
ends with identical bits; `reference_sum` is the same order in plain NumPy.

The fast path needs the buffer inside a window this communicator allocated
(`zeros`), at the same offset on every rank: the trainer moves its gradient
arena there (`Arena.rehome_grads`). Any other buffer takes the point-to-point
ring. A window belongs to one MPI world, so `comm.fault_tolerance` = shrink or
regrow refuses this algorithm (the trainer checks).
"""
from __future__ import annotations

from hpcdl.comm.base import Communicator, CountingComm, Schedule, chunk_bounds, is_host, mpi
from hpcdl.comm.ring import ring_schedule, ring_scratch_size
from hpcdl.comm.window import NodeWindow, WindowBuffers, beside_compute, reference_sum, sum_into, window_fence
from hpcdl.errors import ConfigError

__all__ = ["ShmCommunicator", "shm_allreduce_schedule", "reference_sum"]


def shm_allreduce_schedule(comm, window: NodeWindow, start: int, count: int, dtype, tag: int,
                           polite: bool = False) -> Schedule:
    """In-place sum of elements [start, start + count) of every rank's window segment (see the module docstring).

    `polite` (a non-blocking reduction, which may run beside backward) yields
    the core between blocks when it runs on a helper thread.
    """
    q = comm.Get_rank()
    views = window.views(start, count, dtype)
    bounds = chunk_bounds(count, comm.Get_size())
    yield from window_fence(comm, window, tag, start, count)  # everyone's inputs are written
    sum_into(views, bounds[q], bounds[q + 1], targets=range(len(views)), polite=polite and beside_compute())
    # Until every shard is stored everywhere, a peer may still write into this rank's buffer.
    yield from window_fence(comm, window, tag, start, count)


class ShmCommunicator(WindowBuffers, Communicator):
    """Allreduce through a node's shared-memory window; every rank must be on one node.

    `zeros(n, dtype)` (collective) returns a buffer in a new window;
    reductions of slices of such buffers take the shared-memory path, any
    other buffer the point-to-point ring (`describe()` says so).
    """

    name = "shm"

    def __init__(self, mpi_comm=None, piece_kb: int | None = None, pipeline_depth: int | None = None):
        super().__init__(mpi_comm, piece_kb=piece_kb, pipeline_depth=pipeline_depth)
        self.node_comm = self._comm
        if self.size > 1:
            MPI = mpi()
            node = self._comm.raw.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            if node.Get_size() != self.size:
                nodes = self._comm.raw.allreduce(1 if node.Get_rank() == 0 else 0)
                node.Free()
                raise ConfigError(f"comm.algorithm = 'shm' needs every rank on one node; these {self.size} ranks "
                                  f"are on {nodes} nodes (use 'hierarchical' or 'ring')")
            self.node_comm = CountingComm(node, self.traffic)
            self.use_windows(self.node_comm)

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        found = self.window_of(buf) if is_host(buf) else None
        if found is None:
            need = ring_scratch_size(buf.size, self.size, buf.itemsize, self.pieces, not is_host(buf))
            return ring_schedule(self._comm, buf, self.scratch(tag, buf, need), tag, self.pieces)
        window, start = found
        return shm_allreduce_schedule(self.node_comm, window, start, buf.size, buf.dtype, tag, polite=not blocking)

    def describe(self) -> str:
        return (f"{self.name}: {self.size} ranks on one node, shared windows of {self.window_bytes() / 2**20:.1f} MiB "
                f"per rank (buffers outside them take the point-to-point ring)")
