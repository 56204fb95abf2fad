"""MPI-3 shared windows: the node-local transport that `shm`, the ring and the hierarchical allreduce share.

On one node every byte MPI moves is a copy made by a rank's core, and MPI
has no receive-and-add: an incoming piece lands in a receive buffer, the
addition is a second pass, and each large message costs a rendezvous and a
`process_vm_readv` that pins the peer's pages. When the buffers themselves
live in a shared window (`MPI_Win_allocate_shared` on ranks that share
memory), a rank loads its peer's operand where it lies and adds it straight
into the result: no message carries data, only tiny synchronisation tokens.

This module holds what the algorithms built on that have in common:

* `NodeWindow`: one window, mapped into every rank of the node communicator;
* `WindowBuffers`: a communicator mixin whose `zeros(n)` returns memory in a
  new window, so the trainer can move its gradient arena there;
* `node_barrier` / `window_fence`: the synchronisation, tagged so several
  bucketed reductions can be in flight at once;
* `sum_into` / `copy_into`: the blocked kernels, with their NumPy reference
  `reference_sum` (the summation order every caller documents).

A window belongs to one MPI world: a shrink or regrow (`comm.fault_tolerance`)
replaces the world, so the trainer uses windows only with fault_tolerance =
abort, and never for device (GPU) buffers.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from hpcdl.comm.base import CountingComm, Schedule, mpi

# Elements per pass: the k inputs and the accumulator of one block stay in cache.
BLOCK_BYTES = 256 * 2**10


class NodeWindow:
    """An MPI-3 shared window of `nbytes` per rank on a node communicator, mapped into every rank.

    `view(q, dtype)` is rank q's whole segment as a 1-D array, readable and
    writable from this process. Collective over `node_comm` (construction and `free`).
    """

    def __init__(self, node_comm, nbytes: int):
        MPI = mpi()
        self.nbytes = int(nbytes)
        self.rank, self.size = node_comm.Get_rank(), node_comm.Get_size()
        # One byte at least: some MPI libraries return no base address for an empty segment.
        self.win = MPI.Win.Allocate_shared(max(self.nbytes, 1), 1, comm=node_comm)
        # A passive epoch held for the window's life: MPI_Win_sync is only valid inside one.
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._memory = [self.win.Shared_query(q)[0] for q in range(self.size)]
        self._views: dict = {}
        local = self.view(self.rank, np.uint8)
        self.base = local.__array_interface__["data"][0]

    def view(self, q: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (q, dtype.str)
        if key not in self._views:
            self._views[key] = np.frombuffer(self._memory[q], dtype=dtype, count=self.nbytes // dtype.itemsize)
        return self._views[key]

    def views(self, start: int, count: int, dtype) -> list[np.ndarray]:
        """Elements [start, start + count) of every rank's segment, in rank order."""
        return [self.view(q, dtype)[start:start + count] for q in range(self.size)]

    def offset_of(self, buf) -> int | None:
        """Element offset of `buf` in this rank's segment, or None when it lies (partly) outside."""
        if not isinstance(buf, np.ndarray):
            return None
        address = buf.__array_interface__["data"][0]
        start = address - self.base
        if start < 0 or start + buf.nbytes > self.nbytes or start % buf.itemsize:
            return None
        return start // buf.itemsize

    def sync(self) -> None:
        """MPI_Win_sync: this process's stores reach the window, and it sees its peers' (with a barrier)."""
        self.win.Sync()

    def free(self) -> None:
        self._views.clear()
        self._memory = []
        self.win.Unlock_all()
        self.win.Free()


def shares_memory(comm) -> bool:
    """Whether every rank of `comm` is on one node (collective over `comm`)."""
    MPI = mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    together = node.Get_size() == comm.Get_size()
    node.Free()
    return bool(comm.allreduce(int(together), op=MPI.MIN))


class WindowBuffers:
    """Mixin for a Communicator: `zeros(n)` allocates in a new shared window over `window_comm`.

    Subclasses call `use_windows(comm)` in their constructor with a
    CountingComm over ranks that share memory, or leave `window_comm` None
    for plain NumPy buffers.
    `window_of(buf)` finds the window and offset a buffer lies in, so a
    schedule can take the window path for it and the point-to-point path for
    anything else. Windows live as long as the communicator; `free()`
    releases them, after which their arrays must not be touched.
    """

    window_comm: CountingComm | None = None
    windows: tuple | list = ()

    def use_windows(self, window_comm: CountingComm) -> None:
        self.window_comm, self.windows = window_comm, []

    @property
    def shared_memory(self) -> bool:
        return self.window_comm is not None

    def zeros(self, n: int, dtype=np.float32) -> np.ndarray:
        """A zeroed 1-D array of n elements, in a new shared window when there is one (collective: same n)."""
        dtype = np.dtype(dtype)
        if self.window_comm is None or self.size == 1:
            return np.zeros(n, dtype=dtype)
        window = NodeWindow(self.window_comm.raw, n * dtype.itemsize)
        self.windows.append(window)
        buf = window.view(window.rank, dtype)[:n]
        buf.fill(0)
        return buf

    def window_of(self, buf) -> tuple[NodeWindow, int] | None:
        """(window, element offset) of a host buffer inside one of this communicator's windows, else None."""
        for window in self.windows:
            offset = window.offset_of(buf)
            if offset is not None:
                return window, offset
        return None

    def window_bytes(self) -> int:
        return sum(w.nbytes for w in self.windows)

    def free(self) -> None:
        """Release every window (collective). Arrays from `zeros` are invalid afterwards."""
        for window in self.windows:
            window.free()
        self.windows = []


def node_barrier(comm, tag: int, start: int, count: int) -> Schedule:
    """Dissemination barrier over `comm` with point-to-point messages tagged `tag`.

    In round j rank q sends to q + 2^j and receives from q - 2^j; after
    ceil(log2 k) rounds every rank has heard, transitively, from all
    (Hensgen, Finkel & Manber 1988). Within one barrier the sources differ in
    every round, and successive barriers with one tag match in order (MPI's
    non-overtaking rule). Each message carries (start, count, mismatch seen):
    the first round compares the left neighbour's slice with ours, and the
    flag spreads like the barrier itself, so either every rank raises or none does.
    """
    k, q = comm.Get_size(), comm.Get_rank()
    mine = np.array([start, count, 0], dtype=np.int64)
    seen = np.zeros(3, dtype=np.int64)
    distance, first = 1, True
    while distance < k:
        requests = [comm.Irecv(seen, (q - distance) % k, tag), comm.Isend(mine.copy(), (q + distance) % k, tag)]
        yield requests
        if first and (seen[0] != start or seen[1] != count):
            mine[2] = 1
        mine[2] |= seen[2]
        distance, first = distance << 1, False
    if mine[2]:
        raise RuntimeError(f"shared-window allreduce: ranks passed different slices of the shared window (rank {q}: "
                           f"offset {start}, {count} elements); every rank must reduce the same slice")


def window_fence(comm, window: NodeWindow, tag: int, start: int, count: int) -> Schedule:
    """Stores before it, on every rank, are visible to loads after it, on every rank: MPI-3's
    synchronisation of a shared window in the separate model (`MPI_Win_sync`, a barrier, `MPI_Win_sync`)."""
    window.sync()
    yield from node_barrier(comm, tag, start, count)
    window.sync()


def beside_compute() -> bool:
    """Whether this runs on a helper thread (the communication thread) while the main thread computes.

    Only then does yielding the core between blocks pay: on the main thread it would hand the core
    to another rank of an oversubscribed node and stretch the reduction (bucketed ResNet-50 set,
    4 ranks on 2 cores: 0.75x instead of 0.56x the per-tensor loop, measured with the earlier kernels).
    """
    return threading.current_thread() is not threading.main_thread()


def blocks(lo: int, hi: int, itemsize: int, polite: bool = False):
    """[s, e) blocks of `BLOCK_BYTES` covering [lo, hi); `polite` yields the core between them."""
    step = max(1, BLOCK_BYTES // itemsize)
    for s in range(lo, hi, step):
        yield s, min(hi, s + step)
        if polite and s + step < hi:
            # Let a thread that wants this core have it (the trainer's backward waking up, when this
            # runs on the communication thread): beside a sleeping backward the step lost 2.9 ms instead of 4.7 (p = 2).
            os.sched_yield()


def sum_into(inputs: list, lo: int, hi: int, targets, scratch: np.ndarray | None = None,
             polite: bool = False) -> None:
    """inputs[t][lo:hi] = ((inputs[0] + inputs[1]) + inputs[2]) + ... for every t in `targets`, in rank order.

    The caller owns [lo, hi) of every input exclusively until its closing
    fence, so the sum can accumulate in a target whose own value the first
    addition consumes (input 0 or 1); otherwise in `scratch` (one block).
    Each block is summed while the k operands are in cache and stored into
    the other targets from cache: every input byte is read once and every
    output byte written once.
    """
    k = len(inputs)
    targets = list(targets)
    if k == 1:
        return
    home = next((t for t in targets if t in (0, 1)), None)
    for s, e in blocks(lo, hi, inputs[0].itemsize, polite):
        acc = inputs[home][s:e] if home is not None else scratch[: e - s]
        np.add(inputs[0][s:e], inputs[1][s:e], out=acc)
        for j in range(2, k):
            np.add(acc, inputs[j][s:e], out=acc)
        for t in targets:
            if t != home:
                inputs[t][s:e] = acc


def copy_into(source: np.ndarray, destinations: list, lo: int, hi: int, polite: bool = False) -> None:
    """destination[lo:hi] = source[lo:hi] for every destination, block by block (each block read once)."""
    for s, e in blocks(lo, hi, source.itemsize, polite):
        for d in destinations:
            if d is not source:
                d[s:e] = source[s:e]


def reference_sum(contributions: list) -> np.ndarray:
    """`sum_into`'s result in plain NumPy: rank order, left to right."""
    total = contributions[0].copy()
    for c in contributions[1:]:
        total = total + c
    return total
