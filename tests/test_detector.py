"""Tests for dpm.detector: kikuchipy's EBSDDetector is the oracle."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from kikuchipy.detectors import EBSDDetector
from kikuchipy.signals.util._master_pattern import _get_direction_cosines_from_detector

from dpm.detector import (
    Detector,
    as_detector,
    direction_vectors,
    sample_to_detector_matrix,
)

GEOMETRIES = [
    dict(),
    dict(sample_tilt=68.0, tilt=7.5, binning=4),
    dict(sample_tilt=72.0, tilt=-3.0, azimuthal=2.5, twist=1.2),
]


class TestDirectionVectors:
    @pytest.mark.parametrize("geometry", GEOMETRIES)
    def test_matches_kikuchipy(self, geometry):
        kp_det = EBSDDetector(shape=(23, 31), pc=(0.43, 0.28, 0.61), **geometry)
        expected = _get_direction_cosines_from_detector(kp_det)
        got = direction_vectors(Detector.from_kikuchipy(kp_det))
        assert got.shape == (23 * 31, 3)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, atol=1e-6)

    def test_accepts_kikuchipy_detector_and_float32(self):
        kp_det = EBSDDetector(shape=(12, 9), pc=(0.5, 0.4, 0.7), tilt=4.0)
        got = direction_vectors(kp_det, dtype=np.float32)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, _get_direction_cosines_from_detector(kp_det), atol=1e-6)

    def test_unit_vectors_row_major(self):
        det = Detector((4, 6), pc=(0.5, 0.5, 0.5), sample_tilt=0.0)
        v = direction_vectors(det)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-12)
        # With no sample tilt, X_d = Y_s: moving one column right increases v_y.
        grid = v.reshape(4, 6, 3)
        assert (np.diff(grid[..., 1], axis=1) > 0).all()

    def test_bad_dtype(self):
        with pytest.raises(ValueError, match="float32 or float64"):
            direction_vectors(Detector((2, 2), pc=(0.5, 0.5, 0.5)), dtype=np.int32)


class TestSampleToDetectorMatrix:
    def test_default_tilt_documented_basis(self):
        m = sample_to_detector_matrix(Detector((1, 1), pc=(0.5, 0.5, 0.5)))
        c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
        np.testing.assert_allclose(m, [[0, 1, 0], [-c, 0, s], [s, 0, c]], atol=1e-12)

    def test_matches_kikuchipy_rotation(self):
        kp_det = EBSDDetector(sample_tilt=65.0, tilt=10.0, azimuthal=3.0, twist=-2.0)
        np.testing.assert_allclose(sample_to_detector_matrix(kp_det),
                                   kp_det.sample_to_detector.to_matrix().squeeze(), atol=1e-12)


class TestConventions:
    @pytest.mark.parametrize("convention", ["tsl", "edax", "oxford", "aztec", "emsoft",
                                            "emsoft4", "emsoft5", "BRUKER"])
    def test_from_pc_matches_kikuchipy(self, convention):
        pc = (0.41, 0.72, 0.63) if "emsoft" not in convention else (3.2, -10.5, 15000.0)
        kw = dict(shape=(60, 80), binning=8, px_size=59.2)
        det = Detector.from_pc(pc, convention, **kw)
        kp_det = EBSDDetector(pc=pc, convention=convention.lower(), **kw)
        np.testing.assert_allclose(det.pc, kp_det.pc[0], rtol=1e-12)
        np.testing.assert_allclose(det.pc_in(convention), pc, rtol=1e-12)

    def test_unknown_convention(self):
        with pytest.raises(ValueError, match="convention.*'nordif'"):
            Detector.from_pc((0.5, 0.5, 0.5), "nordif", shape=(10, 10))
        with pytest.raises(ValueError, match="convention.*'nordif'"):
            Detector((10, 10), pc=(0.5, 0.5, 0.5)).pc_in("nordif")

    def test_from_pc_bad_shape(self):
        with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\)"):
            Detector.from_pc((0.5, 0.5), shape=(10, 10))


class TestKikuchipyRoundTrip:
    def test_round_trip(self):
        det = Detector((48, 64), pc=(0.4, 0.3, 0.6), sample_tilt=69.0, tilt=5.0,
                       azimuthal=1.0, twist=0.5, binning=2, px_size=70.0)
        kp_det = det.to_kikuchipy()
        assert isinstance(kp_det, EBSDDetector)
        assert kp_det.shape == (48, 64)
        np.testing.assert_allclose(kp_det.pc[0], det.pc)
        assert Detector.from_kikuchipy(kp_det) == det
        assert as_detector(kp_det) == det
        assert as_detector(det) is det

    def test_several_equal_pcs_accepted(self):
        kp_det = EBSDDetector(shape=(10, 10), pc=np.full((2, 3, 3), 0.5))
        assert as_detector(kp_det).pc == (0.5, 0.5, 0.5)

    def test_varying_pcs_rejected(self):
        kp_det = EBSDDetector(shape=(10, 10), pc=[[0.5, 0.5, 0.5], [0.5, 0.5, 0.6]])
        with pytest.raises(ValueError, match="2 different PCs.*pc_average"):
            Detector.from_kikuchipy(kp_det)

    def test_as_detector_wrong_type(self):
        with pytest.raises(TypeError, match="EBSDDetector, got dict"):
            as_detector({"shape": (10, 10)})


class TestValidation:
    def test_frozen_and_normalised(self):
        det = Detector([np.int64(5), 7], pc=np.array([0.5, 0.4, 0.3]), binning=np.int32(2))
        assert det.shape == (5, 7) and type(det.shape[0]) is int
        assert det.pc == (0.5, 0.4, 0.3) and det.size == 35
        with pytest.raises(dataclasses.FrozenInstanceError):
            det.pc = (0.5, 0.5, 0.5)  # type: ignore[misc]

    @pytest.mark.parametrize("shape", [(10,), (10, 0), (10, -2), (10.0, 10), (True, 3), "ab", 5])
    def test_bad_shape(self, shape):
        with pytest.raises(ValueError, match="`shape` to be two positive integers"):
            Detector(shape, pc=(0.5, 0.5, 0.5))

    @pytest.mark.parametrize("pc, match", [
        ((0.5, 0.5, 0.0), "PCz > 0"),
        ((0.5, 0.5, -0.3), "PCz > 0"),
        ((np.nan, 0.5, 0.5), "finite PC"),
        ((0.5, np.inf, 0.5), "finite PC"),
        ((0.5, 0.5), "three numbers"),
        ("abc", "three numbers"),
    ])
    def test_bad_pc(self, pc, match):
        with pytest.raises(ValueError, match=match):
            Detector((10, 10), pc=pc)

    @pytest.mark.parametrize("kwargs, match", [
        (dict(sample_tilt=np.nan), "`sample_tilt`"),
        (dict(tilt="5"), "`tilt`"),
        (dict(binning=0), "`binning`"),
        (dict(binning=1.5), "`binning`"),
        (dict(px_size=0.0), "`px_size`"),
    ])
    def test_bad_parameters(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            Detector((10, 10), pc=(0.5, 0.5, 0.5), **kwargs)
