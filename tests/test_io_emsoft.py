"""Tests of dpm.io.emsoft: EMsoft-layout master-pattern files, checked with kikuchipy."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from dpm.crystal import get_phase
from dpm.io.emsoft import (
    MasterPatternFileError,
    read_master_pattern,
    write_master_pattern,
)
from dpm.master import MasterPattern
from dpm.master.kinematical import kinematical_master_pattern
from dpm.master.lambert import lambert_to_stereographic

from test_master import kikuchipy_kinematical, ncc


def kikuchipy_data_dir() -> Path:
    import kikuchipy

    return Path(kikuchipy.__file__).parent / "data" / "emsoft_ebsd_master_pattern"


NI_FILE = "ni_mc_mp_20kv_uint8_gzip_opts9.h5"
MULTI_ENERGY_FILE = "master_patterns.h5"


@pytest.fixture(scope="module")
def li_mp():
    return kinematical_master_pattern(get_phase("li"), kv=20.0, npx=100)


@pytest.fixture
def li_file(li_mp, tmp_path):
    return write_master_pattern(li_mp, tmp_path / "li.h5")


class TestWrite:
    def test_kikuchipy_loads_it(self, li_mp, li_file):
        import kikuchipy as kp

        s = kp.load(li_file, projection="lambert", hemisphere="both")
        assert type(s).__name__ == "EBSDMasterPattern"
        np.testing.assert_array_equal(s.data[0], li_mp.northern)
        np.testing.assert_array_equal(s.data[1], li_mp.southern)
        assert s.phase.space_group.number == 229
        assert s.phase.name == "li"
        assert s.phase.structure.lattice.a == pytest.approx(0.351)  # kikuchipy keeps EMsoft's nm
        atom = s.phase.structure[0]
        assert atom.Bisoequiv == pytest.approx(get_phase("li").structure[0].Bisoequiv, rel=1e-5)
        assert s.original_metadata.MCCLNameList.EkeV == 20.0

    def test_kikuchipy_tells_the_hemispheres_and_energy_apart(self, tmp_path):
        """Different hemispheres (Li's kinematical ones are alike) at 15 kV, as kikuchipy reads them."""
        import kikuchipy as kp

        rng = np.random.default_rng(4)
        north, south = rng.uniform(0, 1, (2, 41, 41)).astype(np.float32)
        mp = MasterPattern(north, south, phase=get_phase("na"), energy=15.0, method="kinematical")
        path = write_master_pattern(mp, tmp_path / "na.h5")
        both = kp.load(path, projection="lambert", hemisphere="both", energy=15)
        np.testing.assert_array_equal(both.data, [north, south])
        for hemisphere, truth in (("upper", north), ("lower", south)):
            one = kp.load(path, projection="lambert", hemisphere=hemisphere, energy=15)
            assert one.hemisphere == hemisphere
            np.testing.assert_array_equal(one.data, truth)
        # masterSP as EMsoft lays it out (row j at Y = (j - npx) / npx, EMEBSDmaster.f90);
        # kikuchipy mirrors EMsoft's rows on reading ("flip up-down", _emsoft_master_pattern.py)
        stereo = kp.load(path, projection="stereographic", hemisphere="both")
        np.testing.assert_array_equal(stereo.data, [lambert_to_stereographic(north)[::-1],
                                                    lambert_to_stereographic(south)[::-1]])
        assert both.original_metadata.MCCLNameList.EkeV == 15.0
        assert both.phase.name == "na" and both.phase.space_group.number == 229
        assert both.phase.structure.lattice.a == pytest.approx(get_phase("na").structure.lattice.a / 10)

    def test_written_li_agrees_with_kikuchipy_simulator(self, li_file):
        # acceptance: the file dpm writes, as kikuchipy reads it, against kikuchipy's own
        # kinematical simulation of the same phase and voltage, over both hemispheres
        import kikuchipy as kp

        loaded = np.asarray(kp.load(li_file, projection="lambert", hemisphere="both").data)
        reference = kikuchipy_kinematical(get_phase("li"), kv=20.0, npx=100)
        assert loaded.shape == reference.shape == (2, 201, 201)
        assert ncc(loaded, reference) >= 0.9

    def test_layout(self, li_file):
        with h5py.File(li_file) as f:
            assert f["EMheader/EBSDmaster/ProgramName"][0] == b"EMEBSDmaster.f90"
            assert f["EMData/EBSDmaster/mLPNH"].shape == (1, 1, 201, 201)
            assert f["EMData/EBSDmaster/mLPNH"].dtype == np.float32
            assert f["EMData/EBSDmaster/masterSPSH"].shape == (1, 201, 201)
            np.testing.assert_allclose(f["CrystalData/LatticeParameters"][()],
                                       [0.351, 0.351, 0.351, 90, 90, 90])
            assert f["CrystalData/AtomData"].shape == (5, 1)  # asymmetric unit only
            assert f["CrystalData/Atomtypes"][()].tolist() == [3]
            assert f["CrystalData/CrystalSystem"][0] == 1
            assert f["NMLparameters/EBSDMasterNameList/npx"][0] == 100
            assert f["NMLparameters/EBSDMasterNameList/dmin"][0] == pytest.approx(0.05)
            assert f["NMLparameters/DPMNameList/method"][0] == b"kinematical"

    def test_fcc_asymmetric_unit(self, tmp_path):
        mp = kinematical_master_pattern(get_phase("cu"), kv=20.0, npx=12)
        path = write_master_pattern(mp, tmp_path / "cu.h5")
        with h5py.File(path) as f:
            np.testing.assert_allclose(f["CrystalData/AtomData"][()][:, 0],
                                       [0, 0, 0, 1, 0.0055], atol=1e-6)  # B: 0.55 Å² in nm²

    def test_round_trip(self, li_mp, li_file):
        back = read_master_pattern(li_file)
        np.testing.assert_array_equal(back.northern, li_mp.northern)
        np.testing.assert_array_equal(back.southern, li_mp.southern)
        assert back.energy == 20.0 and back.method == "kinematical"
        for key in ("kv", "npx", "dmin_nm", "scaling", "n_bands"):
            assert back.params[key] == li_mp.params[key]
        assert back.phase.structure.lattice.a == pytest.approx(3.51)  # Å again
        assert back.phase.space_group.number == 229
        assert back.phase.structure[0].element == "Li"


class TestStereographic:
    def test_matches_emsoft_ni(self):
        # EMsoft's own masterSPNH of the Ni file, against ours from its mLPNH
        with h5py.File(kikuchipy_data_dir() / NI_FILE) as f:
            lambert = f["EMData/EBSDmaster/mLPNH"][0, 0].astype(np.float64)
            emsoft = f["EMData/EBSDmaster/masterSPNH"][0].astype(np.float64)
        ours = lambert_to_stereographic(lambert)
        inside = ours != 0
        assert ncc(ours[inside], emsoft[inside]) > 0.99
        assert np.all(ours[~inside] == 0)


class TestRead:
    def test_ni_matches_kikuchipy(self):
        import kikuchipy as kp

        path = kikuchipy_data_dir() / NI_FILE
        mp = read_master_pattern(path)
        s = kp.load(path, projection="lambert", hemisphere="both")
        np.testing.assert_array_equal(np.stack([mp.northern, mp.southern]),
                                      np.asarray(s.data, dtype=np.float32))
        assert mp.energy == 20.0 and mp.method == "file"
        assert mp.phase.space_group.number == 225
        assert mp.phase.structure.lattice.a == pytest.approx(3.5236)
        assert mp.phase.structure[0].element == "Ni"

    def test_kikuchipy_data_nickel(self):
        """EMsoft's Ni file that kikuchipy ships (offline), through kikuchipy.data."""
        import kikuchipy as kp

        s = kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="both")
        t = s.tmp_parameters
        path = Path(t.folder) / f"{t.filename}.{t.extension}"
        mp = read_master_pattern(path)
        np.testing.assert_array_equal(np.stack([mp.northern, mp.southern]), s.data)
        assert mp.npx == 200 and mp.energy == 20.0
        assert mp.phase.space_group.number == s.phase.space_group.number == 225
        assert mp.phase.structure.lattice.a == pytest.approx(10 * s.phase.structure.lattice.a)

    @pytest.mark.parametrize("energy", [None, 15.0, 10.2])
    def test_energy_slice(self, energy):
        import kikuchipy as kp

        path = kikuchipy_data_dir() / MULTI_ENERGY_FILE
        mp = read_master_pattern(path, energy=energy)
        expected_energy = 20.0 if energy is None else round(energy)
        assert mp.energy == pytest.approx(expected_energy)
        s = kp.load(path, projection="lambert", hemisphere="both", energy=expected_energy)
        np.testing.assert_array_equal(np.stack([mp.northern, mp.southern]),
                                      np.asarray(s.data, dtype=np.float32))

    def test_sums_over_numset(self, tmp_path):
        import kikuchipy as kp

        path = tmp_path / "two_sites.h5"
        shutil.copy(kikuchipy_data_dir() / MULTI_ENERGY_FILE, path)
        rng = np.random.default_rng(3)
        with h5py.File(path, "r+") as f:
            group = f["EMData/EBSDmaster"]
            for key in ("mLPNH", "mLPSH"):
                del group[key]
                group[key] = rng.uniform(0, 1, (2, 11, 13, 13)).astype(np.float32)
            group["numset"][0] = 2
        mp = read_master_pattern(path)
        s = kp.load(path, projection="lambert", hemisphere="both", energy=20)
        np.testing.assert_allclose(np.stack([mp.northern, mp.southern]), s.data, rtol=1e-6)
        with h5py.File(path) as f:
            np.testing.assert_allclose(mp.northern, f["EMData/EBSDmaster/mLPNH"][:, -1].sum(0),
                                       rtol=1e-6)

    def test_missing_file(self, tmp_path):
        with pytest.raises(MasterPatternFileError, match="nothere.h5.*does not exist"):
            read_master_pattern(tmp_path / "nothere.h5")

    def test_not_hdf5(self, tmp_path):
        path = tmp_path / "text.h5"
        path.write_text("not an HDF5 file")
        with pytest.raises(MasterPatternFileError, match="text.h5.*not an HDF5"):
            read_master_pattern(path)

    def test_missing_dataset(self, li_file):
        with h5py.File(li_file, "r+") as f:
            del f["EMData/EBSDmaster/mLPSH"]
        with pytest.raises(MasterPatternFileError, match=r"li\.h5.*'EMData/EBSDmaster/mLPSH'"):
            read_master_pattern(li_file)

    def test_missing_energy(self, li_file):
        with pytest.raises(MasterPatternFileError, match=r"li\.h5.*30.*\[20\.0\]"):
            read_master_pattern(li_file, energy=30)

    def test_other_hdf5_not_a_master_pattern(self, tmp_path):
        path = tmp_path / "other.h5"
        with h5py.File(path, "w") as f:
            f["data"] = np.zeros(3)
        with pytest.raises(MasterPatternFileError, match="other.h5.*EMheader/EBSDmaster/ProgramName"):
            read_master_pattern(path)
