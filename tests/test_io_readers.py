"""Pattern readers: every format in its vendor's layout, lazy block reads, metadata, bad input.

Each vendor test writes a small file with :mod:`vendor_files` and checks
that the patterns and every metadata value dpm reads equal what was written
(PCs converted to Bruker's convention with the conventions' formulas, not
with dpm's or kikuchipy's code); where kikuchipy reads the same file, its
result is a second oracle.
"""

import math
import shutil
import tracemalloc
from importlib import resources

import h5py
import numpy as np
import pytest

import vendor_files as vf
from dpm.io.readers import (FORMATS, HDF5Patterns, PatternFile, PatternFileError, PatternStack,
                            as_pattern_stack, describe, read_patterns)

KP_DATA = resources.files("kikuchipy") / "data"


def _patterns(ny=3, nx=4, sy=6, sx=8, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    high = 255 if dtype == np.uint8 else 4000
    return rng.integers(1, high, (ny, nx, sy, sx)).astype(dtype)


def _all(stack):
    data = stack.data
    return np.asarray(data.compute() if hasattr(data, "compute") else data)


def _bruker_from_tsl(pc, sy, sx):
    x, y, z = pc
    return x, 1 - y, z * min(sy, sx) / sy


def _bruker_from_oxford(pc, sy, sx):
    x, y, z = pc
    return x, 1 - y * sx / sy, z * sx / sy


def _bruker_from_emsoft(xpc, ypc, L, sy, sx, binning, delta):
    return 0.5 - xpc / (sx * binning), 0.5 - ypc / (sy * binning), L / (sy * binning * delta)


class TestNpy:
    def test_reads_blocks_with_explicit_reads(self, tmp_path):
        data = np.arange(4 * 5 * 6 * 7, dtype=np.uint16).reshape(4, 5, 6, 7)
        np.save(tmp_path / "p.npy", data)
        stack = read_patterns(tmp_path / "p.npy")
        assert isinstance(stack.data, PatternFile)
        assert not any(isinstance(v, np.memmap) for v in vars(stack.data).values())
        assert stack.map_shape == (4, 5) and stack.pattern_shape == (6, 7)
        assert stack.data.dtype == np.uint16 and stack.data.ndim == 4
        assert stack.detector is None and stack.step_size is None and stack.grid == "square"
        reference = np.load(tmp_path / "p.npy")
        for key in (np.s_[1:3, 2:5], np.s_[0:4, 0:5], np.s_[2], np.s_[-1, 3], np.s_[::2, ::-2],
                    np.s_[1:3, 2:4, 1:3, ::2], np.s_[..., 0], np.s_[3, 1:2, 5]):
            np.testing.assert_array_equal(stack.data[key], reference[key], err_msg=str(key))
        np.testing.assert_array_equal(np.asarray(stack.data), reference)

    def test_a_block_read_allocates_that_block_only(self, tmp_path):
        data = np.random.default_rng(1).integers(0, 255, (50, 40, 32, 32), dtype=np.uint8)
        np.save(tmp_path / "big.npy", data)  # 2 MB
        stack = read_patterns(tmp_path / "big.npy")
        block_bytes = 2 * 40 * 32 * 32
        peaks = []
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            for r0 in range(0, 50, 2):
                tracemalloc.reset_peak()
                block = stack.data[r0:r0 + 2, 0:40]
                peaks.append(tracemalloc.get_traced_memory()[1] - start)
                np.testing.assert_array_equal(block, data[r0:r0 + 2])
                del block
            kept = tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
        assert max(peaks) < 1.5 * block_bytes  # the block read, not the file
        assert kept < block_bytes / 10  # nothing kept between reads


    def test_three_dimensional_stack_is_one_row(self, tmp_path):
        data = _patterns().reshape(12, 6, 8)
        np.save(tmp_path / "p.npy", data)
        stack = read_patterns(tmp_path / "p.npy")
        assert stack.map_shape == (1, 12)
        np.testing.assert_array_equal(stack.data[0, 3:7], data[3:7])
        assert as_pattern_stack(np.zeros((7, 4, 4))).map_shape == (1, 7)

    def test_big_endian_comes_back_native(self, tmp_path):
        data = _patterns(dtype=np.uint16)
        np.save(tmp_path / "p.npy", data.astype(">u2"))
        stack = read_patterns(tmp_path / "p.npy")
        assert stack.data.dtype == np.dtype("=u2")
        np.testing.assert_array_equal(stack.data[1:3, 1:2], data[1:3, 1:2])

    def test_fortran_order_is_rejected(self, tmp_path):
        np.save(tmp_path / "f.npy", np.asfortranarray(_patterns()))
        with pytest.raises(PatternFileError, match=r"f\.npy: a Fortran-order .npy array "
                                                    r"\(shape \(3, 4, 6, 8\)\).*ascontiguousarray"):
            read_patterns(tmp_path / "f.npy")

    def test_truncated_npy_names_the_bytes(self, tmp_path):
        np.save(tmp_path / "t.npy", _patterns())
        raw = (tmp_path / "t.npy").read_bytes()
        (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
        with pytest.raises(PatternFileError, match=r"t\.npy: truncated: its last pattern ends at "
                                                    r"byte \d+, but the file has \d+ bytes"):
            read_patterns(tmp_path / "t.npy")

    @pytest.mark.parametrize("array, message", [
        (np.zeros((5, 5)), r"got shape \(5, 5\)"),
        (np.zeros((1, 2, 3, 4, 5)), r"got shape \(1, 2, 3, 4, 5\)"),
        (np.zeros((0, 4, 4)), r"empty, shape \(0, 4, 4\)"),
        (np.zeros((2, 3, 3), dtype=complex), "integer or float, got dtype complex128"),
        (np.array([[["a"]]]), "integer or float, got dtype <U1"),
    ])
    def test_bad_arrays_are_named(self, tmp_path, array, message):
        np.save(tmp_path / "bad.npy", array)
        with pytest.raises(PatternFileError, match=message) as e:
            read_patterns(tmp_path / "bad.npy")
        assert "bad.npy" in str(e.value)
        with pytest.raises(PatternFileError, match=message):
            as_pattern_stack(array)

    def test_dask_wraps_and_pickle_carries_the_lazy_arrays(self, tmp_path):
        import pickle

        import dask.array as da

        patterns = _patterns(ny=5)
        np.save(tmp_path / "p.npy", patterns)
        vf.write_edax_h5ebsd(tmp_path / "e.h5", patterns, grid="HexGrid")
        for path in (tmp_path / "p.npy", tmp_path / "e.h5"):
            data = read_patterns(path).data
            wrapped = da.from_array(data, chunks=(2, 3, 6, 8))
            np.testing.assert_array_equal(wrapped[1:4, 1:3].compute(), np.asarray(data)[1:4, 1:3])
            np.testing.assert_array_equal(pickle.loads(pickle.dumps(data))[2:4], data[2:4])

    def test_map_indices_other_than_int_and_slice_are_refused(self, tmp_path):
        np.save(tmp_path / "p.npy", _patterns())
        stack = read_patterns(tmp_path / "p.npy")
        with pytest.raises(IndexError, match="integer or a slice as the map row index"):
            stack.data[[0, 2]]
        with pytest.raises(IndexError, match="out of range for 4 columns"):
            stack.data[0, 4]


class TestGenericHDF5:
    def test_the_one_pattern_dataset_is_found(self, tmp_path):
        data = _patterns(dtype=np.uint16)
        with h5py.File(tmp_path / "g.h5", "w") as f:
            f.create_dataset("scan/meta/steps", data=np.arange(3.0))
            f.create_dataset("scan/images", data=data, chunks=(1, 2, 6, 8))
        stack = read_patterns(tmp_path / "g.h5")
        assert isinstance(stack.data, HDF5Patterns) and stack.map_shape == (3, 4)
        assert stack.metadata["format"] == "hdf5" and stack.metadata["dataset"] == "/scan/images"
        np.testing.assert_array_equal(stack.data[1:3, 1:3], data[1:3, 1:3])
        np.testing.assert_array_equal(stack.data[::2, ::-1], data[::2, ::-1])
        np.testing.assert_array_equal(np.asarray(stack.data), data)

    def test_named_dataset_of_a_file_with_several(self, tmp_path):
        data = _patterns()
        with h5py.File(tmp_path / "g.h5", "w") as f:
            f.create_dataset("a/raw", data=data.reshape(12, 6, 8))
            f.create_dataset("a/processed", data=data + 1)
        with pytest.raises(PatternFileError, match=r"holds 2 3-D or 4-D numeric datasets; name "
                                                    r"one as .*g\.h5:/group/dataset: "
                                                    r"/a/processed \(3, 4, 6, 8\) uint8, "
                                                    r"/a/raw \(12, 6, 8\) uint8"):
            read_patterns(tmp_path / "g.h5")
        stack = read_patterns(f"{tmp_path / 'g.h5'}:/a/raw")
        assert stack.map_shape == (1, 12) and stack.source.endswith("g.h5:/a/raw")
        np.testing.assert_array_equal(stack.data[0, 2:9], data.reshape(12, 6, 8)[2:9])
        np.testing.assert_array_equal(_all(read_patterns(f"{tmp_path / 'g.h5'}:a/processed")),
                                      data + 1)

    @pytest.mark.parametrize("shape, message", [
        ((6, 8), r"got shape \(6, 8\)"), ((1, 2, 3, 6, 8), r"got shape \(1, 2, 3, 6, 8\)"),
        ((0, 6, 8), r"empty, shape \(0, 6, 8\)")])
    def test_named_dataset_of_wrong_rank_or_empty(self, tmp_path, shape, message):
        with h5py.File(tmp_path / "g.h5", "w") as f:
            f.create_dataset("x/pats", data=np.zeros(shape, np.uint8))
        with pytest.raises(PatternFileError, match=message) as e:
            read_patterns(f"{tmp_path / 'g.h5'}:/x/pats")
        assert "g.h5:/x/pats" in str(e.value)

    def test_no_candidate_lists_what_is_there(self, tmp_path):
        with h5py.File(tmp_path / "g.h5", "w") as f:
            f.create_dataset("image", data=np.zeros((6, 8)))
            f.create_dataset("labels", data=np.array([b"a", b"b"]))
        with pytest.raises(PatternFileError, match=r"holds no 3-D or 4-D numeric dataset.*"
                                                    r"/image \(6, 8\) float64"):
            read_patterns(tmp_path / "g.h5")

    def test_non_numeric_and_missing_datasets(self, tmp_path):
        with h5py.File(tmp_path / "g.h5", "w") as f:
            f.create_dataset("s", data=np.zeros((2, 3, 3), dtype="S1"))
            f.create_group("grp")
        with pytest.raises(PatternFileError, match=r"g\.h5:/s: patterns must be integer or "
                                                    r"float, got dtype \|S1"):
            read_patterns(f"{tmp_path / 'g.h5'}:/s")
        with pytest.raises(PatternFileError, match="'/grp' is a group, not a dataset"):
            read_patterns(f"{tmp_path / 'g.h5'}:/grp")
        with pytest.raises(PatternFileError, match="'/nope' is nothing, not a dataset"):
            read_patterns(f"{tmp_path / 'g.h5'}:/nope")

    @pytest.mark.parametrize("write", [
        lambda p: vf.write_bruker_h5ebsd(p, _patterns(ny=10, nx=10, sy=20, sx=20)),
        lambda p: h5py.File(p, "w").create_dataset("d", data=_patterns(ny=10, nx=10)),
    ])
    def test_truncated_hdf5_file(self, tmp_path, write):
        path = tmp_path / "cut.h5"
        write(path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(PatternFileError, match=r"cut\.h5: unreadable or truncated HDF5 file"):
            read_patterns(path)


class TestOxfordH5oina:
    SHAPE = dict(ny=3, nx=4, sy=6, sx=8)

    def test_patterns_and_detector(self, tmp_path):
        patterns = _patterns(**self.SHAPE)
        bc = np.arange(12, dtype=np.uint8).reshape(12, 1) * 20  # (n, 1) as AZtec writes
        pc = (0.48, 0.41, 0.62)
        vf.write_h5oina(tmp_path / "m.h5oina", patterns, pc=pc, step=0.25, sample_tilt=69.5,
                        detector_tilt=3.0, camera_mode="8x8 (156x128 px)", band_contrast=bc,
                        mad=np.linspace(0.1, 1.2, 12), phases=("Lithium", "Nickel"))
        stack = read_patterns(tmp_path / "m.h5oina")
        np.testing.assert_array_equal(_all(stack), patterns)
        np.testing.assert_array_equal(stack.data[1:3, 2:4].compute(), patterns[1:3, 2:4])
        det = stack.detector
        np.testing.assert_allclose(det.pc, _bruker_from_oxford(pc, 6, 8), atol=1e-6)
        assert det.shape == (6, 8) and det.binning == 8
        assert det.sample_tilt == pytest.approx(69.5, abs=1e-5)
        assert det.tilt == pytest.approx(3.0, abs=1e-4)
        assert stack.step_size == pytest.approx(0.25) and stack.grid == "square"
        assert stack.band_contrast.dtype == np.float32
        np.testing.assert_array_equal(stack.band_contrast, bc.reshape(3, 4))
        np.testing.assert_allclose(stack.properties["Mean Angular Deviation"],
                                   np.linspace(0.1, 1.2, 12).reshape(3, 4), rtol=1e-6)
        assert stack.phases == ("Lithium", "Nickel")
        meta = stack.metadata
        assert meta["format"] == "oxford_h5ebsd" and meta["vendor"] == "Oxford Instruments"
        assert meta["dataset"] == "/1/EBSD/Data/Processed Patterns"
        np.testing.assert_allclose(meta["pc_file"], pc, atol=1e-6)
        assert meta["px_size"] is None and meta["beam_energy"] == pytest.approx(20)

    def test_agrees_with_kikuchipy(self, tmp_path):
        import kikuchipy as kp

        patterns = _patterns(**self.SHAPE)
        vf.write_h5oina(tmp_path / "m.h5oina", patterns, pc=(0.52, 0.38, 0.66), sample_tilt=71,
                        detector_tilt=-2, version="7.0", camera_mode="2x2 (622x512 px)")
        stack, s = read_patterns(tmp_path / "m.h5oina"), kp.load(tmp_path / "m.h5oina")
        np.testing.assert_array_equal(_all(stack), s.data)
        np.testing.assert_allclose(stack.detector.pc, s.detector.pc_average, atol=1e-7)
        assert (stack.detector.sample_tilt, stack.detector.tilt, stack.detector.binning) == \
            pytest.approx((s.detector.sample_tilt, s.detector.tilt, s.detector.binning), abs=1e-4)

    def test_unprocessed_patterns_come_with_their_background(self, tmp_path):
        raw = _patterns(**self.SHAPE)
        background = np.full((6, 8), 7, dtype=np.uint8)
        vf.write_h5oina(tmp_path / "m.h5oina", raw - 1, unprocessed=raw,
                        static_background=background)
        stack = read_patterns(tmp_path / "m.h5oina")
        np.testing.assert_array_equal(_all(stack), raw)
        np.testing.assert_array_equal(stack.static_background, background)
        assert stack.metadata["dataset"].endswith("Unprocessed Patterns")
        # processed patterns alone: AZtec already removed the background from them
        vf.write_h5oina(tmp_path / "p.h5oina", raw - 1, static_background=background)
        stack = read_patterns(tmp_path / "p.h5oina")
        np.testing.assert_array_equal(_all(stack), raw - 1)
        assert stack.static_background is None

    def test_pc_per_pattern_is_averaged(self, tmp_path, caplog):
        pcs = np.column_stack([np.linspace(0.45, 0.55, 12), np.full(12, 0.4), np.full(12, 0.6)])
        vf.write_h5oina(tmp_path / "m.h5oina", _patterns(**self.SHAPE), pc=pcs)
        with caplog.at_level("WARNING", logger="dpm"):
            stack = read_patterns(tmp_path / "m.h5oina")
        np.testing.assert_allclose(stack.detector.pc, _bruker_from_oxford(pcs.mean(0), 6, 8),
                                   atol=1e-6)
        assert stack.metadata["pc_spread"] == pytest.approx(0.1, abs=1e-6)
        assert "PC per pattern (spread 0.1000); using their mean" in caplog.text

    def test_band_contrast_absent_or_wrong_size(self, tmp_path, caplog):
        vf.write_h5oina(tmp_path / "none.h5oina", _patterns(ny=2, nx=3))
        assert read_patterns(tmp_path / "none.h5oina").band_contrast is None
        vf.write_h5oina(tmp_path / "bad.h5oina", _patterns(ny=2, nx=3), band_contrast=np.zeros(5))
        with caplog.at_level("WARNING", logger="dpm"):
            assert read_patterns(tmp_path / "bad.h5oina").band_contrast is None
        assert "Band Contrast holds 5 values, not one for each of the 6 patterns of the 2 x 3 map" \
            in caplog.text

    def test_pc_outside_the_unit_interval_is_named(self, tmp_path):
        pcs = np.tile([0.5, 0.4, 0.6], (12, 1))
        pcs[5, 2] = 1.7
        vf.write_h5oina(tmp_path / "m.h5oina", _patterns(**self.SHAPE), pc=pcs)
        with pytest.raises(PatternFileError, match=r"m\.h5oina: PC field /1/EBSD/Data/Detector "
                                                    r"Distance holds 1\.7 \(pattern 5\).*\[0, 1\]"):
            read_patterns(tmp_path / "m.h5oina")


class TestBrukerH5ebsd:
    def test_patterns_and_detector(self, tmp_path):
        import kikuchipy as kp

        patterns = _patterns(sy=10, sx=12)
        background = np.arange(120, dtype=np.uint16).reshape(10, 12)
        rq = np.linspace(0, 1, 12).reshape(3, 4)
        vf.write_bruker_h5ebsd(tmp_path / "b.h5", patterns, pc=(0.51, 0.28, 0.63), step=0.8,
                               sample_tilt=68.0, camera_tilt=5.0, detector_height_um=25000.0,
                               static_background=background, radon_quality=rq,
                               mad=np.full(12, 0.7), phases=("Lithium", "Li2O"))
        stack = read_patterns(tmp_path / "b.h5")
        np.testing.assert_array_equal(_all(stack), patterns)
        det = stack.detector
        np.testing.assert_allclose(det.pc, (0.51, 0.28, 0.63), atol=1e-6)
        assert det.sample_tilt == pytest.approx(68.0)  # Esprit's "SampleTilt" (kikuchipy reads 0)
        assert kp.load(tmp_path / "b.h5").detector.sample_tilt == 0.0
        assert det.tilt == pytest.approx(5.0) and det.px_size == pytest.approx(2500.0)
        assert stack.step_size == pytest.approx(0.8) and stack.metadata["step_y"] == pytest.approx(0.8)
        np.testing.assert_array_equal(stack.static_background, background)
        np.testing.assert_allclose(stack.properties["RadonQuality"], rq, rtol=1e-6)
        np.testing.assert_allclose(stack.properties["MAD"], 0.7, rtol=1e-6)
        assert stack.band_contrast is None  # RadonQuality is not a 0-255 band contrast
        assert stack.phases == ("Lithium", "Li2O")
        assert stack.metadata["vendor"] == "Bruker Nano"

    def test_region_of_interest_is_put_in_map_order(self, tmp_path):
        patterns = _patterns()
        order = np.random.default_rng(3).permutation(12)
        rq = np.arange(12.0).reshape(3, 4)
        vf.write_bruker_h5ebsd(tmp_path / "roi.h5", patterns, radon_quality=rq,
                               roi_origin=(40, 17), file_order=order)
        stack = read_patterns(tmp_path / "roi.h5")
        assert stack.map_shape == (3, 4)
        np.testing.assert_array_equal(_all(stack), patterns)
        np.testing.assert_array_equal(stack.properties["RadonQuality"], rq)

    def test_pc_outside_the_unit_interval_is_named(self, tmp_path):
        vf.write_bruker_h5ebsd(tmp_path / "b.h5", _patterns(), pc=(1.7, 0.3, 0.6))
        with pytest.raises(PatternFileError, match=r"b\.h5: PC field /Scan 0/EBSD/Data/PCX "
                                                    r"holds 1\.7 \(pattern 0\)"):
            read_patterns(tmp_path / "b.h5")


class TestEdaxH5ebsd:
    def test_square_grid(self, tmp_path):
        import kikuchipy as kp

        patterns = _patterns(sy=6, sx=8)
        iq = np.arange(12.0).reshape(3, 4) * 100
        pc = (0.47, 0.72, 0.65)
        vf.write_edax_h5ebsd(tmp_path / "e.h5", patterns, pc=pc, step=0.4, sample_tilt=72.0,
                             elevation=8.0, azimuthal=1.5, iq=iq, ci=iq / 2000,
                             phases=("Lithium",))
        stack = read_patterns(tmp_path / "e.h5")
        assert isinstance(stack.data, HDF5Patterns) and stack.grid == "square"
        np.testing.assert_array_equal(_all(stack), patterns)
        np.testing.assert_array_equal(stack.data[2, 1:3], patterns[2, 1:3])
        det = stack.detector
        np.testing.assert_allclose(det.pc, _bruker_from_tsl(pc, 6, 8), atol=1e-6)
        assert (det.sample_tilt, det.tilt, det.azimuthal) == pytest.approx((72.0, 8.0, 1.5))
        assert stack.step_size == pytest.approx(0.4)
        np.testing.assert_allclose(stack.properties["IQ"], iq)
        np.testing.assert_allclose(stack.properties["CI"], iq / 2000, rtol=1e-6)
        assert stack.phases == ("Lithium",) and stack.in_file is None
        np.testing.assert_allclose(stack.metadata["pc_file"], pc, atol=1e-6)
        s = kp.load(tmp_path / "e.h5")  # kikuchipy: same patterns and detector
        np.testing.assert_array_equal(_all(stack), s.data)
        np.testing.assert_allclose(det.pc, s.detector.pc_average, atol=1e-6)

    def test_hexagonal_grid_pads_the_short_rows(self, tmp_path):
        patterns = _patterns(ny=5, nx=4)
        stored = vf.hex_rows(5, 4)
        iq = np.arange(20.0).reshape(5, 4)
        vf.write_edax_h5ebsd(tmp_path / "hex.h5", patterns, grid="HexGrid", step=0.5, iq=iq)
        stack = read_patterns(tmp_path / "hex.h5")
        assert stack.grid == "hexagonal" and stack.map_shape == (5, 4)
        np.testing.assert_array_equal(stack.in_file, stored)
        expected = np.where(stored[..., None, None], patterns, 0)
        np.testing.assert_array_equal(_all(stack), expected)
        np.testing.assert_array_equal(stack.data[1:4, 2:4], expected[1:4, 2:4])
        np.testing.assert_array_equal(stack.properties["IQ"][stored], iq[stored])
        assert np.isnan(stack.properties["IQ"][~stored]).all()
        assert stack.step_size == pytest.approx(0.5)
        assert stack.metadata["step_y"] == pytest.approx(0.5 * math.sqrt(3) / 2, rel=1e-6)

    def test_uncalibrated_pc_gives_no_detector(self, caplog):
        with caplog.at_level("WARNING", logger="dpm"):
            stack = read_patterns(KP_DATA / "edax_h5ebsd" / "patterns.h5")
        assert "are all zero, the PC was not calibrated" in caplog.text
        assert stack.detector is None and stack.map_shape == (3, 3)
        assert stack.metadata["sample_tilt"] == pytest.approx(75.7, abs=1e-5)
        np.testing.assert_array_equal(stack.properties["IQ"], np.arange(9.0).reshape(3, 3))
        assert stack.phases == ("Nickel",)

    def test_pc_outside_the_unit_interval_is_named(self, tmp_path):
        vf.write_edax_h5ebsd(tmp_path / "e.h5", _patterns(), pc=(0.5, 0.6, 1.7))
        with pytest.raises(PatternFileError, match=r"e\.h5: PC field /Scan 1/EBSD/Header/Pattern "
                                                    r"Center Calibration/z-star holds 1\.7;"):
            read_patterns(tmp_path / "e.h5")

    def test_pattern_count_that_fits_no_layout(self, tmp_path):
        vf.write_edax_h5ebsd(tmp_path / "e.h5", _patterns())
        with h5py.File(tmp_path / "e.h5", "r+") as f:
            f["Scan 1/EBSD/Header/nRows"][...] = 4
        with pytest.raises(PatternFileError, match=r"holds 12 patterns, but its header's 4 x 4 "
                                                    r"square map needs 16"):
            read_patterns(tmp_path / "e.h5")


class TestEdaxUp:
    def test_up2_square_map(self, tmp_path):
        patterns = _patterns(dtype=np.uint16)
        vf.write_up(tmp_path / "m.up2", patterns, step=(0.3, 0.3))
        stack = read_patterns(tmp_path / "m.up2")
        assert isinstance(stack.data, PatternFile) and stack.data.dtype == np.uint16
        np.testing.assert_array_equal(_all(stack), patterns)
        np.testing.assert_array_equal(stack.data[1:2, 1:4], patterns[1:2, 1:4])
        assert stack.step_size == pytest.approx(0.3) and stack.grid == "square"
        assert stack.detector is None  # .up files store no detector geometry

    def test_up1_version_1_is_one_row(self, tmp_path):
        patterns = _patterns()
        vf.write_up(tmp_path / "m.up1", patterns, version=1)
        stack = read_patterns(tmp_path / "m.up1")
        assert stack.map_shape == (1, 12) and stack.step_size is None
        np.testing.assert_array_equal(_all(stack), patterns.reshape(1, 12, 6, 8))

    def test_up2_hexagonal_short_rows(self, tmp_path):
        patterns = _patterns(ny=4, nx=5, dtype=np.uint16)
        stored = vf.hex_rows(4, 5)
        vf.write_up(tmp_path / "h.up2", patterns, hexagonal=True, short_rows=True, step=(1.0, 0.866))
        stack = read_patterns(tmp_path / "h.up2")
        assert stack.grid == "hexagonal" and stack.map_shape == (4, 5)
        np.testing.assert_array_equal(stack.in_file, stored)
        np.testing.assert_array_equal(_all(stack), np.where(stored[..., None, None], patterns, 0))

    @pytest.mark.filterwarnings("ignore:Returned signal has one navigation dimension")
    @pytest.mark.parametrize("name", ["edax_binary.up1", "edax_binary.up2"])
    def test_kikuchipy_files_agree_with_kikuchipy(self, name):
        import kikuchipy as kp

        stack = read_patterns(KP_DATA / "edax_binary" / name)
        s = kp.load(KP_DATA / "edax_binary" / name)
        np.testing.assert_array_equal(_all(stack).reshape(-1, 60, 60), s.data[:9])
        if name.endswith("up2"):  # 3 x 3 on a hexagonal grid, one extra pattern
            assert stack.map_shape == (3, 3) and stack.grid == "hexagonal"
            assert stack.step_size == pytest.approx(math.pi)

    def test_truncated_up2(self, tmp_path):
        vf.write_up(tmp_path / "t.up2", _patterns(dtype=np.uint16))
        raw = (tmp_path / "t.up2").read_bytes()
        (tmp_path / "t.up2").write_bytes(raw[: len(raw) // 2])
        with pytest.raises(PatternFileError, match=r"t\.up2: holds 5 patterns, but its header's "
                                                    r"3 x 4 square map needs 12 \(truncated file\?\)"):
            read_patterns(tmp_path / "t.up2")


class TestOxfordEbsp:
    def test_patterns_in_file_order_come_back_in_map_order(self, tmp_path):
        patterns = _patterns(sy=10, sx=12)
        order = np.roll(np.arange(12), -1)  # as kikuchipy's test file: pixel 1 first
        vf.write_ebsp(tmp_path / "m.ebsp", patterns, step=0.7, file_order=order)
        stack = read_patterns(tmp_path / "m.ebsp")
        assert isinstance(stack.data, PatternFile) and stack.map_shape == (3, 4)
        np.testing.assert_array_equal(_all(stack), patterns)
        np.testing.assert_array_equal(stack.data[0:2, 3], patterns[0:2, 3])
        assert stack.step_size == pytest.approx(0.7) and stack.in_file is None

    @pytest.mark.parametrize("version", [1, 4, 5])
    def test_versions(self, tmp_path, version):
        patterns = _patterns(dtype=np.uint16)
        vf.write_ebsp(tmp_path / "m.ebsp", patterns, version=version, step=2.0)
        stack = read_patterns(tmp_path / "m.ebsp")
        np.testing.assert_array_equal(_all(stack), patterns)
        assert stack.step_size == pytest.approx(2.0)

    def test_patterns_left_out_read_as_zeros(self, tmp_path):
        patterns = _patterns()
        vf.write_ebsp(tmp_path / "m.ebsp", patterns, missing=(4, 7))
        stack = read_patterns(tmp_path / "m.ebsp")
        assert stack.map_shape == (3, 4)
        expected = patterns.copy()
        expected[1, 0] = expected[1, 3] = 0
        np.testing.assert_array_equal(_all(stack), expected)
        assert not stack.in_file[1, 0] and not stack.in_file[1, 3] and stack.in_file.sum() == 10

    def test_without_beam_positions_one_row(self, tmp_path):
        patterns = _patterns()
        vf.write_ebsp(tmp_path / "m.ebsp", patterns, positions=False)
        stack = read_patterns(tmp_path / "m.ebsp")
        assert stack.map_shape == (1, 12) and stack.step_size is None
        np.testing.assert_array_equal(_all(stack), patterns.reshape(1, 12, 6, 8))

    def test_compressed_patterns_are_refused(self, tmp_path):
        vf.write_ebsp(tmp_path / "c.ebsp", _patterns(), compressed=True)
        with pytest.raises(PatternFileError, match=r"c\.ebsp: holds compressed patterns"):
            read_patterns(tmp_path / "c.ebsp")

    def test_kikuchipy_file_agrees_with_kikuchipy(self):
        import kikuchipy as kp

        path = KP_DATA / "oxford_binary" / "patterns.ebsp"
        stack, s = read_patterns(path), kp.load(path)
        np.testing.assert_array_equal(_all(stack), s.data)
        assert stack.step_size == pytest.approx(s.axes_manager["x"].scale)

    def test_truncated_ebsp(self, tmp_path):
        vf.write_ebsp(tmp_path / "t.ebsp", _patterns(sy=20, sx=20))
        raw = (tmp_path / "t.ebsp").read_bytes()
        (tmp_path / "t.ebsp").write_bytes(raw[: len(raw) // 2])
        with pytest.raises(PatternFileError, match=r"t\.ebsp: truncated"):
            read_patterns(tmp_path / "t.ebsp")


class TestNordif:
    def test_patterns_settings_and_background(self, tmp_path):
        patterns = _patterns(ny=3, nx=5, sy=6, sx=8)
        background = np.full((6, 8), 90, dtype=np.uint8)
        path = vf.write_nordif(tmp_path / "scan", patterns, step=0.25, sample_tilt=69.0,
                               elevation=12.0, azimuthal=2.0, background=background,
                               phases=("Lithium",))
        stack = read_patterns(path)
        assert isinstance(stack.data, PatternFile) and stack.map_shape == (3, 5)
        np.testing.assert_array_equal(_all(stack), patterns)
        np.testing.assert_array_equal(stack.static_background, background)
        assert stack.step_size == pytest.approx(0.25)
        assert stack.detector is None  # Setting.txt stores no PC
        meta = stack.metadata
        assert (meta["sample_tilt"], meta["detector_tilt"], meta["azimuthal"]) == \
            pytest.approx((69.0, -12.0, 2.0))
        assert meta["beam_energy"] == pytest.approx(20.0) and stack.phases == ("Lithium",)

    def test_kikuchipy_file_agrees_with_kikuchipy(self, tmp_path):
        import kikuchipy as kp

        for name in ("Pattern.dat", "Setting.txt", "Background acquisition pattern.bmp"):
            shutil.copy(KP_DATA / "nordif" / name, tmp_path / name)
        stack, s = read_patterns(tmp_path / "Pattern.dat"), kp.load(tmp_path / "Pattern.dat")
        np.testing.assert_array_equal(_all(stack), s.data)
        np.testing.assert_array_equal(stack.static_background, s.static_background)
        assert stack.step_size == pytest.approx(1.5)

    def test_short_file_reads_zeros_past_its_end(self, tmp_path, caplog):
        patterns = _patterns()
        path = vf.write_nordif(tmp_path, patterns)
        path.write_bytes(path.read_bytes()[: 10 * 48 + 20])
        with caplog.at_level("WARNING", logger="dpm"):
            stack = read_patterns(path)
        assert "holds 10 of the 3 x 4 patterns Setting.txt announces" in caplog.text
        expected = patterns.copy()
        expected[2, 2:] = 0
        np.testing.assert_array_equal(_all(stack), expected)
        assert stack.in_file.sum() == 10

    def test_missing_setting_file(self, tmp_path):
        vf.write_nordif(tmp_path, _patterns())
        (tmp_path / "Setting.txt").unlink()
        with pytest.raises(PatternFileError, match=r"Pattern\.dat: a NORDIF pattern file needs "
                                                    r"its Setting\.txt"):
            read_patterns(tmp_path / "Pattern.dat")


class TestEmsoft:
    def test_simulated_patterns_and_detector(self, tmp_path):
        patterns = _patterns(sy=60, sx=80).reshape(12, 60, 80)
        vf.write_emsoft_ebsd(tmp_path / "sim.h5", patterns, xpc=3.5, ypc=-8.0, L=14000.0,
                             delta=59.2, binning=4, thetac=10.0, xtal="Li/li.xtal")
        stack = read_patterns(tmp_path / "sim.h5")
        assert stack.map_shape == (1, 12)
        np.testing.assert_array_equal(_all(stack)[0], patterns)
        det = stack.detector
        np.testing.assert_allclose(det.pc, _bruker_from_emsoft(3.5, -8.0, 14000.0, 60, 80, 4, 59.2),
                                   rtol=1e-6)
        assert (det.tilt, det.binning, det.px_size) == pytest.approx((10.0, 4, 59.2))
        assert stack.metadata["sample_tilt"] is None  # EMsoft keeps it in the Monte Carlo file
        assert stack.metadata["pc_file"] == pytest.approx((3.5, -8.0, 14000.0))
        assert stack.phases == ("li",)


class TestKikuchipyH5ebsd:
    def test_shipped_file_lazily_with_detector(self):
        import dask.array as da
        import kikuchipy as kp

        path = KP_DATA / "kikuchipy_h5ebsd" / "patterns.h5"
        reference = kp.load(path)
        stack = read_patterns(path)
        assert isinstance(stack.data, da.Array)
        assert stack.map_shape == (3, 3) and stack.pattern_shape == (60, 60)
        np.testing.assert_allclose(stack.detector.pc, reference.detector.pc.reshape(-1, 3).mean(0))
        assert stack.detector.sample_tilt == pytest.approx(reference.detector.sample_tilt)
        assert stack.detector.binning == 8
        assert stack.step_size == pytest.approx(reference.axes_manager["x"].scale)
        np.testing.assert_array_equal(_all(stack), reference.data)
        np.testing.assert_array_equal(stack.static_background, reference.static_background)
        assert stack.band_contrast is None and stack.phases == ("ni",)

    def test_written_by_kikuchipy(self, tmp_path):
        import kikuchipy as kp

        patterns = _patterns(ny=2, nx=5, sy=10, sx=10)
        s = kp.signals.EBSD(patterns)
        for axis, name in zip(s.axes_manager.navigation_axes, "xy"):
            axis.name, axis.scale, axis.units = name, 0.3, "um"
        s.detector = kp.detectors.EBSDDetector((10, 10), pc=(0.4, 0.3, 0.55), sample_tilt=69.0,
                                               tilt=4.0, binning=2, px_size=50.0)
        s.save(tmp_path / "k.h5")
        stack = read_patterns(tmp_path / "k.h5")
        np.testing.assert_array_equal(_all(stack), patterns)
        det = stack.detector
        assert det.pc == pytest.approx((0.4, 0.3, 0.55))
        assert (det.sample_tilt, det.tilt, det.binning, det.px_size) == \
            pytest.approx((69.0, 4.0, 2, 50.0))
        assert stack.step_size == pytest.approx(0.3)


class TestImageSeries:
    def test_folder_and_glob(self, tmp_path):
        patterns = _patterns(ny=2, nx=3)
        vf.write_image_series(tmp_path / "imgs", patterns)
        for where in (tmp_path / "imgs", str(tmp_path / "imgs" / "*.png")):
            stack = read_patterns(where)
            assert stack.map_shape == (2, 3) and stack.step_size is None
            np.testing.assert_array_equal(_all(stack), patterns)

    def test_folder_of_mixed_images(self, tmp_path):
        vf.write_image_series(tmp_path, _patterns(ny=1, nx=2))
        vf.write_image_series(tmp_path, _patterns(ny=1, nx=2), suffix=".bmp")
        with pytest.raises(PatternFileError, match="images of one type.*found .bmp, .png"):
            read_patterns(tmp_path)


class TestBadFiles:
    @pytest.mark.parametrize("name, make, message", [
        ("patterns.h5", lambda p: None, "does not exist"),
        ("patterns.h5", lambda p: p.write_bytes(b"garbage"), "not an HDF5 file"),
        ("patterns.xyz", lambda p: p.write_bytes(b"garbage"), r"suffix '\.xyz'"),
        ("patterns.npy", lambda p: p.write_bytes(b"garbage"), "not a readable .npy array"),
        ("patterns.up2", lambda p: p.write_bytes(b"\x03\x00"), "shorter than an .up header"),
        ("patterns.ebsp", lambda p: p.write_bytes(b"\xfe\xff"), "truncated"),
    ])
    def test_unreadable_files_are_named(self, tmp_path, name, make, message):
        path = tmp_path / name
        make(path)
        with pytest.raises(PatternFileError, match=message) as e:
            read_patterns(path)
        assert name in str(e.value)

    def test_master_pattern_file_is_not_a_stack(self):
        path = KP_DATA / "emsoft_ebsd_master_pattern" / "master_patterns.h5"
        with pytest.raises(PatternFileError, match=r"an EMsoft master pattern file "
                                                    r"\(EMData/EBSDmaster\), not a pattern stack"):
            read_patterns(path)


class TestDescribe:
    def test_vendor_file(self, tmp_path):
        vf.write_h5oina(tmp_path / "m.h5oina", _patterns(), pc=(0.5, 0.4, 0.6), step=0.25,
                        detector_tilt=2.5, camera_mode="4x4 (311x256 px)",
                        band_contrast=np.arange(12), phases=("Lithium", "Li2O"))
        text = describe(read_patterns(tmp_path / "m.h5oina"))
        for expected in ("m.h5oina", FORMATS["oxford_h5ebsd"], "version 6.0", "(3, 4) (ny, nx)",
                         "12 patterns", "(6, 8) (sy, sx), dtype uint8", "KiB",
                         "0.25 µm, square grid", "(0.5000, 0.4667, 0.8000) Bruker",
                         "(0.5000, 0.4000, 0.6000) Oxford", "sample tilt:", "70°",
                         "detector tilt:", "2.5°", "binning:", "4", "pixel size:",
                         "1 µm (dpm default)", "static background:  no", "band contrast:      yes",
                         "Lithium, Li2O"):
            assert expected in text, expected
        assert not text.endswith("\n")

    def test_hexagonal_file_without_pc(self, tmp_path):
        vf.write_up(tmp_path / "h.up2", _patterns(ny=4, nx=5, dtype=np.uint16), hexagonal=True,
                    short_rows=True, step=(0.5, 0.433))
        text = describe(read_patterns(tmp_path / "h.up2"))
        for expected in (FORMATS["edax_binary"], "(4, 5) (ny, nx), 20 patterns, 18 of them in the "
                         "file", "dtype uint16", "0.5 µm, hexagonal grid", "pattern centre:",
                         "not stored", "phases:", "none listed"):
            assert expected in text, expected

    def test_nordif_with_background_and_tilts(self, tmp_path):
        path = vf.write_nordif(tmp_path, _patterns(), sample_tilt=69.0, elevation=10.0,
                               background=np.ones((6, 8), np.uint8), phases=("Lithium",))
        text = describe(read_patterns(path))
        for expected in ("NORDIF .dat", "69°", "-10°", "yes, 6 x 8", "Lithium", "576 bytes"):
            assert expected in text, expected

    def test_array_in_memory(self):
        text = describe(PatternStack(data=np.zeros((2, 3, 4, 4), np.float32)))
        assert "array in memory" in text and "(2, 3) (ny, nx), 6 patterns" in text
        assert "size on disk:" in text and "float32" in text
