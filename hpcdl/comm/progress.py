"""A communication thread that drives non-blocking reductions while the main thread computes.

Without it a bucket's schedule moves only when a backward hook polls it:
with 1 MiB pieces and (P-1)(pieces+1) ring steps per bucket, a bucket needs
more polls than ResNet-50 has hooks from about P = 32, so it cannot finish
during backward however fast the network is. The thread instead polls every
reduction handed to it until it completes, and between polls that find
nothing finished it sleeps `interval_s`, so on a node whose cores all run
ranks it takes a bounded share of the core (the poll itself is a few
microseconds; the copies and additions it does are work the reduction needs
anyway). It needs MPI_THREAD_MULTIPLE, which mpi4py asks for by default and
MPICH and Open MPI builds with threads grant; `available()` says whether
this process got it.

Ownership rule: a `Pending` handed to `submit` is advanced only by the
thread from then on; the caller waits on the returned event. `close()` stops
and joins the thread, after which a communicator can be rebuilt (the
fault-tolerance path) and a new thread started.
"""
from __future__ import annotations

import os
import threading
import time

# Niceness added to the progress thread (Linux schedules threads individually). Off by default:
# on a shared or oversubscribed node a niced thread starves behind other jobs and buckets stop
# completing during backward (seen at 5 ranks on 2 busy cores); +10 did not shorten the sleeping
# backward measurably (315.9 vs 317.4 ms).
NICE = 0


def available() -> bool:
    """Whether MPI was initialised with MPI_THREAD_MULTIPLE (required for a communication thread)."""
    from mpi4py import MPI

    return MPI.Query_thread() >= MPI.THREAD_MULTIPLE


class ProgressThread:
    """Polls submitted `Pending` reductions until done; see the module docstring."""

    def __init__(self, interval_s: float = 50e-6, name: str = "hpcdl-comm-progress", nice: int = NICE,
                 clock=time.perf_counter):
        if interval_s < 0:
            raise ValueError(f"progress interval must be >= 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.clock = clock  # stamps each event's `completed_at` (the timeline's bucket ends)
        self.nice = int(nice)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._active: list = []  # [[pending or starter, event]]
        self._stopping = False
        self._error: BaseException | None = None
        self.polls = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, pending) -> threading.Event:
        """Hand `pending` to the thread; the event is set when it has completed.

        `pending` may also be a callable that starts the reduction and returns its
        `Pending`: the thread calls it, in submission order, so the caller (a backward
        hook) makes no MPI call and never contends with the thread for MPI or the GIL.
        """
        done = threading.Event()
        if not callable(pending) and pending.done:
            done.set()
            return done
        with self._work:
            if self._stopping:
                raise RuntimeError("ProgressThread.submit() after close()")
            self._active.append([pending, done])
            self._work.notify()
        return done

    def wait(self, event: threading.Event) -> None:
        """Block until `event` is set; re-raises an error the thread met (e.g. an MPI error)."""
        while not event.wait(0.05):
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("the communication progress thread has stopped")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"communication progress thread failed: {self._error!r}") from self._error

    def _run(self) -> None:
        if self.nice:
            # Below the compute thread in the scheduler: when both want the one core a rank has,
            # backward (or its wake-up after waiting on a device) goes first.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except (AttributeError, OSError):
                pass
        try:
            while True:
                with self._work:
                    while not self._active and not self._stopping:
                        self._work.wait()
                    if self._stopping and not self._active:
                        return
                    active = list(self._active)
                finished = []
                for item in active:  # [pending or starter, event], shared with self._active
                    if callable(item[0]):  # started here, in the order submitted
                        item[0] = item[0]()
                    pending, done = item
                    self.polls += 1
                    if pending.test():
                        done.completed_at = self.clock()
                        finished.append(item)
                if finished:
                    with self._work:
                        for item in finished:
                            self._active.remove(item)
                    for _, done in finished:
                        done.set()
                elif self.interval_s:
                    time.sleep(self.interval_s)  # releases the GIL and the core
        except BaseException as exc:  # an MPI error inside a schedule: surface it in wait()
            self._error = exc
            with self._work:
                items, self._active = self._active, []
            for _, done in items:
                done.set()

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish what was submitted, stop, join. Idempotent."""
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
