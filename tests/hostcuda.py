"""Compile CUDA kernels for the host and call them like CuPy ``RawKernel`` s.

A ``.cu`` source is compiled by g++ with OpenMP, with ``kernels/host_shim.h``
force-included (see that file for the execution model and the conventions
kernel authors follow). For every ``extern "C" __global__ void NAME(...)`` a
launcher ``dpm_launch_NAME(gx, gy, gz, bx, by, bz, shared_mem, args)`` is
generated, where ``args[i]`` points at the i-th argument (cuLaunchKernel's
``kernelParams`` convention). Libraries are cached on disk, keyed by a hash of
the source, the shim, the flags and the compiler.

Arguments are checked more strictly than CuPy checks them, so that a launch
that would silently corrupt memory on a GPU fails here: arrays must be device
arrays of the stand-in (C-contiguous, dtype matching the pointee), scalars the
exact NumPy scalar type of the parameter, and the launch geometry within the
limits of an H100.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dpm import backend

# Threads of a block outnumber the cores, so spinning at barriers only steals
# time from the thread being waited for; set before libgomp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CXX = os.environ.get("CXX", "g++")
CXX_FLAGS: tuple[str, ...] = ("-x", "c++", "-O2", "-fopenmp", "-fPIC", "-shared")

MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
#: Dynamic shared memory a kernel may use without raising its attribute.
DEFAULT_DYNAMIC_SHARED = 48 * 1024
#: Shared memory one H100 block may use (opt-in maximum).
MAX_SHARED = 227 * 1024

#: NumPy dtype of each C scalar type a kernel parameter may have (or point to).
C_TYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for names, dtype in [
        (("float",), np.float32),
        (("double",), np.float64),
        (("bool",), np.bool_),
        (("signed char", "int8_t"), np.int8),
        (("unsigned char", "uint8_t"), np.uint8),
        (("short", "short int", "int16_t"), np.int16),
        (("unsigned short", "unsigned short int", "uint16_t"), np.uint16),
        (("int", "signed", "signed int", "int32_t"), np.int32),
        (("unsigned", "unsigned int", "uint32_t"), np.uint32),
        (("long", "long int", "long long", "long long int", "int64_t"), np.int64),
        (("unsigned long", "unsigned long long", "unsigned long long int", "uint64_t",
          "size_t"), np.uint64),
    ]
    for name in names
}

_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict"}
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\(\s*(\d+)[^)]*\)\s*)?void\s+'
    r"(?:__launch_bounds__\s*\(\s*(\d+)[^)]*\)\s*)?(\w+)\s*\(([^)]*)\)"
)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)


class HostCompileError(RuntimeError):
    """A source failed to compile; the message holds the compiler output."""


@dataclass(frozen=True)
class Parameter:
    """One kernel parameter: ``ctype`` as written (qualifiers dropped)."""

    name: str
    ctype: str
    dtype: np.dtype
    is_pointer: bool

    @property
    def size(self) -> int:
        """Bytes the argument occupies in the parameter buffer."""
        return ctypes.sizeof(ctypes.c_void_p) if self.is_pointer else self.dtype.itemsize


@dataclass(frozen=True)
class KernelSignature:
    """``extern "C" __global__`` kernel: name, parameters, ``__launch_bounds__``."""

    name: str
    parameters: tuple[Parameter, ...]
    max_threads: int


def parse_parameter(text: str, kernel: str) -> Parameter:
    """Parse one parameter declaration such as ``const float* __restrict__ x``.

    Raises
    ------
    ValueError
        For a type the harness cannot marshal (unknown scalar, pointer to
        pointer, array or vector type), naming the kernel and the parameter.
    """
    tokens = re.findall(r"[A-Za-z_]\w*|\*|\S", text)
    words = [t for t in tokens if t not in _QUALIFIERS]
    if len(words) < 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[-1]):
        raise ValueError(f"kernel {kernel}: cannot parse parameter {text.strip()!r}")
    name, type_words = words[-1], words[:-1]
    stars = type_words.count("*")
    base = " ".join(w for w in type_words if w != "*")
    if base not in C_TYPES or stars > 1 or (stars == 1 and type_words[-1] != "*"):
        raise ValueError(
            f"kernel {kernel}: parameter {name!r} has type {text.strip()!r}; the host "
            f"harness passes scalars or pointers to one of {sorted(set(C_TYPES))}"
        )
    return Parameter(name, base + "*" * stars, C_TYPES[base], stars == 1)


def parse_kernels(source: str) -> tuple[KernelSignature, ...]:
    """Every ``extern "C" __global__ void NAME(params)`` in a CUDA source."""
    kernels = []
    for match in _KERNEL.finditer(_COMMENT.sub(" ", source)):
        bounds_before, bounds_after, name, params = match.groups()
        bounds = bounds_before or bounds_after
        texts = [p for p in params.split(",") if p.strip() not in ("", "void")]
        kernels.append(KernelSignature(
            name,
            tuple(parse_parameter(p, name) for p in texts),
            int(bounds) if bounds else MAX_THREADS_PER_BLOCK,
        ))
    return tuple(kernels)


def launcher_source(kernels: Sequence[KernelSignature]) -> str:
    """C++ launchers (``dpm_launch_NAME``, ``dpm_sizes_NAME``) for the kernels."""
    lines = ['#line 1 "<dpm host launchers>"']
    for k in kernels:
        lines += [
            f'extern "C" int dpm_launch_{k.name}(unsigned gx, unsigned gy, unsigned gz,',
            "    unsigned bx, unsigned by, unsigned bz, std::size_t shared_mem, void** args) {",
            f"  return ::dpm_shim::launch({k.name}, dim3(gx, gy, gz), dim3(bx, by, bz),"
            " shared_mem, args);",
            "}",
            f'extern "C" int dpm_sizes_{k.name}(std::size_t* sizes) {{',
            f"  return ::dpm_shim::parameter_sizes({k.name}, sizes);",
            "}",
        ]
    return "\n".join(lines) + "\n"


def shim_path() -> Path:
    """``kernels/host_shim.h`` (inside the installed package when installed)."""
    return backend.kernel_dir() / "host_shim.h"


def host_flags(options: Sequence[str]) -> list[str]:
    """Translate NVRTC options into g++ flags (``-std``, ``-D``, ``-I`` only).

    Raises
    ------
    ValueError
        For any other option: the harness must learn it before dpm uses it.
    """
    flags = []
    for option in options:
        if option.startswith(("-std=", "--std=")):
            flags.append("-std=" + option.split("=", 1)[1])
        elif option.startswith(("-D", "-I")):
            flags.append(option)
        else:
            raise ValueError(
                f"kernel option {option!r} has no host equivalent in tests/hostcuda.py; "
                "supported: -std=..., -D..., -I..."
            )
    return flags


def cache_dir() -> Path:
    """Folder for compiled libraries: ``$DPM_HOSTCUDA_CACHE`` or one under the temp dir."""
    default = Path(tempfile.gettempdir()) / f"dpm-hostcuda-{os.getuid()}"
    path = Path(os.environ.get("DPM_HOSTCUDA_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    found = shutil.which(compiler)
    if found is None:
        raise HostCompileError(f"compiler {compiler!r} not found on PATH")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
    return found + "\n" + version.stdout


def _cached_build(label: str, suffix: str, source: str, command: list[str],
                  identity: str) -> Path:
    """Run ``command SOURCE -o OUT`` once per (source, command, identity); return OUT.

    Builds land in :func:`cache_dir` under a name holding the hash, so a cached
    file is reused across processes and a changed source is rebuilt.
    """
    key = hashlib.sha256("\0".join([source, " ".join(command), identity]).encode())
    target = cache_dir() / f"{label}-{key.hexdigest()[:24]}{suffix}"
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        unit = work / f"{label}.cu"
        unit.write_text(source)
        built = work / f"out{suffix}"
        result = subprocess.run([*command, str(unit), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise HostCompileError(f"compiling {label}.cu failed:\n$ {' '.join(command)} "
                                   f"{unit.name}\n{result.stderr}{result.stdout}")
        os.replace(built, target)  # atomic: concurrent test runs may race here
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def compile_module(source: str, options: Sequence[str] = (), *,
                   label: str = "module") -> HostModule:
    """Compile a CUDA source for the host.

    Parameters
    ----------
    source
        CUDA C++ with ``extern "C" __global__`` kernels.
    options
        NVRTC options, as given to ``cupy.RawModule`` (see :func:`host_flags`).
    label
        Name used in compiler messages and in the cached file's name.

    Raises
    ------
    HostCompileError
        With the compiler's output.
    """
    kernels = parse_kernels(source)
    unit = f'#line 1 "{label}.cu"\n{source}\n{launcher_source(kernels)}'
    shim = shim_path()
    command = [CXX, *CXX_FLAGS, *host_flags(options), "-include", str(shim)]
    library = _cached_build(label, ".so", unit, command,
                            _compiler_identity(CXX) + shim.read_text())
    return HostModule(_load(str(library)), kernels, label)


@functools.lru_cache(maxsize=None)
def _load(library: str) -> ctypes.CDLL:
    return ctypes.CDLL(library)


def compile_kernel_file(name: str) -> HostModule:
    """Compile ``kernels/NAME.cu`` with dpm's kernel options."""
    return compile_module(backend.kernel_source(name), backend.KERNEL_OPTIONS, label=name)


class HostModule:
    """The host build of one CUDA source (cf. ``cupy.RawModule``)."""

    def __init__(self, library: ctypes.CDLL, kernels: Sequence[KernelSignature], label: str):
        self.label = label
        self._kernels = {k.name: HostKernel(library, k) for k in kernels}

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """Names of the ``extern "C" __global__`` kernels in the source."""
        return tuple(self._kernels)

    def get_function(self, name: str) -> HostKernel:
        """The kernel called ``name``.

        Raises
        ------
        LookupError
            Listing the kernels the source defines.
        """
        if name not in self._kernels:
            raise LookupError(f"{self.label}.cu has no extern \"C\" __global__ kernel "
                              f"{name!r}; it defines {list(self._kernels)}")
        return self._kernels[name]


class HostKernel:
    """One kernel of a :class:`HostModule`, called like a CuPy ``RawKernel``.

    Attributes
    ----------
    max_dynamic_shared_size_bytes
        As on ``cupy.RawKernel``: launches may use at most this much dynamic
        shared memory (48 KiB until raised, at most 227 KiB on an H100).
    """

    def __init__(self, library: ctypes.CDLL, signature: KernelSignature):
        self.signature = signature
        self.name = signature.name
        self._max_dynamic_shared = DEFAULT_DYNAMIC_SHARED
        self._launch = getattr(library, f"dpm_launch_{self.name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t, ctypes.c_void_p]
        self._check_parameter_sizes(getattr(library, f"dpm_sizes_{self.name}"))

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        if not 0 <= value <= MAX_SHARED:
            raise ValueError(f"kernel {self.name}: max_dynamic_shared_size_bytes must be in "
                             f"[0, {MAX_SHARED}] on an H100, got {value}")
        self._max_dynamic_shared = int(value)

    def _check_parameter_sizes(self, sizes_function: Any) -> None:
        """Compare the parsed signature with the one the compiler saw."""
        sizes = (ctypes.c_size_t * 4096)()  # CUDA allows at most 32764 parameter bytes
        count = sizes_function(sizes)
        parsed = [p.size for p in self.signature.parameters]
        if list(sizes[:count]) != parsed:
            raise HostCompileError(
                f"kernel {self.name}: parsed parameter sizes {parsed} differ from the "
                f"compiled ones {list(sizes[:count])}; tests/hostcuda.py misread its signature"
            )

    def __call__(self, grid: int | tuple[int, ...], block: int | tuple[int, ...],
                 args: tuple | list, *, shared_mem: int = 0) -> None:
        """Launch on ``grid`` blocks of ``block`` threads (CuPy's call signature).

        Raises
        ------
        TypeError
            For an argument that CuPy would pass but the kernel would misread.
        ValueError
            For a launch configuration an H100 would refuse.
        RuntimeError
            When OpenMP cannot run a block as one team.
        """
        grid3 = _dims("grid", grid, MAX_GRID_DIM, self.name)
        block3 = _dims("block", block, MAX_BLOCK_DIM, self.name)
        self._check_geometry(block3, shared_mem)
        buffers = self._marshal(args)
        pointers = (ctypes.c_void_p * max(len(buffers), 1))(*(b.ctypes.data for b in buffers))
        team = self._launch(*grid3, *block3, shared_mem, pointers)
        if team != 0:
            raise RuntimeError(
                f"kernel {self.name}: OpenMP ran a block of {np.prod(block3)} threads with "
                f"{team}; check OMP_THREAD_LIMIT and the process limit (ulimit -u)"
            )

    def _check_geometry(self, block: tuple[int, int, int], shared_mem: int) -> None:
        threads = block[0] * block[1] * block[2]
        limit = min(MAX_THREADS_PER_BLOCK, self.signature.max_threads)
        if threads > limit:
            raise ValueError(f"kernel {self.name}: block {block} has {threads} threads; "
                             f"at most {limit} are allowed")
        if not 0 <= shared_mem <= self.max_dynamic_shared_size_bytes:
            raise ValueError(
                f"kernel {self.name}: shared_mem={shared_mem} bytes exceeds the kernel's "
                f"max_dynamic_shared_size_bytes={self.max_dynamic_shared_size_bytes}; raise "
                f"that attribute first (an H100 allows up to {MAX_SHARED})"
            )

    def _marshal(self, args: tuple | list) -> list[np.ndarray]:
        """One buffer holding each argument's value (pointer or scalar bytes)."""
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"kernel {self.name}: args must be a tuple, got {type(args).__name__}")
        params = self.signature.parameters
        if len(args) != len(params):
            raise TypeError(f"kernel {self.name} takes {len(params)} arguments "
                            f"({', '.join(p.name for p in params)}), got {len(args)}")
        return [self._marshal_one(p, a) for p, a in zip(params, args)]

    def _marshal_one(self, param: Parameter, value: Any) -> np.ndarray:
        where = f"kernel {self.name}: parameter {param.name!r} ({param.ctype})"
        if param.is_pointer:
            return np.array([_device_pointer(where, param.dtype, value)], dtype=np.uintp)
        return np.array(_exact_scalar(where, param.dtype, value), dtype=param.dtype)


def _dims(kind: str, value: Any, limits: tuple[int, int, int], kernel: str) -> tuple[int, int, int]:
    """Normalise a grid or block (int or 1–3 ints) to three positive ints."""
    dims = value if isinstance(value, tuple) else (value,)
    if not 1 <= len(dims) <= 3 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims
    ):
        raise ValueError(f"kernel {kernel}: {kind} must be an int or a tuple of 1-3 ints, "
                         f"got {value!r}")
    dims3 = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if not all(1 <= d <= m for d, m in zip(dims3, limits)):
        raise ValueError(f"kernel {kernel}: {kind} {dims3} outside 1..{limits}")
    return dims3  # type: ignore[return-value]


def _device_pointer(where: str, dtype: np.dtype, value: Any) -> int:
    """Data pointer of a C-contiguous stand-in device array of ``dtype``."""
    from cupy_standin import ndarray as device_array

    if not isinstance(value, device_array):
        raise TypeError(f"{where}: expected a device array (cupy.ndarray) of {dtype}, got "
                        f"{type(value).__module__}.{type(value).__name__}; a host array "
                        "must be copied with cp.asarray first")
    if value.dtype != dtype:
        raise TypeError(f"{where}: expected dtype {dtype}, got {value.dtype}; the kernel "
                        "would reinterpret the bytes")
    if not value.flags.c_contiguous:
        raise TypeError(f"{where}: array of shape {value.shape} with strides {value.strides} "
                        "is not C-contiguous; pass cp.ascontiguousarray(...)")
    return value.__array_interface__["data"][0]


def _exact_scalar(where: str, dtype: np.dtype, value: Any) -> np.generic:
    """``value`` if it is a NumPy scalar of exactly ``dtype``."""
    if isinstance(value, np.generic) and value.dtype == dtype:
        return value
    if isinstance(value, (bool, int, float)):
        cupy_type = ("bool" if isinstance(value, bool) else
                     "long long (8 bytes)" if isinstance(value, int) else "double (8 bytes)")
        raise TypeError(
            f"{where}: got Python {type(value).__name__} {value!r}, which CuPy would pass as "
            f"{cupy_type}; pass np.{dtype.name}({value!r}) instead"
        )
    raise TypeError(f"{where}: expected a np.{dtype.name} scalar, got "
                    f"{type(value).__name__} {value!r}")


def compile_for_nvcc(path: Path, arch: str) -> Path:
    """Compile a ``.cu`` file to a cubin for ``arch`` (e.g. ``"sm_90"``) with nvcc.

    Device code only, as NVRTC compiles it for CuPy. Successful builds are
    cached, keyed by the source, the architecture and nvcc's version.

    Raises
    ------
    HostCompileError
        With nvcc's output.
    """
    command = ["nvcc", f"-arch={arch}", "-std=c++17", "-cubin", "-x", "cu"]
    return _cached_build(f"{Path(path).stem}-{arch}", ".cubin",
                         backend.with_headers(Path(path).read_text()),
                         command, _compiler_identity("nvcc"))
