"""Dictionary matching: normalised cross-correlation, best ``keep`` per pattern.

Every experimental pattern is compared with every dictionary pattern by the
normalised cross-correlation (NCC). With both sides zero-mean and unit-norm
over the same pixels (:func:`prepare_patterns`), the NCC of all pairs is one
float32 matrix product, ``patterns @ dictionary.T``: OpenBLAS through NumPy's
``@`` on the CPU, cuBLAS through ``cupy.matmul`` on the GPU. The products are
never kept: each score tile is folded into a running top-``keep`` state per
pattern by a merge kernel (numba twin :func:`_topk_merge_cpu` on the CPU,
``kernels/topk.cu`` on the GPU), so memory is bounded by a byte budget while the
GEMM runs on tiles of thousands of rows and columns.

Loop order: dictionary chunks outer, pattern tiles inner. When the normalised
patterns fit the budget, every dictionary chunk is generated exactly once; when
they do not, the patterns are processed in super-chunks and the dictionary is
generated again for each (or generated once and kept, when it fits).

Tie order: among equal scores the lower dictionary index ranks first, in both
implementations of the merge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, NamedTuple, Protocol

import numba as nb
import numpy as np

from dpm import backend

_log = logging.getLogger("dpm")

#: Largest pattern tile (rows of one GEMM). 4096 x 3600 float32 is 59 MB: large
#: enough for OpenBLAS and cuBLAS to run at full rate, small enough to stream.
_MAX_TILE_ROWS = 4096
#: Largest dictionary chunk (columns of one GEMM); the score tile is at most
#: 4096 x 16384 float32 = 268 MB.
_MAX_CHUNK_ROWS = 16384
#: Largest ``keep`` the GPU merge supports (TOPK_MAX_K in kernels/topk.cu).
_GPU_MAX_KEEP = 64
#: Threads per block of the GPU merge (a power of two; see the launch site).
_GPU_THREADS = 128


class PatternSource(Protocol):
    """A dictionary that produces its patterns chunk by chunk (e.g. by projection)."""

    def __len__(self) -> int: ...

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        """Rows ``start:stop`` as a ``(stop - start, npix)`` float32 array on ``xp``,
        zero-mean and unit-norm per row over the same pixels as the patterns."""
        ...


class PreparedPatterns(NamedTuple):
    """Output of :func:`prepare_patterns` (unpacks as ``data, valid``).

    Attributes
    ----------
    data : (n, npix) float32 array
        Zero-mean, unit-L2-norm rows over the masked pixels; all-zero rows where
        ``valid`` is False (they score 0 against every dictionary pattern).
    valid : (n,) bool array
        False for patterns that are constant or hold NaN/infinite values over
        the masked pixels.
    """

    data: Any
    valid: Any


@dataclass(frozen=True)
class MatchConfig:
    """Options of :func:`match`.

    Attributes
    ----------
    keep
        Number of best dictionary matches kept per pattern (default 10; at most
        64 on the GPU).
    memory_budget
        Bytes that the patterns, the running top-k state, one dictionary chunk
        and one score tile may occupy together on the patterns' device. None
        uses half of the free host or device memory
        (:func:`dpm.backend.memory_budget`). Chunk sizes derive from it.
    progress
        False (silent), True (a tqdm progress bar), or a callable
        ``progress(done, total)`` called after each dictionary chunk with the
        number of pattern-dictionary pairs scored so far and in all.
    """

    keep: int = 10
    memory_budget: int | None = None
    progress: bool | Callable[[int, int], None] = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, np.integer)) \
                or self.keep < 1:
            raise ValueError(f"keep must be a positive integer, got {self.keep!r}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(
                f"memory_budget must be a positive number of bytes or None, got "
                f"{self.memory_budget!r}")


@dataclass(frozen=True)
class MatchResult:
    """Best matches of every pattern, on the patterns' device.

    Attributes
    ----------
    indices : (n, keep) int64 array
        Dictionary row of each match, best first (descending score; equal
        scores in ascending dictionary index).
    scores : (n, keep) float32 array
        Normalised cross-correlation of each match, in [-1, 1].
    """

    indices: Any
    scores: Any


def prepare_patterns(patterns: Any, *, mask: Any = None) -> PreparedPatterns:
    """Flatten, mask and normalise patterns to zero mean and unit norm per row.

    Unreadable patterns do not stop a large map: a pattern that is constant or
    holds NaN/infinite values over the masked pixels becomes an all-zero row
    (it scores 0 against every dictionary pattern) and is flagged in ``valid``;
    a warning names the first offenders. Only when *every* pattern holds
    non-finite values (a wrong reader, a corrupt file) is it an error.

    Parameters
    ----------
    patterns : (n, sy, sx) or (n, npix) array
        Pattern intensities of any real dtype, NumPy or CuPy (the output lives
        on the same device). Not modified.
    mask : (sy, sx) bool array, optional
        Signal mask, True where a detector pixel is used (for ``(n, npix)``
        input, any bool array of ``npix`` elements in row-major pixel order).
        Apply the same mask to the dictionary patterns. None uses every pixel.

    Returns
    -------
    PreparedPatterns
        ``(data, valid)``: ``data`` (n, npix_used) float32 with ``npix_used =
        mask.sum()``, ``valid`` (n,) bool; both on the patterns' device.

    Raises
    ------
    ValueError
        If the shapes disagree, the mask selects fewer than 2 pixels, the stack
        is empty, or every pattern holds NaN or infinite values.
    TypeError
        If ``patterns`` is not of a real numeric dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from dpm.match import prepare_patterns
    >>> data, valid = prepare_patterns(np.arange(8.0).reshape(2, 2, 2))
    >>> data.shape, valid.tolist()
    ((2, 4), [True, True])
    """
    xp = backend.namespace(patterns)
    patterns = xp.asarray(patterns)
    if patterns.dtype.kind not in "biuf":
        raise TypeError(f"patterns must be of a real numeric dtype, got {patterns.dtype}")
    if patterns.ndim not in (2, 3):
        raise ValueError(
            f"Expected patterns of shape (n, sy, sx) or (n, npix), got {patterns.shape}")
    n = patterns.shape[0]
    if patterns.size == 0:
        raise ValueError(f"patterns is empty (shape {patterns.shape})")
    flat = patterns.reshape(n, -1)
    if mask is not None:
        mask = np.asarray(backend.to_host(mask), dtype=bool)
        if patterns.ndim == 3 and mask.shape != patterns.shape[1:]:
            raise ValueError(
                f"signal mask shape {mask.shape} differs from the pattern shape "
                f"{patterns.shape[1:]}")
        if mask.size != flat.shape[1]:
            raise ValueError(
                f"signal mask has {mask.size} elements, patterns have {flat.shape[1]} pixels")
        used = xp.asarray(np.flatnonzero(mask.ravel()))
        data = flat[:, used].astype(xp.float32, copy=False)
    else:
        data = flat.astype(xp.float32, copy=True)
    if data.shape[1] < 2:
        raise ValueError(f"need at least 2 pixels per pattern to normalise, got {data.shape[1]}")

    finite = xp.isfinite(data).all(axis=1)
    data[~finite] = 0
    constant = data.max(axis=1) == data.min(axis=1)
    valid = finite & ~constant
    data -= data.mean(axis=1, keepdims=True)
    data[~valid] = 0
    norm = (data * data).sum(axis=1) ** 0.5
    norm[~valid] = 1
    data /= norm[:, None]

    finite_host = backend.to_host(finite)
    if not finite_host.any():
        raise ValueError(f"every one of the {n} patterns holds NaN or infinite values")
    valid_host = backend.to_host(valid)
    if not valid_host.all():
        bad = np.flatnonzero(~valid_host)
        _log.warning(
            "%d of %d patterns are constant or non-finite and become zero rows "
            "(first: %s)", bad.size, n, bad[:10].tolist())
    return PreparedPatterns(data, valid)


@nb.njit(inline="always", cache=True)
def _beats(score: float, index: int, other_score: float, other_index: int) -> bool:
    """Order of the top-k lists: higher score first, then lower dictionary index.

    An empty slot (``other_index < 0``) loses to any candidate except NaN, and
    NaN beats nothing (comparisons with NaN are False).
    """
    if other_index < 0:
        return score == score
    return score > other_score or (score == other_score and index < other_index)


@nb.njit(parallel=True, cache=True)
def _topk_merge_cpu(scores: np.ndarray, offset: int, best_scores: np.ndarray,
                    best_indices: np.ndarray) -> None:
    """Fold a score tile into the running top-k of each row (CPU twin of topk.cu).

    Contract, shared with ``topk_merge`` in ``kernels/topk.cu``: afterwards row
    ``r`` of ``(best_scores, best_indices)`` holds the ``k`` best of its previous
    entries and the candidates ``(scores[r, j], offset + j)``, ordered by
    descending score and, among equal scores, ascending dictionary index. Slots
    with index -1 are empty (their score, -inf, is ignored) and lose to any
    candidate; NaN scores never enter. Rows are independent (one per thread).

    Parameters
    ----------
    scores : (rows, cols) float32 array
        NCC of ``rows`` patterns with dictionary rows ``offset .. offset+cols-1``.
    offset
        Dictionary index of column 0.
    best_scores : (rows, k) float32 array
        Running best scores, sorted as above; updated in place.
    best_indices : (rows, k) int64 array
        Their dictionary indices; updated in place.
    """
    rows, cols = scores.shape
    k = best_scores.shape[1]
    for r in nb.prange(rows):
        row_s = best_scores[r]
        row_i = best_indices[r]
        for j in range(cols):
            v = scores[r, j]
            idx = offset + j
            # Against the row's k-th best: rejects almost every candidate.
            if _beats(v, idx, row_s[k - 1], row_i[k - 1]):
                p = k - 1
                while p > 0 and _beats(v, idx, row_s[p - 1], row_i[p - 1]):
                    row_s[p] = row_s[p - 1]
                    row_i[p] = row_i[p - 1]
                    p -= 1
                row_s[p] = v
                row_i[p] = idx


def _topk_merge_gpu(scores: Any, offset: int, best_scores: Any, best_indices: Any) -> None:
    """Launch ``topk_merge`` of ``kernels/topk.cu`` (same contract as the CPU twin)."""
    rows, cols = scores.shape
    k = best_scores.shape[1]
    kernel = backend.load_kernel("topk", "topk_merge")
    # One block per pattern row; thread t scans columns t, t + B, ... (coalesced
    # loads) keeping a private top-k, then the block merges the private lists and
    # the row's state in k rounds of a shared-memory argmax. B = 128 threads
    # (4 warps) gives each thread ~cols/128 candidates of a 16384-column tile and
    # 4096 blocks per tile, many waves over 132 SMs; fewer threads when the tile
    # is narrower (B must be a power of two for the tree reduction).
    # Written in place: best_scores, best_indices (rows of the running state).
    threads = min(_GPU_THREADS, 1 << max(cols - 1, 0).bit_length())
    grid = (rows,)
    block = (threads,)
    shared = threads * (8 + 4 + 4)  # per thread: candidate index, score, owner
    kernel(grid, block, (scores, np.int32(rows), np.int32(cols), np.int64(offset),
                         best_scores, best_indices, np.int32(k)), shared_mem=shared)


def _topk_merge(xp: ModuleType, scores: Any, offset: int, best_scores: Any,
                best_indices: Any) -> None:
    """Dispatch the running top-k merge to the numba twin or the CUDA kernel."""
    if xp is np:
        _topk_merge_cpu(scores, offset, best_scores, best_indices)
    else:
        _topk_merge_gpu(scores, offset, best_scores, best_indices)


@dataclass(frozen=True)
class _Plan:
    """Chunk sizes of one :func:`match` call (rows of each piece)."""

    super_rows: int  # patterns per super-chunk
    tile_rows: int  # patterns per GEMM
    chunk_rows: int  # dictionary patterns per chunk (columns per GEMM)
    keep_dictionary: bool  # generate the dictionary once and keep it


def _plan_chunks(n: int, m: int, npix: int, keep: int, budget: int, resident: bool) -> _Plan:
    """Split ``budget`` bytes between patterns, top-k state, dictionary chunk and scores.

    Half the budget at most goes to the patterns and their state; if all fit,
    one super-chunk and every dictionary chunk is generated once. Otherwise the
    dictionary is kept whole when it fits half of what remains (and is not
    already a resident array). The rest holds one dictionary chunk and one
    ``tile_rows x chunk_rows`` float32 score tile.
    """
    pattern_bytes = 4 * npix + 12 * keep  # float32 row + float32/int64 state
    dictionary_bytes = 4 * npix
    half = budget // 2
    super_rows = n if n * pattern_bytes <= half else half // pattern_bytes
    minimum = pattern_bytes + dictionary_bytes + 4
    if super_rows < 1:
        raise ValueError(f"memory budget of {budget} bytes is too small: matching needs at "
                         f"least {2 * minimum} bytes for {npix}-pixel patterns")
    rest = budget - super_rows * pattern_bytes
    keep_dictionary = super_rows < n and not resident and m * dictionary_bytes <= rest // 2
    if keep_dictionary:
        rest -= m * dictionary_bytes
    per_chunk_row = 0 if keep_dictionary else dictionary_bytes
    tile_rows = min(super_rows, _MAX_TILE_ROWS)
    chunk_rows = min(m, _MAX_CHUNK_ROWS, rest // (per_chunk_row + 4 * tile_rows))
    while chunk_rows < min(m, tile_rows) and tile_rows > 1:
        tile_rows = max(1, tile_rows // 2)
        chunk_rows = min(m, _MAX_CHUNK_ROWS, rest // (per_chunk_row + 4 * tile_rows))
    if chunk_rows < 1:
        raise ValueError(f"memory budget of {budget} bytes is too small: matching needs at "
                         f"least {2 * minimum} bytes for {npix}-pixel patterns")
    return _Plan(super_rows, tile_rows, chunk_rows, keep_dictionary)


class _ArraySource:
    """A dictionary array seen as a :class:`PatternSource` (rows moved to ``xp``)."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        rows = self.array[start:stop]
        return backend.to_host(rows) if xp is np else xp.asarray(rows)


def _checked_chunk(source: PatternSource, start: int, stop: int, xp: ModuleType,
                   patterns_shape: tuple[int, int]) -> Any:
    """Fetch dictionary rows ``start:stop`` and check their shape, dtype and device."""
    chunk = source.chunk(start, stop, xp)
    if backend.namespace(chunk) is not xp:
        raise TypeError(f"dictionary chunk [{start}:{stop}] is on another device than the "
                        f"patterns (array module {xp.__name__} expected)")
    expected = (stop - start, patterns_shape[1])
    if tuple(chunk.shape) != expected:
        raise ValueError(
            f"dictionary chunk [{start}:{stop}] has shape {tuple(chunk.shape)}, expected "
            f"{expected}: patterns have shape {patterns_shape} (same pixels needed)")
    if chunk.dtype != np.float32:
        raise TypeError(f"dictionary chunk [{start}:{stop}] has dtype {chunk.dtype}, "
                        "expected float32")
    return xp.ascontiguousarray(chunk)


def _progress_callback(progress: bool | Callable[[int, int], None], total: int
                       ) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A ``(done, total)`` callback for ``progress`` and a function that closes it."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="pair", unit_scale=True, desc="matching")

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


def match(patterns: Any, dictionary: Any, *, config: MatchConfig = MatchConfig()) -> MatchResult:
    """Best ``config.keep`` dictionary matches of every pattern by NCC.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean, unit-norm rows (:func:`prepare_patterns`), NumPy or CuPy;
        the computation and the result live on their device.
    dictionary : (m, npix) float32 array or PatternSource
        Normalised dictionary patterns over the same pixels, either as an
        array (on any device; rows are moved to the patterns' device chunk by
        chunk) or as an object with ``__len__`` and ``chunk(start, stop, xp)``
        returning rows ``start:stop`` as a float32 array on ``xp``.
    config
        ``keep``, the memory budget and progress reporting.

    Returns
    -------
    MatchResult
        ``indices`` (n, keep) int64 and ``scores`` (n, keep) float32 on the
        patterns' device, best first; equal scores in ascending dictionary
        index. Scores are the NCC ``sum(p * d)`` in [-1, 1].

    Raises
    ------
    ValueError
        For empty inputs, pixel counts that differ between patterns and
        dictionary (naming both shapes), ``keep`` larger than the dictionary (or
        than 64 on the GPU), a budget too small for one pattern and one
        dictionary row, or a dictionary whose scores are NaN so that fewer than
        ``keep`` matches exist.
    TypeError
        For arrays that are not float32 or a dictionary of another type.

    Examples
    --------
    >>> import numpy as np
    >>> from dpm.match import MatchConfig, match, prepare_patterns
    >>> rng = np.random.default_rng(0)
    >>> dictionary, _ = prepare_patterns(rng.random((50, 16)))
    >>> result = match(dictionary[[7, 3]], dictionary, config=MatchConfig(keep=2))
    >>> result.indices[:, 0].tolist()
    [7, 3]
    """
    xp = backend.namespace(patterns)
    if getattr(patterns, "ndim", None) != 2:
        raise ValueError(f"Expected patterns of shape (n, npix), got "
                         f"{getattr(patterns, 'shape', type(patterns).__name__)}")
    if patterns.dtype != np.float32:
        raise TypeError(f"patterns must be float32 (see prepare_patterns), got {patterns.dtype}")
    n, npix = patterns.shape
    if n == 0 or npix == 0:
        raise ValueError(f"patterns is empty (shape {patterns.shape})")
    if hasattr(dictionary, "chunk") and hasattr(dictionary, "__len__"):
        source: PatternSource = dictionary
        resident = False
    elif hasattr(dictionary, "ndim") and hasattr(dictionary, "dtype"):
        if dictionary.ndim != 2 or dictionary.shape[1] != npix:
            raise ValueError(f"dictionary shape {dictionary.shape} does not match patterns "
                             f"shape {patterns.shape}: expected (m, {npix})")
        if dictionary.dtype != np.float32:
            raise TypeError(f"dictionary must be float32, got {dictionary.dtype}")
        source = _ArraySource(dictionary)
        resident = backend.namespace(dictionary) is xp
    else:
        raise TypeError("dictionary must be an (m, npix) float32 array or an object with "
                        f"__len__ and chunk(start, stop, xp), got {type(dictionary).__name__}")
    m = len(source)
    keep = int(config.keep)
    if m == 0:
        raise ValueError("dictionary is empty")
    if keep > m:
        raise ValueError(f"keep={keep} exceeds the dictionary size {m}")
    if xp is not np and keep > _GPU_MAX_KEEP:
        raise ValueError(f"keep={keep} exceeds {_GPU_MAX_KEEP}, the most the GPU merge supports")

    budget = backend.memory_budget(xp, config.memory_budget)
    plan = _plan_chunks(n, m, npix, keep, budget, resident)
    _log.debug("match: %d patterns x %d dictionary rows of %d px; budget %d B -> %s",
               n, m, npix, budget, plan)
    patterns = xp.ascontiguousarray(patterns)
    best_scores = xp.full((n, keep), -np.inf, dtype=xp.float32)
    best_indices = xp.full((n, keep), -1, dtype=xp.int64)
    tile_buffer = xp.empty(plan.tile_rows * plan.chunk_rows, dtype=xp.float32)
    kept = xp.empty((m, npix), dtype=xp.float32) if plan.keep_dictionary else None
    report, close = _progress_callback(config.progress, n * m)
    done = 0
    try:
        for s0 in range(0, n, plan.super_rows):
            s1 = min(n, s0 + plan.super_rows)
            for c0 in range(0, m, plan.chunk_rows):
                c1 = min(m, c0 + plan.chunk_rows)
                if kept is not None and s0 > 0:
                    chunk = kept[c0:c1]
                else:
                    chunk = _checked_chunk(source, c0, c1, xp, (n, npix))
                    if kept is not None:
                        kept[c0:c1] = chunk
                for t0 in range(s0, s1, plan.tile_rows):
                    t1 = min(s1, t0 + plan.tile_rows)
                    tile = tile_buffer[: (t1 - t0) * (c1 - c0)].reshape(t1 - t0, c1 - c0)
                    xp.matmul(patterns[t0:t1], chunk.T, out=tile)
                    _topk_merge(xp, tile, c0, best_scores[t0:t1], best_indices[t0:t1])
                done += (s1 - s0) * (c1 - c0)
                if report is not None:
                    report(done, n * m)
    finally:
        close()
    missing = backend.to_host((best_indices[:, -1] < 0))
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(f"patterns {rows[:10].tolist()} have fewer than keep={keep} finite "
                         "scores: the dictionary or the patterns hold NaN values")
    return MatchResult(indices=best_indices, scores=best_scores)
