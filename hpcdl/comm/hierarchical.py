"""Two-level allreduce that moves no more bytes than the ring: node-local reduce-scatter,
inter-node allreduce of every shard at once, node-local allgather.

With k ranks on each of m nodes (p = m·k), local rank q of every node ends
the node-local reduce-scatter holding the node's sum of shard (q + 1) mod k
(n/k elements). The k local ranks then allreduce their shards across nodes
at the same time, each with the ranks of the same local rank on the other
nodes, so every rank, not one leader per node, drives the network, and each
moves only n/k. A node-local allgather puts the shards together. Each rank
sends (and receives) (k-1)/k·n + 2(m-1)/m·n/k + (k-1)/k·n = 2(p-1)/p·n
bytes, exactly the ring's (Patarasuk & Yuan 2009 call this bound optimal);
Horovod's and NCCL's hierarchical allreduce and Jia et al. 2018 ("Highly
scalable deep learning training system with mixed-precision", the 2D ring)
have this shape. Every phase is point-to-point with the caller's tag, so
several bucketed reductions can be in flight at once.

With `shared_window=True` the node phases need no messages: buffers from
`zeros(n)` live in an MPI-3 shared window over the node (`hpcdl.comm.window`).
After a fence, local rank q sums shard q of all k local buffers in place
(local rank order), allreduces that shard with the same local rank of the
other nodes (the point-to-point ring above), and stores the result into
shard q of every local buffer; a second fence ends it. Per rank that is 2n
bytes of memory traffic on the node and 2(m-1)/m·n/k on the network.

Nodes of unequal size (a Slurm layout of 3+2 ranks) break the shard
correspondence, so they fall back to the older scheme: node-local binomial
reduce onto a leader, ring among leaders, node-local binomial broadcast.
"""
from __future__ import annotations

from hpcdl.comm.base import (Communicator, CountingComm, Schedule, chunk_bounds, is_host, mpi, receive,
                              receive_and_add, send, send_in_pieces)
from hpcdl.comm.ring import ring_allgather, ring_chunk, ring_reduce_scatter, ring_schedule, ring_scratch_size
from hpcdl.comm.window import (BLOCK_BYTES, NodeWindow, WindowBuffers, beside_compute, copy_into, shares_memory,
                               sum_into, window_fence)
from hpcdl.errors import ConfigError


def tree_reduce_schedule(comm, buf, scratch, tag: int, plan) -> Schedule:
    """Binomial-tree sum onto rank 0 of `comm`; other ranks' buffers end up partial.

    Rank q receives from q + 2^k while bit k of q is clear and sends to
    q - 2^k at its lowest set bit, so log2(size) rounds. Each partial sum is
    formed on one rank only, lower ranks' data first.
    """
    k, q = comm.Get_size(), comm.Get_rank()
    mask = 1
    while mask < k:
        if q & mask:
            yield from send_in_pieces(comm, buf, q - mask, tag, plan)
            return
        if q + mask < k:
            yield from receive_and_add(comm, buf, q + mask, scratch, tag, plan)
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


class HierarchicalCommunicator(WindowBuffers, Communicator):
    """Node-local reduce-scatter, per-shard inter-node ring, node-local allgather (see the module docstring).

    Nodes come from `MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`. To exercise
    the inter-node phase on one machine, `ranks_per_node=k` fakes nodes of k
    consecutive ranks instead.

    Bitwise agreement: the node-local reduce-scatter forms each shard's node
    sum on one rank; the inter-node ring leaves identical bits on every rank
    of a shard's group (see `ring_schedule`); the allgather only copies.

    `shared_window=True` (balanced nodes whose ranks share memory): `zeros`
    returns shared-window memory, and reductions of it take the window
    schedule of the module docstring.
    """

    name = "hierarchical"

    def __init__(self, mpi_comm=None, ranks_per_node: int | None = None, shared_window: bool = False, **options):
        super().__init__(mpi_comm, **options)
        MPI = mpi()
        if ranks_per_node is not None and int(ranks_per_node) < 1:
            raise ConfigError(f"comm.ranks_per_node must be >= 1, got {ranks_per_node}")
        raw = self._comm.raw
        if ranks_per_node:
            node = raw.Split(color=self.rank // int(ranks_per_node), key=self.rank)
        else:
            node = raw.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.node_comm = CountingComm(node, self.traffic)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        self.is_leader = self.local_rank == 0
        sizes = raw.allgather(self.local_size if self.is_leader else None)
        self.node_sizes = [s for s in sizes if s is not None]
        self.num_nodes = len(self.node_sizes)
        self.balanced = len(set(self.node_sizes)) == 1
        if self.balanced:
            # ranks of the same local rank on every node: they hold the same shard
            self.cross_comm = CountingComm(raw.Split(color=self.local_rank, key=self.rank), self.traffic)
            self.leader_comm = None
        else:
            self.cross_comm = None
            leaders = raw.Split(color=0 if self.is_leader else MPI.UNDEFINED, key=self.rank)
            self.leader_comm = CountingComm(leaders, self.traffic) if self.is_leader else None
        self.window_note = "point-to-point node phases"
        if shared_window and self.size > 1:
            # Every rank takes part in both collectives, so all agree whether windows are used.
            together = shares_memory(node)
            if not raw.allreduce(int(together and self.balanced), op=MPI.MIN):
                self.window_note = ("point-to-point node phases (no shared window: "
                                    f"{'unequal nodes' if not self.balanced else 'a node spans machines'})")
            elif self.local_size > 1:
                self.use_windows(self.node_comm)
                self.window_note = "node phases through a shared window"

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        found = self.window_of(buf) if is_host(buf) else None
        if found is not None:
            window, start = found
            return self._window_schedule(window, start, buf.size, buf.dtype, tag, polite=not blocking)
        if not self.balanced:
            return self._reduce_bcast_schedule(buf, tag)
        return self._sharded_schedule(buf, tag)

    def _sharded_schedule(self, buf, tag: int) -> Schedule:
        k, m, plan = self.local_size, self.num_nodes, self.pieces
        device = not is_host(buf)
        start, end = ring_chunk(buf.size, k, self.local_rank)
        shard = buf[start:end]
        need = max(ring_scratch_size(buf.size, k, buf.itemsize, plan, device),
                   ring_scratch_size(-(-buf.size // k), m, buf.itemsize, plan, device))
        scratch = self.scratch(tag, buf, need)
        yield from ring_reduce_scatter(self.node_comm, buf, scratch, tag, plan)
        yield from ring_schedule(self.cross_comm, shard, scratch, tag, plan)
        yield from ring_allgather(self.node_comm, buf, tag, plan)

    def _window_schedule(self, window: NodeWindow, start: int, count: int, dtype, tag: int, polite: bool) -> Schedule:
        k, q, m = self.local_size, self.local_rank, self.num_nodes
        polite = polite and beside_compute()
        views = window.views(start, count, dtype)
        bounds = chunk_bounds(count, k)
        lo, hi = bounds[q], bounds[q + 1]
        mine = views[q]
        # The node's inputs are written. Over the whole world, not just the node, so that a rank that
        # passed another slice makes every rank raise, not only its node (the others would hang in the ring).
        yield from window_fence(self._comm, window, tag, start, count)
        if m == 1:  # one node: the node sum is the answer, stored everywhere while in cache (as `shm` does)
            sum_into(views, lo, hi, targets=range(k), polite=polite)
        else:
            scratch = self.scratch(tag, mine, max(1, BLOCK_BYTES // mine.itemsize)) if q > 1 else None
            sum_into(views, lo, hi, targets=[q], scratch=scratch, polite=polite)
            if hi > lo:
                shard = mine[lo:hi]
                need = ring_scratch_size(shard.size, m, shard.itemsize, self.pieces)
                yield from ring_schedule(self.cross_comm, shard, self.scratch(tag, shard, need), tag, self.pieces)
            copy_into(mine, views, lo, hi, polite)
        # Until every shard is stored everywhere, a peer may still write into this rank's buffer.
        yield from window_fence(self.node_comm, window, tag, start, count)

    def _reduce_bcast_schedule(self, buf, tag: int) -> Schedule:
        plan = self.pieces
        device = not is_host(buf)
        tree = plan.count(buf.size, buf.itemsize) * plan.capacity(buf.size, buf.itemsize) if device \
            else plan.scratch(buf.size, buf.itemsize)
        need = max(tree if self.local_size > 1 else 0,
                   ring_scratch_size(buf.size, self.num_nodes, buf.itemsize, plan, device))
        scratch = self.scratch(tag, buf, need)
        yield from tree_reduce_schedule(self.node_comm, buf, scratch, tag, plan)
        if self.is_leader:
            yield from ring_schedule(self.leader_comm, buf, scratch, tag, plan)
        yield from tree_bcast_schedule(self.node_comm, buf, tag)

    def describe(self) -> str:
        shape = (f"{self.num_nodes} node(s) x {self.local_size} ranks, sharded" if self.balanced
                 else f"{self.num_nodes} nodes of {self.node_sizes} ranks (unequal: reduce, leader ring, broadcast)")
        return f"{self.name}: {self.size} ranks on {shape}; {self.window_note}"
