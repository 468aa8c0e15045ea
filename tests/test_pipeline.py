"""End-to-end indexing on synthetic maps whose truth is known."""

import numpy as np
import pytest

from dpm.detector import Detector
from dpm.master import simulate_master_pattern
from dpm.pipeline import IndexConfig, index
from dpm.sampling import sample_orientations
from dpm.synthetic import SyntheticConfig, synthetic_map


@pytest.fixture(scope="module")
def li_master():
    return simulate_master_pattern("li", kv=20, npx=80, method="kinematical")


@pytest.fixture(scope="module")
def detector():
    return Detector(shape=(30, 30), pc=(0.5, 0.3, 0.6), sample_tilt=70)


@pytest.fixture(scope="module")
def grid(li_master):
    return sample_orientations(li_master.phase, 8.0).data


@pytest.fixture(scope="module")
def smap(li_master, detector, grid):
    """Grains take orientations that are in the dictionary: indexing must find them exactly.

    Point-sampled patterns (``supersample=1``) and an unfiltered dictionary
    (``pixel_integration=False`` below), so the data are dictionary rows plus noise.
    """
    rng = np.random.default_rng(5)
    picks = rng.choice(len(grid), size=40, replace=False)
    config = SyntheticConfig(map_shape=(8, 12), grain_width=3, pore_fraction=0.08, seed=11,
                             supersample=1)
    return synthetic_map(li_master, detector, config, grain_orientations=grid[picks])


#: Dictionary matching alone (no refinement, no zero-solution replacement).
DICTIONARY_ONLY = {"refine": False, "zero_solutions": None, "cleanup": None}


def _best_quaternions(result):
    q = result.xmap.rotations.data
    return q.reshape(result.scores.size, -1, 4)[:, 0]


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_index_recovers_dictionary_orientations(smap, li_master, detector, device, request):
    if device == "gpu":
        request.getfixturevalue("gpu_standin")
    config = IndexConfig(resolution=8.0, keep=3, device=device, pixel_integration=False,
                         **DICTIONARY_ONLY)
    result = index(smap.patterns, detector=detector, master_pattern=li_master, config=config)
    diff = smap.diffracting.ravel()
    found = _best_quaternions(result)
    # same rotation up to the quaternion sign
    dots = np.abs(np.sum(found * smap.quaternions, axis=1))
    assert (dots[diff] > 1 - 1e-5).mean() == 1.0
    # pores do not diffract: every pore scores below every grain pixel
    assert result.scores.ravel()[~diff].max() < result.scores.ravel()[diff].min()
    assert result.xmap.prop["scores"].shape == (smap.quaternions.shape[0], 3)


def test_index_reads_npy_and_keeps_row_major_order(smap, li_master, detector, tmp_path):
    path = tmp_path / "stack.npy"
    flat = smap.patterns.reshape(-1, 30, 30)
    np.save(path, flat)  # (n, sy, sx) stack: a 1 x n map
    result = index(path, detector=detector, master_pattern=li_master,
                   config=IndexConfig(resolution=8.0, keep=1, pixel_integration=False,
                                      **DICTIONARY_ONLY))
    assert result.scores.shape == (1, flat.shape[0])
    dots = np.abs(np.sum(_best_quaternions(result) * smap.quaternions, axis=1))
    assert (dots[smap.diffracting.ravel()] > 1 - 1e-5).all()


def test_inputs_are_not_mutated(smap, li_master, detector):
    patterns = smap.patterns.copy()
    index(patterns, detector=detector, master_pattern=li_master, config=IndexConfig(resolution=10.0))
    assert np.array_equal(patterns, smap.patterns)


def test_shape_mismatch_is_named(smap, li_master):
    det = Detector(shape=(40, 40), pc=(0.5, 0.3, 0.6))
    with pytest.raises(ValueError, match=r"pattern shape \(30, 30\) does not match the detector shape \(40, 40\)"):
        index(smap.patterns, detector=det, master_pattern=li_master)


def test_nan_pattern_is_named(smap, li_master, detector):
    bad = smap.patterns.astype(np.float32)
    bad[2, 3, 5, 5] = np.nan
    with pytest.raises(ValueError, match=r"pattern 27 \(row 2, column 3\) holds NaN"):
        index(bad, detector=detector, master_pattern=li_master, config=IndexConfig(resolution=10.0))


def test_constant_patterns_are_flagged_not_indexed(smap, li_master, detector):
    bad = smap.patterns.copy()
    bad[0, :4] = 17
    result = index(bad, detector=detector, master_pattern=li_master,
                   config=IndexConfig(resolution=10.0, keep=1))
    readable = np.asarray(result.xmap.prop["readable"])
    assert not readable[:4].any() and readable[4:].all()
    assert (result.scores.ravel()[:4] == 0).all()
    assert (result.xmap.phase_id[:4] == -1).all()


def test_all_constant_is_an_error(li_master, detector):
    with pytest.raises(ValueError, match="every pattern is constant"):
        index(np.full((3, 30, 30), 5, np.uint8), detector=detector, master_pattern=li_master)


def _accuracy(data_master, dictionary_master, seed=42):
    """Fraction of diffracting pixels within 2° of the truth, and the pores' top score."""
    from dpm.demo import disorientation

    det = Detector(shape=(60, 60), pc=(0.49, 0.27, 0.58), sample_tilt=70)
    smap = synthetic_map(data_master, det, SyntheticConfig(map_shape=(40, 60), seed=seed))
    result = index(smap.patterns, detector=det, master_pattern=dictionary_master,
                   config=IndexConfig(resolution=2.0, keep=1, memory_budget=2 * 1024**3,
                                      **DICTIONARY_ONLY))
    assert result.dictionary_size == 100_347
    diff = smap.diffracting.ravel()
    angles = disorientation(_best_quaternions(result), smap.quaternions,
                            data_master.phase.point_group)
    scores = result.scores.ravel()
    return (angles[diff] <= 2.0).mean(), scores[~diff].max(), np.percentile(scores[diff], 1)


@pytest.mark.slow
def test_li_map_with_full_2deg_dictionary():
    """Acceptance: a 60 x 40 Li map of 60 x 60 px noisy raw patterns, 2° dictionary."""
    kinematical = simulate_master_pattern("li", kv=20, npx=250, method="kinematical")
    within, pores_max, grains_p1 = _accuracy(kinematical, kinematical)
    assert within >= 0.99
    assert pores_max < grains_p1  # every pore scores below the worst 1% of grains


@pytest.mark.slow
def test_dynamical_patterns_need_the_dynamical_dictionary():
    """Dynamical Li patterns: the dynamical dictionary keeps the accuracy, the kinematical loses it."""
    from dpm.master.shipped import shipped_master_pattern

    dynamical = shipped_master_pattern("li", 20.0)
    kinematical = simulate_master_pattern("li", kv=20, npx=250, method="kinematical")
    with_dynamical, pores_max, grains_p1 = _accuracy(dynamical, dynamical)
    with_kinematical, _, _ = _accuracy(dynamical, kinematical)
    assert with_dynamical >= 0.99 and pores_max < grains_p1
    assert with_kinematical < with_dynamical


def test_bad_inputs_give_clear_errors_or_flags(smap, li_master, detector):
    """A background of the wrong shape, a mask hiding every pixel, a PC behind the
    sample: clear errors; an all-zero pattern: flagged and left unindexed."""
    from dataclasses import replace

    from dpm.preprocess import PreprocessConfig

    given = IndexConfig(resolution=10.0, preprocess=PreprocessConfig(static_background="given"))
    with pytest.raises(ValueError, match=r"background shape \(20, 20\).*\(30, 30\)"):
        index(smap.patterns, detector=detector, master_pattern=li_master,
              background=np.ones((20, 20)), config=given)
    with pytest.raises(ValueError, match="hides every detector pixel"):
        index(smap.patterns, detector=detector, master_pattern=li_master,
              mask=np.zeros((30, 30), bool), config=IndexConfig(resolution=10.0))
    with pytest.raises(ValueError, match="PCz"):
        index(smap.patterns, detector=replace(detector, pc=(0.5, 0.3, -0.2)),
              master_pattern=li_master, config=IndexConfig(resolution=10.0))
    zeros = smap.patterns.copy()
    zeros[0, 0] = 0
    result = index(zeros, detector=detector, master_pattern=li_master,
                   config=IndexConfig(resolution=10.0))
    assert not result.xmap.prop["readable"][0] and result.xmap.phase_id[0] == -1
    assert result.xmap.prop["readable"][1:].all()


def test_map_grid_reaches_every_neighbour_stage():
    from dpm.pipeline import IndexConfig

    config = IndexConfig(grid="hexagonal")
    assert config.zero_solutions.grid == config.cleanup.grid == config.grains.grid == "hexagonal"
    with pytest.raises(ValueError, match="grid must be"):
        IndexConfig(grid="triangular")
