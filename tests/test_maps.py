"""Tests for dpm.maps: the PC-field figure."""

import numpy as np
import pytest


def test_pc_field_figure_is_written_and_bad_shapes_are_named(tmp_path):
    import matplotlib.image as mpimg

    from dpm.calibration import PatternCentreField
    from dpm.maps import save_pc_field

    field = PatternCentreField(np.array([14.5, 9.5]), np.array([0.49, 0.27, 0.58]),
                               np.array([[-3e-4, 0.0], [0.0, -3e-4], [0.0, 1e-4]]))
    y, x = np.indices((20, 30))
    path = tmp_path / "pc_field.png"
    save_pc_field(path, field.at(x, y), calibration=np.array([[2, 3], [10, 20]]),
                  inliers=np.array([True, False]))
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]   # three panels in a row
    with pytest.raises(ValueError, match=r"\(ny, nx, 3\)"):
        save_pc_field(tmp_path / "bad.png", np.zeros((20, 30)))
