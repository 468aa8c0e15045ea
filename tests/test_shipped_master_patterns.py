"""The shipped Li/Na dynamical master patterns: small, readable by kikuchipy, reproducible."""

import numpy as np
import pytest

from dpm.detector import Detector
from dpm.master.shipped import SHIPPED, SHIPPED_NPX, shipped_master_pattern, shipped_path
from dpm.projection import project


@pytest.mark.parametrize("key", sorted(SHIPPED))
def test_shipped_file_is_small_and_dynamical(key):
    phase, kv = key
    path = shipped_path(phase, kv)
    assert path is not None and path.stat().st_size <= 5 * 1024**2
    mp = shipped_master_pattern(phase, kv)
    assert mp.npx == SHIPPED_NPX and mp.energy == kv and mp.method == "dynamical"
    assert mp.phase.name == phase and mp.params["supersample"] == 2


def test_kikuchipy_projects_the_shipped_li_file_as_dpm_does():
    import kikuchipy as kp
    from orix.quaternion import Rotation

    path = shipped_path("li", 20.0)
    kp_master = kp.load(path, projection="lambert", hemisphere="both")
    det = Detector(shape=(40, 50), pc=(0.45, 0.3, 0.55), sample_tilt=70, tilt=4)
    q = np.random.default_rng(9).normal(size=(30, 4))
    rot = Rotation(q / np.linalg.norm(q, axis=1, keepdims=True))
    ref = kp_master.get_patterns(rot, det.to_kikuchipy(), energy=20, compute=True,
                                 dtype_out=np.float32, show_progressbar=False)
    ref = np.asarray(ref.data, dtype=np.float64).reshape(30, -1)
    ref -= ref.mean(axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ours = project(shipped_master_pattern("li", 20.0), det, rot).reshape(30, -1)
    assert (ours * ref).sum(axis=1).min() >= 0.999


def test_unshipped_combinations():
    assert shipped_path("li", 15.0) is None and shipped_master_pattern("cu", 20.0) is None


@pytest.mark.slow
def test_shipped_li_equals_a_fresh_simulation():
    from dpm.master import simulate_master_pattern

    fresh = simulate_master_pattern("li", kv=20.0, npx=SHIPPED_NPX, method="dynamical")
    shipped = shipped_master_pattern("li", 20.0)
    np.testing.assert_allclose(shipped.northern, fresh.northern, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shipped.southern, fresh.southern, rtol=1e-5, atol=1e-6)
