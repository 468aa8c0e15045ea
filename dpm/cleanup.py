"""Zero solutions: find them, and re-index those that diffract from their neighbours.

Step 4 of the protocol: a pixel whose pattern could not be indexed (a *zero
solution*) is compared with its neighbours; where its band contrast shows
that it diffracts (above 10 on the 0–255 scale) it takes a neighbour's
solution, and where it does not (pores, voids) it stays unindexed.

Zero solutions
--------------
A pixel is a zero solution when its pattern is unreadable (constant) or its
refined NCC is below the zero-solution threshold (:func:`zero_solution_threshold`).

Re-matching against the neighbours
----------------------------------
For a zero solution with band contrast above the threshold and at least one
indexed neighbour, the refined orientations of its indexed neighbours are the
candidates. The NCC of the pixel's own pattern is evaluated at every
candidate (one batched call of the refinement kernel for all pixels of a
pass), the candidates are ranked by it (ties by quaternion, so the order of
the neighbours is irrelevant), a candidate within ``RefineConfig.distinct_angle``
of a better one (under the crystal symmetry) is dropped, and
:func:`dpm.refine.refine` refines the rest, best first (at most
``RefineConfig.n_starts``). The pixel is replaced by the best refined
orientation when its NCC reaches the replacement threshold.

Passes: every decision of a pass is made from the state before the pass, so
the result does not depend on the order of the pixels. Replaced pixels count
as indexed in the next pass and can seed their own zero-solution neighbours.
A pass re-matches only the zero solutions whose candidates changed (a
neighbour was replaced in the previous pass; the others would see the same
candidates again), including pixels replaced already: one of those takes the
new solution only when it is another orientation (more than
``RefineConfig.distinct_angle`` away) with a higher NCC. So a pixel first
replaced from a single misindexed neighbour is corrected once its correctly
indexed neighbours are filled in. Passes stop when one changes nothing, or after
``max_passes``.

Why a second threshold
----------------------
Re-matching against a handful of neighbour orientations has a far lower noise
ceiling than a search through 10⁵ dictionary orientations: the best of 10⁵
noise correlations is much higher than the best of a few. A weak but
diffracting pattern can therefore be recognised by its neighbours'
orientation although it could not be indexed alone. The replacement threshold
is measured on the map (:func:`replace_zero_solutions`, ``replace_threshold``).

Map grids
---------
Pixels are in row-major map order, ``i = row · nx + col`` for a map of shape
``(ny, nx)``. ``"square"``: every pixel has 8 neighbours (edges and diagonals).
``"hexagonal"``: the .ang ``HexGrid`` layout, rows ``√3/2`` steps apart, every
odd row (1, 3, … counted from 0) shifted by half a step towards +x, and every
row holding ``nx`` pixels (a reader that pads the shorter rows of a file marks
the padding unreadable); every pixel has 6 neighbours: columns ``c ± 1`` of
its own row and, in the rows above and below, columns ``c - 1, c`` for a pixel
of an even row and ``c, c + 1`` for a pixel of an odd row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from dpm import backend
from dpm.detector import Detector, as_detector
from dpm.master import MasterPattern
from dpm.grains import Grid, align_to, check_grid, disorientation_angles, neighbours
from dpm.refine import (RefineConfig, RefinementMaster, _problem, _symmetry_quaternions,
                        correlation_terms, distinct_starts, refine, refinement_master)

if TYPE_CHECKING:
    from kikuchipy.detectors import EBSDDetector

log = logging.getLogger("dpm")

#: Percentile of the non-diffracting pixels' NCC that a threshold is set to.
NOISE_PERCENTILE = 99.0
#: Non-diffracting pixels needed to measure a threshold from them.
MIN_NOISE_PIXELS = 20
#: Histogram bins of Otsu's threshold.
OTSU_BINS = 256

@dataclass(frozen=True)
class ZeroSolutionConfig:
    """Options of :func:`replace_zero_solutions`.

    Attributes
    ----------
    threshold
        Refined NCC below which a pixel is a zero solution; None derives it
        from the map (:func:`zero_solution_threshold`).
    band_contrast_threshold
        Band contrast (0–255) at or below which a pixel does not diffract
        (pores, voids): it is never replaced.
    replace_threshold
        Refined NCC a re-matched pixel must reach to be replaced; None
        measures it on the map (see :func:`replace_zero_solutions`).
    max_passes
        Passes at most (each can seed the next).
    grid
        ``"square"`` (8 neighbours) or ``"hexagonal"`` (6; the .ang HexGrid
        layout, see the module notes).
    """

    threshold: float | None = None
    band_contrast_threshold: float = 10.0
    replace_threshold: float | None = None
    max_passes: int = 20
    grid: Grid = "square"

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if self.max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, got {self.max_passes}")
        for name in ("threshold", "replace_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is an NCC and must be in [-1, 1] or None, got {value}")


@dataclass(frozen=True, eq=False)
class ZeroSolutionResult:
    """Orientations after zero-solution replacement (host arrays, row-major map order).

    Attributes
    ----------
    quaternions : (n, 4) float64
        Orientations ``(a, b, c, d)``: the input ones, and the re-matched ones
        where ``replaced``.
    scores : (n,) float32
        Refined NCC: the input one, and the re-matched one where ``replaced``.
    indexed : (n,) bool
        False at zero solutions left unindexed (their orientation is meaningless).
    replaced : (n,) bool
        Zero solutions re-indexed from their neighbours (h5oina's "Replaced").
    threshold
        NCC below which a pixel was a zero solution.
    replace_threshold
        NCC a re-matched pixel had to reach.
    passes
        Passes that re-matched at least one pixel.
    n_zero_solutions
        Zero solutions before replacement.
    n_replaced
        Zero solutions replaced.
    """

    quaternions: np.ndarray
    scores: np.ndarray
    indexed: np.ndarray
    replaced: np.ndarray
    threshold: float
    replace_threshold: float
    passes: int
    n_zero_solutions: int
    n_replaced: int


def otsu_threshold(values: Any, nbins: int = OTSU_BINS) -> float:
    """Otsu's threshold of a set of values, placed in the gap between the two classes.

    The values are binned into ``nbins`` equal bins between their minimum and
    maximum; the split between bins ``k`` and ``k + 1`` that maximises the
    between-class variance ``w₀ w₁ (μ₀ - μ₁)²`` of the binned values (bin
    centres, as :func:`skimage.filters.threshold_otsu`) is chosen, the first
    one where several tie. The threshold is halfway between the largest value
    below the split and the smallest above it, so ``values < threshold`` is
    exactly the lower class.

    Parameters
    ----------
    values : array
        Any shape; non-finite values are ignored.
    nbins
        Histogram bins.

    Returns
    -------
    float
        The threshold; the value itself when all values are equal.

    Examples
    --------
    >>> round(otsu_threshold([0.01, 0.02, 0.03, 0.30, 0.32]), 3)
    0.165
    """
    v = np.asarray(backend.to_host(values), dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("Otsu's threshold needs at least one finite value, got none")
    if nbins < 2:
        raise ValueError(f"nbins must be at least 2, got {nbins}")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts)[:-1].astype(np.float64)       # bins 0..k (bin 0 holds the minimum)
    w1 = v.size - w0                                      # bins k+1.. (the last holds the maximum)
    s0 = np.cumsum(counts * centres)[:-1]
    between = w0 * w1 * (s0 / w0 - (np.dot(counts, centres) - s0) / w1) ** 2
    split = edges[int(np.argmax(between)) + 1]
    below, above = v[v < split], v[v >= split]
    return float(0.5 * (below.max() + above.min()))


def zero_solution_threshold(scores: Any, readable: Any, band_contrast: Any,
                            bc_threshold: float = 10.0) -> float:
    """The refined NCC below which a pixel of this map is a zero solution.

    Rule: the NCC that non-diffracting patterns reach in this very map. When
    at least :data:`MIN_NOISE_PIXELS` (20) readable pixels have band contrast
    ``≤ bc_threshold`` (pores, voids), the threshold is the
    :data:`NOISE_PERCENTILE` (99th) percentile of their refined NCC (linear
    interpolation, :func:`numpy.percentile`). Otherwise it is Otsu's
    threshold (:func:`otsu_threshold`) of the refined NCC of all readable
    pixels, which separates the failed matches from the indexed ones.

    Parameters
    ----------
    scores : (n,) array
        Refined NCC of every pixel.
    readable : (n,) bool array
        False for unreadable (constant) patterns, which are left out.
    band_contrast : (n,) array
        Band contrast on the 0–255 scale.
    bc_threshold
        Band contrast at or below which a pattern does not diffract.

    Returns
    -------
    float
    """
    s = np.asarray(backend.to_host(scores), dtype=np.float64).ravel()
    ok = np.asarray(backend.to_host(readable), dtype=bool).ravel()
    bc = np.asarray(backend.to_host(band_contrast), dtype=np.float64).ravel()
    if not s.shape == ok.shape == bc.shape:
        raise ValueError(f"scores, readable and band_contrast must have one value per pixel, got "
                         f"{s.shape}, {ok.shape} and {bc.shape}")
    if not ok.any():
        raise ValueError("no readable pixel: the zero-solution threshold is undefined")
    dark = ok & (bc <= bc_threshold)
    if dark.sum() >= MIN_NOISE_PIXELS:
        return float(np.percentile(s[dark], NOISE_PERCENTILE))
    return otsu_threshold(s[ok])


def _touches(table: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(n,) bool: which pixels have at least one neighbour in the (n,) mask ``pixels``."""
    present = table >= 0
    return (present & pixels[np.where(present, table, 0)]).any(axis=1)


def _rematch(patterns: Any, rmaster: RefinementMaster, detector: Detector,
             mask: np.ndarray | None, pixels: np.ndarray, quaternions: np.ndarray,
             indexed: np.ndarray, table: np.ndarray, symmetry: np.ndarray,
             refine_config: RefineConfig, batch: int,
             pcs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-match ``pixels`` against their indexed neighbours' orientations, ``batch`` at a time.

    Only the patterns of ``pixels`` are read (``patterns[pixels]``), so
    ``patterns`` may be any row source that fancy indexing reads, e.g. one
    that re-reads them from the pattern file.

    Returns the best refined quaternions (m, 4) and their NCC (m,), host arrays.
    """
    q_out = np.zeros((len(pixels), 4))
    s_out = np.zeros(len(pixels), dtype=np.float32)
    for lo in range(0, len(pixels), batch):
        part = slice(lo, lo + batch)
        q_out[part], s_out[part] = _rematch_batch(
            patterns, rmaster, detector, mask, pixels[part], quaternions, indexed, table,
            symmetry, refine_config, None if pcs is None else pcs[pixels[part]])
    return q_out, s_out


def _rematch_batch(patterns: Any, rmaster: RefinementMaster, detector: Detector,
                   mask: np.ndarray | None, pixels: np.ndarray, quaternions: np.ndarray,
                   indexed: np.ndarray, table: np.ndarray, symmetry: np.ndarray,
                   refine_config: RefineConfig,
                   pcs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One batch of :func:`_rematch`; ``pcs`` (m, 3) the pixels' own PCs, or None."""
    rows = patterns[pixels]
    problem = _problem(rows, rmaster, detector, mask)
    xp = problem.xp
    nb = table[pixels]                                           # (m, 8)
    ok = nb >= 0
    ok[ok] = indexed[nb[ok]]
    cand = quaternions[np.where(ok, nb, 0)]                      # (m, 8, 4)
    # NCC of each pixel's pattern at each candidate: one kernel call.
    item = np.broadcast_to(np.arange(len(pixels))[:, None], ok.shape)[ok].astype(np.int32)
    own = (np.tile(np.asarray(detector.pc, dtype=np.float64), (len(pixels), 1)) if pcs is None
           else pcs)
    sums = problem.sums(xp.asarray(item), xp.asarray(cand[ok]), xp.asarray(own[item]), 3)
    ncc = np.full(ok.shape, -np.inf)
    ncc[ok] = backend.to_host(correlation_terms(sums, problem.npix)[0])
    # Best first; ties broken by the quaternion so the order of neighbours is irrelevant.
    order = np.lexsort((cand[..., 3], cand[..., 2], cand[..., 1], cand[..., 0], -ncc), axis=-1)
    cand = np.take_along_axis(cand, order[..., None], axis=1)
    ok = np.take_along_axis(ok, order, axis=1)
    keep = distinct_starts(cand, symmetry, refine_config.distinct_angle) & ok
    # Kept candidates to the front (in rank order); pad with the best, which refine drops
    # again as a duplicate.
    front = np.argsort(~keep, axis=1, kind="stable")
    width = int(keep.sum(axis=1).max())
    starts = np.take_along_axis(cand, front[:, :width, None], axis=1)
    starts = np.where(np.arange(width)[None, :, None] < keep.sum(axis=1)[:, None, None],
                      starts, starts[:, :1])
    result = refine(rows, rmaster, detector, starts, mask=mask, pcs=pcs, config=refine_config)
    return result.quaternions, result.scores


def replace_zero_solutions(
    patterns: Any,
    quaternions: Any,
    scores: Any,
    readable: Any,
    band_contrast: Any,
    map_shape: tuple[int, int],
    master: MasterPattern | RefinementMaster,
    detector: Detector | EBSDDetector,
    *,
    mask: np.ndarray | None = None,
    config: ZeroSolutionConfig = ZeroSolutionConfig(),
    refine_config: RefineConfig = RefineConfig(),
    pcs: np.ndarray | None = None,
) -> ZeroSolutionResult:
    """Find zero solutions and re-index the diffracting ones from their neighbours.

    See the module notes for the procedure. Unreadable patterns (zero rows)
    are zero solutions that are never replaced; zero solutions with band
    contrast ``≤ config.band_contrast_threshold`` are never replaced either.

    Replacement threshold (when ``config.replace_threshold`` is None): the
    NCC that a *non-diffracting* pattern reaches by the same re-match, measured
    on this map. The readable zero solutions with band contrast at or below
    the threshold that have an indexed neighbour (pores next to grains) are
    re-matched against their neighbours exactly as the fill candidates are,
    and the threshold is the :data:`NOISE_PERCENTILE` (99th) percentile of
    their refined NCC. With fewer than :data:`MIN_NOISE_PIXELS` (20) such
    pixels, the zero-solution threshold is used.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Experimental rows as :func:`dpm.refine.refine` takes them (zero mean,
        unit norm over the masked pixels; zero rows where unreadable), NumPy
        or CuPy; the re-matching runs on their device. Only the rows of
        re-matched pixels are read, by fancy indexing, so any row source with
        ``shape`` and ``__getitem__`` does (e.g. :class:`dpm.chunks.PatternRows`,
        which re-reads them from the pattern file); batches of rows are sized
        from ``refine_config.memory_budget``.
    quaternions : (n, 4) array
        Refined orientations ``(a, b, c, d)`` (orix convention, sample to
        crystal), host.
    scores : (n,) array
        Their refined NCC, host.
    readable : (n,) bool array
        False for unreadable patterns.
    band_contrast : (n,) array
        Band contrast of every pattern, 0–255.
    map_shape
        ``(ny, nx)`` with ``ny · nx = n``; pixels in row-major order.
    master
        Master pattern, or the :class:`~dpm.refine.RefinementMaster` the map
        was refined with (prepared here from a master pattern otherwise).
    detector
        Detector geometry and PC (Bruker convention) the map was refined with.
    mask : (sy, sx) bool array, optional
        Signal mask the rows were taken over.
    config
        Thresholds, passes and map grid.
    refine_config
        Refinement options of the re-match; ``distinct_angle`` also sets which
        neighbour orientations count as distinct, ``n_starts`` how many of them
        are refined. ``pattern_centre`` must be ``"fixed"`` or ``"pattern"``
        (fit a shared PC beforehand and pass it in ``detector``).
    pcs : (n, 3) float array, optional
        Every pixel's own PC (Bruker), e.g. of the map's PC field
        (:mod:`dpm.calibration`); the detector's PC for all when None.

    Returns
    -------
    ZeroSolutionResult
    """
    if refine_config.pattern_centre == "shared":
        raise ValueError("refine_config.pattern_centre='shared' would refit the map's pattern "
                         "centre on the zero solutions; pass the fitted PC in the detector and "
                         "use pattern_centre='fixed'")
    det = as_detector(detector)
    rmaster = master if isinstance(master, RefinementMaster) else refinement_master(master, det)
    ny, nx = (int(s) for s in map_shape)
    n = ny * nx
    q = np.asarray(backend.to_host(quaternions), dtype=np.float64)
    s = np.asarray(backend.to_host(scores), dtype=np.float32).ravel()
    ok = np.asarray(backend.to_host(readable), dtype=bool).ravel()
    bc = np.asarray(backend.to_host(band_contrast), dtype=np.float64).ravel()
    if patterns.ndim != 2 or patterns.shape[0] != n:
        raise ValueError(f"patterns must have shape (n, npix) with n = {n} for the map "
                         f"{(ny, nx)}, got {tuple(patterns.shape)}")
    if q.shape != (n, 4):
        raise ValueError(f"quaternions must have shape ({n}, 4), got {q.shape}")
    own_pcs = None if pcs is None else np.asarray(pcs, dtype=np.float64)
    if own_pcs is not None and own_pcs.shape != (n, 3):
        raise ValueError(f"pcs must have shape ({n}, 3), got {own_pcs.shape}")
    for name, value in (("scores", s), ("readable", ok), ("band_contrast", bc)):
        if value.shape != (n,):
            raise ValueError(f"{name} must have one value per map pixel ({n}), got {value.shape}")

    bc_threshold = config.band_contrast_threshold
    threshold = (config.threshold if config.threshold is not None
                 else zero_solution_threshold(s, ok, bc, bc_threshold))
    zero = ~ok | (s < threshold)
    indexed = ~zero
    diffracting = bc > bc_threshold
    table = neighbours((ny, nx), config.grid)
    symmetry = _symmetry_quaternions(rmaster.master)
    budget = backend.memory_budget(backend.namespace(patterns), refine_config.memory_budget)
    # A batch's rows, plus up to 8 refinement starts per pixel.
    batch = max(1, (budget // 2) // (4 * int(patterns.shape[1]) * 9))
    refine_config = replace(refine_config, memory_budget=max(1, budget // 2))

    def rematch(pixels: np.ndarray, state_q: np.ndarray,
                state_indexed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _rematch(patterns, rmaster, det, mask, pixels, state_q, state_indexed,
                        table, symmetry, refine_config, batch, own_pcs)

    replace_threshold = config.replace_threshold
    if replace_threshold is None:
        dark = np.flatnonzero(zero & ok & ~diffracting & _touches(table, indexed))
        if len(dark) >= MIN_NOISE_PIXELS:
            _, dark_scores = rematch(dark, q, indexed)
            replace_threshold = float(np.percentile(dark_scores, NOISE_PERCENTILE))
        else:
            replace_threshold = float(threshold)
            log.info("%d non-diffracting zero solutions next to indexed pixels (fewer than %d): "
                     "the replacement threshold is the zero-solution threshold",
                     len(dark), MIN_NOISE_PIXELS)

    q_out, s_out = q.copy(), s.copy()
    replaced = np.zeros(n, dtype=bool)
    fillable = zero & ok & diffracting
    seeds = indexed          # pixels whose solution changed in the last pass
    passes = 0
    for _ in range(config.max_passes):
        todo = np.flatnonzero(fillable & _touches(table, seeds))
        if len(todo) == 0:
            break
        new_q, new_s = rematch(todo, q_out, indexed)
        passes += 1
        # A replaced pixel changes only for another orientation (not the same maximum
        # refined again) with a higher NCC.
        other = distinct_starts(np.stack([q_out[todo], new_q], axis=1), symmetry,
                                refine_config.distinct_angle)[:, 1]
        accept = (new_s >= replace_threshold) & (~replaced[todo] | (other & (new_s > s_out[todo])))
        hit = todo[accept]
        log.debug("zero solutions, pass %d: %d re-matched, %d replaced", passes, len(todo),
                  len(hit))
        if len(hit) == 0:
            break
        q_out[hit], s_out[hit] = new_q[accept], new_s[accept]
        replaced[hit] = True
        indexed = indexed | replaced
        seeds = np.zeros(n, dtype=bool)
        seeds[hit] = True
    log.info("zero solutions: %d (NCC threshold %.4f), %d replaced in %d passes (replacement "
             "threshold %.4f), %d left unindexed", int(zero.sum()), threshold, int(replaced.sum()),
             passes, replace_threshold, int((~indexed).sum()))
    return ZeroSolutionResult(
        quaternions=q_out, scores=s_out, indexed=indexed, replaced=replaced,
        threshold=float(threshold), replace_threshold=float(replace_threshold), passes=passes,
        n_zero_solutions=int(zero.sum()), n_replaced=int(replaced.sum()))


# ------------------------------------------------------------------ map cleanup

@dataclass(frozen=True)
class MapCleanupConfig:
    """Orientation-map cleanup after the zero-solution replacement, in the protocol's order.

    Attributes
    ----------
    wild_spikes
        Remove wild spikes first (:func:`remove_wild_spikes`).
    fill_ladder
        Neighbour counts for the zero-solution fill (:func:`fill_zero_solutions`),
        each run to completion in turn (the protocol: 6, then 5); empty = no fill.
    tolerance
        Degrees: two orientations *agree* when their disorientation is below it.
    grid
        ``"square"`` or ``"hexagonal"`` (see the module notes).
    max_passes
        Passes at most per fill level.
    """

    wild_spikes: bool = True
    fill_ladder: tuple[int, ...] = (6, 5)
    tolerance: float = 5.0
    grid: Grid = "square"
    max_passes: int = 100

    def __post_init__(self) -> None:
        check_grid(self.grid)
        most = 8 if self.grid == "square" else 6
        object.__setattr__(self, "fill_ladder", tuple(int(k) for k in self.fill_ladder))
        if any(not 1 <= k <= most for k in self.fill_ladder):
            raise ValueError(f"fill_ladder counts must be in 1..{most} on a {self.grid} grid, "
                             f"got {self.fill_ladder}")
        if not 0 < self.tolerance < 62.8:
            raise ValueError(f"tolerance must be in (0, 62.8) degrees, got {self.tolerance}")
        if self.max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, got {self.max_passes}")


@dataclass(frozen=True, eq=False)
class MapCleanupResult:
    """Orientations after :func:`clean_map` (host arrays, row-major map order).

    Attributes
    ----------
    quaternions : (n, 4) float64
    indexed : (n,) bool
    despiked : (n,) bool
        Wild spikes replaced by their neighbours' mean orientation.
    filled : (n,) bool
        Zero solutions filled from agreeing neighbours.
    changed : dict
        Pixels changed per step (``"wild_spikes"``, ``"fill_6"``, ``"fill_5"``, ...).
    """

    quaternions: np.ndarray
    indexed: np.ndarray
    despiked: np.ndarray
    filled: np.ndarray
    changed: dict[str, int]


def _pairwise_agreement(q: np.ndarray, nb: np.ndarray, valid: np.ndarray, point_group: Any,
                        tolerance: float) -> np.ndarray:
    """(c, k, k) bool: neighbours ``j`` and ``l`` of each pixel are both valid and agree."""
    c, k = nb.shape
    j, l = np.triu_indices(k, 1)
    both = valid[:, j] & valid[:, l]
    agree = np.zeros((c, k, k), dtype=bool)
    rows, pair = np.nonzero(both)
    if rows.size:
        close = disorientation_angles(q[nb[rows, j[pair]]], q[nb[rows, l[pair]]],
                                      point_group) < tolerance
        agree[rows[close], j[pair][close], l[pair][close]] = True
        agree[rows[close], l[pair][close], j[pair][close]] = True
    agree[:, np.arange(k), np.arange(k)] = valid
    return agree


def _mean_of(q: np.ndarray, nb: np.ndarray, weights: np.ndarray, ref: np.ndarray,
             point_group: Any) -> np.ndarray:
    """Mean orientation of the weighted neighbours of each pixel, aligned to ``ref`` first."""
    c, k = nb.shape
    ops = point_group.laue.proper_subgroup.data
    aligned = align_to(q[np.maximum(nb, 0)].reshape(-1, 4), np.repeat(ref, k, axis=0), ops)
    total = (aligned.reshape(c, k, 4) * weights[..., None]).sum(axis=1)
    total /= np.linalg.norm(total, axis=1, keepdims=True)
    return total * np.where(total[:, :1] < 0, -1.0, 1.0)


def remove_wild_spikes(quaternions: np.ndarray, indexed: np.ndarray, map_shape: tuple[int, int],
                       point_group: Any, *, tolerance: float = 5.0, grid: Grid = "square",
                       min_neighbours: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Replace single pixels that differ from every one of their neighbours.

    A wild spike is an indexed pixel with at least ``min_neighbours`` indexed
    neighbours that differs from each of them by more than ``tolerance``
    (AZtecCrystal/Channel5's rule; unindexed neighbours and the map edge are
    ignored). It takes the mean orientation of the largest set of its
    neighbours that agree with one of them (the rule of
    :func:`fill_zero_solutions`; of equal sets, the one agreeing with the
    first neighbour in the order of :func:`dpm.grains.neighbours`), provided
    that set holds at least half of its indexed neighbours: inside a grain
    that is every neighbour; on a boundary, beside a pore or next to another
    spike, the larger side. Pixels whose neighbours scatter (no half agrees)
    are left alone. Decisions use the map before any change, so the result
    does not depend on the scan order.

    Returns
    -------
    quaternions : (n, 4) array (a new array)
    spikes : (n,) bool, the pixels replaced
    """
    if min_neighbours < 1:
        raise ValueError(f"min_neighbours must be at least 1, got {min_neighbours}")
    q = np.asarray(quaternions, dtype=np.float64).copy()
    indexed = np.asarray(indexed, dtype=bool)
    table = neighbours(map_shape, grid)
    valid = (table >= 0) & indexed[np.maximum(table, 0)]
    cand = np.flatnonzero(indexed & (valid.sum(axis=1) >= min_neighbours))
    spikes = np.zeros(len(q), dtype=bool)
    nb, ok = table[cand], valid[cand]
    rows, cols = np.nonzero(ok)
    far = np.ones(ok.shape, dtype=bool)
    far[rows, cols] = disorientation_angles(q[cand[rows]], q[nb[rows, cols]],
                                            point_group) > tolerance
    differs = far.all(axis=1)
    cand, nb, ok = cand[differs], nb[differs], ok[differs]
    if cand.size == 0:
        return q, spikes
    members, best = _largest_agreeing(q, nb, ok, point_group, tolerance)
    take = 2 * members.sum(axis=1) >= ok.sum(axis=1)
    cand, nb, members, best = cand[take], nb[take], members[take], best[take]
    if cand.size:
        q[cand] = _mean_of(q, nb, members.astype(float), q[nb[np.arange(len(cand)), best]],
                           point_group)
        spikes[cand] = True
    return q, spikes


def _largest_agreeing(q: np.ndarray, nb: np.ndarray, valid: np.ndarray, point_group: Any,
                      tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """The largest set of each pixel's valid neighbours agreeing with one of them.

    Returns ``members`` (c, k) bool and the index ``best`` (c,) of the neighbour
    the set agrees with (the first of the largest sets).
    """
    agree = _pairwise_agreement(q, nb, valid, point_group, tolerance)
    best = np.argmax(agree.sum(axis=2), axis=1)
    return agree[np.arange(len(nb)), best], best


def fill_zero_solutions(quaternions: np.ndarray, indexed: np.ndarray, fillable: np.ndarray,
                        map_shape: tuple[int, int], point_group: Any, *, min_neighbours: int,
                        tolerance: float = 5.0, grid: Grid = "square",
                        max_passes: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill unindexed pixels from at least ``min_neighbours`` agreeing indexed neighbours.

    For an unindexed, fillable pixel, the largest set of its indexed
    neighbours that agree with one of them (within ``tolerance``) is found; if
    it holds at least ``min_neighbours`` pixels, the pixel takes their mean
    orientation. Every decision of a pass is made before any is applied (the
    result does not depend on the scan order); passes repeat until none fills
    a pixel ("to completion") or ``max_passes``.

    Parameters
    ----------
    fillable : (n,) bool
        Pixels that may be filled (e.g. band contrast above 10: pores stay empty).

    Returns
    -------
    quaternions, indexed, filled : new arrays; ``filled`` marks the pixels filled.
    """
    q = np.asarray(quaternions, dtype=np.float64).copy()
    indexed = np.asarray(indexed, dtype=bool).copy()
    fillable = np.asarray(fillable, dtype=bool)
    filled = np.zeros(len(q), dtype=bool)
    table = neighbours(map_shape, grid)
    for _ in range(max_passes):
        valid = (table >= 0) & indexed[np.maximum(table, 0)]
        cand = np.flatnonzero(~indexed & fillable & (valid.sum(axis=1) >= min_neighbours))
        if cand.size == 0:
            break
        nb, ok = table[cand], valid[cand]
        members, best = _largest_agreeing(q, nb, ok, point_group, tolerance)
        take = members.sum(axis=1) >= min_neighbours
        if not take.any():
            break
        cand, nb, members, best = cand[take], nb[take], members[take], best[take]
        q[cand] = _mean_of(q, nb, members.astype(float), q[nb[np.arange(len(cand)), best]],
                           point_group)
        indexed[cand] = True
        filled[cand] = True
    return q, indexed, filled


def clean_map(quaternions: np.ndarray, indexed: np.ndarray, fillable: np.ndarray,
              map_shape: tuple[int, int], point_group: Any,
              config: MapCleanupConfig = MapCleanupConfig()) -> MapCleanupResult:
    """Wild-spike removal, then zero-solution fill down the neighbour ladder (protocol order)."""
    q = np.asarray(quaternions, dtype=np.float64)
    indexed = np.asarray(indexed, dtype=bool)
    changed: dict[str, int] = {}
    despiked = np.zeros(len(q), dtype=bool)
    if config.wild_spikes:
        q, despiked = remove_wild_spikes(q, indexed, map_shape, point_group,
                                         tolerance=config.tolerance, grid=config.grid)
        changed["wild_spikes"] = int(despiked.sum())
    filled = np.zeros(len(q), dtype=bool)
    for k in config.fill_ladder:
        q, indexed, new = fill_zero_solutions(q, indexed, fillable, map_shape, point_group,
                                              min_neighbours=k, tolerance=config.tolerance,
                                              grid=config.grid, max_passes=config.max_passes)
        changed[f"fill_{k}"] = int(new.sum())
        filled |= new
    log.info("map cleanup: %s", changed)
    return MapCleanupResult(quaternions=q, indexed=indexed, despiked=despiked, filled=filled,
                            changed=changed)
