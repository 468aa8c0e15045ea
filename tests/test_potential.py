"""Tests of dpm.potential: absorptive form factors and Fourier coefficients of the potential.

The references are independent of this code: EMsoft's own log of its Ni 20 kV
master-pattern run (shipped with kikuchipy), the Li/Na table of
reference/DYNAMICAL.md §4, and the defining integral of the thermal-diffuse
absorptive amplitude evaluated by quadrature.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from diffpy.structure import Atom, Lattice, Structure
from orix.crystal_map import Phase
from scipy import special

from dpm._scattering_tables import WK_A, WK_B
from dpm.potential import (
    _fphon,
    absorptive_form_factor,
    fourier_coefficients,
    hkl_max_for,
    lookup_table,
)

EMSOFT_NI_DIR = Path(__import__("kikuchipy").__file__).parent / "data" / "emsoft_ebsd_master_pattern"


def make_phase(elements: list[str], sites: list[tuple[float, float, float]], a: float,
               space_group: int, b_nm2: list[float], *, c: float | None = None,
               gamma_deg: float = 90.0) -> Phase:
    """An orix phase with the lattice in Å and per-site B given in nm² (EMsoft's unit)."""
    atoms = [Atom(el, xyz=xyz, Uisoequiv=b * 100 / (8 * math.pi**2))
             for el, xyz, b in zip(elements, sites, b_nm2)]
    lattice = Lattice(a, a, a if c is None else c, 90, 90, gamma_deg)
    return Phase(name="".join(elements), space_group=space_group,
                 structure=Structure(atoms=atoms, lattice=lattice))


def bcc(element: str, a: float, b_nm2: float) -> Phase:
    return make_phase([element], [(0, 0, 0)], a, 229, [b_nm2])


@pytest.fixture(scope="module")
def emsoft_ni() -> tuple[Phase, dict[str, float]]:
    """Ni as EMsoft's Ni 20 kV run saw it (HDF5 CrystalData) and the numbers its log printed."""
    h5py = pytest.importorskip("h5py")
    h5 = EMSOFT_NI_DIR / "ni_mc_mp_20kv_uint8_gzip_opts9.h5"
    log = EMSOFT_NI_DIR / "ni_mp.out"
    if not (h5.is_file() and log.is_file()):
        pytest.skip(f"kikuchipy's EMsoft Ni files are not in {EMSOFT_NI_DIR}")
    with h5py.File(h5, "r") as f:
        data = f["CrystalData"]
        x, y, z, occ, b_nm2 = data["AtomData"][:, 0]
        a_nm = float(data["LatticeParameters"][0])
        assert int(data["Atomtypes"][0]) == 28 and int(data["SpaceGroupNumber"][0]) == 225
    assert occ == 1.0
    phase = make_phase(["Ni"], [(x, y, z)], 10 * a_nm, 225, [float(b_nm2)])
    text = log.read_text()

    def number(label: str) -> float:
        return float(re.search(re.escape(label) + r"\s*=?\s*([-+0-9.Ee]+)", text).group(1))

    printed = {
        "V0": number("Mean inner potential [V]"),
        "gamma": number("Relativistic correction factor [gamma]"),
        "wavelength": number("Electron Wavelength [nm]"),
        "sigma": number("Interaction constant [V nm]^(-1)"),
        "xi0_prime": number("Normal absorption length [nm]"),
        "range": int(number("Range of reflections along a*, b* and c*")),
    }
    return phase, printed


class TestAbsorptiveFormFactor:
    def test_li_core_and_phonon_parts(self):
        # DYNAMICAL.md §4: for Li at 20 kV, FCORE gives 3.58 Å and FPHON 0.27 Å at g = 0
        # (EMsoft's FSCATT units, i.e. 4 pi f'), with B_Li = 0.0458 nm².
        core = 4 * math.pi * absorptive_form_factor(3, 0.0, 0.0, 20.0)
        total = 4 * math.pi * absorptive_form_factor(3, 0.0, 4.58, 20.0)
        assert core == pytest.approx(3.58, abs=0.005)
        assert total - core == pytest.approx(0.27, abs=0.005)

    @pytest.mark.parametrize(("z", "b"), [(3, 4.58), (11, 6.60), (28, 0.35)])
    def test_phonon_part_is_its_defining_integral(self, z, b):
        # FPHON(G) = ∫ d²q f(q) f(|G - q|) [exp(-u²G²/2) - exp(-u²(q² + |G - q|²)/2)], with
        # f(q) = sum A1 (1 - exp(-B1 q²))/q², A1 = (4 pi)² A, B1 = B/(4 pi)²: the closed forms
        # (series below max(B1) G² = 0.1, exponential integrals above) against quadrature.
        a1 = np.array(WK_A[z - 1]) * 16 * math.pi**2
        b1 = np.array(WK_B[z - 1]) / (16 * math.pi**2)
        u2 = b / (8 * math.pi**2)

        def f(q2: np.ndarray) -> np.ndarray:
            q2 = q2[..., None]
            safe = np.where(q2 > 0, q2, 1.0)
            return (a1 * np.where(q2 > 0, -np.expm1(-b1 * safe) / safe, b1)).sum(-1)

        x, w = special.roots_legendre(600)
        t, wt = (x + 1) * math.pi / 4, w * math.pi / 4  # q = 3 tan(t) maps [0, inf) to [0, pi/2)
        q, dq = 3 * np.tan(t), 3 / np.cos(t) ** 2 * wt
        x, w = special.roots_legendre(300)
        phi, wphi = (x + 1) * math.pi / 2, w * math.pi / 2  # half plane, doubled
        qq, pp = np.meshgrid(q, phi, indexing="ij")
        weight = 2 * np.outer(dq * q, wphi)
        g_values = np.array([0.0, 0.5, 2.0, 6.0, 15.0])  # Å⁻¹, both branches
        expected = []
        for g in g_values:
            d2 = (g - qq * np.cos(pp)) ** 2 + (qq * np.sin(pp)) ** 2
            dw = np.exp(-0.5 * u2 * g * g) - np.exp(-0.5 * u2 * (qq**2 + d2))
            expected.append((f(qq**2) * f(d2) * dw * weight).sum())
        got = _fphon(g_values, np.full(len(g_values), z), np.full(len(g_values), u2))
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6 * scale)

    def test_thermal_part_vanishes_continuously_with_b(self):
        # FPHON ~ u² ln(1/u²) as u -> 0 (the integral of f(q) f(G - q) q² diverges logarithmically)
        s = np.linspace(0.0, 2.0, 41)
        core_only = absorptive_form_factor(11, s, 0.0, 20.0)
        gaps = [np.abs(absorptive_form_factor(11, s, b, 20.0) - core_only).max()
                for b in (1e-4, 1e-6, 1e-8)]
        assert gaps[0] > gaps[1] > gaps[2]
        assert gaps[2] < 1e-6 * core_only[0]

    def test_finite_and_decaying_to_large_s(self):
        s = np.linspace(0.0, 6.0, 301)
        f = absorptive_form_factor(28, s, 0.35, 20.0)
        assert np.all(np.isfinite(f))
        assert abs(f[-1]) < 1e-2 * f[0]

    def test_broadcasts(self):
        f = absorptive_form_factor(np.array([[3], [11]]), np.array([0.0, 0.1, 0.2]), 5.0, 20.0)
        assert f.shape == (2, 3)
        assert f[0, 1] == pytest.approx(absorptive_form_factor(3, 0.1, 5.0, 20.0))

    @pytest.mark.parametrize(("kwargs", "match"), [
        ({"z": 99}, r"Z = \[99\].*1-98"),
        ({"z": 0}, r"Z = \[0\]"),
        ({"kv": 0.0}, "kv"),
        ({"kv": -5.0}, "kv"),
        ({"s": -0.1}, ">= 0"),
        ({"b_iso": -1.0}, "B >= 0"),
    ])
    def test_bad_input(self, kwargs, match):
        args = {"z": 3, "s": 0.1, "b_iso": 4.0, "kv": 20.0} | kwargs
        with pytest.raises(ValueError, match=match):
            absorptive_form_factor(**args)


class TestFourierCoefficients:
    def test_nickel_matches_emsoft_log(self, emsoft_ni):
        phase, printed = emsoft_ni
        fc = fourier_coefficients(phase, [[0, 0, 0]], kv=20.0)
        assert fc.V0 == pytest.approx(printed["V0"], rel=2e-3)  # printed 0.2962E+02
        assert fc.gamma == pytest.approx(printed["gamma"], rel=1e-3)
        # EMsoft 5.0 printed Psi = 20520 V, 0.5 % above E(1 + eE/2m0c²) + V0 = 20421 V, so its
        # wavelength (and sigma, xi'_0, all through lambda) is 0.25 % shorter than CalcWaveLength's
        # current formula gives (reference/DYNAMICAL.md §4); hence 1 % here.
        assert fc.wavelength_nm == pytest.approx(printed["wavelength"], rel=1e-2)
        assert fc.sigma == pytest.approx(printed["sigma"], rel=1e-2)
        assert fc.xi0_prime == pytest.approx(printed["xi0_prime"], rel=1e-2)
        assert fc.xi_prime[0] == fc.xi0_prime
        assert fc.k0 == pytest.approx(1 / fc.wavelength_nm)

    def test_nickel_index_range_matches_emsoft_log(self, emsoft_ni):
        phase, printed = emsoft_ni
        assert hkl_max_for(phase, 0.05) == (printed["range"],) * 3

    @pytest.mark.parametrize(("element", "a", "b_nm2", "ref"), [
        # reference/DYNAMICAL.md §4, 20 kV: V0 (V), xi'_0, xi_110 (nm), U_110, U_200 (nm⁻²)
        ("Li", 3.51004, 0.0458, {"V0": 7.53, "xi0p": 258, "U110": 0.936, "xi110": 124, "U200": 0.453}),
        ("Na", 4.2906, 0.0660, {"V0": 5.99, "xi0p": 263, "U110": 1.327, "xi110": 88, "U200": 0.802}),
    ])
    def test_li_na_match_brief_table(self, element, a, b_nm2, ref):
        fc = fourier_coefficients(bcc(element, a, b_nm2), [[1, 1, 0], [2, 0, 0]], kv=20.0)
        assert fc.V0 == pytest.approx(ref["V0"], rel=2e-2)
        assert fc.xi0_prime == pytest.approx(ref["xi0p"], rel=2e-2)
        assert fc.U[0].real == pytest.approx(ref["U110"], rel=2e-2)
        assert fc.xi[0] == pytest.approx(ref["xi110"], rel=2e-2)
        assert fc.U[1].real == pytest.approx(ref["U200"], rel=2e-2)
        assert fc.wavelength_nm == pytest.approx(0.008587, rel=1e-3)

    @pytest.mark.parametrize(("phase", "forbidden", "allowed"), [
        (bcc("Li", 3.51, 0.048), [[1, 0, 0], [1, 1, 1], [2, 1, 0], [0, 0, 3]], [[1, 1, 0], [2, 1, 1]]),
        (make_phase(["Ni"], [(0, 0, 0)], 3.5236, 225, [0.0035]),
         [[1, 0, 0], [1, 1, 0], [2, 1, 0], [2, 2, 1]], [[1, 1, 1], [2, 0, 0], [3, 1, 1]]),
    ])
    def test_centring_forbidden_reflections_vanish(self, phase, forbidden, allowed):
        fc = fourier_coefficients(phase, forbidden + allowed, kv=20.0)
        n = len(forbidden)
        assert np.all(fc.U[:n] == 0) and np.all(fc.V[:n] == 0) and np.all(fc.V_prime[:n] == 0)
        assert np.all(np.isinf(fc.xi[:n])) and np.all(np.isinf(fc.xi_prime[:n]))
        assert np.all(fc.U[n:].real > 0) and np.all(fc.U[n:].imag > 0)

    def test_centrosymmetric_coefficients_are_real_and_even(self):
        hkl = np.array([[1, 1, 0], [2, 1, 1], [3, 2, 1], [0, 0, 2], [4, 2, 0]])
        fc = fourier_coefficients(bcc("Na", 4.29, 0.066), np.vstack([hkl, -hkl]), kv=20.0)
        np.testing.assert_allclose(fc.V.imag, 0, atol=1e-12)
        np.testing.assert_allclose(fc.V_prime.imag, 0, atol=1e-12)
        np.testing.assert_allclose(fc.U.real, 0.664840340614319 * fc.V.real, rtol=1e-6)
        np.testing.assert_allclose(fc.U.imag, 0.664840340614319 * fc.V_prime.real, rtol=1e-6)
        np.testing.assert_allclose(fc.U[:5], fc.U[5:], rtol=1e-12)

    def test_noncentrosymmetric_coefficients_are_hermitian_per_part(self):
        # zincblende GaAs (F-43m): V_g and V'_g are complex, but each is the transform of a real
        # potential, so V_{-g} = conj(V_g) and V'_{-g} = conj(V'_g).
        gaas = make_phase(["Ga", "As"], [(0, 0, 0), (0.25, 0.25, 0.25)], 5.6533, 216, [0.0060, 0.0050])
        hkl = np.array([[1, 1, 1], [3, 1, 1], [3, 3, 1], [2, 0, 0]])
        fc = fourier_coefficients(gaas, np.vstack([hkl, -hkl]), kv=20.0)
        assert np.all(np.abs(fc.V[:3].imag) > 1.0) and np.all(np.abs(fc.V_prime[:3].imag) > 0.01)
        np.testing.assert_allclose(fc.V[4:], np.conj(fc.V[:4]), rtol=1e-12)
        np.testing.assert_allclose(fc.V_prime[4:], np.conj(fc.V_prime[:4]), rtol=1e-12)
        np.testing.assert_allclose(fc.U, 0.664840340614319 * (fc.V + 1j * fc.V_prime), rtol=1e-6)

    def test_elastic_part_scales_with_gamma(self):
        # f_WK does not depend on the voltage; V_g carries gamma = 1 + eE/m0c² (m0c² = 510.999 keV).
        li = bcc("Li", 3.51, 0.048)
        v20 = fourier_coefficients(li, [[1, 1, 0]], kv=20.0)
        v30 = fourier_coefficients(li, [[1, 1, 0]], kv=30.0)
        assert v30.V[0] / v20.V[0] == pytest.approx((1 + 30 / 510.999) / (1 + 20 / 510.999), rel=1e-6)
        assert v20.gamma == pytest.approx(1 + 20 / 510.999, rel=1e-6)

    def test_occupancy_scales_the_potential(self):
        full = fourier_coefficients(bcc("Na", 4.29, 0.066), [[0, 0, 0], [1, 1, 0]], kv=20.0)
        half = bcc("Na", 4.29, 0.066)
        half.structure[0].occupancy = 0.5
        np.testing.assert_allclose(fourier_coefficients(half, [[0, 0, 0], [1, 1, 0]], kv=20.0).U,
                                   0.5 * full.U, rtol=1e-12)

    def test_element_without_scattering_parameters_is_named(self):
        einsteinium = make_phase(["Es"], [(0, 0, 0)], 5.0, 225, [0.005])
        with pytest.raises(ValueError, match=r"'Es'.*Z = 99.*1-98"):
            fourier_coefficients(einsteinium, [[1, 1, 1]], kv=20.0)

    @pytest.mark.parametrize("kv", [0.0, -20.0, float("nan")])
    def test_bad_voltage(self, kv):
        with pytest.raises(ValueError, match="kv"):
            fourier_coefficients(bcc("Li", 3.51, 0.048), [[1, 1, 0]], kv=kv)

    def test_bad_hkl(self):
        li = bcc("Li", 3.51, 0.048)
        with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
            fourier_coefficients(li, [[1, 1]], kv=20.0)
        with pytest.raises(ValueError, match="integer"):
            fourier_coefficients(li, [[0.5, 1, 0]], kv=20.0)


class TestHklMaxFor:
    def test_hexagonal_axes_differ(self):
        # Mg: |a*| = 1/(a sin 120°), |c*| = 1/c; first index with d < 0.05 nm along each axis.
        mg = make_phase(["Mg"], [(1 / 3, 2 / 3, 0.25)], 3.2094, 194, [0.01], c=5.2108, gamma_deg=120)
        d_a = 0.32094 * math.sin(math.radians(120))  # d(100) in nm
        expected = (math.floor(d_a / 0.05) + 1,) * 2 + (math.floor(0.52108 / 0.05) + 1,)
        assert hkl_max_for(mg, 0.05) == expected == (6, 6, 11)

    @pytest.mark.parametrize("dmin", [0.0, -0.05, float("inf")])
    def test_bad_dmin(self, dmin):
        with pytest.raises(ValueError, match="dmin"):
            hkl_max_for(bcc("Li", 3.51, 0.048), dmin)


class TestLookupTable:
    def test_layout_and_lookup(self):
        li = bcc("Li", 3.51, 0.048)
        lut = lookup_table(li, (2, 2, 3), kv=20.0)
        assert lut.table.shape == (9, 9, 13) and lut.offset == (4, 4, 6)
        assert lut.table[4, 4, 6] == lut.coefficients.U0
        rng = np.random.default_rng(0)
        hkl = rng.integers(-4, 5, size=(30, 3))
        hkl[:, 2] = rng.integers(-6, 7, size=30)
        np.testing.assert_array_equal(lut.lookup(hkl), fourier_coefficients(li, hkl, kv=20.0).U)
        beams = np.array([[0, 0, 0], [1, 1, 0], [-1, 0, 1], [2, 0, 0]])
        pairs = lut.lookup(beams[:, None, :] - beams[None, :, :])
        assert pairs.shape == (4, 4)
        np.testing.assert_array_equal(np.diag(pairs), lut.coefficients.U0)

    def test_centrosymmetric_table_is_even(self):
        lut = lookup_table(make_phase(["Ni"], [(0, 0, 0)], 3.5236, 225, [0.0035]), 2, kv=20.0)
        np.testing.assert_allclose(lut.table, lut.table[::-1, ::-1, ::-1], rtol=1e-12, atol=0)

    def test_out_of_range_lookup(self):
        lut = lookup_table(bcc("Li", 3.51, 0.048), 1, kv=20.0)
        with pytest.raises(IndexError, match="range"):
            lut.lookup([3, 0, 0])

    def test_bad_hkl_max(self):
        with pytest.raises(ValueError, match="hkl_max"):
            lookup_table(bcc("Li", 3.51, 0.048), -1, kv=20.0)
