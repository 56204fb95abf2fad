"""The communicator contract and the machinery every algorithm shares.

An algorithm is written once, as a *schedule*: a generator that posts
non-blocking point-to-point requests, yields them, and does its local
reduction when it is resumed after they complete. The same schedule then
serves two drivers:

* `allreduce(buf)` waits on each yielded step (blocking collective);
* `start(buf, tag=...)` returns a `Pending` that advances only when polled
  with `test()`, which lets the bucketed reducer keep several allreduces in
  flight during backward, polled from its hooks or by a communication thread.

Everything else (argument checks, the size-1 and size-0 fast paths, staging
of CuPy buffers through pinned host memory, the division for op="mean",
receive scratch) lives here, so an algorithm module holds only its
communication pattern.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Generator, Iterator

import numpy as np

from hpcdl.backend import array_module, synchronize
from hpcdl.errors import ConfigError

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
    """Post one receive and one send; the schedule yields the two requests.

    No device fence here: the communicator fences once when a reduction
    starts, and the schedules fence after their own device additions, once
    per step, before sending what those additions wrote.
    """
    return [comm.Irecv(recv, source, tag), comm.Isend(send, dest, tag)]


def send(comm, buf, dest: int, tag: int) -> list:
    return [comm.Isend(buf, dest, tag)]


def receive(comm, buf, source: int, tag: int) -> list:
    return [comm.Irecv(buf, source, tag)]


def _divide_in_place(buf, divisor: int) -> None:
    buf /= divisor


def chunk_bounds(n: int, parts: int) -> list[int]:
    """Offsets splitting n elements into `parts` nearly equal chunks (sizes differ by at most 1)."""
    return [n * i // parts for i in range(parts + 1)]


# -- pieces: how a reduce step is cut, and how many pieces are in flight --------------------

MIN_PIECE_BYTES = 64 * 2**10
MAX_PIECE_BYTES = 4 * 2**20
FALLBACK_CACHE_BYTES = 2 * 2**20


def cache_bytes() -> tuple[int, str]:
    """(bytes of one core's last private cache level, where the figure came from).

    Linux sysfs first (the L2 of cpu0, which the kernel reads from CPUID or
    the device tree), then glibc's sysconf, then a 2 MiB guess.
    """
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        best = None
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{base}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
            if level == 2 and kind in ("Unified", "Data"):
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                best = int(text.rstrip("KMG")) * scale
        if best:
            return best, "sysfs L2"
    except (OSError, ValueError):
        pass
    try:
        value = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        if value and value > 0:
            return int(value), "sysconf L2"
    except (ValueError, OSError, AttributeError):
        pass
    return FALLBACK_CACHE_BYTES, "guess"


def piece_bytes_for_cache(cache: int) -> int:
    """A quarter of the cache, as a power of two within [64 KiB, 4 MiB].

    While piece k is added, the piece being received, the one being added and
    its target stay resident, with room left for the neighbour's copy.
    """
    target = max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, cache // 4))
    return 1 << (target.bit_length() - 1)


@dataclass(frozen=True)
class Pieces:
    """How a reduce step is cut into pieces, and how many receives run ahead of the addition.

    Every rank must hold the same `Pieces`: senders and receivers cut the same
    chunk with it. The communicator agrees on it at construction (the smallest
    piece any rank asks for).

    depth = 1 is the old, unpipelined exchange: post piece k, wait, add, post
    k + 1. depth >= 2 posts every send of a step at once and keeps `depth`
    receives in flight, so piece k + 1 arrives while piece k is added.
    """

    bytes: int = 1 << 20
    depth: int = 2

    def count(self, elements: int, itemsize: int) -> int:
        """Pieces for a step of up to `elements` elements; depends only on numbers both sides know."""
        return max(1, -(-elements * itemsize // self.bytes))

    def capacity(self, elements: int, itemsize: int) -> int:
        """Elements that hold any one piece of a chunk of up to `elements` elements.

        A chunk of m elements is cut into ceil(m·itemsize / bytes) pieces, so
        no piece is longer than m or than bytes / itemsize (rounded up).
        """
        return min(elements, -(-self.bytes // itemsize))

    def scratch(self, elements: int, itemsize: int) -> int:
        """Receive scratch for reduce steps of up to `elements` elements: one slot per piece in flight."""
        return self.depth * self.capacity(elements, itemsize)


DEFAULT_PIECES = Pieces()


def _slots(scratch, depth: int, capacity: int) -> list:
    return [scratch[i * capacity:(i + 1) * capacity] for i in range(depth)]


def exchange_and_add(comm, outgoing, dest: int, target, source: int, scratch, tag: int, plan: Pieces,
                     received_first: bool = False, in_place: bool = False) -> Schedule:
    """Send `outgoing` to `dest` while adding what `source` sends into `target`, piece by piece, pipelined.

    The sender's `outgoing` and the receiver's `target` are the same stretch
    of the vector, so cutting both with `chunk_bounds(size, pieces)` makes
    every piece's send match its receive. All sends of the step go out at
    once; `plan.depth` receives are kept posted into the slots of `scratch`
    (`plan.scratch(...)` elements), so the next piece travels while this
    one is added. `in_place` (outgoing is target, as in recursive doubling)
    also waits for piece k's send before adding into it, since MPI forbids
    writing a buffer that is still being sent. On the device, every piece
    gets its own slot and one fence after the last addition covers them all.
    """
    add = adder(target)
    largest = max(outgoing.size, target.size)
    pieces = plan.count(largest, target.itemsize)
    device = not is_host(target)
    depth = pieces if device else max(1, min(plan.depth, pieces))
    capacity = plan.capacity(largest, target.itemsize)
    slots = _slots(scratch, depth, capacity)
    send_bounds = chunk_bounds(outgoing.size, pieces)
    recv_bounds = chunk_bounds(target.size, pieces)
    if depth == 1:  # the unpipelined exchange, kept for comparison (comm.pipeline_depth = 1)
        for k in range(pieces):
            piece = target[recv_bounds[k]:recv_bounds[k + 1]]
            incoming = slots[0][: piece.size]
            yield exchange(comm, outgoing[send_bounds[k]:send_bounds[k + 1]], dest, incoming, source, tag)
            _add(add, piece, incoming, received_first)
        return
    sends = [comm.Isend(outgoing[send_bounds[k]:send_bounds[k + 1]], dest, tag) for k in range(pieces)]
    recvs = [None] * pieces

    def post(k):
        size = recv_bounds[k + 1] - recv_bounds[k]
        recvs[k] = comm.Irecv(slots[k % depth][:size], source, tag)

    for k in range(min(depth, pieces)):
        post(k)
    for k in range(pieces):
        yield [recvs[k], sends[k]] if in_place else [recvs[k]]
        piece = target[recv_bounds[k]:recv_bounds[k + 1]]
        _add(add, piece, slots[k % depth][: piece.size], received_first)
        if k + depth < pieces:
            post(k + depth)
    if device:
        fence(target)
    yield sends


def _add(add, piece, incoming, received_first: bool) -> None:
    if received_first:
        add(incoming, piece, out=piece)
    else:
        add(piece, incoming, out=piece)


def send_in_pieces(comm, buf, dest: int, tag: int, plan: Pieces) -> Schedule:
    """The sending side of `receive_and_add`: every piece posted at once."""
    bounds = chunk_bounds(buf.size, plan.count(buf.size, buf.itemsize))
    yield [comm.Isend(buf[bounds[k]:bounds[k + 1]], dest, tag) for k in range(len(bounds) - 1)]


def receive_and_add(comm, target, source: int, scratch, tag: int, plan: Pieces, received_first: bool = False) -> Schedule:
    """Add what `source` sends (with `send_in_pieces`) into `target`, `plan.depth` pieces in flight.

    `received_first` puts the received operand on the left of the addition,
    for algorithms that keep the lower rank's data first.
    """
    add = adder(target)
    pieces = plan.count(target.size, target.itemsize)
    device = not is_host(target)
    depth = pieces if device else max(1, min(plan.depth, pieces))
    slots = _slots(scratch, depth, plan.capacity(target.size, target.itemsize))
    bounds = chunk_bounds(target.size, pieces)
    recvs = [None] * pieces

    def post(k):
        recvs[k] = comm.Irecv(slots[k % depth][: bounds[k + 1] - bounds[k]], source, tag)

    for k in range(min(depth, pieces)):
        post(k)
    for k in range(pieces):
        yield [recvs[k]]
        piece = target[bounds[k]:bounds[k + 1]]
        _add(add, piece, slots[k % depth][: piece.size], received_first)
        if k + depth < pieces:
            post(k + depth)
    if device:
        fence(target)


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
    MPI calls made by other Pendings); who makes them, backward's hooks or a
    communication thread, is the caller's choice (`hpcdl.comm.progress`).
    Not thread-safe: one thread at a time may drive a Pending.
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
        try:
            while not self.done and (not self._requests or Request.Testall(self._requests)):
                self._advance()
        except BaseException:
            self.abandon()
            raise
        return self.done

    def wait(self) -> None:
        Request = mpi().Request
        try:
            while not self.done:
                if self._requests:
                    Request.Waitall(self._requests)
                self._advance()
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Give up on this reduction (a peer failed): its requests go to `ABANDONED` for recovery
        to complete once the communicator is revoked (hpcdl.elastic.settle)."""
        if not self.done:
            ABANDONED.extend(self._requests)
            self._requests, self.done = [], True


# Requests of reductions given up after an MPI error: recovery settles them before reusing buffers.
ABANDONED: list = []


# -- bytes on the wire ------------------------------------------------------------

class Traffic:
    """Bytes this rank's point-to-point calls sent and received (posted, whether or not yet complete)."""

    __slots__ = ("sent", "received")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sent = 0
        self.received = 0

    def as_dict(self) -> dict:
        return {"sent": self.sent, "received": self.received}


class CountingComm:
    """An mpi4py communicator whose Isend/Irecv add their sizes to a shared `Traffic`.

    Everything else is passed through, so the schedules need not know. Sub-
    communicators made from it are wrapped again by whoever splits them.
    """

    __slots__ = ("raw", "traffic")

    def __init__(self, raw, traffic: Traffic):
        self.raw, self.traffic = raw, traffic

    def Isend(self, buf, dest: int, tag: int):
        self.traffic.sent += buf.nbytes
        return self.raw.Isend(buf, dest, tag)

    def Irecv(self, buf, source: int, tag: int):
        self.traffic.received += buf.nbytes
        return self.raw.Irecv(buf, source, tag)

    def __getattr__(self, name):
        return getattr(self.raw, name)


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
    # A fault drill armed by the trainer (hpcdl.faults.KillInSchedule); None outside drills.
    fault = None

    def __init__(self, mpi_comm=None, piece_kb: int | None = None, pipeline_depth: int | None = None):
        MPI = mpi()
        self.mpi_comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi_comm.Get_rank()
        self.size = self.mpi_comm.Get_size()
        self.traffic = Traffic()
        raw = self.mpi_comm.Dup() if self.size > 1 else self.mpi_comm
        self._comm = CountingComm(raw, self.traffic)
        self.tag_ub = int(raw.Get_attr(MPI.TAG_UB) or 32767)
        self.pieces, self.pieces_from = self._agree_on_pieces(piece_kb, pipeline_depth)
        self._scratch: dict = {}
        self._staging: dict = {}

    def _agree_on_pieces(self, piece_kb, pipeline_depth) -> tuple[Pieces, str]:
        """The piece size and depth every rank uses: the smallest any rank asks for (collective)."""
        if pipeline_depth is not None and int(pipeline_depth) < 1:
            raise ConfigError(f"comm.pipeline_depth must be >= 1, got {pipeline_depth}")
        if piece_kb:
            wanted, source = int(piece_kb) * 2**10, "comm.piece_kb"
            if wanted < 1:
                raise ConfigError(f"comm.piece_kb must be positive, got {piece_kb}")
        else:
            cache, where = cache_bytes()
            wanted, source = piece_bytes_for_cache(cache), f"{where} {cache // 2**10} KiB / 4"
        depth = int(pipeline_depth or DEFAULT_PIECES.depth)
        if self.size > 1:
            mine = (wanted, depth)
            everyone = self._comm.allgather(mine)
            wanted, depth = min(w for w, _ in everyone), min(d for _, d in everyone)
            if len(set(everyone)) > 1:
                source += ", smallest over ranks"
        return Pieces(wanted, depth), source

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
            return Pending(self._steps(buf, tag, blocking), finish)

        from hpcdl.comm import gpu

        if gpu.cuda_aware():
            # Once per reduction: backward's kernels that wrote `buf` must be done before MPI
            # reads it. Later fences come only after the schedule's own additions (per step).
            fence(buf)
            return Pending(self._steps(buf, tag, blocking), finish)
        host = self._pinned(tag, buf)
        gpu.download(buf, host)

        def upload_then_finish():
            gpu.upload(host, buf)
            if finish is not None:
                finish()

        return Pending(self._steps(host, tag, blocking), upload_then_finish)

    def _steps(self, buf, tag: int, blocking: bool) -> Schedule:
        steps = self._schedule(buf, tag, blocking)
        if self.fault is None:
            return steps
        fault, self.fault = self.fault, None  # fires once
        return fault.wrap(steps, blocking)

    def _mean_finisher(self, buf) -> Callable[[], None]:
        # One division at the end, of bits that are already identical on every rank.
        return lambda: _divide_in_place(buf, self.size)

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        raise NotImplementedError

    # -- buffers ----------------------------------------------------------------------
    # Whether `zeros` returns memory the peers on this node read directly (`hpcdl.comm.shm`).
    shared_memory = False

    def zeros(self, n: int, dtype=np.float32):
        """A zeroed 1-D host array of n elements that this communicator reduces fastest.

        Collective where `shared_memory` is true (a new shared window). Here, plain NumPy.
        """
        return np.zeros(n, dtype=dtype)

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
        return f"{self.name}: {self.size} ranks, pieces of {self.pieces.bytes // 2**10} KiB ({self.pieces_from}), {self.pieces.depth} in flight"

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"
