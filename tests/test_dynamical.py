"""Tests of dpm.master.dynamical: EMsoft's Ni master pattern, convergence, symmetry, solvers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dpm import backend
from dpm.crystal import get_phase
from dpm.master import MasterPattern, simulate_master_pattern
from dpm.master.dynamical import DynamicalConfig, dynamical_master_pattern
from dpm.master.lambert import grid_vectors

EMSOFT_NI = "emsoft_ebsd_master_pattern/ni_mc_mp_20kv_uint8_gzip_opts9.h5"


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def both(mp: MasterPattern) -> np.ndarray:
    return np.stack([mp.northern, mp.southern]).astype(np.float64)


def make_phase(element: str, space_group: int, lattice: tuple, sites: list, b_iso: float):
    """orix phase from an asymmetric unit; lattice (a, b, c in Å, angles in degrees), B in Å²."""
    from diffpy.structure import Atom, Lattice, Structure
    from orix.crystal_map import Phase

    u_iso = b_iso / (8 * math.pi**2)
    atoms = [Atom(element, xyz=xyz, Uisoequiv=u_iso) for xyz in sites]
    return Phase(name=element.lower(), space_group=space_group,
                 structure=Structure(atoms=atoms, lattice=Lattice(*lattice)))


# --------------------------------------------------------------------------- EMsoft's Ni


@pytest.fixture(scope="module")
def emsoft_ni() -> dict:
    """EMsoft's Ni 20 kV master pattern shipped with kikuchipy, and its settings."""
    import h5py
    import kikuchipy

    path = Path(kikuchipy.__file__).parent / "data" / EMSOFT_NI
    with h5py.File(path, "r") as f:
        nml = "NMLparameters"
        energies = f["EMData/EBSDmaster/EkeVs"][()]
        top = int(np.argmax(energies))  # kikuchipy's default slice: the highest energy
        lattice = f["CrystalData/LatticeParameters"][()]
        atom = f["CrystalData/AtomData"][()][:, 0]  # x, y, z, occupancy, B (nm²)
        accum_z = f["EMData/MCOpenCL/accum_z"][()][..., top]  # (y, x, depth) near the centre
        out = {
            "north": f["EMData/EBSDmaster/mLPNH"][()].sum(axis=0)[top].astype(np.float64),
            "south": f["EMData/EBSDmaster/mLPSH"][()].sum(axis=0)[top].astype(np.float64),
            "kv": float(energies[top]),
            "npx": int(f[f"{nml}/EBSDMasterNameList/npx"][0]),
            "dmin": round(float(f[f"{nml}/EBSDMasterNameList/dmin"][0]), 6),  # float32 in the file
            "bethe": {k: float(f[f"{nml}/BetheList/{k}"][0]) for k in ("c1", "c2", "c3",
                                                                       "sgdbdiff")},
            "depth_step": float(f[f"{nml}/MCCLNameList/depthstep"][0]),
            "atomic_number": int(f["CrystalData/Atomtypes"][0]),
            "space_group": int(f["CrystalData/SpaceGroupNumber"][0]),
        }
    assert out["atomic_number"] == 28
    out["phase"] = make_phase("Ni", out["space_group"],
                              (*(10 * lattice[:3]), *lattice[3:]), [tuple(atom[:3])],
                              b_iso=100 * float(atom[4]))
    # EMsoft's depth weights (EMEBSDmaster.f90): the accum_z histogram summed over the
    # central pixels, cut where every pixel has 99 % of its electrons.
    cum = np.cumsum(accum_z, axis=-1)
    izz = int(((cum < 0.99 * accum_z.sum(axis=-1, keepdims=True)).sum(axis=-1) + 1).max())
    out["depth_weights"] = tuple(accum_z.sum(axis=(0, 1))[:izz].astype(float))
    return out


def emsoft_config(ni: dict, **kw) -> DynamicalConfig:
    return DynamicalConfig(dmin=ni["dmin"], depth_weights=ni["depth_weights"],
                           depth_step=ni["depth_step"], **ni["bethe"], **kw)


def emsoft_on_grid(ni: dict, npx: int) -> np.ndarray:
    """EMsoft's hemispheres resampled (bilinear, as kikuchipy does) onto a dpm grid."""
    from dpm.master.lambert import lambert_interpolate

    if npx == ni["npx"]:
        return np.stack([ni["north"], ni["south"]])
    v = grid_vectors(npx, "north")  # the southern grid has the same Lambert coordinates
    return np.stack([lambert_interpolate(ni["north"], v), lambert_interpolate(ni["south"], v)])


class TestAgainstEMsoftNi:
    """Acceptance: dpm's Ni at EMsoft's settings against EMsoft's own master pattern."""

    def test_settings_read_from_file(self, emsoft_ni):
        assert emsoft_ni["kv"] == 20.0 and emsoft_ni["npx"] == 200 and emsoft_ni["dmin"] == 0.05
        assert emsoft_ni["bethe"] == {"c1": 4.0, "c2": 8.0, "c3": 50.0, "sgdbdiff": 1.0}
        assert 5 <= len(emsoft_ni["depth_weights"]) <= 20

    def test_hermitian_correlates_with_emsoft(self, emsoft_ni):
        npx = 100
        mp = dynamical_master_pattern(emsoft_ni["phase"], kv=emsoft_ni["kv"], npx=npx,
                                      config=emsoft_config(emsoft_ni))
        score = ncc(both(mp), emsoft_on_grid(emsoft_ni, npx))
        assert score >= 0.98, f"NCC with EMsoft's Ni master pattern {score:.4f}"  # 0.993

    def test_general_solver_reproduces_emsoft(self, emsoft_ni):
        npx = 100
        mp = dynamical_master_pattern(emsoft_ni["phase"], kv=emsoft_ni["kv"], npx=npx,
                                      config=emsoft_config(emsoft_ni, solver="general"))
        score = ncc(both(mp), emsoft_on_grid(emsoft_ni, npx))
        assert score >= 0.998, f"NCC with EMsoft's Ni master pattern {score:.4f}"  # 0.9996

    def test_beam_counts_match_emsoft_log(self, emsoft_ni):
        # ni_mp.out: "Average number of strong reflections = 18", "weak = 9"
        mp = dynamical_master_pattern(emsoft_ni["phase"], kv=emsoft_ni["kv"], npx=30,
                                      config=emsoft_config(emsoft_ni))
        assert round(mp.params["strong_beams_mean"]) == 18
        assert round(mp.params["weak_beams_mean"]) == 9

    @pytest.mark.slow
    @pytest.mark.parametrize("solver, threshold", [("hermitian", 0.99), ("general", 0.999)])
    def test_full_resolution(self, emsoft_ni, solver, threshold):
        mp = dynamical_master_pattern(emsoft_ni["phase"], kv=emsoft_ni["kv"],
                                      npx=emsoft_ni["npx"],
                                      config=emsoft_config(emsoft_ni, solver=solver))
        assert mp.params["n_directions"] == 20301  # EMsoft's log: 20302 (it counts one more)
        assert ncc(both(mp), emsoft_on_grid(emsoft_ni, emsoft_ni["npx"])) >= threshold


# --------------------------------------------------------------------------- Li and Na


@pytest.fixture(scope="module")
def li_mp() -> MasterPattern:
    return dynamical_master_pattern(get_phase("li"), kv=20.0, npx=25)


class TestConvergence:
    @pytest.mark.parametrize("name", ["li", "na"])
    def test_raising_thresholds_changes_little(self, name):
        phase = get_phase(name)
        base = DynamicalConfig()
        raised = DynamicalConfig(c1=base.c1 * 4 / 3, c2=base.c2 * 4 / 3, c3=base.c3 * 4 / 3)
        a = dynamical_master_pattern(phase, kv=20.0, npx=40, config=base)
        b = dynamical_master_pattern(phase, kv=20.0, npx=40, config=raised)
        assert b.params["strong_beams_mean"] > a.params["strong_beams_mean"]
        assert ncc(both(a), both(b)) >= 0.99

    def test_emsoft_template_thresholds_are_not_converged_for_li(self):
        phase = get_phase("li")
        template = dynamical_master_pattern(
            phase, kv=20.0, npx=40, config=DynamicalConfig(c1=4, c2=8, c3=50))
        default = dynamical_master_pattern(phase, kv=20.0, npx=40)
        assert template.params["strong_beams_mean"] < 4
        assert ncc(both(template), both(default)) < 0.995  # 0.988 at npx = 100


class TestSymmetry:
    def test_invariant_under_grid_preserving_m3m_operations(self, li_mp):
        n, s = li_mp.northern, li_mp.southern
        assert np.array_equal(n, n.T)  # x <-> y
        assert np.array_equal(n, n[:, ::-1])  # x -> -x
        assert np.array_equal(n, n[::-1, :])  # y -> -y
        assert np.array_equal(n, s)  # z -> -z (centrosymmetric Laue group)

    def test_hemispheres_agree_on_equator(self, li_mp):
        n, s = li_mp.northern, li_mp.southern
        for sl in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
            assert np.array_equal(n[sl], s[sl])

    def test_only_orbit_representatives_are_computed(self, li_mp):
        npx = li_mp.npx
        assert li_mp.params["n_directions"] == (npx + 1) * (npx + 2) // 2

    def test_triclinic_inversion_and_equator(self):
        phase = make_phase("Al", 2, (3.0, 3.3, 3.6, 82, 87, 95), [(0, 0, 0)], b_iso=0.8)
        mp = dynamical_master_pattern(phase, kv=20.0, npx=12,
                                      config=DynamicalConfig(dmin=0.1, c1=4, c2=8, c3=50))
        n, s = mp.northern, mp.southern
        assert np.array_equal(s, n[::-1, ::-1])  # -1: (x, y, z) -> (-x, -y, -z)
        assert not np.array_equal(n, n.T)
        for sl in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
            assert np.array_equal(n[sl], s[sl])
        assert mp.params["n_directions"] < n.size


class TestSolvers:
    def test_hermitian_agrees_with_general_on_li(self):
        phase = get_phase("li")
        h = dynamical_master_pattern(phase, kv=20.0, npx=30)
        g = dynamical_master_pattern(phase, kv=20.0, npx=30,
                                     config=DynamicalConfig(solver="general"))
        assert ncc(both(h), both(g)) >= 0.999  # 0.99985

    def test_exponential_closed_form_matches_fine_quadrature(self):
        phase = get_phase("li")
        t, zmax, dz = 20.0, 60.0, 0.02
        z = dz * np.arange(1, int(zmax / dz) + 1)
        closed = dynamical_master_pattern(
            phase, kv=20.0, npx=12, config=DynamicalConfig(mean_depth=t, max_depth=zmax))
        table = dynamical_master_pattern(
            phase, kv=20.0, npx=12,
            config=DynamicalConfig(depth_weights=tuple(np.exp(-z / t)), depth_step=dz))
        np.testing.assert_allclose(both(closed), both(table), rtol=2e-3)

    def test_pattern_is_relative_to_no_diffraction(self, li_mp):
        values = both(li_mp)
        assert 0.9 < np.median(values) < 1.1
        assert values.std() > 0.02  # there are bands

    def test_params_recorded(self, li_mp):
        p = li_mp.params
        assert li_mp.method == "dynamical" and li_mp.energy == 20.0
        assert p["kv"] == 20.0 and p["npx"] == 25 and p["dmin_nm"] == 0.05
        assert (p["bethe_c1"], p["bethe_c2"], p["bethe_c3"]) == (18.0, 54.0, 300.0)
        assert p["solver"] == "hermitian" and p["depth_model"] == "exponential"
        assert p["mean_depth_nm"] == pytest.approx(p["normal_absorption_length_nm"] / (2 * math.pi))
        assert p["strong_beams_max"] >= p["strong_beams_mean"] >= p["strong_beams_min"] >= 1


# --------------------------------------------------------------------------- inputs, API, I/O


class TestBadInput:
    @pytest.mark.parametrize("kv", [0.0, -5.0])
    def test_voltage(self, kv):
        with pytest.raises(ValueError, match="accelerating voltage must be positive"):
            dynamical_master_pattern(get_phase("li"), kv=kv, npx=20)

    @pytest.mark.parametrize("npx", [0, 9, 12.5, True])
    def test_npx(self, npx):
        with pytest.raises(ValueError, match="npx must be an integer >= 10"):
            dynamical_master_pattern(get_phase("li"), kv=20.0, npx=npx)

    def test_element_without_scattering_parameters(self):
        phase = make_phase("Es", 229, (3.5, 3.5, 3.5, 90, 90, 90), [(0, 0, 0)], b_iso=1.0)
        with pytest.raises(ValueError, match="Es"):
            dynamical_master_pattern(phase, kv=20.0, npx=10)

    @pytest.mark.parametrize("kwargs, match", [
        ({"dmin": 0}, "dmin"),
        ({"c1": 10, "c2": 5}, "c1 <= c2"),
        ({"c3": -1}, "c3"),
        ({"mean_depth": -1.0}, "mean_depth"),
        ({"max_depth": 0.0}, "max_depth"),
        ({"depth_weights": ()}, "depth_weights"),
        ({"depth_weights": (1.0, -1.0)}, "depth_weights"),
        ({"solver": "eig"}, "solver"),
        ({"batch_size": 0}, "batch_size"),
    ])
    def test_config(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            DynamicalConfig(**kwargs)


def test_simulate_master_pattern_dispatches_dynamical():
    mp = simulate_master_pattern("li", kv=20.0, npx=12, method="dynamical", c1=8, c2=24, c3=150)
    assert mp.method == "dynamical" and mp.params["bethe_c1"] == 8.0


def test_kikuchipy_loads_written_file(li_mp, tmp_path):
    import kikuchipy as kp

    from dpm.io.emsoft import write_master_pattern

    path = write_master_pattern(li_mp, tmp_path / "li_dynamical.h5")
    loaded = kp.load(path, projection="lambert", hemisphere="both")
    data = np.asarray(loaded.data, dtype=np.float64).reshape(2, 51, 51)
    np.testing.assert_allclose(data, both(li_mp), rtol=1e-6)
    assert loaded.phase.space_group.number == 229


def test_cupy_code_path_matches_numpy(monkeypatch):
    """The xp code path on the CPU stand-in for CuPy, with the names this module lists."""
    import cupy_standin

    standin = cupy_standin.build()
    monkeypatch.setattr(backend, "_import_cupy", lambda: standin)
    backend._cupy_found.clear()
    try:
        phase = get_phase("na")
        for solver in ("hermitian", "general"):
            gpu = dynamical_master_pattern(phase, kv=20.0, npx=10,
                                           config=DynamicalConfig(solver=solver, device="gpu"))
            cpu = dynamical_master_pattern(phase, kv=20.0, npx=10,
                                           config=DynamicalConfig(solver=solver, device="cpu"))
            np.testing.assert_allclose(both(gpu), both(cpu), rtol=1e-6)
    finally:
        backend._cupy_found.clear()
