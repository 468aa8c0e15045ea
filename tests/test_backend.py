"""Device selection, array namespaces, kernel loading and size parsing in dpm.backend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dpm import backend


class TestResolveDevice:
    def test_auto_is_cpu_without_cupy(self, monkeypatch):
        monkeypatch.delenv("DPM_DEVICE", raising=False)
        assert backend.resolve_device("auto") == "cpu"
        assert backend.resolve_device() == "cpu"

    def test_gpu_without_device_raises_clear_error(self):
        with pytest.raises(backend.GPUUnavailableError, match="device='gpu'.*device='cpu'"):
            backend.resolve_device("gpu")

    def test_env_variable_is_honoured(self, monkeypatch, gpu_standin):
        monkeypatch.setenv("DPM_DEVICE", "cpu")
        assert backend.resolve_device() == "cpu"
        assert backend.array_module() is np

    def test_invalid_env_value_names_the_variable(self, monkeypatch):
        monkeypatch.setenv("DPM_DEVICE", "tpu")
        with pytest.raises(ValueError, match="DPM_DEVICE.*'tpu'"):
            backend.resolve_device()

    def test_invalid_argument_names_device(self):
        with pytest.raises(ValueError, match="device must be one of.*'cuda'"):
            backend.resolve_device("cuda")

    def test_auto_selects_standin_gpu(self, monkeypatch, gpu_standin):
        monkeypatch.delenv("DPM_DEVICE", raising=False)
        assert backend.resolve_device("auto") == "gpu"
        assert backend.array_module("auto") is gpu_standin
        assert backend.array_module("cpu") is np

    def test_cupy_without_device_counts_as_missing(self, monkeypatch, gpu_standin):
        monkeypatch.setattr(gpu_standin.cuda.runtime, "getDeviceCount", lambda: 0)
        assert backend.cupy() is None
        assert backend.resolve_device("auto") == "cpu"


class TestArrayNamespaces:
    def test_device_arrays_select_the_standin(self, gpu_standin):
        d = gpu_standin.asarray(np.ones(3, np.float32))
        assert backend.is_device_array(d)
        assert backend.namespace(np.ones(2), d) is gpu_standin

    def test_host_arrays_select_numpy(self, gpu_standin):
        assert not backend.is_device_array(np.ones(3))
        assert backend.namespace(np.ones(3), 2.0) is np

    def test_to_host_copies_device_arrays(self, gpu_standin):
        d = gpu_standin.asarray(np.arange(4, dtype=np.float32))
        host = backend.to_host(d)
        assert type(host) is np.ndarray
        np.testing.assert_array_equal(host, np.arange(4))
        host[0] = 99
        assert d.get()[0] == 0, "to_host returned a view of device memory"

    def test_to_host_keeps_host_arrays(self):
        a = np.arange(3)
        assert backend.to_host(a) is a

    def test_synchronize_runs_on_both(self, gpu_standin):
        backend.synchronize(np)
        backend.synchronize(gpu_standin)


class TestLoadKernel:
    def test_without_gpu_raises(self):
        with pytest.raises(backend.GPUUnavailableError, match="topk.topk_merge"):
            backend.load_kernel("topk", "topk_merge")

    def test_missing_source_names_the_path(self, gpu_standin):
        with pytest.raises(FileNotFoundError, match="no_such_kernel.cu"):
            backend.load_kernel("no_such_kernel", "k")

    def test_free_memory_of_standin_is_host_memory(self, gpu_standin):
        free, total = gpu_standin.cuda.Device().mem_info
        assert 0 < free <= total
        assert 0 < backend.free_memory(gpu_standin) <= total


class TestParseBytes:
    @pytest.mark.parametrize("text, expected", [
        ("4GB", 4 * 1000**3), ("512MiB", 512 * 1024**2), ("1.5 kib", 1536),
        ("1000000", 10**6), (2048, 2048),
    ])
    def test_units(self, text, expected):
        assert backend.parse_bytes(text) == expected

    @pytest.mark.parametrize("text", ["lots", "4XB", "", "-1GB", "0"])
    def test_bad_sizes_raise(self, text):
        with pytest.raises(ValueError, match="memory size"):
            backend.parse_bytes(text)


def test_import_dpm_is_lightweight():
    heavy = ("cupy", "kikuchipy", "numba", "dask")
    code = ("import sys, dpm; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"import dpm imported {result.stdout.strip()}"


def test_kernel_sources_carry_their_shared_headers():
    """RawModule compiles one string: kernel_source pastes kernels/*.cuh in place of the
    #include line; a header that is not there is named."""
    from dpm import backend

    for name in ("project", "fused_match"):
        source = backend.kernel_source(name)
        assert '#include "lambert.cuh"' not in source
        assert source.count("__device__ inline void dpm_vector_to_lambert(") == 1
    with pytest.raises(FileNotFoundError, match="missing.cuh"):
        backend.with_headers('#include "missing.cuh"\n')
