"""Communicators: allreduce algorithms over mpi4py, chosen by name.

    comm = hpcdl.comm.create("ring")          # collective: every rank calls it
    comm.allreduce(grads, op="mean")          # in place, NumPy or CuPy, float32/float64

Names: native, ring, recursive_doubling, rabenseifner, hierarchical, shm, auto.
Each is a small class over `base.Communicator` in its own module, imported
only when asked for; importing this package loads neither mpi4py nor the
algorithms. `BucketReducer` (in `buckets`) overlaps allreduce with backward.
"""
from __future__ import annotations

import difflib
import importlib
import inspect

from hpcdl.errors import ConfigError

# name -> (module, class)
ALGORITHMS = {
    "native": ("hpcdl.comm.native", "NativeCommunicator"),
    "ring": ("hpcdl.comm.ring", "RingCommunicator"),
    "recursive_doubling": ("hpcdl.comm.recursive", "RecursiveDoublingCommunicator"),
    "rabenseifner": ("hpcdl.comm.recursive", "RabenseifnerCommunicator"),
    "hierarchical": ("hpcdl.comm.hierarchical", "HierarchicalCommunicator"),
    "shm": ("hpcdl.comm.shm", "ShmCommunicator"),
    "auto": ("hpcdl.comm.auto", "AutoCommunicator"),
}
# Options some algorithms take; each class receives the ones its constructor names,
# so one config section can be passed whatever the algorithm.
OPTIONS = ("ranks_per_node", "crossovers", "piece_kb", "pipeline_depth", "shared_window")


def communicator_class(name: str):
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(str(name), ALGORITHMS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"comm.algorithm: unknown allreduce algorithm {name!r}{hint} (known: {', '.join(ALGORITHMS)})")
    module, cls = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)


def create(name: str, mpi_comm=None, **options):
    """A Communicator running algorithm `name` over `mpi_comm` (default MPI.COMM_WORLD).

    Collective: duplicates `mpi_comm`, so every rank must call it in the same order.
    Options: `ranks_per_node=k` (hierarchical, auto) fakes nodes of k ranks;
    `crossovers=path|dict` (auto) replaces the default crossover table;
    `shared_window=True` (ring, hierarchical, auto) reduces buffers from `zeros` through an MPI-3 shared window.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown communicator options {unknown}; known: {list(OPTIONS)}")
    cls = communicator_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    mine = {k: v for k, v in options.items() if v is not None and (takes_all or k in accepted)}
    return cls(mpi_comm, **mine)


def cuda_aware() -> bool | None:
    """Whether the MPI library accepts CuPy (device) buffers; None when it cannot be told."""
    from hpcdl.comm.gpu import cuda_aware as query

    return query()


def __getattr__(name):
    if name == "BucketReducer":
        from hpcdl.comm.buckets import BucketReducer

        return BucketReducer
    raise AttributeError(f"module 'hpcdl.comm' has no attribute {name!r}")


__all__ = ["ALGORITHMS", "BucketReducer", "communicator_class", "create", "cuda_aware"]
