"""`hpcdl info`: what this machine and this install can do, in one screen.

Everything here is read, never assumed: versions from the imported modules,
the MPI library's own version string, CUDA-awareness as the MPI library
reports it, the thread count this rank would use and why, the thread count
the loaded BLAS and Numba really run with, and the crossover table
`comm.algorithm = "auto"` would follow. Under MPI, rank 0 prints one screen
with a row per rank (host, affinity mask, threads): the quickest check of
a job script's binding.
"""
from __future__ import annotations

import os
import platform


def collect() -> dict:
    from hpcdl import threads

    plan = threads.current() or threads.decide()  # before NumPy loads, as `hpcdl train` decides it
    import numpy

    from hpcdl import __version__, models

    info = {
        "hpcdl": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "host": platform.node(),
        "affinity_mask": f"CPUs {threads.format_cpulist(plan.cpus)} ({len(plan.cpus)} CPUs, {plan.cores} cores)",
        "threads_per_rank": plan.why,
        "blas": _blas_line(threads.loaded_blas()),
        "launcher_world_size": threads.launcher_world_size(),
        "models": models.names(),
    }
    try:
        import numba

        info["numba"] = (f"{numba.__version__} ({numba.get_num_threads()} threads in use, pool of "
                         f"{numba.config.NUMBA_NUM_THREADS})")
    except ImportError:
        info["numba"] = "not installed (fused CPU kernels unavailable)"
    if plan.ranks:
        info["ranks"] = format_rank_table(plan.ranks)
    if plan.notes:
        info["warnings"] = "\n".join(plan.notes)
    try:
        import h5py

        info["h5py"] = f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})"
    except ImportError:
        info["h5py"] = "not installed"
    try:
        from mpi4py import MPI

        import mpi4py

        info["mpi4py"] = mpi4py.__version__
        info["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
        info["mpi_world_size"] = MPI.COMM_WORLD.Get_size()
        info["mpi_rank"] = MPI.COMM_WORLD.Get_rank()
        info["mpi_thread_level"] = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                                    MPI.THREAD_SERIALIZED: "serialized",
                                    MPI.THREAD_MULTIPLE: "multiple"}.get(MPI.Query_thread(), "?")
        from hpcdl.comm import cuda_aware

        aware = cuda_aware()
        info["mpi_cuda_aware"] = {True: "yes", False: "no (CuPy buffers staged through pinned host memory)",
                                  None: "unknown (library does not say; CuPy buffers staged through host)"}[aware]
        from hpcdl import launcher
        from hpcdl.comm import create

        info["launcher"] = launcher.describe()
        ring = create("ring")
        info["allreduce_pieces"] = ring.describe().split(", ", 1)[1]
        info["allreduce_auto"] = create("auto").describe()
    except ImportError:
        info["mpi4py"] = "not installed"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]
        info["cupy"] = f"{cupy.__version__}, {count} device(s): {', '.join(names) or '-'}"
    except ImportError:
        info["cupy"] = "not installed (pip install 'hpcdl[gpu]')"
    except Exception as exc:  # CuPy present but no driver/device
        info["cupy"] = f"installed, no usable device ({type(exc).__name__}: {exc})"
    info["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    return info


def _blas_line(blas) -> str:
    if blas is None:
        return "not found among the loaded libraries (thread count set through the environment only)"
    return f"{blas.name}, {blas.threads()} threads ({os.path.basename(blas.path)})"


def format_rank_table(rows, limit: int = 64) -> str:
    """One line per rank: where it runs, on which CPUs, with how many threads."""
    header = ("rank", "host", "local", "cpus", "threads")
    table = [header] + [(str(r.rank), r.host, str(r.local_rank), r.cpus, str(r.threads)) for r in rows[:limit]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more ranks")
    return "\n".join(lines)


def format_info(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        text = str(value).replace("\n", "\n" + " " * (width + 2))
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
