"""Dictionary compression: match in the span of the dictionary's principal components.

Exhaustive matching costs ``2 m npix`` FLOP per pattern (``m`` dictionary
rows of ``npix`` pixels). Dictionary patterns are far from independent: on a
60 × 60 px Li dictionary the leading ~550 principal components carry 80 % of
the energy, ~770 carry 90 % and ~1000 carry 95 %. Projecting dictionary and
patterns onto the leading ``k`` components replaces each ``npix``-pixel row
by ``k`` coefficients, and the approximate NCC ``(p B^T) . (d B^T)`` (the
part of ``p . d`` inside the span) costs ``2 m k`` FLOP per pattern. The best
``rerank`` approximate matches of each pattern are then rescored exactly
against the full-resolution dictionary rows, so every score returned is the
true NCC of a real dictionary row, and the result equals exhaustive matching
wherever the exhaustive best match is among those candidates.

The basis. Dictionary rows are zero-mean and unit-norm, so the uncentred SVD
of the dictionary matrix is its PCA and the total energy is the row count.
Every ``sample_stride``-th row enters a randomized SVD (Halko, Martinsson &
Tropp 2011, SIAM Rev. 53, 217) run chunk by chunk on the row space: from a
Gaussian start ``Q`` (``npix × l``, ``l = k + oversampling``), each pass
over the sample rows ``A`` accumulates ``A^T (A Q)`` chunk by chunk, and
``Q`` is re-orthonormalised (``power_iterations + 1`` such passes); a final
pass accumulates ``(A Q)^T (A Q)``, whose eigenvectors give the Ritz vectors
and its eigenvalues the explained energy. ``k`` is the smallest component
count that keeps ``energy`` of it; when ``l`` turns out too small for that,
the search is repeated with a larger ``l`` started from the components found
(the first ``l`` is a quarter of the pixel count).

Costs. Basis: ``power_iterations + 2`` passes over ``m / sample_stride``
projected rows, ``4 (m / stride) npix l`` FLOP each; coefficients: one pass
over all ``m`` rows, ``2 m npix k`` FLOP; both are cached on disk (under
``$DPM_CACHE_DIR/compressed``, keyed by the dictionary's cache identity and
the compression settings), so a second map with the same set-up only reads
``4 m k`` bytes. Matching: ``2 n k (npix + m)`` FLOP for ``n`` patterns, plus
the exact rescoring of ``rerank`` rows per pattern, projected on demand
(:class:`dpm.search.FineRows`). Memory: one chunk of rows, ``npix × l``
float32 accumulators and the ``m × k`` coefficients.
"""

from __future__ import annotations

import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from dpm import backend
from dpm.match import MatchConfig, MatchResult, match
from dpm.search import CandidateScorer, FineRows

_log = logging.getLogger("dpm")

#: Rows projected and multiplied per step (8192 x 3600 float32 is 118 MB).
_CHUNK_ROWS = 8192
#: Version of the cache file layout; files of another version are rebuilt.
CACHE_VERSION = 1


def _is_count(value: Any, least: int) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, np.integer))
            and value >= least)


@dataclass(frozen=True)
class CompressionConfig:
    """How the dictionary is compressed and matched.

    Attributes
    ----------
    energy
        Fraction of the dictionary's energy (sum of squared pixel values, one
        per normalised row) the principal components keep, in (0, 1].
        Measured on the bench map (2 400 Li patterns of 60 x 60 px, 2° grid
        of 100 347 orientations, 1 thread): 0.9 (776 components, 3.7–4.6 s
        per match instead of 24–31 s exhaustive) with ``rerank`` 8 or more
        equals exhaustive matching on every diffracting pixel, and so does
        0.5 (228 components, 1.5 s) with ``rerank`` 16; but 0.5 finds the
        exhaustive best match for only half of the patterns of a 5° grid
        at 30 x 30 px, whose neighbouring rows are less alike, while 0.9
        finds it for ≥ 95 % (``tests/test_search.py``). See
        ``bench/test_bench_compression.py`` for 0.5–0.95.
    rerank
        Best approximate matches of each pattern rescored exactly against the
        full-resolution dictionary rows (at least the ``keep`` asked for). At
        energy 0.9 on the bench map: 4 agree with exhaustive matching on
        99.957 % of the diffracting pixels, 8 and 16 on all; at energy 0.5, 8
        on 99.74 % and 16 on all.
    sample_stride
        Every ``sample_stride``-th dictionary row enters the randomized SVD.
        The basis fits its sample better than the other rows: at 0.9 of the
        sample's energy, the whole bench dictionary keeps 0.894 (stride 4),
        0.885 (8), 0.864 (16).
    oversampling
        Columns beyond the component count in the randomized range finder.
    power_iterations
        Extra passes ``Q <- orth(A^T A Q)`` over the sample (accuracy of the
        trailing components; 0 = one pass of the range finder only).
    seed
        Seed of the Gaussian start (NumPy ``default_rng``).
    """

    energy: float = 0.9
    rerank: int = 16
    sample_stride: int = 4
    oversampling: int = 64
    power_iterations: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float, np.floating)) \
                or not 0 < self.energy <= 1:
            raise ValueError(f"energy must be a fraction in (0, 1], got {self.energy!r}")
        for name in ("rerank", "sample_stride"):
            if not _is_count(getattr(self, name), 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("oversampling", "power_iterations", "seed"):
            if not _is_count(getattr(self, name), 0):
                raise ValueError(f"{name} must be a non-negative integer, got "
                                 f"{getattr(self, name)!r}")

    def cache_identity(self) -> str:
        """The settings the compressed dictionary depends on (``rerank`` only affects matching)."""
        return (f"energy={float(self.energy)!r};stride={int(self.sample_stride)};"
                f"oversampling={int(self.oversampling)};power={int(self.power_iterations)};"
                f"seed={int(self.seed)}")


class PrincipalBasis(NamedTuple):
    """Output of :func:`principal_basis` (unpacks as ``components, explained``).

    Attributes
    ----------
    components : (k, npix) float32 host array
        Orthonormal principal directions in pixel space, leading first.
    explained : (l,) float64 host array
        ``explained[j]``: fraction of the rows' energy kept by the first
        ``j + 1`` components found (``l >= k``; the last ones are least accurate).
    """

    components: np.ndarray
    explained: np.ndarray


class _Rows:
    """Rows of an array or a PatternSource, chunk by chunk on ``xp``."""

    def __init__(self, rows: Any) -> None:
        if hasattr(rows, "chunk") and hasattr(rows, "__len__"):
            self.source, self.array = rows, None
        elif getattr(rows, "ndim", None) == 2:
            if rows.dtype != np.float32:
                raise TypeError(f"rows must be float32, got {rows.dtype}")
            self.source, self.array = None, rows
        else:
            raise TypeError("rows must be an (m, npix) float32 array or an object with __len__ "
                            f"and chunk(start, stop, xp), got {type(rows).__name__}")

    def __len__(self) -> int:
        return len(self.source) if self.array is None else self.array.shape[0]

    def chunks(self, xp: ModuleType):
        for start in range(0, len(self), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(self))
            if self.array is None:
                yield self.source.chunk(start, stop, xp)
            else:
                yield xp.asarray(self.array[start:stop])


def principal_basis(rows: Any, *, config: CompressionConfig = CompressionConfig(),
                    xp: ModuleType = np) -> PrincipalBasis:
    """Leading principal components of normalised rows by a chunked randomized SVD.

    Parameters
    ----------
    rows : (m, npix) float32 array or PatternSource
        Zero-mean unit-norm rows (e.g. every ``sample_stride``-th dictionary
        row), read chunk by chunk; never held in memory together.
    config
        ``energy``, ``oversampling``, ``power_iterations`` and ``seed`` are used.
    xp
        Array module the products run on (NumPy or CuPy); the small dense
        factorisations (QR, symmetric eigenproblem) run on the host in float64.

    Returns
    -------
    PrincipalBasis
        ``components`` (k, npix) float32, ``k`` the smallest count whose
        explained fraction reaches ``config.energy``, and ``explained``, the
        energy curve of the components found (the total energy is measured
        on the rows, the row count for unit-norm rows).

    Raises
    ------
    ValueError
        For an empty set of rows or rows of no energy.

    Examples
    --------
    >>> import numpy as np
    >>> from dpm.compression import CompressionConfig, principal_basis
    >>> rng = np.random.default_rng(0)
    >>> rows = (rng.standard_normal((200, 3)) @ rng.standard_normal((3, 50))).astype(np.float32)
    >>> basis = principal_basis(rows, config=CompressionConfig(energy=0.999))
    >>> basis.components.shape
    (3, 50)
    """
    source = _Rows(rows)
    m = len(source)
    if m == 0:
        raise ValueError("principal_basis needs at least one row")
    total, npix = 0.0, None
    for chunk in source.chunks(xp):
        total += float((chunk * chunk).sum())
        npix = chunk.shape[1]
    if not total > 0:
        raise ValueError(f"the {m} rows have no energy (all zero)")
    cap = min(npix, m)
    p = int(config.oversampling)
    rng = np.random.default_rng(int(config.seed))
    width = min(cap, max(2 * p, npix // 4, 1))
    start = rng.standard_normal((npix, width))
    while True:
        q = _orthonormal(start)
        for _ in range(int(config.power_iterations) + 1):
            q = _orthonormal(_pass(source, xp, q, gram=False))
        gram = _pass(source, xp, q, gram=True)
        values, vectors = np.linalg.eigh(gram)
        values, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1]
        ritz = q @ vectors
        explained = np.cumsum(values) / total
        reached = np.flatnonzero(explained >= config.energy)
        k = int(reached[0]) + 1 if len(reached) else width
        if width == cap or (len(reached) and k + p <= width):
            break
        # Too few columns for the energy asked: start again, wider, from what was found;
        # when the energy was not reached, as far again as the curve's last slope says
        # it lies (the slope only falls further on).
        if len(reached):
            wider = k + 2 * p
        else:
            tail = min(p, width - 1) or 1
            slope = (explained[-1] - explained[-1 - tail]) / tail if width > 1 else 0.0
            need = (config.energy - explained[-1]) / slope if slope > 0 else np.inf
            wider = width + 2 * p + int(min(1.5 * need, cap))
        wider = max(min(cap, wider), width + 1)
        _log.debug("principal_basis: %d columns keep %.4f of the energy (k=%d); retrying "
                   "with %d", width, explained[-1], k, wider)
        start = np.concatenate([ritz, rng.standard_normal((npix, wider - width))], axis=1)
        width = wider
    components = np.ascontiguousarray(ritz[:, :k].T, dtype=np.float32)
    return PrincipalBasis(components, explained)


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning ``y`` (host, float64)."""
    q, _ = np.linalg.qr(np.asarray(y, dtype=np.float64))
    return q


def _pass(source: _Rows, xp: ModuleType, q: np.ndarray, *, gram: bool) -> np.ndarray:
    """One pass over the rows ``A``: ``A^T A q`` (npix, l), or ``(A q)^T (A q)`` (l, l)."""
    qd = xp.asarray(np.ascontiguousarray(q, dtype=np.float32))
    width = q.shape[1]
    acc = xp.zeros((width, width) if gram else q.shape, dtype=xp.float32)
    for chunk in source.chunks(xp):
        z = xp.matmul(chunk, qd)
        acc += xp.matmul(z.T, z) if gram else xp.matmul(chunk.T, z)
    out = backend.to_host(acc).astype(np.float64)
    return (out + out.T) / 2 if gram else out


@dataclass(frozen=True, eq=False)
class CompressedDictionary:
    """A dictionary's rows as coefficients over its leading principal components.

    Attributes
    ----------
    basis : (k, npix) float32 host array
        Orthonormal principal directions in pixel space (over the dictionary's
        masked pixels).
    coefficients : (m, k) float32 host array
        ``coefficients[j] = basis @ row_j`` for every dictionary row.
    explained : (l,) float64 host array
        Explained-energy curve of the sampled rows (:class:`PrincipalBasis`).
    energy
        Fraction of the whole dictionary's energy the ``k`` components keep
        (``sum(coefficients**2)`` over the rows' energy).
    config
        The settings it was built with.
    path
        Its cache file.
    """

    basis: np.ndarray
    coefficients: np.ndarray
    explained: np.ndarray
    energy: float
    config: CompressionConfig
    path: Path | None = None
    _device_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def n_components(self) -> int:
        """Number of principal components ``k``."""
        return int(self.basis.shape[0])

    def __len__(self) -> int:
        return int(self.coefficients.shape[0])

    def on(self, xp: ModuleType) -> tuple[Any, Any]:
        """``(basis, coefficients)`` on ``xp``, uploaded once."""
        if xp is np:
            return self.basis, self.coefficients
        if xp not in self._device_cache:
            self._device_cache[xp] = (xp.asarray(self.basis), xp.asarray(self.coefficients))
        return self._device_cache[xp]


def compression_key(dictionary: Any, config: CompressionConfig) -> str:
    """Cache key of a compressed dictionary: the dictionary's cache identity (master
    pattern, detector, mask, orientations) and the compression settings."""
    from dpm.chunks import dictionary_key
    from dpm.store import array_hash

    return array_hash(extra=f"compressed-v{CACHE_VERSION};"
                            f"{dictionary_key(dictionary, dictionary.master)};"
                            f"{config.cache_identity()}")


def compress(dictionary: Any, *, config: CompressionConfig = CompressionConfig(),
             xp: ModuleType = np) -> CompressedDictionary:
    """The compressed form of a dictionary, read from the cache or built and cached.

    Built chunk by chunk: the basis from every ``config.sample_stride``-th row
    (:func:`principal_basis`), then every row projected from the master
    pattern and multiplied by the basis; the dictionary is never in memory
    whole. The result is written to ``$DPM_CACHE_DIR/compressed/KEY.npz``
    (:func:`compression_key`; whole or not at all); a later call with the same
    dictionary and settings reads it. A cache file that cannot be read or
    does not fit the dictionary is built again (with a warning naming it); a
    cache folder that cannot be written only costs the reuse.

    Parameters
    ----------
    dictionary
        A :class:`dpm.dictionary.Dictionary` (master pattern, detector,
        orientations, mask).
    config
        Energy kept and randomized-SVD settings.
    xp
        Array module the projections and products run on.

    Returns
    -------
    CompressedDictionary
        Basis and coefficients on the host, with the energy kept.
    """
    from dpm.dictionary import Dictionary
    from dpm.io.writers import atomic_write
    from dpm.master.cache import cache_dir

    key = compression_key(dictionary, config)
    path = cache_dir() / "compressed" / f"{key}.npz"
    if path.is_file():
        try:
            found = _read(path, key, dictionary, config)
            _log.info("compressed dictionary from the cache: %s", path)
            return found
        except ValueError as e:
            _log.warning("rebuilding the compressed dictionary: %s", e)
    t = time.perf_counter()
    sample = Dictionary(dictionary.master, dictionary.detector,
                        dictionary.quaternions[::int(config.sample_stride)], mask=dictionary.mask)
    components, explained = principal_basis(sample, config=config, xp=xp)
    basis = xp.asarray(components)
    m, k = len(dictionary), len(components)
    coefficients = np.empty((m, k), dtype=np.float32)
    buffer = xp.empty((min(_CHUNK_ROWS, m), dictionary.n_pixels), dtype=xp.float32)
    total = kept = 0.0
    for start in range(0, m, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, m)
        rows = dictionary.chunk(start, stop, xp, out=buffer[:stop - start])
        c = xp.matmul(rows, basis.T)
        total += float((rows * rows).sum())
        kept += float((c * c).sum())
        coefficients[start:stop] = backend.to_host(c)
    result = CompressedDictionary(components, coefficients, explained, kept / total, config, path)
    _log.info("compressed dictionary: %d rows onto %d components (%.4f of the energy) in "
              "%.1f s", m, k, result.energy, time.perf_counter() - t)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), basis=components, coefficients=coefficients,
                     explained=explained, energy=np.array(result.energy))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as e:
        _log.warning("could not cache the compressed dictionary in %s (%s)", path.parent, e)
    return result


def _read(path: Path, key: str, dictionary: Any, config: CompressionConfig
          ) -> CompressedDictionary:
    """A cache file, checked against its key and the dictionary's shape (ValueError if not)."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in
                      ("key", "basis", "coefficients", "explained", "energy")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable cache file ({e})") from None
    basis, coefficients = arrays["basis"], arrays["coefficients"]
    if str(arrays["key"]) != key:
        raise ValueError(f"{path}: cache file of another dictionary or settings "
                         f"(key {arrays['key']}, expected {key})")
    expected = (len(dictionary), dictionary.n_pixels)
    if basis.ndim != 2 or coefficients.shape != (expected[0], basis.shape[0]) \
            or basis.shape[1] != expected[1] or basis.dtype != np.float32 \
            or coefficients.dtype != np.float32:
        raise ValueError(f"{path}: cache file holds basis {basis.shape} {basis.dtype} and "
                         f"coefficients {coefficients.shape} {coefficients.dtype}, expected "
                         f"(k, {expected[1]}) and ({expected[0]}, k) float32")
    return CompressedDictionary(basis, coefficients, arrays["explained"], float(arrays["energy"]),
                                config, path)


def match_compressed(patterns: Any, compressed: CompressedDictionary, fine: FineRows, *,
                     keep: int = 1, rerank: int | None = None,
                     memory_budget: int | None = None) -> MatchResult:
    """Best ``keep`` matches of every pattern: approximate in the reduced space, then exact.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean unit-norm rows (:func:`dpm.match.prepare_patterns`) over the
        dictionary's pixels, NumPy or CuPy; the result lives on their device.
    compressed
        The compressed dictionary (:func:`compress`).
    fine
        The full-resolution rows of the same dictionary
        (:class:`dpm.search.FineRows`), for the exact rescoring.
    keep
        Matches returned per pattern.
    rerank
        Approximate matches rescored exactly per pattern (None:
        ``compressed.config.rerank``); at least ``keep``.
    memory_budget
        Bytes the approximate matching and one rescoring tile may use (None:
        half the free memory).

    Returns
    -------
    MatchResult
        ``indices`` (n, keep) int64 dictionary rows and ``scores`` (n, keep)
        float32, their exact NCC with the full-resolution rows, best first
        (equal scores in ascending row).

    Raises
    ------
    ValueError
        For patterns whose pixel count differs from the basis', ``keep`` or
        ``rerank`` below 1, or ``rerank`` below ``keep`` or above the
        dictionary size.
    """
    xp = backend.namespace(patterns)
    if getattr(patterns, "ndim", None) != 2 or patterns.shape[1] != compressed.basis.shape[1]:
        raise ValueError(f"Expected patterns of shape (n, {compressed.basis.shape[1]}), got "
                         f"{getattr(patterns, 'shape', type(patterns).__name__)}")
    rerank = int(compressed.config.rerank if rerank is None else rerank)
    if not _is_count(keep, 1) or not keep <= rerank <= len(compressed):
        raise ValueError(f"need 1 <= keep <= rerank <= {len(compressed)} (dictionary rows), "
                         f"got keep={keep!r}, rerank={rerank!r}")
    if len(fine.dictionary) != len(compressed):
        raise ValueError(f"fine rows of a {len(fine.dictionary)}-row dictionary given for a "
                         f"compressed dictionary of {len(compressed)} rows")
    budget = backend.memory_budget(xp, memory_budget)
    basis, coefficients = compressed.on(xp)
    reduced = xp.ascontiguousarray(xp.matmul(patterns, basis.T))
    approximate = match(reduced, coefficients,
                        config=MatchConfig(keep=rerank, memory_budget=budget))
    candidates = backend.to_host(approximate.indices)
    scorer = CandidateScorer(patterns, fine, int(keep), max(budget // 2, 1))
    scores, rows = scorer.score(np.arange(len(candidates)), candidates,
                                np.argsort(candidates[:, 0], kind="stable"))
    return MatchResult(indices=xp.asarray(rows), scores=xp.asarray(scores))
