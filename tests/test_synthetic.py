"""Synthetic maps: the truth they report must be the map they draw."""

import numpy as np
import pytest

from dpm.detector import Detector
from dpm.master import simulate_master_pattern
from dpm.projection import project
from dpm.synthetic import (SyntheticConfig, background, columnar_grains, load_synthetic_map, pores,
                           save_synthetic_map, synthetic_map)


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


def test_bad_config():
    with pytest.raises(ValueError, match="pore_fraction"):
        SyntheticConfig(pore_fraction=1.5)
