"""Two-level allreduce: reduce inside each node, ring between nodes, broadcast inside each node.

Shared memory inside a node is far faster than the network between nodes,
so only one rank per node (the leader, node-local rank 0) should put the
vector on the wire. Each phase is point-to-point with the caller's tag, so
several bucketed reductions can be in flight at once without the ordering
rules of non-blocking collectives.
"""
from __future__ import annotations

from hpcdl.comm.base import (Communicator, Schedule, mpi, piece_capacity, pieces_for, receive,
                              receive_and_add, send, send_in_pieces)
from hpcdl.comm.ring import ring_schedule, ring_scratch_size
from hpcdl.errors import ConfigError


def tree_reduce_schedule(comm, buf, scratch, tag: int) -> Schedule:
    """Binomial-tree sum onto rank 0 of `comm`; other ranks' buffers end up partial.

    Rank q receives from q + 2^k while bit k of q is clear and sends to
    q - 2^k at its lowest set bit, so log2(size) rounds. Each partial sum is
    formed on one rank only, lower ranks' data first.
    """
    k, q = comm.Get_size(), comm.Get_rank()
    pieces = pieces_for(buf.size, buf.itemsize)
    mask = 1
    while mask < k:
        if q & mask:
            yield from send_in_pieces(comm, buf, q - mask, tag, pieces)
            return
        if q + mask < k:
            yield from receive_and_add(comm, buf, q + mask, scratch, tag, pieces)
        mask <<= 1


def tree_bcast_schedule(comm, buf, tag: int) -> Schedule:
    """Binomial-tree broadcast from rank 0 of `comm`: the mirror image of the reduce."""
    k, q = comm.Get_size(), comm.Get_rank()
    mask = 1
    while mask < k:
        if q & mask:
            yield receive(comm, buf, q - mask, tag)
            break
        mask <<= 1
    sends = []
    mask >>= 1
    while mask:
        if q + mask < k:
            sends += send(comm, buf, q + mask, tag)
        mask >>= 1
    if sends:
        yield sends


class HierarchicalCommunicator(Communicator):
    """Node-local binomial reduce, ring among node leaders, node-local binomial broadcast.

    Nodes come from `MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`. To exercise
    the inter-node ring on one machine, `ranks_per_node=k` fakes nodes of k
    consecutive ranks instead.

    Bitwise agreement: the leaders' ring leaves identical bits on every
    leader (see `ring_schedule`); the broadcast copies them to every rank.
    """

    name = "hierarchical"

    def __init__(self, mpi_comm=None, ranks_per_node: int | None = None):
        super().__init__(mpi_comm)
        MPI = mpi()
        if ranks_per_node is not None and int(ranks_per_node) < 1:
            raise ConfigError(f"comm.ranks_per_node must be >= 1, got {ranks_per_node}")
        if ranks_per_node:
            self.node_comm = self._comm.Split(color=self.rank // int(ranks_per_node), key=self.rank)
        else:
            self.node_comm = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.is_leader = self.node_comm.Get_rank() == 0
        self.leader_comm = self._comm.Split(color=0 if self.is_leader else MPI.UNDEFINED, key=self.rank)
        self.num_nodes = sum(self._comm.allgather(self.is_leader))

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        tree_piece = piece_capacity(buf.size, buf.itemsize) if self.node_comm.Get_size() > 1 else 0
        need = max(tree_piece, ring_scratch_size(buf.size, self.num_nodes, buf.itemsize))
        scratch = self.scratch(tag, buf, need)
        yield from tree_reduce_schedule(self.node_comm, buf, scratch, tag)
        if self.is_leader:
            yield from ring_schedule(self.leader_comm, buf, scratch, tag)
        yield from tree_bcast_schedule(self.node_comm, buf, tag)

    def describe(self) -> str:
        return f"{self.name}: {self.size} ranks on {self.num_nodes} node(s), {self.node_comm.Get_size()} on this rank's node"
