"""Recursive doubling and Rabenseifner's algorithm, which share the non-power-of-two fold.

Both work on a power-of-two group of p' = 2^floor(log2 p) ranks. The
`rem = p - p'` extra ranks are folded in first, as in MPICH
(Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
communication operations in MPICH"): among the first 2·rem ranks each even
rank sends its whole vector to the odd rank above it and sits out; the odd
rank adds it. Afterwards the finished vector is sent back (fold-out).

Ranks inside the group are renumbered 0 .. p'-1 ("group rank");
`_world_rank` maps back.
"""
from __future__ import annotations

from hpcdl.comm.base import (DEFAULT_PIECES, Communicator, Pieces, Schedule, chunk_bounds, exchange, exchange_and_add,
                              is_host, receive, receive_and_add, send, send_in_pieces)


class _Fold:
    """The renumbering that folds p ranks into a power-of-two group."""

    def __init__(self, p: int, rank: int):
        self.group = 1 << (p.bit_length() - 1)
        self.rem = p - self.group
        self.rank = rank
        if rank < 2 * self.rem:
            self.group_rank = rank // 2 if rank % 2 else -1
        else:
            self.group_rank = rank - self.rem

    def world_rank(self, group_rank: int) -> int:
        return 2 * group_rank + 1 if group_rank < self.rem else group_rank + self.rem

    def fold_in(self, comm, buf, scratch, tag: int, plan: Pieces) -> Schedule:
        if self.rank >= 2 * self.rem:
            return
        if self.group_rank < 0:
            yield from send_in_pieces(comm, buf, self.rank + 1, tag, plan)
            return
        # lower rank's operand first, as in the group steps
        yield from receive_and_add(comm, buf, self.rank - 1, scratch, tag, plan, received_first=True)

    def fold_out(self, comm, buf, tag: int) -> Schedule:
        if self.rank >= 2 * self.rem:
            return
        if self.group_rank < 0:
            yield receive(comm, buf, self.rank + 1, tag)
        else:
            yield send(comm, buf, self.rank - 1, tag)


def recursive_doubling_schedule(comm, buf, scratch, tag: int, plan: Pieces = DEFAULT_PIECES) -> Schedule:
    """log2(p') exchanges of the whole vector with partner group_rank XOR 2^k.

    Bitwise agreement: after step k all ranks of an aligned block of 2^(k+1)
    group ranks hold the same bits, by induction. Each pair adds the lower
    block's sum and the upper block's sum in that order on both sides, so both
    partners perform the identical IEEE operation on identical operands. The
    folded-out ranks receive a copy.
    """
    fold = _Fold(comm.Get_size(), comm.Get_rank())
    yield from fold.fold_in(comm, buf, scratch, tag, plan)
    if fold.group_rank >= 0:
        mask = 1
        while mask < fold.group:
            partner = fold.world_rank(fold.group_rank ^ mask)
            # the vector is sent and added into at once: piece k is added only after it has gone
            yield from exchange_and_add(comm, buf, partner, buf, partner, scratch, tag, plan,
                                        received_first=partner < fold.rank, in_place=True)
            mask <<= 1
    yield from fold.fold_out(comm, buf, tag)


def rabenseifner_schedule(comm, buf, scratch, tag: int, plan: Pieces = DEFAULT_PIECES) -> Schedule:
    """Recursive-halving reduce-scatter, then recursive-doubling allgather.

    Rabenseifner (2004), "Optimization of collective reduction operations".
    The vector is cut into p' chunks (sizes differ by at most one element).
    In the halving phase each pair splits the chunk range it shares: the
    lower group rank keeps the lower half and sends the upper, and adds what
    it receives into the half it keeps, so after log2(p') steps group rank g
    holds the finished chunk g. The doubling phase then swaps ever larger
    finished blocks until everyone has all of them. Each rank moves
    2(p'-1)/p' · n elements in 2·log2(p') messages.

    Bitwise agreement: each element's partial sum at every step is formed on
    exactly one rank (the one keeping that half), and the allgather only
    copies, so all ranks end with the same bits.
    """
    fold = _Fold(comm.Get_size(), comm.Get_rank())
    yield from fold.fold_in(comm, buf, scratch, tag, plan)
    g = fold.group_rank
    if g >= 0:
        bounds = chunk_bounds(buf.size, fold.group)

        def elements(first_chunk: int, last_chunk: int):
            return buf[bounds[first_chunk]:bounds[last_chunk]]

        lo, hi = 0, fold.group
        mask = fold.group >> 1
        while mask:
            partner = fold.world_rank(g ^ mask)
            mid = (lo + hi) // 2
            (keep_lo, keep_hi), (give_lo, give_hi) = ((lo, mid), (mid, hi)) if not g & mask else ((mid, hi), (lo, mid))
            kept, given = elements(keep_lo, keep_hi), elements(give_lo, give_hi)
            # both partners see the same pair of halves, so they agree on the piece count
            yield from exchange_and_add(comm, given, partner, kept, partner, scratch, tag, plan)
            lo, hi = keep_lo, keep_hi
            mask >>= 1
        mask = 1
        while mask < fold.group:
            partner_g = g ^ mask
            mine = (g // mask) * mask
            theirs = (partner_g // mask) * mask
            yield exchange(comm, elements(mine, mine + mask), fold.world_rank(partner_g),
                           elements(theirs, theirs + mask), fold.world_rank(partner_g), tag)
            mask <<= 1
    yield from fold.fold_out(comm, buf, tag)


class RecursiveDoublingCommunicator(Communicator):
    """Latency-optimal (log2 p messages) but moves the full vector each step: for small buffers."""

    name = "recursive_doubling"

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        need = scratch_size(buf.size, buf.size, buf.itemsize, self.pieces, not is_host(buf))
        return recursive_doubling_schedule(self._comm, buf, self.scratch(tag, buf, need), tag, self.pieces)


class RabenseifnerCommunicator(Communicator):
    """Bandwidth-optimal like the ring with only 2·log2 p messages: for medium and large buffers."""

    name = "rabenseifner"

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        # The largest piece received: of the first half in the halving phase, or of the whole vector in a fold-in.
        largest = buf.size if self.size & (self.size - 1) else buf.size - buf.size // 2
        need = scratch_size(largest, buf.size, buf.itemsize, self.pieces, not is_host(buf))
        return rabenseifner_schedule(self._comm, buf, self.scratch(tag, buf, need), tag, self.pieces)


def scratch_size(largest: int, n: int, itemsize: int, plan: Pieces, device: bool) -> int:
    """Receive scratch for steps of up to `largest` elements (on the device: a slot per piece)."""
    if device:
        return plan.count(largest, itemsize) * plan.capacity(largest, itemsize)
    return plan.scratch(largest, itemsize)
