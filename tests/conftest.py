"""Shared fixtures: run stage tests on NumPy and on the CPU stand-in for CuPy.

* ``xp`` — every stage test takes it; it yields ``numpy`` and the CuPy stand-in
  (with ``dpm.backend`` patched to see it, so ``namespace``/``load_kernel`` take
  the GPU code path and launch the host-compiled kernels).
* ``gpu_standin`` — the stand-in alone, for tests of the GPU path only.
* ``host_kernels`` — ``host_kernels("topk")`` compiles ``kernels/topk.cu`` for
  the host and returns its ``hostcuda.HostModule``.
* ``requires_nvcc`` — skip marker for tests that need ``nvcc``.
* ``master_pattern_cache`` — every test run caches master patterns in its own
  temporary folder.
"""

from __future__ import annotations

import shutil
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import pytest

import cupy_standin
import hostcuda
from dpm import backend

requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


@pytest.fixture(autouse=True, scope="session")
def master_pattern_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep simulated master patterns of the test run out of the user's cache folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DPM_CACHE_DIR", str(tmp_path_factory.mktemp("dpm-cache")))
    yield
    mp.undo()


@pytest.fixture
def gpu_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The CuPy stand-in, installed as the CuPy that ``dpm.backend`` imports."""
    standin = cupy_standin.build()
    monkeypatch.setattr(backend, "_import_cupy", lambda: standin)
    backend._raw_module.cache_clear()
    yield standin
    backend._raw_module.cache_clear()
    backend._cupy_found.clear()


@pytest.fixture(params=["numpy", "cupy-standin"])
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """The array module a test runs on: NumPy, then the CuPy stand-in."""
    if request.param == "numpy":
        return np
    return request.getfixturevalue("gpu_standin")


@pytest.fixture
def host_kernels() -> Callable[[str], hostcuda.HostModule]:
    """Compile ``kernels/NAME.cu`` for the host: ``host_kernels(NAME)``."""
    return hostcuda.compile_kernel_file
