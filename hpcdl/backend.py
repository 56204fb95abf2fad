"""Array backend: NumPy on the host, CuPy on a GPU.

`xp` is NumPy, or CuPy after `use_device("gpu")`. Layer code never asks the
global: it takes the module that owns its input (`array_module`), so the
same layer runs on host and device arrays.

Threads per rank are set in `hpcdl.threads`, which must run before this
module imports NumPy.
"""
from __future__ import annotations

import numpy

xp = numpy
device = "cpu"


def use_device(name: str, local_rank: int = 0):
    """Select "cpu" (NumPy) or "gpu" (CuPy on device local_rank mod visible devices)."""
    global xp, device
    if name == "cpu":
        xp, device = numpy, "cpu"
        return xp
    if name != "gpu":
        from hpcdl.errors import ConfigError

        raise ConfigError(f"runtime.device: unknown device {name!r}; expected 'cpu' or 'gpu'")
    try:
        import cupy
    except ImportError as exc:
        from hpcdl.errors import ConfigError

        raise ConfigError("runtime.device = 'gpu' needs CuPy: pip install 'hpcdl[gpu]'") from exc
    count = cupy.cuda.runtime.getDeviceCount()
    if count == 0:
        from hpcdl.errors import ConfigError

        raise ConfigError("runtime.device = 'gpu' but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    cupy.cuda.Device(local_rank % count).use()
    xp, device = cupy, "gpu"
    return xp


def array_module(array):
    """numpy or cupy, whichever owns `array`."""
    if isinstance(array, numpy.ndarray) or numpy.isscalar(array):
        return numpy
    try:
        import cupy

        return cupy.get_array_module(array)
    except ImportError:
        return numpy


def is_device_array(array) -> bool:
    return array_module(array) is not numpy


def to_host(array) -> numpy.ndarray:
    """A NumPy copy (or the array itself when it is already on the host)."""
    if isinstance(array, numpy.ndarray):
        return array
    return array.get()


def synchronize(array=None) -> None:
    """Wait for the device stream so MPI sees finished data; a no-op on the host."""
    if array is not None and not is_device_array(array):
        return
    if device == "gpu" or array is not None:
        import cupy

        cupy.cuda.get_current_stream().synchronize()
