"""``dpm demo``: the whole job on a bundled lithium example with known truth.

The bundled map (``dpm/data/li_demo.npz``, made by :func:`make_demo_data` with
dpm's own simulator) holds raw 60 × 60 px patterns of a 20 × 30 columnar Li map
(3 µm step) with Poisson noise, background, blur and non-diffracting pores,
projected from dpm's dynamical (Bloch-wave) Li master pattern, each at its own
pattern centre: the PC drifts over the map as on a real 90 µm scan (PCx ±0.01
across it), and the demo calibrates that field (``pc_field.png``). The demo simulates that master
pattern (or takes it from the cache), indexes the map against a 2° dictionary,
writes the outputs of ``dpm index`` and reports the accuracy against the truth.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

#: Master-pattern settings of the bundled map (the demo simulates the same).
DEMO_KV = 20.0
DEMO_NPX = 250
DEMO_METHOD = "dynamical"
DEMO_FILE = "li_demo.npz"
#: PC drift of the bundled map (PCx ± this from its centre to its left and right edges).
DEMO_PC_DRIFT = 0.01


def demo_path() -> Path:
    """Path of the bundled demo map."""
    return Path(str(resources.files("dpm.data") / DEMO_FILE))


def make_demo_data(path: str | Path) -> None:
    """Regenerate the bundled demo map: 20 × 30 pixels at a 3 µm step (a 90 µm wide
    map), 60 × 60 px patterns, seed 2024, with the PC drift such a map has (PCx ±0.01
    from the map centre to its left and right edges, PCy and PCz with the rows).
    """
    from dpm.detector import Detector
    from dpm.master.cache import cached_master_pattern
    from dpm.synthetic import SyntheticConfig, save_synthetic_map, synthetic_map

    master = cached_master_pattern("li", kv=DEMO_KV, npx=DEMO_NPX, method=DEMO_METHOD)
    det = Detector(shape=(60, 60), pc=(0.49, 0.27, 0.58), sample_tilt=70.0)
    config = SyntheticConfig(map_shape=(20, 30), step_size=3.0, grain_width=6.0,
                             pc_drift=DEMO_PC_DRIFT, seed=2024)
    save_synthetic_map(synthetic_map(master, det, config), path)


def _truth_grain_count(smap) -> int:
    """Grains of the truth: 4-connected diffracting regions of each true grain (a pore or a
    corner contact splits a column, as it splits a reconstructed grain)."""
    from scipy import ndimage

    ids = np.where(smap.diffracting, smap.grain_ids, -1)
    return int(sum(ndimage.label(ids == g)[1] for g in np.unique(ids[ids >= 0])))


def disorientation(q1: np.ndarray, q2: np.ndarray, point_group) -> np.ndarray:
    """Disorientation angles in degrees between two sets of quaternions, (n,)."""
    from orix.quaternion import Orientation

    o1 = Orientation(q1, symmetry=point_group)
    o2 = Orientation(q2, symmetry=point_group)
    return np.asarray(o1.angle_with(o2, degrees=True))


def run_demo(out: str | Path = "dpm-demo", device: str | None = None, progress: bool = True) -> str:
    """Index the bundled Li map, reconstruct its grains, write the results into ``out`` and
    return a report."""
    from dpm.io.writers import write_index_outputs
    from dpm.maps import pattern_centres
    from dpm.master.cache import cached_master_pattern
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import load_synthetic_map

    smap = load_synthetic_map(demo_path())
    master = cached_master_pattern("li", kv=DEMO_KV, npx=DEMO_NPX, method=DEMO_METHOD)
    config = IndexConfig(kv=DEMO_KV, npx=DEMO_NPX, method=DEMO_METHOD)
    if device is not None:
        config = replace(config, device=device)
    result = index(smap.patterns, detector=smap.detector, master_pattern=master,
                   step_size=smap.step_size, config=config, progress=progress)
    best = result.xmap.rotations.data.reshape(smap.patterns.shape[0] * smap.patterns.shape[1], -1, 4)[:, 0]
    angle = disorientation(best, smap.quaternions, master.phase.point_group)
    diff = smap.diffracting.ravel()
    indexed = np.asarray(result.xmap.phase_id >= 0)
    within = float((angle[diff] <= 2.0).mean())
    accuracy = {
        "fraction_within_2deg": within,
        "mean_disorientation_deg": float(angle[diff].mean()),
        "median_disorientation_deg": float(np.median(angle[diff])),
        "p95_disorientation_deg": float(np.percentile(angle[diff], 95)),
        "score_diffracting_mean": float(result.scores.ravel()[diff].mean()),
        "score_pores_max": float(result.scores.ravel()[~diff].max()) if (~diff).any() else None,
        "pores_left_unindexed": int((~indexed[~diff]).sum()),
        "pores": int((~diff).sum()),
    }
    field = result.details.get("pc_field", {})
    pc_text = ""
    found = pattern_centres(result.xmap)
    if smap.pcs is not None and found is not None:
        accuracy["pc_max_error"] = float(np.abs(found - smap.pcs.reshape(-1, 3)).max())
        if field.get("status") == "fitted":
            pc_text = ("PC field ({:.4f}, {:.4f}, {:.4f}) at the map centre, spread ({:.4f}, "
                       "{:.4f}, {:.4f}), ".format(*field["pc_at_map_centre"], *field["spread"]))
        pc_text += f"largest PC error {accuracy['pc_max_error']:.4f}; "
    from dpm.grains import grains, write_grain_outputs

    grain_map = grains(result.xmap, result.config.grains)
    truth_grains = _truth_grain_count(smap)
    accuracy["grains"] = truth_grains
    write_index_outputs(result, out, extra_summary={"truth": accuracy})
    write_grain_outputs(grain_map, result.xmap, out, result.config.boundaries)
    zs = result.details.get("zero_solutions", {})
    return (f"dpm demo: {diff.sum()} diffracting pixels of {diff.size}: "
            f"{100 * within:.1f}% within 2 deg of the truth "
            f"(mean disorientation {accuracy['mean_disorientation_deg']:.2f} deg, "
            f"median {accuracy['median_disorientation_deg']:.2f}, "
            f"95th percentile {accuracy['p95_disorientation_deg']:.2f}); "
            f"mean NCC {accuracy['score_diffracting_mean']:.3f} on grains; "
            f"{zs.get('replaced', 0)} zero solutions replaced from neighbours, "
            f"{accuracy['pores_left_unindexed']} of {accuracy['pores']} pore pixels left unindexed; "
            f"{pc_text}"
            f"{grain_map.summary['n_grains']} grains (truth {truth_grains}), mean width "
            f"{grain_map.summary['mean_width_um']:.1f} um; "
            f"{result.dictionary_size} dictionary orientations; "
            f"{result.timings['total']:.1f} s; results in {Path(out).resolve()}")
