"""Ring allreduce: reduce-scatter then allgather around a ring of ranks.

Patarasuk & Yuan (2009), "Bandwidth optimal all-reduce algorithms for
clusters of workstations"; baidu-research/baidu-allreduce made it the
standard for data-parallel training. The buffer is cut into p chunks. In
p - 1 reduce-scatter steps every rank sends one chunk to its right neighbour,
receives one from its left and adds it into its own copy; afterwards rank r
holds the complete sum of chunk (r + 1) mod p. In p - 1 allgather steps the
finished chunks travel once more around the ring. Each rank sends and
receives 2(p - 1)/p · n elements in total, whatever p is: bandwidth-optimal,
at the price of 2(p - 1) message latencies.

With `shared_window=True` and every rank on one node, buffers from
`zeros(n)` live in an MPI-3 shared window (`hpcdl.comm.window`) and the
ring's links become loads: in reduce-scatter step s a rank adds its left
neighbour's partial chunk straight out of the neighbour's segment, once a
16-byte token says that chunk is ready, so no message carries data and
nothing lands in a receive buffer first. The schedule and the order of
every addition are the point-to-point ring's, so the bits are too. This is
the ring over a shared-memory transport, as NCCL runs its ring over SHM or
P2P links inside a node. Other buffers, and rings that span nodes, take
the point-to-point path (per-link transports on a multi-node ring are not
done: `hierarchical` with `shared_window` is the multi-node algorithm).
"""
from __future__ import annotations

import numpy as np

from hpcdl.comm.base import (DEFAULT_PIECES, Communicator, Pieces, Schedule, adder, chunk_bounds,
                             fence, is_host)
from hpcdl.comm.window import NodeWindow, WindowBuffers, beside_compute, blocks, copy_into, shares_memory, window_fence


def ring_schedule(comm, buf, scratch, tag: int, plan: Pieces = DEFAULT_PIECES) -> Schedule:
    """In-place sum of `buf` over `comm`: `ring_reduce_scatter` then `ring_allgather`."""
    yield from ring_reduce_scatter(comm, buf, scratch, tag, plan)
    yield from ring_allgather(comm, buf, tag, plan)


def ring_chunk(n: int, p: int, r: int) -> tuple[int, int]:
    """[start, end) of the chunk rank r holds finished after `ring_reduce_scatter` of n elements over p ranks."""
    bounds = chunk_bounds(n, p)
    c = (r + 1) % p
    return bounds[c], bounds[c + 1]


def _piece_view(buf, p: int, plan: Pieces, pieces: int | None = None):
    bounds = chunk_bounds(buf.size, p)
    pieces = pieces or plan.count(-(-buf.size // p), buf.itemsize)
    piece_bounds = [chunk_bounds(bounds[i + 1] - bounds[i], pieces) for i in range(p)]

    def piece(c: int, k: int):
        c %= p
        return buf[bounds[c] + piece_bounds[c][k]:bounds[c] + piece_bounds[c][k + 1]]

    return piece, pieces


def ring_allgather(comm, buf, tag: int, plan: Pieces = DEFAULT_PIECES) -> Schedule:
    """Rank r owns the finished chunk r + 1 (see `ring_chunk`); afterwards every rank has all of them.

    Each piece is forwarded the moment it arrives, so the p - 1 steps overlap.
    Nothing is added here, so pieces buy only that forwarding: with p = 2
    there is none, and one message per chunk lets MPI copy it in one go
    (7.5 vs 8.8 ms for 50 MiB on the development host).
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    piece, pieces = _piece_view(buf, p, plan, 1 if p == 2 else None)
    right, left = (r + 1) % p, (r - 1) % p
    gather = [(s, k) for s in range(p - 1) for k in range(pieces)]
    recvs = [comm.Irecv(piece(r - s, k), left, tag) for s, k in gather]
    sends = [comm.Isend(piece(r + 1, k), right, tag) for k in range(pieces)]
    for i, (s, k) in enumerate(gather):
        if s + 1 < p - 1:
            yield [recvs[i]]
            sends.append(comm.Isend(piece(r - s, k), right, tag))
    yield recvs + sends


def ring_reduce_scatter(comm, buf, scratch, tag: int, plan: Pieces = DEFAULT_PIECES) -> Schedule:
    """Afterwards rank r holds the sum over `comm` of its `ring_chunk`; `scratch`: `ring_scratch_size` elements.

    Pipelined as in NCCL's ring: every chunk is cut into the same number of
    pieces, and a piece's partial sum is passed on to the right as soon as it
    has been added, without waiting for the rest of its chunk, so all p - 1
    reduce-scatter steps form one stream of pieces with `plan.depth`
    receives posted ahead.

    Bitwise agreement across ranks: every chunk's sum is formed by exactly
    one chain of additions, each on one rank, and the allgather phase only
    copies the finished bytes, so every rank ends with the same bits.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    largest = -(-buf.size // p)
    piece, pieces = _piece_view(buf, p, plan)
    right, left = (r + 1) % p, (r - 1) % p
    add = adder(buf)
    device = not is_host(buf)
    # Receives in (step, piece) order; MPI's non-overtaking rule matches them with the
    # left neighbour's sends, which go out in the same order.
    order = [(s, k) for s in range(p - 1) for k in range(pieces)]
    # On the device each step gets its own slots and one fence before its sums go out:
    # a slot must not be received into while an addition kernel may still read it.
    depth = pieces if device else max(1, min(plan.depth, len(order)))
    capacity = plan.capacity(largest, buf.itemsize)
    slots = [scratch[i * capacity:(i + 1) * capacity] for i in range(depth)]
    pipelined = plan.depth > 1 or device
    sends = [comm.Isend(piece(r, k), right, tag) for k in range(pieces)] if pipelined else []
    recvs = [None] * len(order)

    def post(i: int):
        s, k = order[i]
        size = piece(r - s - 1, k).size
        recvs[i] = comm.Irecv(slots[i % depth][:size], left, tag)

    if not pipelined:
        # Unpipelined, for comparison (comm.pipeline_depth = 1): post one piece each way,
        # wait for both, add, next piece; a step's sums go out only when the step is done.
        for s in range(p - 1):
            for k in range(pieces):
                target = piece(r - s - 1, k)
                incoming = slots[0][:target.size]
                yield [comm.Irecv(incoming, left, tag), comm.Isend(piece(r - s, k), right, tag)]
                add(target, incoming, out=target)
    else:
        for i in range(min(depth, len(order))):
            post(i)
        for i, (s, k) in enumerate(order):
            yield [recvs[i]]
            target = piece(r - s - 1, k)
            add(target, slots[i % depth][:target.size], out=target)
            if device and k == pieces - 1:
                fence(buf)
                if s + 1 < p - 1:
                    sends += [comm.Isend(piece(r - s - 1, j), right, tag) for j in range(pieces)]
            elif not device and s + 1 < p - 1:
                sends.append(comm.Isend(target, right, tag))
            if i + depth < len(order) and (not device or k == pieces - 1):
                if device:  # the next step's receives, all at once into the freed slots
                    for j in range(i + 1, min(i + 1 + pieces, len(order))):
                        post(j)
                else:
                    post(i + depth)
    # Later phases write into chunks this rank sent: those sends must be complete.
    yield sends


def ring_scratch_size(n: int, p: int, itemsize: int, plan: Pieces = DEFAULT_PIECES, device: bool = False) -> int:
    """Elements of receive scratch the ring needs for n elements over p ranks."""
    largest = -(-n // p)
    if device:
        return plan.count(largest, itemsize) * plan.capacity(largest, itemsize)
    return plan.scratch(largest, itemsize)


def ring_window_schedule(comm, window: NodeWindow, start: int, count: int, dtype, tag: int,
                         polite: bool = False) -> Schedule:
    """The ring over a shared window: elements [start, start + count) of every rank's segment, summed in place.

    Reduce-scatter: in step s rank r adds chunk (r - s - 1) of its left
    neighbour's segment into its own, as the point-to-point ring adds the
    received piece (same operands, same order), after the left neighbour's
    token for step s - 1; its own token for step s then tells the right
    neighbour that this chunk is ready. Only the right neighbour ever reads a
    rank's partial chunk, and every chunk is added into once per rank, so
    nothing a neighbour reads changes under it before the fence. Allgather: after a fence every rank copies each finished chunk
    from its owner (`ring_chunk`); forwarding them around the ring would only
    copy every chunk p - 2 more times. A last fence keeps any rank from
    writing its buffer while a peer still copies from it.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    views = window.views(start, count, dtype)
    bounds = chunk_bounds(count, p)
    left, right = (r - 1) % p, (r + 1) % p
    mine, theirs = views[r], views[left]
    polite = polite and beside_compute()
    token = np.array([start, count], dtype=np.int64)
    heard = np.zeros(2, dtype=np.int64)
    yield from window_fence(comm, window, tag, start, count)  # everyone's inputs are written
    sends = []
    for s in range(p - 1):
        if s:
            yield [comm.Irecv(heard, left, tag)]
            window.sync()
        c = (r - s - 1) % p
        for lo, hi in blocks(bounds[c], bounds[c + 1], mine.itemsize, polite):
            np.add(mine[lo:hi], theirs[lo:hi], out=mine[lo:hi])
        if s + 1 < p - 1:
            window.sync()
            sends.append(comm.Isend(token, right, tag))
    if sends:
        yield sends
    yield from window_fence(comm, window, tag, start, count)  # every chunk is final at its owner
    for owner in range(p):
        if owner != r:
            c = (owner + 1) % p
            copy_into(views[owner], [mine], bounds[c], bounds[c + 1], polite)
    yield from window_fence(comm, window, tag, start, count)


class RingCommunicator(WindowBuffers, Communicator):
    """Bandwidth-optimal for large buffers; see the module docstring.

    `shared_window=True`: when all ranks share one node, `zeros` returns
    shared-window memory and reductions of it run `ring_window_schedule`.
    """

    name = "ring"

    def __init__(self, mpi_comm=None, piece_kb: int | None = None, pipeline_depth: int | None = None,
                 shared_window: bool = False):
        super().__init__(mpi_comm, piece_kb=piece_kb, pipeline_depth=pipeline_depth)
        self.window_note = "point-to-point"
        if shared_window and self.size > 1:
            if shares_memory(self._comm.raw):
                self.use_windows(self._comm)
                self.window_note = "on-node links through a shared window"
            else:
                self.window_note = "point-to-point (the ranks span nodes, so no shared window)"

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        found = self.window_of(buf) if is_host(buf) else None
        if found is not None:
            window, start = found
            return ring_window_schedule(self._comm, window, start, buf.size, buf.dtype, tag, polite=not blocking)
        need = ring_scratch_size(buf.size, self.size, buf.itemsize, self.pieces, not is_host(buf))
        return ring_schedule(self._comm, buf, self.scratch(tag, buf, need), tag, self.pieces)

    def describe(self) -> str:
        return f"{super().describe()}; {self.window_note}"
