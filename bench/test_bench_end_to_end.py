"""dpm against kikuchipy end to end on the same 2 400-pattern Li map: time per stage and accuracy.

Run with ``python3 -m pytest bench/test_bench_end_to_end.py --benchmark-only -q -s``.

The map: 60 × 40 synthetic Li patterns of 60 × 60 px (the shipped 20 kV
dynamical master pattern; background, Poisson noise, blur, 3 % pores; the
``bench/test_bench_index.py`` map). Both sides get the same master pattern,
detector and static-background correction (mean pattern subtracted) and
index against a 2° sampling of the fundamental zone, then refine:

- dpm: ``dpm.index`` with its defaults (dpm's cubochoric sampling, the
  coarse-to-fine dictionary search of :mod:`dpm.search`, refinement from the
  best 10 matches, zero solutions, cleanup), cold (a fresh cache folder; the
  numba kernels loaded from their on-disk cache, as kikuchipy's are) and then
  warm (the same cache folder again); and once with ``search.method =
  "exhaustive"`` (every pattern against all 100 347 orientations), to show
  how often the coarse-to-fine search finds the exhaustive best match; and
  with ``search.method = "pca"`` (:mod:`dpm.compression`), cold (the
  compressed dictionary built and cached) and warm (read from that cache);
- kikuchipy: ``orix.sampling.get_sample_fundamental``,
  ``EBSDMasterPattern.get_patterns`` (the whole dictionary in memory),
  ``EBSD.dictionary_indexing`` (NCC, top 1) and ``EBSD.refine_orientation``
  (its default, SciPy Nelder–Mead), each timed.

Printed: wall seconds per stage for each, the end-to-end ratios (cold and
warm), the disorientation to the truth after refinement over the diffracting
pixels (mean, median, fraction within 2°), and the agreement of the
coarse-to-fine and PCA best matches with the exhaustive one over the
diffracting pixels.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from refine_data import KV, disorientation_stats, kikuchipy_index, li_map


MAP_SHAPE = (40, 60)
RESOLUTION = 2.0
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def bench_map():
    return li_map(MAP_SHAPE, 42)


def _accuracy(quaternions: np.ndarray, smap, point_group) -> dict[str, float]:
    """Disorientation to the truth over the diffracting pixels (one rotation per pixel)."""
    return disorientation_stats(quaternions, smap.quaternions, point_group,
                                smap.diffracting.ravel())


def _report(name: str, stages: dict[str, float], accuracy: dict[str, float], n: int) -> None:
    total = stages["total"]
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items() if k != "total")
    print(f"\n{name}: {n} patterns, {os.cpu_count()} cores: {total:.1f} s end to end "
          f"({n / total:.0f} patterns/s; {parts}); after refinement: disorientation mean "
          f"{accuracy['mean_deg']:.3f}°, median {accuracy['median_deg']:.3f}°, "
          f"{100 * accuracy['within_2deg']:.2f} % within 2°")
    if "kikuchipy" in MEASURED:
        reference = MEASURED["kikuchipy"]["stages"]["total"]
        for run in ("dpm cold", "dpm warm", "dpm exhaustive", "dpm pca cold", "dpm pca warm"):
            if run in MEASURED:
                print(f"{run}: {reference / MEASURED[run]['stages']['total']:.2f}x faster than "
                      "kikuchipy end to end on this map")


def _dpm_run(name: str, benchmark, bench_map, cache: str, monkeypatch, search=None) -> Any:
    from dpm.pipeline import IndexConfig, index
    from dpm.search import SearchConfig

    master, detector, smap = bench_map
    monkeypatch.setenv("DPM_CACHE_DIR", cache)
    config = IndexConfig(kv=KV, resolution=RESOLUTION, device="cpu",
                         search=search or SearchConfig())

    def run():
        return index(smap.patterns, detector=detector, master_pattern=master, config=config)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    t = result.timings
    stages = {"sampling": t["sampling"], "preprocess": t["preprocess"],
              "band contrast": t["band_contrast"], "dictionary + matching": t["match"],
              "refinement": t["refine"],
              "zero solutions + cleanup": sum(t.get(k, 0.0) for k in ("zero_solutions", "cleanup",
                                                                    "pseudo_symmetry")),
              "total": t["total"]}
    accuracy = _accuracy(result.xmap.rotations.data, smap, master.phase.point_group)
    best = np.asarray(result.xmap.prop["topk_indices"]).reshape(smap.quaternions.shape[0], -1)[:, 0]
    MEASURED[name] = {"stages": stages, "accuracy": accuracy, "best": best,
                      "dictionary_scores": np.asarray(result.xmap.prop["topk_scores"]).reshape(
                          smap.quaternions.shape[0], -1)[:, 0]}
    benchmark.extra_info.update(stages=stages, accuracy=accuracy, patterns=smap.quaternions.shape[0],
                                cores=os.cpu_count(), dictionary_size=result.dictionary_size)
    _report(f"{name} (dpm index)", stages, accuracy, smap.quaternions.shape[0])
    return result


def test_bench_end_to_end_dpm(benchmark, bench_map, tmp_path_factory, monkeypatch):
    cache = str(tmp_path_factory.mktemp("dpm-cache"))
    _dpm_run("dpm cold", benchmark, bench_map, cache, monkeypatch)


def test_bench_end_to_end_dpm_warm(benchmark, bench_map, tmp_path_factory, monkeypatch):
    # A second map with the same set-up: the cache folder of the cold run is reused.
    cache = str(tmp_path_factory.getbasetemp() / "dpm-cache0")
    _dpm_run("dpm warm", benchmark, bench_map, cache, monkeypatch)


def test_bench_end_to_end_dpm_exhaustive(benchmark, bench_map, tmp_path, monkeypatch):
    from dpm.search import SearchConfig

    _dpm_run("dpm exhaustive", benchmark, bench_map, str(tmp_path / "cache"), monkeypatch,
             search=SearchConfig(method="exhaustive"))
    if "dpm cold" in MEASURED:
        _agreement("coarse-to-fine", "dpm cold", bench_map)


def test_bench_end_to_end_dpm_pca(benchmark, bench_map, tmp_path_factory, monkeypatch):
    # Cold: the compressed dictionary is built (and cached); warm: read from that cache.
    from dpm.search import SearchConfig

    cache = str(tmp_path_factory.mktemp("dpm-pca-cache"))
    for run in ("dpm pca cold", "dpm pca warm"):
        _dpm_run(run, benchmark if run.endswith("cold") else _Once(), bench_map, cache,
                 monkeypatch, search=SearchConfig(method="pca"))
    if "dpm exhaustive" in MEASURED:
        _agreement("PCA (dpm.compression)", "dpm pca warm", bench_map)


class _Once:
    """A stand-in for the ``benchmark`` fixture, which times one call per test."""

    extra_info: dict = {}

    @staticmethod
    def pedantic(run, rounds: int, iterations: int) -> Any:
        return run()


def _agreement(label: str, run: str, bench_map) -> None:
    """Print how often ``run``'s best match is the exhaustive one over the diffracting pixels."""
    _, _, smap = bench_map
    diffracting = smap.diffracting.ravel()
    fast, full = MEASURED[run], MEASURED["dpm exhaustive"]
    same = (fast["best"] == full["best"]) | np.isclose(
        fast["dictionary_scores"], full["dictionary_scores"], rtol=0, atol=1e-6)
    print(f"{label} best match = exhaustive best match on "
          f"{100 * same[diffracting].mean():.3f} % of {diffracting.sum()} diffracting pixels "
          f"({(~same[diffracting]).sum()} differ)")


def test_bench_end_to_end_kikuchipy(benchmark, bench_map, tmp_path):
    import kikuchipy as kp

    master, detector, smap = bench_map
    refined, stages, size = benchmark.pedantic(
        lambda: kikuchipy_index(master, detector, smap, RESOLUTION, tmp_path), rounds=1,
        iterations=1)
    accuracy = _accuracy(refined.rotations.data, smap, master.phase.point_group)
    MEASURED["kikuchipy"] = {"stages": stages, "accuracy": accuracy}
    benchmark.extra_info.update(stages=stages, accuracy=accuracy, dictionary_size=size,
                                patterns=smap.quaternions.shape[0], cores=os.cpu_count())
    _report(f"kikuchipy {kp.__version__} (dictionary of {size})", stages, accuracy,
            smap.quaternions.shape[0])
