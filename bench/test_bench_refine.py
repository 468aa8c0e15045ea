"""Orientation refinement on a synthetic Li map with known truth: throughput and accuracy.

Run with ``python3 -m pytest bench/test_bench_refine.py --benchmark-only -q -s``
(``--benchmark-only`` overrides the ``--benchmark-skip`` of the repository's
pytest addopts; ``--benchmark-enable`` alone does not).

The data (:mod:`refine_data`): a 20 x 20 synthetic Li map of 60 x 60 px raw
patterns from the shipped 20 kV dynamical master pattern, indexed by
``dpm.index`` with its defaults (2° dictionary, pixel-integration filter); the
top-1 match of every pixel is the start. Every refiner refines all 400
patterns (pores included) from that start; accuracy figures are disorientations
(m-3m) to the truth over the diffracting pixels only.

The acceptance point for ``dpm.refine``: throughput at least 10x that of
kikuchipy's ``EBSD.refine_orientation`` with its default method (SciPy
``minimize``, Nelder-Mead, no trust region), at equal or better accuracy, on
the same data, machine and run.
"""

from __future__ import annotations

import contextlib
import io
import os
import time

import numpy as np
import pytest
from refine_data import KV, build_refine_data, kikuchipy_inputs

#: Figures of the refiners benchmarked in this run, by name (``"kikuchipy"``), so a
#: later bench in the module can state its speed-up over kikuchipy in the same run.
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def refine_data():
    """The synthetic map, its truth and the dictionary start (about 15 s on 2 cores)."""
    t = time.perf_counter()
    data = build_refine_data()
    data.timings["fixture"] = time.perf_counter() - t
    return data


@pytest.fixture(scope="module")
def kikuchipy_refine_inputs(refine_data, tmp_path_factory):
    """kikuchipy's signal (mean background subtracted), master pattern, detector, start map."""
    return kikuchipy_inputs(refine_data, tmp_path_factory.mktemp("refine-bench"))


def _quiet(call):
    """Run ``call()`` with kikuchipy's progress bar and prints silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return call()


def test_bench_refine_kikuchipy(benchmark, refine_data, kikuchipy_refine_inputs):
    data, kin = refine_data, kikuchipy_refine_inputs

    def refine(navigation_mask=None):
        return kin.signal.refine_orientation(  # default method and options
            kin.xmap, kin.detector, kin.master_pattern, energy=KV,
            navigation_mask=navigation_mask, compute=True)

    warm = np.ones(data.smap.diffracting.shape, dtype=bool)
    warm.ravel()[:4] = False  # refine 4 patterns first: Numba compilation is not timed
    _quiet(lambda: refine(warm))

    timed = {}

    def run():
        t, cpu = time.perf_counter(), time.process_time()
        out = _quiet(refine)
        timed.update(wall=time.perf_counter() - t, cpu=time.process_time() - cpu)
        return out

    refined = benchmark.pedantic(run, rounds=1, iterations=1)
    wall, cpu = timed["wall"], timed["cpu"]

    start_acc = data.accuracy(data.start)
    refined_acc = data.accuracy(refined.rotations.data)
    scores = np.asarray(refined.prop["scores"])
    evals = np.asarray(refined.prop["num_evals"])
    figures = {
        "patterns": data.n, "pattern_shape": list(data.detector.shape),
        "diffracting": int(data.diffracting.sum()), "cores": os.cpu_count(),
        "dictionary_size": data.dictionary_size,
        "method": "minimize (SciPy Nelder-Mead, no trust region)",
        "wall_s": wall, "cpu_s": cpu, "patterns_per_s": data.n / wall,
        "start": start_acc, "refined": refined_acc,
        "ncc_mean": float(scores[data.diffracting].mean()),
        "evaluations_mean": float(evals.mean()),
        "fixture_s": data.timings.get("fixture"), "index_s": data.timings["index"],
    }
    benchmark.extra_info.update(figures)
    MEASURED["kikuchipy"] = figures
    print(f"\nkikuchipy refine_orientation (default: Nelder-Mead): {data.n} patterns of "
          f"{data.detector.shape[0]}x{data.detector.shape[1]}, {os.cpu_count()} cores: "
          f"{wall:.2f} s wall, {cpu:.2f} s CPU, {data.n / wall:.1f} patterns/s, "
          f"{evals.mean():.0f} evaluations per pattern, mean NCC {figures['ncc_mean']:.4f}")
    for name, acc in (("dictionary start", start_acc), ("kikuchipy refined", refined_acc)):
        print(f"  {name:17s}: disorientation mean {acc['mean_deg']:.3f}°, median "
              f"{acc['median_deg']:.3f}°, p95 {acc['p95_deg']:.3f}°, max {acc['max_deg']:.1f}°, "
              f"{acc['over_5deg']} of {figures['diffracting']} diffracting pixels over 5°")
    assert refined_acc["median_deg"] < start_acc["median_deg"]


@pytest.mark.parametrize("n_starts", [10, 1], ids=["best-10", "top-1"])
def test_bench_refine_dpm(benchmark, refine_data, n_starts):
    """dpm.refine from the distinct starts among the best 10 matches (default), or from the
    top-1 match alone (kikuchipy's start), same data."""
    from dpm.io.readers import as_pattern_stack
    from dpm.pipeline import IndexConfig, prepare_stack
    from dpm.refine import RefineConfig, refine, refinement_master

    data = refine_data
    rows, readable = prepare_stack(as_pattern_stack(data.smap.patterns), data.detector, mask=None,
                                   config=IndexConfig(), background=None, xp=np)
    config = RefineConfig(n_starts=n_starts)
    refine(rows[:4], refinement_master(data.master, data.detector), data.detector,
           data.start_topk[:4])  # numba compilation is not timed
    timed = {}

    def run():
        t, cpu = time.perf_counter(), time.process_time()
        out = refine(rows, refinement_master(data.master, data.detector), data.detector,
                     data.start_topk, valid=readable, config=config)
        timed.update(wall=time.perf_counter() - t, cpu=time.process_time() - cpu)
        return out

    refined = benchmark.pedantic(run, rounds=1, iterations=1)
    wall, cpu = timed["wall"], timed["cpu"]
    acc = data.accuracy(refined.quaternions)
    figures = {
        "patterns": data.n, "pattern_shape": list(data.detector.shape), "cores": os.cpu_count(),
        "wall_s": wall, "cpu_s": cpu, "patterns_per_s": data.n / wall, "refined": acc,
        "ncc_mean": float(refined.scores[data.diffracting].mean()),
        "iterations_mean": float(refined.iterations.mean()),
        "n_starts": n_starts,
    }
    kp = MEASURED.get("kikuchipy")
    if kp is not None:
        figures["speedup_vs_kikuchipy"] = kp["wall_s"] / wall
    benchmark.extra_info.update(figures)
    MEASURED[f"dpm-{n_starts}"] = figures
    print(f"\ndpm refine (LM, trust region, starts: best {n_starts}): {data.n} patterns "
          f"of {data.detector.shape[0]}x{data.detector.shape[1]}, {os.cpu_count()} cores: "
          f"{wall:.2f} s wall, {cpu:.2f} s CPU, {data.n / wall:.1f} patterns/s, "
          f"{figures['iterations_mean']:.1f} iterations per pattern, "
          f"mean NCC {figures['ncc_mean']:.4f}"
          + (f", {figures['speedup_vs_kikuchipy']:.1f}x kikuchipy" if kp else ""))
    print(f"  dpm refined      : disorientation mean {acc['mean_deg']:.3f}°, median "
          f"{acc['median_deg']:.3f}°, p95 {acc['p95_deg']:.3f}°, max {acc['max_deg']:.1f}°, "
          f"{acc['over_5deg']} diffracting pixels over 5°")
    assert acc["median_deg"] < data.accuracy(data.start)["median_deg"]
