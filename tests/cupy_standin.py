"""CPU stand-in for the CuPy subset dpm uses (``dpm.backend.CUPY_SUBSET``).

The tests patch ``dpm.backend._import_cupy`` to return :func:`build` ``()``, so
the GPU code path of every stage (launch geometry, transfers, chunking) runs on
a machine without a GPU, with the CUDA kernels compiled for the host by
``tests/hostcuda.py``.

The namespace holds exactly the names in ``CUPY_SUBSET``: stage code that uses
an unlisted CuPy name fails with AttributeError. Device arrays are
:class:`ndarray`, a subclass of ``numpy.ndarray``. Beyond what NumPy would
allow, the stand-in fails where real CuPy fails:

* mixing a device array with a host (non-0-d) NumPy array, list or tuple in a
  ufunc or NumPy function raises TypeError;
* ``asarray`` copies host data (a transfer); ``asnumpy`` returns a host copy;
* reductions and scalar indexing return 0-d device arrays, as CuPy does, so a
  device "scalar" passed to a kernel is caught as an array;
* kernels check every argument more strictly than CuPy (see ``hostcuda``).

Known gap: ``numpy.asarray(device_array)`` silently returns a host view here,
while CuPy raises TypeError; use ``backend.to_host``.
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from dpm.backend import CUPY_SUBSET, kernel_dir, kernel_source


class ndarray(np.ndarray):
    """A device array: NumPy memory that host NumPy arrays may not mix with."""

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out", ())
        _reject_host_arrays(f"cupy.{ufunc.__name__}", (*inputs, *out), allow_sequences=False)
        if out:
            kwargs["out"] = tuple(_host_view(o) for o in out)
        result = getattr(ufunc, method)(*(_host_view(x) for x in inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
        return _call_on_device(func, f"cupy.{func.__name__}", args, kwargs)

    def __getitem__(self, key: Any) -> Any:
        return _to_device(super().__getitem__(key))

    def __repr__(self) -> str:
        return repr(self.view(np.ndarray))

    def __str__(self) -> str:
        return str(self.view(np.ndarray))

    def get(self) -> np.ndarray:
        """Copy to a host NumPy array (``cupy.ndarray.get``)."""
        return asnumpy(self)


def _host_view(value: Any) -> Any:
    """A plain NumPy view of a device array (anything else unchanged)."""
    return value.view(np.ndarray) if isinstance(value, ndarray) else value


def _is_host_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim > 0


def _flatten(value: Any) -> list[Any]:
    """Leaves of nested tuples, lists and dicts."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    if isinstance(value, dict):
        return _flatten(list(value.values()))
    return [value]


def _map_leaves(value: Any, func: Callable[[Any], Any]) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_map_leaves(v, func) for v in value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, func) for k, v in value.items()}
    return func(value)


def _reject_host_arrays(where: str, values: Sequence[Any], *, allow_sequences: bool) -> None:
    """Raise TypeError, as CuPy does, for a host array among device arguments."""
    for value in values if not allow_sequences else _flatten(list(values)):
        if _is_host_array(value):
            raise TypeError(f"{where}: got a host numpy.ndarray of shape {value.shape}; CuPy "
                            "does not mix host and device arrays: transfer it with cp.asarray")
        if not allow_sequences and isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: unsupported type {type(value).__name__}; CuPy ufuncs "
                            "take arrays and scalars only")


def _to_device(result: Any) -> Any:
    """Wrap NumPy results as device arrays (scalars become 0-d arrays, as in CuPy)."""
    if isinstance(result, ndarray):
        return result
    if isinstance(result, np.ndarray):
        return result.view(ndarray)
    if isinstance(result, np.generic):
        return np.asarray(result).view(ndarray)
    if type(result) is tuple:
        return tuple(_to_device(r) for r in result)
    if isinstance(result, tuple):  # a named tuple such as numpy.linalg's results
        return type(result)(*(_to_device(r) for r in result))
    return result


def _call_on_device(func: Callable, where: str, args: tuple, kwargs: dict) -> Any:
    """Run a NumPy function on device arguments; the result lives on the device."""
    _reject_host_arrays(where, (args, kwargs), allow_sequences=True)
    result = func(*_map_leaves(args, _host_view), **_map_leaves(kwargs, _host_view))
    out = kwargs.get("out")
    return out if isinstance(out, ndarray) else _to_device(result)


def asarray(a: Any, dtype: Any = None, order: str | None = None) -> ndarray:
    """Host → device copy (a device array needing no conversion is returned as is)."""
    if isinstance(a, ndarray):
        return a.astype(a.dtype if dtype is None else dtype, order=order or "K", copy=False)
    return np.array(a, dtype=dtype, order=order or "K", copy=True).view(ndarray)


def asnumpy(a: Any) -> np.ndarray:
    """Device → host copy (host input is returned as a NumPy array, uncopied)."""
    if isinstance(a, ndarray):
        return np.array(a.view(np.ndarray), copy=True)
    return np.asarray(a)


def ascontiguousarray(a: ndarray, dtype: Any = None) -> ndarray:
    """C-contiguous device array; like CuPy, it takes device arrays only."""
    if not isinstance(a, ndarray):
        raise TypeError(f"cupy.ascontiguousarray: argument 'a' has incorrect type (expected "
                        f"cupy.ndarray, got {type(a).__name__})")
    return np.ascontiguousarray(a.view(np.ndarray), dtype=dtype).view(ndarray)


class RawModule:
    """``cupy.RawModule``: the source compiled for the host by ``hostcuda``."""

    def __init__(self, code: str, *, options: Sequence[str] = ()):
        import hostcuda

        self._module = hostcuda.compile_module(code, options, label=_source_label(code))

    def get_function(self, name: str) -> Any:
        """The kernel ``name`` (a ``hostcuda.HostKernel``)."""
        return self._module.get_function(name)


def _source_label(code: str) -> str:
    """Stem of the ``kernels/*.cu`` file holding ``code`` (for compiler messages)."""
    for path in sorted(kernel_dir().glob("*.cu")):
        if kernel_source(path.stem) == code:
            return path.stem
    return "rawmodule"


class Device:
    """``cupy.cuda.Device``; its memory is the host's."""

    def __init__(self, device: int | None = None):
        if device not in (None, 0):
            raise ValueError(f"the stand-in has one device (0), got {device}")

    @property
    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes, from /proc/meminfo."""
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields["MemAvailable"], fields["MemTotal"]


#: Stand-ins for CuPy names that are not NumPy names, or differ from them.
SPECIAL: dict[str, Any] = {
    "ndarray": ndarray,
    "asarray": asarray,
    "asnumpy": asnumpy,
    "ascontiguousarray": ascontiguousarray,
    "RawModule": RawModule,
    "cuda.runtime.getDeviceCount": lambda: 1,
    "cuda.Device": Device,
    "cuda.Stream.null.synchronize": lambda: None,
}


def _from_numpy(name: str) -> Any:
    """The NumPy attribute ``name``: types and constants as is, functions on device."""
    try:
        value = functools.reduce(getattr, name.split("."), np)
    except AttributeError:
        raise AttributeError(
            f"CUPY_SUBSET lists cupy.{name}, which is neither a NumPy name nor in "
            "tests/cupy_standin.SPECIAL: implement it there"
        ) from None
    if isinstance(value, type) or not callable(value):
        return value

    @functools.wraps(value)
    def on_device(*args: Any, **kwargs: Any) -> Any:
        return _call_on_device(value, f"cupy.{name}", args, kwargs)

    return on_device


def build(subset: Sequence[str] = CUPY_SUBSET) -> ModuleType:
    """A ``cupy`` module holding exactly the dotted names in ``subset``."""
    module = ModuleType("cupy", "CPU stand-in for CuPy (tests/cupy_standin.py)")
    for name in subset:
        *parents, leaf = name.split(".")
        node: Any = module
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
        setattr(node, leaf, SPECIAL[name] if name in SPECIAL else _from_numpy(name))
    return module
