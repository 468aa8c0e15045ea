"""Pattern preprocessing before matching: the EBSD protocol's pattern clean-up.

Raw Kikuchi patterns sit on a smooth background (the angular distribution of
backscattered electrons and the detector's response) that is far stronger than
the bands, and low-Z metals (Li, Na) give weak, noisy bands. Every step below is
optional; :class:`PreprocessConfig` switches them on, and they always run in
this order:

1. **static background** (:func:`remove_static_background`): the mean pattern
   of the stack, a given background, or none; subtracted or divided;
2. **binning** (:func:`bin_patterns`): sum or mean of ``factor x factor``
   pixel blocks (project the dictionary onto :func:`binned_detector`, and bin
   the signal mask with :func:`bin_mask`);
3. **dynamic background** (:func:`remove_dynamic_background`): a Gaussian
   blur of each pattern, subtracted or divided;
4. **Gaussian filter** (:func:`gaussian_blur`) of each pattern, the sodium
   step of the protocol;
5. **neighbour averaging** (:func:`average_neighbour_patterns`): a Gaussian
   window over the map;
6. **intensity rescaling** (:func:`rescale_intensity`) of each pattern to a
   range.

As in kikuchipy, both background removals end by stretching each pattern
linearly so that its minimum becomes 0 and its maximum 1 (kikuchipy stretches
to the data type's range: ``[0, 255]`` for uint8, ``[-1, 1]`` for float32), so
that every pattern enters neighbour averaging with the same weight and a later
division by a blurred pattern stays positive. Matching uses the normalised
cross-correlation, which no per-pattern linear rescaling changes.

:func:`preprocess_stack` runs the steps chunk by chunk over a pattern stack (in
chunks of whole map rows, with halo rows for neighbour averaging) and is the
stage the pipeline calls. Every array step runs on NumPy or CuPy (the module of
the patterns given). Gaussian blurs are separable convolutions written as two
matrix products, ``G_y @ P @ G_x.T``, with 1-D Gaussian matrices that hold the
boundary condition: GEMMs on the GPU, no SciPy or cupyx needed.

Signal masks (True where a detector pixel is used): :func:`circular_mask`,
:func:`mask_from_image` and :func:`shadow_mask` (the detector shadow estimated
from the static background).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from dpm import backend
from dpm.detector import Detector, as_detector

_log = logging.getLogger("dpm")

#: Gaussian blurs of patterns are truncated at this many standard deviations
#: (SciPy's and kikuchipy's default): the kernel radius is ``int(4 sigma + 0.5)``.
TRUNCATE = 4.0


def _check_positive(name: str, value: Any, *, zero: bool = False) -> float:
    """``value`` as a float; a ValueError unless a positive (or, with ``zero``, a
    non-negative) finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
        raise ValueError(f"Expected `{name}` to be a {'non-negative' if zero else 'positive'} "
                         f"number, got {value!r}")
    return float(value)


def _check_sigma(name: str, value: Any) -> float | None:
    """None, or ``value`` as a positive float (a σ in pixels)."""
    return None if value is None else _check_positive(name, value)


def _window_radius(sigma: float, truncate: float) -> int:
    """Half-width of a Gaussian window truncated at ``truncate`` σ (SciPy's rule)."""
    return int(truncate * sigma + 0.5)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing applied to every pattern; steps run in the order listed.

    Attributes
    ----------
    static_background
        Step 1. ``"mean"`` (the mean raw pattern of the stack's readable
        patterns, as kikuchipy and the vendors do when none was acquired),
        ``"given"`` (the ``background`` array passed to the pipeline, else the
        one stored in the pattern file) or ``"none"``.
    mean_sigma
        Step 1, ``"mean"`` only: σ in raw detector pixels of a Gaussian that
        smooths the mean pattern before it is removed (0: the mean as it is,
        as kikuchipy removes it; None: the pattern width / 15, 4 px on 60 × 60
        px patterns). A map of few grains keeps their Kikuchi bands in its mean
        pattern, and removing it subtracts each grain's own bands, at the
        grain's mean PC, from its patterns: on synthetic 8-grain Li maps that
        made the refined PCy slope 15 % too steep, and smoothing at 4 px
        removed that. It is not the default: with the full signal restored,
        the PC bias of single grains shows more clearly (a 3-grain map's flat
        field got a gradient at 3.5 standard errors). A given background
        (acquired on many grains) is always used as it is.
    operation
        ``"subtract"`` or ``"divide"`` the static background.
    binning
        Step 2. Integer binning factor (1: none); the pattern shape must be
        divisible by it.
    binning_mode
        ``"sum"`` (as camera binning adds charge) or ``"mean"`` of each block.
    dynamic_background
        Step 3. Remove a Gaussian blur of each (binned) pattern.
    dynamic_operation
        ``"subtract"`` or ``"divide"`` the blurred pattern.
    dynamic_sigma
        Standard deviation of that blur in (binned) detector pixels; None uses
        kikuchipy's default, the pattern width / 8.
    gaussian_sigma
        Step 4. Standard deviation in (binned) detector pixels of a Gaussian
        filter applied to each pattern; None: no filter.
    neighbour_sigma
        Step 5. Standard deviation in map pixels of the Gaussian window that
        averages each pattern with its map neighbours; None: no averaging.
    neighbour_truncate
        The averaging window spans ``radius = int(neighbour_truncate *
        neighbour_sigma + 0.5)`` map pixels on each side (SciPy's rule);
        ``neighbour_sigma=1, neighbour_truncate=1`` is a 3 x 3 window.
    rescale
        Step 6. Stretch each pattern linearly to ``rescale_range``.
    rescale_range
        ``(low, high)`` output range of step 6 (default ``(0, 1)``).

    Raises
    ------
    ValueError
        If a choice is unknown, a σ is not positive, ``binning`` is not a
        positive integer, ``neighbour_truncate`` is not positive, or
        ``rescale_range`` is not two finite numbers with ``low < high``.
    """

    static_background: Literal["mean", "given", "none"] = "mean"
    mean_sigma: float | None = 0.0
    operation: Literal["subtract", "divide"] = "subtract"
    binning: int = 1
    binning_mode: Literal["sum", "mean"] = "sum"
    dynamic_background: bool = False
    dynamic_operation: Literal["subtract", "divide"] = "subtract"
    dynamic_sigma: float | None = None
    gaussian_sigma: float | None = None
    neighbour_sigma: float | None = None
    neighbour_truncate: float = 2.0
    rescale: bool = False
    rescale_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        _check_choice("static_background", self.static_background, ("mean", "given", "none"))
        _check_choice("operation", self.operation, ("subtract", "divide"))
        _check_choice("binning_mode", self.binning_mode, ("sum", "mean"))
        _check_choice("dynamic_operation", self.dynamic_operation, ("subtract", "divide"))
        object.__setattr__(self, "binning", _check_factor(self.binning))
        if self.mean_sigma is not None:
            object.__setattr__(self, "mean_sigma",
                               _check_positive("mean_sigma", self.mean_sigma, zero=True))
        for name in ("dynamic_sigma", "gaussian_sigma", "neighbour_sigma"):
            object.__setattr__(self, name, _check_sigma(name, getattr(self, name)))
        object.__setattr__(self, "neighbour_truncate",
                           _check_positive("neighbour_truncate", self.neighbour_truncate))
        object.__setattr__(self, "rescale_range", _check_range(self.rescale_range))

    def mean_smoothing(self, pattern_shape: tuple[int, int] | None) -> float | None:
        """σ in raw detector pixels that smooths a ``"mean"`` background (0: none).

        ``pattern_shape`` ``(sy, sx)`` resolves the default (``sx / 15``); None
        when the default is asked for without it."""
        if self.mean_sigma is not None:
            return self.mean_sigma
        return None if pattern_shape is None else pattern_shape[1] / 15

    @property
    def neighbour_radius(self) -> int:
        """Half-width in map pixels of the averaging window (0 without averaging)."""
        if self.neighbour_sigma is None:
            return 0
        return _window_radius(self.neighbour_sigma, self.neighbour_truncate)

    def steps(self, pattern_shape: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """The steps this configuration applies, in order, with their parameters.

        Parameters
        ----------
        pattern_shape
            ``(sy, sx)`` of the raw patterns: resolves the default dynamic
            background σ (width / 8 after binning). Without it that σ is
            reported as None.

        Returns
        -------
        steps
            One JSON-ready dict per applied step, ``{"step": NAME, ...}`` (for
            ``summary.json``); σ values in pixels (detector pixels for pattern
            filters, map pixels for neighbour averaging).

        Examples
        --------
        >>> from dpm.preprocess import PreprocessConfig
        >>> [s["step"] for s in PreprocessConfig(gaussian_sigma=1.0).steps()]
        ['static_background', 'gaussian_filter']
        """
        steps: list[dict[str, Any]] = []
        if self.static_background != "none":
            step = {"step": "static_background", "source": self.static_background,
                    "operation": self.operation, "stretch": [0.0, 1.0]}
            if self.static_background == "mean":
                step["smoothing_sigma"] = self.mean_smoothing(pattern_shape)
            steps.append(step)
        if self.binning > 1:
            steps.append({"step": "binning", "factor": self.binning, "mode": self.binning_mode})
        if self.dynamic_background:
            sigma = self.dynamic_sigma
            if sigma is None and pattern_shape is not None:
                sigma = bin_shape(pattern_shape, self.binning)[1] / 8
            steps.append({"step": "dynamic_background", "operation": self.dynamic_operation,
                          "sigma": sigma, "truncate": TRUNCATE, "stretch": [0.0, 1.0]})
        if self.gaussian_sigma is not None:
            steps.append({"step": "gaussian_filter", "sigma": self.gaussian_sigma,
                          "truncate": TRUNCATE})
        if self.neighbour_sigma is not None:
            steps.append({"step": "neighbour_averaging", "window": "gaussian",
                          "sigma": self.neighbour_sigma, "radius": self.neighbour_radius})
        if self.rescale:
            steps.append({"step": "rescale_intensity", "range": list(self.rescale_range)})
        return steps


def _check_factor(factor: Any) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"Expected the binning factor to be a positive integer, got {factor!r}")
    return int(factor)


def _check_range(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected `rescale_range` to be (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"Expected `rescale_range` to be finite with low < high, got {value!r}")
    return low, high


# --------------------------------------------------------------------------- static background

def mean_pattern(chunks: Iterable[Any]) -> np.ndarray:
    """Mean pattern of a stack given chunk by chunk.

    Parameters
    ----------
    chunks
        Iterable of ``(k, sy, sx)`` arrays (NumPy or CuPy); non-finite values
        are ignored.

    Returns
    -------
    mean : (sy, sx) float64 array on the host
    """
    total = None
    count = None
    for chunk in chunks:
        c = backend.to_host(chunk).astype(np.float64)
        ok = np.isfinite(c)
        s, n = np.where(ok, c, 0.0).sum(axis=0), ok.sum(axis=0)
        total, count = (s, n) if total is None else (total + s, count + n)
    if total is None:
        raise ValueError("cannot compute a mean pattern of an empty stack")
    return total / np.maximum(count, 1)


def smooth_background(background: np.ndarray, sigma: float) -> np.ndarray:
    """A static background without the Kikuchi bands a mean pattern keeps.

    Gaussian filter of σ = ``sigma`` pixels (truncated at 4 σ) with the image
    extended beyond its edges by point reflection (``2 b[0] − b[k]``), so a
    background that changes linearly up to an edge is kept there as it is.

    Parameters
    ----------
    background : (sy, sx) array
        Host image, e.g. :func:`mean_pattern`.
    sigma
        σ in pixels; 0 returns the background unchanged.

    Returns
    -------
    smoothed : (sy, sx) float64 array
    """
    b = np.asarray(background, dtype=np.float64)
    if sigma == 0:
        return b
    radius = _window_radius(sigma, TRUNCATE)
    if radius >= min(b.shape):
        raise ValueError(f"mean_sigma {sigma:g} px reaches {radius} px, more than the "
                         f"pattern {b.shape} allows; give a smaller one")
    padded = np.pad(b, radius, mode="reflect", reflect_type="odd")
    return ndimage.gaussian_filter(padded, sigma, truncate=TRUNCATE)[radius:-radius,
                                                                    radius:-radius]


def _on(xp: ModuleType, array: Any) -> Any:
    """``array`` as float32 on the device of ``xp``."""
    if xp is np:
        return np.asarray(backend.to_host(array), dtype=np.float32)
    return xp.asarray(array, dtype=xp.float32)


def _stretch(patterns: Any, low: float, high: float) -> Any:
    """Map each pattern's minimum to ``low`` and maximum to ``high`` (constant: ``low``)."""
    xp = backend.namespace(patterns)
    flat = patterns.reshape(len(patterns), -1)
    pmin = flat.min(axis=1)[:, None, None]
    span = flat.max(axis=1)[:, None, None] - pmin
    scale = xp.where(span > 0, xp.float32(high - low) / xp.where(span > 0, span, 1), 0)
    return ((patterns - pmin) * scale + xp.float32(low)).astype(xp.float32)


def _remove(patterns: Any, background: Any, operation: str) -> Any:
    """Subtract or divide (a zero divisor gives 0); both (n, sy, sx) or broadcastable."""
    xp = backend.namespace(patterns)
    if operation == "subtract":
        return patterns - background
    _check_choice("operation", operation, ("subtract", "divide"))
    safe = xp.where(background == 0, xp.float32(1.0), background)
    return xp.where(background == 0, xp.float32(0.0), patterns / safe)


def remove_static_background(patterns: Any, background: Any,
                             operation: Literal["subtract", "divide"] = "subtract") -> Any:
    """Remove a static background from every pattern, then stretch each to [0, 1].

    As kikuchipy's ``EBSD.remove_static_background`` (with ``scale_bg=False``),
    whose output is this one stretched to the data type's range.

    Parameters
    ----------
    patterns : (n, sy, sx) array
        Patterns (NumPy or CuPy); not modified.
    background : (sy, sx) array
        Background on any device; moved to the patterns' device.
    operation
        ``"subtract"`` or ``"divide"`` (division by a background pixel of 0
        gives 0).

    Returns
    -------
    corrected : (n, sy, sx) float32 array on the patterns' device
        Each pattern's minimum is 0 and its maximum 1 (a pattern that the
        removal leaves constant is all 0).

    Raises
    ------
    ValueError
        If the background and pattern shapes differ (naming both) or the
        operation is unknown.
    """
    xp = backend.namespace(patterns)
    p = xp.asarray(patterns, dtype=xp.float32)
    bg = _on(xp, background)
    if bg.shape != p.shape[1:]:
        raise ValueError(f"static background shape {tuple(bg.shape)} differs from the "
                         f"pattern shape {tuple(p.shape[1:])}")
    return _stretch(_remove(p, bg[None], operation), 0.0, 1.0)


# --------------------------------------------------------------------------- binning

def bin_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """Pattern shape ``(sy // factor, sx // factor)`` after binning.

    Raises
    ------
    ValueError
        If ``factor`` is not a positive integer, or the shape is not divisible
        by it (naming both).
    """
    factor = _check_factor(factor)
    sy, sx = (int(s) for s in shape)
    if sy % factor or sx % factor:
        raise ValueError(f"pattern shape {(sy, sx)} is not divisible by the binning factor "
                         f"{factor}")
    return sy // factor, sx // factor


def bin_patterns(patterns: Any, factor: int, mode: Literal["sum", "mean"] = "sum") -> Any:
    """Bin patterns by summing or averaging ``factor x factor`` pixel blocks.

    Parameters
    ----------
    patterns : (n, sy, sx) array
        NumPy or CuPy; not modified.
    factor
        Positive integer dividing ``sy`` and ``sx``.
    mode
        ``"sum"`` or ``"mean"`` of each block.

    Returns
    -------
    binned : (n, sy // factor, sx // factor) float32 array on the patterns' device
    """
    _check_choice("mode", mode, ("sum", "mean"))
    xp = backend.namespace(patterns)
    p = xp.asarray(patterns, dtype=xp.float32)
    by, bx = bin_shape(p.shape[1:], factor)
    if factor == 1:
        return p
    blocks = p.reshape(len(p), by, factor, bx, factor)
    out = blocks.sum(axis=(2, 4)) if mode == "sum" else blocks.mean(axis=(2, 4))
    return out.astype(xp.float32)


def bin_mask(mask: Any, factor: int) -> np.ndarray:
    """Bin a signal mask: a binned pixel is used only when all its pixels are.

    Parameters
    ----------
    mask : (sy, sx) bool array
        True where a detector pixel is used.
    factor
        Binning factor of the patterns.

    Returns
    -------
    binned : (sy // factor, sx // factor) bool array on the host

    Raises
    ------
    ValueError
        If the shape is not divisible by ``factor``, or the binned mask hides
        every pixel.
    """
    m = np.asarray(backend.to_host(mask), dtype=bool)
    by, bx = bin_shape(m.shape, factor)
    out = m.reshape(by, factor, bx, factor).all(axis=(1, 3))
    return _check_mask(out, f"signal mask binned by {factor}")


def binned_detector(detector: Any, factor: int) -> Detector:
    """The detector that sees the patterns binned by ``factor``.

    Parameters
    ----------
    detector
        dpm ``Detector`` or kikuchipy ``EBSDDetector`` of the unbinned patterns.
    factor
        Binning factor.

    Returns
    -------
    Detector
        Shape divided by ``factor``, ``binning`` multiplied by it; the PC (in
        Bruker's convention: fractions of the pattern width and height) and
        the unbinned pixel size are unchanged.
    """
    det = as_detector(detector)
    return dataclasses.replace(det, shape=bin_shape(det.shape, factor),
                               binning=det.binning * _check_factor(factor))


# --------------------------------------------------------------------------- Gaussian blurs

def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """SciPy's ``mode="reflect"`` (``d c b a | a b c d | d c b a``) for any index."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


def gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of σ = ``sigma`` pixels, radius ``int(4 σ + 0.5)``.

    SciPy's ``gaussian_filter1d`` weights (truncate 4), so a blur with them
    equals it away from the edges; ``[1.0]`` for ``sigma = 0``."""
    radius = _window_radius(sigma, TRUNCATE)
    if radius == 0:
        return np.ones(1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


@functools.lru_cache(maxsize=64)
def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) float32 matrix ``G`` with ``G @ v`` the reflect-mode blur of ``v``.

    Row ``i`` holds SciPy's ``gaussian_filter1d`` weights (radius
    ``int(4 sigma + 0.5)``, normalised to sum 1) at the reflected input indices.
    """
    weights = gaussian_taps(sigma)
    offsets = np.arange(weights.size) - weights.size // 2
    rows = np.repeat(np.arange(size), offsets.size)
    cols = _reflect(np.arange(size)[:, None] + offsets[None, :], size).ravel()
    matrix = np.zeros((size, size))
    np.add.at(matrix, (rows, cols), np.tile(weights, size))
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def gaussian_blur(patterns: Any, sigma: float) -> Any:
    """Gaussian filter of each pattern, as ``scipy.ndimage.gaussian_filter``.

    Boundary mode ``"reflect"`` and truncation at 4 σ, as SciPy's defaults.
    Computed as ``G_y @ P @ G_x.T`` with cached 1-D Gaussian matrices: one
    GEMM over all pattern rows and one batched GEMM (cuBLAS on the GPU).

    Parameters
    ----------
    patterns : (n, sy, sx) array
        NumPy or CuPy; not modified.
    sigma
        Standard deviation in detector pixels (the same along both axes).

    Returns
    -------
    blurred : (n, sy, sx) float32 array on the patterns' device
    """
    sigma = _check_positive("sigma", sigma)
    xp = backend.namespace(patterns)
    p = xp.ascontiguousarray(xp.asarray(patterns, dtype=xp.float32))
    n, sy, sx = p.shape
    gx_t = _on(xp, _gaussian_matrix(sx, sigma).T)
    gy = _on(xp, _gaussian_matrix(sy, sigma))
    along_x = xp.matmul(p.reshape(n * sy, sx), gx_t).reshape(n, sy, sx)
    return xp.matmul(gy, along_x)


def remove_dynamic_background(patterns: Any, sigma: float | None = None,
                              operation: Literal["subtract", "divide"] = "subtract") -> Any:
    """Remove each pattern's Gaussian blur, then stretch each pattern to [0, 1].

    As kikuchipy's ``EBSD.remove_dynamic_background(filter_domain="spatial")``,
    whose output is this one stretched to the data type's range (kikuchipy's
    default ``"frequency"`` domain differs only within 4 σ of the edges).

    Parameters
    ----------
    patterns : (n, sy, sx) array
        NumPy or CuPy; not modified.
    sigma
        Standard deviation of the blur in detector pixels; None: ``sx / 8``.
    operation
        ``"subtract"`` or ``"divide"`` (a blurred pixel of 0 gives 0).

    Returns
    -------
    corrected : (n, sy, sx) float32 array on the patterns' device
        Each pattern's minimum is 0 and its maximum 1.
    """
    xp = backend.namespace(patterns)
    p = xp.asarray(patterns, dtype=xp.float32)
    blurred = gaussian_blur(p, p.shape[-1] / 8 if sigma is None else sigma)
    return _stretch(_remove(p, blurred, operation), 0.0, 1.0)


# --------------------------------------------------------------------------- neighbour averaging

def _map_window(out_start: int, n_out: int, in_start: int, n_in: int, sigma: float,
                radius: int) -> np.ndarray:
    """(n_out, n_in) Gaussian weights between map lines; 0 beyond ``radius``."""
    d = (np.arange(out_start, out_start + n_out)[:, None]
         - np.arange(in_start, in_start + n_in)[None, :])
    return np.where(np.abs(d) <= radius, np.exp(-0.5 * (d / sigma) ** 2), 0.0)


def _average_block(block: Any, weights: np.ndarray, origin: tuple[int, int],
                   out: tuple[int, int, int, int], sigma: float, radius: int) -> Any:
    """Gaussian-window average of the patterns of a map block, for a sub-block.

    Parameters
    ----------
    block : (R, C, sy, sx) float32 array
        Patterns of map rows ``origin[0] .. + R`` and columns ``origin[1] .. + C``.
    weights : (R, C) host array
        1 for patterns that take part, 0 for excluded ones.
    origin
        Map (row, column) of ``block[0, 0]``.
    out
        ``(row0, row1, col0, col1)``: the map pixels to return; every pixel
        within ``radius`` of them that lies in the map must be in the block.

    Returns
    -------
    averaged : (row1 - row0, col1 - col0, sy, sx) float32 array
        ``sum w g(dr) g(dc) P / sum w g(dr) g(dc)`` over the window; 0 where
        the window holds no pattern that takes part.
    """
    xp = backend.namespace(block)
    nr, nc, sy, sx = block.shape
    r0, r1, c0, c1 = out
    wy = _map_window(r0, r1 - r0, origin[0], nr, sigma, radius)
    wx = _map_window(c0, c1 - c0, origin[1], nc, sigma, radius)
    norm = wy @ weights @ wx.T
    scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    weighted = block * _on(xp, weights)[:, :, None, None]
    along_cols = xp.matmul(_on(xp, wx), weighted.reshape(nr, nc, sy * sx))
    along_rows = xp.matmul(_on(xp, wy), along_cols.reshape(nr, -1))
    averaged = along_rows.reshape(r1 - r0, c1 - c0, sy, sx)
    return averaged * _on(xp, scale)[:, :, None, None]


def average_neighbour_patterns(patterns: Any, sigma: float, *, truncate: float = 2.0,
                               readable: Any = None) -> Any:
    """Average each pattern with its map neighbours in a Gaussian window.

    As kikuchipy's ``EBSD.average_neighbour_patterns(window="gaussian",
    window_shape=(2 r + 1, 2 r + 1), std=sigma)`` before its final stretch:
    the weights ``g(dr) g(dc) = exp(-(dr² + dc²) / 2σ²)`` of the window
    positions inside the map (and, here, on readable patterns only) are
    renormalised to sum 1.

    Parameters
    ----------
    patterns : (ny, nx, sy, sx) array
        A map of patterns, NumPy or CuPy; not modified.
    sigma
        Standard deviation of the window in map pixels.
    truncate
        Window half-width ``r = int(truncate * sigma + 0.5)`` map pixels.
    readable : (ny, nx) bool array, optional
        False for patterns left out of every average (their own output is
        the average of their readable neighbours). None: all take part.

    Returns
    -------
    averaged : (ny, nx, sy, sx) float32 array on the patterns' device
        0 where no readable pattern lies in the window.
    """
    sigma = _check_positive("sigma", sigma)
    radius = _window_radius(sigma, _check_positive("truncate", truncate))
    xp = backend.namespace(patterns)
    p = xp.asarray(patterns, dtype=xp.float32)
    if p.ndim != 4:
        raise ValueError(f"Expected patterns of shape (ny, nx, sy, sx), got {tuple(p.shape)}")
    ny, nx = p.shape[:2]
    weights = np.ones((ny, nx)) if readable is None else \
        np.asarray(backend.to_host(readable), dtype=np.float64)
    if weights.shape != (ny, nx):
        raise ValueError(f"readable map shape {weights.shape} differs from the map shape "
                         f"{(ny, nx)}")
    return _average_block(p, weights, (0, 0), (0, ny, 0, nx), sigma, radius)


def rescale_intensity(patterns: Any, out_range: tuple[float, float] = (0.0, 1.0)) -> Any:
    """Stretch each pattern linearly so its minimum and maximum span ``out_range``.

    As kikuchipy's ``EBSD.rescale_intensity(out_range=out_range)`` (per pattern,
    ``relative=False``). A constant pattern becomes ``out_range[0]``.

    Parameters
    ----------
    patterns : (n, sy, sx) array
        NumPy or CuPy; not modified.
    out_range
        ``(low, high)`` with ``low < high``.

    Returns
    -------
    rescaled : (n, sy, sx) float32 array on the patterns' device
    """
    low, high = _check_range(out_range)
    xp = backend.namespace(patterns)
    return _stretch(xp.asarray(patterns, dtype=xp.float32), low, high)


# --------------------------------------------------------------------------- signal masks

def _check_mask(mask: np.ndarray, what: str) -> np.ndarray:
    if not mask.any():
        raise ValueError(f"{what} hides every detector pixel (shape {mask.shape})")
    return mask


def circular_mask(shape: tuple[int, int], radius: float | None = None) -> np.ndarray:
    """Signal mask of the detector pixels within a circle about the pattern centre.

    Parameters
    ----------
    shape
        ``(sy, sx)`` pattern shape.
    radius
        Radius in pixels about the centre ``((sy - 1) / 2, (sx - 1) / 2)``;
        None: ``min(sy, sx) / 2``, the inscribed circle.

    Returns
    -------
    mask : (sy, sx) bool array
        True where a pixel centre lies within ``radius`` of the centre.

    Raises
    ------
    ValueError
        If the radius is not positive or the mask holds no pixel.
    """
    sy, sx = (int(s) for s in shape)
    radius = min(sy, sx) / 2 if radius is None else _check_positive("radius", radius)
    y, x = np.ogrid[:sy, :sx]
    mask = (y - (sy - 1) / 2) ** 2 + (x - (sx - 1) / 2) ** 2 <= radius**2
    return _check_mask(mask, f"circular mask of radius {radius:g} px")


def mask_from_image(image: Any, threshold: float = 0.5, *,
                    shape: tuple[int, int] | None = None) -> np.ndarray:
    """Signal mask from an image: bright pixels are used, dark ones masked.

    Parameters
    ----------
    image
        A 2-D array, or the path of a ``.png`` (grey, RGB or RGBA: the mean of
        the colour channels, read as [0, 1]) or a ``.npy`` file holding a 2-D
        array. Integer arrays are divided by their type's maximum (255 for
        uint8), float arrays are taken as given, bool as 0 / 1.
    threshold
        Pixels above it are used.
    shape
        Expected ``(sy, sx)``; checked when given.

    Returns
    -------
    mask : (sy, sx) bool array

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        Naming the file (or "mask image"), if the suffix is unknown, the image
        is not 2-D, its shape is not ``shape``, or the mask hides every pixel.
    """
    source = "mask image"
    if isinstance(image, (str, Path)):
        path = Path(image)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask image {path} does not exist")
        if path.suffix.lower() == ".npy":
            image = np.load(path)
        elif path.suffix.lower() == ".png":
            from matplotlib.image import imread

            image = imread(path)  # float32 in [0, 1]
            if image.ndim == 3:  # RGB(A)
                image = image[..., :3].mean(axis=2)
        else:
            raise ValueError(f"{path}: a mask image must be a .png or .npy file")
    values = np.asarray(backend.to_host(image))
    if values.ndim != 2:
        raise ValueError(f"{source}: expected a 2-D image, got shape {values.shape}")
    if values.dtype.kind in "iu":
        values = values / np.iinfo(values.dtype).max
    if shape is not None and values.shape != tuple(shape):
        raise ValueError(f"{source}: mask shape {values.shape} differs from the pattern shape "
                         f"{tuple(shape)}")
    return _check_mask(values.astype(np.float64) > threshold, source)


def _morphology(mask: np.ndarray, radius: int, op: Literal["erode", "dilate"]) -> np.ndarray:
    """Binary erosion or dilation by a disc; the image edge is extended (nearest)."""
    sy, sx = mask.shape
    padded = np.pad(mask, radius, mode="edge")
    out = np.ones_like(mask) if op == "erode" else np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                shifted = padded[radius + dy:radius + dy + sy, radius + dx:radius + dx + sx]
                out = out & shifted if op == "erode" else out | shifted
    return out


def shadow_mask(static_background: Any, *, fraction: float = 0.5, sigma: float | None = None,
                clean_radius: int = 2, iterations: int = 4) -> np.ndarray:
    """Signal mask without the detector's shadow, estimated from the static background.

    The rule: a pixel is in shadow when it is darker than ``fraction`` times
    the smooth illuminated background there. The illuminated background is a
    normalised Gaussian blur (σ = ``sigma``) over the pixels not yet in
    shadow, ``blur(b * lit) / blur(lit)``, so a shadow does not drag it down
    and it extrapolates into the shadow; pixels beyond the blur's reach of any
    lit pixel stay in shadow. Starting from the pixels brighter than
    ``fraction`` times the brightest (surely lit), the estimate is repeated
    ``iterations`` times, so a deep shadow is compared with the illumination
    extrapolated from lit pixels rather than with itself. The shadow is then cleaned by a
    morphological opening (removes isolated dark pixels, e.g. dead pixels)
    and a closing (fills small lit holes in the shadow), with a disc of radius
    ``clean_radius`` pixels.

    Parameters
    ----------
    static_background : (sy, sx) array
        Static background (raw intensities, any device).
    fraction
        Shadow threshold relative to the illuminated background, in (0, 1).
    sigma
        Standard deviation of the illumination blur in pixels; None: ``sx / 8``.
    clean_radius
        Radius in pixels of the cleaning disc (0: no cleaning).
    iterations
        Number of threshold / re-estimate rounds (at least 1).

    Returns
    -------
    mask : (sy, sx) bool array
        True where the detector is lit (pixels to use).

    Raises
    ------
    ValueError
        If the background is not 2-D, not finite or nowhere positive, a
        parameter is out of range, or the shadow covers every pixel.
    """
    b = np.asarray(backend.to_host(static_background), dtype=np.float64)
    if b.ndim != 2:
        raise ValueError(f"Expected a static background of shape (sy, sx), got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("static background holds NaN or infinite values")
    if not b.max() > 0:
        raise ValueError(f"static background has no illuminated pixel (maximum {b.max():g})")
    if not 0 < fraction < 1:
        raise ValueError(f"Expected `fraction` in (0, 1), got {fraction!r}")
    if clean_radius < 0 or iterations < 1:
        raise ValueError(f"Expected clean_radius >= 0 and iterations >= 1, got "
                         f"{clean_radius!r} and {iterations!r}")
    sigma = b.shape[1] / 8 if sigma is None else _check_positive("sigma", sigma)
    lit = b >= fraction * b.max()  # surely lit: the bright core of the background
    for _ in range(iterations):
        stacked = np.stack([b * lit, lit.astype(np.float64)]).astype(np.float32)
        numerator, weight = gaussian_blur(stacked, sigma).astype(np.float64)
        reach = weight > 1e-3
        reference = np.divide(numerator, weight, out=np.zeros_like(b), where=reach)
        shadow = ~reach | (b < fraction * reference)
        if clean_radius > 0:
            shadow = _morphology(_morphology(shadow, clean_radius, "erode"), clean_radius, "dilate")
            shadow = _morphology(_morphology(shadow, clean_radius, "dilate"), clean_radius, "erode")
        lit = ~shadow
    return _check_mask(lit, "shadow mask")


# --------------------------------------------------------------------------- the chunked stage

def _varying(patterns: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(k,) bool: True where a raw pattern is not constant over the masked pixels."""
    flat = patterns.reshape(len(patterns), -1)
    if mask is not None:
        flat = flat[:, mask.ravel()]
    return flat.max(axis=1) > flat.min(axis=1)


def map_blocks(ny: int, nx: int, chunk_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Chunks ``(row0, row1, col0, col1)`` in row-major map order.

    Whole map rows, ``chunk_size // nx`` at a time; a row longer than
    ``chunk_size`` is cut into segments of ``chunk_size`` pixels.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if nx <= chunk_size:
        rows = chunk_size // nx
        for r0 in range(0, ny, rows):
            yield r0, min(r0 + rows, ny), 0, nx
    else:
        for r in range(ny):
            for c0 in range(0, nx, chunk_size):
                yield r, r + 1, c0, min(c0 + chunk_size, nx)


def _read(data: Any, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Raw patterns of a map block as a host array (R, C, sy, sx)."""
    block = data[rows[0]:rows[1], cols[0]:cols[1]]
    if hasattr(block, "compute"):
        block = block.compute()
    return np.asarray(block)


def _check_finite(raw: np.ndarray, origin: tuple[int, int], nx: int, source: str) -> None:
    """ValueError naming the first pattern of a block (R, C, sy, sx) with NaN or inf."""
    if raw.dtype.kind not in "fc":
        return
    finite = np.isfinite(raw).all(axis=(2, 3))
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        row, col = origin[0] + int(r), origin[1] + int(c)
        raise ValueError(f"{source}: pattern {row * nx + col} (row {row}, column {col}) holds "
                         f"NaN or infinite values ({int((~finite).sum())} such patterns in "
                         f"this chunk)")


def _check_stack_mask(mask: Any, pattern_shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(backend.to_host(mask), dtype=bool)
    if m.shape != tuple(pattern_shape):
        raise ValueError(f"signal mask shape {m.shape} differs from the pattern shape "
                         f"{tuple(pattern_shape)}")
    return _check_mask(m, "signal mask")


def resolve_static_background(stack: Any, config: PreprocessConfig, *, background: Any = None,
                      mask: Any = None, chunk_size: int = 4096) -> np.ndarray | None:
    """The static background that ``config`` removes from a stack.

    Parameters
    ----------
    stack
        A :class:`~dpm.io.readers.PatternStack` (``data`` of shape
        ``(ny, nx, sy, sx)``, ``source``, ``static_background``).
    config
        ``config.static_background`` picks the background: ``"none"``;
        ``"given"``: ``background``, else the file's ``stack.static_background``;
        ``"mean"``: ``background`` when given (a mean computed earlier by this
        function), else the mean raw pattern over the readable patterns (one
        pass over the stack, ``chunk_size`` patterns at a time).
    background : (sy, sx) array, optional
        See ``config``.
    mask : (sy, sx) bool array, optional
        Signal mask: a pattern constant over its pixels is unreadable and left
        out of the mean.

    Returns
    -------
    background : (sy, sx) float32 host array, or None for ``"none"``

    Raises
    ------
    ValueError
        If ``"given"`` finds no background, the background's shape differs
        from the pattern shape (naming both) or it holds NaN/inf, or, for
        ``"mean"``, every pattern is constant.
    """
    if config.static_background == "none":
        return None
    shape = tuple(stack.data.shape[2:])
    if background is None and config.static_background == "given":
        if stack.static_background is None:
            raise ValueError(f"{stack.source}: static_background='given' but neither the call "
                             "nor the file provides a background")
        background = stack.static_background
    if background is None:
        mask = _check_stack_mask(mask, shape)
        ny, nx = stack.map_shape
        readable = 0

        def varying_chunks() -> Iterator[np.ndarray]:
            nonlocal readable
            for r0, r1, c0, c1 in map_blocks(ny, nx, chunk_size):
                raw = _read(stack.data, (r0, r1), (c0, c1)).reshape(-1, *shape)
                keep = raw[_varying(raw, mask)]
                readable += len(keep)
                yield keep

        background = mean_pattern(varying_chunks())
        if readable == 0:
            raise ValueError(f"{stack.source}: every pattern is constant; nothing to index")
        background = smooth_background(background, config.mean_smoothing(shape))
    bg = np.asarray(backend.to_host(background), dtype=np.float32)
    if bg.shape != shape:
        raise ValueError(f"static background shape {bg.shape} differs from the pattern shape "
                         f"{shape}")
    if not np.isfinite(bg).all():
        raise ValueError(f"{stack.source}: the static background holds NaN or infinite values")
    return bg


def _pattern_steps(raw: Any, config: PreprocessConfig, background: Any) -> Any:
    """Steps 1-4 on (k, sy, sx) patterns on ``xp``; ``background`` on the same device."""
    xp = backend.namespace(raw)
    p = xp.asarray(raw, dtype=xp.float32)
    if background is not None:
        p = remove_static_background(p, background, config.operation)
    if config.binning > 1:
        p = bin_patterns(p, config.binning, config.binning_mode)
    if config.dynamic_background:
        p = remove_dynamic_background(p, config.dynamic_sigma, config.dynamic_operation)
    if config.gaussian_sigma is not None:
        p = gaussian_blur(p, config.gaussian_sigma)
    return p


def preprocess_stack(stack: Any, config: PreprocessConfig = PreprocessConfig(), *,
                     background: Any = None, mask: Any = None, xp: ModuleType = np,
                     chunk_size: int = 4096) -> Iterator[tuple[int, Any, np.ndarray]]:
    """Run the preprocessing steps over a pattern stack, chunk by chunk.

    The stack is read in chunks of whole map rows (``chunk_size // nx`` rows;
    a row longer than ``chunk_size`` in segments of ``chunk_size`` patterns),
    each with ``config.neighbour_radius`` extra rows (and columns, for
    segments) on each side when neighbour averaging is on: the steps before
    averaging run on those halo patterns too (again for each chunk), so every
    chunk's average equals the whole map's. Only one chunk and its halo are in
    memory at a time.

    A raw pattern that is constant over the masked pixels (a blanked beam, a
    dead frame) is unreadable: it is left out of the mean background and of
    every neighbour average, and comes out all zero.

    Parameters
    ----------
    stack
        A :class:`~dpm.io.readers.PatternStack`: ``data`` of shape
        ``(ny, nx, sy, sx)`` (NumPy, memory map or dask), ``map_shape``,
        ``source``, ``static_background``.
    config
        The steps (see :class:`PreprocessConfig` for their order).
    background : (sy, sx) array, optional
        Static background; see :func:`resolve_static_background`.
    mask : (sy, sx) bool array, optional
        Signal mask of the raw patterns (True where a pixel is used); decides
        which patterns are constant.
    xp
        Array module the steps run on (NumPy, or CuPy for the GPU).
    chunk_size
        Patterns per chunk.

    Returns
    -------
    chunks
        An iterator of ``(start, patterns, readable)``: ``start`` the flat map
        index (``row * nx + col``) of the chunk's first pattern; ``patterns``
        ``(k, sy', sx')`` float32 on ``xp``, ``(sy', sx')`` the binned shape;
        ``readable`` ``(k,)`` bool host array. Chunks come in map order.

    Raises
    ------
    ValueError
        At the call: if the binning does not divide the pattern shape, the
        mask or background is invalid (see :func:`resolve_static_background`), or
        (with ``"mean"``) every pattern is constant. While iterating: naming
        the pattern, its row and column, when a pattern holds NaN or infinite
        values; after the last chunk, when no pattern was readable.

    Examples
    --------
    >>> import numpy as np
    >>> from dpm.io.readers import as_pattern_stack
    >>> from dpm.preprocess import PreprocessConfig, preprocess_stack
    >>> raw = np.random.default_rng(0).random((4, 5, 20, 20), dtype=np.float32)
    >>> config = PreprocessConfig(binning=2, neighbour_sigma=1.0)
    >>> [(start, p.shape) for start, p, ok in
    ...  preprocess_stack(as_pattern_stack(raw), config, chunk_size=10)]
    [(0, (10, 10, 10)), (10, (10, 10, 10))]
    """
    shape = tuple(stack.data.shape[2:])
    bin_shape(shape, config.binning)
    mask = _check_stack_mask(mask, shape)
    bg = resolve_static_background(stack, config, background=background, mask=mask,
                           chunk_size=chunk_size)
    blocks = list(map_blocks(*stack.map_shape, chunk_size))
    _log.info("%s: preprocessing %d x %d patterns in %d chunks: %s", stack.source,
              *stack.map_shape, len(blocks),
              ", ".join(s["step"] for s in config.steps()) or "no steps")
    return _iterate(stack, config, None if bg is None else _on(xp, bg), mask, xp, blocks)


def preprocess_block(stack: Any, config: PreprocessConfig, block: tuple[int, int, int, int], *,
                     background: Any = None, mask: np.ndarray | None = None,
                     xp: ModuleType = np,
                     digest: Callable[[np.ndarray], None] | None = None,
                     ) -> tuple[Any, np.ndarray]:
    """Run the preprocessing steps on one block of a map (a chunk of :func:`preprocess_stack`).

    Parameters
    ----------
    stack
        A :class:`~dpm.io.readers.PatternStack`.
    config
        The steps.
    block
        ``(row0, row1, col0, col1)``: whole map rows, or a segment of one row
        (the chunks of :func:`preprocess_stack`); with neighbour averaging the
        block is read with its halo, so its average equals the whole map's.
    background
        The resolved static background on ``xp`` (:func:`resolve_static_background`), or None.
    mask
        Signal mask of the raw patterns (checked).
    xp
        Array module the steps run on.
    digest
        Called with the block's raw patterns ``(R, C, sy, sx)`` (without the
        halo) before preprocessing, e.g. to hash what was read.

    Returns
    -------
    patterns : (k, sy', sx') float32 array on ``xp``
        Zero for unreadable patterns.
    readable : (k,) bool host array
    """
    ny, nx = stack.map_shape
    r0, r1, c0, c1 = block
    h = config.neighbour_radius
    rows = (max(r0 - h, 0), min(r1 + h, ny))
    cols = (max(c0 - h, 0), min(c1 + h, nx))
    raw = _read(stack.data, rows, cols)
    if digest is not None:
        digest(raw[r0 - rows[0]:r1 - rows[0], c0 - cols[0]:c1 - cols[0]])
    _check_finite(raw, (rows[0], cols[0]), nx, stack.source)
    nr, nc, sy, sx = raw.shape
    flat = raw.reshape(nr * nc, sy, sx)
    ok = _varying(flat, mask).reshape(nr, nc)
    p = _pattern_steps(xp.asarray(flat), config, background)
    if config.neighbour_sigma is not None:
        p = _average_block(p.reshape(nr, nc, *p.shape[1:]), ok.astype(np.float64),
                           (rows[0], cols[0]), (r0, r1, c0, c1), config.neighbour_sigma, h)
    p = p.reshape((r1 - r0) * (c1 - c0), *p.shape[-2:])
    ok = ok[r0 - rows[0]:r1 - rows[0], c0 - cols[0]:c1 - cols[0]].ravel()
    if config.rescale:
        p = rescale_intensity(p, config.rescale_range)
    return xp.where(xp.asarray(ok)[:, None, None], p, xp.float32(0.0)), ok


def _iterate(stack: Any, config: PreprocessConfig, background: Any, mask: np.ndarray | None,
             xp: ModuleType, blocks: list[tuple[int, int, int, int]],
             ) -> Iterator[tuple[int, Any, np.ndarray]]:
    """The chunk loop of :func:`preprocess_stack` (its inputs checked)."""
    nx = stack.map_shape[1]
    any_readable = False
    for block in blocks:
        p, ok = preprocess_block(stack, config, block, background=background, mask=mask, xp=xp)
        any_readable |= bool(ok.any())
        yield block[0] * nx + block[2], p, ok
    if not any_readable:
        raise ValueError(f"{stack.source}: every pattern is constant; nothing to index")
