"""The host build of CUDA kernels: shim semantics, strict arguments, every kernel compiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cupy_standin as cs
import hostcuda
from dpm import backend

SELFTEST = Path(__file__).parent / "kernels" / "shim_selftest.cu"
KERNEL_FILES = sorted(backend.kernel_dir().glob("*.cu"))


@pytest.fixture(scope="module")
def selftest() -> hostcuda.HostModule:
    return hostcuda.compile_module(SELFTEST.read_text(), backend.KERNEL_OPTIONS,
                                   label="shim_selftest")


def device(array: np.ndarray) -> cs.ndarray:
    return cs.asarray(array)


class TestShimSemantics:
    def test_block_sum_matches_numpy(self, selftest):
        n, threads = 1000, 256  # a partial last block
        x = np.random.default_rng(1).random(n, dtype=np.float32)
        blocks = (n + threads - 1) // threads
        sums = device(np.full(blocks, np.nan, np.float32))
        selftest.get_function("block_sum")((blocks,), (threads,), (device(x), sums, np.int32(n)))
        expected = np.add.reduceat(x.astype(np.float64), np.arange(0, n, threads))
        np.testing.assert_allclose(sums.get(), expected, rtol=1e-5)

    def test_dynamic_shared_memory_reverses_each_block(self, selftest):
        threads, blocks = 64, 3
        x = np.arange(threads * blocks, dtype=np.int32)
        y = device(np.zeros_like(x))
        selftest.get_function("reverse_blocks")(
            blocks, threads, (device(x), y), shared_mem=threads * np.dtype(np.int32).itemsize)
        np.testing.assert_array_equal(y.get(), x.reshape(blocks, threads)[:, ::-1].ravel())

    def test_2d_grid_and_block_indices(self, selftest):
        rows, cols, block = 13, 21, (8, 4)  # partial blocks in both directions
        grid = ((cols + block[0] - 1) // block[0], (rows + block[1] - 1) // block[1])
        out = device(np.full((rows, cols), -1, np.int32))
        rank = device(np.full((rows, cols), -1, np.int32))
        selftest.get_function("index_2d")(grid, block, (out, rank, np.int32(rows), np.int32(cols)))
        r, c = np.mgrid[:rows, :cols]
        np.testing.assert_array_equal(out.get(), r * 1000 + c)
        np.testing.assert_array_equal(rank.get(), (r % block[1]) * block[0] + c % block[0])

    def test_atomics_from_many_threads(self, selftest):
        n, bins = 2000, 7
        rng = np.random.default_rng(2)
        labels = rng.integers(0, bins, n).astype(np.int32)
        weights = rng.random(n, dtype=np.float32)
        counts = device(np.zeros(bins, np.uint32))
        total = device(np.zeros(1, np.float32))
        largest = device(np.full(1, -1, np.int32))
        selftest.get_function("atomic_histogram")(
            ((n + 127) // 128,), (128,),
            (device(labels), device(weights), np.int32(n), counts, total, largest))
        np.testing.assert_array_equal(counts.get(), np.bincount(labels, minlength=bins))
        np.testing.assert_allclose(total.get()[0], weights.sum(dtype=np.float64), rtol=1e-4)
        assert largest.get()[0] == labels.max()

    def test_warp_intrinsic_is_a_compile_error(self):
        source = ('extern "C" __global__ void k(float* x) {\n'
                  "  x[0] = __shfl_down_sync(0xffffffff, x[0], 1);\n}\n")
        with pytest.raises(hostcuda.HostCompileError, match="warp intrinsic"):
            hostcuda.compile_module(source, label="warp")

    def test_compile_error_shows_compiler_output(self):
        source = 'extern "C" __global__ void k(float* x) { x[0] = undeclared_name; }\n'
        with pytest.raises(hostcuda.HostCompileError, match="undeclared_name"):
            hostcuda.compile_module(source, label="broken")


class TestSignatureParsing:
    def test_multiline_const_restrict_parameters(self):
        source = """
        // extern "C" __global__ void commented_out(int x) {}
        extern "C" __global__ void __launch_bounds__(128) k(
            const float* __restrict__ a,
            long long* b, const int n,
            unsigned char *mask) {}
        """
        (k,) = hostcuda.parse_kernels(source)
        assert k.name == "k" and k.max_threads == 128
        assert [(p.name, p.ctype, p.dtype, p.is_pointer) for p in k.parameters] == [
            ("a", "float*", np.float32, True),
            ("b", "long long*", np.int64, True),
            ("n", "int", np.int32, False),
            ("mask", "unsigned char*", np.uint8, True),
        ]

    def test_unknown_type_is_rejected_by_name(self):
        with pytest.raises(ValueError, match="parameter 'v' has type 'float4\\* v'"):
            hostcuda.parse_kernels('extern "C" __global__ void k(float4* v) {}')


class TestStrictArguments:
    """Arguments CuPy would pass but the kernel would misread fail here."""

    @pytest.fixture
    def block_sum(self, selftest) -> hostcuda.HostKernel:
        return selftest.get_function("block_sum")

    @pytest.fixture
    def arrays(self) -> tuple[cs.ndarray, cs.ndarray]:
        return device(np.ones(256, np.float32)), device(np.zeros(1, np.float32))

    def test_host_numpy_array_is_rejected(self, block_sum, arrays):
        x, sums = arrays
        with pytest.raises(TypeError, match="parameter 'x'.*device array.*numpy.ndarray"):
            block_sum(1, 256, (x.get(), sums, np.int32(256)))

    def test_python_int_is_rejected_with_what_cupy_would_do(self, block_sum, arrays):
        with pytest.raises(TypeError, match="block_sum: parameter 'n' \\(int\\).*long long"
                                            ".*np.int32\\(256\\)"):
            block_sum(1, 256, (*arrays, 256))

    def test_python_float_is_rejected(self):
        source = 'extern "C" __global__ void scale(float* x, float s) { x[threadIdx.x] *= s; }'
        scale = hostcuda.compile_module(source, label="scale").get_function("scale")
        x = device(np.ones(4, np.float32))
        with pytest.raises(TypeError, match="parameter 's'.*double.*np.float32\\(2.0\\)"):
            scale(1, 4, (x, 2.0))
        scale(1, 4, (x, np.float32(2.0)))
        np.testing.assert_array_equal(x.get(), 2.0)

    def test_wrong_scalar_dtype_is_rejected(self, block_sum, arrays):
        with pytest.raises(TypeError, match="parameter 'n'.*np.int32 scalar.*int64"):
            block_sum(1, 256, (*arrays, np.int64(256)))

    def test_wrong_array_dtype_is_rejected(self, block_sum, arrays):
        x, sums = arrays
        with pytest.raises(TypeError, match="parameter 'x'.*float32, got float64"):
            block_sum(1, 256, (x.astype(np.float64), sums, np.int32(256)))

    def test_non_contiguous_array_is_rejected(self, block_sum, arrays):
        _, sums = arrays
        strided = device(np.ones(512, np.float32))[::2]
        with pytest.raises(TypeError, match="parameter 'x'.*not C-contiguous"):
            block_sum(1, 256, (strided, sums, np.int32(256)))

    def test_wrong_argument_count_is_rejected(self, block_sum, arrays):
        with pytest.raises(TypeError, match="takes 3 arguments \\(x, sums, n\\), got 2"):
            block_sum(1, 256, arrays)

    def test_block_over_1024_threads_is_rejected(self, block_sum, arrays):
        with pytest.raises(ValueError, match="2048 threads"):
            block_sum(1, (1024, 2), (*arrays, np.int32(256)))

    def test_shared_memory_above_48k_needs_the_attribute(self):
        module = hostcuda.compile_module(SELFTEST.read_text(), backend.KERNEL_OPTIONS,
                                         label="shim_selftest")
        reverse = module.get_function("reverse_blocks")
        x = device(np.arange(1, dtype=np.int32))
        y = device(np.zeros(1, np.int32))
        with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes"):
            reverse(1, 1, (x, y), shared_mem=64 * 1024)
        with pytest.raises(ValueError, match="232448"):
            reverse.max_dynamic_shared_size_bytes = 228 * 1024
        reverse.max_dynamic_shared_size_bytes = 64 * 1024
        reverse(1, 1, (x, y), shared_mem=64 * 1024)
        assert y.get()[0] == 0


@pytest.mark.parametrize("path", KERNEL_FILES, ids=[p.stem for p in KERNEL_FILES])
def test_every_kernel_compiles_for_host(path: Path):
    module = hostcuda.compile_kernel_file(path.stem)
    assert module.kernel_names, f"{path} defines no extern \"C\" __global__ kernel"
