"""Pseudo-symmetry cleanup: re-match grains that a pseudo-symmetry may have mis-indexed.

The protocol removes the pseudo-symmetry "60° about <111> for Laue group
m-3m, only after verifying that the raw patterns of the two candidates are
similar". A pseudo-symmetric mis-index and a real twin (Σ3, also 60° about
<111> in cubic metals) look alike in the orientation map: two grains in the
60° <111> relation. They differ in the patterns: across a mis-index the
patterns are those of one orientation, across a twin they are not. So no
orientation is changed by the map alone; each is changed only where the
pixel's own pattern correlates better with the other candidate.

The operator and its alternatives
---------------------------------
The pseudo-symmetry is a rotation ``m`` (axis and angle in the crystal
frame). An orientation ``o'`` is pseudo-symmetric to ``o`` when their
misorientation ``o' o⁻¹`` lies in ``G m G`` or ``G m⁻¹ G`` (``G`` the proper
rotations of the Laue group): ``o' ≡ m s o`` or ``m⁻¹ s o`` for some
``s ∈ G``, up to the symmetry acting on the left. Reduced modulo ``G`` these
are :func:`pseudo_symmetry_variants`: 4 for m-3m and 60° about <111> (the
rotations ``s`` that commute with ``m`` up to ``G``, the 3-fold axis along
the <111> and the three 2-fold <110> axes normal to it, 6 of the 24, leave
24 / 6 = 4 classes; ``m⁻¹ = m⁻² m`` with ``m² ∈ G`` adds none).

Procedure (one pass)
--------------------
1. Grains of the current map (:func:`dpm.grains.reconstruct_grains`,
   boundaries at ``high_angle``, the configured grid).
2. A high-angle pair of neighbouring pixels ``(p, q)`` is *pseudo-symmetric*
   when an alternative of ``p`` lies within ``tolerance`` of ``q``
   (disorientation, :func:`dpm.grains.disorientation_angles`); two grains
   are pseudo-symmetric neighbours when such a pair joins them.
3. Every pixel of a grain with a pseudo-symmetric neighbour grain gets, for
   each such neighbour, the alternative of its own orientation closest to
   that grain's mean orientation as a candidate (both sides of every such
   boundary are tested).
4. Re-match: the pixel's own pattern is refined (:func:`dpm.refine.refine`)
   from its current orientation and from its candidates (the best refined
   candidate is kept); the pixel takes the refined candidate only when its
   NCC exceeds the NCC refined from the current orientation by more than
   ``margin``, and the refined candidate is still another orientation (more
   than ``RefineConfig.distinct_angle`` from the current one).

Every decision of a pass is made before any is applied, so the result does
not depend on the order of the pixels. Passes repeat (re-grained) until one
changes nothing, or after ``max_passes``. A pixel is re-matched against each
of its alternatives at most once: a rejected alternative is not tried again,
and a changed pixel is not tried against the orientation it left (the same
comparison, reversed), so passes cannot oscillate.

Map grids as in :mod:`dpm.cleanup`: pixels in row-major map order
``i = row · nx + col``; ``"square"`` or ``"hexagonal"`` (the .ang HexGrid).

Other phases
------------
The operator is applied the same way to any Laue group, but the default
axis (<111>) is the protocol's, defined for m-3m only: for any other Laue
group the axis must be given (``PseudoSymmetryConfig.axis``), or a
ValueError says so. An operator that is a symmetry of the crystal (every
alternative is the orientation itself) is a ValueError too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from dpm import backend
from dpm.detector import Detector, as_detector
from dpm.grains import (CHUNK, GrainConfig, Grid, check_grid, disorientation_angles,
                        quaternion_conjugate, quaternion_multiply, reconstruct_grains)
from dpm.master import MasterPattern
from dpm.refine import (RefineConfig, RefinementMaster, _symmetry_quaternions, distinct_starts,
                        refine, refinement_master)

if TYPE_CHECKING:
    from kikuchipy.detectors import EBSDDetector
    from orix.quaternion import Symmetry

log = logging.getLogger("dpm")

#: Degrees: two operators closer than this (modulo the symmetry) are the same.
_SAME_ANGLE = 1e-3


@dataclass(frozen=True)
class PseudoSymmetryConfig:
    """Options of :func:`clean_pseudo_symmetry`.

    Attributes
    ----------
    axis
        Rotation axis of the pseudo-symmetry, a direction in the crystal's
        Cartesian frame (orix's; for cubic phases the same as ``[uvw]``),
        any non-zero length. None: <111>, the protocol's, for Laue group
        m-3m only.
    angle
        Rotation angle of the pseudo-symmetry in degrees, in (0, 180].
    tolerance
        Degrees: a neighbour within this disorientation of an alternative of
        a pixel is pseudo-symmetric to it. Below ``high_angle``.
    margin
        NCC by which a candidate must beat the current orientation, in [0, 1).
    high_angle
        Grain boundary threshold in degrees (as ``GrainConfig.high_angle``).
    grid
        ``"square"`` or ``"hexagonal"`` (see :mod:`dpm.cleanup`).
    max_passes
        Passes at most.
    """

    axis: tuple[float, float, float] | None = None
    angle: float = 60.0
    tolerance: float = 3.0
    margin: float = 0.0
    high_angle: float = 10.0
    grid: Grid = "square"
    max_passes: int = 10

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if self.axis is not None:
            axis = np.asarray(self.axis, dtype=np.float64)
            if axis.shape != (3,) or not np.isfinite(axis).all() or not np.linalg.norm(axis) > 0:
                raise ValueError(f"axis must be 3 finite numbers of non-zero length, got "
                                 f"{self.axis!r}")
            object.__setattr__(self, "axis", tuple(float(v) for v in axis))
        if not 0 < self.angle <= 180:
            raise ValueError(f"angle must be in (0, 180] degrees, got {self.angle}")
        if not 0 < self.high_angle <= 180:
            raise ValueError(f"high_angle must be in (0, 180] degrees, got {self.high_angle}")
        if not 0 < self.tolerance < self.high_angle:
            raise ValueError(f"tolerance must be in (0, high_angle = {self.high_angle}) degrees, "
                             f"got {self.tolerance}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin is an NCC difference and must be in [0, 1), got "
                             f"{self.margin}")
        if (isinstance(self.max_passes, bool) or not isinstance(self.max_passes, (int, np.integer))
                or self.max_passes < 1):
            raise ValueError(f"max_passes must be an integer of at least 1, got "
                             f"{self.max_passes!r}")


@dataclass(frozen=True, eq=False)
class PseudoSymmetryResult:
    """Orientations after :func:`clean_pseudo_symmetry` (host arrays, row-major map order).

    Attributes
    ----------
    quaternions : (n, 4) float64
        The input orientations ``(a, b, c, d)``, and the refined candidates where ``changed``.
    scores : (n,) float32
        The input NCC, and the refined candidates' NCC where ``changed``.
    changed : (n,) bool
        Pixels moved to a pseudo-symmetric alternative.
    operator : (4,) float64
        The pseudo-symmetry rotation ``m`` (crystal frame).
    n_alternatives
        Pseudo-symmetric alternatives of an orientation (4 for m-3m, 60° <111>).
    n_boundary_pairs
        Pseudo-symmetric neighbour pairs across grain boundaries in the input map.
    n_boundary_pairs_after
        The same in the output map (real twins, and pairs the patterns kept).
    n_tested
        Pixels re-matched at least once.
    n_changed
        Pixels changed.
    passes
        Passes that re-matched at least one pixel.
    """

    quaternions: np.ndarray
    scores: np.ndarray
    changed: np.ndarray
    operator: np.ndarray
    n_alternatives: int
    n_boundary_pairs: int
    n_boundary_pairs_after: int
    n_tested: int
    n_changed: int
    passes: int

    def summary(self) -> dict[str, int]:
        """The counts, keyed for ``summary.json``."""
        return {"pseudo_symmetry_boundary_pairs": self.n_boundary_pairs,
                "pseudo_symmetry_boundary_pairs_after": self.n_boundary_pairs_after,
                "pseudo_symmetry_tested": self.n_tested,
                "pseudo_symmetry_changed": self.n_changed,
                "pseudo_symmetry_passes": self.passes}


def pseudo_symmetry_operator(point_group: Symmetry, axis: Any = None,
                             angle: float = 60.0) -> np.ndarray:
    """The pseudo-symmetry rotation ``m`` as a unit quaternion.

    Parameters
    ----------
    point_group
        orix point group of the phase.
    axis : (3,) array, optional
        Axis in the crystal's Cartesian frame; None: (1, 1, 1), allowed for
        Laue group m-3m only.
    angle
        Degrees.

    Returns
    -------
    (4,) float64 array
        ``(cos(θ/2), sin(θ/2) u)``.

    Examples
    --------
    >>> from orix.quaternion.symmetry import Oh
    >>> pseudo_symmetry_operator(Oh).round(4)
    array([0.866 , 0.2887, 0.2887, 0.2887])
    """
    if axis is None:
        if point_group.laue.name != "m-3m":
            raise ValueError(f"the default pseudo-symmetry, 60° about <111>, is defined for Laue "
                             f"group m-3m; the phase has Laue group {point_group.laue.name}: give "
                             f"the axis (and angle) of its pseudo-symmetry")
        axis = (1.0, 1.0, 1.0)
    u = np.asarray(axis, dtype=np.float64)
    if u.shape != (3,) or not np.isfinite(u).all() or not np.linalg.norm(u) > 0:
        raise ValueError(f"axis must be 3 finite numbers of non-zero length, got {axis!r}")
    if not 0 < angle <= 180:
        raise ValueError(f"angle must be in (0, 180] degrees, got {angle}")
    half = math.radians(angle) / 2
    return np.r_[math.cos(half), math.sin(half) * u / np.linalg.norm(u)]


def pseudo_symmetry_variants(operator: np.ndarray, point_group: Symmetry) -> np.ndarray:
    """Rotations ``x`` whose products ``x o`` are the pseudo-symmetric alternatives of ``o``.

    The classes of ``{m s, m⁻¹ s : s ∈ G}`` modulo the symmetry acting on the
    left (``G`` the proper rotations of the Laue group), one representative
    each, in order of first appearance (``m s`` before ``m⁻¹ s``, ``s`` in
    orix's order).

    Parameters
    ----------
    operator : (4,) array
        The pseudo-symmetry ``m`` (:func:`pseudo_symmetry_operator`).
    point_group
        orix point group of the phase.

    Returns
    -------
    (k, 4) float64 array
        ``a >= 0``; ``k = 4`` for m-3m and 60° about <111>.

    Raises
    ------
    ValueError
        If the operator is a symmetry of the crystal (no alternative).
    """
    ops = np.asarray(point_group.laue_proper_subgroup.data, dtype=np.float64)
    m = np.asarray(operator, dtype=np.float64)
    m = m / np.linalg.norm(m)
    products = np.concatenate([quaternion_multiply(m[None], ops), quaternion_multiply(quaternion_conjugate(m)[None], ops)])
    # The identity first: products equivalent to it are symmetries, not alternatives.
    ranked = np.concatenate([[[1.0, 0.0, 0.0, 0.0]], products])
    keep = distinct_starts(ranked[None], ops, _SAME_ANGLE)[0]
    variants = ranked[1:][keep[1:]]
    if len(variants) == 0:
        raise ValueError(f"the pseudo-symmetry operator {np.round(m, 6).tolist()} is a symmetry "
                         f"of point group {point_group.name}: it has no alternative")
    return variants * np.where(variants[:, :1] < 0, -1.0, 1.0)


def alternatives(quaternions: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """(n, k, 4) pseudo-symmetric alternatives ``x_j o`` of each orientation ``o`` (n, 4)."""
    q = np.asarray(quaternions, dtype=np.float64)
    return quaternion_multiply(variants[None, :, :], q[:, None, :])


def _nearest_alternative(q: np.ndarray, targets: np.ndarray, variants: np.ndarray,
                         point_group: Symmetry) -> tuple[np.ndarray, np.ndarray]:
    """Index (m,) of the alternative of each ``q`` (m, 4) closest to its target (m, 4), and
    its disorientation in degrees (m,); in chunks of :data:`dpm.grains.CHUNK` orientations."""
    best = np.zeros(len(q), dtype=np.int64)
    angle = np.zeros(len(q))
    for lo in range(0, len(q), CHUNK):
        part = slice(lo, lo + CHUNK)
        alt = alternatives(q[part], variants)
        angles = np.stack([disorientation_angles(alt[:, j], targets[part], point_group)
                           for j in range(len(variants))], axis=1)
        best[part] = np.argmin(angles, axis=1)
        angle[part] = np.take_along_axis(angles, best[part, None], axis=1)[:, 0]
    return best, angle


def _pseudo_symmetric_pairs(q: np.ndarray, labels: np.ndarray, pairs: np.ndarray,
                            variants: np.ndarray, point_group: Symmetry,
                            tolerance: float) -> np.ndarray:
    """(p', 2) pixel pairs across grain boundaries in the pseudo-symmetric relation."""
    cross = pairs[labels[pairs[:, 0]] != labels[pairs[:, 1]]]
    _, angle = _nearest_alternative(q[cross[:, 0]], q[cross[:, 1]], variants, point_group)
    return cross[angle < tolerance]


def _candidates(q: np.ndarray, labels: np.ndarray, mean: np.ndarray, grain_pairs: np.ndarray,
                tested: np.ndarray, variants: np.ndarray,
                point_group: Symmetry) -> tuple[np.ndarray, np.ndarray]:
    """Untested (pixel, alternative) pairs: each grain's pixels against each pseudo-symmetric
    neighbour grain, the alternative closest to that grain's mean.

    Neighbour grains near one alternative of a grain's mean give its pixels one
    candidate, so only the first of them is kept: at most ``k`` targets per grain,
    at most ``k · n`` pixel rows however many twins a grain borders.

    Returns ``pixels`` (m,) sorted and ``which`` (m, k) bool, the alternatives to try.
    """
    n_grains, k = len(mean), len(variants)
    order = np.argsort(labels, kind="stable")
    order = order[labels[order] >= 0]
    sizes = np.bincount(labels[order], minlength=n_grains)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # Both directions of every grain pair: (grain tested, grain whose mean is the target).
    own = np.concatenate([grain_pairs[:, 0], grain_pairs[:, 1]])
    other = np.concatenate([grain_pairs[:, 1], grain_pairs[:, 0]])
    near, _ = _nearest_alternative(mean[own], mean[other], variants, point_group)
    _, keep = np.unique(own * k + near, return_index=True)
    own, other = own[keep], other[keep]
    counts = sizes[own]
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    pix = order[np.repeat(first[own], counts) + offsets]
    best, _ = _nearest_alternative(q[pix], mean[np.repeat(other, counts)], variants, point_group)
    which = np.zeros(tested.shape, dtype=bool)
    which[pix, best] = True
    which &= ~tested
    pixels = np.flatnonzero(which.any(axis=1))
    return pixels, which[pixels]


def _rematch(patterns: Any, rmaster: RefinementMaster, detector: Detector,
             mask: np.ndarray | None, pixels: np.ndarray, q: np.ndarray, which: np.ndarray,
             variants: np.ndarray, refine_config: RefineConfig,
             batch: int, pcs: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refine ``pixels`` from their current orientation and from their candidates
    (at their own PCs ``pcs[pixels]`` when ``pcs`` is given).

    Returns the refined NCC from the current orientation (m,), the best refined
    candidate (m, 4) and its NCC (m,), host arrays.
    """
    xp = backend.namespace(patterns)
    m = len(pixels)
    current = np.zeros(m, dtype=np.float32)
    best_q = np.zeros((m, 4))
    best_s = np.zeros(m, dtype=np.float32)
    for lo in range(0, m, batch):
        part = slice(lo, min(lo + batch, m))
        idx, w = pixels[part], which[part]
        # Candidates to the front, padded with the first (refine drops the duplicates).
        front = np.argsort(~w, axis=1, kind="stable")
        width = int(w.sum(axis=1).max())
        cand = np.take_along_axis(alternatives(q[idx], variants), front[:, :width, None], axis=1)
        cand = np.where(np.arange(width)[None, :, None] < w.sum(axis=1)[:, None, None],
                        cand, cand[:, :1])
        # One refinement for both: rows 0..b-1 from the current orientation, b..2b-1
        # from the candidates.
        starts = np.concatenate([np.repeat(q[idx][:, None], width, axis=1), cand])
        both = np.concatenate([idx, idx])
        rows = patterns[xp.asarray(both)]
        result = refine(rows, rmaster, detector, starts, mask=mask,
                        pcs=None if pcs is None else pcs[both],
                        config=replace(refine_config, n_starts=width))
        b = len(idx)
        current[part] = result.scores[:b]
        best_q[part], best_s[part] = result.quaternions[b:], result.scores[b:]
    return current, best_q, best_s


def clean_pseudo_symmetry(
    patterns: Any,
    quaternions: Any,
    scores: Any,
    indexed: Any,
    map_shape: tuple[int, int],
    master: MasterPattern | RefinementMaster,
    detector: Detector | EBSDDetector,
    *,
    mask: np.ndarray | None = None,
    config: PseudoSymmetryConfig = PseudoSymmetryConfig(),
    refine_config: RefineConfig = RefineConfig(),
    pcs: np.ndarray | None = None,
) -> PseudoSymmetryResult:
    """Re-match grains related to a neighbour by the pseudo-symmetry; keep what the patterns say.

    See the module notes for the procedure.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Experimental rows as :func:`dpm.refine.refine` takes them (zero mean,
        unit norm over the masked pixels; zero rows where unreadable), NumPy
        or CuPy; the re-matching runs on their device.
    quaternions : (n, 4) array
        Orientations ``(a, b, c, d)`` (orix convention, sample to crystal),
        host, after the map cleanup.
    scores : (n,) array
        Their NCC, host (passed through where a pixel does not change).
    indexed : (n,) bool array
        Pixels holding an orientation; the others are never tested or changed.
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
        Operator, tolerance, margin, grain threshold, grid and passes.
    refine_config
        Refinement options of the re-match. ``pattern_centre`` must be
        ``"fixed"`` or ``"pattern"``. ``memory_budget`` bounds the pattern
        rows copied for a batch of pixels (half of it) and the refinement's
        own state (the other half).
    pcs : (n, 3) float array, optional
        Every pixel's own PC (Bruker), e.g. of the map's PC field
        (:mod:`dpm.calibration`); the detector's PC for all when None.

    Returns
    -------
    PseudoSymmetryResult

    Examples
    --------
    >>> result = clean_pseudo_symmetry(rows, q, scores, indexed, (ny, nx), master,
    ...                                detector)                      # doctest: +SKIP
    >>> result.summary()["pseudo_symmetry_changed"]                   # doctest: +SKIP
    """
    from orix.quaternion import Rotation

    if refine_config.pattern_centre == "shared":
        raise ValueError("refine_config.pattern_centre='shared' would refit the map's pattern "
                         "centre on the re-matched pixels; pass the fitted PC in the detector and "
                         "use pattern_centre='fixed'")
    det = as_detector(detector)
    rmaster = master if isinstance(master, RefinementMaster) else refinement_master(master, det)
    point_group = rmaster.master.phase.point_group
    operator = pseudo_symmetry_operator(point_group, config.axis, config.angle)
    variants = pseudo_symmetry_variants(operator, point_group)
    ny, nx = (int(s) for s in map_shape)
    n = ny * nx
    q = np.asarray(backend.to_host(quaternions), dtype=np.float64)
    s = np.asarray(backend.to_host(scores), dtype=np.float32)
    ok = np.asarray(backend.to_host(indexed))
    if patterns.ndim != 2 or patterns.shape[0] != n:
        raise ValueError(f"patterns must have shape (n, npix) with n = {n} for the map "
                         f"{(ny, nx)}, got {tuple(patterns.shape)}")
    if q.shape != (n, 4):
        raise ValueError(f"quaternions must have shape ({n}, 4), got {q.shape}")
    for name, value in (("scores", s), ("indexed", ok)):
        if value.shape != (n,):
            raise ValueError(f"{name} must have one value per map pixel ({n}), got {value.shape}")
    ok = ok.astype(bool)
    own_pcs = None if pcs is None else np.asarray(pcs, dtype=np.float64)
    if own_pcs is not None and own_pcs.shape != (n, 3):
        raise ValueError(f"pcs must have shape ({n}, 3), got {own_pcs.shape}")

    xp = backend.namespace(patterns)
    budget = backend.memory_budget(xp, refine_config.memory_budget)
    rows_bytes = 2 * int(patterns.shape[1]) * 4     # a pixel's row, copied twice (float32)
    batch = max(1, (budget // 2) // rows_bytes)
    refine_config = replace(refine_config, memory_budget=max(1, budget // 2))
    grain_config = GrainConfig(high_angle=config.high_angle,
                               low_angle=min(GrainConfig.low_angle, config.high_angle),
                               grid=config.grid)

    q_out, s_out = q.copy(), s.copy()
    changed = np.zeros(n, dtype=bool)
    ever_tested = np.zeros(n, dtype=bool)
    tested = np.zeros((n, len(variants)), dtype=bool)    # alternatives already tried
    symmetry = _symmetry_quaternions(rmaster.master)
    counts: list[int] = []
    passes = 0
    while ok.any():
        grain_map = reconstruct_grains(q_out, ok, (ny, nx), point_group, config=grain_config)
        labels = grain_map.labels.ravel()
        found = _pseudo_symmetric_pairs(q_out, labels, grain_map.pairs, variants, point_group,
                                        config.tolerance)
        counts.append(len(found))
        if passes == config.max_passes or len(found) == 0:
            break
        table = grain_map.table
        mean = Rotation.from_euler(np.stack([table["phi1_deg"], table["Phi_deg"],
                                             table["phi2_deg"]], axis=1), degrees=True).data
        grain_pairs = np.unique(np.sort(labels[found], axis=1), axis=0)
        pixels, which = _candidates(q_out, labels, mean, grain_pairs, tested, variants,
                                    point_group)
        if len(pixels) == 0:
            break
        current, new_q, new_s = _rematch(patterns, rmaster, det, mask, pixels, q_out, which,
                                         variants, refine_config, batch, own_pcs)
        passes += 1
        other = distinct_starts(np.stack([q_out[pixels], new_q], axis=1), symmetry,
                                refine_config.distinct_angle)[:, 1]
        accept = other & (new_s > current + config.margin)
        tested[pixels] |= which
        ever_tested[pixels] = True
        hit = pixels[accept]
        log.debug("pseudo-symmetry, pass %d: %d pseudo-symmetric boundary pairs, %d pixels "
                  "re-matched, %d changed", passes, len(found), len(pixels), len(hit))
        if len(hit) == 0:
            break
        # A changed pixel is not tried against the orientation it left.
        left, _ = _nearest_alternative(new_q[accept], q_out[hit], variants, point_group)
        tested[hit] = False
        tested[hit, left] = True
        q_out[hit], s_out[hit] = new_q[accept], new_s[accept]
        changed[hit] = True
    n_changed = int(changed.sum())
    log.info("pseudo-symmetry (%.1f° about %s, %d alternatives): %d boundary pairs, %d pixels "
             "re-matched, %d changed in %d passes, %d boundary pairs left", config.angle,
             np.round(operator[1:] / np.linalg.norm(operator[1:]), 4).tolist(), len(variants),
             counts[0] if counts else 0, int(ever_tested.sum()), n_changed, passes,
             counts[-1] if counts else 0)
    return PseudoSymmetryResult(
        quaternions=q_out, scores=s_out, changed=changed, operator=operator,
        n_alternatives=len(variants), n_boundary_pairs=counts[0] if counts else 0,
        n_boundary_pairs_after=counts[-1] if counts else 0, n_tested=int(ever_tested.sum()),
        n_changed=n_changed, passes=passes)
