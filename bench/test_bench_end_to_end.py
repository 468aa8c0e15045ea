"""dpm against kikuchipy end to end on the same 2 400-pattern Li map: time per stage and accuracy.

Run with ``python3 -m pytest bench/test_bench_end_to_end.py --benchmark-only -q -s``.

The map: 60 × 40 synthetic Li patterns of 60 × 60 px (the shipped 20 kV
dynamical master pattern; background, Poisson noise, blur, 3 % pores; the
``bench/test_bench_index.py`` map). Both sides get the same master pattern,
detector and static-background correction (mean pattern subtracted) and
index against a 2° sampling of the fundamental zone, then refine:

- dpm: ``dpm.index`` with its defaults (sampling, dictionary projected on the
  fly, exact NCC matching, refinement from the best 10 matches, zero
  solutions, cleanup), cold: a fresh dictionary cache folder, the refinement
  kernel compiled in the run;
- kikuchipy: ``orix.sampling.get_sample_fundamental``,
  ``EBSDMasterPattern.get_patterns`` (the whole dictionary in memory),
  ``EBSD.dictionary_indexing`` (NCC, top 1) and ``EBSD.refine_orientation``
  (its default, SciPy Nelder–Mead), each timed.

Printed: wall seconds per stage for both, the end-to-end ratio, and the
disorientation to the truth after refinement over the diffracting pixels
(mean, median, fraction within 2°).
"""

from __future__ import annotations

import contextlib
import io
import os
import time

import numpy as np
import pytest
from refine_data import KV, PC, background_corrected

from dpm.detector import Detector
from dpm.synthetic import SyntheticConfig, synthetic_map

MAP_SHAPE = (40, 60)
RESOLUTION = 2.0
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def bench_map():
    from dpm.master.shipped import shipped_master_pattern

    master = shipped_master_pattern("li", KV)
    detector = Detector(shape=(60, 60), pc=PC)
    smap = synthetic_map(master, detector, SyntheticConfig(map_shape=MAP_SHAPE, seed=42))
    return master, detector, smap


def _accuracy(quaternions: np.ndarray, smap, point_group) -> dict[str, float]:
    """Disorientation to the truth over the diffracting pixels (one rotation per pixel)."""
    from dpm.demo import disorientation

    diffracting = smap.diffracting.ravel()
    angles = disorientation(np.asarray(quaternions).reshape(-1, 4)[diffracting],
                            smap.quaternions[diffracting], point_group)
    return {"mean_deg": float(angles.mean()), "median_deg": float(np.median(angles)),
            "within_2deg": float((angles <= 2.0).mean())}


def _best_match(xmap):
    """The (n, 1) rotations of ``dictionary_indexing(keep_n=1)`` as one per point, which
    ``refine_orientation`` takes."""
    from orix.crystal_map import CrystalMap
    from orix.quaternion import Rotation

    best = xmap.rotations.data.reshape(xmap.size, -1, 4)[:, 0]
    scores = np.asarray(xmap.prop["scores"]).reshape(xmap.size, -1)[:, 0]
    return CrystalMap(rotations=Rotation(best), phase_id=xmap.phase_id, x=xmap.x, y=xmap.y,
                      phase_list=xmap.phases, prop={"scores": scores}, scan_unit=xmap.scan_unit)


def _report(name: str, stages: dict[str, float], accuracy: dict[str, float], n: int) -> None:
    total = stages["total"]
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items() if k != "total")
    print(f"\n{name}: {n} patterns, {os.cpu_count()} cores: {total:.1f} s end to end "
          f"({n / total:.0f} patterns/s; {parts}); after refinement: disorientation mean "
          f"{accuracy['mean_deg']:.3f}°, median {accuracy['median_deg']:.3f}°, "
          f"{100 * accuracy['within_2deg']:.2f} % within 2°")
    if len(MEASURED) == 2:
        ratio = MEASURED["kikuchipy"]["stages"]["total"] / MEASURED["dpm"]["stages"]["total"]
        print(f"dpm is {ratio:.2f}x faster than kikuchipy end to end on this map")


def test_bench_end_to_end_dpm(benchmark, bench_map, tmp_path, monkeypatch):
    from dpm.pipeline import IndexConfig, index

    master, detector, smap = bench_map
    monkeypatch.setenv("DPM_CACHE_DIR", str(tmp_path / "cold-cache"))

    def run():
        return index(smap.patterns, detector=detector, master_pattern=master,
                     config=IndexConfig(kv=KV, resolution=RESOLUTION, device="cpu"))

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    t = result.timings
    stages = {"sampling": t["sampling"], "preprocess": t["preprocess"],
              "band contrast": t["band_contrast"], "dictionary + matching": t["match"],
              "refinement": t["refine"],
              "zero solutions + cleanup": sum(t.get(k, 0.0) for k in ("zero_solutions", "cleanup",
                                                                    "pseudo_symmetry")),
              "total": t["total"]}
    accuracy = _accuracy(result.xmap.rotations.data, smap, master.phase.point_group)
    MEASURED["dpm"] = {"stages": stages, "accuracy": accuracy}
    benchmark.extra_info.update(stages=stages, accuracy=accuracy, patterns=smap.quaternions.shape[0],
                                cores=os.cpu_count(), dictionary_size=result.dictionary_size)
    _report("dpm index (cold)", stages, accuracy, smap.quaternions.shape[0])


def test_bench_end_to_end_kikuchipy(benchmark, bench_map, tmp_path):
    import kikuchipy as kp
    from orix.sampling import get_sample_fundamental

    from dpm.io.emsoft import write_master_pattern

    master, detector, smap = bench_map
    path = write_master_pattern(master, tmp_path / "li_20kv.h5")
    mp = kp.load(path, projection="lambert", hemisphere="both", energy=KV)
    kp_detector = detector.to_kikuchipy()
    stages: dict[str, float] = {}

    def timed(name, call):
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            out = call()
        stages[name] = time.perf_counter() - t
        return out

    def run():
        t0 = time.perf_counter()
        signal = timed("preprocess", lambda: kp.signals.EBSD(background_corrected(smap.patterns)))
        for axis, name in zip(signal.axes_manager.navigation_axes, ("x", "y")):  # x first
            axis.name, axis.scale, axis.units = name, smap.step_size, "um"
        rotations = timed("sampling", lambda: get_sample_fundamental(
            resolution=RESOLUTION, point_group=mp.phase.point_group, method="cubochoric"))
        dictionary = timed("dictionary", lambda: mp.get_patterns(
            rotations, kp_detector, energy=KV, dtype_out=np.float32, compute=True,
            show_progressbar=False))
        xmap = timed("matching", lambda: _best_match(signal.dictionary_indexing(dictionary,
                                                                                keep_n=1)))
        refined = timed("refinement", lambda: signal.refine_orientation(
            xmap, kp_detector, mp, energy=KV, compute=True))
        stages["total"] = time.perf_counter() - t0
        return refined, rotations.size

    refined, size = benchmark.pedantic(run, rounds=1, iterations=1)
    accuracy = _accuracy(refined.rotations.data, smap, master.phase.point_group)
    MEASURED["kikuchipy"] = {"stages": stages, "accuracy": accuracy}
    benchmark.extra_info.update(stages=stages, accuracy=accuracy, dictionary_size=size,
                                patterns=smap.quaternions.shape[0], cores=os.cpu_count())
    _report(f"kikuchipy {kp.__version__} (dictionary of {size})", stages, accuracy,
            smap.quaternions.shape[0])
