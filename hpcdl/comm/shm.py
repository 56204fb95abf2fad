"""Node-local allreduce through an MPI-3 shared-memory window: ranks read each other's buffers directly.

On one node every byte MPI moves is a copy performed by a rank's core: a
point-to-point ring at p = 2 copies half the buffer into the peer's scratch,
adds it in a second pass, and copies the finished half back, about 3n bytes
through memory per rank. When the buffer itself lives in a shared window
(`MPI_Win_allocate_shared` on the communicator from
`MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`), no message is needed:

1. every rank sums shard q of all k ranks' buffers, reading them in place,
   into shard q of its own buffer (reduce-scatter: reads n, writes n/k);
2. every rank copies the other finished shards out of their owners' buffers
   (allgather: reads and writes (k-1)/k·n).

At p = 2 that is 2.5n-3n bytes of memory traffic per rank, counting the
write-allocate read of a store to an uncached line: the same as a memcpy of
n (read, write-allocate, write), which no allreduce that must read both
operands can beat by much (docs/comm.md). The three synchronisation points
(everyone's data is ready; every shard is reduced; every copy is done, so a
buffer may be written again) are `MPI_Win_sync` plus a dissemination
barrier (Hensgen, Finkel & Manber 1988) of tiny point-to-point messages
carrying the caller's tag, so several bucketed reductions can be in flight
at once without their barriers matching each other. The messages also carry
the slice's offset and length: a rank that passed a different slice makes
every rank raise, not hang.

Exactness: each shard's sum is formed once, by its owner, in rank order
(((b0 + b1) + b2) + ...), and the other ranks copy those bytes, so every rank
ends with identical bits; `reference_sum` is the same order in plain NumPy.

The fast path needs the buffer inside a window this communicator allocated
(`zeros`), at the same offset on every rank: the trainer moves its gradient
arena there (`Arena.rehome_grads`). Any other buffer takes the point-to-point
ring. A window belongs to one MPI world, so `comm.fault_tolerance` = shrink or
regrow refuses this algorithm (the trainer checks).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from hpcdl.comm.base import Communicator, CountingComm, Schedule, chunk_bounds, is_host, mpi
from hpcdl.comm.ring import ring_schedule, ring_scratch_size
from hpcdl.errors import ConfigError

# Elements summed per pass when k > 2: the k inputs and the accumulator of one block stay in cache.
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


def node_barrier(comm, tag: int, start: int, count: int) -> Schedule:
    """Dissemination barrier over `comm` with point-to-point messages tagged `tag`.

    In round j rank q sends to q + 2^j and receives from q - 2^j; after
    ceil(log2 k) rounds every rank has heard, transitively, from all. Within
    one barrier the sources differ in every round, and successive barriers
    with one tag match in order (MPI's non-overtaking rule). Each message
    carries (start, count, mismatch seen): the first round compares the left
    neighbour's slice with ours, and the flag spreads like the barrier itself,
    so either every rank raises or none does.
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
        raise RuntimeError(f"shm allreduce: ranks passed different slices of the shared window (rank {q}: offset "
                           f"{start}, {count} elements); every rank must reduce the same slice")


def _beside_compute() -> bool:
    """Whether this runs on a helper thread (the communication thread) while the main thread computes.

    Only then does yielding the core between blocks pay: on the main thread it would hand the core
    to another rank of an oversubscribed node and stretch the reduction (bucketed ResNet-50 set,
    4 ranks on 2 cores: 0.75x instead of 0.56x the per-tensor loop).
    """
    return threading.current_thread() is not threading.main_thread()


def _blocks(lo: int, hi: int, block: int | None, polite: bool = True):
    if not block:
        yield lo, hi
        return
    for s in range(lo, hi, block):
        yield s, min(hi, s + block)
        if polite and s + block < hi:
            # Let a thread that wants this core have it (the trainer's backward waking up, when this
            # runs on the communication thread): beside a sleeping backward the step lost 2.9 ms instead of 4.7 (p = 2).
            os.sched_yield()


def reduce_shard(inputs: list, out: np.ndarray, lo: int, hi: int, scratch: np.ndarray | None,
                 polite: bool = False) -> None:
    """out[lo:hi] = ((inputs[0] + inputs[1]) + inputs[2]) + ... over [lo, hi), in rank order.

    `out` is one of `inputs` (the owner's own buffer). When it is the first or
    second, the accumulation can run in it directly; otherwise its original
    values are still needed, so blocks accumulate in `scratch` and are copied in.
    `polite` works in blocks and yields the core between them.
    """
    k = len(inputs)
    if k == 1:
        return
    block = max(1, BLOCK_BYTES // out.itemsize)
    if k == 2:
        for s, e in _blocks(lo, hi, block if polite else None):
            np.add(inputs[0][s:e], inputs[1][s:e], out=out[s:e])
        return
    in_place = out is inputs[0] or out is inputs[1]
    for s, e in _blocks(lo, hi, block, polite):
        acc = out[s:e] if in_place else scratch[: e - s]
        np.add(inputs[0][s:e], inputs[1][s:e], out=acc)
        for j in range(2, k):
            np.add(acc, inputs[j][s:e], out=acc)
        if not in_place:
            out[s:e] = acc


def reference_sum(contributions: list) -> np.ndarray:
    """The sum `shm_allreduce_schedule` leaves on every rank, in plain NumPy: rank order, left to right."""
    total = contributions[0].copy()
    for c in contributions[1:]:
        total = total + c
    return total


def shm_allreduce_schedule(comm, window: NodeWindow, start: int, count: int, dtype, tag: int,
                           scratch: np.ndarray | None, owners: list[int] | None = None,
                           polite: bool = False) -> Schedule:
    """In-place sum of elements [start, start + count) of every rank's window segment (see the module docstring).

    `owners[q]` is the shard rank q reduces (default q). `polite` (a non-blocking
    reduction, which may run beside backward) adds and copies in blocks of
    `BLOCK_BYTES` and yields the core between them when it runs on a helper
    thread; otherwise each is one call.
    """
    k, q = comm.Get_size(), comm.Get_rank()
    views = [window.view(j, dtype)[start:start + count] for j in range(k)]
    bounds = chunk_bounds(count, k)
    owners = owners or list(range(k))
    yield from shm_reduce_scatter(comm, window, views, bounds, owners, start, count, tag, scratch, polite)
    yield from shm_allgather(comm, window, views, bounds, owners, start, count, tag, polite)


def shm_reduce_scatter(comm, window, views, bounds, owners, start, count, tag, scratch, polite=False) -> Schedule:
    """Afterwards rank q's segment holds the node sum of shard owners[q]; nothing else has changed."""
    q = comm.Get_rank()
    window.sync()  # the caller's writes into this rank's buffer reach the window
    yield from node_barrier(comm, tag, start, count)
    window.sync()
    c = owners[q]
    reduce_shard(views, views[q], bounds[c], bounds[c + 1], scratch, polite and _beside_compute())


def shm_allgather(comm, window, views, bounds, owners, start, count, tag, polite=False) -> Schedule:
    """Every rank copies each finished shard from its owner; returns once no peer reads this rank's buffer."""
    k, q = comm.Get_size(), comm.Get_rank()
    window.sync()
    yield from node_barrier(comm, tag, start, count)
    window.sync()
    block = max(1, BLOCK_BYTES // views[q].itemsize) if polite and _beside_compute() else None
    for j in range(k):
        if j != q:
            c = owners[j]
            for s, e in _blocks(bounds[c], bounds[c + 1], block):
                views[q][s:e] = views[j][s:e]
    window.sync()
    # Peers may still be copying this rank's shard: the caller must not write the buffer before they finish.
    yield from node_barrier(comm, tag, start, count)


class ShmCommunicator(Communicator):
    """Allreduce through a node's shared-memory window; every rank must be on one node.

    `zeros(n, dtype)` (collective) returns a buffer in a new window;
    reductions of slices of such buffers take the shared-memory path, any
    other buffer the point-to-point ring (`describe()` says so). Windows live
    as long as the communicator; `free()` releases them, after which their
    arrays must not be touched.
    """

    name = "shm"
    shared_memory = True

    def __init__(self, mpi_comm=None, piece_kb: int | None = None, pipeline_depth: int | None = None):
        super().__init__(mpi_comm, piece_kb=piece_kb, pipeline_depth=pipeline_depth)
        self.windows: list[NodeWindow] = []
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

    def zeros(self, n: int, dtype=np.float32) -> np.ndarray:
        """A zeroed 1-D array of n elements inside a new shared window (collective: same n on every rank)."""
        dtype = np.dtype(dtype)
        if self.size == 1:
            return np.zeros(n, dtype=dtype)
        window = NodeWindow(self.node_comm.raw, n * dtype.itemsize)
        self.windows.append(window)
        buf = window.view(window.rank, dtype)[:n]
        buf.fill(0)
        return buf

    def window_of(self, buf) -> tuple[NodeWindow, int] | None:
        for window in self.windows:
            offset = window.offset_of(buf)
            if offset is not None:
                return window, offset
        return None

    def _schedule(self, buf, tag: int, blocking: bool) -> Schedule:
        found = self.window_of(buf) if is_host(buf) else None
        if found is None:
            need = ring_scratch_size(buf.size, self.size, buf.itemsize, self.pieces, not is_host(buf))
            return ring_schedule(self._comm, buf, self.scratch(tag, buf, need), tag, self.pieces)
        window, start = found
        scratch = self.scratch(tag, buf, max(1, BLOCK_BYTES // buf.itemsize)) if self.size > 2 else None
        return shm_allreduce_schedule(self.node_comm, window, start, buf.size, buf.dtype, tag, scratch,
                                      polite=not blocking)

    def free(self) -> None:
        """Release every window (collective). Arrays from `zeros` are invalid afterwards."""
        for window in self.windows:
            window.free()
        self.windows = []

    def describe(self) -> str:
        held = sum(w.nbytes for w in self.windows)
        return (f"{self.name}: {self.size} ranks on one node, shared windows of {held / 2**20:.1f} MiB per rank "
                f"(buffers outside them take the point-to-point ring)")
