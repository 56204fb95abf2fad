"""Threads per rank: how many BLAS and Numba threads each rank runs, and why.

The first rule that applies wins:

1. ``--threads N`` or ``runtime.threads``;
2. ``OMP_NUM_THREADS``;
3. ``SLURM_CPUS_PER_TASK`` (``srun -c N``);
4. the cores in this rank's CPU affinity mask, divided among the node-local
   ranks that share them.

Rule 4 is decided in two steps, both before NumPy is imported (OpenBLAS sizes
its thread pool once, when it loads):

* from the launcher's own variables (node-local rank count) and the mask.
  A mask narrower than the launcher process's own means the launcher bound
  this rank, so the mask is this rank's alone and is not divided;
* then, under a launcher with several ranks, the node's ranks compare their
  masks over MPI's shared-memory communicator (`settle`). That is the answer
  whenever MPI is available: a core counts 1/k for each of the k local ranks
  whose masks contain it, rounded down, at least 1.

Cores, not hardware threads: with SMT, the two hardware threads of one core
count once, as in PyTorch's and MKL's defaults; GEMM-bound code gains little
from the second thread of a core.

The count is exported as OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and
MKL_NUM_THREADS; NUMBA_NUM_THREADS (the size of Numba's pool, fixed when
Numba loads) is raised to it when set lower. A call after NumPy is loaded
resizes the loaded OpenBLAS or MKL through its own API.

This module imports nothing heavy at module level: `hpcdl.cli` runs it first.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

from hpcdl.errors import ConfigError

# Variables MPI launchers set on every rank; their presence means we run under
# MPI with (possibly) several ranks per node.
_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")

# Node-local rank counts as each launcher announces them, most specific first:
# an mpirun inside a Slurm allocation sets its own, while the allocation's
# SLURM_* variables describe the batch job rather than mpirun's layout.
#   Open MPI (mpirun/prterun 4 and 5):  OMPI_COMM_WORLD_LOCAL_SIZE
#   MPICH Hydra and Intel MPI:          MPI_LOCALNRANKS
#   Slurm srun:                         SLURM_STEP_TASKS_PER_NODE (with SLURM_NODEID),
#                                       else SLURM_NTASKS_PER_NODE (set by --ntasks-per-node)
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")

EXPLICIT_ORDER = ("--threads/runtime.threads", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")
_EXPORTED = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

CoreOf = Callable[[int], object]


@dataclass(frozen=True)
class RankThreads:
    """One rank's row in the start-up survey that rank 0 collects."""

    rank: int
    host: str
    local_rank: int
    cpus: str  # Linux cpulist, e.g. "0-23,48-71"
    threads: int
    notes: tuple[str, ...] = ()  # findings about this rank's node, from its first local rank


@dataclass(frozen=True)
class ThreadPlan:
    """The thread count of this rank and the sentence that explains it."""

    threads: int
    why: str
    cpus: frozenset
    cores: int
    local_ranks: int | None = None
    local_ranks_from: str = ""
    explicit: bool = False
    notes: tuple[str, ...] = ()  # warnings worth printing (rank 0 holds the job-wide ones)
    ranks: tuple[RankThreads, ...] = field(default=(), compare=False)  # rank 0 only, after `settle`


_current: ThreadPlan | None = None


def current() -> ThreadPlan | None:
    """The plan the last `pin_threads` applied, or None."""
    return _current


# -- what the launcher says ------------------------------------------------------------

def launcher_world_size(env: Mapping[str, str] | None = None) -> int:
    """World size as the launcher announced it, before MPI is initialised."""
    env = os.environ if env is None else env
    for var in _WORLD_SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def expand_slurm_counts(text: str) -> list[int]:
    """Slurm's compressed per-node list: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"not a Slurm per-node count list: {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def launcher_local_ranks(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(ranks on this node, the variable that said so), or None when no launcher says."""
    env = os.environ if env is None else env
    for var in _LOCAL_SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), var
    if "SLURM_LOCALID" in env:  # inside an srun step, not merely inside an allocation
        per_node, node = env.get("SLURM_STEP_TASKS_PER_NODE", ""), env.get("SLURM_NODEID", "")
        if per_node and node.isdigit():
            try:
                counts = expand_slurm_counts(per_node)
            except ValueError:
                counts = []
            if int(node) < len(counts) and counts[int(node)] > 0:
                return counts[int(node)], "SLURM_STEP_TASKS_PER_NODE"
        value = env.get("SLURM_NTASKS_PER_NODE", "")
        if value.isdigit() and int(value) > 0:
            return int(value), "SLURM_NTASKS_PER_NODE"
    return None


def explicit_threads(threads: int | None = None, env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(count, where it came from) when the user or the batch system named one, else None."""
    env = os.environ if env is None else env
    if threads:
        return int(threads), EXPLICIT_ORDER[0]
    for var in EXPLICIT_ORDER[1:]:
        value = env.get(var, "").strip()
        if not value:
            continue
        # OMP_NUM_THREADS may list one count per nesting level ("8,1"); the first is ours.
        first = value.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(f"{var}={value!r}: expected a positive whole number of threads per rank")
        return int(first), var
    return None


# -- what the machine says ------------------------------------------------------------

def affinity() -> frozenset:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def _parent_affinity() -> frozenset | None:
    """The launcher's mask (our parent: hydra_pmi_proxy, prted/prterun, slurmstepd), if visible."""
    parent = os.getppid()
    if parent <= 1 or not hasattr(os, "sched_getaffinity"):
        return None
    try:
        return frozenset(os.sched_getaffinity(parent))
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def sysfs_core_of(cpu: int) -> object:
    """A key shared by the hardware threads of one physical core (the CPU itself if unknown)."""
    for name in ("core_cpus_list", "thread_siblings_list"):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/{name}") as f:
                return f.read().strip()
        except OSError:
            continue
    return cpu


def count_cores(cpus: Iterable[int], core_of: CoreOf | None = None) -> int:
    core_of = core_of or sysfs_core_of
    return len({core_of(cpu) for cpu in cpus}) or 1


def format_cpulist(cpus: Iterable[int]) -> str:
    """Linux cpulist notation: {0, 1, 2, 5} -> '0-2,5'."""
    ordered = sorted(cpus)
    runs, start = [], None
    for i, cpu in enumerate(ordered):
        if start is None:
            start = cpu
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            runs.append(str(cpu) if cpu == start else f"{start}-{cpu}")
            start = None
    return ",".join(runs)


def parse_cpulist(text: str) -> frozenset:
    cpus = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def _cores_text(cores: int, cpus: int) -> str:
    noun = "core" if cores == 1 else "cores"
    return f"{cores} {noun}" if cores == cpus else f"{cores} {noun} ({cpus} hardware threads)"


# -- the decision --------------------------------------------------------------------

def decide(threads: int | None = None, *, env: Mapping[str, str] | None = None, cpus: Iterable[int] | None = None,
           parent_cpus: Iterable[int] | None | bool = True, core_of: CoreOf | None = None) -> ThreadPlan:
    """The thread count before MPI starts, from the environment and the affinity mask.

    `env`, `cpus`, `parent_cpus` (the launcher's mask; True = look it up, None =
    unknown) and `core_of` default to this process's own; tests pass fakes.
    """
    env = os.environ if env is None else env
    cpus = affinity() if cpus is None else frozenset(cpus)
    parent = _parent_affinity() if parent_cpus is True else (frozenset(parent_cpus) if parent_cpus else None)
    cores = count_cores(cpus, core_of)
    text = _cores_text(cores, len(cpus))
    local = launcher_local_ranks(env)
    local_count, local_var = local if local else (None, "")

    chosen = explicit_threads(threads, env)
    if chosen:
        count, source = chosen
        return ThreadPlan(count, f"{count} from {source}", cpus, cores, local_count, local_var, explicit=True)

    if local is None:
        world = launcher_world_size(env)
        if world <= 1:
            return ThreadPlan(cores, f"{cores} = {text} in affinity mask (one process)", cpus, cores)
        # Under a launcher that does not say how many ranks share the node: assume
        # all of them do until MPI can tell (see `settle`); too few beats too many.
        count = max(1, cores // world)
        return ThreadPlan(count, f"{count} = {text} in affinity mask / {world} ranks (node-local count unknown "
                                 f"before MPI starts)", cpus, cores, None, "")
    if local_count == 1:
        return ThreadPlan(cores, f"{cores} = {text} in affinity mask / 1 local rank ({local_var})",
                          cpus, cores, 1, local_var)
    if parent is not None and cpus < parent and len(cpus) * local_count <= len(parent):
        return ThreadPlan(cores, f"{cores} = {text} in this rank's own affinity mask (bound by the launcher; "
                                 f"{local_count} local ranks, {local_var})", cpus, cores, local_count, local_var)
    count = max(1, cores // local_count)
    return ThreadPlan(count, f"{count} = {text} in affinity mask / {local_count} local ranks ({local_var})",
                      cpus, cores, local_count, local_var)


def core_share(mine: frozenset, local_masks: list[frozenset], core_of: CoreOf | None = None) -> float:
    """This rank's fair share of its cores: each core counts 1/k when k local masks contain it."""
    core_of = core_of or sysfs_core_of
    sharers: dict = {}
    for mask in local_masks:
        for core in {core_of(cpu) for cpu in mask}:
            sharers[core] = sharers.get(core, 0) + 1
    return sum(1.0 / max(1, sharers.get(core, 1)) for core in {core_of(cpu) for cpu in mine})


def _threads_for(mask: frozenset, explicit: int | None, local_masks: list[frozenset], core_of: CoreOf | None) -> int:
    if explicit:
        return explicit
    return max(1, int(core_share(mask, local_masks, core_of) + 1e-9))


def settle(plan: ThreadPlan, comm, *, core_of: CoreOf | None = None, host: str | None = None) -> ThreadPlan:
    """Compare affinity masks across the node's ranks over MPI and fix the count (collective).

    Rank 0's plan comes back with every rank's row (`ranks`) and the job-wide
    findings (`notes`): counts that differ between ranks, nodes whose ranks
    ask for more threads than they have cores, masks that overlap in part.
    """
    from mpi4py import MPI

    host = host or socket.gethostname()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank = node.Get_rank()
        shared = node.allgather((format_cpulist(plan.cpus), plan.threads if plan.explicit else None))
    finally:
        node.Free()
    masks = [parse_cpulist(cpus) for cpus, _ in shared]
    counts = [_threads_for(mask, explicit, masks, core_of) for mask, (_, explicit) in zip(masks, shared)]
    node_notes = review_node(host, masks, counts, core_of) if local_rank == 0 else ()

    if plan.explicit:
        settled = replace(plan, local_ranks=len(masks), local_ranks_from=plan.local_ranks_from or "MPI")
    else:
        settled = replace(plan, threads=counts[local_rank], local_ranks=len(masks),
                          local_ranks_from=_local_source(plan, len(masks)),
                          why=_settled_why(counts[local_rank], plan, local_rank, masks, core_of))
    row = RankThreads(comm.Get_rank(), host, local_rank, format_cpulist(plan.cpus), settled.threads, node_notes)
    rows = comm.gather(row, root=0)
    if rows is None:
        return settled
    return replace(settled, ranks=tuple(rows), notes=tuple(review_job(rows)))


def _local_source(plan: ThreadPlan, count: int) -> str:
    if plan.local_ranks == count and plan.local_ranks_from:
        return plan.local_ranks_from
    return "MPI shared-memory communicator"


def _settled_why(threads: int, plan: ThreadPlan, local_rank: int, masks: list[frozenset], core_of) -> str:
    mine = masks[local_rank]
    text = _cores_text(plan.cores, len(mine))
    overlapping = [m for i, m in enumerate(masks) if i != local_rank and m & mine]
    source = _local_source(plan, len(masks))
    if len(masks) == 1:
        return f"{threads} = {text} in affinity mask / 1 local rank ({source})"
    if not overlapping:
        return (f"{threads} = {text} in this rank's own affinity mask ({len(masks)} local ranks on "
                f"separate cores, {source})")
    if all(m == mine for m in overlapping):
        sharing = len(overlapping) + 1
        of_all = "" if sharing == len(masks) else f"of {len(masks)} local ranks, "
        return f"{threads} = {text} in affinity mask / {sharing} local ranks sharing it ({of_all}{source})"
    share = core_share(mine, masks, core_of)
    return (f"{threads} = {share:.3g} of {text} in affinity mask, shared in part with other local ranks "
            f"({len(masks)} local ranks, {source})")


# -- findings worth a warning ---------------------------------------------------------------

def review_node(host: str, masks: list[frozenset], counts: list[int], core_of: CoreOf | None = None) -> tuple[str, ...]:
    """Findings about one node's ranks: oversubscription, masks that overlap in part."""
    notes = []
    cores = count_cores(frozenset().union(*masks), core_of) if masks else 0
    total = sum(counts)
    if cores and total > cores:
        notes.append(f"{host}: {len(masks)} local rank(s) run {total} threads on {cores} cores "
                     f"(oversubscribed {total / cores:.1f}x); lower --threads/OMP_NUM_THREADS, or see "
                     f"docs/threads-and-binding.md")
    for i, a in enumerate(masks):
        for j in range(i + 1, len(masks)):
            b = masks[j]
            if a != b and a & b:
                notes.append(f"{host}: local ranks {i} and {j} share some but not all CPUs "
                             f"({format_cpulist(a)} vs {format_cpulist(b)}): the binding is uneven")
                return tuple(notes)
    return tuple(notes)


def review_job(rows: list[RankThreads]) -> list[str]:
    """Job-wide findings from every rank's row: node findings, then counts that differ."""
    from hpcdl.guard import format_ranks

    notes = [note for row in rows for note in row.notes]
    by_count: dict[int, list[int]] = {}
    for row in rows:
        by_count.setdefault(row.threads, []).append(row.rank)
    if len(by_count) > 1:
        groups = sorted(by_count.items(), key=lambda item: min(item[1]))
        shown = ", ".join(f"{count} on {format_ranks(ranks)}" for count, ranks in groups[:4])
        more = f" and {len(groups) - 4} other counts" if len(groups) > 4 else ""
        notes.append(f"threads per rank differ: {shown}{more}; every step waits for the slowest rank")
    return notes


# -- applying it ---------------------------------------------------------------------

def pin_threads(threads: int | None = None, *, settle_with_mpi: bool = False) -> int:
    """Decide this rank's thread count, give it to BLAS and Numba; returns the count.

    With `settle_with_mpi` and a launcher that started several ranks, MPI is
    initialised here (before NumPy) so the node's ranks can compare masks.
    """
    global _current
    comm = _launcher_comm() if settle_with_mpi else None
    try:
        plan, error = decide(threads), None
    except ConfigError as exc:
        if comm is None:
            raise
        plan, error = None, exc
    if comm is not None:
        # A bad value on one rank alone must stop every rank: the others would
        # wait in `settle` forever. So all ranks learn of it, and all raise.
        _raise_if_any_rank_failed(comm, error)
        plan = settle(plan, comm)
    plan = apply(plan)
    _current = plan
    return plan.threads


def _launcher_comm():
    """COMM_WORLD when a launcher started several ranks and mpi4py is there (initialises MPI)."""
    if launcher_world_size() <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _raise_if_any_rank_failed(comm, error: Exception | None) -> None:
    failures = [(rank, text) for rank, text in enumerate(comm.allgather(str(error) if error else None)) if text]
    if not failures:
        return
    rank, text = failures[0]
    if len(failures) < comm.Get_size() or len({t for _, t in failures}) > 1:
        others = f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1 else ""
        text = f"rank {rank}: {text}{others}"
    exc = ConfigError(text)
    exc.collective = True  # every rank raises it together: rank 0 prints it once
    raise exc


def apply(plan: ThreadPlan) -> ThreadPlan:
    """Export the count and set it in a loaded BLAS and in Numba; returns the plan with any new notes."""
    n = plan.threads
    notes = list(plan.notes)
    for var in _EXPORTED:
        os.environ[var] = str(n)
    # OpenBLAS workers spin ~0.1 s after each call by default, taking the cores
    # from the Numba kernels between GEMMs (a 2-thread ResNet-50 step ran
    # slower than a 1-thread one); 2^4 cycles lets them sleep almost at once.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    # The same for Numba's OpenMP pool (see kernels/layers_cpu.py). It must be
    # exported here: libgomp reads it once, when it loads, and the
    # numba.set_num_threads below loads it. Set only by the kernels' import,
    # it came too late in every process that pinned threads first, and a GEMM
    # right after a Numba kernel ran 12.8 ms instead of 8.8 on two threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # NUMBA_NUM_THREADS fixes the size of Numba's pool when Numba loads (by
    # default the CPUs in the mask, or all CPUs in older Numba): below the count
    # would be wrong, above is harmless.
    numba_cap = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    cap = int(numba_cap) if numba_cap.isdigit() else len(plan.cpus)
    if "numba" not in sys.modules and cap < n:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    if "numpy" in sys.modules:
        blas = loaded_blas()
        if blas is not None:
            blas.set_threads(n)
    try:
        import numba

        cap = numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(min(n, cap))
        if cap < n:
            notes.append(f"Numba was loaded with a pool of {cap} threads (NUMBA_NUM_THREADS), fewer than {n}")
    except (ImportError, ValueError):
        pass
    return replace(plan, notes=tuple(notes))


def default_threads() -> int:
    """The count `pin_threads()` would choose before MPI starts."""
    return decide().threads


# -- the BLAS NumPy loaded ----------------------------------------------------------------

@dataclass(frozen=True)
class LoadedBlas:
    name: str
    path: str
    _get: Callable[[], int]
    _set: Callable[[int], None]

    def threads(self) -> int:
        return int(self._get())

    def set_threads(self, n: int) -> None:
        self._set(int(n))


# (library name fragment, name, get symbol, set symbol) for the builds NumPy
# wheels and distributions ship: scipy-openblas (64-bit ints, prefixed and
# suffixed symbols), plain OpenBLAS in both integer widths, and MKL.
_BLAS_SYMBOLS = (
    ("openblas", "OpenBLAS", "scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas", "OpenBLAS", "scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas", "OpenBLAS", "openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas", "OpenBLAS", "openblas_get_num_threads", "openblas_set_num_threads"),
    ("mkl", "MKL", "MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
)


def loaded_blas() -> LoadedBlas | None:
    """The OpenBLAS or MKL this process has loaded (Linux: from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return None
    for fragment, name, get_name, set_name in _BLAS_SYMBOLS:
        for path in sorted(p for p in paths if fragment in os.path.basename(p).lower()):
            try:
                lib = ctypes.CDLL(path)
                getter, setter = getattr(lib, get_name), getattr(lib, set_name)
            except (OSError, AttributeError):
                continue
            getter.restype, getter.argtypes = ctypes.c_int, []
            setter.restype, setter.argtypes = None, [ctypes.c_int]
            return LoadedBlas(name, path, getter, setter)
    return None
