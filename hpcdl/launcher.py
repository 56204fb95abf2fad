"""Start-up check that MPI sees the world the launcher started.

The classic mistakes, `srun` without the right `--mpi=` plugin and the
`mpirun` of one MPI starting an mpi4py built against another, do not fail:
each process initialises MPI as a world of one and every task trains alone
as "rank 0", into the same run directory. The launcher's own variables say
how many processes it started, so comparing them with MPI's world size
catches it before any work is done.

Which variables describe *this* process's launch, most specific first:

* Open MPI `mpirun`/`prterun`: `OMPI_COMM_WORLD_SIZE` / `OMPI_COMM_WORLD_RANK`;
* MPICH Hydra, Intel MPI, PMI-1/PMI-2 (also `srun --mpi=pmi2`): `PMI_SIZE` / `PMI_RANK`;
* PMIx (`srun --mpi=pmix`, prterun): `PMIX_RANK` (PMIx exports no size variable);
* an `srun` step: `SLURM_STEP_NUM_TASKS` / `SLURM_PROCID`, or `SLURM_NTASKS` when
  `SLURM_STEP_ID` and `SLURM_LOCALID` show we are inside a step.

The MPI launchers come first because Open MPI's `mpirun` inside an
allocation starts its daemons with `srun`, one per node, so the ranks
inherit a step's Slurm variables that count nodes, not ranks. `SLURM_NTASKS`
alone (inside `salloc` or an `sbatch` script, no step) describes the
allocation, not this process: a plain single process there is fine.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping

from hpcdl.errors import UserError


class LauncherMismatch(UserError):
    """MPI's world differs from what the launcher started."""


@dataclass(frozen=True)
class Announced:
    size: int | None  # None when the launcher exports only a rank (PMIx)
    rank: int | None
    source: str  # the variables that said so, e.g. "OMPI_COMM_WORLD_SIZE=4"
    kind: str  # "openmpi", "pmi", "pmix", "slurm"


def _int(env: Mapping[str, str], var: str) -> int | None:
    value = env.get(var, "").strip()
    return int(value) if value.isdigit() else None


def announced(env: Mapping[str, str] | None = None) -> Announced | None:
    """What the launcher of this process says about the world, or None when no launcher says."""
    env = os.environ if env is None else env
    size, rank = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK")
    if size is not None:
        return Announced(size, rank, f"OMPI_COMM_WORLD_SIZE={size}", "openmpi")
    size, rank = _int(env, "PMI_SIZE"), _int(env, "PMI_RANK")
    if size is not None:
        return Announced(size, rank, f"PMI_SIZE={size}", "pmi")
    rank = _int(env, "PMIX_RANK")
    if rank is not None:
        return Announced(_int(env, "PMIX_SIZE"), rank, f"PMIX_RANK={rank}", "pmix")
    size = _int(env, "SLURM_STEP_NUM_TASKS")
    var = "SLURM_STEP_NUM_TASKS"
    if size is None and "SLURM_STEP_ID" in env and "SLURM_LOCALID" in env:
        size, var = _int(env, "SLURM_NTASKS"), "SLURM_NTASKS"
    if size is not None:
        return Announced(size, _int(env, "SLURM_PROCID"), f"{var}={size} (an srun step)", "slurm")
    return None


def _advice(kind: str) -> str:
    if kind == "slurm":
        return ("srun is not handing its process layout to this MPI: launch with the PMI plugin your MPI was built "
                "for (try `srun --mpi=pmix`, `srun --mpi=list` shows them), or use the MPI's own mpiexec")
    if kind == "openmpi":
        return ("this is Open MPI's mpirun but mpi4py uses a different MPI: launch with that MPI's mpiexec, or build "
                "mpi4py against the site MPI (`pip install --no-binary=mpi4py mpi4py` after `module load` of it)")
    return ("the launcher and the MPI library mpi4py loaded do not talk to each other: launch with the mpiexec of "
            "the MPI mpi4py was built with, or build mpi4py against the site MPI "
            "(`pip install --no-binary=mpi4py mpi4py`)")


def mismatch(said: Announced | None, mpi_size: int, mpi_rank: int, library: str = "") -> str | None:
    """The one-line complaint when MPI's (size, rank) contradict the launcher's, else None."""
    if said is None:
        return None
    wrong_size = said.size is not None and said.size != mpi_size
    wrong_rank = said.rank is not None and said.rank >= mpi_size
    if not (wrong_size or wrong_rank):
        return None
    started = f"{said.size} processes" if said.size is not None else f"a process of rank {said.rank}"
    lib = f" ({library})" if library else ""
    return (f"launcher mismatch: the launcher started {started} ({said.source}) but MPI{lib} sees a world of "
            f"{mpi_size}; every process would train alone as rank 0. {_advice(said.kind)}")


def check(env: Mapping[str, str] | None = None) -> None:
    """Raise `LauncherMismatch` (exit 2) when MPI's world is not the launcher's; initialises MPI only under a launcher.

    Cheap: one environment read, and when a launcher is present the MPI
    initialisation `pin_threads` would do next anyway. Only the process the
    launcher calls rank 0 prints the line; the others exit 2 quietly, so a
    job of 64 tasks does not print it 64 times.
    """
    said = announced(env)
    if said is None or (said.size is not None and said.size <= 1 and not said.rank):
        return
    with warnings.catch_warnings(record=True) as caught:
        # mpi4py warns "suspicious MPI execution environment" for OMPI_* under MPICH;
        # the line below says the same with both sizes and the fix.
        warnings.simplefilter("always")
        try:
            from mpi4py import MPI
        except ImportError:
            return  # no mpi4py: comm.create will say so
    world = MPI.COMM_WORLD
    library = " ".join(MPI.Get_library_version().split()[:3])
    text = mismatch(said, world.Get_size(), world.Get_rank(), library[:40])
    if text is None:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return
    error = LauncherMismatch(text)
    error.collective = True
    error.quiet = bool(said.rank)  # only the launcher's rank 0 speaks
    raise error


def describe(env: Mapping[str, str] | None = None) -> str:
    """For `hpcdl info`: what the launcher said, and whether MPI agrees (when MPI is already up)."""
    said = announced(env)
    if said is None:
        return "no MPI launcher variables (a plain process)"
    text = f"{said.source}" + (f", rank {said.rank}" if said.rank is not None else "")
    try:
        from mpi4py import MPI
    except ImportError:
        return text + "; mpi4py missing"
    if not MPI.Is_initialized():
        return text
    problem = mismatch(said, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank())
    return text + ("; MPI agrees" if problem is None else f"; MISMATCH: MPI sees {MPI.COMM_WORLD.Get_size()}")
