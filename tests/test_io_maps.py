"""Orientation-map files: dpm's .ang (square and HexGrid) and .ctf writers and its map reader.

Oracles: orix's own readers (``orix.io.load``) for what dpm writes, a header
checked by hand against the TSL and Channel 5 layouts (as orix's test files
lay them out), hexagonal pixel positions computed point by point from the
TSL HexGrid definition, a HexGrid file written here line by line as TSL
writes them (``NCOLS_EVEN = NCOLS_ODD − 1``), and kikuchipy's
``EBSDDetector`` for the pattern centre in TSL's convention.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from orix import io as orix_io
from orix.crystal_map import CrystalMap, PhaseList
from orix.quaternion import Orientation, Rotation

from dpm.crystal import get_phase
from dpm.io.readers import ANG_PADDING, MapFileError, map_layout, read_map
from dpm.detector import Detector
from dpm.io.writers import write_ang, write_ctf, write_index_outputs

STEP = 0.5

# orix warns about the Euler angles 4π that mark unindexed .ang points
pytestmark = pytest.mark.filterwarnings("ignore:Angles are quite high")


def _map(ny: int = 4, nx: int = 5, seed: int = 0, unindexed=(3, 7)) -> CrystalMap:
    """A dpm-style Li map: x = col·step, y = row·step, scores, pattern quality, band contrast."""
    rng = np.random.default_rng(seed)
    n = ny * nx
    phase_id = np.zeros(n, dtype=int)
    phase_id[list(unindexed)] = -1
    y, x = np.divmod(np.arange(n), nx)
    props = {"scores": rng.uniform(0.1, 0.9, n).astype(np.float32),
             "pattern_quality": rng.uniform(0.0, 1.0, n).astype(np.float32),
             "band_contrast": rng.uniform(0.0, 255.0, n).astype(np.float32),
             "readable": np.ones(n, dtype=bool)}
    return CrystalMap(Rotation.random(n), phase_id=phase_id, x=x * STEP, y=y * STEP,
                      phase_list=PhaseList(get_phase("li")), prop=props, scan_unit="um")


def _two_phase_map(ny: int = 4, nx: int = 5) -> CrystalMap:
    """Li (id 0) left, Na (id 1) right, pixel 6 unindexed."""
    n = ny * nx
    phase_id = np.where(np.arange(n) % nx < nx // 2, 0, 1)
    phase_id[6] = -1
    y, x = np.divmod(np.arange(n), nx)
    return CrystalMap(Rotation.random(n), phase_id=phase_id, x=x * STEP, y=y * STEP,
                      phase_list=PhaseList([get_phase("li"), get_phase("na")]), scan_unit="um")


def _rotation_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles (radians) between rotations given as quaternions, no crystal symmetry."""
    dot = np.abs(np.sum(np.asarray(a).reshape(-1, 4) * np.asarray(b).reshape(-1, 4), axis=1))
    return 2 * np.arccos(np.clip(dot, 0.0, 1.0))


def _angles(a: CrystalMap, b: CrystalMap, mask: np.ndarray) -> np.ndarray:
    """Disorientation angles (degrees) of the masked points of two maps, by orix."""
    pg = get_phase("li").point_group
    oa = Orientation(a.rotations.data[mask], symmetry=pg)
    ob = Orientation(b.rotations.data[mask], symmetry=pg)
    return np.degrees(oa.angle_with(ob))


def _hex_positions(ny: int, counts: list[int], step: float) -> np.ndarray:
    """(x, y) of every point of a TSL HexGrid file, row after row, from the definition."""
    points = []
    for r in range(ny):
        for i in range(counts[r % 2]):
            points.append(((i + 0.5 * (r % 2)) * step, r * step * math.sqrt(3) / 2))
    return np.array(points)


def _data_lines(path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


class TestWriteAng:
    def test_orix_reads_orientations_phases_and_properties(self, tmp_path):
        xmap = _map()
        path = write_ang(xmap, tmp_path / "map.ang")
        read = orix_io.load(str(path), autogen_names=False)
        indexed = xmap.phase_id >= 0
        assert read.shape == (4, 5) and read.dx == read.dy == STEP
        np.testing.assert_array_equal(read.phase_id >= 0, indexed)
        assert _angles(xmap, read, indexed).max() <= 1e-3
        phase = read.phases[int(read.phase_id[indexed][0])]
        assert phase.name == "li" and phase.point_group.laue.name == "m-3m"
        np.testing.assert_allclose(phase.structure.lattice.abcABG(), [3.51, 3.51, 3.51, 90, 90, 90])
        np.testing.assert_allclose(read.prop["ci"][indexed], xmap.prop["scores"][indexed], atol=1e-5)
        np.testing.assert_array_equal(read.prop["ci"][~indexed], -1.0)
        np.testing.assert_allclose(read.prop["iq"], xmap.prop["pattern_quality"], atol=1e-5)
        np.testing.assert_array_equal(read.prop["fit"][~indexed], 180.0)

    def test_header_and_first_line_by_hand(self, tmp_path):
        xmap = _map(2, 3, unindexed=())
        text = write_ang(xmap, tmp_path / "map.ang").read_text().splitlines()
        header = [line for line in text if line.startswith("#")]
        assert header[6:14] == [
            "# Phase 1", "# MaterialName  \tli", "# Formula     \tli", "# Info\t\t",
            "# Symmetry              43",
            "# LatticeConstants      3.5100 3.5100 3.5100  90.000  90.000  90.000",
            "# NumberFamilies        0", "#"]
        assert header[14:20] == ["# GRID: SqrGrid", "# XSTEP: 0.500000", "# YSTEP: 0.500000",
                                 "# NCOLS_ODD: 3", "# NCOLS_EVEN: 3", "# NROWS: 2"]
        first = text[len(header)].split()
        euler = xmap.rotations.to_euler()[0]
        assert [float(v) for v in first[:3]] == pytest.approx(euler, abs=1e-6)
        assert first[3:5] == ["0.00000", "0.00000"] and first[7] == "1"
        assert float(first[6]) == pytest.approx(float(xmap.prop["scores"][0]), abs=1e-5)
        assert len(text) - len(header) == 6

    def test_hexagonal_positions_and_header(self, tmp_path):
        xmap = _map(5, 4)
        path = write_ang(xmap, tmp_path / "hex.ang", grid="hexagonal")
        text = path.read_text()
        assert "# GRID: HexGrid" in text and "# YSTEP: 0.433013" in text
        assert "# NCOLS_ODD: 4" in text and "# NCOLS_EVEN: 4" in text  # nothing dropped
        lines = np.array(_data_lines(path))
        np.testing.assert_allclose(lines[:, 3:5], _hex_positions(5, [4, 4], STEP), atol=1e-5)
        # orix reads every point, in file order, with its orientation
        read = orix_io.load(str(path), autogen_names=False)
        indexed = xmap.phase_id >= 0
        assert read.size == 20 and _angles(xmap, read, indexed).max() <= 1e-3

    def test_hexagonal_padding_pixels_are_left_out(self, tmp_path):
        """Shifted rows whose last pixel is reader padding are written TSL's way, one shorter."""
        ny, nx = 5, 4
        padding = [r * nx + nx - 1 for r in (1, 3)]
        xmap = _map(ny, nx, unindexed=padding)
        xmap.prop["pattern_quality"] = np.where(np.isin(np.arange(20), padding), 0.0,
                                                xmap.prop["pattern_quality"])
        path = write_ang(xmap, tmp_path / "hex.ang", grid="hexagonal")
        assert "# NCOLS_ODD: 4" in path.read_text() and "# NCOLS_EVEN: 3" in path.read_text()
        lines = np.array(_data_lines(path))
        np.testing.assert_allclose(lines[:, 3:5], _hex_positions(ny, [4, 3], STEP), atol=1e-5)

    def test_several_rotations_per_point_write_the_best(self, tmp_path):
        xmap = _map(2, 3, unindexed=())
        q = np.stack([xmap.rotations.data, Rotation.random(6).data], axis=1)
        multi = CrystalMap(Rotation(q), x=xmap.x, y=xmap.y, phase_list=xmap.phases,
                           scan_unit="um")
        read = orix_io.load(str(write_ang(multi, tmp_path / "m.ang")), autogen_names=False)
        assert _angles(xmap, read, np.ones(6, bool)).max() <= 1e-3

    def test_orix_reads_every_column(self, tmp_path):
        """Rotations to the printed 1e-6 rad, x/y, phase, IQ, CI, detector signal, fit."""
        xmap = _map()
        rng = np.random.default_rng(5)
        xmap.prop["detector_signal"] = rng.uniform(0, 1000, xmap.size)
        xmap.prop["fit"] = rng.uniform(0, 3, xmap.size)
        read = orix_io.load(str(write_ang(xmap, tmp_path / "map.ang")), autogen_names=False)
        indexed = xmap.phase_id >= 0
        assert _rotation_angles(read.rotations.data[indexed], xmap.rotations.data[indexed]).max() < 1e-4
        np.testing.assert_allclose(read.rotations.to_euler()[indexed],
                                   xmap.rotations.to_euler()[indexed], atol=1e-4)
        assert _angles(xmap, read, indexed).max() < 0.01
        np.testing.assert_allclose(read.x, xmap.x, atol=1e-5)
        np.testing.assert_allclose(read.y, xmap.y, atol=1e-5)
        np.testing.assert_array_equal(read.phase_id, np.where(indexed, 1, -1))  # TSL numbers from 1
        np.testing.assert_allclose(read.prop["iq"], xmap.prop["pattern_quality"], atol=1e-5)
        np.testing.assert_allclose(read.prop["ci"][indexed], xmap.prop["scores"][indexed], atol=1e-5)
        np.testing.assert_allclose(read.prop["detector_signal"], xmap.prop["detector_signal"], atol=1e-5)
        np.testing.assert_allclose(read.prop["fit"][indexed], xmap.prop["fit"][indexed], atol=1e-5)

    def test_two_phases(self, tmp_path):
        xmap = _two_phase_map()
        read = orix_io.load(str(write_ang(xmap, tmp_path / "two.ang")), autogen_names=False)
        names = {int(i): read.phases[int(i)].name for i in read.phases.ids if i >= 0}
        assert names == {1: "li", 2: "na"}
        np.testing.assert_array_equal(read.phase_id, np.where(xmap.phase_id >= 0, xmap.phase_id + 1, -1))
        indexed = xmap.phase_id >= 0
        assert _rotation_angles(read.rotations.data[indexed], xmap.rotations.data[indexed]).max() < 1e-4

    def test_header_follows_the_tsl_layout(self, tmp_path):
        """The header keys in the order TSL OIM writes them (orix's TSL test header)."""
        text = write_ang(_map(2, 3, unindexed=()), tmp_path / "map.ang").read_text().splitlines()
        keys = [line[2:].replace(":", " ").split()[0] for line in text
                if line.startswith("# ") and line[2:].strip()]
        assert keys == ["TEM_PIXperUM", "x-star", "y-star", "z-star", "WorkingDistance",
                        "Phase", "MaterialName", "Formula", "Info", "Symmetry", "LatticeConstants",
                        "NumberFamilies", "GRID", "XSTEP", "YSTEP", "NCOLS_ODD", "NCOLS_EVEN",
                        "NROWS", "OPERATOR", "SAMPLEID", "SCANID"]
        assert text[:5] == ["# TEM_PIXperUM          1.000000", "# x-star                0.000000",
                            "# y-star                0.000000", "# z-star                0.000000",
                            "# WorkingDistance       0.000000"]  # no detector: PC unknown
        assert len(_data_lines(tmp_path / "map.ang")[0]) == 10  # TSL's ten columns

    @pytest.mark.parametrize(("shape", "tsl"), [((60, 80), (0.42, 0.79, 0.55)),
                                                ((80, 60), (0.42, 0.79, 0.55 * 80 / 60))])
    def test_pattern_centre_in_tsl_convention(self, tmp_path, shape, tsl):
        """Bruker (0.42, 0.21, 0.55): x* = x, y* = 1 − y, z* = z · Ny / min(Nx, Ny)."""
        from kikuchipy.detectors import EBSDDetector

        pc = (0.42, 0.21, 0.55)
        truth = EBSDDetector(shape=shape, pc=pc, convention="bruker").pc_tsl().reshape(3)
        np.testing.assert_allclose(truth, tsl)
        for detector in (Detector(shape, pc), EBSDDetector(shape=shape, pc=pc)):
            text = write_ang(_map(), tmp_path / "pc.ang", detector=detector).read_text()
            star = [float(line.split()[2]) for line in text.splitlines()[1:4]]
            assert [line.split()[1] for line in text.splitlines()[1:4]] == ["x-star", "y-star", "z-star"]
            np.testing.assert_allclose(star, truth, atol=1e-6)
            # and back: the header's PC in TSL's convention is the Bruker PC written
            back = EBSDDetector(shape=shape, pc=star, convention="tsl").pc.reshape(3)
            np.testing.assert_allclose(back, pc, atol=1e-6)
            assert orix_io.load(str(tmp_path / "pc.ang")).size == 20

    def test_two_dimensional_properties_are_left_out(self, tmp_path):
        """A map with the dictionary's top-k (n, keep) properties: each column takes the first."""
        xmap = _map()
        rng = np.random.default_rng(2)
        xmap.prop["topk_scores"] = rng.uniform(0, 1, (xmap.size, 3)).astype(np.float32)
        xmap.prop["topk_indices"] = rng.integers(0, 10_000, (xmap.size, 3))
        xmap.prop["pcx"] = rng.uniform(0.4, 0.6, xmap.size)
        path = write_ang(xmap, tmp_path / "k.ang")
        assert len(_data_lines(path)[0]) == 10
        read = orix_io.load(str(path), autogen_names=False)
        indexed = xmap.phase_id >= 0
        np.testing.assert_allclose(read.prop["ci"][indexed], xmap.prop["scores"][indexed], atol=1e-5)
        assert _rotation_angles(read.rotations.data[indexed], xmap.rotations.data[indexed]).max() < 1e-4

    def test_two_dimensional_scores_give_the_best(self, tmp_path):
        """Unrefined maps: (n, keep) rotations and scores; CI is the best (first) score."""
        xmap = _map(2, 3, unindexed=())
        q = np.stack([xmap.rotations.data, Rotation.random(6).data], axis=1)
        scores = np.stack([xmap.prop["scores"], xmap.prop["scores"] / 2], axis=1)
        multi = CrystalMap(Rotation(q), x=xmap.x, y=xmap.y, phase_list=xmap.phases,
                           prop={"scores": scores}, scan_unit="um")
        read = orix_io.load(str(write_ang(multi, tmp_path / "m.ang")), autogen_names=False)
        np.testing.assert_allclose(read.prop["ci"], scores[:, 0], atol=1e-5)

    def test_hexagonal_orix_reads_positions_and_columns(self, tmp_path):
        ny, nx = 5, 4
        xmap = _map(ny, nx)
        read = orix_io.load(str(write_ang(xmap, tmp_path / "hex.ang", grid="hexagonal")),
                            autogen_names=False)
        truth = _hex_positions(ny, [nx, nx], STEP)
        np.testing.assert_allclose(np.column_stack([read.x, read.y]), truth, atol=1e-5)
        indexed = xmap.phase_id >= 0
        np.testing.assert_array_equal(read.phase_id >= 0, indexed)
        assert _rotation_angles(read.rotations.data[indexed], xmap.rotations.data[indexed]).max() < 1e-4
        np.testing.assert_allclose(read.prop["iq"], xmap.prop["pattern_quality"], atol=1e-5)
        np.testing.assert_allclose(read.prop["ci"][indexed], xmap.prop["scores"][indexed], atol=1e-5)

    def test_unknown_grid(self, tmp_path):
        with pytest.raises(ValueError, match="grid must be"):
            write_ang(_map(), tmp_path / "m.ang", grid="triangular")

    def test_map_shape_must_hold_the_points(self, tmp_path):
        with pytest.raises(ValueError, match=r"map_shape \(3, 3\)"):
            write_ang(_map(), tmp_path / "m.ang", map_shape=(3, 3))


class TestWriteCtf:
    def test_orix_reads_orientations_phases_and_properties(self, tmp_path):
        xmap = _map()
        path = write_ctf(xmap, tmp_path / "map.ctf")
        read = orix_io.load(str(path))
        indexed = xmap.phase_id >= 0
        assert read.shape == (4, 5) and read.dx == read.dy == STEP
        np.testing.assert_array_equal(read.phase_id >= 0, indexed)
        assert _angles(xmap, read, indexed).max() <= 1e-3
        phase = read.phases[int(read.phase_id[indexed][0])]
        assert phase.name == "li" and phase.space_group.number == 229
        assert phase.point_group.name == "m-3m"
        np.testing.assert_allclose(phase.structure.lattice.abcABG(), [3.51, 3.51, 3.51, 90, 90, 90])
        np.testing.assert_array_equal(read.prop["BC"], np.rint(xmap.prop["band_contrast"]))
        np.testing.assert_array_equal(read.prop["BS"], np.rint(255 * xmap.prop["pattern_quality"]))
        np.testing.assert_array_equal(read.prop["error"], np.where(indexed, 0, 3))
        np.testing.assert_array_equal(read.prop["bands"], 0)
        np.testing.assert_array_equal(read.prop["MAD"], 0)

    def test_header_by_hand(self, tmp_path):
        lines = write_ctf(_map(2, 3, unindexed=(3,)), tmp_path / "map.ctf").read_text().splitlines()
        assert lines[0] == "Channel Text File"
        assert lines[4:8] == ["XCells\t3", "YCells\t2", "XStep\t0.500000", "YStep\t0.500000"]
        assert lines[12] == "Phases\t1"
        assert lines[13].split("\t")[:5] == ["3.5100;3.5100;3.5100", "90.000;90.000;90.000",
                                             "li", "11", "229"]
        assert lines[14] == "Phase\tX\tY\tBands\tError\tEuler1\tEuler2\tEuler3\tMAD\tBC\tBS"
        assert len(lines) == 15 + 6

    def test_orix_reads_every_column(self, tmp_path):
        """Rotations to the printed 1e-4°, x/y, phase, Bands, Error, MAD, BC, BS."""
        xmap = _map()
        rng = np.random.default_rng(6)
        n = xmap.size
        xmap.prop["bands"] = rng.integers(3, 12, n)
        xmap.prop["error"] = np.where(rng.uniform(size=n) < 0.2, 4, 0)  # 4: an Oxford code kept
        xmap.prop["MAD"] = rng.uniform(0.1, 1.5, n)
        read = orix_io.load(str(write_ctf(xmap, tmp_path / "map.ctf")))
        indexed = xmap.phase_id >= 0
        assert _rotation_angles(read.rotations.data[indexed], xmap.rotations.data[indexed]).max() < 1e-4
        np.testing.assert_allclose(read.rotations.to_euler()[indexed],
                                   xmap.rotations.to_euler()[indexed], atol=1e-4)
        assert _angles(xmap, read, indexed).max() < 0.01
        np.testing.assert_allclose(read.x, xmap.x, atol=1e-4)
        np.testing.assert_allclose(read.y, xmap.y, atol=1e-4)
        np.testing.assert_array_equal(read.phase_id, np.where(indexed, 1, -1))
        np.testing.assert_array_equal(read.prop["bands"], xmap.prop["bands"])
        error = np.where(indexed | (xmap.prop["error"] != 0), xmap.prop["error"], 3)
        np.testing.assert_array_equal(read.prop["error"], error)
        np.testing.assert_allclose(read.prop["MAD"], xmap.prop["MAD"], atol=1e-4)
        np.testing.assert_array_equal(read.prop["BC"], np.rint(xmap.prop["band_contrast"]))
        np.testing.assert_array_equal(read.prop["BS"], np.rint(255 * xmap.prop["pattern_quality"]))

    def test_two_phases(self, tmp_path):
        xmap = _two_phase_map()
        read = orix_io.load(str(write_ctf(xmap, tmp_path / "two.ctf")))
        names = {int(i): read.phases[int(i)].name for i in read.phases.ids if i >= 0}
        assert names == {1: "li", 2: "na"}
        assert read.phases[2].space_group.number == 229
        np.testing.assert_array_equal(read.phase_id, np.where(xmap.phase_id >= 0, xmap.phase_id + 1, -1))

    def test_header_follows_the_channel5_layout(self, tmp_path):
        """Line by line as Channel 5 / AZtec write it (orix's Oxford test header)."""
        det = Detector((60, 80), (0.5, 0.3, 0.6), sample_tilt=69.5)
        lines = write_ctf(_map(2, 3, unindexed=(3,)), tmp_path / "scan.ctf",
                          detector=det).read_text().splitlines()
        keys = [line.split("\t")[0] for line in lines[:11]]
        assert keys == ["Channel Text File", "Prj", "Author", "JobMode", "XCells", "YCells",
                        "XStep", "YStep", "AcqE1", "AcqE2", "AcqE3"]
        assert lines[1] == "Prj\tscan" and lines[3] == "JobMode\tGrid"
        fields = lines[11].split("\t")
        assert fields[0] == "Euler angles refer to Sample Coordinate system (CS0)!"
        assert fields[1::2] == ["Mag", "Coverage", "Device", "KV", "TiltAngle", "TiltAxis"]
        assert float(fields[fields.index("TiltAngle") + 1]) == 69.5
        assert lines[12] == "Phases\t1"
        assert len(lines[15].split("\t")) == 11

    def test_two_dimensional_properties_are_left_out(self, tmp_path):
        xmap = _map()
        rng = np.random.default_rng(3)
        xmap.prop["topk_scores"] = rng.uniform(0, 1, (xmap.size, 4)).astype(np.float32)
        xmap.prop["topk_indices"] = rng.integers(0, 10_000, (xmap.size, 4))
        path = write_ctf(xmap, tmp_path / "k.ctf")
        read = orix_io.load(str(path))
        assert read.size == 20 and len(path.read_text().splitlines()[-1].split("\t")) == 11
        np.testing.assert_array_equal(read.prop["BC"], np.rint(xmap.prop["band_contrast"]))



class TestReadMap:
    @pytest.mark.parametrize("suffix", ["ang", "ctf", "h5"])
    def test_square_files_round_trip(self, tmp_path, suffix):
        xmap = _map()
        path = tmp_path / f"map.{suffix}"
        if suffix == "ang":
            write_ang(xmap, path)
        elif suffix == "ctf":
            write_ctf(xmap, path)
        else:
            orix_io.save(str(path), xmap)
        m = read_map(path)
        assert (m.grid, m.map_shape, m.step_size) == ("square", (4, 5), STEP)
        np.testing.assert_array_equal(m.xmap.phase_id, xmap.phase_id)
        assert m.xmap.shape == (4, 5) and m.xmap.dx == STEP
        assert _angles(xmap, m.xmap, xmap.phase_id >= 0).max() <= 1e-3
        assert m.xmap.phases[0].name == "li" and m.xmap.phases[0].point_group.laue.name == "m-3m"

    def test_h5_keeps_every_property(self, tmp_path):
        xmap = _map()
        orix_io.save(str(tmp_path / "map.h5"), xmap)
        m = read_map(tmp_path / "map.h5")
        for name in xmap.prop:
            np.testing.assert_array_equal(m.xmap.prop[name], xmap.prop[name])

    @pytest.mark.parametrize("padding", [False, True])
    def test_hexagonal_ang_round_trips(self, tmp_path, padding):
        ny, nx = 5, 4
        pad = [r * nx + nx - 1 for r in (1, 3)]
        xmap = _map(ny, nx, unindexed=pad if padding else (3, 9))
        if padding:
            xmap.prop["pattern_quality"] = np.where(np.isin(np.arange(20), pad), 0.0,
                                                    xmap.prop["pattern_quality"])
        path = write_ang(xmap, tmp_path / "hex.ang", grid="hexagonal")
        m = read_map(path)
        assert (m.grid, m.map_shape, m.step_size) == ("hexagonal", (ny, nx), STEP)
        np.testing.assert_array_equal(m.xmap.phase_id, xmap.phase_id)
        indexed = xmap.phase_id >= 0
        assert _angles(xmap, m.xmap, indexed).max() <= 1e-3
        np.testing.assert_allclose(m.xmap.prop["ci"][indexed], xmap.prop["scores"][indexed], atol=1e-5)
        np.testing.assert_allclose(m.xmap.prop["iq"], xmap.prop["pattern_quality"], atol=1e-5)
        np.testing.assert_array_equal(m.xmap.prop["ci"][~indexed], -1.0)
        # and written again, the same file
        again = write_ang(m.xmap, tmp_path / "again.ang", grid=m.grid)
        assert again.read_text() == path.read_text()

    def test_tsl_hexgrid_file_is_padded(self, tmp_path):
        """A HexGrid file as TSL writes it: rows of 3 and 2 points, the short rows padded."""
        step, ny = 2.0, 3
        rot = Rotation.random(8)
        euler = rot.to_euler()
        lines = ["# Phase 1", "# MaterialName  \tLithium", "# Formula\tLi", "# Symmetry 43",
                 "# LatticeConstants 3.510 3.510 3.510 90.000 90.000 90.000",
                 "# GRID: HexGrid", "# XSTEP: 2.000000", f"# YSTEP: {step * math.sqrt(3) / 2:.6f}",
                 "# NCOLS_ODD: 3", "# NCOLS_EVEN: 2", "# NROWS: 3", "#"]
        for k, (x, y) in enumerate(_hex_positions(ny, [3, 2], step)):
            e = euler[k]
            lines.append(f"{e[0]:.5f} {e[1]:.5f} {e[2]:.5f} {x:.5f} {y:.5f} 150.0 0.{k + 1} 1 800 1.2")
        path = tmp_path / "tsl.ang"
        path.write_text("\n".join(lines) + "\n")
        m = read_map(path)
        assert (m.grid, m.map_shape, m.step_size) == ("hexagonal", (3, 3), 2.0)
        # file points 0-2 are row 0, 3-4 row 1 (its column 2 padded), 5-7 row 2
        where = [0, 1, 2, 3, 4, 6, 7, 8]
        expected_id = np.full(9, -1)
        expected_id[where] = 0
        np.testing.assert_array_equal(m.xmap.phase_id, expected_id)
        got = Orientation(m.xmap.rotations.data[where], symmetry=get_phase("li").point_group)
        truth = Orientation(rot.data, symmetry=get_phase("li").point_group)
        assert np.degrees(got.angle_with(truth)).max() <= 1e-3
        assert m.xmap.prop["ci"][5] == ANG_PADDING["ci"] and m.xmap.prop["fit"][5] == ANG_PADDING["fit"]
        assert m.xmap.prop["iq"][5] == 0 and m.xmap.prop["iq"][4] == 150.0
        assert m.xmap.phases[0].name == "Lithium"

    def test_missing_file(self, tmp_path):
        with pytest.raises(MapFileError, match=r"nothere\.ang does not exist"):
            read_map(tmp_path / "nothere.ang")

    def test_unknown_format(self, tmp_path):
        (tmp_path / "map.txt").write_text("1 2 3\n")
        with pytest.raises(MapFileError, match=r"map\.txt: unknown orientation-map format '\.txt'"):
            read_map(tmp_path / "map.txt")

    @pytest.mark.parametrize("suffix", ["ang", "ctf"])
    def test_garbled_file(self, tmp_path, suffix):
        path = tmp_path / f"bad.{suffix}"
        writer = write_ang if suffix == "ang" else write_ctf
        text = writer(_map(), path).read_text().splitlines()
        text[-3] = "this is not a data line"
        path.write_text("\n".join(text) + "\n")
        with pytest.raises(MapFileError, match=rf"bad\.{suffix}: not an orientation map orix reads"):
            read_map(path)

    @pytest.mark.parametrize("suffix", ["ang", "ctf"])
    def test_truncated_file(self, tmp_path, suffix):
        path = tmp_path / f"cut.{suffix}"
        writer = write_ang if suffix == "ang" else write_ctf
        text = writer(_map(), path).read_text().splitlines()
        path.write_text("\n".join(text[:-4]) + "\n")
        with pytest.raises(MapFileError, match=rf"cut\.{suffix}: holds 16 points; .* 20"):
            read_map(path)

    def test_header_without_grid_size(self, tmp_path):
        path = write_ang(_map(), tmp_path / "m.ang")
        path.write_text(path.read_text().replace("# NROWS: 4\n", ""))
        with pytest.raises(MapFileError, match=r"m\.ang: header has no NROWS"):
            read_map(path)

    def test_header_with_another_grid(self, tmp_path):
        path = write_ang(_map(), tmp_path / "m.ang")
        path.write_text(path.read_text().replace("# GRID: SqrGrid", "# GRID: TriGrid"))
        with pytest.raises(MapFileError, match=r"m\.ang: header GRID 'TriGrid' is neither"):
            read_map(path)

    def test_sqrgrid_with_rows_of_two_lengths(self, tmp_path):
        path = write_ang(_map(), tmp_path / "m.ang")
        path.write_text(path.read_text().replace("# NCOLS_EVEN: 5", "# NCOLS_EVEN: 4"))
        with pytest.raises(MapFileError, match=r"m\.ang: a SqrGrid map with rows of 5 and 4 points"):
            read_map(path)

    def test_points_out_of_row_major_order(self, tmp_path):
        path = write_ctf(_map(), tmp_path / "m.ctf")
        lines = path.read_text().splitlines()
        lines[15], lines[16] = lines[16], lines[15]  # swap the first two points
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(MapFileError, match=r"m\.ctf: point 0 lies at \(x, y\) = \(0\.5, 0\)"):
            read_map(path)

    def test_h5_map_that_is_not_rectangular(self, tmp_path):
        xmap = _map()
        orix_io.save(str(tmp_path / "m.h5"), xmap[xmap.id != 19])  # last pixel gone
        with pytest.raises(MapFileError, match=r"m\.h5: its 19 points do not fill a rectangular map"):
            read_map(tmp_path / "m.h5")


@pytest.mark.parametrize(("ny", "nx"), [(1, 4), (4, 1), (3, 4)])
def test_map_layout(ny, nx):
    y, x = np.divmod(np.arange(ny * nx), nx)
    xmap = CrystalMap(Rotation.identity(ny * nx), x=x * 0.25, y=y * 0.25)
    assert map_layout(xmap) == ((ny, nx), 0.25)


def test_map_layout_rejects_column_major_order():
    x, y = np.divmod(np.arange(12), 3)  # x runs slowest: column-major
    with pytest.raises(ValueError, match="row-major square grid"):
        map_layout(CrystalMap(Rotation.identity(12), x=x * 1.0, y=y * 1.0))


def _index_result(xmap: CrystalMap, grid: str, details: dict | None = None):
    """The parts of an IndexResult that write_index_outputs reads."""
    ny, nx = 4, 5
    config = SimpleNamespace(grid=grid, to_dict=lambda: {"grid": grid})
    best = np.asarray(xmap.prop["scores"]).reshape(ny * nx, -1)[:, 0]
    return SimpleNamespace(xmap=xmap, config=config, scores=best.reshape(ny, nx),
                           band_contrast=xmap.prop["band_contrast"].reshape(ny, nx),
                           details=details or {}, summary=lambda: {"patterns": ny * nx},
                           run_config=lambda: {"phase": "li", "grid": grid})


def _pipeline_map(keep: int = 4) -> CrystalMap:
    """A map with every per-pixel property dpm.index puts on a refined map."""
    xmap = _map()
    n = xmap.size
    rng = np.random.default_rng(11)
    xmap.prop.update({
        "topk_indices": rng.integers(0, 100_000, (n, keep)).astype(np.int64),
        "topk_scores": np.sort(rng.uniform(0, 1, (n, keep)), axis=1)[:, ::-1].astype(np.float32),
        "replaced": rng.uniform(size=n) < 0.3, "despiked": rng.uniform(size=n) < 0.3,
        "filled": rng.uniform(size=n) < 0.3, "pseudo_symmetry": rng.uniform(size=n) < 0.3,
        "readable": rng.uniform(size=n) < 0.9,
        "dictionary_score": rng.uniform(0, 1, n).astype(np.float32),
        "simulation_index": rng.integers(0, 100_000, n).astype(np.int64),
        "refinement_iterations": rng.integers(0, 60, n).astype(np.int32),
        "pcx": rng.uniform(0.4, 0.6, n), "pcy": rng.uniform(0.2, 0.3, n),
        "pcz": rng.uniform(0.5, 0.7, n)})
    return xmap


def _props_of(xmap: CrystalMap) -> dict[str, np.ndarray]:
    return {name: np.array(xmap.prop[name]) for name in xmap.prop}


@pytest.mark.parametrize("grid", ["square", "hexagonal"])
def test_index_outputs_write_maps_on_the_run_grid(tmp_path, grid):
    xmap = _map()
    paths = write_index_outputs(_index_result(xmap, grid), tmp_path)
    m = read_map(tmp_path / "map.ang")
    assert (m.grid, m.map_shape) == (grid, (4, 5))
    assert ((tmp_path / "map.ctf") in paths) == (grid == "square")
    if grid == "square":
        read = orix_io.load(str(tmp_path / "map.ctf"))
        assert _angles(xmap, read, xmap.phase_id >= 0).max() <= 1e-3
    assert json.loads((tmp_path / "summary.json").read_text()) == {"patterns": 20}


class TestIndexOutputsMapH5:
    def test_orix_gives_back_every_property(self, tmp_path):
        """(n,), (n, keep) and boolean properties: same values, same dtypes."""
        xmap = _pipeline_map()
        truth = _props_of(xmap)
        write_index_outputs(_index_result(xmap, "square"), tmp_path)
        read = orix_io.load(str(tmp_path / "map.h5"))
        assert set(read.prop) == set(truth)
        for name, values in truth.items():
            got = np.asarray(read.prop[name])
            assert (got.dtype, got.shape) == (values.dtype, values.shape), name
            np.testing.assert_array_equal(got, values, err_msg=name)
        assert read.prop["topk_indices"].shape == (20, 4) and read.prop["readable"].dtype == bool
        np.testing.assert_array_equal(read.phase_id, xmap.phase_id)
        np.testing.assert_array_equal(read.x, xmap.x)
        np.testing.assert_array_equal(read.y, xmap.y)
        assert _rotation_angles(read.rotations.data, xmap.rotations.data).max() < 1e-6
        assert read.phases[0].name == "li" and read.phases[0].space_group.number == 229

    def test_read_map_gives_back_every_property(self, tmp_path):
        xmap = _pipeline_map()
        truth = _props_of(xmap)
        write_index_outputs(_index_result(xmap, "square"), tmp_path)
        m = read_map(tmp_path / "map.h5")
        assert (m.grid, m.map_shape, m.step_size) == ("square", (4, 5), STEP)
        for name, values in truth.items():
            got = np.asarray(m.xmap.prop[name])
            assert got.dtype == values.dtype, name
            np.testing.assert_array_equal(got, values, err_msg=name)

    def test_unrefined_map_keeps_every_match(self, tmp_path):
        """keep rotations per pixel in map.h5; .ang and .ctf take the best."""
        xmap = _map()
        keep = 3
        q = np.stack([xmap.rotations.data] + [Rotation.random(20).data for _ in range(keep - 1)], axis=1)
        scores = np.sort(np.random.default_rng(1).uniform(0, 1, (20, keep)), axis=1)[:, ::-1]
        props = {"scores": scores.astype(np.float32),
                 "simulation_indices": np.arange(20 * keep).reshape(20, keep),
                 "band_contrast": xmap.prop["band_contrast"], "readable": np.ones(20, bool)}
        multi = CrystalMap(Rotation(q), phase_id=xmap.phase_id, x=xmap.x, y=xmap.y,
                           phase_list=xmap.phases, prop=props, scan_unit="um")
        write_index_outputs(_index_result(multi, "square"), tmp_path)
        read = orix_io.load(str(tmp_path / "map.h5"))
        assert read.rotations_per_point == keep
        assert _rotation_angles(read.rotations.data, q).max() < 1e-6
        np.testing.assert_array_equal(read.prop["simulation_indices"], props["simulation_indices"])
        np.testing.assert_array_equal(read.prop["scores"], props["scores"])
        indexed = xmap.phase_id >= 0
        for suffix in ("ang", "ctf"):
            other = orix_io.load(str(tmp_path / f"map.{suffix}"))
            assert _rotation_angles(other.rotations.data[indexed], q[indexed, 0]).max() < 1e-4
        ang = orix_io.load(str(tmp_path / "map.ang"))
        np.testing.assert_allclose(ang.prop["ci"][indexed], scores[indexed, 0], atol=1e-5)


@pytest.mark.parametrize(("grid", "refined"), [("square", True), ("hexagonal", True),
                                               ("square", False)])
def test_index_outputs_write_the_pattern_centre(tmp_path, grid, refined):
    """The map's Bruker PC (refined mean, else the run's) in map.ang as TSL x*, y*, z*;
    the sample tilt in map.ctf."""
    from kikuchipy.detectors import EBSDDetector

    details = {"run": {"pc": [0.5, 0.3, 0.6], "pc_convention": "bruker", "sample_tilt": 69.0},
               "detector_shape": [60, 80]}
    if refined:
        details["pattern_centre"] = [0.48, 0.27, 0.61]
    write_index_outputs(_index_result(_map(), grid, details), tmp_path)
    lines = (tmp_path / "map.ang").read_text().splitlines()
    star = {line.split()[1]: float(line.split()[2]) for line in lines[1:4]}
    pc = details["pattern_centre"] if refined else details["run"]["pc"]
    truth = EBSDDetector(shape=(60, 80), pc=pc).pc_tsl().reshape(3)
    np.testing.assert_allclose([star["x-star"], star["y-star"], star["z-star"]], truth, atol=1e-6)
    if grid == "square":
        ctf = (tmp_path / "map.ctf").read_text().splitlines()[11].split("\t")
        assert float(ctf[ctf.index("TiltAngle") + 1]) == 69.0


def test_index_outputs_without_a_detector_write_no_pattern_centre(tmp_path):
    write_index_outputs(_index_result(_map(), "square", {"pattern_centre": [0.5, 0.3, 0.6]}),
                        tmp_path)  # no detector_shape: the TSL PC cannot be told
    lines = (tmp_path / "map.ang").read_text().splitlines()
    assert [float(line.split()[2]) for line in lines[1:4]] == [0.0, 0.0, 0.0]


def test_grains_command_takes_the_grid_from_the_file(tmp_path, capsys):
    """`dpm grains` on a HexGrid .ang finds the grains dpm.grains finds on the hexagonal map.

    Orientation A at (0, 1) and (1, 0) in a map of B: on the hexagonal grid the
    two A pixels are neighbours (one grain), on the square grid they are not.
    """
    from dpm.cli import main
    from dpm.grains import GrainConfig, reconstruct_grains

    ny, nx = 4, 4
    q = np.tile(Rotation.from_axes_angles([0, 0, 1], 0.3).data, (ny * nx, 1))
    q[[1, nx]] = Rotation.from_axes_angles([1, 1, 0], 0.5).data
    y, x = np.divmod(np.arange(ny * nx), nx)
    xmap = CrystalMap(Rotation(q), x=x * STEP, y=y * STEP, phase_list=PhaseList(get_phase("li")),
                      scan_unit="um")
    path = write_ang(xmap, tmp_path / "hex.ang", grid="hexagonal")
    counts = {}
    for grid, extra in (("hexagonal", []), ("square", ["--grid", "square"])):
        assert main(["grains", str(path), "--out", str(tmp_path / grid)] + extra) == 0
        rows = (tmp_path / grid / "grains.csv").read_text().strip().splitlines()
        expected = reconstruct_grains(q, np.ones(ny * nx, bool), (ny, nx), get_phase("li").point_group,
                                      config=GrainConfig(grid=grid, step_size=STEP))
        counts[grid] = len(rows) - 1
        assert counts[grid] == expected.summary["n_grains"]
    assert counts == {"hexagonal": 3, "square": 4}
    capsys.readouterr()


def test_grains_command_names_a_bad_file(tmp_path, capsys):
    from dpm.cli import main

    path = tmp_path / "map.ang"
    path.write_text("# GRID: SqrGrid\n")
    assert main(["grains", str(path), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "XSTEP" in err[0]
