"""CuPy buffers and MPI: CUDA-awareness detection and pinned-host staging.

A CUDA-aware MPI reads and writes device memory directly, and mpi4py hands
it CuPy arrays through `__cuda_array_interface__`; the algorithms then add
on the device with `cupy.add`. Otherwise the communicator copies the buffer
into pinned host memory once, runs the whole reduction there, and copies the
result back once. The reduction is done on the host in that case because
the ring adds a chunk after every message: adding on the device would cost
two extra PCIe transfers per step, while the host add runs at memory
bandwidth and the device sees just one download and one upload per
allreduce. Pinned (page-locked) memory makes those two copies DMA transfers
at full PCIe speed.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from functools import lru_cache

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _loaded_mpi_library():
    """ctypes handle to the libmpi mpi4py loaded (without loading another one)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libmpi" in line and ".so" in line})
    except OSError:
        paths = []
    for path in paths:
        try:
            return ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return ctypes.CDLL(None)


def _query_mpix() -> bool | None:
    """MPIX_Query_cuda_support(), an extension of both MPICH (>= 4.0) and Open MPI."""
    from mpi4py import MPI

    if not MPI.Is_initialized():  # the query is only valid between MPI_Init and MPI_Finalize
        return None
    try:
        query = _loaded_mpi_library().MPIX_Query_cuda_support
    except (AttributeError, OSError):
        return None
    query.restype = ctypes.c_int
    query.argtypes = []
    return bool(query())


def _query_ompi_info() -> bool | None:
    if shutil.which("ompi_info") is None:
        return None
    try:
        out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "mpi_built_with_cuda_support:value:" in line:
            return line.rsplit(":", 1)[-1].strip() == "true"
    return None


@lru_cache(maxsize=1)
def cuda_aware() -> bool | None:
    """Whether MPI accepts device pointers: True, False, or None when it cannot be told.

    In order: the HPCDL_CUDA_AWARE override (1/0); MPIX_Query_cuda_support
    from the loaded library; launcher hints (Cray MPICH_GPU_SUPPORT_ENABLED,
    MVAPICH2 MV2_USE_CUDA, Open MPI OMPI_MCA_opal_cuda_support); `ompi_info`.
    Unknown counts as not CUDA-aware for the data path (staging is slower but
    always correct).
    """
    for source in (
        lambda: _env_flag("HPCDL_CUDA_AWARE"),
        _query_mpix,
        lambda: _env_flag("MPICH_GPU_SUPPORT_ENABLED"),
        lambda: _env_flag("MV2_USE_CUDA"),
        lambda: _env_flag("OMPI_MCA_opal_cuda_support"),
        _query_ompi_info,
    ):
        answer = source()
        if answer is not None:
            return answer
    return None


def pinned_empty(n: int, dtype):
    """A NumPy array of n elements in page-locked host memory."""
    import cupyx

    return cupyx.empty_pinned((max(int(n), 1),), dtype=dtype)


def download(device_buf, host_buf) -> None:
    """Device -> pinned host, complete on return (MPI reads `host_buf` next)."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    device_buf.get(out=host_buf, stream=stream)
    stream.synchronize()


def upload(host_buf, device_buf) -> None:
    """Pinned host -> device, ordered on the current stream before later kernels."""
    import cupy

    device_buf.set(host_buf, stream=cupy.cuda.get_current_stream())


# Node-local rank as launchers export it, before MPI is initialised.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK", "PMIX_LOCAL_RANK")


def launcher_local_rank(env=None) -> int | None:
    env = os.environ if env is None else env
    for var in LOCAL_RANK_VARS:
        value = env.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def select_device_before_mpi(env=None) -> int | None:
    """Make device (local rank mod visible devices) current before MPI_Init; returns it, or None.

    Open MPI (and UCX) look at the current CUDA context during MPI_Init to set
    up device-memory transports, so the choice must come first. The CUDA
    runtime is called through ctypes: importing CuPy would load NumPy, which
    must wait until the thread count is pinned. Without a launcher's local
    rank, or without libcudart, nothing happens and `backend.use_device`
    chooses later as before (the same device: it uses the same local rank).
    """
    local = launcher_local_rank(env)
    if local is None:
        return None
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    count = ctypes.c_int(0)
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    device = local % count.value
    return device if cudart.cudaSetDevice(device) == 0 else None


def device_nonblocking_collectives() -> bool:
    """Whether MPI's non-blocking collectives accept device buffers.

    CUDA-aware point-to-point does not imply it: Open MPI's CUDA support
    has long listed non-blocking collectives on device memory as unsupported
    (its CUDA FAQ), while MPICH's GPU support covers them. HPCDL_DEVICE_NBC=1/0
    overrides; unknown counts as no (the native communicator then blocks).
    """
    flag = _env_flag("HPCDL_DEVICE_NBC")
    if flag is not None:
        return flag
    from mpi4py import MPI

    return MPI.Get_library_version().lstrip().startswith("MPICH") and bool(cuda_aware())
