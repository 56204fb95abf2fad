"""Fault injection for tests: `HPCDL_FAULT_INJECT=item[,item...]`, each `name` or `name:n`.

A testing hook, not a feature: it lets the test suite prove that hpcdl keeps
its promises when things go wrong, without timing games. Known items:

    checkpoint-write[:n]   SIGKILL this process while writing its n-th checkpoint (default 1st)
    raise-at-step:n        raise RuntimeError at the start of optimizer step n (this rank only)
    nan-grad-at-step:n     put a NaN into this rank's gradient in step n (repeat the item for more steps)
    convert-shard[:n]      SIGKILL this process halfway through writing its n-th shard in
                           `hpcdl data convert folder` (default 1st)

Set it on one rank only with the launcher's MPMD syntax, e.g.
`mpiexec -n 1 hpcdl train ... : -n 1 env HPCDL_FAULT_INJECT=raise-at-step:3 hpcdl train ...`.
"""
from __future__ import annotations

import os

from hpcdl.errors import ConfigError

FAULT_ENV = "HPCDL_FAULT_INJECT"
KNOWN = ("checkpoint-write", "raise-at-step", "nan-grad-at-step", "convert-shard")


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
