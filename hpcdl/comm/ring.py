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
"""
from __future__ import annotations

from hpcdl.comm.base import (Communicator, Schedule, chunk_bounds, exchange, exchange_and_add, piece_capacity,
                              pieces_for)


def ring_schedule(comm, buf, scratch, tag: int) -> Schedule:
    """In-place sum of `buf` over `comm` (any size >= 1); `scratch` holds `ring_scratch_size` elements.

    Bitwise agreement across ranks: every chunk's sum is formed by exactly
    one chain of additions, each on one rank, and the allgather phase only
    copies the finished bytes, so every rank ends with the same bits.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    bounds = chunk_bounds(buf.size, p)

    def chunk(i):
        return buf[bounds[i]:bounds[i + 1]]

    right, left = (r + 1) % p, (r - 1) % p
    pieces = ring_pieces(buf.size, p, buf.itemsize)
    # Reduce-scatter. At step s we pass on the partial sum of chunk r - s
    # (which has s + 1 contributions) and fold our own data into chunk r - s - 1.
    for s in range(p - 1):
        outgoing, target = chunk((r - s) % p), chunk((r - s - 1) % p)
        yield from exchange_and_add(comm, outgoing, right, target, left, scratch, tag, pieces)
    # Allgather: rank r now owns the finished chunk r + 1 and forwards what it last received.
    for s in range(p - 1):
        outgoing, target = chunk((r + 1 - s) % p), chunk((r - s) % p)
        yield exchange(comm, outgoing, right, target, left, tag)


def ring_pieces(n: int, p: int, itemsize: int) -> int:
    """Pieces per reduce-scatter step, from the largest chunk, which every rank knows."""
    return pieces_for(-(-n // p), itemsize)


def ring_scratch_size(n: int, p: int, itemsize: int) -> int:
    """Elements of the largest piece a reduce-scatter step receives."""
    return piece_capacity(-(-n // p), itemsize)


class RingCommunicator(Communicator):
    """Bandwidth-optimal for large buffers; see the module docstring."""

    name = "ring"

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        scratch = self.scratch(tag, buf, ring_scratch_size(buf.size, self.size, buf.itemsize))
        return ring_schedule(self._comm, buf, scratch, tag)
