"""Tests for dpm.search: the coarse-to-fine search against exhaustive matching (the oracle)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from orix.quaternion import Orientation
from orix.quaternion.symmetry import O

from dpm import backend
from dpm.detector import Detector
from dpm.dictionary import Dictionary
from dpm.match import MatchConfig, match, prepare_patterns
from dpm.search import (FineRows, PatternBinning, SearchConfig, binned_detector, binning_factor,
                        coarse_to_fine, confidence, search_dictionaries)
from search_data import RESOLUTION, noisy_patterns_setup

KEEP = 5


@pytest.fixture(scope="module")
def setup(li_master_module):
    """The shared noisy-pattern set-up (:mod:`search_data`)."""
    return noisy_patterns_setup(li_master_module, KEEP)


@pytest.fixture(scope="module")
def li_master_module():
    from dpm.master.shipped import shipped_master_pattern

    return shipped_master_pattern("li", 20)


def _search(setup, xp: ModuleType = np, config: SearchConfig = SearchConfig(), keep: int = KEEP,
            capacity: int = 2**40, patterns=None):
    dictionaries = search_dictionaries(setup["master"], setup["dictionary"].master,
                                       setup["detector"], setup["grid"], config=config, xp=xp,
                                       capacity=capacity)
    patterns = setup["patterns"] if patterns is None else patterns
    result = coarse_to_fine(xp.asarray(patterns), dictionaries, keep=keep, config=config)
    return result, dictionaries.fine


def test_equals_exhaustive_matching(setup) -> None:
    result, fine = _search(setup)
    exhaustive = setup["exhaustive"]
    best, reference = result.indices[:, 0], exhaustive.indices[:, 0]
    same = (best == reference) | np.isclose(result.scores[:, 0], exhaustive.scores[:, 0],
                                            rtol=0, atol=1e-6)
    # 32 x 32 px patterns with noise: 1 of 150 differs (6 without the pseudo-symmetric
    # boxes; the bench map's 60 x 60 px patterns agree on >= 99.9 %).
    assert same.mean() >= 0.99, f"{(~same).sum()} of {len(same)} differ"
    without, _ = _search(setup, config=SearchConfig(pseudo_symmetry=False))
    assert (without.indices[:, 0] != reference).sum() > (~same).sum()
    truth = setup["truth"]

    def within(rows: np.ndarray) -> float:
        found = Orientation(setup["grid"].rotations.data[rows], symmetry=O)
        return float((found.angle_with(truth, degrees=True) < 2 * RESOLUTION).mean())

    assert within(best) >= within(reference) - 1.5 / len(best)
    # Where the best match agrees, its score is the exhaustive NCC of that orientation.
    np.testing.assert_allclose(result.scores[same, 0], exhaustive.scores[same, 0], atol=1e-5)
    # Scores are sorted, indices are distinct rows of the grid.
    assert np.all(np.diff(result.scores, axis=1) <= 0)
    assert all(len(set(row)) == KEEP for row in result.indices.tolist())
    # Far fewer dictionary rows were projected than the grid holds.
    assert fine.projected < 0.8 * len(setup["grid"])


def test_binned_ranking_then_full_resolution(setup) -> None:
    """Ranked on 16 x 16 px binned patterns and rescored at 32 x 32: scores are the
    full-resolution NCC, the best match is the exhaustive one on >= 95 % of the noisy
    patterns (7 of 150 differ measured; at 60 x 60 px binned to 30 x 30 the bench map
    agrees everywhere), and fewer full-resolution rows are projected."""
    config = SearchConfig(working_size=16)
    result, fine = _search(setup, config=config)
    exhaustive = setup["exhaustive"]
    same = (result.indices[:, 0] == exhaustive.indices[:, 0]) | np.isclose(
        result.scores[:, 0], exhaustive.scores[:, 0], rtol=0, atol=1e-6)
    assert same.mean() >= 0.95, f"{(~same).sum()} of {len(same)} differ"
    dictionary = setup["dictionary"]
    for p in (0, 50, 149):
        rows = result.indices[p]
        direct = np.stack([dictionary.chunk(r, r + 1)[0] for r in rows]) @ setup["patterns"][p]
        np.testing.assert_allclose(result.scores[p], direct, atol=1e-5)
    _, unbinned = _search(setup)
    assert fine.projected < unbinned.projected


def test_binned_detector_sees_the_binned_patterns(setup) -> None:
    """A pattern projected on the binned detector (same PC) is the 2 x 2 sum of the
    full-resolution pattern: for a smooth master (σ 3°) NCC >= 0.985 (0.99-0.995
    measured), while a PC off by half a binned pixel gives < 0.9."""
    import dataclasses

    from dpm.projection import integrate_pixels

    detector = setup["detector"]
    small = binned_detector(detector, 2)
    assert small.shape == (16, 16) and small.pc == detector.pc and small.binning == 2
    smooth = integrate_pixels(setup["master"], small, orientation_spread=3.0)
    q = setup["truth"].data[:5].astype(np.float32)
    full = Dictionary(smooth, detector, q).chunk(0, 5).reshape(5, 16, 2, 16, 2).sum(axis=(2, 4))
    binned, _ = prepare_patterns(full.reshape(5, -1))
    direct = Dictionary(smooth, small, q).chunk(0, 5)
    assert np.all((binned * direct).sum(axis=1) >= 0.985)
    off = dataclasses.replace(small, pc=(small.pc[0] + 0.5 / 16, small.pc[1], small.pc[2]))
    assert np.all((binned * Dictionary(smooth, off, q).chunk(0, 5)).sum(axis=1) < 0.9)
    with pytest.raises(ValueError, match="does not divide"):
        binned_detector(detector, 3)


def test_masked_rows_bin_like_the_unmasked_image() -> None:
    """Rows of masked patterns, binned: the unmasked patterns' binned images restricted to
    the binned pixels the mask keeps whole, then normalised."""
    rng = np.random.default_rng(5)
    images = rng.normal(size=(3, 8, 12)).astype(np.float32)
    mask = np.ones((8, 12), dtype=bool)
    mask[:, :5] = False                      # binned columns 0-1 lost, 2 partly (dropped)
    mask[7, 11] = False                      # one binned pixel partly
    rows = images.reshape(3, -1)[:, mask.ravel()]
    binned = PatternBinning(2, (8, 12), mask).rows(rows)
    whole = images.reshape(3, 4, 2, 6, 2).sum(axis=(2, 4))
    keep = mask.reshape(4, 2, 6, 2).all(axis=(1, 3))
    assert keep.sum() == 4 * 3 - 1
    expected, _ = prepare_patterns(whole.reshape(3, -1)[:, keep.ravel()])
    np.testing.assert_allclose(binned, expected, atol=1e-5)
    np.testing.assert_array_equal(PatternBinning(1, (8, 12), mask).rows(rows), rows)


@pytest.mark.parametrize("shape, working_size, factor", [
    ((60, 60), 30, 2), ((32, 32), 30, 1), ((120, 90), 30, 3), ((62, 60), 30, 2),
    ((61, 60), 30, 1), ((60, 60), 0, 1), ((96, 96), 30, 3)])
def test_binning_factor(shape: tuple, working_size: int, factor: int) -> None:
    assert binning_factor(shape, working_size) == factor


def test_each_pattern_is_searched_on_its_own(setup) -> None:
    whole, _ = _search(setup)
    few = [3, 77, 120]
    alone, _ = _search(setup, patterns=setup["patterns"][few])
    np.testing.assert_array_equal(alone.indices, whole.indices[few])
    np.testing.assert_allclose(alone.scores, whole.scores[few], atol=1e-6)


def test_rows_kept_or_projected_anew_are_the_dictionary_rows(setup) -> None:
    dictionary = setup["dictionary"]
    rows = np.array([5, 900, 17, 2000])
    for capacity in (2**40, 1):
        fine = FineRows(dictionary, np, capacity=capacity)
        for _ in range(2):
            got = fine.get(rows)
            np.testing.assert_allclose(got, np.stack([dictionary.chunk(r, r + 1)[0] for r in rows]),
                                       atol=1e-6)
        assert fine.projected == (4 if capacity > 1 else 8)
    # A small budget keeps nothing and gives the same search.
    kept, _ = _search(setup)
    anew, _ = _search(setup, capacity=1)
    np.testing.assert_array_equal(kept.indices, anew.indices)


def test_keep_beyond_one_box(setup) -> None:
    # One coarse candidate and radius 1: 27 candidates at first for keep = 40; the
    # climb adds boxes, and what is still missing is matched exhaustively.
    patterns = setup["patterns"][:4]
    result, _ = _search(setup, config=SearchConfig(coarse_keep=1, radius=1), keep=40,
                        patterns=patterns)
    assert np.all(result.indices >= 0)
    assert all(len(set(row)) == 40 for row in result.indices.tolist())
    assert np.all(np.diff(result.scores, axis=1) <= 0)
    dictionary = setup["dictionary"]
    for p, rows in enumerate(result.indices):
        direct = np.stack([dictionary.chunk(r, r + 1)[0] for r in rows]) @ patterns[p]
        np.testing.assert_allclose(result.scores[p], direct, atol=1e-5)
    exhaustive = match(patterns, dictionary.chunk(0, len(dictionary)), config=MatchConfig(keep=1))
    np.testing.assert_array_equal(result.indices[:, 0], exhaustive.indices[:, 0])


def test_gpu_glue_on_the_standin_equals_numpy(setup, gpu_standin: ModuleType) -> None:
    few = setup["patterns"][:20]
    on_gpu, _ = _search(setup, xp=gpu_standin, patterns=few)
    assert isinstance(on_gpu.indices, gpu_standin.ndarray)
    on_cpu, _ = _search(setup, patterns=few)
    np.testing.assert_array_equal(backend.to_host(on_gpu.indices), on_cpu.indices)


def test_unsure_patterns_are_matched_exhaustively(setup) -> None:
    """At low signal-to-noise the coarse stage misses: without the confidence check the
    search then differs from exhaustive matching; with it (the default) it does not."""
    dictionary = setup["dictionary"]
    rng = np.random.default_rng(11)
    sharp = Dictionary(setup["dictionary"].master, dictionary.detector,
                       setup["truth"].data.astype(np.float32)).chunk(0, 150)
    noisy = sharp + rng.normal(scale=5 * float(sharp.std()), size=sharp.shape)
    patterns, _ = prepare_patterns(noisy.astype(np.float32))
    exhaustive = match(patterns, dictionary.chunk(0, len(dictionary)), config=MatchConfig(keep=KEEP))

    def differ(config: SearchConfig) -> int:
        result, _ = _search(setup, config=config, patterns=patterns)
        same = (result.indices[:, 0] == exhaustive.indices[:, 0]) | np.isclose(
            result.scores[:, 0], exhaustive.scores[:, 0], rtol=0, atol=1e-6)
        return int((~same).sum())

    assert differ(SearchConfig(confidence=0)) >= 10   # 34 measured
    assert differ(SearchConfig()) == 0


def test_confidence_is_the_score_in_null_standard_deviations() -> None:
    """Against the mean and standard deviation of every 16th coarse score, from their
    definitions; a pattern whose null scores are all equal gets 0."""
    rng = np.random.default_rng(3)
    coarse, _ = prepare_patterns(rng.normal(size=(200, 50)).astype(np.float32))
    patterns, _ = prepare_patterns(rng.normal(size=(4, 50)).astype(np.float32))
    null = (patterns.astype(np.float64) @ coarse[::16].T.astype(np.float64))
    expected = (0.5 - null.mean(axis=1)) / null.std(axis=1)
    np.testing.assert_allclose(confidence(patterns, np.full(4, 0.5), coarse), expected, rtol=1e-5)
    assert confidence(np.zeros((1, 50), np.float32), np.ones(1), coarse)[0] == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "fastest"}, "search method"),
    ({"coarse_factor": 0}, "coarse_factor"),
    ({"coarse_keep": 1.5}, "coarse_keep"),
    ({"radius": -1}, "radius"),
    ({"confidence": -1.0}, "confidence"),
    ({"confidence": float("nan")}, "confidence"),
    ({"working_size": -1}, "working_size"),
    ({"precision": "fp8"}, "precision"),
])
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_index_coarse_to_fine_equals_exhaustive_on_a_map(li_master_module) -> None:
    """dpm.index on a small synthetic map (2° grid, 4° coarse): the default search
    finds the exhaustive best match and the same accuracy after refinement; a 3° grid
    (coarse 6°, too sparse) is searched exhaustively."""
    from dpm.demo import disorientation
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import SyntheticConfig, synthetic_map

    detector = Detector(shape=(60, 60), pc=(0.49, 0.27, 0.58))
    # Enough grains that the mean pattern (the static background) holds no bands.
    smap = synthetic_map(li_master_module, detector,
                         SyntheticConfig(map_shape=(16, 24), grain_width=3.0, seed=3))
    results = {}
    for method in ("coarse-to-fine", "exhaustive"):
        config = IndexConfig(resolution=2.0, device="cpu", search=SearchConfig(method=method))
        results[method] = index(smap.patterns, detector=detector,
                                master_pattern=li_master_module, config=config)
    diff = smap.diffracting.ravel()
    best = {m: np.asarray(r.xmap.prop["topk_indices"]).reshape(diff.size, -1)[:, 0]
            for m, r in results.items()}
    # Small grains (3 px): boundary pixels mix two patterns, and ~2 % of them rank
    # another cell first; refinement ends at the same orientations.
    assert (best["coarse-to-fine"] == best["exhaustive"])[diff].mean() >= 0.97
    point_group = li_master_module.phase.point_group
    errors = {m: disorientation(r.xmap.rotations.data.reshape(-1, 4)[diff],
                                smap.quaternions[diff], point_group)
              for m, r in results.items()}
    assert (errors["coarse-to-fine"] <= 2).mean() >= (errors["exhaustive"] <= 2).mean() - 0.01
    assert SearchConfig().uses_coarse_to_fine(2.0) and not SearchConfig().uses_coarse_to_fine(3.0)


@pytest.mark.slow
def test_bench_map_agrees_with_exhaustive_on_999_permille(li_master_module) -> None:
    """Issue 7's acceptance on the bench map (bench/test_bench_end_to_end.py): 60 x 40
    Li patterns of 60 x 60 px, 2° grid; the coarse-to-fine best match is the exhaustive
    best match on >= 99.9 % of the diffracting pixels (ties within 1e-6 aside)."""
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import SyntheticConfig, synthetic_map

    detector = Detector(shape=(60, 60), pc=(0.49, 0.27, 0.58))
    smap = synthetic_map(li_master_module, detector, SyntheticConfig(map_shape=(40, 60), seed=42))
    best = {}
    for method in ("coarse-to-fine", "exhaustive"):
        config = IndexConfig(resolution=2.0, device="cpu", refine=False, keep=1,
                             search=SearchConfig(method=method))
        result = index(smap.patterns, detector=detector, master_pattern=li_master_module,
                       config=config)
        best[method] = (np.asarray(result.xmap.prop["simulation_indices"]).ravel(),
                        np.asarray(result.xmap.prop["scores"]).ravel())
    diff = smap.diffracting.ravel()
    (fast, fast_scores), (full, full_scores) = best["coarse-to-fine"], best["exhaustive"]
    same = (fast == full) | np.isclose(fast_scores, full_scores, rtol=0, atol=1e-6)
    assert same[diff].mean() >= 0.999, f"{(~same[diff]).sum()} of {diff.sum()} differ"


def test_index_with_the_fused_and_pca_searches_equals_exhaustive(li_master_module) -> None:
    """``method="fused"`` (the dictionary made on the fly, :func:`dpm.fused.match_on_the_fly`)
    gives the exhaustive matches in FP32; FP16 rounding moves no best match on this map;
    ``method="pca"`` (:mod:`dpm.compression`) finds the same best matches."""
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import SyntheticConfig, synthetic_map

    detector = Detector(shape=(30, 30), pc=(0.49, 0.27, 0.58))
    smap = synthetic_map(li_master_module, detector,
                         SyntheticConfig(map_shape=(6, 8), grain_width=2.0, seed=5))
    found = {}
    for method, precision in (("exhaustive", "fp32"), ("fused", "fp32"), ("fused", "fp16"),
                              ("pca", "fp32")):
        config = IndexConfig(resolution=5.0, device="cpu", refine=False, keep=3,
                             search=SearchConfig(method=method, precision=precision))
        xmap = index(smap.patterns, detector=detector, master_pattern=li_master_module,
                     config=config).xmap
        found[method, precision] = (np.asarray(xmap.prop["simulation_indices"]).reshape(-1, 3),
                                    np.asarray(xmap.prop["scores"]).reshape(-1, 3))
    indices, scores = found["exhaustive", "fp32"]
    np.testing.assert_array_equal(found["fused", "fp32"][0], indices)
    np.testing.assert_allclose(found["fused", "fp32"][1], scores, atol=1e-5)
    np.testing.assert_array_equal(found["fused", "fp16"][0][:, 0], indices[:, 0])
    np.testing.assert_allclose(found["fused", "fp16"][1], scores, atol=2e-3)
    # PCA: the best match is exhaustive's on >= 95 % of the pixels, with exact scores.
    pca_indices, pca_scores = found["pca", "fp32"]
    same = pca_indices[:, 0] == indices[:, 0]
    assert same.mean() >= 0.95
    np.testing.assert_allclose(pca_scores[same, 0], scores[same, 0], atol=1e-5)
