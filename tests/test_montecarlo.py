"""Tests of dpm.master.montecarlo and the energy-weighted dynamical master pattern."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dpm.crystal import get_phase
from dpm.master.dynamical import DynamicalConfig, dynamical_master_pattern
from dpm.master.montecarlo import (
    BackscatterHistograms,
    MonteCarloConfig,
    backscatter_histograms,
    material_parameters,
)
from test_dynamical import EMSOFT_NI, both, make_phase, ncc


def arnal_yield(z: float, tilt_deg: float) -> float:
    """Backscatter coefficient of a tilted bulk sample, η(θ) = (1 + cos θ)^(-9/√Z).

    Arnal, Verdier & Vincensini, C. R. Acad. Sci. Paris 268 (1969) 1526, as given in
    Goldstein et al., *Scanning Electron Microscopy and X-Ray Microanalysis*, 3rd ed.
    (2003), §3.4.1 (η for Ni at 70° ≈ 0.61, Na 0.45, Li 0.22).
    """
    return (1.0 + math.cos(math.radians(tilt_deg))) ** (-9.0 / math.sqrt(z))


# --------------------------------------------------------------------------- EMsoft's Ni MC


@pytest.fixture(scope="module")
def emsoft_mc() -> dict:
    """EMsoft's Monte Carlo of Ni (EMMCOpenCL) stored in kikuchipy's Ni master-pattern file."""
    import h5py
    import kikuchipy

    path = Path(kikuchipy.__file__).parent / "data" / EMSOFT_NI
    nml = "NMLparameters/MCCLNameList"
    with h5py.File(path, "r") as f:
        lattice = f["CrystalData/LatticeParameters"][()]
        atom = f["CrystalData/AtomData"][()][:, 0]
        out = {
            # h5py shows EMsoft's Fortran arrays reversed: accum_e[row Y, col X, energy],
            # accum_z[coarse row, coarse col, depth, energy]
            "accum_e": f["EMData/MCOpenCL/accum_e"][()].astype(np.float64),
            "accum_z": f["EMData/MCOpenCL/accum_z"][()].astype(np.float64),
            "kv": float(f[f"{nml}/EkeV"][0]),
            "e_min": float(f[f"{nml}/Ehistmin"][0]),
            "e_bin": float(f[f"{nml}/Ebinsize"][0]),
            "tilt": float(f[f"{nml}/sig"][0]),
            "omega": float(f[f"{nml}/omega"][0]),
            "depth_max": float(f[f"{nml}/depthmax"][0]),
            "depth_step": float(f[f"{nml}/depthstep"][0]),
            "nsx": int(f[f"{nml}/numsx"][0]),
            "mode": f[f"{nml}/mode"][0].decode(),
            "num_el": int(f[f"{nml}/num_el"][0]),
            "group": int(f[f"{nml}/globalworkgrpsz"][0]),
            "totnum_el": int(f[f"{nml}/totnum_el"][0]) * int(f[f"{nml}/multiplier"][0]),
        }
    # EMMCOpenCL.f90 runs whole kernel launches: (totnum_el / num_max + 1) * num_max electrons
    num_max = out["group"] ** 2 * out["num_el"]
    out["n_incident"] = (out["totnum_el"] // num_max + 1) * num_max
    out["phase"] = make_phase("Ni", 225, (*(10 * lattice[:3]), *lattice[3:]), [tuple(atom[:3])],
                              b_iso=100 * float(atom[4]))
    return out


def emsoft_settings(mc: dict, n: int, seed: int = 1) -> MonteCarloConfig:
    return MonteCarloConfig(n_electrons=n, sample_tilt=mc["tilt"], e_min=mc["e_min"],
                            e_bin=mc["e_bin"], depth_max=mc["depth_max"],
                            depth_step=mc["depth_step"], nsx=mc["nsx"], seed=seed)


def compare_with_emsoft(mc: dict, h: BackscatterHistograms) -> dict:
    ref_depth = mc["accum_z"][..., 0].sum(axis=(0, 1))
    depth = h.depth_histogram[0]
    z = h.depths
    ref_dir = mc["accum_z"][..., 0].sum(axis=2)  # coarse exit directions [row, col]
    direction = h.depth_counts[0].sum(axis=0)
    return {
        "yield": h.backscatter_yield,
        "ref_yield": mc["accum_e"].sum() / mc["n_incident"],
        "depth_corr": float(np.corrcoef(depth, ref_depth)[0, 1]),
        "mean_depth": float((depth * z).sum() / depth.sum()),
        "ref_mean_depth": float((ref_depth * z).sum() / ref_depth.sum()),
        "direction_corr": float(np.corrcoef(direction.ravel(), ref_dir.ravel())[0, 1]),
    }


class TestAgainstEMsoftNi:
    """dpm's MC at the settings of EMsoft's Ni run against EMsoft's stored histograms."""

    def test_settings_read_from_file(self, emsoft_mc):
        assert emsoft_mc["mode"] == "full" and emsoft_mc["omega"] == 0.0
        assert (emsoft_mc["kv"], emsoft_mc["e_min"], emsoft_mc["tilt"]) == (20.1, 20.0, 70.0)
        assert emsoft_mc["accum_e"].shape == (201, 201, 1)
        assert emsoft_mc["accum_z"].shape == (21, 21, 101, 1)

    def test_histogram_layout_matches_emsoft(self, emsoft_mc):
        h = backscatter_histograms(emsoft_mc["phase"], emsoft_mc["kv"], emsoft_settings(emsoft_mc, 1))
        assert h.energies.tolist() == [20.0]  # EMsoft: one bin, EkeVs = Ehistmin
        assert h.counts.shape == (1, 201, 201)
        assert h.depth_counts.shape == (1, 101, 21, 21)
        assert h.depths[-1] == emsoft_mc["depth_max"]

    def test_top_energy_window(self, emsoft_mc):
        # 300 000 electrons: ~2 400 backscattered within 100 eV of the beam energy (0.1 s)
        h = backscatter_histograms(emsoft_mc["phase"], emsoft_mc["kv"],
                                   emsoft_settings(emsoft_mc, 300_000))
        r = compare_with_emsoft(emsoft_mc, h)
        # EMsoft: 0.00804 of 2.0e9 electrons leave with 20.0 < E <= 20.1 keV (dpm: 0.0081)
        assert r["yield"] == pytest.approx(r["ref_yield"], rel=0.1), r
        assert r["depth_corr"] >= 0.98, r  # 0.9997 with 1e6 electrons
        assert r["mean_depth"] == pytest.approx(r["ref_mean_depth"], rel=0.15), r  # 2.02 / 2.00
        assert r["direction_corr"] >= 0.95, r  # forward-scattering lobe towards -y

    @pytest.mark.slow
    def test_top_energy_window_many_electrons(self, emsoft_mc):
        h = backscatter_histograms(emsoft_mc["phase"], emsoft_mc["kv"],
                                   emsoft_settings(emsoft_mc, 4_000_000, seed=5))
        r = compare_with_emsoft(emsoft_mc, h)
        assert r["yield"] == pytest.approx(r["ref_yield"], rel=0.03), r
        assert r["depth_corr"] >= 0.999, r
        assert r["mean_depth"] == pytest.approx(r["ref_mean_depth"], rel=0.03), r
        assert r["direction_corr"] >= 0.99, r


# --------------------------------------------------------------------------- physics


class TestYield:
    @pytest.fixture(scope="class")
    @classmethod
    def yields(cls) -> dict:
        ni = make_phase("Ni", 225, (3.5236, 3.5236, 3.5236, 90, 90, 90), [(0, 0, 0)], 0.35)
        config = MonteCarloConfig(n_electrons=4000, e_min=1.0, seed=11)
        out = {}
        for name, phase in (("li", get_phase("li")), ("na", get_phase("na")), ("ni", ni)):
            h = backscatter_histograms(phase, 20.0, config)
            out[name] = (h.backscatter_yield, h.material.mean_z)
        return out

    def test_rises_with_atomic_number(self, yields):
        assert yields["li"][0] < yields["na"][0] < yields["ni"][0]

    def test_nickel_at_70_degrees(self, yields):
        assert 0.5 <= yields["ni"][0] <= 0.65  # Arnal et al.: 0.61; dpm 0.60

    @pytest.mark.parametrize("name, rel", [("na", 0.15), ("ni", 0.1), ("li", 0.4)])
    def test_against_arnal(self, yields, name, rel):
        # screened Rutherford + CSDA overestimates backscattering of the lightest elements
        # (Li: 0.27 against 0.22), so Li gets a wider margin
        value, z = yields[name]
        assert value == pytest.approx(arnal_yield(z, 70.0), rel=rel)

    def test_normal_incidence_backscatters_less(self):
        phase = get_phase("al")
        tilted = backscatter_histograms(phase, 20.0, MonteCarloConfig(n_electrons=3000, seed=2))
        flat = backscatter_histograms(phase, 20.0,
                                      MonteCarloConfig(n_electrons=3000, seed=2, sample_tilt=0))
        assert flat.backscatter_yield < 0.7 * tilted.backscatter_yield

    def test_material_from_unit_cell(self):
        li, na = material_parameters(get_phase("li")), material_parameters(get_phase("na"))
        assert li.density == pytest.approx(0.534, abs=0.003)  # handbook 0.534 g/cm³
        assert na.density == pytest.approx(0.968, abs=0.005)  # handbook 0.968 g/cm³
        assert (li.mean_z, na.mean_z) == (3.0, 11.0)
        assert li.mean_a == pytest.approx(6.941)


class TestReproducibility:
    def test_same_seed_same_histograms(self):
        config = MonteCarloConfig(n_electrons=3000, seed=7, batch_size=1000)
        a = backscatter_histograms(get_phase("na"), 20.0, config)
        b = backscatter_histograms(get_phase("na"), 20.0, config)
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.depth_counts, b.depth_counts)

    def test_other_seed_other_histograms(self):
        a = backscatter_histograms(get_phase("na"), 20.0, MonteCarloConfig(n_electrons=2000))
        b = backscatter_histograms(get_phase("na"), 20.0,
                                   MonteCarloConfig(n_electrons=2000, seed=1))
        assert not np.array_equal(a.counts, b.counts)

    def test_counts_are_consistent(self):
        h = backscatter_histograms(get_phase("na"), 20.0,
                                   MonteCarloConfig(n_electrons=2000, depth_max=5000))
        assert h.energy_histogram.sum() == h.counts.sum() == h.depth_counts.sum()
        assert 0 < h.backscatter_yield < 1


def test_gpu_path_matches_numpy(gpu_standin):
    """Random numbers come from the host, so the stand-in reproduces NumPy exactly."""
    config = MonteCarloConfig(n_electrons=2000, seed=3, batch_size=700)
    from dataclasses import replace

    cpu = backscatter_histograms(get_phase("li"), 20.0, replace(config, device="cpu"))
    gpu = backscatter_histograms(get_phase("li"), 20.0, replace(config, device="gpu"))
    np.testing.assert_array_equal(cpu.counts, gpu.counts)
    np.testing.assert_array_equal(cpu.depth_counts, gpu.depth_counts)
    assert cpu.counts.sum() > 100


# --------------------------------------------------------------------------- master patterns


@pytest.fixture(scope="module")
def li_window():
    phase = get_phase("li")
    mc = MonteCarloConfig(n_electrons=30_000, seed=4)
    window = dynamical_master_pattern(
        phase, kv=20.0, npx=15, config=DynamicalConfig(energy_window=(19.0, 20.0), montecarlo=mc))
    single = dynamical_master_pattern(phase, kv=20.0, npx=15)
    return window, single


class TestEnergyWindow:
    def test_differs_but_correlates(self, li_window):
        window, single = li_window
        score = ncc(both(window), both(single))
        assert 0.8 <= score < 0.999, score

    def test_m3m_invariant(self, li_window):
        n, s = li_window[0].northern, li_window[0].southern
        assert np.array_equal(n, n.T)
        assert np.array_equal(n, n[:, ::-1])
        assert np.array_equal(n, n[::-1, :])
        assert np.array_equal(n, s)

    def test_params_recorded(self, li_window):
        mp = li_window[0]
        p = mp.params
        assert mp.energy == 20.0 and mp.method == "dynamical"
        assert p["energy_window_keV"] == [19.0, 20.0]
        assert p["energy_bins_keV"] == [19.0, 20.0]
        assert sum(p["energy_weights"]) == pytest.approx(1.0)
        assert p["bse_counts"][0] > p["bse_counts"][1] > 0  # the top bin is half as wide
        assert p["montecarlo"]["n_electrons"] == 30_000 and p["montecarlo"]["seed"] == 4
        assert 0 < p["depth_cutoff_nm"] <= p["montecarlo"]["depth_max"]

    def test_single_bin_window_uses_the_top_bin(self):
        mc = MonteCarloConfig(n_electrons=5000, seed=1)
        mp = dynamical_master_pattern(get_phase("li"), kv=20.0, npx=10,
                                      config=DynamicalConfig(energy_window=(20.0, 20.0),
                                                             montecarlo=mc))
        assert mp.params["energy_bins_keV"] == [20.0]
        assert mp.params["energy_weights"] == [1.0]


# --------------------------------------------------------------------------- bad input


class TestBadInput:
    @pytest.mark.parametrize("kv", [0.0, -1.0])
    def test_voltage(self, kv):
        with pytest.raises(ValueError, match="accelerating voltage must be positive"):
            backscatter_histograms(get_phase("li"), kv, MonteCarloConfig(n_electrons=10))
        with pytest.raises(ValueError, match="accelerating voltage must be positive"):
            dynamical_master_pattern(get_phase("li"), kv=kv, npx=10,
                                     config=DynamicalConfig(energy_window=(1.0, 2.0)))

    @pytest.mark.parametrize("n", [0, -5, 2.5, True])
    def test_electron_count(self, n):
        with pytest.raises(ValueError, match="n_electrons must be an integer >= 1"):
            MonteCarloConfig(n_electrons=n)

    @pytest.mark.parametrize("window", [(0.0, 10.0), (-1.0, 5.0), (15.0, 10.0), (1.0,),
                                        ("a", "b"), (float("nan"), 10.0)])
    def test_window_config(self, window):
        with pytest.raises(ValueError, match="energy_window"):
            DynamicalConfig(energy_window=window)

    def test_window_above_beam_energy(self):
        with pytest.raises(ValueError, match=r"must lie inside \(0, kv\]"):
            dynamical_master_pattern(get_phase("li"), kv=20.0, npx=10,
                                     config=DynamicalConfig(energy_window=(15.0, 25.0)))

    def test_e_min_at_or_above_beam_energy(self):
        with pytest.raises(ValueError, match="e_min"):
            backscatter_histograms(get_phase("li"), 20.0,
                                   MonteCarloConfig(n_electrons=10, e_min=20.0))

    @pytest.mark.parametrize("kwargs, match", [
        ({"nsx": 100}, "nsx must be odd"),
        ({"nsx": 11}, "nsx"),
        ({"sample_tilt": 95.0}, "sample_tilt"),
        ({"e_bin": 0.0}, "e_bin"),
        ({"depth_step": -1.0}, "depth_step"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"e_min": -1.0}, "e_min"),
    ])
    def test_config(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            MonteCarloConfig(**kwargs)

    def test_montecarlo_type(self):
        with pytest.raises(TypeError, match="montecarlo"):
            DynamicalConfig(energy_window=(10.0, 20.0), montecarlo={"n_electrons": 10})
