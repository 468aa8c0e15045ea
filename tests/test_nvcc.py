"""Every CUDA source compiles with nvcc for the H100 (sm_90) and the A100 (sm_80)."""

from __future__ import annotations

from pathlib import Path

import pytest

import hostcuda
from conftest import requires_nvcc
from dpm import backend

SOURCES = [*sorted(backend.kernel_dir().glob("*.cu")),
           Path(__file__).parent / "kernels" / "shim_selftest.cu"]


@requires_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_compiles_with_nvcc(path: Path, arch: str):
    cubin = hostcuda.compile_for_nvcc(path, arch)
    assert cubin.stat().st_size > 0
