"""Data for the refinement benches: a synthetic Li map, its truth and dictionary start.

:func:`build_refine_data` draws a 20 x 20 synthetic Li map (60 x 60 px raw
patterns; background, Poisson noise, blur, 3% pores) from the shipped 20 kV
dynamical master pattern, with the PC of ``bench/test_bench_index.py``, and
indexes it with :func:`dpm.index` (default :class:`~dpm.pipeline.IndexConfig`:
2° dictionary filtered by pixel integration). The top-1 dictionary match of
every pixel is the starting orientation every refiner gets.

:func:`kikuchipy_inputs` turns that into what kikuchipy's
``EBSD.refine_orientation`` takes, with the preprocessing dpm uses (mean
pattern of the stack subtracted as the static background).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpm.detector import Detector
from dpm.master import MasterPattern
from dpm.synthetic import SyntheticConfig, SyntheticMap, synthetic_map

KV = 20.0
PC = (0.49, 0.27, 0.58)  # as bench/test_bench_index.py
DETECTOR_SHAPE = (60, 60)
MAP_SHAPE = (20, 20)
SEED = 42


@dataclass(frozen=True, eq=False)
class RefineData:
    """A synthetic map, its truth and the dictionary start for refinement.

    Attributes
    ----------
    smap
        The synthetic map: raw ``(ny, nx, sy, sx)`` uint8 patterns, true
        quaternions ``(n, 4)`` and the ``diffracting`` mask ``(ny, nx)``.
    master
        The dpm master pattern the patterns were projected from (unfiltered).
    detector
        The dpm detector the patterns were projected with.
    start : (n, 4) float64 array
        Top-1 dictionary quaternion of every pixel (row-major map order).
    start_topk : (n, keep, 4) float64 array
        The best ``keep`` dictionary matches of every pixel, best first.
    start_scores : (n,) float32 array
        Its NCC score against the filtered dictionary.
    dictionary_size
        Orientations in the dictionary.
    timings
        Seconds: ``synthetic`` (drawing the map) and ``index`` (``dpm.index``).
    """

    smap: SyntheticMap
    master: MasterPattern
    detector: Detector
    start: np.ndarray
    start_topk: np.ndarray
    start_scores: np.ndarray
    dictionary_size: int
    timings: dict[str, float]

    @property
    def n(self) -> int:
        return int(self.start.shape[0])

    @property
    def truth(self) -> np.ndarray:
        return self.smap.quaternions

    @property
    def diffracting(self) -> np.ndarray:
        """(n,) bool: pixels outside pores, the only ones accuracy figures use."""
        return self.smap.diffracting.ravel()

    def accuracy(self, quaternions: np.ndarray) -> dict[str, float]:
        """Disorientation (degrees, m-3m) to the truth over diffracting pixels."""
        return disorientation_stats(quaternions, self.truth, self.master.phase.point_group,
                                    self.diffracting)


def disorientation_stats(q: np.ndarray, truth: np.ndarray, point_group,
                         mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean, median, 95th percentile and max disorientation in degrees over ``mask``,
    how many pixels are off by more than 5° (wrong dictionary matches), the fraction
    within 2° and the mean over those."""
    from orix.quaternion import Orientation

    q = np.asarray(q, dtype=np.float64).reshape(-1, 4)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    if mask is not None:
        q, truth = q[mask], truth[mask]
    angles = np.asarray(Orientation(q, symmetry=point_group).angle_with(
        Orientation(truth, symmetry=point_group), degrees=True))
    close = angles <= 2.0
    return {"mean_deg": float(angles.mean()), "median_deg": float(np.median(angles)),
            "p95_deg": float(np.percentile(angles, 95)), "max_deg": float(angles.max()),
            "over_5deg": int((angles > 5).sum()), "within_2deg": float(close.mean()),
            "mean_within_2deg": float(angles[close].mean()) if close.any() else float("nan")}


def li_map(map_shape: tuple[int, int], seed: int, pc_drift: float = 0.0,
           pc: tuple[float, float, float] = PC) -> tuple[MasterPattern, Detector, SyntheticMap]:
    """The benches' synthetic Li map: the shipped 20 kV dynamical master pattern, the
    detector of ``pc`` (60 x 60 px) and :func:`dpm.synthetic.synthetic_map` with its
    default noise, blur and pores (and ``pc_drift``)."""
    from dpm.master.shipped import shipped_master_pattern

    master = shipped_master_pattern("li", KV)
    if master is None:
        raise RuntimeError("the shipped Li 20 kV master pattern is missing")
    detector = Detector(shape=DETECTOR_SHAPE, pc=pc)
    smap = synthetic_map(master, detector, SyntheticConfig(map_shape=map_shape, seed=seed,
                                                           pc_drift=pc_drift))
    return master, detector, smap


def build_refine_data(map_shape: tuple[int, int] = MAP_SHAPE, seed: int = SEED) -> RefineData:
    """Draw the synthetic Li map and index it with the default ``dpm.index``."""
    from dpm.pipeline import IndexConfig, index

    t = time.perf_counter()
    master, detector, smap = li_map(map_shape, seed)
    t_synthetic = time.perf_counter() - t
    t = time.perf_counter()
    result = index(smap.patterns, detector=detector, master_pattern=master,
                   config=IndexConfig(kv=KV, device="cpu", refine=False))
    t_index = time.perf_counter() - t
    n = smap.quaternions.shape[0]
    topk = result.xmap.rotations.data.reshape(n, -1, 4).copy()
    return RefineData(smap=smap, master=master, detector=detector, start=topk[:, 0].copy(),
                      start_topk=topk,
                      start_scores=result.scores.ravel().copy(),
                      dictionary_size=result.dictionary_size,
                      timings={"synthetic": t_synthetic, "index": t_index})


def background_corrected(patterns: np.ndarray) -> np.ndarray:
    """Raw patterns minus the mean pattern of the stack, float32, same shape.

    As ``dpm.pipeline.prepare_stack`` with the default preprocessing (static
    background = mean of the stack, subtracted); the synthetic map has no
    constant patterns, which that mean would leave out.
    """
    from dpm.preprocess import mean_pattern, remove_static_background

    flat = patterns.reshape(-1, *patterns.shape[-2:])
    if not (np.ptp(flat.reshape(len(flat), -1), axis=1) > 0).all():
        raise ValueError("constant patterns: use dpm.pipeline.prepare_stack's mean instead")
    background = mean_pattern([flat])
    out = remove_static_background(flat.astype(np.float32), background, "subtract")
    return np.asarray(out, dtype=np.float32).reshape(patterns.shape)


def kikuchipy_index(master: MasterPattern, detector: Detector, smap: SyntheticMap,
                    resolution: float, folder: str | Path) -> tuple[Any, dict[str, float], int]:
    """kikuchipy's dictionary indexing and refinement of a synthetic map, timed by stage.

    The same master pattern (through an EMsoft file in ``folder``), detector (one PC)
    and static-background correction as dpm: ``get_sample_fundamental`` (cubochoric,
    ``resolution`` degrees), ``EBSDMasterPattern.get_patterns`` (the whole dictionary
    in memory), ``EBSD.dictionary_indexing`` (NCC, top 1) and
    ``EBSD.refine_orientation`` (its default, SciPy Nelder–Mead).

    Returns
    -------
    refined
        orix ``CrystalMap`` of the refined orientations.
    stages
        Wall seconds of ``preprocess``, ``sampling``, ``dictionary``, ``matching``,
        ``refinement`` and ``total``.
    size
        Dictionary orientations.
    """
    import contextlib
    import io

    import kikuchipy as kp
    from orix.crystal_map import CrystalMap
    from orix.quaternion import Rotation
    from orix.sampling import get_sample_fundamental

    from dpm.io.emsoft import write_master_pattern

    path = write_master_pattern(master, Path(folder) / "master_pattern.h5")
    mp = kp.load(path, projection="lambert", hemisphere="both", energy=master.energy)
    kp_detector = detector.to_kikuchipy()
    stages: dict[str, float] = {}

    def timed(name, call):
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            out = call()
        stages[name] = time.perf_counter() - t
        return out

    def best_match(xmap):
        """The (n, 1) rotations of ``dictionary_indexing(keep_n=1)`` as one per point,
        which ``refine_orientation`` takes."""
        best = xmap.rotations.data.reshape(xmap.size, -1, 4)[:, 0]
        scores = np.asarray(xmap.prop["scores"]).reshape(xmap.size, -1)[:, 0]
        return CrystalMap(rotations=Rotation(best), phase_id=xmap.phase_id, x=xmap.x,
                          y=xmap.y, phase_list=xmap.phases, prop={"scores": scores},
                          scan_unit=xmap.scan_unit)

    t0 = time.perf_counter()
    signal = timed("preprocess", lambda: kp.signals.EBSD(background_corrected(smap.patterns)))
    for axis, name in zip(signal.axes_manager.navigation_axes, ("x", "y")):  # x first
        axis.name, axis.scale, axis.units = name, smap.step_size, "um"
    rotations = timed("sampling", lambda: get_sample_fundamental(
        resolution=resolution, point_group=mp.phase.point_group, method="cubochoric"))
    dictionary = timed("dictionary", lambda: mp.get_patterns(
        rotations, kp_detector, energy=master.energy, dtype_out=np.float32, compute=True,
        show_progressbar=False))
    xmap = timed("matching", lambda: best_match(signal.dictionary_indexing(dictionary,
                                                                            keep_n=1)))
    refined = timed("refinement", lambda: signal.refine_orientation(
        xmap, kp_detector, mp, energy=master.energy, compute=True))
    stages["total"] = time.perf_counter() - t0
    return refined, stages, rotations.size


@dataclass(frozen=True, eq=False)
class KikuchipyInputs:
    """What ``EBSD.refine_orientation`` takes: signal, master pattern, detector, start map."""

    signal: Any
    master_pattern: Any
    detector: Any
    xmap: Any


def kikuchipy_inputs(data: RefineData, folder: str | Path) -> KikuchipyInputs:
    """kikuchipy objects for the same map: the master pattern goes through an EMsoft file.

    The start map has one rotation per point (the dictionary's top-1) and the
    phase kikuchipy read from the master-pattern file, so its phase check passes.
    """
    import kikuchipy as kp
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    from dpm.io.emsoft import write_master_pattern

    path = write_master_pattern(data.master, Path(folder) / "li_20kv.h5")
    mp = kp.load(path, projection="lambert", hemisphere="both", energy=KV)
    signal = kp.signals.EBSD(background_corrected(data.smap.patterns))
    for axis, name in zip(signal.axes_manager.navigation_axes, ("x", "y")):  # hyperspy: x first
        axis.name, axis.scale, axis.units = name, data.smap.step_size, "um"
    ny, nx = data.smap.diffracting.shape
    y, x = np.divmod(np.arange(ny * nx), nx)
    xmap = CrystalMap(rotations=Rotation(data.start), phase_id=np.zeros(ny * nx, dtype=int),
                      x=x * data.smap.step_size, y=y * data.smap.step_size,
                      phase_list=PhaseList(mp.phase), prop={"scores": data.start_scores},
                      scan_unit="um")
    return KikuchipyInputs(signal=signal, master_pattern=mp, detector=data.detector.to_kikuchipy(),
                           xmap=xmap)
