"""Square Lambert projection of the unit sphere (Rosca 2010; EMsoft's convention).

A master pattern stores each hemisphere on a square grid of ``(2 npx + 1)²``
pixels. Pixel ``[row, col]`` sits at Lambert coordinates
``(a, b) = (col - npx, row - npx) / npx`` in ``[-1, 1]²``: columns run along
the crystal x axis, rows along y. The northern hemisphere holds directions
with ``z >= 0``, the southern one their mirror ``z -> -z``.

Forward (square -> sphere), with ``X = a sqrt(pi/2)`` and ``Y = b sqrt(pi/2)``:

* ``|X| <= |Y|``: ``q = (2Y/pi) sqrt(pi - Y²)``,
  ``v = (q sin(pi X / 4Y), q cos(pi X / 4Y), 1 - 2Y²/pi)``;
* otherwise: ``q = (2X/pi) sqrt(pi - X²)``,
  ``v = (q cos(pi Y / 4X), q sin(pi Y / 4X), 1 - 2X²/pi)``.

Inverse (sphere -> square), using ``|z|`` so both hemispheres share one grid:

* ``|y| <= |x|``: ``q = sgn(x) sqrt(2 (1 - |z|))``,
  ``(X, Y) = (q sqrt(pi)/2, q (2/sqrt(pi)) atan(y/x))``;
* otherwise: ``q = sgn(y) sqrt(2 (1 - |z|))``,
  ``(X, Y) = (q (2/sqrt(pi)) atan(x/y), q sqrt(pi)/2)``.

Reference: C. Rosca, Astron. Astrophys. 520 (2010) A63; the same formulas are
used by EMsoft (``Lambert.f90``) and kikuchipy.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

_SQRT_HALF_PI = math.sqrt(math.pi / 2.0)
_SQRT_PI = math.sqrt(math.pi)


def lambert_to_vector(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Map Lambert square coordinates to unit vectors of the northern hemisphere.

    Parameters
    ----------
    a, b : (...) array
        Lambert coordinates in ``[-1, 1]`` along the crystal x and y axes.

    Returns
    -------
    v : (..., 3) float64 array
        Unit vectors with ``z >= 0``; negate ``z`` for the southern hemisphere.
    """
    X = np.asarray(a, dtype=np.float64) * _SQRT_HALF_PI
    Y = np.asarray(b, dtype=np.float64) * _SQRT_HALF_PI
    X, Y = np.broadcast_arrays(X, Y)
    v = np.zeros(X.shape + (3,))
    v[..., 2] = 1.0
    y_major = (np.abs(X) <= np.abs(Y)) & (Y != 0)
    x_major = np.abs(X) > np.abs(Y)
    with np.errstate(divide="ignore", invalid="ignore"):
        Xy, Yy = X[y_major], Y[y_major]
        q = (2 * Yy / np.pi) * np.sqrt(np.pi - Yy**2)
        v[y_major] = np.stack(
            [q * np.sin(np.pi * Xy / (4 * Yy)), q * np.cos(np.pi * Xy / (4 * Yy)),
             1 - 2 * Yy**2 / np.pi], axis=-1)
        Xx, Yx = X[x_major], Y[x_major]
        q = (2 * Xx / np.pi) * np.sqrt(np.pi - Xx**2)
        v[x_major] = np.stack(
            [q * np.cos(np.pi * Yx / (4 * Xx)), q * np.sin(np.pi * Yx / (4 * Xx)),
             1 - 2 * Xx**2 / np.pi], axis=-1)
    return v


def vector_to_lambert(v: np.ndarray) -> np.ndarray:
    """Map unit vectors to Lambert square coordinates (hemisphere from ``sign(z)``).

    Parameters
    ----------
    v : (..., 3) array
        Unit vectors (normalised here).

    Returns
    -------
    ab : (..., 2) float64 array
        Lambert coordinates ``(a, b)`` in ``[-1, 1]²``.
    """
    v = np.asarray(v, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    r = np.sqrt(np.maximum(2.0 * (1.0 - np.abs(z)), 0.0))
    x_major = np.abs(y) <= np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(x_major, np.sign(x), np.sign(y)) * r
        X = np.where(x_major, q * _SQRT_PI / 2, q * (2 / _SQRT_PI) * np.arctan(x / y))
        Y = np.where(x_major, q * (2 / _SQRT_PI) * np.arctan(y / x), q * _SQRT_PI / 2)
    pole = (x == 0) & (y == 0)
    X = np.where(pole, 0.0, X)
    Y = np.where(pole, 0.0, Y)
    return np.stack([X, Y], axis=-1) / _SQRT_HALF_PI


@nb.njit(cache=True, fastmath=False, nogil=True)
def vector_to_lambert_scalar(x: float, y: float, z: float) -> tuple[float, float]:
    """Numba twin of :func:`vector_to_lambert` for one unit vector (no normalisation)."""
    if x == 0.0 and y == 0.0:
        return 0.0, 0.0
    r = math.sqrt(max(2.0 * (1.0 - abs(z)), 0.0))
    if abs(y) <= abs(x):
        q = r if x >= 0 else -r
        X = q * _SQRT_PI / 2
        Y = q * (2 / _SQRT_PI) * math.atan(y / x)
    else:
        q = r if y >= 0 else -r
        X = q * (2 / _SQRT_PI) * math.atan(x / y)
        Y = q * _SQRT_PI / 2
    return X / _SQRT_HALF_PI, Y / _SQRT_HALF_PI


def grid_vectors(npx: int, hemisphere: str = "north") -> np.ndarray:
    """Unit vectors at every pixel of a ``(2 npx + 1)²`` Lambert grid.

    Parameters
    ----------
    npx
        Half-width of the grid in pixels.
    hemisphere
        ``"north"`` (``z >= 0``) or ``"south"`` (``z <= 0``).

    Returns
    -------
    v : (2 npx + 1, 2 npx + 1, 3) float64 array
        ``v[row, col]`` is the direction of Lambert pixel ``(col, row)``.
    """
    if hemisphere not in ("north", "south"):
        raise ValueError(f"hemisphere must be 'north' or 'south', got {hemisphere!r}")
    t = np.arange(-npx, npx + 1) / npx
    b, a = np.meshgrid(t, t, indexing="ij")
    v = lambert_to_vector(a, b)
    if hemisphere == "south":
        v[..., 2] *= -1
    return v


def filter_hemispheres(northern: np.ndarray, southern: np.ndarray, func, pad: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Apply a neighbourhood filter to both Lambert hemispheres, continuing across the equator.

    The square's edge is the equator, shared by both hemispheres: the
    directions just beyond the northern square's edge are the southern
    square's pixels mirrored about that edge (and vice versa). Each hemisphere
    is padded with the other's mirror image, filtered, and cropped.

    Parameters
    ----------
    northern, southern : (N, N) arrays
        The two hemispheres (not modified).
    func
        Filter taking and returning a 2-D array of the padded shape.
    pad
        Border width in pixels that ``func`` needs (its kernel radius).
    """
    def one(this: np.ndarray, other: np.ndarray) -> np.ndarray:
        padded = np.pad(np.asarray(other, dtype=np.float64), pad, mode="reflect")
        padded[pad:-pad, pad:-pad] = this
        return func(padded)[pad:-pad, pad:-pad]

    if pad < 1:
        return func(np.asarray(northern, float)), func(np.asarray(southern, float))
    return one(northern, southern), one(southern, northern)


def downsample(northern: np.ndarray, southern: np.ndarray, factor: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased decimation of a ``(2 factor npx + 1)²`` grid to ``(2 npx + 1)²``.

    Each output pixel is the triangle-weighted mean (Bartlett window of
    ``2 factor - 1`` taps per axis) of the fine pixels around it, i.e. its
    footprint on the sphere; a point sample of the fine grid would alias
    detail finer than the output pixels.
    """
    if factor == 1:
        return northern, southern
    from scipy import ndimage

    taps = np.bartlett(2 * factor + 1)[1:-1]
    taps /= taps.sum()

    def smooth(a: np.ndarray) -> np.ndarray:
        a = ndimage.convolve1d(a, taps, axis=0, mode="nearest")
        return ndimage.convolve1d(a, taps, axis=1, mode="nearest")

    north, south = filter_hemispheres(northern, southern, smooth, pad=factor)
    return north[::factor, ::factor], south[::factor, ::factor]


def lambert_interpolate(hemisphere: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of one Lambert hemisphere at unit vectors.

    Uses EMsoft's/kikuchipy's scheme (``LambertgetInterpolation``): pixel
    coordinates ``npx·(a, b) + npx`` of the Lambert coordinates of ``v``
    (hemisphere by ``|z|``, i.e. the caller picks the array), neighbours
    clamped at the edge.

    Parameters
    ----------
    hemisphere : (N, N) array
        One Lambert hemisphere, ``N = 2 npx + 1``, ``[row = y, col = x]``.
    v : (..., 3) array
        Unit vectors.

    Returns
    -------
    values : (...) float64 array
    """
    n = hemisphere.shape[0]
    scale = (n - 1) / 2
    ab = vector_to_lambert(v)
    x = scale * ab[..., 0] + scale
    y = scale * ab[..., 1] + scale
    c0 = np.clip(np.floor(x).astype(np.int64), 0, n - 1)
    r0 = np.clip(np.floor(y).astype(np.int64), 0, n - 1)
    c1 = np.minimum(c0 + 1, n - 1)
    r1 = np.minimum(r0 + 1, n - 1)
    dx = x - c0
    dy = y - r0
    mp = np.asarray(hemisphere, dtype=np.float64)
    return (mp[r0, c0] * (1 - dy) * (1 - dx) + mp[r1, c0] * dy * (1 - dx)
            + mp[r0, c1] * (1 - dy) * dx + mp[r1, c1] * dy * dx)


def lambert_to_stereographic(hemisphere: np.ndarray) -> np.ndarray:
    """Stereographic projection of one Lambert hemisphere, EMsoft's ``masterSP`` layout.

    Pixel ``[j, i]`` of the ``N × N`` output (``N = 2 npx + 1``) is at
    ``(X, Y) = (i - npx, j - npx) / npx``; for ``r² = X² + Y² <= 1`` it shows
    the direction ``(2X, 2Y, 1 - r²) / (1 + r²)`` (``z -> -z`` for the
    southern hemisphere, which shares the Lambert coordinates), outside the
    unit circle it is 0.

    Parameters
    ----------
    hemisphere : (N, N) array
        One Lambert hemisphere.

    Returns
    -------
    stereographic : (N, N) float32 array
    """
    n = hemisphere.shape[0]
    npx = (n - 1) // 2
    t = np.arange(-npx, npx + 1) / npx
    y, x = np.meshgrid(t, t, indexing="ij")
    r2 = x * x + y * y
    v = np.stack([2 * x, 2 * y, 1 - r2], axis=-1) / (1 + r2)[..., None]
    out = lambert_interpolate(hemisphere, v)
    out[r2 > 1] = 0.0
    return out.astype(np.float32)
