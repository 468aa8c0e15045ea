"""The CPU stand-in for CuPy holds exactly dpm's CuPy subset and fails where CuPy fails."""

from __future__ import annotations

import numpy as np
import pytest

import cupy_standin
from dpm import backend


class TestNamespace:
    def test_every_subset_name_is_present(self, gpu_standin):
        for name in backend.CUPY_SUBSET:
            node = gpu_standin
            for part in name.split("."):
                node = getattr(node, part)

    def test_names_outside_the_subset_are_missing(self):
        cp = cupy_standin.build(("asarray", "cuda.runtime.getDeviceCount"))
        assert not hasattr(cp, "zeros")
        assert not hasattr(cp.cuda, "Device")

    def test_unimplementable_name_fails_the_build(self):
        with pytest.raises(AttributeError, match="cupy.cuda.Event.*SPECIAL"):
            cupy_standin.build(("cuda.Event",))

    def test_runtime_reports_one_device(self, gpu_standin):
        assert gpu_standin.cuda.runtime.getDeviceCount() == 1
        assert gpu_standin.float32 is np.float32


class TestTransfers:
    def test_asarray_copies_host_data(self, gpu_standin):
        host = np.zeros(3, np.float32)
        device = gpu_standin.asarray(host)
        host[0] = 1
        assert isinstance(device, gpu_standin.ndarray) and device.get()[0] == 0

    def test_asarray_keeps_device_arrays(self, gpu_standin):
        device = gpu_standin.zeros(3, dtype=gpu_standin.float32)
        assert gpu_standin.asarray(device) is device

    def test_asnumpy_returns_a_host_copy(self, gpu_standin):
        device = gpu_standin.full(2, 5, dtype=gpu_standin.int32)
        host = gpu_standin.asnumpy(device)
        assert type(host) is np.ndarray
        host[0] = 0
        assert device.get()[0] == 5


class TestLikeCupy:
    def test_mixing_host_and_device_arrays_raises(self, gpu_standin):
        device, host = gpu_standin.zeros((2, 2)), np.ones((2, 2))
        with pytest.raises(TypeError, match="cupy.add.*host numpy.ndarray"):
            device + host
        with pytest.raises(TypeError, match="cupy.matmul"):
            gpu_standin.matmul(device, host)
        with pytest.raises(TypeError, match="cupy.concatenate"):
            np.concatenate([device, host])

    def test_scalars_and_0d_arrays_mix(self, gpu_standin):
        device = gpu_standin.zeros(3, dtype=gpu_standin.float32)
        result = device + np.float32(1) + np.array(2.0, np.float32) + 3
        assert isinstance(result, gpu_standin.ndarray)
        np.testing.assert_array_equal(result.get(), 6)

    def test_results_stay_on_the_device(self, gpu_standin):
        device = gpu_standin.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        for result in (device * 2, device.sum(), np.mean(device, axis=0), device[1, 2],
                       gpu_standin.matmul(device, device.T)):
            assert isinstance(result, gpu_standin.ndarray), type(result)
        assert device.sum().ndim == 0 and float(device.sum()) == 15

    def test_ascontiguousarray_takes_device_arrays_only(self, gpu_standin):
        with pytest.raises(TypeError, match="expected cupy.ndarray"):
            gpu_standin.ascontiguousarray(np.ones(3))
        strided = gpu_standin.zeros((4, 4))[:, ::2]
        assert gpu_standin.ascontiguousarray(strided).flags.c_contiguous

    def test_device_scalar_is_no_kernel_scalar(self, gpu_standin):
        code = 'extern "C" __global__ void fill(int* x, int v) { x[threadIdx.x] = v; }'
        fill = gpu_standin.RawModule(code=code, options=backend.KERNEL_OPTIONS).get_function("fill")
        x = gpu_standin.zeros(4, dtype=gpu_standin.int32)
        with pytest.raises(TypeError, match="parameter 'v'"):
            fill(1, 4, (x, x[0]))  # a 0-d device array, as CuPy's x[0] is
        fill(1, 4, (x, np.int32(7)))
        np.testing.assert_array_equal(x.get(), 7)
