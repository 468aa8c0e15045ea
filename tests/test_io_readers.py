"""Pattern readers: lazy reading and what the file says about the detector."""

import numpy as np
import pytest

from dpm.io.readers import PatternFileError, as_pattern_stack, read_patterns


def test_npy_is_memory_mapped(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    np.save(tmp_path / "p.npy", data)
    stack = read_patterns(tmp_path / "p.npy")
    assert isinstance(stack.data, np.memmap)
    assert stack.map_shape == (2, 3) and stack.pattern_shape == (4, 5)
    assert stack.detector is None and stack.step_size is None


def test_three_dimensional_stack_is_one_row():
    assert as_pattern_stack(np.zeros((7, 4, 4))).map_shape == (1, 7)


def test_kikuchipy_file_lazily_with_detector():
    import dask.array as da
    import kikuchipy as kp
    from importlib import resources


    path = resources.files("kikuchipy") / "data" / "kikuchipy_h5ebsd" / "patterns.h5"
    reference = kp.load(path)
    stack = read_patterns(path)
    assert isinstance(stack.data, da.Array)
    assert stack.map_shape == (3, 3) and stack.pattern_shape == (60, 60)
    np.testing.assert_allclose(stack.detector.pc, reference.detector.pc.reshape(-1, 3).mean(0))
    assert stack.detector.sample_tilt == pytest.approx(reference.detector.sample_tilt)
    assert stack.step_size == pytest.approx(reference.axes_manager["x"].scale)
    np.testing.assert_array_equal(np.asarray(stack.data), reference.data)
    assert stack.band_contrast is None  # only Oxford files store one


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"garbage"), "kikuchipy cannot read it"),
])
def test_unreadable_files_are_named(tmp_path, make, message):
    path = tmp_path / "patterns.h5"
    make(path)
    with pytest.raises(PatternFileError, match=message) as e:
        read_patterns(path)
    assert "patterns.h5" in str(e.value)


def test_wrong_rank_and_dtype():
    with pytest.raises(PatternFileError, match=r"got shape \(5,\)"):
        as_pattern_stack(np.zeros(5))
    with pytest.raises(PatternFileError, match="dtype"):
        as_pattern_stack(np.zeros((2, 3, 3), dtype=complex))


def _write_h5oina(path, band_contrast=None, ny=2, nx=3, sy=8, sx=10):
    """A minimal Oxford h5oina file (the datasets kikuchipy's reader needs)."""
    import h5py

    patterns = np.arange(ny * nx * sy * sx, dtype=np.uint8).reshape(ny * nx, sy, sx)
    with h5py.File(path, "w") as f:
        f.create_dataset("Manufacturer", data="Oxford Instruments")
        f.create_dataset("Format Version", data="5.0")
        header = f.create_group("1/EBSD/Header")
        for key, value in {"X Cells": nx, "Y Cells": ny, "Pattern Height": sy,
                           "Pattern Width": sx, "X Step": 0.5, "Y Step": 0.5}.items():
            header.create_dataset(key, data=value)
        data = f.create_group("1/EBSD/Data")
        data.create_dataset("Processed Patterns", data=patterns)
        if band_contrast is not None:
            data.create_dataset("Band Contrast", data=band_contrast)
    return patterns.reshape(ny, nx, sy, sx)


def test_h5oina_band_contrast_is_read(tmp_path):
    path = tmp_path / "map.h5oina"
    bc = np.array([[0], [5], [11], [120], [200], [255]], dtype=np.uint8)  # (n, 1) as AZtec writes
    patterns = _write_h5oina(path, band_contrast=bc)
    stack = read_patterns(path)
    assert stack.map_shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(stack.data), patterns)
    assert stack.band_contrast.dtype == np.float32
    np.testing.assert_array_equal(stack.band_contrast, bc.reshape(2, 3))
    assert stack.step_size == pytest.approx(0.5)


def test_band_contrast_absent_or_wrong_size(tmp_path, caplog):
    _write_h5oina(tmp_path / "none.h5oina")
    assert read_patterns(tmp_path / "none.h5oina").band_contrast is None
    _write_h5oina(tmp_path / "bad.h5oina", band_contrast=np.zeros(5, np.uint8))
    with caplog.at_level("WARNING", logger="dpm"):
        assert read_patterns(tmp_path / "bad.h5oina").band_contrast is None
    assert "Band Contrast holds 5 values for a map of 2 x 3" in caplog.text
    np.save(tmp_path / "p.npy", np.zeros((2, 4, 4)))
    assert read_patterns(tmp_path / "p.npy").band_contrast is None
