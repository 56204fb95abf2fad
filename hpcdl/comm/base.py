"""The communicator contract and the machinery every algorithm shares.

An algorithm is written once, as a *schedule*: a generator that posts
non-blocking point-to-point requests, yields them, and does its local
reduction when it is resumed after they complete. The same schedule then
serves two drivers:

* `allreduce(buf)` waits on each yielded step (blocking collective);
* `start(buf, tag=...)` returns a `Pending` that advances only when polled
  with `test()`, which lets the bucketed reducer keep several allreduces in
  flight during backward without a progress thread.

Everything else (argument checks, the size-1 and size-0 fast paths, staging
of CuPy buffers through pinned host memory, the division for op="mean",
receive scratch) lives here, so an algorithm module holds only its
communication pattern.
"""
from __future__ import annotations

from typing import Callable, Generator, Iterator

import numpy as np

from hpcdl.backend import array_module, synchronize

# Tag 0 carries blocking allreduces; start() callers use 1 ... tag_ub so that
# several non-blocking reductions can be in flight without their messages
# matching each other's receives.
BLOCKING_TAG = 0
OPS = ("sum", "mean")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

Schedule = Generator[list, None, None]


def mpi():
    """mpi4py.MPI, imported on first use (importing it initialises MPI)."""
    from mpi4py import MPI

    return MPI


# -- helpers the algorithm schedules share ------------------------------------

def is_host(buf) -> bool:
    return isinstance(buf, np.ndarray)


def fence(buf) -> None:
    """Make device work on the current stream visible before MPI touches memory.

    Kernels run asynchronously; MPI reads and writes device memory outside the
    stream, so every posted send or receive must be preceded by a sync.
    """
    if not is_host(buf):
        synchronize(buf)


def adder(buf) -> Callable:
    """`add(a, b, out=)` for the array module that owns `buf`."""
    return np.add if is_host(buf) else array_module(buf).add


def exchange(comm, send, dest: int, recv, source: int, tag: int) -> list:
    """Post one receive and one send; the schedule yields the two requests."""
    fence(send)
    return [comm.Irecv(recv, source, tag), comm.Isend(send, dest, tag)]


def send(comm, buf, dest: int, tag: int) -> list:
    fence(buf)
    return [comm.Isend(buf, dest, tag)]


def receive(comm, buf, source: int, tag: int) -> list:
    fence(buf)
    return [comm.Irecv(buf, source, tag)]


def _divide_in_place(buf, divisor: int) -> None:
    buf /= divisor


def chunk_bounds(n: int, parts: int) -> list[int]:
    """Offsets splitting n elements into `parts` nearly equal chunks (sizes differ by at most 1)."""
    return [n * i // parts for i in range(parts + 1)]


# Reduce-scatter steps receive and add in pieces of about this many bytes, so
# each received piece is added while it is still in cache instead of
# streaming a chunk-sized scratch buffer through memory twice. On the 2-core
# development host (MPICH 5.0, shared memory) this took the 2-rank ring at
# 100 MiB from 17.5 ms to 11.4 ms; 256 KiB and 4 MiB pieces were within 7 %.
REDUCE_PIECE_BYTES = 1 << 20


def pieces_for(largest_chunk: int, itemsize: int) -> int:
    """How many pieces a reduce step of up to `largest_chunk` elements is cut into.

    Sender and receiver must agree on it, so it depends only on numbers both know.
    """
    return max(1, -(-largest_chunk * itemsize // REDUCE_PIECE_BYTES))


def piece_capacity(largest_chunk: int, itemsize: int) -> int:
    """Scratch elements that hold any piece of a chunk of up to `largest_chunk` elements.

    A chunk of m elements is cut into ceil(m·itemsize / REDUCE_PIECE_BYTES)
    pieces, so no piece is longer than m or than REDUCE_PIECE_BYTES / itemsize
    (rounded up), whatever m is.
    """
    return min(largest_chunk, -(-REDUCE_PIECE_BYTES // itemsize))


def exchange_and_add(comm, outgoing, dest: int, target, source: int, scratch, tag: int, pieces: int) -> Schedule:
    """Send `outgoing` to `dest` while adding what `source` sends into `target`, piece by piece.

    The sender's `outgoing` and the receiver's `target` are the same chunk of
    the vector, so cutting both with `chunk_bounds(size, pieces)` makes every
    piece's send match its receive. `scratch` holds one piece.
    """
    add = adder(target)
    send_bounds = chunk_bounds(outgoing.size, pieces)
    recv_bounds = chunk_bounds(target.size, pieces)
    for k in range(pieces):
        piece = target[recv_bounds[k]:recv_bounds[k + 1]]
        incoming = scratch[: piece.size]
        yield exchange(comm, outgoing[send_bounds[k]:send_bounds[k + 1]], dest, incoming, source, tag)
        add(piece, incoming, out=piece)


def send_in_pieces(comm, buf, dest: int, tag: int, pieces: int) -> Schedule:
    """The sending side of `receive_and_add`."""
    bounds = chunk_bounds(buf.size, pieces)
    for k in range(pieces):
        yield send(comm, buf[bounds[k]:bounds[k + 1]], dest, tag)


def receive_and_add(comm, target, source: int, scratch, tag: int, pieces: int, received_first: bool = False) -> Schedule:
    """Add what `source` sends (with `send_in_pieces`) into `target`, piece by piece.

    `received_first` puts the received operand on the left of the addition,
    for algorithms that keep the lower rank's data first.
    """
    add = adder(target)
    bounds = chunk_bounds(target.size, pieces)
    for k in range(pieces):
        piece = target[bounds[k]:bounds[k + 1]]
        incoming = scratch[: piece.size]
        yield receive(comm, incoming, source, tag)
        if received_first:
            add(incoming, piece, out=piece)
        else:
            add(piece, incoming, out=piece)


def check_buffer(buf, op: str) -> None:
    if op not in OPS:
        raise ValueError(f"allreduce op must be one of {OPS}, got {op!r}")
    if getattr(buf, "ndim", None) != 1:
        raise ValueError(f"allreduce needs a 1-D array, got {type(buf).__name__} with shape {getattr(buf, 'shape', '?')}")
    if buf.dtype not in DTYPES:
        raise TypeError(f"allreduce supports float32 and float64, got {buf.dtype}")
    if not buf.flags.c_contiguous:
        raise ValueError("allreduce needs a contiguous array (a strided view cannot be sent in place)")


# -- a reduction in progress ---------------------------------------------------

class Pending:
    """A reduction that moves forward when polled.

    `test()` never blocks: it advances through every step whose requests
    have completed and reports whether the whole reduction is done. `wait()`
    blocks until it is. Progress happens only inside these calls (and inside
    MPI calls made by other Pendings), by design: no helper thread competes
    with backward for the cores.
    """

    __slots__ = ("_steps", "_requests", "_on_done", "done")

    def __init__(self, steps: Iterator[list] | None, on_done: Callable[[], None] | None = None):
        self._steps = steps
        self._on_done = on_done
        self._requests: list = []
        self.done = steps is None
        if self.done:
            self._complete()
        else:
            self._advance()

    def _advance(self) -> None:
        try:
            self._requests = next(self._steps)
            return
        except StopIteration:
            pass
        self._requests = []
        self.done = True
        self._complete()

    def _complete(self) -> None:
        if self._on_done is not None:
            self._on_done()
            self._on_done = None

    def test(self) -> bool:
        Request = mpi().Request
        while not self.done and (not self._requests or Request.Testall(self._requests)):
            self._advance()
        return self.done

    def wait(self) -> None:
        Request = mpi().Request
        while not self.done:
            if self._requests:
                Request.Waitall(self._requests)
            self._advance()


# -- the base class -------------------------------------------------------------

class Communicator:
    """Allreduce, broadcast and gathers over one MPI communicator.

    Subclasses set `name` and implement `_schedule(buf, tag, blocking)`: the
    in-place *sum* of a contiguous, non-empty buffer over a world of two or
    more ranks. Everything around it is done here.

    The algorithms talk on a private duplicate of `mpi_comm`, so their
    point-to-point messages can never match a receive posted by other code on
    the user's communicator.
    """

    name = "base"

    def __init__(self, mpi_comm=None):
        MPI = mpi()
        self.mpi_comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi_comm.Get_rank()
        self.size = self.mpi_comm.Get_size()
        self._comm = self.mpi_comm.Dup() if self.size > 1 else self.mpi_comm
        self.tag_ub = int(self._comm.Get_attr(MPI.TAG_UB) or 32767)
        self._scratch: dict = {}
        self._staging: dict = {}

    # -- reductions --------------------------------------------------------------
    def allreduce(self, buf, op: str = "sum"):
        """Sum (or mean) `buf` over all ranks, in place; returns `buf`.

        Every rank must call it with the same size and dtype. Results are
        bitwise identical on every rank (each algorithm's docstring says why).
        """
        self._begin(buf, op, BLOCKING_TAG, blocking=True).wait()
        return buf

    def start(self, buf, op: str = "sum", tag: int = 1) -> Pending:
        """Begin a non-blocking in-place allreduce; poll or wait on the result.

        Concurrent reductions on one communicator need distinct tags in
        1 ... `tag_ub`, the same on every rank; reductions that use MPI
        collectives underneath (`native`) must also be started in the same
        order on every rank.
        """
        if not 0 < tag <= self.tag_ub:
            raise ValueError(f"tag must be in 1..{self.tag_ub}, got {tag}")
        return self._begin(buf, op, tag, blocking=False)

    def _begin(self, buf, op: str, tag: int, blocking: bool) -> Pending:
        check_buffer(buf, op)
        if self.size == 1 or buf.size == 0:
            return Pending(None)  # the sum over one rank is the buffer itself; mean divides by 1
        return self._start_checked(buf, op, tag, blocking)

    def _start_checked(self, buf, op: str, tag: int, blocking: bool) -> Pending:
        finish = self._mean_finisher(buf) if op == "mean" else None
        if is_host(buf):
            return Pending(self._schedule(buf, tag, blocking), finish)

        from hpcdl.comm import gpu

        if gpu.cuda_aware():
            return Pending(self._schedule(buf, tag, blocking), finish)
        host = self._pinned(tag, buf)
        gpu.download(buf, host)

        def upload_then_finish():
            gpu.upload(host, buf)
            if finish is not None:
                finish()

        return Pending(self._schedule(host, tag, blocking), upload_then_finish)

    def _mean_finisher(self, buf) -> Callable[[], None]:
        # One division at the end, of bits that are already identical on every rank.
        return lambda: _divide_in_place(buf, self.size)

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        raise NotImplementedError

    # -- buffers reused between calls -----------------------------------------------
    def scratch(self, tag: int, like, n: int):
        """A reusable receive buffer of n elements, one per (tag, dtype, array module).

        Grown, never shrunk: steady-state training allocates nothing per step.
        """
        key = (tag, like.dtype.str, is_host(like))
        have = self._scratch.get(key)
        if have is None or have.size < n:
            have = array_module(like).empty(max(n, 1), dtype=like.dtype)
            self._scratch[key] = have
        return have[:n]

    def _pinned(self, tag: int, like):
        key = (tag, like.dtype.str)
        have = self._staging.get(key)
        if have is None or have.size < like.size:
            from hpcdl.comm import gpu

            have = gpu.pinned_empty(like.size, like.dtype)
            self._staging[key] = have
        return have[: like.size]

    # -- other collectives ----------------------------------------------------------
    def barrier(self) -> None:
        self._comm.Barrier()

    def bcast(self, buf, root: int = 0):
        """Broadcast an array from `root` into `buf` on every rank, in place; returns `buf`."""
        if self.size == 1:
            return buf
        if is_host(buf):
            self._comm.Bcast(buf, root=root)
            return buf
        from hpcdl.comm import gpu

        if gpu.cuda_aware():
            fence(buf)
            self._comm.Bcast(buf, root=root)
            return buf
        flat = buf.reshape(-1)
        host = self._pinned(BLOCKING_TAG, flat)
        if self.rank == root:
            gpu.download(flat, host)
        self._comm.Bcast(host, root=root)
        if self.rank != root:
            gpu.upload(host, flat)
        return buf

    def allgather_obj(self, obj) -> list:
        """Any picklable object from every rank, in rank order (for small metadata only)."""
        return self._comm.allgather(obj)

    def describe(self) -> str:
        return f"{self.name}: {self.size} ranks"

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"
