"""Tests of dpm.crystal: phases, wavelength, WK scattering factors, structure factors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpm._scattering_tables import SYMBOLS, WK_A, WK_B
from dpm.crystal import (
    BUILTIN_PHASES,
    PhaseNotFoundError,
    atomic_number,
    electron_scattering_factor,
    electron_wavelength,
    get_phase,
    reflectors,
    structure_factor,
    unit_cell_atoms,
)

# Independent numbers, from reference/DYNAMICAL.md §4 (EMsoft GETWK; diffraction.f90 scatfac).
WK_LI = ((0.00251, 0.03576, 0.00988, 0.02370), (0.02620, 2.00907, 10.80597, 130.49226))
WK_NA = ((0.03283, 0.08858, 0.11688, 0.02516), (0.06008, 2.07182, 7.64444, 146.00952))
DOYLE_TURNER = {  # a_i (Å), b_i (nm²); f(s) = sum a exp(-b s²)
    3: ((1.611, 1.246, 0.326, 0.099), (1.07638, 0.30480, 0.04533, 0.00495)),
    11: ((2.241, 1.333, 0.907, 0.286), (1.08004, 0.24505, 0.03391, 0.00435)),
}


def doyle_turner(z: int, s: np.ndarray) -> np.ndarray:
    a, b = (np.array(t) for t in DOYLE_TURNER[z])
    return (a * np.exp(-100 * b * np.asarray(s)[..., None] ** 2)).sum(-1)


def lobato(symbol: str, s: np.ndarray) -> np.ndarray:
    from diffsims.utils.lobato_scattering_params import ATOMIC_SCATTERING_PARAMS_LOBATO

    a, b = np.array(ATOMIC_SCATTERING_PARAMS_LOBATO[symbol]).T
    g2 = (2 * np.asarray(s)[..., None]) ** 2
    return (a * (2 + b * g2) / (1 + b * g2) ** 2).sum(-1)


def itc(symbol: str, s: np.ndarray) -> np.ndarray:
    from diffsims.utils.atomic_scattering_params import ATOMIC_SCATTERING_PARAMS

    a, b = np.array(ATOMIC_SCATTERING_PARAMS[symbol]).T
    return (a * np.exp(-b * np.asarray(s)[..., None] ** 2)).sum(-1)


HCP_MG_CIF = """data_Mg
_cell_length_a 3.2094
_cell_length_b 3.2094
_cell_length_c 5.2108
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 120
_symmetry_space_group_name_H-M 'P 63/m m c'
_symmetry_Int_Tables_number 194
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
_atom_site_B_iso_or_equiv
Mg1 Mg 0.33333333 0.66666667 0.25 1.0 1.5
"""


class TestGetPhase:
    @pytest.mark.parametrize(("name", "sg", "a", "n_atoms"), [
        ("li", 229, 3.51, 2), ("Na", 229, 4.29, 2), ("AL", 225, 4.0495, 4), ("cu", 225, 3.6149, 4)])
    def test_builtin(self, name, sg, a, n_atoms):
        phase = get_phase(name)
        assert phase.space_group.number == sg
        assert phase.structure.lattice.a == pytest.approx(a)  # Å
        assert len(phase.structure) == n_atoms  # full conventional cell
        assert len(unit_cell_atoms(phase)[0]) == n_atoms

    def test_builtin_debye_waller_is_room_temperature(self):
        # Peng et al. (1996) 280 K values (DYNAMICAL.md §4: Li 4.60, Na 6.36), scaled to 293 K
        li = get_phase("li").structure[0].Bisoequiv
        na = get_phase("na").structure[0].Bisoequiv
        assert li == pytest.approx(4.60 * 293 / 280, abs=0.02)
        assert na == pytest.approx(6.36 * 293 / 280, abs=0.02)
        for spec in BUILTIN_PHASES.values():
            assert "Peng" in spec.source

    def test_unknown_name_lists_builtins(self):
        with pytest.raises(PhaseNotFoundError, match=r"'unobtainium'.*al, cu, li, na"):
            get_phase("unobtainium")

    def test_missing_cif(self, tmp_path):
        missing = tmp_path / "nope.cif"
        with pytest.raises(FileNotFoundError, match="nope.cif"):
            get_phase(missing)

    def test_cif_without_atoms(self, tmp_path):
        path = tmp_path / "empty.cif"
        path.write_text("data_empty\n_cell_length_a 3.51\n_cell_length_b 3.51\n"
                        "_cell_length_c 3.51\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
                        "_cell_angle_gamma 90\n_symmetry_Int_Tables_number 229\n")
        with pytest.raises(ValueError, match="empty.cif.*lists no atom sites"):
            get_phase(path)

    def test_cif_expands_and_keeps_b_iso(self, tmp_path):
        path = tmp_path / "mg.cif"
        path.write_text(HCP_MG_CIF)
        phase = get_phase(path)
        assert phase.space_group.number == 194
        z, xyz, occ, b_iso = unit_cell_atoms(phase)
        assert z.tolist() == [12, 12]
        np.testing.assert_allclose(b_iso, 1.5)
        expected = {(1 / 3, 2 / 3, 0.25), (2 / 3, 1 / 3, 0.75)}
        for pos in xyz:
            assert any(np.allclose(pos, e, atol=1e-6) for e in expected)


class TestAtomicNumber:
    @pytest.mark.parametrize(("symbol", "z"), [("Li", 3), ("li1+", 3), ("NA", 11), ("C", 6),
                                               ("Cl", 17), ("Cf", 98), (28, 28)])
    def test_symbols(self, symbol, z):
        assert atomic_number(symbol) == z

    @pytest.mark.parametrize("bad", ["Xx", "", 0, 99])
    def test_bad(self, bad):
        with pytest.raises(ValueError, match="element"):
            atomic_number(bad)


class TestElectronWavelength:
    def test_20kv(self):
        # textbook form lambda = 1.226426 / sqrt(E (1 + 0.97847e-6 E)) nm, E in V
        e = 20e3
        assert electron_wavelength(20) == pytest.approx(1.226426 / math.sqrt(e * (1 + 0.97847e-6 * e)),
                                                        rel=1e-5)

    def test_inner_potential_shortens(self):
        # DYNAMICAL.md §4: Li at 20 kV with V0 = 7.53 V -> 0.008587 nm
        assert electron_wavelength(20, inner_potential=7.53) == pytest.approx(0.008587, abs=1e-6)
        assert electron_wavelength(20, 7.53) < electron_wavelength(20)

    @pytest.mark.parametrize("kv", [0, -5])
    def test_nonpositive_voltage(self, kv):
        with pytest.raises(ValueError, match="positive"):
            electron_wavelength(kv)


class TestScatteringFactor:
    def test_table_covers_z_1_to_98(self):
        assert len(SYMBOLS) == len(WK_A) == len(WK_B) == 98
        assert all(len(row) == 4 for row in WK_A + WK_B)

    def test_li_na_parameters(self):
        np.testing.assert_array_equal(WK_A[2], WK_LI[0])
        np.testing.assert_array_equal(WK_B[2], WK_LI[1])
        np.testing.assert_array_equal(WK_A[10], WK_NA[0])
        np.testing.assert_array_equal(WK_B[10], WK_NA[1])

    def test_li_na_formula(self):
        # DYNAMICAL.md §1.2 written out by hand
        s = np.array([0.05, 0.2, 0.5, 1.0])
        for z, (a, b) in ((3, WK_LI), (11, WK_NA)):
            a, b = np.array(a), np.array(b)
            expected = (a * (1 - np.exp(-b * s[:, None] ** 2)) / s[:, None] ** 2).sum(1)
            np.testing.assert_allclose(electron_scattering_factor(z, s), expected, rtol=2e-3)

    def test_f0_finite_and_continuous(self):
        z = np.arange(1, 99)
        f0 = electron_scattering_factor(z, 0.0)
        assert np.all(np.isfinite(f0)) and np.all(f0 > 0)
        np.testing.assert_allclose(electron_scattering_factor(z, 1e-6), f0, rtol=1e-9)
        # f(0) = sum A_i B_i, the s -> 0 limit of the formula
        np.testing.assert_allclose(f0[[2, 10]], [np.dot(*WK_LI), np.dot(*WK_NA)], rtol=1e-12)

    def test_emsoft_small_argument_expansion(self):
        # EMsoft's WEKO uses A B (1 - B s²/2) where B s² < 0.1: within 0.2 % of each term
        s = np.linspace(0.001, 0.3, 50)
        a, b = np.array(WK_LI[0]), np.array(WK_LI[1])
        arg = b * s[:, None] ** 2
        emsoft = np.where(arg < 0.1, a * b * (1 - 0.5 * arg),
                          a * (1 - np.exp(-arg)) / s[:, None] ** 2).sum(1)
        np.testing.assert_allclose(electron_scattering_factor(3, s), emsoft, rtol=2e-3)

    @pytest.mark.parametrize("z", [3, 11])
    def test_against_doyle_turner(self, z):
        s = np.linspace(0.0, 1.0, 21)
        np.testing.assert_allclose(electron_scattering_factor(z, s), doyle_turner(z, s), rtol=0.05)

    def test_against_itc_all_elements(self):
        # International Tables C 4.3.2.3 (5-Gaussian fit), independent of the WK table
        s = np.linspace(0.0, 1.0, 21)
        for z, symbol in enumerate(SYMBOLS, start=1):
            np.testing.assert_allclose(electron_scattering_factor(z, s), itc(symbol, s),
                                       rtol=0.08, err_msg=symbol)

    @pytest.mark.parametrize("symbol", ["Li", "Na", "Al", "Cu", "Ni", "Au"])
    def test_against_lobato(self, symbol):
        s = np.linspace(0.02, 1.0, 25)
        np.testing.assert_allclose(electron_scattering_factor(atomic_number(symbol), s),
                                   lobato(symbol, s), rtol=0.05)

    def test_vectorised_broadcast(self):
        f = electron_scattering_factor(np.array([3, 11, 29]), np.array([[0.1], [0.4]]))
        assert f.shape == (2, 3)
        assert f[0, 0] == pytest.approx(float(electron_scattering_factor(3, 0.1)))

    def test_bad_input(self):
        with pytest.raises(ValueError, match="1-98"):
            electron_scattering_factor(99, 0.1)
        with pytest.raises(ValueError, match=">= 0"):
            electron_scattering_factor(3, -0.1)


class TestStructureFactor:
    def test_bcc_extinction(self):
        hkl = np.array([[h, k, l] for h in range(-3, 4) for k in range(-3, 4) for l in range(-3, 4)
                        if (h, k, l) != (0, 0, 0)])
        for name in ("li", "na"):
            f = np.abs(structure_factor(get_phase(name), hkl, kv=20))
            odd = hkl.sum(1) % 2 == 1
            assert np.all(f[odd] < 1e-10) and np.all(f[~odd] > 1e-3)

    def test_fcc_extinction(self):
        hkl = np.array([[h, k, l] for h in range(-3, 4) for k in range(-3, 4) for l in range(-3, 4)
                        if (h, k, l) != (0, 0, 0)])
        for name in ("al", "cu"):
            f = np.abs(structure_factor(get_phase(name), hkl, kv=20))
            mixed = ~np.all(hkl % 2 == hkl[:, :1] % 2, axis=1)
            assert np.all(f[mixed] < 1e-10) and np.all(f[~mixed] > 1e-3)

    def test_li_110_against_doyle_turner(self):
        li = get_phase("li")
        s = math.sqrt(2) / 3.51 / 2
        expected = 2 * doyle_turner(3, s) * math.exp(-li.structure[0].Bisoequiv * s**2)
        assert abs(structure_factor(li, [1, 1, 0], kv=20)[0]) == pytest.approx(expected, rel=0.05)

    def test_hexagonal_cif(self, tmp_path):
        path = tmp_path / "mg.cif"
        path.write_text(HCP_MG_CIF)
        mg = get_phase(path)
        a, c, b_iso = 3.2094, 5.2108, 1.5
        f = structure_factor(mg, [[1, 0, 0], [0, 0, 2], [0, 0, 1]], kv=20)
        s100 = 1 / (math.sqrt(3) / 2 * a) / 2  # d_100 = a sqrt(3)/2
        s002 = 1 / (c / 2) / 2
        f_mg = lambda s: float(lobato("Mg", s))  # noqa: E731
        # F_100 = f (e^{2 pi i/3} + e^{4 pi i/3}) = -f, F_002 = -2f, F_001 = 0
        assert abs(f[0]) == pytest.approx(f_mg(s100) * math.exp(-b_iso * s100**2), rel=0.05)
        assert abs(f[1]) == pytest.approx(2 * f_mg(s002) * math.exp(-b_iso * s002**2), rel=0.05)
        assert abs(f[2]) < 1e-10

    def test_bad_shape_and_voltage(self):
        with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
            structure_factor(get_phase("li"), [[1, 1]], kv=20)
        with pytest.raises(ValueError, match="positive"):
            structure_factor(get_phase("li"), [[1, 1, 0]], kv=0)


class TestReflectors:
    def test_li(self):
        ref = reflectors(get_phase("li"), dmin_nm=0.1, kv=20)
        assert np.all(ref.hkl.sum(1) % 2 == 0)  # bcc: absences dropped
        assert np.all(ref.d >= 0.1)
        np.testing.assert_allclose(ref.d, 0.351 / np.linalg.norm(ref.hkl, axis=1))
        # every g and -g, no duplicates; {110} is 12 strongest and first
        rows = {tuple(r) for r in ref.hkl}
        assert len(rows) == len(ref) and all(tuple(-np.array(r)) in rows for r in rows)
        assert sorted(map(tuple, np.abs(ref.hkl[:12]))) == sorted(
            [(1, 1, 0), (1, 0, 1), (0, 1, 1)] * 4)
        assert np.argmax(ref.intensity) < 12
        # Bragg angle of 110 at 20 kV: DYNAMICAL.md §4 gives 0.99 degrees
        assert math.degrees(ref.theta[0]) == pytest.approx(0.99, abs=0.005)
        # all h² + k² + l² <= (a / dmin)² with even sum are present
        n2 = (np.arange(-4, 5)[:, None, None] ** 2 + np.arange(-4, 5)[None, :, None] ** 2
              + np.arange(-4, 5)[None, None, :] ** 2)
        h, k, l = np.meshgrid(*(np.arange(-4, 5),) * 3, indexing="ij")
        allowed = (n2 > 0) & (n2 <= (3.51 / 1.0) ** 2) & ((h + k + l) % 2 == 0)
        assert len(ref) == allowed.sum()

    def test_bad_dmin(self):
        with pytest.raises(ValueError, match="dmin"):
            reflectors(get_phase("li"), dmin_nm=0, kv=20)
