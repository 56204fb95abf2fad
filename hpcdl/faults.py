"""Fault injection for tests: `HPCDL_FAULT_INJECT=item[,item...]`, each `name` or `name:n`.

A testing hook, not a feature: it lets the test suite prove that hpcdl keeps
its promises when things go wrong, without timing games. Known items:

    checkpoint-write[:n]   SIGKILL this process while writing its n-th checkpoint (default 1st)
    raise-at-step:n        raise RuntimeError at the start of optimizer step n (this rank only)
    nan-grad-at-step:n     put a NaN into this rank's gradient in step n (repeat the item for more steps)
    convert-shard[:n]      SIGKILL this process halfway through writing its n-th shard in
                           `hpcdl data convert folder` (default 1st)
    kill-at-step:n         SIGKILL this process at the start of optimizer step n (in its forward)
    kill-in-bucket:n       SIGKILL inside the first gradient bucket's allreduce schedule that step n
                           starts during backward, right after its first messages are posted
    kill-in-stats:n        the same inside step n's stats allreduce (the blocking one after backward)
    kill-in-eval:n         SIGKILL halfway through the n-th evaluation's batches

The kill-* items are the drills of `comm.fault_tolerance` (hpcdl/elastic.py): each
says on stderr when it fires (`fault drill: ... at <unix time>`), so a test can
time detection from the kill. The trainer reads them once at start-up; unset
they cost one set lookup per step.

Set it on one rank only with the launcher's MPMD syntax, e.g.
`mpiexec -n 1 hpcdl train ... : -n 1 env HPCDL_FAULT_INJECT=raise-at-step:3 hpcdl train ...`.
"""
from __future__ import annotations

import os
import signal
import time

from hpcdl.errors import ConfigError

FAULT_ENV = "HPCDL_FAULT_INJECT"
KNOWN = ("checkpoint-write", "raise-at-step", "nan-grad-at-step", "convert-shard",
         "kill-at-step", "kill-in-bucket", "kill-in-stats", "kill-in-eval")


def requested(name: str) -> list[int | None]:
    """The counts given for `name` (None for a bare `name`); empty when it is not requested."""
    spec = os.environ.get(FAULT_ENV, "")
    counts = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, count = item.partition(":")
        if key not in KNOWN:
            raise ConfigError(f"{FAULT_ENV}={spec!r}: unknown fault {key!r}; known: {', '.join(KNOWN)}")
        if count and not (count.isdigit() and int(count) >= 1):
            raise ConfigError(f"{FAULT_ENV}={spec!r}: {key}:<n> needs a whole number n >= 1")
        if key == name:
            counts.append(int(count) if count else None)
    return counts


def kill_self(where: str) -> None:
    """SIGKILL this process, after one line on stderr saying where and when (unix time)."""
    os.write(2, f"hpcdl: {FAULT_ENV}: fault drill: pid {os.getpid()} SIGKILL {where} at {time.time():.6f}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


class KillInSchedule:
    """Armed on a communicator: the next reduction started with a matching tag dies inside its schedule.

    `blocking=True` matches the blocking allreduces (tag 0), False the started
    (bucket) ones. The process dies right after the schedule has posted its
    first messages, or when it ends if it posts none (a blocking MPI call).
    """

    def __init__(self, where: str, blocking: bool):
        self.where, self.blocking = where, blocking

    def wrap(self, steps, blocking: bool):
        if blocking != self.blocking:
            return steps
        return self._dying(steps)

    def _dying(self, steps):
        for requests in steps:
            kill_self(self.where)
            yield requests
        kill_self(self.where)
