"""Synthetic maps: the truth they report must be the map they draw."""

from dataclasses import replace

import numpy as np
import pytest

from dpm.detector import Detector
from dpm.master import simulate_master_pattern
from dpm.projection import project
from dpm.synthetic import (SHADOW_TRANSMISSION, SyntheticConfig, background, columnar_grains,
                           load_synthetic_map, pores, save_synthetic_map, shadow, synthetic_map)


@pytest.fixture(scope="module")
def li_master():
    return simulate_master_pattern("li", kv=20, npx=60, method="kinematical")


@pytest.fixture(scope="module")
def detector():
    return Detector(shape=(24, 24), pc=(0.5, 0.3, 0.6))


def test_columns_span_the_film():
    config = SyntheticConfig(map_shape=(30, 80), grain_width=10, boundary_tilt=0.0)
    ids = columnar_grains(config, np.random.default_rng(1))
    # vertical boundaries: every column of the map holds a single grain
    assert all(len(np.unique(ids[:, c])) == 1 for c in range(ids.shape[1]))
    widths = np.bincount(ids[0])
    assert 4 <= widths[1:-1].mean() <= 20  # interior grains near the requested width


def test_pore_fraction_is_reached():
    config = SyntheticConfig(map_shape=(50, 50), pore_fraction=0.05)
    diffracting = pores(config, np.random.default_rng(3))
    assert 0.05 <= (~diffracting).mean() < 0.08


def test_patterns_follow_truth(li_master, detector):
    config = SyntheticConfig(map_shape=(6, 10), counts=1e5, contrast=0.3, blur=0, pore_fraction=0.1)
    smap = synthetic_map(li_master, detector, config)
    assert smap.patterns.shape == (6, 10, 24, 24) and smap.patterns.dtype == np.uint8
    flat = smap.patterns.reshape(60, -1).astype(float)
    truth = project(li_master, detector, smap.quaternions).reshape(60, -1)
    # with almost no noise, a diffracting pattern divided by the background is the projection
    bg = background(detector.shape, detector.pc, config.background_width).ravel()
    corr = [np.corrcoef(f / bg, t)[0, 1] for f, t in zip(flat, truth)]
    corr = np.array(corr)
    assert corr[smap.diffracting.ravel()].min() > 0.95
    assert np.abs(corr[~smap.diffracting.ravel()]).max() < 0.3


def test_same_seed_same_map_and_roundtrip(li_master, detector, tmp_path):
    config = SyntheticConfig(map_shape=(4, 5), seed=7)
    a = synthetic_map(li_master, detector, config)
    b = synthetic_map(li_master, detector, config)
    assert np.array_equal(a.patterns, b.patterns)
    save_synthetic_map(a, tmp_path / "m.npz")
    c = load_synthetic_map(tmp_path / "m.npz")
    assert np.array_equal(c.patterns, a.patterns) and np.allclose(c.quaternions, a.quaternions)
    assert c.detector.pc == pytest.approx(a.detector.pc)


def test_given_grain_orientations(li_master, detector):
    q = np.array([[1.0, 0, 0, 0], [0.0, 1, 0, 0]])
    smap = synthetic_map(li_master, detector, SyntheticConfig(map_shape=(3, 20), grain_width=4),
                         grain_orientations=q)
    ids = smap.grain_ids.ravel()
    assert np.allclose(smap.quaternions, q[ids % 2])


@pytest.mark.parametrize("kwargs, message", [
    ({"pore_fraction": 1.5}, "pore_fraction"),
    ({"weak_fraction": 1.5}, "weak_fraction"),
    ({"weak_contrast": -0.1}, "weak_contrast"),
    ({"shadow_fraction": 1.0}, "shadow_fraction"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_weak_pixels_diffract_faintly(li_master, detector):
    base = SyntheticConfig(map_shape=(10, 12), counts=1e5, contrast=0.3, blur=0, pore_fraction=0.1)
    plain = synthetic_map(li_master, detector, base)
    config = replace(base, weak_fraction=0.4, weak_contrast=0.06)
    smap = synthetic_map(li_master, detector, config)
    # the weak draw has its own random stream: grains, orientations and pores are unchanged
    assert np.array_equal(smap.grain_ids, plain.grain_ids)
    assert np.array_equal(smap.diffracting, plain.diffracting)
    assert np.array_equal(smap.quaternions, plain.quaternions)
    assert not (smap.weak & ~smap.diffracting).any()
    assert smap.weak.sum() == round(0.4 * smap.diffracting.sum())
    assert not plain.weak.any()
    # relative Kikuchi signal: the pattern over the background, zero mean
    bg = background(detector.shape, detector.pc, base.background_width)
    rel = smap.patterns.reshape(120, -1) / bg.ravel()
    rel = rel / rel.mean(axis=1, keepdims=True) - 1
    signal = rel.std(axis=1)
    normal = smap.diffracting.ravel() & ~smap.weak.ravel()
    ratio = np.median(signal[smap.weak.ravel()]) / np.median(signal[normal])
    assert ratio == pytest.approx(0.06 / 0.3, rel=0.2)


def test_shadow_covers_its_fraction_from_the_lower_left():
    t = shadow((60, 60), 0.25)
    assert ((1 - t) / (1 - SHADOW_TRANSMISSION)).mean() == pytest.approx(0.25, abs=0.01)
    assert t.min() == pytest.approx(SHADOW_TRANSMISSION, abs=1e-3) and t.max() == 1.0
    assert t[-1, 0] < 0.11 and (t[0] == 1).all() and t[-1, -1] > t[-1, 0]
    assert (shadow((60, 60), 0.0) == 1).all()


def test_shadow_and_static_background(li_master, detector):
    # no Kikuchi signal: the mean pattern of the stack is the camera's static background
    config = SyntheticConfig(map_shape=(20, 20), contrast=0.0, shadow_fraction=0.3, seed=4)
    smap = synthetic_map(li_master, detector, config)
    t = shadow(detector.shape, 0.3)
    mean = smap.patterns.reshape(-1, *detector.shape).mean(axis=0)
    dark, bright = t < 0.2, t == 1
    # the same shadow on every pattern: the mean pattern is dark there
    assert mean[dark].mean() < 0.2 * mean[bright].mean()
    assert smap.static_background.shape == detector.shape
    assert smap.static_background.dtype == np.float32
    assert np.abs(mean - smap.static_background).max() < 0.02 * smap.static_background.max()


def test_new_fields_roundtrip_and_old_files_load(li_master, detector, tmp_path):
    config = SyntheticConfig(map_shape=(4, 5), weak_fraction=0.5, shadow_fraction=0.2, seed=7)
    a = synthetic_map(li_master, detector, config)
    save_synthetic_map(a, tmp_path / "m.npz")
    c = load_synthetic_map(tmp_path / "m.npz")
    assert np.array_equal(c.weak, a.weak) and c.weak.any()
    np.testing.assert_array_equal(c.static_background, a.static_background)
    # files written before the new fields read without them
    with np.load(tmp_path / "m.npz") as f:
        old = {k: f[k] for k in f.files if k not in ("weak", "static_background", "pcs")}
    np.savez(tmp_path / "old.npz", **old)
    before = load_synthetic_map(tmp_path / "old.npz")
    assert before.weak.shape == before.diffracting.shape and not before.weak.any()
    assert before.static_background is None and before.pcs is None


def test_distortion_fields_are_smooth_modulations_of_the_given_strength():
    from dpm.synthetic import distortion_fields

    fields = distortion_fields((60, 60), 50, 0.3, np.random.default_rng(0))
    assert fields.shape == (50, 60, 60) and (fields >= 0).all()
    assert fields.mean() == pytest.approx(1.0, abs=0.02)
    assert fields.std(axis=(1, 2)).mean() == pytest.approx(0.3, rel=0.05)
    # smooth: neighbouring pixels almost equal (σ = 60 / 8 px), unlike white noise
    step = np.abs(np.diff(fields, axis=2)).mean()
    assert step < 0.05 * 0.3 * 2


def test_weak_distortion_modulates_only_weak_pixels(li_master, detector):
    from scipy import ndimage

    base = SyntheticConfig(map_shape=(8, 10), counts=1e5, blur=0, weak_fraction=0.3,
                           weak_contrast=0.08)
    bg = background(detector.shape, detector.pc, base.background_width)

    def smooth_variation(smap):
        rel = smap.patterns.reshape(80, *detector.shape) / bg
        rel = rel / rel.mean(axis=(1, 2), keepdims=True)
        return ndimage.gaussian_filter(rel, (0, 4, 4)).std(axis=(1, 2))

    plain = smooth_variation(synthetic_map(li_master, detector, base))
    distorted = smooth_variation(synthetic_map(li_master, detector,
                                               replace(base, weak_distortion=0.3)))
    weak = synthetic_map(li_master, detector, base).weak.ravel()
    assert np.median(distorted[weak]) > 5 * np.median(plain[weak])
    assert np.median(distorted[~weak]) == pytest.approx(np.median(plain[~weak]), rel=0.15)


def test_a_drifting_map_has_the_pcs_of_kikuchipys_extrapolated_field():
    """``pc_drift``: the PC of every pixel is kikuchipy's ``extrapolate_pc`` from the map
    centre for the screen that gives PCx ±drift across the width, and each pattern is
    the projection at its own PC (not at the detector's)."""
    from dpm.master import simulate_master_pattern
    from dpm.synthetic import camera_patterns, drift_field

    master = simulate_master_pattern("li", kv=20, npx=60, method="kinematical")
    det = Detector(shape=(20, 20), pc=(0.5, 0.3, 0.6), sample_tilt=70.0)
    config = SyntheticConfig(map_shape=(5, 7), step_size=2.0, pc_drift=0.01, supersample=1,
                             counts=1e6, blur=0.0, contrast=0.2, pore_fraction=0.0)
    smap = synthetic_map(master, det, config)
    screen = 2.0 * 6 / (2 * 0.01 * 20)          # µm per pattern pixel: step (nx - 1) / (2 drift Nx)
    expected = replace(det, px_size=screen).to_kikuchipy().extrapolate_pc(
        pc_indices=np.array([2, 3]), navigation_shape=(5, 7), step_sizes=(2.0, 2.0)).pc
    np.testing.assert_allclose(smap.pcs, expected.reshape(-1, 3), atol=1e-12)
    assert smap.pcs[:, 0].max() - smap.pcs[:, 0].min() == pytest.approx(0.02)
    np.testing.assert_allclose(drift_field(det, (5, 7), 2.0, 0.01).at(3, 2), det.pc, atol=1e-15)
    corner = (smap.patterns[0, 0] / smap.static_background).ravel()   # 1 + contrast x Kikuchi
    own = camera_patterns(master, det, smap.quaternions[:1], 1, pcs=smap.pcs[:1]).ravel()
    centre = camera_patterns(master, det, smap.quaternions[:1], 1).ravel()
    assert np.corrcoef(corner, own)[0, 1] > 0.99 > np.corrcoef(corner, centre)[0, 1]
