"""Coarse-to-fine dictionary search: the exhaustive 2° result at a fraction of the work.

Exhaustive matching scores every pattern against every orientation of the
grid (100 347 for a cubic phase at 2°): ``2 × 100 347 × npix`` FLOP per pattern,
which OpenBLAS already runs at the machine's GEMM rate. The coarse-to-fine
search does less of it. Its ranking stages work on patterns binned to about
``working_size`` px (30: 2 × 2 for 60 × 60 px patterns, a quarter of the
projection and GEMM work), with dictionaries projected on the binned detector
(:func:`binned_detector`, same pattern centre) from master patterns low-passed
for its pixels; only the final stage scores at full resolution:

1. match every binned pattern exhaustively against the coarse sub-grid of
   every ``coarse_factor``-th lattice point of the cubochoric grid
   (:meth:`dpm.sampling.CubochoricGrid.coarse`; factor 2 gives 4°, 12 643
   orientations for m-3m), projected from the master pattern low-passed for
   cells that much wider, keeping the best ``coarse_keep``;
2. for each pattern, the candidates are the fine-grid points within
   ``radius`` lattice steps of each of its coarse candidates
   (:meth:`~dpm.sampling.CubochoricGrid.neighbours`; boxes are not wrapped
   across the zone's faces: an orientation next to a face has its symmetric
   equivalent near the opposite face, whose coarse points are candidates too);
3. patterns, sorted by their best coarse match so that similar orientations
   share a tile, are scored in tiles against the union of their candidates
   (one GEMM per tile), each pattern's scores restricted to its own
   candidates, and the best ``max(keep, 10)`` are kept; then each best match climbs
   to the best of its own box. A pattern's result depends only on its own
   pattern, never on the tile it shares;
4. the boxes around the best match's pseudo-symmetric alternatives (60° about
   <111> for m-3m) are searched too, and climbed from: a low-passed 4° cell
   of the alternative can outrank the pattern's own;
5. a pattern whose best match does not stand out of its scores against the
   coarse grid (:func:`confidence` below ``confidence``) is matched against
   the whole binned grid, keeping its best :data:`_UNSURE_KEEP`: at low
   signal-to-noise the 4° grid's best cells are noise and the true one is not
   among them. Pores stand no further out than such patterns (nor does band
   contrast tell them apart: at 20 counts a Na grain's band contrast is mostly
   below the protocol's 10), so they take this path too;
6. every pattern's candidates (its best ``max(keep, 10)``, or the
   :data:`_UNSURE_KEEP` of step 5) are scored at full resolution and the best
   climbs again, at full resolution, to the best of its own box.

Dictionary rows are projected on demand (:meth:`FineRows.get`) and kept for
the rest of the run when the whole dictionary fits the byte budget given
(step 5's rows are not kept). The scores returned are the full-resolution NCC
of :func:`dpm.match.match`, so where the exhaustive best match lies among a
pattern's final candidates (which the defaults make true on ≥ 99.9 % of the
diffracting pixels of the bench map) both give the same orientations.
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dpm import backend
from dpm.detector import Detector
from dpm.dictionary import Dictionary
from dpm.fused import PRECISIONS
from dpm.master import MasterPattern
from dpm.match import MatchConfig, MatchResult, _topk_merge, match
from dpm.projection import integrate_pixels, master_on_device, project_vectors
from dpm.sampling import CubochoricGrid

_log = logging.getLogger("dpm")

#: Patterns per fine-stage tile (fewer when the tile's candidate union is too large).
_TILE_PATTERNS = 256
#: Dictionary rows projected per step.
_PROJECT_ROWS = 8192
#: Most hill-climbing passes of the fine stage.
_MAX_CLIMBS = 8
#: A pseudo-symmetric alternative is searched from when its score at the nearest grid
#: point reaches this fraction of the best match's score.
_ALTERNATIVE_RATIO = 0.5
#: Every how many coarse rows the null distribution of a pattern's scores is taken from.
_NULL_STRIDE = 16
#: Best binned matches of each pattern rescored at full resolution (at least ``keep``).
_RESCORED = 10
#: Best matches an unsure pattern keeps from the whole binned grid for the full-resolution
#: stage. Measured on a 20 x 30 Na map at 20 counts behind a 30 % shadow (60 x 60 px,
#: nearly every pattern unsure): the exhaustive best is among the best 100 binned
#: matches for 97.6 % of the diffracting pixels, among the best 30 for 95 %.
_UNSURE_KEEP = 100
#: Coarsest coarse grid, in degrees, the search uses. Measured on synthetic Li maps
#: (60 x 60 px): a 4° coarse grid (fine 2°) finds the exhaustive best match on
#: >= 99.9 % of diffracting pixels, a 6° one (fine 3°) on ~87 % only; grids whose
#: coarse sub-grid would be coarser are small (30 000 orientations for m-3m at 3°)
#: and searched exhaustively.
MAX_COARSE_SPACING = 4.0
#: The search methods.
METHODS: tuple[str, ...] = ("coarse-to-fine", "exhaustive", "fused", "pca")


@dataclass(frozen=True)
class SearchConfig:
    """How the dictionary is searched.

    Attributes
    ----------
    method
        ``"coarse-to-fine"`` (default), ``"exhaustive"`` (every pattern
        against every orientation of the grid, the dictionary projected once
        and kept or read from the on-disk cache) or ``"fused"`` (every
        orientation too, the dictionary made on the fly and never stored:
        :func:`dpm.fused.match_on_the_fly`, ``kernels/fused_match.cu`` on a
        GPU) or ``"pca"`` (matched in the span of the dictionary's leading
        principal components, the best 16 rescored exactly:
        :mod:`dpm.compression`; the compressed dictionary is cached on disk).
        Grids whose coarse sub-grid would be coarser than
        :data:`MAX_COARSE_SPACING` (4°) are searched exhaustively by the
        coarse-to-fine method.
    coarse_factor
        Lattice stride of the coarse grid (2: twice the fine spacing, 4° and
        12 643 orientations for m-3m at 2°).
    coarse_keep
        Coarse candidates kept per pattern (6: on the bench map, 4 miss the
        exhaustive best on 0.04 % of the diffracting pixels, 6 and 8 on none;
        each costs up to 27 more fine rows per pattern).
    radius
        Half-width, in fine lattice steps, of the box searched around each
        coarse candidate (1: 27 fine orientations per candidate).
    confidence
        Patterns whose best binned match lies fewer than this many standard
        deviations above the mean of their coarse-grid scores
        (:func:`confidence`) are matched against the whole binned grid; 0
        never. Measured on the bench map (60 x 40 Li patterns, 60 x 60 px, 40
        counts): the diffracting pixels' 1st, 5th and 50th percentiles are
        6.8, 7.5 and 8.8 σ, pores reach 5 σ; on a Na map at 20 counts behind a
        30 % shadow 2.7, 2.9 and 3.8 σ, and there the coarse stage alone
        misses 36 % of the exhaustive best matches. With 7 the pores and 2 %
        of the bench map's diffracting pixels take that path.
    pseudo_symmetry
        Also search the box around the best match's best pseudo-symmetric
        alternative (60° about <111>; Laue group m-3m only, ignored otherwise).
    precision
        Operand rounding of the fused search: ``"fp32"`` (default), ``"tf32"``
        or ``"fp16"`` (see :mod:`dpm.fused`); the other methods score in
        float32.
    working_size
        Patterns are binned by ``min(sy, sx) // working_size`` (or the largest
        smaller factor that divides both sides) for the ranking stages; 0
        ranks at full resolution. On the bench map 30 (2 x 2 binning) keeps
        the exhaustive result on every diffracting pixel.
    """

    method: str = "coarse-to-fine"
    coarse_factor: int = 2
    coarse_keep: int = 6
    radius: int = 1
    confidence: float = 7.0
    pseudo_symmetry: bool = True
    precision: str = "fp32"
    working_size: int = 30

    def uses_coarse_to_fine(self, resolution: float) -> bool:
        """Whether a grid of ``resolution`` degrees is searched coarse to fine: the method
        says so and the coarse grid is at most :data:`MAX_COARSE_SPACING` degrees."""
        return (self.method == "coarse-to-fine"
                and self.coarse_factor * resolution <= MAX_COARSE_SPACING + 1e-9)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"search method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("coarse_factor", "coarse_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("radius", "working_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not np.isfinite(self.confidence) or self.confidence < 0:
            raise ValueError(f"confidence must be a non-negative number of standard deviations, "
                             f"got {self.confidence!r}")


class FineRows:
    """Rows of a dictionary projected on demand, kept when the whole dictionary fits.

    Parameters
    ----------
    dictionary
        A :class:`dpm.dictionary.Dictionary` (master pattern, detector,
        quaternions, mask).
    xp
        Array module the rows are made on.
    capacity
        Bytes the kept rows may take; when the whole dictionary
        (``len × n_pixels × 4``) exceeds it, rows are projected anew on every
        request.

    Notes
    -----
    Kept rows are stored in the order they were first asked for, in one buffer
    reserved for the whole dictionary but written from its start, so only the
    memory of the rows actually projected is ever touched (an orientation map
    needs a fraction of the grid).
    """

    def __init__(self, dictionary: Any, xp: ModuleType, capacity: int) -> None:
        self.dictionary = dictionary
        self.xp = xp
        m, npix = len(dictionary), dictionary.n_pixels
        keep = m * npix * 4 <= capacity
        self._store = xp.empty((m, npix), dtype=xp.float32) if keep else None
        self._slot = np.full(m, -1, dtype=np.int64)
        self._count = 0
        self.projected = 0

    def _project(self, rows: np.ndarray, out: Any) -> None:
        xp = self.xp
        north, south = master_on_device(xp, self.dictionary.master)
        vectors = self.dictionary._vectors(xp)
        for s in range(0, len(rows), _PROJECT_ROWS):
            q = xp.asarray(self.dictionary.quaternions[rows[s:s + _PROJECT_ROWS]])
            project_vectors(north, south, vectors, q, out=out[s:s + len(q)])
        self.projected += len(rows)

    def get(self, rows: np.ndarray, out: Any = None) -> Any:
        """Dictionary rows ``rows`` as a ``(len(rows), npix)`` float32 array.

        Parameters
        ----------
        rows : (k,) int array
            Rows of the dictionary, unique.
        out : (>= k, npix) float32 array, optional
            Buffer the rows are written to (its first ``k`` rows are returned);
            reusing one avoids touching fresh memory for every request.
        """
        xp = self.xp
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = xp.empty((len(rows), self.dictionary.n_pixels), dtype=xp.float32)
        out = out[:len(rows)]
        if self._store is None:
            self._project(rows, out)
            return out
        missing = rows[self._slot[rows] < 0]
        if len(missing):
            start = self._count
            self._project(missing, self._store[start:start + len(missing)])
            self._slot[missing] = np.arange(start, start + len(missing))
            self._count += len(missing)
        slots = self._slot[rows]
        if xp is np:   # mode="clip" (slots are valid): NumPy's default "raise" buffers `out`
            np.take(self._store, slots, axis=0, out=out, mode="clip")
        else:
            xp.take(self._store, xp.asarray(slots), axis=0, out=out)
        return out


def candidates(grid: CubochoricGrid, coarse_rows: np.ndarray, radius: int) -> np.ndarray:
    """Fine-grid candidates of each pattern from its coarse candidates.

    Parameters
    ----------
    grid
        The fine grid.
    coarse_rows : (n, kc) int array
        Each pattern's coarse candidates, as rows of ``grid``.
    radius
        Box half-width in fine lattice steps.

    Returns
    -------
    (n, kc (2 radius + 1)^3) int64 array
        Rows of ``grid``, -1 for box positions outside the zone; a row may
        repeat when boxes overlap.
    """
    n = coarse_rows.shape[0]
    return grid.neighbours(coarse_rows, radius).reshape(n, -1)


def confidence(patterns: Any, scores: Any, coarse: Any) -> np.ndarray:
    """How many standard deviations each pattern's ``scores`` stand above its null scores.

    The null scores are the pattern's NCC with every :data:`_NULL_STRIDE`-th
    row of the coarse dictionary: nearly all of them are wrong orientations,
    so their mean and standard deviation describe what noise and the shared
    structure of all patterns give.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean unit-norm rows.
    scores : (n,) array
        An NCC per pattern (its best match).
    coarse : (m_coarse, npix) float32 array or PatternSource
        The coarse dictionary.

    Returns
    -------
    (n,) float64 array on the host
        ``(score - mean) / std``; 0 where the null scores do not vary.
    """
    xp = backend.namespace(patterns)
    rows = np.arange(0, len(coarse), _NULL_STRIDE)
    if hasattr(coarse, "chunk"):
        null_rows = xp.concatenate([coarse.chunk(int(r), int(r) + 1, xp) for r in rows])
    else:
        null_rows = coarse[xp.asarray(rows)]
    null = backend.to_host(patterns @ null_rows.T).astype(np.float64)
    mean, std = null.mean(axis=1), null.std(axis=1)
    z = (np.asarray(backend.to_host(scores), dtype=np.float64) - mean) / np.where(std > 0, std, 1)
    return np.where(std > 0, z, 0.0)


def binning_factor(shape: tuple[int, int], working_size: int) -> int:
    """Binning of ``shape`` patterns for the ranking stages: ``min(sy, sx) // working_size``,
    lowered until it divides both sides (1: none; ``working_size`` 0 gives 1)."""
    sy, sx = (int(v) for v in shape)
    factor = max(1, min(sy, sx) // working_size) if working_size else 1
    while sy % factor or sx % factor:
        factor -= 1
    return factor


def binned_detector(detector: Detector, factor: int) -> Detector:
    """The detector that records ``detector``'s patterns binned ``factor`` × ``factor``.

    The pattern centre is kept: in Bruker's convention it is a fraction of the
    pattern width and height, and the centre of a binned pixel is the mean of
    the centres of the pixels it bins (:func:`dpm.detector.direction_vectors`
    puts pixel ``c`` at ``c + 0.5``).
    """
    sy, sx = detector.shape
    if sy % factor or sx % factor:
        raise ValueError(f"binning {factor} does not divide the pattern shape {detector.shape}")
    return dataclasses.replace(detector, shape=(sy // factor, sx // factor),
                               binning=detector.binning * factor)


@dataclass(frozen=True)
class PatternBinning:
    """How the normalised rows of masked patterns become binned normalised rows.

    Attributes
    ----------
    factor
        Binning ``f`` (1: rows are used as they are).
    shape
        Full pattern shape ``(sy, sx)``.
    mask : (sy, sx) bool array or None
        Signal mask of the full patterns (True: used; the rows hold these
        pixels in row-major order).
    """

    factor: int
    shape: tuple[int, int]
    mask: np.ndarray | None = None

    @property
    def binned_mask(self) -> np.ndarray | None:
        """(sy / f, sx / f) bool: binned pixels whose ``f × f`` pixels are all used."""
        if self.mask is None:
            return None
        f, (sy, sx) = self.factor, self.shape
        return np.asarray(self.mask, dtype=bool).reshape(sy // f, f, sx // f, f).all(axis=(1, 3))

    def rows(self, patterns: Any) -> Any:
        """Binned rows of ``patterns`` (n, npix): zero-mean and unit-norm over the binned mask.

        Each binned pixel is the sum of its ``f × f`` pixels; pixels outside the
        mask count as 0 and binned pixels that hold any are dropped.
        """
        if self.factor == 1:
            return patterns
        xp = backend.namespace(patterns)
        f, (sy, sx) = self.factor, self.shape
        n = patterns.shape[0]
        if self.mask is None:
            full = patterns
        else:
            full = xp.zeros((n, sy * sx), dtype=xp.float32)
            full[:, xp.asarray(np.flatnonzero(self.mask))] = patterns
        binned = full.reshape(n, sy // f, f, sx // f, f).sum(axis=(2, 4)).reshape(n, -1)
        if self.mask is not None:
            binned = binned[:, xp.asarray(np.flatnonzero(self.binned_mask))]
        binned = binned - binned.mean(axis=1, keepdims=True)
        norm = xp.sqrt((binned * binned).sum(axis=1, keepdims=True))
        return (binned / xp.where(norm > 0, norm, xp.float32(1))).astype(xp.float32)


@dataclass(frozen=True)
class SearchDictionaries:
    """What :func:`coarse_to_fine` searches, for one detector (:func:`search_dictionaries`).

    Attributes
    ----------
    grid
        The fine cubochoric grid (its rows are the dictionary's rows).
    coarse_rows : (m_coarse,) int array
        Rows of ``grid`` that make the coarse grid.
    coarse : (m_coarse, npix_binned) float32 array
        The coarse dictionary, binned, on the search's device.
    wide
        The fine grid's rows on the binned detector (:class:`FineRows`; the
        same object as ``fine`` when nothing is binned).
    fine
        The fine grid's rows at full resolution.
    binning
        How patterns are binned for ``coarse`` and ``wide``.
    """

    grid: CubochoricGrid
    coarse_rows: np.ndarray
    coarse: Any
    wide: FineRows
    fine: FineRows
    binning: PatternBinning


def search_dictionaries(master: MasterPattern, fine_master: MasterPattern, detector: Detector,
                        grid: CubochoricGrid, *, mask: np.ndarray | None = None,
                        config: SearchConfig = SearchConfig(), xp: ModuleType = np,
                        capacity: int = 2**62) -> SearchDictionaries:
    """The coarse, binned and full-resolution dictionaries of the coarse-to-fine search.

    Parameters
    ----------
    master
        The master pattern, as simulated.
    fine_master
        The master pattern full-resolution rows are projected from (``master``
        or its pixel-integrated copy, as the exhaustive dictionary's).
    detector
        The detector of the (full-resolution) patterns.
    grid
        The fine grid.
    mask : (sy, sx) bool array, optional
        Signal mask of the patterns.
    config
        Coarse stride and the working size that sets the binning.
    xp
        Array module of the search.
    capacity
        Bytes the kept full-resolution rows may take (binned rows: a quarter of it).

    Notes
    -----
    The coarse rows are projected from ``master`` low-passed for cells
    ``coarse_factor`` times wider than the fine grid's (σ = half the coarse
    spacing) on the binned detector, or the right cell would not rank first;
    binned fine rows from ``master`` low-passed for the binned pixels and the
    fine cells (σ = half the fine spacing).
    """
    quaternions = grid.rotations.data.astype(np.float32)
    factor = binning_factor(detector.shape, config.working_size)
    binning = PatternBinning(factor, tuple(detector.shape), mask)
    fine = FineRows(Dictionary(fine_master, detector, quaternions, mask=mask), xp, capacity)
    small = binned_detector(detector, factor)
    wide = fine
    if factor > 1:
        wide_master = integrate_pixels(master, small, orientation_spread=grid.resolution / 2)
        wide = FineRows(Dictionary(wide_master, small, quaternions, mask=binning.binned_mask), xp,
                        capacity // 4)
    coarse_rows = grid.coarse(config.coarse_factor)
    coarse_master = integrate_pixels(
        master, small, orientation_spread=config.coarse_factor * grid.resolution / 2)
    coarse = Dictionary(coarse_master, small, quaternions[coarse_rows], mask=binning.binned_mask)
    return SearchDictionaries(grid, coarse_rows, coarse.chunk(0, len(coarse), xp), wide, fine,
                              binning)


def coarse_to_fine(patterns: Any, dictionaries: SearchDictionaries, *, keep: int,
                   config: SearchConfig = SearchConfig(),
                   memory_budget: int | None = None) -> MatchResult:
    """Best ``keep`` matches of every pattern by the coarse-to-fine search.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean unit-norm rows (:func:`dpm.match.prepare_patterns`), NumPy or CuPy.
    dictionaries
        The grid and its coarse, binned and full-resolution rows
        (:func:`search_dictionaries`).
    keep
        Matches kept per pattern.
    config
        Coarse stride, candidates kept, box radius and confidence.
    memory_budget
        Bytes the coarse matching and one tile may use (None: half the free
        memory).

    Returns
    -------
    MatchResult
        ``indices`` (n, keep) rows of the grid and ``scores`` (n, keep)
        full-resolution NCC, best first, equal scores in ascending index, on
        the patterns' device.
    """
    xp = backend.namespace(patterns)
    n = patterns.shape[0]
    grid, coarse, coarse_rows = dictionaries.grid, dictionaries.coarse, dictionaries.coarse_rows
    budget = backend.memory_budget(xp, memory_budget)
    binned = dictionaries.binning.rows(patterns)
    kc = min(int(config.coarse_keep), len(coarse_rows))
    first = match(binned, coarse, config=MatchConfig(keep=kc, memory_budget=budget))
    coarse_best = np.asarray(coarse_rows, dtype=np.int64)[backend.to_host(first.indices)]
    ranked = min(max(keep, _RESCORED), len(grid))
    scorer = CandidateScorer(binned, dictionaries.wide, ranked, max(budget // 2, 1))
    everyone = np.arange(n)
    best_scores, best_indices = scorer.score(everyone, candidates(grid, coarse_best, config.radius),
                                             np.argsort(coarse_best[:, 0], kind="stable"))
    _climb(scorer, grid, everyone, best_scores, best_indices)
    variants = _pseudo_symmetry_variants(grid) if config.pseudo_symmetry else None
    if variants is not None:
        # Where the coarse grid ranked a pseudo-symmetric alternative's cell above the
        # pattern's own, the search ends on the alternative, whose fine score is lower.
        # Each best match's alternatives are scored at their nearest grid points; from
        # the best of them, where it comes close to the best match, the search climbs.
        from dpm.pseudo_symmetry import alternatives

        rows = grid.nearest(alternatives(grid.rotations.data[best_indices[:, 0]], variants))
        alt_scores, alt_rows = scorer.score(everyone, rows, np.argsort(rows[:, 0], kind="stable"))
        ratio = alt_scores[:, 0] / np.where(best_scores[:, 0] > 0, best_scores[:, 0], np.inf)
        close = everyone[ratio >= _ALTERNATIVE_RATIO]
        if len(close):
            start = alt_rows[close, 0]
            box = np.concatenate([grid.neighbours(start, 1), best_indices[close]], axis=1)
            before = best_indices[close, 0]
            best_scores[close], best_indices[close] = scorer.score(
                close, box, np.argsort(start, kind="stable"))
            _climb(scorer, grid, close[best_indices[close, 0] != before], best_scores,
                   best_indices)
    # Against the whole binned grid: patterns with fewer than ``keep`` candidates (boxes
    # all in a corner of the zone), and those whose best match is not confident.
    short = best_indices[:, -1] < 0
    unsure = np.zeros(n, dtype=bool)
    if config.confidence > 0:
        unsure = confidence(binned, best_scores[:, 0], coarse) < config.confidence
    again = np.flatnonzero(short | unsure)
    final = best_indices
    if len(again):
        _log.debug("coarse-to-fine: %d patterns with fewer than %d candidates and %d not "
                   "confident matched against the whole grid", int(short.sum()), ranked,
                   int(unsure.sum()))
        every = _EveryRow(dictionaries.wide)
        wide_keep = min(max(ranked, _UNSURE_KEEP), len(grid))
        extra = match(binned[xp.asarray(again)], every,
                      config=MatchConfig(keep=wide_keep, memory_budget=budget))
        final = np.full((n, wide_keep), -1, dtype=np.int64)
        final[:, :ranked] = best_indices
        final[again] = every.order[backend.to_host(extra.indices)]
    # At full resolution: each pattern's candidates, then a climb from the best.
    scorer = CandidateScorer(patterns, dictionaries.fine, keep, max(budget // 2, 1))
    best_scores, best_indices = scorer.score(everyone, final,
                                             np.argsort(final[:, 0], kind="stable"))
    _climb(scorer, grid, everyone, best_scores, best_indices)
    return MatchResult(indices=xp.asarray(best_indices), scores=xp.asarray(best_scores))


def _pseudo_symmetry_variants(grid: CubochoricGrid) -> np.ndarray | None:
    """The 60° <111> variants (:mod:`dpm.pseudo_symmetry`) for Laue group m-3m, else None."""
    from orix.crystal_map import Phase

    from dpm.pseudo_symmetry import pseudo_symmetry_operator, pseudo_symmetry_variants

    point_group = Phase(point_group=grid.point_group).point_group
    if point_group.laue.name != "m-3m":
        return None
    return pseudo_symmetry_variants(pseudo_symmetry_operator(point_group), point_group)


def _climb(scorer: "CandidateScorer", grid: CubochoricGrid, moved: np.ndarray,
           best_scores: np.ndarray, best_indices: np.ndarray) -> None:
    """Until each best match of patterns ``moved`` is the best of its own lattice box,
    search the box of radius 1 around it (with the matches kept so far); in place.

    The exhaustive best lies next to a coarse box's edge as often as inside it; one or
    two climbs reach it.
    """
    for _ in range(_MAX_CLIMBS):
        if not len(moved):
            return
        centre = best_indices[moved, 0]
        box = np.concatenate([grid.neighbours(centre, 1), best_indices[moved]], axis=1)
        scores, indices = scorer.score(moved, box, np.argsort(centre, kind="stable"))
        changed = indices[:, 0] != centre
        best_scores[moved], best_indices[moved] = scores, indices
        moved = moved[changed]


class CandidateScorer:
    """Scores patterns against their own candidate rows, tile by tile (buffers reused)."""

    def __init__(self, patterns: Any, fine: FineRows, keep: int, tile_bytes: int) -> None:
        self.patterns, self.fine, self.keep = patterns, fine, keep
        xp = self.xp = backend.namespace(patterns)
        npix = patterns.shape[1]
        self.most = min(len(fine.dictionary), max(1, tile_bytes // (4 * (npix + _TILE_PATTERNS))))
        self.rows = xp.empty((self.most, npix), dtype=xp.float32)
        self.tile = xp.empty(_TILE_PATTERNS * self.most, dtype=xp.float32)

    def score(self, which: np.ndarray, boxes: np.ndarray, order: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``keep`` (scores, rows) on the host of patterns ``which`` among ``boxes``.

        ``boxes`` (len(which), w) holds each pattern's candidate rows (-1 = none,
        repeats allowed); tiles follow ``order`` (positions into ``which``) so
        that patterns with similar candidates share a tile's dictionary rows.
        """
        xp, keep = self.xp, self.keep
        npix = self.patterns.shape[1]
        scores_out = np.full((len(which), keep), -np.inf, dtype=np.float32)
        indices_out = np.full((len(which), keep), -1, dtype=np.int64)
        start = 0
        while start < len(which):
            count = min(_TILE_PATTERNS, len(which) - start)
            while True:
                members = order[start:start + count]
                box = boxes[members]
                union = np.unique(box[box >= 0])
                if len(union) <= self.most or count == 1:
                    break
                count //= 2
            if len(union) > len(self.rows):     # one pattern's candidates beyond the buffer
                self.rows = xp.empty((len(union), npix), dtype=xp.float32)
                self.tile = xp.empty(_TILE_PATTERNS * len(union), dtype=xp.float32)
            rows = self.fine.get(union, out=self.rows)
            scores = self.tile[:count * len(union)].reshape(count, len(union))
            xp.matmul(self.patterns[xp.asarray(which[members])], rows.T, out=scores)
            # Each pattern scores only its own candidates: NaN never enters the top-k.
            allowed = np.zeros((count, len(union)), dtype=bool)
            valid = box >= 0
            allowed[np.nonzero(valid)[0], np.searchsorted(union, box[valid])] = True
            scores[xp.asarray(~allowed)] = np.nan
            tile_scores = xp.full((count, keep), -np.inf, dtype=xp.float32)
            tile_positions = xp.full((count, keep), -1, dtype=xp.int64)
            _topk_merge(xp, scores, 0, tile_scores, tile_positions)
            positions = backend.to_host(tile_positions)
            scores_out[members] = backend.to_host(tile_scores)
            indices_out[members] = np.where(positions >= 0, union[positions.clip(0)], -1)
            start += count
        return scores_out, indices_out


class _EveryRow:
    """Every row of a :class:`FineRows` dictionary as a PatternSource for
    :func:`dpm.match.match`, kept rows first (in their store order) and then the
    rest (ascending), which are projected into one reused buffer and not kept:
    matching a few patterns against the whole grid neither copies the kept rows
    nor touches fresh memory for the others.

    ``order[i]`` is the dictionary row at source position ``i``.
    """

    def __init__(self, fine: FineRows) -> None:
        self.fine = fine
        kept = fine._count
        by_slot = np.empty(kept, dtype=np.int64)
        stored = np.flatnonzero(fine._slot >= 0)
        by_slot[fine._slot[stored]] = stored
        self.kept = kept
        self.order = np.concatenate([by_slot, np.flatnonzero(fine._slot < 0)])
        self._buffer: Any = None

    def __len__(self) -> int:
        return len(self.order)

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        fine = self.fine
        if stop <= self.kept:
            return fine._store[start:stop]
        if self._buffer is None or len(self._buffer) < stop - start:
            self._buffer = fine.xp.empty((stop - start, fine.dictionary.n_pixels),
                                         dtype=fine.xp.float32)
        out = self._buffer[:stop - start]
        split = max(self.kept - start, 0)
        if split:
            out[:split] = fine._store[start:self.kept]
        fine._project(self.order[start + split:stop], out[split:])
        return out
