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
