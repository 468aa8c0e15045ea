"""Array-module selection: one code path, NumPy on the CPU or CuPy on a GPU.

Stage code never imports CuPy. It asks this module for the array module
(``xp``) to use, either from a device request (:func:`array_module`) or from
the arrays it was given (:func:`namespace`), and loads CUDA kernels from
``kernels/*.cu`` through :func:`load_kernel`.

The CuPy subset
---------------
dpm uses exactly the CuPy names listed in :data:`CUPY_SUBSET` and nothing else.
The CPU stand-in used in the tests (``tests/cupy_standin.py``) implements the
same list, so the GPU code path of every stage runs in CI with the kernels
compiled for the host through ``kernels/host_shim.h``. Add a name here before
using it anywhere in dpm.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

Device = Literal["auto", "cpu", "gpu"]

#: Every CuPy attribute dpm uses (dotted paths relative to the ``cupy`` module).
CUPY_SUBSET: tuple[str, ...] = (
    "ndarray",
    "asarray",
    "asnumpy",
    "empty",
    "zeros",
    "full",
    "ascontiguousarray",
    "matmul",
    "abs", "arange", "conj", "cumsum", "exp", "float64", "imag", "nonzero", "real", "sum",
    "swapaxes", "take", "take_along_axis", "zeros_like",
    "linalg.eigh", "linalg.eig", "linalg.inv",
    "isfinite",
    "cos", "floor", "log", "log1p", "maximum", "sign", "sin", "sqrt",
    "where",
    "concatenate", "median", "partition", "sort", "fft.fft2",
    "cross", "diagonal", "empty_like", "eye", "minimum", "tile", "linalg.solve",
    "float32",
    "int32",
    "int64",
    "RawModule",
    "cuda.runtime.getDeviceCount",
    "cuda.Device",
    "cuda.Stream.null.synchronize",
)

#: Default options passed to NVRTC / the host compiler for every kernel.
KERNEL_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_DEVICES = ("auto", "cpu", "gpu")


class GPUUnavailableError(RuntimeError):
    """Raised when ``device="gpu"`` is requested and no CUDA device is usable."""


def _import_cupy() -> ModuleType:
    """Import CuPy (the tests replace this function with the CPU stand-in)."""
    import cupy

    return cupy


_cupy_found: dict[Any, ModuleType | None] = {}


def cupy() -> ModuleType | None:
    """Return the CuPy module when it imports and sees a CUDA device, else None.

    The answer is looked up once per importer (so a missing CuPy costs one
    failed import per process, and the tests' stand-in gets its own entry).
    """
    importer = _import_cupy
    if importer not in _cupy_found:
        try:
            cp = importer()
            found = cp if cp.cuda.runtime.getDeviceCount() >= 1 else None
        except Exception:  # ImportError, CUDA driver/runtime errors
            found = None
        _cupy_found[importer] = found
    return _cupy_found[importer]


def resolve_device(device: str | None = None) -> Literal["cpu", "gpu"]:
    """Resolve a device request to ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``. None reads the environment
        variable ``DPM_DEVICE`` (default ``"auto"``). ``"auto"`` selects the GPU
        when CuPy imports and sees a CUDA device.

    Raises
    ------
    ValueError
        If the request is not one of the three names.
    GPUUnavailableError
        If ``"gpu"`` is requested and CuPy or a CUDA device is missing; there
        is never a silent fallback to the CPU.
    """
    requested = device if device is not None else os.environ.get("DPM_DEVICE", "auto")
    requested = str(requested).strip().lower()
    if requested not in _DEVICES:
        source = "DPM_DEVICE" if device is None else "device"
        raise ValueError(f"{source} must be one of {_DEVICES}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    has_gpu = cupy() is not None
    if requested == "gpu" and not has_gpu:
        raise GPUUnavailableError(
            "device='gpu' was requested but no CUDA device is usable: install "
            "dpm[gpu] (CuPy for CUDA 12) on a machine with an NVIDIA GPU, or use "
            "device='cpu'"
        )
    return "gpu" if has_gpu else "cpu"


def array_module(device: str | None = None) -> ModuleType:
    """Return NumPy or CuPy for a device request (see :func:`resolve_device`)."""
    if resolve_device(device) == "gpu":
        return cupy()  # type: ignore[return-value]
    return np


def is_device_array(array: Any) -> bool:
    """True when ``array`` lives on the GPU (a CuPy array)."""
    if type(array) is np.ndarray:  # subclasses may be device arrays (the tests' stand-in)
        return False
    cp = cupy()
    return cp is not None and isinstance(array, cp.ndarray)


def namespace(*arrays: Any) -> ModuleType:
    """Array module of the given arrays: CuPy if any lives on the GPU, else NumPy.

    A row source that is not an array (e.g. :class:`dpm.chunks.PatternRows`)
    names the module of what it returns in its ``array_module`` attribute."""
    if any(is_device_array(a) or getattr(a, "array_module", np) is not np for a in arrays):
        return cupy()  # type: ignore[return-value]
    return np


def to_host(array: Any) -> np.ndarray:
    """Copy an array to host memory (a no-op for NumPy arrays)."""
    if is_device_array(array):
        return cupy().asnumpy(array)  # type: ignore[union-attr]
    return np.asarray(array)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued GPU work (a no-op for NumPy); used around timings."""
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def kernel_dir() -> Path:
    """Folder with the CUDA sources: ``dpm/kernels`` when installed, else ``kernels/``."""
    here = Path(__file__).resolve().parent
    installed = here / "kernels"
    return installed if installed.is_dir() else here.parent / "kernels"


def kernel_source(name: str) -> str:
    """Read ``kernels/NAME.cu``.

    Raises
    ------
    FileNotFoundError
        Naming the path that was looked for.
    """
    path = kernel_dir() / f"{name}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"CUDA kernel source {path} not found")
    return with_headers(path.read_text())


def with_headers(source: str) -> str:
    """``source`` with each ``#include "NAME.cuh"`` line replaced by ``kernels/NAME.cuh``.

    CuPy's RawModule compiles one string; the kernels share device helpers
    through such headers (one level; they include nothing themselves).

    Raises
    ------
    FileNotFoundError
        Naming the header that was looked for.
    """
    def paste(found: re.Match) -> str:
        header = kernel_dir() / found.group(1)
        if not header.is_file():
            raise FileNotFoundError(f"CUDA header {header} not found")
        return header.read_text()

    return re.sub(r'^#include "([\w.]+\.cuh)"[ \t]*$', paste, source, flags=re.MULTILINE)


@functools.lru_cache(maxsize=None)
def _raw_module(cp: ModuleType, name: str) -> Any:
    return cp.RawModule(code=kernel_source(name), options=KERNEL_OPTIONS)


def load_kernel(name: str, function: str) -> Any:
    """Compile ``kernels/NAME.cu`` once per process and return one of its kernels.

    Parameters
    ----------
    name
        File stem in ``kernels/`` (e.g. ``"project"``).
    function
        ``extern "C" __global__`` function in that file.

    Returns
    -------
    kernel
        A CuPy ``RawKernel``, called as ``kernel(grid, block, args,
        shared_mem=bytes)``. CuPy checks no argument: callers pass C-contiguous
        arrays of the dtype the kernel expects and cast scalars to ``np.int32``
        / ``np.float32`` themselves.
    """
    cp = cupy()
    if cp is None:
        raise GPUUnavailableError(f"cannot load kernel {name}.{function}: no CUDA device")
    return _raw_module(cp, name).get_function(function)


def free_memory(xp: ModuleType) -> int:
    """Free memory in bytes on the device that ``xp`` computes on."""
    if xp is np:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 4 * 1024**3
    free, _total = xp.cuda.Device().mem_info
    return int(free)


def memory_budget(xp: ModuleType, budget: int | None = None, fraction: float = 0.5) -> int:
    """Byte budget for a chunked stage: ``budget`` if given, else ``fraction`` of free memory."""
    if budget is not None:
        if budget <= 0:
            raise ValueError(f"memory budget must be positive, got {budget} bytes")
        return int(budget)
    return max(int(free_memory(xp) * fraction), 64 * 1024**2)


def parse_bytes(text: str | int) -> int:
    """Parse a size such as ``"4GB"``, ``"512MiB"`` or ``1000000`` into bytes."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024,
             "TB": 1000**4, "GB": 1000**3, "MB": 1000**2, "KB": 1000,
             "T": 1000**4, "G": 1000**3, "M": 1000**2, "K": 1000, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read memory size {text!r}; use e.g. 4GB or 512MiB") from None
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * factor)
