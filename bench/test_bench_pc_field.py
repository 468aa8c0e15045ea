"""The PC field on a drifting map: dpm's calibrated field against one PC, the true PCs and kikuchipy.

Run with ``python3 -m pytest bench/test_bench_pc_field.py --benchmark-only -q -s``.

The map: 60 × 40 synthetic Li patterns of 60 × 60 px (the shipped 20 kV
dynamical master pattern; background, Poisson noise, blur, 3 % pores; the map
of ``bench/test_bench_end_to_end.py``, seed 42) rendered with a PC that drifts
as a flat sample's does: PCx ±0.01 from the map centre to its left and right
edges, PCy and PCz over the rows (``SyntheticConfig.pc_drift``), about
``MAP_PC`` = (0.515, 0.47, 0.535) at the map centre, inside the ±0.05 box about
the screen centre that dpm searches when no PC is known. Runs, each with the
2° dictionary and refinement:

- dpm with one PC (``pc_field="constant"``), with the calibrated field
  (``"auto"``, the default), with no PC at all (no detector: the PC is searched
  in the default box, then the field calibrated) and with the true PC of every
  pixel (``index(pc_field=...)``);
- kikuchipy with one PC (``get_sample_fundamental``, ``get_patterns``,
  ``dictionary_indexing``, ``refine_orientation``), as users run it.

Printed: the mean and median disorientation to the truth over the diffracting
pixels, the fraction within 2° and the mean over those (kikuchipy has no zero-solution
replacement or cleanup, so its mean also counts the pixels it misindexes), the largest error of the fitted field over the map, and the cost of the
calibration: its stage time, and the whole run's extra time over one PC, each
as a fraction of the one-PC run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from refine_data import KV, disorientation_stats, kikuchipy_index, li_map

from dpm.synthetic import drift_field

MAP_SHAPE = (40, 60)
MAP_PC = (0.515, 0.47, 0.535)
DRIFT = 0.01
RESOLUTION = 2.0
MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def drift_map():
    return li_map(MAP_SHAPE, 42, pc_drift=DRIFT, pc=MAP_PC)


def _errors(quaternions: np.ndarray, smap, point_group) -> dict[str, float]:
    return disorientation_stats(quaternions, smap.quaternions, point_group,
                                smap.diffracting.ravel())


def _within(errors: dict[str, float]) -> str:
    return (f"{100 * errors['within_2deg']:.1f} % within 2° (mean over them "
            f"{errors['mean_within_2deg']:.3f}°)")


def test_bench_pc_field_dpm(benchmark, drift_map):
    from dpm.pipeline import IndexConfig, _field_of, index

    master, detector, smap = drift_map
    truth = drift_field(detector, MAP_SHAPE, smap.step_size, DRIFT)
    runs = {"one PC": ("constant", None, detector), "fitted field": ("auto", None, detector),
            "no PC": ("auto", None, None), "true PCs": ("constant", truth, detector)}
    results = {}
    for name, (mode, known, given) in runs.items():
        config = IndexConfig(kv=KV, resolution=RESOLUTION, device="cpu", pc_field=mode)

        def run():
            return index(smap.patterns, detector=given, master_pattern=master,
                         config=config, pc_field=known)

        results[name] = (benchmark.pedantic(run, rounds=1, iterations=1) if name == "fitted field"
                         else run())
    n = smap.quaternions.shape[0]
    for name, result in results.items():
        MEASURED[f"dpm {name}"] = _errors(result.xmap.rotations.data, smap,
                                          master.phase.point_group)
        print(f"\ndpm, {name}: {n} patterns, {os.cpu_count()} cores, "
              f"{result.timings['total']:.1f} s; disorientation mean "
              f"{MEASURED[f'dpm {name}']['mean_deg']:.3f}°, median "
              f"{MEASURED[f'dpm {name}']['median_deg']:.3f}°; "
              f"{_within(MEASURED[f'dpm {name}'])}")
    y, x = np.indices(MAP_SHAPE)
    one = results["one PC"].timings["total"]
    for name in ("fitted field", "no PC"):
        fitted = results[name]
        record = fitted.details["pc_field"]
        error = np.abs(_field_of(record).at(x, y).reshape(-1, 3) - smap.pcs).max(axis=0)
        calibration = fitted.timings["pc_field"]
        print(f"{name}: field {record['status']}, largest error over the map (PCx, PCy, PCz) "
              f"{error.round(5).tolist()}; gradients "
              f"{np.round(record['gradient_z'], 1).tolist()} standard errors from zero; "
              f"calibration stage {calibration:.2f} s = {100 * calibration / one:.1f} % of the "
              f"one-PC run ({one:.1f} s); the whole run "
              f"{100 * (fitted.timings['total'] - one) / one:.1f} % longer (includes the "
              "refinement at per-pixel PCs)")
        MEASURED[f"dpm {name}"]["field_error"] = error.tolist()
    search = results["no PC"].details["pc_search"]
    pixels = np.asarray(search["pixels"])
    truth_pc = smap.pcs.reshape(*MAP_SHAPE, 3)[pixels[:, 0], pixels[:, 1]].mean(axis=0)
    seconds = results["no PC"].timings["pc_search"]
    print(f"no PC: searched in {search['box_centre']} ± {search['half_width']}: found "
          f"{np.round(search['pc'], 4).tolist()}, the calibration patterns' mean true PC "
          f"{np.round(truth_pc, 4).tolist()} ({np.abs(np.subtract(search['pc'], truth_pc)).max():.4f} "
          f"off); {sum(search['converged'])} of {len(search['converged'])} patterns agreed; "
          f"search {seconds:.2f} s = {100 * seconds / one:.1f} % of the one-PC run")
    benchmark.extra_info.update(errors=MEASURED,     # with each run's field_error
                                calibration_s=results["fitted field"].timings["pc_field"],
                                search_s=seconds, one_pc_s=one, patterns=n,
                                cores=os.cpu_count())


def test_bench_pc_field_kikuchipy(benchmark, drift_map, tmp_path):
    import kikuchipy as kp

    master, detector, smap = drift_map
    refined, stages, size = benchmark.pedantic(
        lambda: kikuchipy_index(master, detector, smap, RESOLUTION, tmp_path), rounds=1,
        iterations=1)
    MEASURED["kikuchipy one PC"] = _errors(refined.rotations.data, smap,
                                           master.phase.point_group)
    print(f"\nkikuchipy {kp.__version__}, one PC (dictionary of {size}): "
          f"{stages['total']:.1f} s; disorientation mean "
          f"{MEASURED['kikuchipy one PC']['mean_deg']:.3f}°, median "
          f"{MEASURED['kikuchipy one PC']['median_deg']:.3f}°; "
          f"{_within(MEASURED['kikuchipy one PC'])}")
    for name in ("fitted field", "no PC"):
        if f"dpm {name}" in MEASURED:
            dpm, kp_one = MEASURED[f"dpm {name}"], MEASURED["kikuchipy one PC"]
            print(f"dpm, {name} / kikuchipy with one PC: mean disorientation "
                  f"{dpm['mean_deg'] / kp_one['mean_deg']:.3f}, over the pixels within 2° "
                  f"{dpm['mean_within_2deg'] / kp_one['mean_within_2deg']:.3f}")
    benchmark.extra_info.update(stages=stages, errors=MEASURED["kikuchipy one PC"])
