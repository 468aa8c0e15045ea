"""Tests for dpm.projection: kikuchipy's EBSDMasterPattern.get_patterns is the oracle.

Each comparison runs on the numba kernel (NumPy) and on ``kernels/project.cu``
compiled for the host and launched through the CuPy stand-in (``xp`` /
``gpu_standin`` fixtures). Shim runs use tiny detectors: the host shim runs
one OpenMP thread per CUDA thread.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from orix.crystal_map import Phase
from orix.quaternion import Orientation, Rotation
from scipy.ndimage import gaussian_filter

from dpm import backend
from dpm.detector import Detector, direction_vectors
from dpm.master import MasterPattern
from dpm.projection import (
    _DEVICE_MASTERS,
    _ORIENTATIONS_PER_BLOCK,
    _project_numba,
    project,
    project_vectors,
)

N_ORIENTATIONS = 100
#: Non-trivial geometry: off-centre PC, sample tilt 68°, detector tilt 6°, binning 4.
GEOMETRY = dict(pc=(0.42, 0.31, 0.55), sample_tilt=68.0, tilt=6.0, binning=4)


@pytest.fixture(scope="module")
def ni_kikuchipy():
    import kikuchipy as kp

    return kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="both")


@pytest.fixture(scope="module")
def ni_master(ni_kikuchipy) -> MasterPattern:
    # The shipped file has one (the highest) energy, 20 keV, not recorded in the signal.
    return MasterPattern.from_kikuchipy(ni_kikuchipy, energy=20.0)


@pytest.fixture(scope="module")
def smooth_master() -> MasterPattern:
    rng = np.random.default_rng(7)
    npx = 60
    north, south = (gaussian_filter(rng.random((2 * npx + 1,) * 2), 3.0, mode="wrap") + 1.0
                    for _ in range(2))
    return MasterPattern(north, south, phase=Phase(point_group="m-3m"), energy=20.0)


def _random_rotations() -> Rotation:
    """Uniform random rotations, seeded (orix's Rotation.random takes no seed)."""
    rng = np.random.default_rng(42)
    q = rng.normal(size=(N_ORIENTATIONS, 4))
    return Rotation(q / np.linalg.norm(q, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def rotations() -> Rotation:
    return _random_rotations()


def kikuchipy_patterns(master, detector: Detector, rotations: Rotation) -> np.ndarray:
    """kikuchipy's patterns of a dpm or kikuchipy master pattern, (n, sy * sx) float64."""
    kp_master = master.to_kikuchipy() if isinstance(master, MasterPattern) else master
    sim = kp_master.get_patterns(rotations, detector.to_kikuchipy(), energy=20.0,
                                 dtype_out=np.float32, compute=True, show_progressbar=False)
    return np.asarray(sim.data, dtype=np.float64).reshape(rotations.size, -1)


def ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of matching rows of two (n, m) arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def device_inputs(xp, master: MasterPattern, detector: Detector, quaternions: np.ndarray):
    """Kernel inputs of project_vectors on ``xp``'s device."""
    return (xp.asarray(master.northern), xp.asarray(master.southern),
            xp.asarray(direction_vectors(detector, dtype=np.float32)),
            xp.asarray(np.ascontiguousarray(quaternions, dtype=np.float32)))


def run_kernel(xp, master: MasterPattern, detector: Detector, quaternions: np.ndarray) -> np.ndarray:
    """project_vectors on ``xp``'s device (checking it ran there), result on the host."""
    out = project_vectors(*device_inputs(xp, master, detector, quaternions))
    assert backend.is_device_array(out) == (xp is not np)
    return backend.to_host(out)


class TestAgainstKikuchipy:
    @pytest.mark.parametrize("which", ["ni", "smooth"])
    def test_numba_matches_kikuchipy(self, which, ni_kikuchipy, ni_master, smooth_master,
                                     rotations):
        master = ni_master if which == "ni" else smooth_master
        # kikuchipy projects its own (uint8) file for Ni, the same float32 data for the other.
        oracle = ni_kikuchipy if which == "ni" else smooth_master
        det = Detector((30, 40), **GEOMETRY)
        got = project(master, det, rotations, device="cpu")
        assert isinstance(got, np.ndarray)
        assert got.shape == (N_ORIENTATIONS, 30, 40) and got.dtype == np.float32
        scores = ncc(got.reshape(N_ORIENTATIONS, -1), kikuchipy_patterns(oracle, det, rotations))
        assert scores.min() >= 0.999, f"min NCC {scores.min():.6f}"

    @pytest.mark.parametrize("which", ["ni", "smooth"])
    def test_cuda_kernel_matches_kikuchipy(self, which, gpu_standin, ni_kikuchipy, ni_master,
                                           smooth_master, rotations):
        master = ni_master if which == "ni" else smooth_master
        oracle = ni_kikuchipy if which == "ni" else smooth_master
        det = Detector((10, 12), **GEOMETRY)
        got = project(master, det, rotations, device="gpu")
        assert backend.is_device_array(got)
        assert got.shape == (N_ORIENTATIONS, 10, 12) and got.dtype == np.float32
        scores = ncc(backend.to_host(got).reshape(N_ORIENTATIONS, -1),
                     kikuchipy_patterns(oracle, det, rotations))
        assert scores.min() >= 0.999, f"min NCC {scores.min():.6f}"

    def test_kikuchipy_detector_and_orientation_accepted(self, ni_kikuchipy, ni_master, rotations):
        det = Detector((9, 11), **GEOMETRY)
        ori = Orientation(rotations.data[:5], symmetry=ni_master.phase.point_group)
        got = project(ni_master, det.to_kikuchipy(), ori, device="cpu")
        scores = ncc(got.reshape(5, -1), kikuchipy_patterns(ni_kikuchipy, det, rotations[:5]))
        assert scores.min() >= 0.999


class TestContract:
    def test_rows_zero_mean_unit_norm(self, xp, ni_master, rotations):
        det = Detector((8, 9), **GEOMETRY)
        out = run_kernel(xp, ni_master, det, rotations.data[:13])
        assert out.shape == (13, 72) and out.dtype == np.float32
        np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

    def test_constant_master_gives_zeros(self, xp):
        const = np.full((41, 41), 3.7, dtype=np.float32)
        master = MasterPattern(const, const, phase=Phase(point_group="m-3m"), energy=20.0)
        det = Detector((6, 7), pc=(0.5, 0.5, 0.5))
        q = _random_rotations().data[:6]
        out = run_kernel(xp, master, det, q)
        assert not np.isnan(out).any()
        assert (out == 0).all()

    @pytest.mark.parametrize("which", ["ni", "smooth"])
    def test_kernel_and_numba_twin_agree(self, which, gpu_standin, ni_master, smooth_master,
                                         rotations):
        master = ni_master if which == "ni" else smooth_master
        det = Detector((9, 14), **GEOMETRY)
        # 4k + 3 orientations: the last CUDA block holds a partial tile.
        q = rotations.data[: 4 * 5 + 3]
        cpu = project_vectors(*device_inputs(np, master, det, q))
        gpu = project_vectors(*device_inputs(gpu_standin, master, det, q))
        assert backend.is_device_array(gpu)
        np.testing.assert_allclose(backend.to_host(gpu), cpu, atol=1e-5)

    def test_out_buffer_is_filled_and_returned(self, xp, ni_master, rotations):
        det = Detector((5, 6), **GEOMETRY)
        inputs = device_inputs(xp, ni_master, det, rotations.data[:3])
        out = xp.full((3, 30), np.nan, dtype=xp.float32)
        result = project_vectors(*inputs, out=out)
        assert result is out
        np.testing.assert_allclose(backend.to_host(out),
                                   run_kernel(xp, ni_master, det, rotations.data[:3]), atol=0)

    def test_quaternions_normalised(self, xp, ni_master, rotations):
        det = Detector((5, 6), **GEOMETRY)
        q = rotations.data[:4]
        unit = run_kernel(xp, ni_master, det, q)
        scaled = run_kernel(xp, ni_master, det, 2.5 * q)
        np.testing.assert_allclose(scaled, unit, atol=1e-5)  # 2.5 q rounds differently in float32

    def test_no_orientations(self, xp, ni_master):
        det = Detector((5, 6), **GEOMETRY)
        out = project_vectors(*device_inputs(xp, ni_master, det, np.zeros((0, 4))))
        assert out.shape == (0, 30)

    def test_tile_matches_kernel_source(self):
        source = backend.kernel_source("project")
        tile = re.search(r"#define DPM_PROJECT_TILE (\d+)", source)
        assert tile is not None and int(tile.group(1)) == _ORIENTATIONS_PER_BLOCK

    def test_numba_py_func_matches_compiled(self, smooth_master):
        det = Detector((3, 4), pc=(0.45, 0.4, 0.6))
        north, south, vectors, q = device_inputs(np, smooth_master, det, _random_rotations().data[:2])
        compiled = np.empty((2, 12), dtype=np.float32)
        python = np.empty((2, 12), dtype=np.float32)
        _project_numba(north, south, vectors, q, compiled)
        _project_numba.py_func(north, south, vectors, q, python)
        # NumPy 2 keeps Python-mode float32 scalar arithmetic in float32: ~1e-6 apart.
        np.testing.assert_allclose(python, compiled, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(python, axis=1), 1.0, atol=1e-5)


class TestMask:
    def test_mask(self, xp, ni_kikuchipy, ni_master, rotations):
        det = Detector((10, 12), **GEOMETRY)
        rr, cc = np.mgrid[:10, :12]
        mask = (rr - 4.5) ** 2 + (cc - 5.5) ** 2 <= 25  # a disc, as for a round screen
        device = "cpu" if xp is np else "gpu"
        on_device = project(ni_master, det, rotations[:20], mask=xp.asarray(mask), device=device)
        assert backend.is_device_array(on_device) == (xp is not np)
        got = backend.to_host(on_device)
        assert got.shape == (20, 10, 12)
        assert (got[:, ~mask] == 0).all()
        inside = got[:, mask]
        np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(inside, axis=1), 1.0, atol=1e-5)
        full = kikuchipy_patterns(ni_kikuchipy, det, rotations[:20])
        assert ncc(inside, full[:, mask.ravel()]).min() >= 0.999

    @pytest.mark.parametrize("mask, match", [
        (np.ones((10, 11), dtype=bool), r"shape \(10, 12\)"),
        (np.ones((10, 12), dtype=np.uint8), "bool array"),
        (np.zeros((10, 12), dtype=bool), "selects no pixel"),
    ])
    def test_bad_mask(self, mask, match, ni_master, rotations):
        with pytest.raises(ValueError, match=match):
            project(ni_master, Detector((10, 12), **GEOMETRY), rotations[:2], mask=mask,
                    device="cpu")


class TestDevices:
    def test_device_follows_rotations(self, gpu_standin, ni_master, rotations):
        det = Detector((6, 8), **GEOMETRY)
        q_device = gpu_standin.asarray(rotations.data[:4].astype(np.float32))
        on_device = project(ni_master, det, q_device)
        assert backend.is_device_array(on_device)
        on_host = project(ni_master, det, rotations[:4], device="cpu")
        assert isinstance(on_host, np.ndarray) and not backend.is_device_array(on_host)
        np.testing.assert_allclose(backend.to_host(on_device), on_host, atol=1e-5)

    def test_master_uploaded_once(self, gpu_standin, smooth_master, rotations):
        det = Detector((4, 5), **GEOMETRY)
        assert backend.is_device_array(project(smooth_master, det, rotations[:2], device="gpu"))
        _, north, south = _DEVICE_MASTERS[smooth_master]
        project(smooth_master, det, rotations[2:4], device="gpu")
        assert _DEVICE_MASTERS[smooth_master][1] is north
        assert _DEVICE_MASTERS[smooth_master][2] is south

    def test_mixed_devices_rejected(self, gpu_standin, ni_master, rotations):
        det = Detector((4, 5), **GEOMETRY)
        north, south, vectors, _ = device_inputs(np, ni_master, det, rotations.data[:2])
        q = gpu_standin.asarray(rotations.data[:2].astype(np.float32))
        with pytest.raises(TypeError, match="`northern` on the GPU"):
            project_vectors(north, south, vectors, q)


class TestInputs:
    def test_inputs_not_mutated(self, xp, ni_master, rotations):
        det = Detector((6, 7), **GEOMETRY)
        north, south = ni_master.northern.copy(), ni_master.southern.copy()
        q = rotations.data[:5].copy()
        mask = np.ones((6, 7), dtype=bool)
        mask[0] = False
        mask_copy = mask.copy()
        project(ni_master, det, rotations[:5], mask=mask, device="cpu")
        inputs = device_inputs(xp, ni_master, det, q)
        copies = [backend.to_host(a).copy() for a in inputs]
        project_vectors(*inputs)
        np.testing.assert_array_equal(ni_master.northern, north)
        np.testing.assert_array_equal(ni_master.southern, south)
        np.testing.assert_array_equal(rotations.data[:5], q)
        np.testing.assert_array_equal(mask, mask_copy)
        for array, copy in zip(inputs, copies):
            np.testing.assert_array_equal(backend.to_host(array), copy)

    @pytest.mark.parametrize("rot, error, match", [
        (np.ones((3, 3)), ValueError, r"shape \(n, 4\), got \(3, 3\)"),
        (np.zeros((2, 4)), ValueError, "zero quaternions"),
        (np.full((2, 4), np.nan), ValueError, "non-finite"),
        ([[1.0, 0, 0, 0]], TypeError, "orix Rotation or an \\(n, 4\\) quaternion array, got list"),
    ])
    def test_bad_rotations(self, rot, error, match, ni_master):
        with pytest.raises(error, match=match):
            project(ni_master, Detector((4, 5), **GEOMETRY), rot, device="cpu")

    def test_bad_master_and_detector(self, ni_kikuchipy, ni_master, rotations):
        with pytest.raises(TypeError, match="dpm MasterPattern, got EBSDMasterPattern"):
            project(ni_kikuchipy, Detector((4, 5), **GEOMETRY), rotations[:1], device="cpu")
        with pytest.raises(TypeError, match="kikuchipy EBSDDetector, got tuple"):
            project(ni_master, (4, 5), rotations[:1], device="cpu")

    @pytest.mark.parametrize("index, bad, match", [
        (0, np.zeros((4, 4), dtype=np.float32), r"`northern` to have shape \(2 npx \+ 1"),
        (1, np.zeros((3, 3), dtype=np.float32), "`southern` to have shape"),
        (2, np.zeros((4, 2), dtype=np.float32), r"`vectors` to have shape \(npix, 3\)"),
        (2, np.zeros((0, 3), dtype=np.float32), "npix > 0"),
        (3, np.zeros((2, 3), dtype=np.float32), r"`quaternions` to have shape \(n, 4\)"),
        (3, np.zeros(4, dtype=np.float32), "`quaternions` to have 2 dimensions"),
    ])
    def test_bad_kernel_inputs(self, index, bad, match, ni_master, rotations):
        args = list(device_inputs(np, ni_master, Detector((4, 5), **GEOMETRY), rotations.data[:2]))
        if index == 0:
            args[1] = bad  # keep the hemispheres consistent so the first check fires
        args[index] = bad
        with pytest.raises(ValueError, match=match):
            project_vectors(*args)

    @pytest.mark.parametrize("out", [np.zeros((2, 20), dtype=np.float64),
                                     np.zeros((2, 21), dtype=np.float32),
                                     np.zeros((20, 2), dtype=np.float32).T])
    def test_bad_out(self, out, ni_master, rotations):
        args = device_inputs(np, ni_master, Detector((4, 5), **GEOMETRY), rotations.data[:2])
        with pytest.raises(ValueError, match="`out` to be a C-contiguous float32"):
            project_vectors(*args, out=out)


class TestDictionaryFilter:
    """integrate_pixels against an independent oracle: real sub-pixel averaging."""

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls):
        from dpm.master.shipped import shipped_master_pattern

        master = shipped_master_pattern("li", 20.0)
        det = Detector(shape=(30, 30), pc=(0.49, 0.27, 0.58))
        q = np.random.default_rng(4).normal(size=(30, 4))
        return master, det, q / np.linalg.norm(q, axis=1, keepdims=True)

    def test_pixel_integration_approximates_binned_pixels(self, setup):
        from dpm.projection import integrate_pixels
        from dpm.synthetic import camera_patterns

        master, det, q = setup
        binned = camera_patterns(master, det, q, supersample=4).reshape(len(q), -1)
        binned -= binned.mean(axis=1, keepdims=True)
        binned /= np.linalg.norm(binned, axis=1, keepdims=True)
        point = project(master, det, q).reshape(len(q), -1)
        filtered = project(integrate_pixels(master, det), det, q).reshape(len(q), -1)
        ncc_point, ncc_filtered = (point * binned).sum(1), (filtered * binned).sum(1)
        assert ncc_filtered.mean() > 0.9 and ncc_filtered.mean() > ncc_point.mean() + 0.1

    def test_orientation_spread_keeps_neighbours_correlated(self, setup):
        from orix.quaternion import Rotation

        from dpm.projection import integrate_pixels

        master, det, q = setup
        turned = (Rotation.from_axes_angles([1, 2, 3], 1.5, degrees=True) * Rotation(q)).data
        ncc = {}
        for spread in (0.0, 1.0):
            m = integrate_pixels(master, det, orientation_spread=spread)
            a = project(m, det, q).reshape(len(q), -1)
            b = project(m, det, turned).reshape(len(q), -1)
            ncc[spread] = (a * b).sum(1).mean()
        assert ncc[1.0] > ncc[0.0] + 0.1
        with pytest.raises(ValueError, match="orientation_spread"):
            integrate_pixels(master, det, orientation_spread=-1)
