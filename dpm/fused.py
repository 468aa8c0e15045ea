"""Fused on-the-fly dictionary matching: project, correlate and keep the top-k in one kernel.

:func:`dpm.match.match` projects the dictionary chunk by chunk into memory and
scores it with a GEMM. :func:`match_on_the_fly` computes the same top-k
without ever storing a dictionary pattern: on a GPU, ``kernels/fused_match.cu``
generates each tile of dictionary pixels from the master pattern straight
into shared memory, multiplies it with a tile of experimental patterns, and
folds the scores into a running top-k per pattern (see that file for the
launch geometry and the expected H100 throughput). On the CPU the NumPy path
*is* the reference: dictionary rows from :meth:`dpm.dictionary.Dictionary.chunk`
(``kernels/project.cu``'s numba twin), both operands rounded by
:func:`round_to_precision`, then :func:`dpm.match.match`. So the reduced
precisions' accuracy loss can be measured on any machine.

Precision options (operands rounded, products accumulated in float32):

``"fp32"``
    No rounding.
``"tf32"``
    Mantissa rounded to 10 bits, to nearest with ties away from zero (the
    ``cvt.rna.tf32.f32`` rounding that feeds TF32 tensor cores).
``"fp16"``
    IEEE half precision, round to nearest even (``__float2half_rn``).

Both reduced precisions have 10 mantissa bits (unit roundoff 2^-11). The
kernel rounds the raw intensities of a master pattern pre-scaled to zero mean
and unit standard deviation, the NumPy path the normalised dictionary rows:
the two round different numbers, so with TF32/FP16 they agree to about the
rounding noise of a score (~1e-5 for a few thousand pixels), not bit for bit.

Tie order: among equal scores the lower dictionary index ranks first, on both
paths.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from dpm import backend
from dpm.dictionary import Dictionary
from dpm.master import MasterPattern
from dpm.match import MatchConfig, MatchResult, match

Precision = Literal["fp32", "tf32", "fp16"]
#: The precision options, in the kernel's numbering (0, 1, 2).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16")

#: Patterns per CUDA block (FUSED_TP in kernels/fused_match.cu).
_PATTERNS_PER_BLOCK = 128
#: Orientations per tile (FUSED_TD).
_ORIENTATIONS_PER_TILE = 64
#: Threads per block (FUSED_THREADS).
_THREADS = 256
#: Largest ``keep`` of the GPU kernel (FUSED_MAX_K).
_GPU_MAX_KEEP = 32
#: Streaming multiprocessors assumed when choosing the slices (an H100 SXM has
#: 132); the CuPy subset of dpm.backend does not query the device's count.
_ASSUMED_SMS = 132
#: Blocks per SM the derived slice count fills: two full waves of the 2 blocks
#: that fit on an SM at once (registers: __launch_bounds__(256, 2)). Rounding the
#: slices down keeps the last wave full (2 400 patterns: 19 x 27 = 513 blocks,
#: 97 % of 2 waves; rounding up, 19 x 28 = 532, would start a third wave for 4).
_BLOCKS_PER_SM = 4
#: Largest grid.y of a CUDA launch.
_MAX_SLICES = 65535
#: Threads per block of the slice merge.
_MERGE_THREADS = 128

#: Pre-scaled master hemispheres on a device, per MasterPattern object.
_SCALED_MASTERS: weakref.WeakKeyDictionary[MasterPattern, tuple[ModuleType, Any, Any]] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class FusedConfig:
    """Options of :func:`match_on_the_fly`.

    Attributes
    ----------
    keep
        Best dictionary matches kept per pattern (default 10; at most 32 on the
        GPU, the size of the kernel's per-thread lists).
    precision
        ``"fp32"`` (default), ``"tf32"`` or ``"fp16"``: the rounding of both
        operands before the products (see :mod:`dpm.fused`).
    slices
        Parts the orientation range is split into on the GPU (grid.y); each
        part keeps its own top-k, merged at the end. None fills about two
        waves of resident blocks on an H100 (132 SMs x 2 blocks; see
        :func:`slice_count`). The result does not depend on it.
    memory_budget
        Byte budget of the NumPy path (:class:`dpm.match.MatchConfig`); the GPU
        path needs no dictionary memory and ignores it.
    """

    keep: int = 10
    precision: Precision = "fp32"
    slices: int | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, np.integer)) \
                or self.keep < 1:
            raise ValueError(f"keep must be a positive integer, got {self.keep!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.slices is not None and (
                isinstance(self.slices, bool) or not isinstance(self.slices, (int, np.integer))
                or not 1 <= self.slices <= _MAX_SLICES):
            raise ValueError(f"slices must be None or an integer in [1, {_MAX_SLICES}], got "
                             f"{self.slices!r}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got "
                             f"{self.memory_budget!r}")


def round_to_precision(values: Any, precision: Precision) -> Any:
    """Round float32 values as the fused kernel rounds its operands.

    Parameters
    ----------
    values : array
        float32 array (NumPy or CuPy); not modified.
    precision
        ``"fp32"`` returns ``values`` itself; ``"tf32"`` keeps 10 mantissa
        bits, rounding to nearest with ties away from zero (infinities and NaN
        unchanged, values that round past the largest float become infinite;
        float32 subnormals keep their top 10 stored bits, a step of 2^-136);
        ``"fp16"`` rounds to IEEE half (nearest, ties to even; subnormal below
        6.1e-5, infinite from 65520) and back to float32.

    Returns
    -------
    rounded : array
        float32, same shape and device.

    Examples
    --------
    >>> import numpy as np
    >>> from dpm.fused import round_to_precision
    >>> x = np.float32([1 + 2**-11, 1 + 3 * 2**-11, 0.1])
    >>> round_to_precision(x, "fp16").tolist()   # ties to even
    [1.0, 1.001953125, 0.0999755859375]
    >>> round_to_precision(x, "tf32").tolist()   # ties away from zero
    [1.0009765625, 1.001953125, 0.0999755859375]
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if values.dtype != np.float32:
        raise TypeError(f"values must be float32, got {values.dtype}")
    if precision == "fp32":
        return values
    if precision == "fp16":
        with np.errstate(over="ignore"):  # |x| >= 65520 becomes infinite, as documented
            return values.astype(np.float16).astype(np.float32)
    bits = values.view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    xp = backend.namespace(values)
    return xp.where(special, bits, rounded).astype(np.uint32).view(np.float32)


class _RoundedSource:
    """A dictionary whose chunks come rounded to a precision (the NumPy path's operands)."""

    def __init__(self, dictionary: Dictionary, precision: Precision) -> None:
        self.dictionary = dictionary
        self.precision = precision

    def __len__(self) -> int:
        return len(self.dictionary)

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        return round_to_precision(self.dictionary.chunk(start, stop, xp), self.precision)


def _scaled_master(xp: ModuleType, master: MasterPattern) -> tuple[Any, Any]:
    """The hemispheres scaled to zero mean and unit std over both, on ``xp``, cached.

    The NCC is blind to an affine change of the master pattern; the scaling
    only keeps the kernel's FP16 operands O(1) (see kernels/fused_match.cu).
    A constant master stays all zeros.
    """
    cached = _SCALED_MASTERS.get(master)
    if cached is not None and cached[0] is xp:
        return cached[1], cached[2]
    both = np.stack([np.asarray(master.northern, np.float64),
                     np.asarray(master.southern, np.float64)])
    mean = both.mean()
    std = both.std()
    scaled = ((both - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    north = xp.ascontiguousarray(xp.asarray(scaled[0]))
    south = xp.ascontiguousarray(xp.asarray(scaled[1]))
    _SCALED_MASTERS[master] = (xp, north, south)
    return north, south


def slice_count(n: int, m: int, slices: int | None = None) -> tuple[int, int]:
    """Slices of the orientation range and 64-orientation tiles per slice for a launch.

    Parameters
    ----------
    n, m
        Patterns and orientations.
    slices
        Requested slices, or None for ``floor(4 * 132 / columns)`` (at least
        1), ``columns = ceil(n / 128)`` blocks of patterns: at most two full
        waves of the 2 blocks an H100 SM (132 SMs) holds at once.

    Returns
    -------
    (slices, tiles_per_slice)
        The slice count actually used: at most one slice per tile, and no
        empty slice (``ceil(tiles / tiles_per_slice)``).
    """
    tiles = -(-m // _ORIENTATIONS_PER_TILE)
    if slices is None:
        columns = -(-n // _PATTERNS_PER_BLOCK)
        slices = _BLOCKS_PER_SM * _ASSUMED_SMS // columns
    slices = max(1, min(int(slices), tiles, _MAX_SLICES))
    per_slice = -(-tiles // slices)
    return -(-tiles // per_slice), per_slice


def match_on_the_fly(patterns: Any, dictionary: Dictionary, *,
                     config: FusedConfig = FusedConfig()) -> MatchResult:
    """Best ``config.keep`` dictionary matches of every pattern, the dictionary made on the fly.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean, unit-norm rows over the dictionary's (masked) pixels, in
        row-major pixel order (:func:`dpm.match.prepare_patterns` with the
        dictionary's mask), NumPy or CuPy; the computation and the result live
        on their device.
    dictionary
        Master pattern, detector, orientations (sample to crystal, orix
        convention) and signal mask. Its patterns are never stored on the GPU.
    config
        ``keep``, ``precision``, ``slices`` (GPU) and ``memory_budget`` (CPU).

    Returns
    -------
    MatchResult
        ``indices`` (n, keep) int64 and ``scores`` (n, keep) float32 on the
        patterns' device, best first; equal scores in ascending dictionary
        index. Scores are the NCC in [-1, 1] of the operands rounded to the
        precision; a constant dictionary pattern scores 0.

    Raises
    ------
    ValueError
        For a pattern pixel count that differs from the dictionary's,
        ``keep`` larger than the dictionary (or than 32 on the GPU), or
        patterns with fewer than ``keep`` finite scores (NaN in the input).
    TypeError
        For patterns that are not a 2-d float32 array or a dictionary that
        is not a :class:`~dpm.dictionary.Dictionary`.

    Examples
    --------
    >>> import numpy as np
    >>> from orix.crystal_map import Phase
    >>> from dpm.detector import Detector
    >>> from dpm.dictionary import Dictionary
    >>> from dpm.fused import FusedConfig, match_on_the_fly
    >>> from dpm.master import MasterPattern
    >>> rng = np.random.default_rng(0)
    >>> hemi = rng.random((2, 21, 21)).astype(np.float32)
    >>> master = MasterPattern(hemi[0], hemi[1], phase=Phase(point_group="m-3m"), energy=20.0)
    >>> q = rng.normal(size=(40, 4))
    >>> dictionary = Dictionary(master, Detector((6, 8), pc=(0.5, 0.4, 0.6)), q / np.linalg.norm(q, axis=1, keepdims=True))
    >>> result = match_on_the_fly(dictionary.chunk(5, 7), dictionary, config=FusedConfig(keep=3, precision="fp16"))
    >>> result.indices[:, 0].tolist()
    [5, 6]
    """
    xp = backend.namespace(patterns)
    if not isinstance(dictionary, Dictionary):
        raise TypeError(f"dictionary must be a dpm.dictionary.Dictionary, got "
                        f"{type(dictionary).__name__}")
    if getattr(patterns, "ndim", None) != 2:
        raise TypeError(f"Expected patterns of shape (n, npix), got "
                        f"{getattr(patterns, 'shape', type(patterns).__name__)}")
    if patterns.dtype != np.float32:
        raise TypeError(f"patterns must be float32 (see prepare_patterns), got {patterns.dtype}")
    n, npix = patterns.shape
    m = len(dictionary)
    keep = int(config.keep)
    if n == 0:
        raise ValueError(f"patterns is empty (shape {patterns.shape})")
    if npix != dictionary.n_pixels:
        raise ValueError(f"patterns have {npix} pixels (shape {patterns.shape}), the dictionary "
                         f"{dictionary.n_pixels} (detector {dictionary.detector.shape}"
                         f"{', masked' if dictionary.mask is not None else ''}): same pixels "
                         "needed")
    if keep > m:
        raise ValueError(f"keep={keep} exceeds the dictionary size {m}")
    if xp is np:
        return match(round_to_precision(patterns, config.precision),
                     _RoundedSource(dictionary, config.precision),
                     config=MatchConfig(keep=keep, memory_budget=config.memory_budget))
    if keep > _GPU_MAX_KEEP:
        raise ValueError(f"keep={keep} exceeds {_GPU_MAX_KEEP}, the most the fused kernel "
                         "supports (kernels/fused_match.cu, FUSED_MAX_K)")
    return _match_cuda(xp, xp.ascontiguousarray(patterns), dictionary, keep, config)


def _match_cuda(xp: ModuleType, patterns: Any, dictionary: Dictionary, keep: int,
                config: FusedConfig) -> MatchResult:
    """Launch ``kernels/fused_match.cu``: the slices' top-k, then their merge."""
    n, npix = patterns.shape
    m = len(dictionary)
    north, south = _scaled_master(xp, dictionary.master)
    vectors = dictionary._vectors(xp)
    quaternions = xp.ascontiguousarray(xp.asarray(dictionary.quaternions))
    slices, tiles_per_slice = slice_count(n, m, config.slices)
    part_scores = xp.empty((slices, n, keep), dtype=xp.float32)
    part_indices = xp.empty((slices, n, keep), dtype=xp.int64)

    kernel = backend.load_kernel("fused_match", f"fused_match_{config.precision}")
    # Block (x, y): patterns x*128 .. x*128+127 against the 64-orientation tiles
    # y*T .. y*T+T-1 (T = tiles_per_slice). 256 threads: each computes an
    # 8-pattern x 4-orientation register micro-tile of the 128 x 64 score tile
    # and generates 8 of the tile's 64 x 32 dictionary pixels per 32-pixel
    # chunk; threads 0..127 each own one pattern's running top-k. The slices
    # (grid.y) give a small map enough blocks for 132 SMs; a large one needs
    # none (ceil(n / 128) blocks already).
    # Written: part_scores, part_indices (every slot of every (slice, row)).
    grid = (-(-n // _PATTERNS_PER_BLOCK), slices)
    block = (_THREADS,)
    kernel(grid, block,
           (north, south, np.int32(north.shape[0]), vectors, np.int32(npix), quaternions,
            np.int32(m), patterns, np.int32(n), np.int32(keep), np.int32(tiles_per_slice),
            part_scores, part_indices))

    if slices == 1:
        best_scores, best_indices = part_scores[0], part_indices[0]
    else:
        best_scores = xp.empty((n, keep), dtype=xp.float32)
        best_indices = xp.empty((n, keep), dtype=xp.int64)
        merge = backend.load_kernel("fused_match", "fused_merge_slices")
        # One thread per pattern merges its `slices` sorted lists in `keep`
        # rounds; 128 threads per block. Written: best_scores, best_indices.
        merge_grid = (-(-n // _MERGE_THREADS),)
        merge(merge_grid, (_MERGE_THREADS,),
              (part_scores, part_indices, np.int32(n), np.int32(keep), np.int32(slices),
               best_scores, best_indices))
    missing = backend.to_host(best_indices[:, -1] < 0)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(f"patterns {rows[:10].tolist()} have fewer than keep={keep} finite "
                         "scores: the patterns or the master pattern hold NaN values")
    return MatchResult(indices=best_indices, scores=best_scores)

