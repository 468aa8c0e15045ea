"""Pattern preprocessing before matching.

Raw Kikuchi patterns sit on a smooth background (the angular distribution of
backscattered electrons and the detector's response) that is far stronger than
the bands. Matching uses the background-corrected patterns.

This module now provides the static background (given, or the mean of the
stack) subtracted or divided; the other steps of the protocol (dynamic
background, Gaussian filter, neighbour averaging, masks) follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dpm import backend


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing applied to every pattern, in this order.

    Attributes
    ----------
    static_background
        Remove a static background: ``"mean"`` (the mean pattern of the
        stack, as kikuchipy and the vendors do when none was acquired),
        ``"given"`` (the ``background`` array passed to the pipeline) or
        ``"none"``.
    operation
        ``"subtract"`` or ``"divide"`` the background.
    """

    static_background: Literal["mean", "given", "none"] = "mean"
    operation: Literal["subtract", "divide"] = "subtract"

    def __post_init__(self) -> None:
        if self.static_background not in ("mean", "given", "none"):
            raise ValueError(f"static_background must be 'mean', 'given' or 'none', "
                             f"got {self.static_background!r}")
        if self.operation not in ("subtract", "divide"):
            raise ValueError(f"operation must be 'subtract' or 'divide', got {self.operation!r}")


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


def remove_static_background(patterns: Any, background: Any,
                             operation: Literal["subtract", "divide"] = "subtract") -> Any:
    """Remove a static background from every pattern.

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
    """
    xp = backend.namespace(patterns)
    p = xp.asarray(patterns, dtype=xp.float32)
    bg = xp.asarray(backend.to_host(background), dtype=xp.float32)
    if bg.shape != p.shape[1:]:
        raise ValueError(f"static background shape {tuple(bg.shape)} differs from the "
                         f"pattern shape {tuple(p.shape[1:])}")
    if operation == "subtract":
        return p - bg[None]
    if operation == "divide":
        safe = xp.where(bg == 0, xp.float32(1.0), bg)
        return xp.where(bg[None] == 0, xp.float32(0.0), p / safe[None])
    raise ValueError(f"operation must be 'subtract' or 'divide', got {operation!r}")
