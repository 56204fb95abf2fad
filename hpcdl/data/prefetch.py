"""Background workers that run batch jobs ahead of the training loop, into a fixed pool of slots.

    Prefetcher(recipe, depth=4, workers=1, kind="thread" | "process")
    prefetcher.begin(jobs)            # an iterator of TrainJob / EvalJob, in consumption order
    job, x, y = prefetcher.take()     # waits for the next job's slot; the previous slot is recycled

Memory is fixed at start: depth + 1 slots (depth jobs in flight, one held
by the consumer), each the float32 images and int64 labels of the largest
job, plus each worker's raw-row buffer. Nothing grows with the file.

Ordering. Job k goes to worker k mod W; each worker runs its jobs in
order, so the consumer knows whose reply to wait for and batches come out
in the order they were asked for, whatever the number of workers.

Threads or processes. The heavy parts of a job release the GIL (pread,
zlib.crc32, the Numba resize kernel), so one worker of either kind makes
batches as fast as the training thread would itself (`hpcdl bench data`:
~2,000 RandomResizedCrop-224 images/s per core here). What differs is the
training thread: a worker thread's Python glue (row loop, sampler, box
draws) holds the GIL in between, and a training thread that returns to
Python after every GEMM then waits for it, up to the 5 ms switch interval
(measured beside a consumer computing in small GEMMs: compute 1.03–1.18×
slower with a thread worker, 1.00–1.04× with a process). Processes cost an
interpreter each (~80 MB private memory with NumPy and Numba's LLVM; the
slot pages are shared with the rank) and put their slots in one
`memfd_create` file (nothing in /dev/shm to leak) mapped by both sides.
Threads share one copy of the labels and of in-memory arrays and cannot
outlive the rank. `data.worker_kind = "auto"` takes processes for HDF5
files and threads for in-memory data.

A process worker dies with its rank, however the rank ends:

* `close()` (normal exit, an exception unwinding through the trainer, and
  SIGTERM, which the trainer turns into a checkpoint and a normal exit)
  asks each worker to stop, then kills what has not stopped within 5 s;
* SIGKILL of the rank: each worker set `PR_SET_PDEATHSIG` = SIGKILL, so
  the kernel kills it when the thread that started it dies; without prctl
  (not Linux) a watcher thread sees `os.getppid()` change within a second;
  and a worker blocked on its job socket sees end-of-file.

Workers ignore SIGINT, SIGTERM and SIGUSR1: a terminal's Ctrl-C or a batch
system's signal to the whole process group must reach the rank, which
stops them after its checkpoint, not kill them under it. They are started
with `subprocess` (fork + exec, nothing of MPI or Numba's thread pool is
inherited) from the thread that creates the Prefetcher: create it in the
main thread, since PR_SET_PDEATHSIG fires when that thread exits.
"""
from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from queue import SimpleQueue

import numpy as np

from hpcdl.data.batches import BatchMaker
from hpcdl.errors import ConfigError, DataError

WORKER_KINDS = ("thread", "process")
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1
_ALIGN = 4096


# -- slots ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotLayout:
    count: int
    rows: int
    image_shape: tuple  # C, H, W of the transformed images

    @property
    def x_bytes(self) -> int:
        return self.rows * int(np.prod(self.image_shape)) * 4

    @property
    def slot_bytes(self) -> int:
        raw = self.x_bytes + self.rows * 8
        return -(-raw // _ALIGN) * _ALIGN

    @property
    def total_bytes(self) -> int:
        return max(self.count * self.slot_bytes, _ALIGN)


class SlotPool:
    """`count` slots of (x float32 [rows, C, H, W], y int64 [rows]) in one mapping.

    shared=True backs it by a memfd (or an unlinked temporary file) that
    worker processes map too; otherwise anonymous memory.
    """

    def __init__(self, layout: SlotLayout, shared: bool = False, fd: int | None = None):
        self.layout = layout
        self.fd = fd
        if fd is None and shared:
            self.fd = _anonymous_file(layout.total_bytes)
        if self.fd is None:
            self._map = mmap.mmap(-1, layout.total_bytes)
        else:
            self._map = mmap.mmap(self.fd, layout.total_bytes, flags=mmap.MAP_SHARED)
        self._views = []
        for slot in range(layout.count):
            base = slot * layout.slot_bytes
            x = np.frombuffer(self._map, np.float32, layout.x_bytes // 4, base).reshape(layout.rows, *layout.image_shape)
            y = np.frombuffer(self._map, np.int64, layout.rows, base + layout.x_bytes)
            self._views.append((x, y))

    def views(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return self._views[slot]

    def close(self) -> None:
        self._views.clear()
        try:
            self._map.close()
        except BufferError:  # a consumer still holds a view; the mapping goes when it does
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _anonymous_file(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("hpcdl-batches", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


# -- workers -------------------------------------------------------------------------------

class _InlineWorkers:
    """No workers: the consumer's thread runs each job when it takes it (data.prefetch = 0)."""

    count = 0

    def __init__(self, recipe, pool):
        self._make = BatchMaker(recipe)
        self._pool = pool
        self._pending = {}

    @property
    def pids(self) -> list[int]:
        return []

    def submit(self, worker: int, job_id: int, slot: int, job) -> None:
        self._pending[job_id] = (slot, job)

    def wait(self, worker: int, job_id: int) -> int:
        slot, job = self._pending.pop(job_id)
        return self._make(job, *self._pool.views(slot))

    def close(self) -> None:
        self._pending.clear()


class _ThreadWorkers:
    """Worker threads sharing the recipe; each owns a BatchMaker and a job and reply queue."""

    def __init__(self, recipe, pool, count: int):
        self.count = count
        self.pids = []
        self._pool = pool
        self._jobs = [SimpleQueue() for _ in range(count)]
        self._replies = [SimpleQueue() for _ in range(count)]
        self._threads = [threading.Thread(target=self._loop, args=(BatchMaker(recipe), i), daemon=True,
                                          name=f"hpcdl-data-{i}") for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _loop(self, make: BatchMaker, index: int) -> None:
        jobs, replies = self._jobs[index], self._replies[index]
        while True:
            item = jobs.get()
            if item is None:
                return
            job_id, slot, job = item
            try:
                replies.put((job_id, make(job, *self._pool.views(slot)), None))
            except BaseException as exc:  # handed to the consumer, who raises it
                replies.put((job_id, 0, exc))

    def submit(self, worker: int, job_id: int, slot: int, job) -> None:
        self._jobs[worker].put((job_id, slot, job))

    def wait(self, worker: int, job_id: int) -> int:
        while True:
            got, n, error = self._replies[worker].get()
            if got == job_id:
                if error is not None:
                    raise error
                return n

    def close(self) -> None:
        for queue in self._jobs:
            queue.put(None)
        for thread in self._threads:
            thread.join(timeout=_STOP_GRACE_S)


class _ProcessWorkers:
    """Worker processes, each on a socket pair, writing into the shared slot pool."""

    def __init__(self, recipe, pool, count: int):
        try:
            payload = pickle.dumps((recipe, pool.layout), protocol=pickle.HIGHEST_PROTOCOL)
        except TypeError as exc:
            raise ConfigError(f"data.worker_kind = 'process': {exc}") from None
        self.count = count
        self._procs, self._conns = [], []
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMBA_NUM_THREADS="1")
        try:
            for _ in range(count):
                ours, theirs = socket.socketpair()
                command = [sys.executable, "-c", "from hpcdl.data.prefetch import worker_main; worker_main()",
                           str(os.getpid()), str(theirs.fileno()), str(pool.fd)]
                proc = subprocess.Popen(command, pass_fds=(theirs.fileno(), pool.fd), stdin=subprocess.DEVNULL,
                                        env=env, close_fds=True)
                theirs.close()
                conn = Connection(ours.detach())
                self._procs.append(proc)
                self._conns.append(conn)
                conn.send_bytes(payload)
            for worker in range(count):
                self._reply(worker)  # "ready": the recipe opened (files, labels) without error
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _death(self, worker: int) -> DataError:
        proc = self._procs[worker]
        try:
            code = proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return DataError(f"data worker process {proc.pid} died ({how})")

    def _reply(self, worker: int):
        try:
            message = self._conns[worker].recv()
        except (EOFError, OSError):
            raise self._death(worker) from None
        if isinstance(message, tuple) and message and message[0] == "error":
            _, kind, text, trace = message
            if kind == "DataError":
                raise DataError(text)
            if kind == "ConfigError":
                raise ConfigError(text)
            raise RuntimeError(f"data worker process {self._procs[worker].pid}: {kind}: {text}\n{trace}")
        return message

    def submit(self, worker: int, job_id: int, slot: int, job) -> None:
        try:
            self._conns[worker].send((job_id, slot, job))
        except OSError:
            raise self._death(worker) from None

    def wait(self, worker: int, job_id: int) -> int:
        while True:
            got, n = self._reply(worker)
            if got == job_id:
                return n

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []


def worker_main() -> None:
    """Entry of a worker process: argv = parent pid, socket fd, slot-pool fd."""
    parent, sock_fd, pool_fd = (int(a) for a in sys.argv[1:4])
    _die_with_parent(parent)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(sock_fd)
    try:
        recipe, layout = pickle.loads(conn.recv_bytes())
        pool = SlotPool(layout, fd=pool_fd)
        make = BatchMaker(recipe)
    except Exception as exc:
        _send_error(conn, exc)
        return
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        job_id, slot, job = item
        try:
            n = make(job, *pool.views(slot))
        except Exception as exc:
            _send_error(conn, exc)
            continue
        conn.send((job_id, n))


def _send_error(conn, exc: Exception) -> None:
    try:
        conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` dies (Linux prctl), and watch getppid() everywhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="hpcdl-parent-watch").start()


# -- the prefetcher ----------------------------------------------------------------------------

class Prefetcher:
    """Runs an iterator of jobs `depth` ahead of the consumer on `workers` threads or processes."""

    def __init__(self, recipe, *, depth: int, workers: int = 1, kind: str = "thread"):
        if kind not in WORKER_KINDS:
            raise ConfigError(f"data.worker_kind: {kind!r} is not one of {', '.join(WORKER_KINDS)}")
        if depth < 0 or (depth and workers < 1):
            raise ConfigError(f"data.prefetch = {depth} with data.workers = {workers}: need prefetch ≥ 0, workers ≥ 1")
        self.depth = int(depth)
        self.kind = kind if depth else "inline"
        layout = SlotLayout(self.depth + 1, int(recipe.max_rows), tuple(recipe.output_shape))
        self.pool = SlotPool(layout, shared=self.kind == "process")
        try:
            if not self.depth:
                self._workers = _InlineWorkers(recipe, self.pool)
            elif kind == "thread":
                self._workers = _ThreadWorkers(recipe, self.pool, workers)
            else:
                self._workers = _ProcessWorkers(recipe, self.pool, workers)
        except BaseException:
            self.pool.close()
            raise
        self._free = list(range(layout.count))
        self._issued = deque()  # (job, job_id, slot, worker) in consumption order
        self._held = None
        self._jobs = iter(())
        self._next_id = 0

    @property
    def worker_pids(self) -> list[int]:
        return list(self._workers.pids)

    def begin(self, jobs) -> None:
        """Forget the current stream (its jobs in flight finish and are dropped) and start `jobs`."""
        self._drain()
        self._jobs = iter(jobs)
        self._fill()

    def take(self):
        """(job, x[:n], y[:n]) of the next job; the views stay valid until the next take/begin."""
        self._release_held()
        self._fill(self.depth or 1)
        if not self._issued:
            raise RuntimeError("take() after the last job of the stream")
        job, job_id, slot, worker = self._issued.popleft()
        try:
            n = self._workers.wait(worker, job_id)
        except BaseException:
            self._free.append(slot)
            raise
        self._held = slot
        self._fill()
        x, y = self.pool.views(slot)
        return job, x[:n], y[:n]

    def _fill(self, limit: int | None = None) -> None:
        limit = self.depth if limit is None else limit
        while self._free and len(self._issued) < limit:
            job = next(self._jobs, None)
            if job is None:
                return
            slot = self._free.pop()
            worker = self._next_id % max(self._workers.count, 1)
            self._workers.submit(worker, self._next_id, slot, job)
            self._issued.append((job, self._next_id, slot, worker))
            self._next_id += 1

    def _release_held(self) -> None:
        if self._held is not None:
            self._free.append(self._held)
            self._held = None

    def _drain(self) -> None:
        self._release_held()
        while self._issued:
            _, job_id, slot, worker = self._issued.popleft()
            try:
                self._workers.wait(worker, job_id)
            except (DataError, RuntimeError, ValueError, OSError):
                pass  # a batch nobody will use; if the worker is gone, the next take says so
            self._free.append(slot)
        self._jobs = iter(())

    def close(self) -> None:
        try:
            self._issued.clear()
            self._workers.close()
        finally:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
