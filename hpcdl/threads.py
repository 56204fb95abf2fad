"""Threads per rank, decided before NumPy loads.

One BLAS/Numba thread per rank under MPI unless the launcher or the user says
otherwise. This module imports nothing heavy: `pin_threads` must run before
NumPy is imported for the BLAS part to take effect, which is why `hpcdl.cli`
calls it first.
"""
from __future__ import annotations

import os

# Environment variables MPI launchers set on every rank; their presence means
# we run under MPI with (possibly) several ranks per node.
_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
# NUMBA_NUM_THREADS is left alone: it caps Numba's pool for the whole process,
# while numba.set_num_threads below only sets how much of it is used.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def launcher_world_size() -> int:
    """World size as the launcher announced it, before MPI is initialised."""
    for var in _WORLD_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def default_threads() -> int:
    """Threads per rank when the user gave none.

    Honours OMP_NUM_THREADS, then Slurm's --cpus-per-task; otherwise one
    thread per rank under MPI (ranks already fill the cores) and every core
    the process may run on when it is alone.
    """
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    if launcher_world_size() > 1:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pin_threads(threads: int | None = None) -> int:
    """Set the thread count for BLAS and Numba; returns the count used.

    Before NumPy loads, the environment variables are enough. After, we also
    ask the loaded OpenBLAS/MKL through threadpoolctl when it is installed,
    and Numba directly.
    """
    n = int(threads) if threads else default_threads()
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    try:  # optional: lets a late call still change a loaded BLAS
        import threadpoolctl

        threadpoolctl.threadpool_limits(n)
    except ImportError:
        pass
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    return n
