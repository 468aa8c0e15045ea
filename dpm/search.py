"""Coarse-to-fine dictionary search: the exhaustive 2° result at a fraction of the work.

Exhaustive matching scores every pattern against every orientation of the
grid (100 347 for a cubic phase at 2°): ``2 × 100 347 × npix`` FLOP per pattern,
which OpenBLAS already runs at the machine's GEMM rate. The coarse-to-fine
search does less of it:

1. match every pattern exhaustively against the coarse sub-grid of every
   ``coarse_factor``-th lattice point of the cubochoric grid
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
   candidates, and the best ``keep`` are kept; then each best match climbs
   to the best of its own box. A pattern's result depends only on its own
   pattern, never on the tile it shares;
4. the boxes around the best match's pseudo-symmetric alternatives (60° about
   <111> for m-3m) are searched too, and climbed from: a low-passed 4° cell
   of the alternative can outrank the pattern's own;
5. a pattern whose best match does not stand out of its scores against the
   coarse grid (:func:`confidence` below ``confidence``) is matched
   exhaustively: at low signal-to-noise the 4° grid's best cells are noise and
   the true one is not among them, while the full 2° grid still finds it.
   Pores stand no further out than such patterns (nor does band contrast
   tell them apart: at 20 counts a Na grain's band contrast is mostly below
   the protocol's 10), so they are matched exhaustively too.

Fine dictionary rows are projected on demand (:meth:`FineRows.get`) and kept
for the rest of the run when the whole dictionary fits the byte budget given.
The scores are the same NCC as :func:`dpm.match.match` computes, so where the
exhaustive best match lies among a pattern's candidates (which the defaults
make true on ≥ 99.9 % of the diffracting pixels of the bench map) both give
the same orientations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dpm import backend
from dpm.match import MatchConfig, MatchResult, _topk_merge, match
from dpm.projection import master_on_device, project_vectors
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
#: Coarsest coarse grid, in degrees, the search uses. Measured on synthetic Li maps
#: (60 x 60 px): a 4° coarse grid (fine 2°) finds the exhaustive best match on
#: >= 99.9 % of diffracting pixels, a 6° one (fine 3°) on ~87 % only; grids whose
#: coarse sub-grid would be coarser are small (30 000 orientations for m-3m at 3°)
#: and searched exhaustively.
MAX_COARSE_SPACING = 4.0


@dataclass(frozen=True)
class SearchConfig:
    """How the dictionary is searched.

    Attributes
    ----------
    method
        ``"coarse-to-fine"`` (default) or ``"exhaustive"`` (every pattern
        against every orientation of the grid). Grids whose coarse sub-grid
        would be coarser than :data:`MAX_COARSE_SPACING` (4°) are always
        searched exhaustively.
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
        Patterns whose best match lies fewer than this many
        standard deviations above the mean of their coarse-grid scores
        (:func:`confidence`) are matched exhaustively; 0 never does. Measured
        on 20 x 30 synthetic maps, 60 x 60 px, 2° grid: at 40 counts (the
        bench map) the diffracting pixels stand 9 to 13 σ out, at 20 counts
        Li ones 3 to 11 σ, and every pattern the coarse stage missed lay
        below 6.5 σ (Li) or 4.7 σ (Na, 30 % shadow); 7 catches them all.
    pseudo_symmetry
        Also search the boxes around the best match's pseudo-symmetric
        alternatives (60° about <111>; Laue group m-3m only, ignored otherwise):
        up to 108 more fine rows per pattern.
    """

    method: str = "coarse-to-fine"
    coarse_factor: int = 2
    coarse_keep: int = 6
    radius: int = 1
    confidence: float = 7.0
    pseudo_symmetry: bool = True

    def uses_coarse_to_fine(self, resolution: float) -> bool:
        """Whether a grid of ``resolution`` degrees is searched coarse to fine: the method
        says so and the coarse grid is at most :data:`MAX_COARSE_SPACING` degrees."""
        return (self.method == "coarse-to-fine"
                and self.coarse_factor * resolution <= MAX_COARSE_SPACING + 1e-9)

    def __post_init__(self) -> None:
        if self.method not in ("coarse-to-fine", "exhaustive"):
            raise ValueError(f"search method must be 'coarse-to-fine' or 'exhaustive', got "
                             f"{self.method!r}")
        for name in ("coarse_factor", "coarse_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, np.integer)) \
                or self.radius < 0:
            raise ValueError(f"radius must be a non-negative integer, got {self.radius!r}")
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


def coarse_to_fine(patterns: Any, fine: FineRows, grid: CubochoricGrid, coarse: Any,
                   coarse_rows: np.ndarray, *, keep: int, config: SearchConfig = SearchConfig(),
                   memory_budget: int | None = None) -> MatchResult:
    """Best ``keep`` matches of every pattern by the coarse-to-fine search.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean unit-norm rows (:func:`dpm.match.prepare_patterns`), NumPy or CuPy.
    fine
        The fine dictionary's rows (:class:`FineRows`), rows of ``grid``.
    grid
        The fine cubochoric grid the dictionary was projected at.
    coarse : (m_coarse, npix) float32 array or PatternSource
        The coarse dictionary: rows ``coarse_rows`` of the fine one.
    coarse_rows : (m_coarse,) int array
        Rows of ``grid`` that make the coarse grid (:meth:`CubochoricGrid.coarse`).
    keep
        Matches kept per pattern.
    config
        Coarse stride, candidates kept, box radius and confidence.
    memory_budget
        Bytes the coarse matching and one fine tile may use (None: half the
        free memory).

    Returns
    -------
    MatchResult
        ``indices`` (n, keep) rows of ``grid`` and ``scores`` (n, keep) NCC,
        best first, equal scores in ascending index, on the patterns' device.
    """
    xp = backend.namespace(patterns)
    n = patterns.shape[0]
    budget = backend.memory_budget(xp, memory_budget)
    kc = min(int(config.coarse_keep), len(coarse_rows))
    first = match(patterns, coarse, config=MatchConfig(keep=kc, memory_budget=budget))
    coarse_best = np.asarray(coarse_rows, dtype=np.int64)[backend.to_host(first.indices)]
    scorer = _CandidateScorer(patterns, fine, keep, max(budget // 2, 1))
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
    # Matched exhaustively: patterns with fewer than ``keep`` candidates (boxes all in
    # a corner of the zone), and those whose best match is not confident.
    short = best_indices[:, -1] < 0
    unsure = np.zeros(n, dtype=bool)
    if config.confidence > 0:
        unsure = confidence(patterns, best_scores[:, 0], coarse) < config.confidence
    again = np.flatnonzero(short | unsure)
    if len(again):
        _log.debug("coarse-to-fine: %d patterns with fewer than %d candidates and %d not "
                   "confident matched exhaustively", int(short.sum()), keep, int(unsure.sum()))
        extra = match(patterns[xp.asarray(again)], _RowsSource(fine, np.arange(len(grid))),
                      config=MatchConfig(keep=keep, memory_budget=budget))
        best_scores[again] = backend.to_host(extra.scores)
        best_indices[again] = backend.to_host(extra.indices)
    return MatchResult(indices=xp.asarray(best_indices), scores=xp.asarray(best_scores))


def _pseudo_symmetry_variants(grid: CubochoricGrid) -> np.ndarray | None:
    """The 60° <111> variants (:mod:`dpm.pseudo_symmetry`) for Laue group m-3m, else None."""
    from orix.crystal_map import Phase

    from dpm.pseudo_symmetry import pseudo_symmetry_operator, pseudo_symmetry_variants

    point_group = Phase(point_group=grid.point_group).point_group
    if point_group.laue.name != "m-3m":
        return None
    return pseudo_symmetry_variants(pseudo_symmetry_operator(point_group), point_group)


def _climb(scorer: "_CandidateScorer", grid: CubochoricGrid, moved: np.ndarray,
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


class _CandidateScorer:
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


class _RowsSource:
    """Rows ``rows`` of a :class:`FineRows` as a PatternSource for :func:`dpm.match.match`.

    Every chunk is written to one reused buffer (``match`` is done with a chunk
    before it asks for the next), so no fresh memory is touched per chunk.
    """

    def __init__(self, fine: FineRows, rows: np.ndarray) -> None:
        self.fine, self.rows = fine, rows
        self._buffer: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        if self._buffer is None or len(self._buffer) < stop - start:
            self._buffer = self.fine.xp.empty((stop - start, self.fine.dictionary.n_pixels),
                                              dtype=self.fine.xp.float32)
        return self.fine.get(self.rows[start:stop], out=self._buffer)
