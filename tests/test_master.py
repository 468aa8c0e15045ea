"""Tests of dpm.master: Lambert helpers (against kikuchipy) and kinematical master patterns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpm.crystal import get_phase
from dpm.master import simulate_master_pattern
from dpm.master.kinematical import KinematicalConfig, kinematical_bands, kinematical_master_pattern
from dpm.master.lambert import grid_vectors, lambert_to_vector, vector_to_lambert

KP_SCALE = math.sqrt(math.pi / 2)  # kikuchipy's _vector2lambert gives dpm's (a, b) * sqrt(pi/2)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel() - np.mean(a)
    b = np.asarray(b, dtype=np.float64).ravel() - np.mean(b)
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def kikuchipy_kinematical(phase, *, kv: float, npx: int, dmin_angstrom: float = 0.5) -> np.ndarray:
    """kikuchipy's kinematical master pattern (DYNAMICAL.md §6 workflow), Lambert, (2, N, N)."""
    from diffsims.crystallography import ReciprocalLatticeVector
    from kikuchipy.simulations import KikuchiPatternSimulator

    ref = ReciprocalLatticeVector.from_min_dspacing(phase, dmin_angstrom)
    ref = ref[ref.allowed].unique(use_symmetry=True).symmetrise()
    ref.calculate_structure_factor()
    ref.calculate_theta(kv * 1e3)
    sim = KikuchiPatternSimulator(ref)
    mp = sim.calculate_master_pattern(half_size=npx, hemisphere="both", scaling="square")
    return np.asarray(mp.as_lambert(show_progressbar=False).data, dtype=np.float64)


class TestLambertAgainstKikuchipy:
    def test_vector_to_lambert(self):
        from kikuchipy.signals.util._master_pattern import _vector2lambert

        rng = np.random.default_rng(0)
        v = rng.normal(size=(2000, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(vector_to_lambert(v), _vector2lambert(v) / KP_SCALE, atol=1e-12)

    def test_lambert_to_vector(self):
        from kikuchipy.signals.util._master_pattern import _lambert2vector

        rng = np.random.default_rng(1)
        a, b = rng.uniform(-1, 1, size=(2, 2000))
        expected = _lambert2vector(a, b)  # takes [-1, 1] coordinates, scales them itself
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(lambert_to_vector(a, b), expected, atol=1e-6)

    def test_grid_round_trip_and_hemispheres(self):
        north = grid_vectors(20, "north")
        south = grid_vectors(20, "south")
        assert north.shape == (41, 41, 3)
        np.testing.assert_allclose(np.linalg.norm(north, axis=-1), 1, atol=1e-12)
        assert np.all(north[..., 2] >= 0) and np.all(south[..., 2] <= 0)
        t = np.arange(-20, 21) / 20
        np.testing.assert_allclose(vector_to_lambert(north)[..., 0], np.broadcast_to(t, (41, 41)),
                                   atol=1e-12)
        np.testing.assert_allclose(vector_to_lambert(south)[..., 1], np.broadcast_to(t[:, None], (41, 41)),
                                   atol=1e-12)


class TestKinematical:
    def test_result(self):
        mp = kinematical_master_pattern(get_phase("li"), kv=20.0, npx=30)
        assert mp.northern.shape == mp.southern.shape == (61, 61)
        assert mp.northern.dtype == np.float32
        assert mp.method == "kinematical" and mp.energy == 20.0
        assert mp.params["npx"] == 30 and mp.params["dmin_nm"] == 0.05
        assert mp.params["scaling"] == "square" and "Weickenmeier" in mp.params["scattering_factors"]
        assert mp.northern.min() >= 0 and mp.northern.max() > 0

    def test_simulate_dispatch(self):
        mp = simulate_master_pattern("na", kv=15, npx=20, method="kinematical", scaling="linear")
        assert mp.params["scaling"] == "linear" and mp.energy == 15

    def test_m3m_symmetry(self):
        # x<->y, x->-x, y->-y and z->-z are m-3m operations mapping the Lambert grid onto itself
        mp = kinematical_master_pattern(get_phase("li"), kv=20.0, npx=150)
        n, s = mp.northern, mp.southern
        tol = 4 * np.finfo(np.float32).eps * n.max()
        for image in (n.T, n[::-1], n[:, ::-1], np.rot90(n), s):
            np.testing.assert_allclose(image, n, rtol=0, atol=tol)

    def test_band_geometry(self):
        # the 110 band: directions within theta_B of the (110) plane have at least the {110}
        # weight; the [110] pole direction (90 deg from it) does not lie in that band
        li = get_phase("li")
        hkl, normal, sin_theta, weight = kinematical_bands(li, kv=20.0)
        i = next(j for j, row in enumerate(hkl) if tuple(row) == (1, 1, 0))
        theta = math.asin(sin_theta[i])
        assert math.degrees(theta) == pytest.approx(0.99, abs=0.005)  # DYNAMICAL.md §4
        # each Friedel pair once: no row is the negative of another
        rows = {tuple(r) for r in hkl}
        assert not any(tuple(-np.array(r)) in rows for r in rows)
        assert weight.max() == weight[i]

    def test_linear_scaling_is_sqrt(self):
        li = get_phase("li")
        _, _, _, w_sq = kinematical_bands(li, kv=20.0, config=KinematicalConfig(min_intensity=0))
        _, _, _, w_lin = kinematical_bands(li, kv=20.0, config=KinematicalConfig(min_intensity=0,
                                                                                  scaling="linear"))
        np.testing.assert_allclose(w_lin**2, w_sq)

    def test_agrees_with_kikuchipy(self):
        # same phase (with dpm's room-temperature Debye-Waller factor, which kikuchipy ignores)
        phase = get_phase("li")
        mp = kinematical_master_pattern(phase, kv=20.0, npx=100)
        ours = np.stack([mp.northern, mp.southern])
        assert ncc(ours, kikuchipy_kinematical(phase, kv=20.0, npx=100)) >= 0.9

    @pytest.mark.parametrize(("element", "a"), [("Li", 3.51), ("Na", 4.29)])
    def test_agrees_with_kikuchipy_same_physics(self, element, a):
        # B = 0 in both: what remains are the scattering factors (WK vs ITC) and kikuchipy's
        # stereographic -> Lambert resampling
        from diffpy.structure import Atom, Lattice, Structure
        from orix.crystal_map import Phase

        atoms = [Atom(element, xyz) for xyz in ((0, 0, 0), (0.5, 0.5, 0.5))]
        phase = Phase(name=element, space_group=229,
                      structure=Structure(atoms=atoms, lattice=Lattice(a, a, a, 90, 90, 90)))
        mp = kinematical_master_pattern(phase, kv=20.0, npx=100)
        ours = np.stack([mp.northern, mp.southern])
        assert ncc(ours, kikuchipy_kinematical(phase, kv=20.0, npx=100)) >= 0.94

    @pytest.mark.parametrize("npx", [9, 0, -3, 12.5])
    def test_bad_npx(self, npx):
        with pytest.raises(ValueError, match="npx"):
            kinematical_master_pattern(get_phase("li"), kv=20.0, npx=npx)

    @pytest.mark.parametrize("kv", [0, -20])
    def test_bad_kv(self, kv):
        with pytest.raises(ValueError, match="positive"):
            kinematical_master_pattern(get_phase("li"), kv=kv, npx=20)

    @pytest.mark.parametrize(("option", "match"), [({"scaling": "cube"}, "scaling"),
                                                   ({"dmin": 0}, "dmin"),
                                                   ({"min_intensity": 1.0}, "min_intensity")])
    def test_bad_config(self, option, match):
        with pytest.raises(ValueError, match=match):
            KinematicalConfig(**option)


class TestAntiAliasing:
    def test_downsample_keeps_smooth_fields(self):
        from dpm.master.lambert import downsample, grid_vectors

        fine_n, fine_s = grid_vectors(40)[..., 0], grid_vectors(40, "south")[..., 0]
        coarse_n, coarse_s = downsample(fine_n, fine_s, 2)
        assert coarse_n.shape == (41, 41)
        # the x component is smooth: the triangle-weighted mean stays close to the point
        # value (the Lambert map has kinks along the square's edges and diagonals)
        for coarse, hemisphere in ((coarse_n, "north"), (coarse_s, "south")):
            np.testing.assert_allclose(coarse, grid_vectors(20, hemisphere)[..., 0], atol=1e-2)
        constant = np.full((81, 81), 3.0)
        for out in downsample(constant, constant, 2):
            np.testing.assert_allclose(out, 3.0, rtol=1e-12)

    def test_supersampling_restores_threefold_symmetry(self):
        """Li's dynamical lines are thinner than a Lambert pixel: point samples alias them."""
        from dpm.master.lambert import lambert_interpolate

        rng = np.random.default_rng(1)
        v = rng.normal(size=(5000, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        threefold = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # about [111]

        def intensity(mp, w):
            north = w[:, 2] >= 0
            out = np.empty(len(w))
            out[north] = lambert_interpolate(mp.northern, w[north])
            out[~north] = lambert_interpolate(mp.southern, w[~north])
            return out

        corr = {}
        for s in (1, 2):
            mp = simulate_master_pattern("li", kv=20, npx=60, method="dynamical", supersample=s)
            corr[s] = np.corrcoef(intensity(mp, v), intensity(mp, v @ threefold.T))[0, 1]
        assert corr[2] > corr[1] + 0.2 and corr[2] > 0.8

    def test_bad_supersample_and_npx(self):
        with pytest.raises(ValueError, match="supersample"):
            simulate_master_pattern("li", npx=20, supersample=0)
        with pytest.raises(ValueError, match="npx must be an integer of at least 10"):
            simulate_master_pattern("li", npx=5)
