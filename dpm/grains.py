"""Grain reconstruction and per-grain statistics on square and hexagonal maps.

Grains
------
Neighbouring pixels are compared across every *face* of the map grid, each
unordered pair once: 4-connectivity on square grids (right and down
neighbours), 6 on the hexagonal ``.ang`` HexGrid layout of
:mod:`dpm.cleanup` (right, lower-left, lower-right). Only pairs of two indexed
pixels are compared; the misorientation of a pair is the symmetry-reduced
disorientation angle (:func:`disorientation_angles`). Grains are the connected
components (:func:`scipy.sparse.csgraph.connected_components`) of the indexed
pixels joined by pairs below ``GrainConfig.high_angle``, chained pixel to
pixel as in MTEX ``calcGrains`` and DREAM.3D *Segment Features*. Unindexed
pixels (pores, voids) get label -1 and never join or bridge grains.

Grain ids run from 0 in raster order of each grain's first pixel (row-major
``i = row · nx + col``), so the labels do not depend on the graph library.

Boundaries
----------
A *high-angle boundary* (HAGB) pair joins two pixels of different grains. A
*low-angle boundary* (LAGB) pair joins two pixels of the same grain with a
misorientation of at least ``GrainConfig.low_angle`` (MTEX's inner
boundaries; a same-grain pair at or above ``high_angle``, which only a
grain closed around it can give, counts as LAGB too). Each pair stands for
one face of the pixel cell: ``step`` long on square grids, ``step/√3`` on the
hexagonal grid (the Voronoi cell of points ``step`` apart).

Map coordinates
---------------
Pixel centres, in µm: square ``x = col · step``, ``y = row · step``;
hexagonal ``x = (col + ½ (row mod 2)) · step``, ``y = row · (√3/2) · step``.
``y`` (row) runs down the map image. The cell area is ``step²`` (square) or
``(√3/2) step²`` (hexagonal).

Minimum grain size
------------------
Grains of fewer than ``GrainConfig.min_size`` pixels keep their label and
their row in the grain table, flagged ``small``; they are left out of every
map-level mean and count in the summary (``n_small_grains`` reports them).
Unlike MTEX's ``minPixel`` they are not turned into unindexed pixels.
"""

from __future__ import annotations

import csv
import logging
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dpm.io.writers import atomic_write

if TYPE_CHECKING:
    from orix.quaternion import Symmetry

Grid = Literal["square", "hexagonal"]

log = logging.getLogger("dpm")

#: (row, column) offsets of the 8 neighbours on a square grid.
_SQUARE_OFFSETS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])
#: (row, column) offsets of the 6 neighbours of a pixel in an even row of a
#: hexagonal grid; in an odd row, the column offsets into rows r ± 1 grow by 1.
_HEX_OFFSETS = np.array([(-1, -1), (-1, 0), (0, -1), (0, 1), (1, -1), (1, 0)])


def check_grid(grid: str) -> None:
    """Raise ValueError unless ``grid`` is ``"square"`` or ``"hexagonal"``."""
    if grid not in ("square", "hexagonal"):
        raise ValueError(f"grid must be 'square' or 'hexagonal', got {grid!r}")


#: Pairs (or pixels) per chunk of the general orix misorientation path and
#: of the symmetry alignment; bounds the temporary memory to ~100 MB.
CHUNK = 1 << 18

#: Per-pixel flags of dpm's cleanup stages (CrystalMap properties) that the
#: map summary counts: zero solutions replaced from neighbours, wild spikes,
#: zero solutions filled, pseudo-symmetry corrections.
CLEANUP_FLAGS = ("replaced", "despiked", "filled", "pseudo_symmetry")

#: Per-grain table columns, in order, with their units in the name.
COLUMNS = ("grain_id", "pixels", "area_um2", "ecd_um", "centroid_x_um", "centroid_y_um",
           "phi1_deg", "Phi_deg", "phi2_deg", "gos_deg", "width_um", "height_um",
           "aspect_ratio", "long_axis_deg", "touches_edge", "spans_film", "neighbours", "small")


@dataclass(frozen=True)
class GrainConfig:
    """How grains are reconstructed and measured.

    Attributes
    ----------
    high_angle
        Grain boundary threshold in degrees: neighbours misoriented by less
        join one grain.
    low_angle
        Low-angle boundary threshold in degrees: same-grain neighbour pairs
        misoriented by at least this much are LAGB pairs.
    min_size
        Grains with fewer pixels are flagged ``small`` and left out of the
        map summary (see the module notes).
    interface_direction
        Map axis along which the current-collector interface runs: ``"x"``
        (along the rows; the film thickness runs along y) or ``"y"``.
        ``width_um`` is measured along it, ``height_um`` across it.
    grid
        ``"square"`` or ``"hexagonal"`` (the ``.ang`` HexGrid layout).
    step_size
        Map step in µm (the distance between neighbouring pixel centres
        along x on either grid).
    kam_threshold
        Degrees: neighbour pairs misoriented by this much or more are left out
        of the kernel average misorientation (:func:`kernel_average_misorientation`).
    astm_min_pixels
        ASTM E2627: grains with fewer pixels are left out of the mean area.
    astm_min_mean_pixels
        ASTM E2627: the mean grain (edge grains excluded, before the size
        cut) must have at least this many pixels for the measurement to be
        valid; :func:`grains` logs a warning otherwise.
    """

    high_angle: float = 10.0
    low_angle: float = 2.0
    min_size: int = 1
    interface_direction: Literal["x", "y"] = "x"
    grid: Grid = "square"
    step_size: float = 1.0
    kam_threshold: float = 5.0
    astm_min_pixels: int = 100
    astm_min_mean_pixels: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.kam_threshold <= 180:
            raise ValueError(f"Expected kam_threshold in (0, 180] degrees, got {self.kam_threshold}")
        if self.astm_min_pixels < 1 or self.astm_min_mean_pixels < 1:
            raise ValueError("Expected astm_min_pixels and astm_min_mean_pixels >= 1, got "
                             f"{self.astm_min_pixels} and {self.astm_min_mean_pixels}")
        if not 0 < self.low_angle <= self.high_angle:
            raise ValueError("Expected 0 < low_angle <= high_angle, got "
                             f"low_angle={self.low_angle}, high_angle={self.high_angle}")
        if self.min_size < 1:
            raise ValueError(f"Expected min_size >= 1 pixel, got {self.min_size}")
        if self.interface_direction not in ("x", "y"):
            raise ValueError(f"Expected interface_direction 'x' or 'y', got {self.interface_direction!r}")
        check_grid(self.grid)
        if self.step_size <= 0:
            raise ValueError(f"Expected a positive step_size in µm, got {self.step_size}")


@dataclass(frozen=True, eq=False)
class GrainMap:
    """Grains of one map.

    Attributes
    ----------
    labels : (ny, nx) int64 array
        Grain id of every pixel, -1 for unindexed pixels.
    pairs : (p, 2) int64 array
        Neighbouring pixel pairs ``(i, j)``, ``i < j``, both indexed, each once.
    pair_angle : (p,) float64 array
        Disorientation of each pair in degrees.
    table : dict of str to (g,) arrays
        One entry per column of :data:`COLUMNS`, one row per grain (row ``k``
        is grain ``k``).
    summary : dict
        Map-level statistics (see :func:`reconstruct_grains`).
    config : GrainConfig
        The configuration used.
    kam : (ny, nx) float64 array
        Kernel average misorientation of every pixel in degrees
        (:func:`kernel_average_misorientation`), NaN where undefined.
    """

    labels: np.ndarray
    pairs: np.ndarray
    pair_angle: np.ndarray
    table: dict[str, np.ndarray]
    summary: dict[str, Any]
    config: GrainConfig
    kam: np.ndarray

    @property
    def hagb(self) -> np.ndarray:
        """(p,) bool: pairs joining two different grains."""
        lab = self.labels.ravel()
        return lab[self.pairs[:, 0]] != lab[self.pairs[:, 1]]

    @property
    def lagb(self) -> np.ndarray:
        """(p,) bool: same-grain pairs misoriented by at least ``low_angle``."""
        return ~self.hagb & (self.pair_angle >= self.config.low_angle)


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a b`` of quaternion arrays ``(..., 4)`` ``(a, b, c, d)``, broadcast.

    Plain float arrays for hot loops; orix's ``Rotation * Rotation`` is the
    same product on its objects.
    """
    a0, a1, a2, a3 = np.moveaxis(a, -1, 0)
    b0, b1, b2, b3 = np.moveaxis(b, -1, 0)
    return np.stack([a0 * b0 - a1 * b1 - a2 * b2 - a3 * b3,
                     a0 * b1 + a1 * b0 + a2 * b3 - a3 * b2,
                     a0 * b2 - a1 * b3 + a2 * b0 + a3 * b1,
                     a0 * b3 + a1 * b2 - a2 * b1 + a3 * b0], axis=-1)


def quaternion_conjugate(q: np.ndarray) -> np.ndarray:
    """Conjugate (the inverse of a unit quaternion) of quaternions ``(..., 4)``."""
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def _cubic_angles(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Closed-form m-3m disorientation (EbsdLib ``CubicOps``) in degrees."""
    m = np.abs(quaternion_multiply(q1, quaternion_conjugate(q2)))
    a, b, c, d = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
    # Sorting network for 4 values: afterwards a <= b <= c <= d.
    a, b = np.minimum(a, b), np.maximum(a, b)
    c, d = np.minimum(c, d), np.maximum(c, d)
    a, c = np.minimum(a, c), np.maximum(a, c)
    b, d = np.minimum(b, d), np.maximum(b, d)
    b, c = np.minimum(b, c), np.maximum(b, c)
    w = np.maximum(np.maximum(d, (c + d) * np.sqrt(0.5)), 0.5 * (a + b + c + d))
    return np.degrees(2.0 * np.arccos(np.minimum(w, 1.0)))


def disorientation_angles(q1: np.ndarray, q2: np.ndarray, point_group: Symmetry) -> np.ndarray:
    """Symmetry-reduced misorientation angle between pairs of orientations.

    Parameters
    ----------
    q1, q2 : (m, 4) arrays
        Unit quaternions ``(a, b, c, d)`` in orix's convention (sample to
        crystal, symmetry acting on the left), pairwise.
    point_group
        orix point group of both orientations. Where its Laue group is m-3m
        the closed form of EbsdLib ``CubicOps`` is used (sorted ``|m|`` of
        ``m = q1 q2*``: ``w = max(a₄, (a₃+a₄)/√2, Σa/2)``, ``θ = 2 acos w``);
        otherwise orix ``Orientation.angle_with``, in chunks.

    Returns
    -------
    angles : (m,) float64 array
        Smallest rotation angle, over the crystal symmetry, taking one
        orientation to the other, in degrees in [0, 180].

    Examples
    --------
    >>> from orix.quaternion.symmetry import Oh
    >>> q = np.array([[1.0, 0, 0, 0]]); r = np.array([[np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)]])
    >>> disorientation_angles(q, r, Oh).round(6)
    array([0.])
    """
    q1 = np.asarray(q1, dtype=np.float64)
    q2 = np.asarray(q2, dtype=np.float64)
    if q1.ndim != 2 or q1.shape[1] != 4 or q1.shape != q2.shape:
        raise ValueError(f"Expected q1 and q2 of one shape (m, 4), got {q1.shape} and {q2.shape}")
    if point_group.laue.name == "m-3m":
        return _cubic_angles(q1, q2)
    from orix.quaternion import Orientation

    out = np.empty(len(q1))
    for s in range(0, len(q1), CHUNK):
        o1 = Orientation(q1[s:s + CHUNK], symmetry=point_group)
        o2 = Orientation(q2[s:s + CHUNK], symmetry=point_group)
        out[s:s + CHUNK] = o1.angle_with(o2, degrees=True)
    return out


def neighbours(map_shape: tuple[int, int], grid: Grid = "square") -> np.ndarray:
    """Indices of every pixel's neighbours on a square or hexagonal map grid.

    Parameters
    ----------
    map_shape
        ``(ny, nx)``; pixels in row-major order, ``i = row · nx + col``.
    grid
        ``"square"``: 8 neighbours, in the order (row, col) offsets
        (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1).
        ``"hexagonal"``: 6 neighbours (odd rows shifted by half a step towards
        +x, see :mod:`dpm.cleanup`), in the order upper-left, upper-right, left,
        right, lower-left, lower-right; columns 6 and 7 are -1.

    Returns
    -------
    neighbours : (ny · nx, 8) int64 array
        Pixel index of each neighbour, -1 where it would lie outside the map.

    Examples
    --------
    >>> neighbours((2, 3))[0]
    array([-1, -1, -1, -1,  1, -1,  3,  4])
    """
    check_grid(grid)
    offsets = _SQUARE_OFFSETS if grid == "square" else _HEX_OFFSETS
    out = np.full((int(np.prod(map_shape)), 8), -1, dtype=np.int64)
    out[:, :len(offsets)] = _offset_neighbours(map_shape, grid, offsets)
    return out


def _offset_neighbours(map_shape: tuple[int, int], grid: Grid, offsets: np.ndarray) -> np.ndarray:
    """(n, k) indices of the neighbours at the k (row, column) ``offsets`` (-1 outside);
    on hexagonal grids odd rows' column offsets into rows r ± 1 grow by 1."""
    ny, nx = (int(s) for s in map_shape)
    if ny < 1 or nx < 1:
        raise ValueError(f"map_shape must be two positive sizes, got {tuple(map_shape)}")
    row, col = np.divmod(np.arange(ny * nx), nx)
    rows = row[:, None] + offsets[:, 0]
    cols = col[:, None] + offsets[:, 1]
    if grid == "hexagonal":
        cols = cols + (offsets[:, 0] != 0) * (row[:, None] % 2)
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    return np.where(inside, rows * nx + cols, -1)


def neighbour_pairs(map_shape: tuple[int, int], grid: Grid = "square") -> np.ndarray:
    """Every pair of face neighbours of a map grid, each unordered pair once.

    Parameters
    ----------
    map_shape
        ``(ny, nx)``; pixels in row-major order, ``i = row · nx + col``.
    grid
        ``"square"``: right and lower neighbours (4-connectivity).
        ``"hexagonal"``: right, lower-left and lower-right neighbours
        (6-connectivity, odd rows shifted by half a step towards +x).

    Returns
    -------
    pairs : (p, 2) int64 array
        ``(i, j)`` with ``i < j``.

    Examples
    --------
    >>> neighbour_pairs((2, 2)).tolist()
    [[0, 1], [2, 3], [0, 2], [1, 3]]
    """
    check_grid(grid)
    # Forward faces, in this order: right, down (square); right, lower left,
    # lower right (hexagonal), as rows of the neighbour offsets.
    offsets = _SQUARE_OFFSETS[[4, 6]] if grid == "square" else _HEX_OFFSETS[[3, 4, 5]]
    table = _offset_neighbours(map_shape, grid, offsets)
    pixels = np.arange(len(table), dtype=np.int64)
    return np.concatenate([np.stack([pixels[table[:, k] >= 0], table[table[:, k] >= 0, k]],
                                    axis=1) for k in range(len(offsets))])


def pixel_coordinates(map_shape: tuple[int, int], grid: Grid = "square",
                      step_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centre coordinates ``(x, y)`` in µm, each ``(ny · nx,)`` (see the module notes)."""
    ny, nx = (int(s) for s in map_shape)
    row, col = np.divmod(np.arange(ny * nx), nx)
    if grid == "square":
        return col * float(step_size), row * float(step_size)
    return (col + 0.5 * (row % 2)) * step_size, row * (np.sqrt(3.0) / 2.0 * step_size)


def _pitch(grid: Grid, step_size: float) -> tuple[float, float]:
    """Distance between pixel rows/columns ``(along x, along y)`` in µm."""
    return step_size, step_size * (1.0 if grid == "square" else np.sqrt(3.0) / 2.0)


def align_to(q: np.ndarray, ref: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """Symmetry-equivalent ``s q`` of every ``q`` closest to its ``ref``, with ``<s q, ref> >= 0``.

    ``<s q, r> = <s, r q*>``, so the best operator is the row of ``ops`` with
    the largest ``|ops · (r q*)|``.
    """
    out = np.empty_like(q)
    for s in range(0, len(q), CHUNK):
        qc = q[s:s + CHUNK]
        dots = quaternion_multiply(ref[s:s + CHUNK], quaternion_conjugate(qc)) @ ops.T
        k = np.argmax(np.abs(dots), axis=1)
        sign = np.sign(dots[np.arange(len(k)), k])
        out[s:s + CHUNK] = quaternion_multiply(ops[k], qc) * np.where(sign < 0, -1.0, 1.0)[:, None]
    return out


def kernel_average_misorientation(labels: np.ndarray, pairs: np.ndarray, pair_angle: np.ndarray,
                                  threshold: float = 5.0) -> np.ndarray:
    """Kernel average misorientation (KAM) of every pixel, first-order kernel.

    The mean disorientation between a pixel and its face neighbours (4 on
    square grids, 6 on hexagonal ones, as :func:`neighbour_pairs` gives them)
    over the neighbours in the same grain misoriented by less than
    ``threshold`` (MTEX ``KAM`` with ``order=1`` and a threshold, which also
    skips pixel pairs in different grains; AZtecCrystal's default maximum
    angle is 5°).

    Parameters
    ----------
    labels : (ny, nx) int array
        Grain id of every pixel, -1 where unindexed.
    pairs : (p, 2) int array
        Face-neighbour pixel pairs (row-major pixel indices), each once.
    pair_angle : (p,) array
        Disorientation of each pair in degrees.
    threshold
        Degrees; pairs at or above it are left out.

    Returns
    -------
    kam : (ny, nx) float64 array
        Degrees; NaN for unindexed pixels and pixels without a pair kept.

    Examples
    --------
    >>> lab = np.zeros((1, 3), dtype=int)
    >>> kernel_average_misorientation(lab, np.array([[0, 1], [1, 2]]), np.array([1.0, 3.0])).tolist()
    [[1.0, 2.0, 3.0]]
    """
    lab = np.asarray(labels).ravel()
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    angle = np.asarray(pair_angle, dtype=np.float64)
    if angle.shape != (len(pairs),):
        raise ValueError(f"Expected one pair_angle per pair ({len(pairs)}), got shape {angle.shape}")
    a, b = lab[pairs[:, 0]], lab[pairs[:, 1]]
    keep = (a >= 0) & (a == b) & (angle < threshold)
    ends = pairs[keep].ravel()
    total = np.bincount(ends, np.repeat(angle[keep], 2), minlength=lab.size)
    count = np.bincount(ends, minlength=lab.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        kam = np.where(count > 0, total / count, np.nan)
    return kam.reshape(np.shape(labels))


def astm_grain_size_number(mean_area_um2: float) -> float:
    """ASTM grain size number G of a mean grain area Ā in µm² (E112 planimetric relation).

    ``G = 2 log₂ 254 + 1 - log₁₀ Ā / log₁₀ 2``: one grain per square inch at
    100× (Ā = 254² µm², 254 µm being 1/100 inch) is G = 1, and G rises by 1
    each time Ā halves.

    Examples
    --------
    >>> round(astm_grain_size_number(254.0**2), 6)   # one grain per in² at 100x
    1.0
    """
    if not mean_area_um2 > 0:
        raise ValueError(f"Expected a positive mean grain area in µm², got {mean_area_um2}")
    return float(2.0 * np.log2(254.0) + 1.0 - np.log10(mean_area_um2) / np.log10(2.0))


def astm_e2627(table: dict[str, np.ndarray], config: GrainConfig = GrainConfig()) -> dict[str, Any]:
    """Mean grain size by the ASTM E2627 procedure (EBSD, fully recrystallised material).

    Grains touching the map edge are excluded; the mean number of pixels of
    the remaining grains must reach ``config.astm_min_mean_pixels`` (500) for
    the measurement to be valid (``astm_e2627_valid``); grains of
    fewer than ``config.astm_min_pixels`` (100) pixels are then excluded, and
    the number-weighted mean area Ā of the rest gives the grain size number
    (:func:`astm_grain_size_number`). Columnar films whose grains all span the
    film touch the map edge, so the procedure measures none of them there;
    use the widths of :func:`reconstruct_grains` instead.

    Parameters
    ----------
    table
        Grain table of :func:`reconstruct_grains` (``pixels``, ``area_um2``,
        ``touches_edge``).
    config
        The two pixel limits.

    Returns
    -------
    dict
        ``astm_e2627_grains`` (grains measured), ``astm_e2627_excluded_edge``,
        ``astm_e2627_excluded_small``, ``astm_e2627_mean_pixels_before_cut``,
        ``astm_e2627_mean_area_um2`` (Ā), ``astm_e2627_G`` (NaN without grains)
        and ``astm_e2627_valid`` (the mean-size requirement holds).
    """
    inside = ~np.asarray(table["touches_edge"], dtype=bool)
    pixels = np.asarray(table["pixels"])[inside]
    area = np.asarray(table["area_um2"], dtype=np.float64)[inside]
    mean_before = float(pixels.mean()) if len(pixels) else float("nan")
    big = pixels >= config.astm_min_pixels
    mean_area = float(area[big].mean()) if big.any() else float("nan")
    valid = bool(len(pixels) and mean_before >= config.astm_min_mean_pixels)
    return {
        "astm_e2627_grains": int(big.sum()),
        "astm_e2627_excluded_edge": int((~inside).sum()),
        "astm_e2627_excluded_small": int((~big).sum()),
        "astm_e2627_mean_pixels_before_cut": mean_before,
        "astm_e2627_mean_area_um2": mean_area,
        "astm_e2627_G": astm_grain_size_number(mean_area) if big.any() else float("nan"),
        "astm_e2627_valid": valid,
    }


def pore_positions(labels: np.ndarray, grid: Grid = "square") -> dict[str, Any]:
    """Where the unindexed regions (pores, voids) of a map sit relative to the grains.

    A pore is a connected region of unindexed pixels (face neighbours, as
    :func:`neighbour_pairs`). It lies *inside a grain* when every indexed
    face neighbour of it belongs to one grain, *on a boundary* when they
    belong to two or more grains; pores touching the map edge are counted
    apart (part of them lies outside the map).

    Parameters
    ----------
    labels : (ny, nx) int array
        Grain ids, -1 where unindexed.
    grid
        ``"square"`` or ``"hexagonal"``.

    Returns
    -------
    dict
        ``n_pores``, ``pores_inside_grains``, ``pores_on_boundaries``,
        ``pores_at_map_edge`` (counts), ``pore_pixels``, and
        ``pore_pixels_on_boundaries_fraction`` (pixels of the pores away from
        the map edge that lie on boundaries, of those pores' pixels; NaN
        without such pores).

    Examples
    --------
    >>> lab = np.array([[0, 0, 1, 1], [0, -1, -1, 1], [0, 0, 1, 1], [0, -1, 0, 0]])
    >>> d = pore_positions(lab)
    >>> d["n_pores"], d["pores_on_boundaries"], d["pores_at_map_edge"]
    (2, 1, 1)
    """
    return _pore_positions(np.asarray(labels), neighbour_pairs(np.shape(labels), grid))


def _pore_positions(labels: np.ndarray, pairs: np.ndarray) -> dict[str, Any]:
    """:func:`pore_positions` from the map's face-neighbour ``pairs`` (all of them)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    lab = labels.ravel()
    ny, nx = labels.shape
    a, b = lab[pairs[:, 0]], lab[pairs[:, 1]]
    joined = pairs[(a < 0) & (b < 0)]
    n = lab.size
    graph = coo_matrix((np.ones(len(joined), np.int8), (joined[:, 0], joined[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    pore_pixels = np.flatnonzero(lab < 0)
    pores, pore_of = np.unique(comp[pore_pixels], return_inverse=True)
    which = np.full(n, -1, dtype=np.int64)
    which[pore_pixels] = pore_of
    # (pore, grain) contacts across faces, each once.
    left, right = (a < 0) & (b >= 0), (b < 0) & (a >= 0)
    n_labels = int(lab.max()) + 1
    contact = np.unique(np.concatenate([which[pairs[left, 0]] * n_labels + b[left],
                                        which[pairs[right, 1]] * n_labels + a[right]]))
    grains_touched = np.bincount(contact // max(n_labels, 1), minlength=len(pores))
    row, col = np.divmod(pore_pixels, nx)
    edge = np.bincount(pore_of, (row == 0) | (row == ny - 1) | (col == 0) | (col == nx - 1),
                       minlength=len(pores)) > 0
    size = np.bincount(pore_of, minlength=len(pores))
    on_boundary = ~edge & (grains_touched >= 2)
    inside = ~edge & (grains_touched == 1)
    interior = int(size[~edge].sum())
    return {
        "n_pores": int(len(pores)),
        "pores_inside_grains": int(inside.sum()),
        "pores_on_boundaries": int(on_boundary.sum()),
        "pores_at_map_edge": int(edge.sum()),
        "pore_pixels": int(size.sum()),
        "pore_pixels_on_boundaries_fraction": (float(size[on_boundary].sum() / interior)
                                               if interior else float("nan")),
    }


def reconstruct_grains(quaternions: np.ndarray, indexed: np.ndarray, map_shape: tuple[int, int],
                       point_group: Symmetry, *, config: GrainConfig = GrainConfig()) -> GrainMap:
    """Grains of a map and their statistics.

    Parameters
    ----------
    quaternions : (n, 4) array
        Unit quaternions ``(a, b, c, d)`` of every pixel (orix convention,
        sample to crystal), ``n = ny · nx`` in row-major map order; rows of
        unindexed pixels are ignored.
    indexed : (n,) bool array
        True where the pixel holds a valid orientation.
    map_shape
        ``(ny, nx)``.
    point_group
        orix point group of the phase.
    config
        Thresholds, grid, step and interface direction.

    Returns
    -------
    GrainMap
        ``table`` columns (one row per grain, :data:`COLUMNS`):
        ``grain_id``; ``pixels``; ``area_um2`` (pixels × cell area);
        ``ecd_um`` (equivalent circle diameter ``2 √(A/π)``);
        ``centroid_x_um``, ``centroid_y_um``; ``phi1_deg``, ``Phi_deg``,
        ``phi2_deg`` (Bunge Euler angles of the mean orientation in the
        fundamental zone: pixel quaternions moved to the symmetry equivalent
        nearest the grain's first pixel, summed, normalised); ``gos_deg``
        (grain orientation spread: mean disorientation of the pixels to the
        mean); ``width_um`` and ``height_um`` (extent of the pixel centres
        along and across the interface direction plus one pixel pitch);
        ``aspect_ratio`` and ``long_axis_deg`` (from the second moments of
        the pixel centres plus the cell's own, ``pitch²/12`` per axis:
        ``√(λ_max/λ_min)`` and the major axis angle in degrees in (-90, 90],
        measured from the interface direction towards the other map axis
        (+y, down the image, for interface ``"x"``; +x for ``"y"``), so 90 is
        perpendicular to the interface); ``touches_edge`` (a pixel in the
        first or last map row or column); ``spans_film`` (pixels in both the
        first and last map line parallel to the interface); ``neighbours``
        (number of distinct grains sharing a HAGB pair); ``small``.

        ``summary``: ``n_grains``, ``n_small_grains``, ``indexing_rate``,
        ``mean_ecd_um`` and ``mean_width_um`` (number-weighted),
        ``area_weighted_ecd_um`` and ``area_weighted_width_um``,
        ``hagb_length_per_area_per_um`` and ``lagb_length_per_area_per_um``
        (boundary length over indexed area, µm⁻¹), ``n_hagb_pairs``,
        ``n_lagb_pairs``, ``mean_kam_deg`` (mean kernel average
        misorientation), the ASTM E2627 entries of :func:`astm_e2627`, where the
        pores sit (:func:`pore_positions`), and the configuration values.

    Examples
    --------
    >>> from orix.quaternion.symmetry import Oh
    >>> q = np.tile([1.0, 0, 0, 0], (6, 1))
    >>> gm = reconstruct_grains(q, np.ones(6, bool), (2, 3), Oh)
    >>> gm.labels.tolist(), gm.summary["n_grains"]
    ([[0, 0, 0], [0, 0, 0]], 1)
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ny, nx = (int(s) for s in map_shape)
    n = ny * nx
    q = np.asarray(quaternions, dtype=np.float64)
    ok = np.asarray(indexed, dtype=bool).ravel()
    if q.shape != (n, 4):
        raise ValueError(f"Expected quaternions of shape ({n}, 4) for map_shape {map_shape}, got {q.shape}")
    if ok.shape != (n,):
        raise ValueError(f"Expected indexed of shape ({n},) for map_shape {map_shape}, got {ok.shape}")
    if not ok.any():
        raise ValueError("Expected at least one indexed pixel, got none")

    faces = neighbour_pairs((ny, nx), config.grid)
    pairs = faces[ok[faces[:, 0]] & ok[faces[:, 1]]]
    angle = disorientation_angles(q[pairs[:, 0]], q[pairs[:, 1]], point_group)
    joined = pairs[angle < config.high_angle]
    graph = coo_matrix((np.ones(len(joined), dtype=np.int8), (joined[:, 0], joined[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)

    pix = np.flatnonzero(ok)
    uniq, first, inverse = np.unique(comp[pix], return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    lab = np.full(n, -1, dtype=np.int64)
    lab[pix] = rank[inverse]

    table = _grain_table(q, lab, pix, pairs, (ny, nx), point_group, config)
    kam = kernel_average_misorientation(lab.reshape(ny, nx), pairs, angle, config.kam_threshold)
    summary = (_summary(table, lab, pairs, angle, config) | astm_e2627(table, config)
               | _pore_positions(lab.reshape(ny, nx), faces))
    summary["mean_kam_deg"] = float(np.nanmean(kam)) if np.isfinite(kam).any() else float("nan")
    return GrainMap(lab.reshape(ny, nx), pairs, angle, table, summary, config, kam)


def _grain_table(q: np.ndarray, lab: np.ndarray, pix: np.ndarray, pairs: np.ndarray,
                 map_shape: tuple[int, int], point_group: Symmetry, config: GrainConfig) -> dict[str, np.ndarray]:
    """Per-grain columns of :data:`COLUMNS` (see :func:`reconstruct_grains`)."""
    from orix.quaternion import Orientation

    ny, nx = map_shape
    g = lab[pix]
    n_grains = int(g.max()) + 1 if len(g) else 0
    # Pixels sorted by grain, stably: the first of each run is the grain's first pixel.
    order = np.argsort(g, kind="stable")
    pixels = np.bincount(g, minlength=n_grains)
    starts = np.concatenate([[0], np.cumsum(pixels)[:-1]]).astype(np.int64)
    sorted_pix = pix[order]
    first = sorted_pix[starts]

    px, py = _pitch(config.grid, config.step_size)
    cell = px * py
    area = pixels * cell

    # Mean orientation: align to the first pixel, average, normalise.
    ops = point_group.laue.proper_subgroup.data
    aligned = align_to(q[pix], q[first][g], ops)
    mean = np.stack([np.bincount(g, aligned[:, k], minlength=n_grains) for k in range(4)], axis=1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    mean_ori = Orientation(mean, symmetry=point_group.laue).reduce()
    mean = mean_ori.data
    euler = np.degrees(mean_ori.to_euler())
    spread = disorientation_angles(q[pix], mean[g], point_group)
    gos = np.bincount(g, spread, minlength=n_grains) / pixels

    # Shape: coordinates relative to the first pixel, along (u) and across (v) the interface.
    x, y = pixel_coordinates(map_shape, config.grid, config.step_size)
    u, v, pu, pv = (x, y, px, py) if config.interface_direction == "x" else (y, x, py, px)
    du = (u[sorted_pix] - u[first].repeat(pixels))
    dv = (v[sorted_pix] - v[first].repeat(pixels))
    width = np.maximum.reduceat(du, starts) - np.minimum.reduceat(du, starts) + pu
    height = np.maximum.reduceat(dv, starts) - np.minimum.reduceat(dv, starts) + pv
    su, sv = np.add.reduceat(du, starts) / pixels, np.add.reduceat(dv, starts) / pixels
    cuu = np.add.reduceat(du * du, starts) / pixels - su**2 + pu**2 / 12.0
    cvv = np.add.reduceat(dv * dv, starts) / pixels - sv**2 + pv**2 / 12.0
    cuv = np.add.reduceat(du * dv, starts) / pixels - su * sv
    half_tr, root = 0.5 * (cuu + cvv), np.sqrt((0.5 * (cuu - cvv)) ** 2 + cuv**2)
    lam_max, lam_min = half_tr + root, np.maximum(half_tr - root, 0.0)
    aspect = np.sqrt(lam_max / np.maximum(lam_min, np.finfo(float).tiny))
    axis = np.degrees(0.5 * np.arctan2(2.0 * cuv, cuu - cvv))
    axis = np.where(axis <= -90.0, axis + 180.0, axis)
    cu, cv = u[first] + su, v[first] + sv
    cx, cy = (cu, cv) if config.interface_direction == "x" else (cv, cu)

    row, col = np.divmod(pix, nx)
    edge = (row == 0) | (row == ny - 1) | (col == 0) | (col == nx - 1)
    lo, hi = ((row == 0), (row == ny - 1)) if config.interface_direction == "x" else ((col == 0), (col == nx - 1))
    touches_edge = np.bincount(g, edge, minlength=n_grains) > 0
    spans = (np.bincount(g, lo, minlength=n_grains) > 0) & (np.bincount(g, hi, minlength=n_grains) > 0)

    la, lb = lab[pairs[:, 0]], lab[pairs[:, 1]]
    cross = la != lb
    keys = np.unique(np.minimum(la[cross], lb[cross]) * n_grains + np.maximum(la[cross], lb[cross]))
    neighbours = np.bincount(keys // n_grains, minlength=n_grains) + np.bincount(keys % n_grains, minlength=n_grains)

    return {"grain_id": np.arange(n_grains), "pixels": pixels, "area_um2": area,
            "ecd_um": 2.0 * np.sqrt(area / np.pi), "centroid_x_um": cx, "centroid_y_um": cy,
            "phi1_deg": euler[:, 0], "Phi_deg": euler[:, 1], "phi2_deg": euler[:, 2], "gos_deg": gos,
            "width_um": width, "height_um": height, "aspect_ratio": aspect, "long_axis_deg": axis,
            "touches_edge": touches_edge, "spans_film": spans, "neighbours": neighbours,
            "small": pixels < config.min_size}


def _summary(table: dict[str, np.ndarray], lab: np.ndarray, pairs: np.ndarray, angle: np.ndarray,
             config: GrainConfig) -> dict[str, Any]:
    """Map-level statistics (see :func:`reconstruct_grains`)."""
    keep = ~table["small"]
    area, ecd, width = table["area_um2"][keep], table["ecd_um"][keep], table["width_um"][keep]
    px, py = _pitch(config.grid, config.step_size)
    face = config.step_size if config.grid == "square" else config.step_size / np.sqrt(3.0)
    n_indexed = int(np.count_nonzero(lab >= 0))
    indexed_area = n_indexed * px * py
    hagb = lab[pairs[:, 0]] != lab[pairs[:, 1]]
    lagb = ~hagb & (angle >= config.low_angle)
    n_hagb, n_lagb = int(hagb.sum()), int(lagb.sum())
    per_area = face / indexed_area if indexed_area else float("nan")
    some = len(area) > 0
    return {
        "n_grains": int(keep.sum()),
        "n_small_grains": int((~keep).sum()),
        "indexing_rate": n_indexed / lab.size,
        "mean_ecd_um": float(ecd.mean()) if some else float("nan"),
        "area_weighted_ecd_um": float((area * ecd).sum() / area.sum()) if some else float("nan"),
        "mean_width_um": float(width.mean()) if some else float("nan"),
        "area_weighted_width_um": float((area * width).sum() / area.sum()) if some else float("nan"),
        "hagb_length_per_area_per_um": n_hagb * per_area,
        "lagb_length_per_area_per_um": n_lagb * per_area,
        "n_hagb_pairs": n_hagb,
        "n_lagb_pairs": n_lagb,
        "high_angle_deg": config.high_angle,
        "low_angle_deg": config.low_angle,
        "min_size_px": config.min_size,
        "step_size_um": config.step_size,
        "grid": config.grid,
        "interface_direction": config.interface_direction,
    }


def write_grain_table(grain_map: GrainMap, path: str | Path) -> None:
    """Write the grain table as CSV: a header of :data:`COLUMNS` (units in the names), one row per grain.

    Booleans are written ``0``/``1``; floats with 8 significant digits.
    """
    write_csv_table({c: grain_map.table[c] for c in COLUMNS}, path)


def write_csv_table(columns: dict[str, np.ndarray], path: str | Path) -> None:
    """Write equal-length columns as CSV: a header of their names, then one row per entry.

    Booleans and integers are written as integers (``0``/``1`` for flags);
    floats with 8 significant digits.
    """
    text = [np.asarray(c).astype(np.int64).astype(str) if np.asarray(c).dtype.kind in "biu"
            else np.char.mod("%.8g", np.asarray(c)) for c in columns.values()]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(list(columns))
            writer.writerows(zip(*(t.tolist() for t in text)))

    atomic_write(path, write)


def write_grain_table_parquet(grain_map: GrainMap, path: str | Path) -> None:
    """Write the grain table as Parquet (pyarrow): the columns of :data:`COLUMNS`, typed.

    Counts and ids are int64, flags bool, everything else float64, with the
    units in the column names as in the CSV.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: np.asarray(grain_map.table[c]) for c in COLUMNS})
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def boundary_overlay(grain_map: GrainMap, rgb: np.ndarray, *, scale: int = 4) -> np.ndarray:
    """Grain boundaries drawn over a map image: HAGB black, LAGB white.

    Parameters
    ----------
    grain_map
        Grains of the map.
    rgb : (ny, nx, 3) array in [0, 1]
        Map image, one image pixel per map pixel (e.g. :func:`dpm.maps.ipf_colors`).
    scale
        Image pixels per map pixel in the result (at least 2).

    Returns
    -------
    image : (ny · scale, nx · scale, 3) float64 array
        Each boundary pair is drawn as the side of the first pixel's block
        facing the second (right side for a neighbour in the same row, bottom
        side for one in the next row; on hexagonal grids both lower
        neighbours share the bottom side), one image pixel thick; LAGB first,
        HAGB over them.
    """
    ny, nx = grain_map.labels.shape
    if np.shape(rgb) != (ny, nx, 3):
        raise ValueError(f"Expected rgb of shape ({ny}, {nx}, 3), got {np.shape(rgb)}")
    if scale < 2:
        raise ValueError(f"Expected scale >= 2, got {scale}")
    img = np.repeat(np.repeat(np.asarray(rgb, dtype=np.float64), scale, axis=0), scale, axis=1)
    t = np.arange(scale)
    for mask, colour in ((grain_map.lagb, 1.0), (grain_map.hagb, 0.0)):
        p = grain_map.pairs[mask]
        r, c = np.divmod(p[:, 0], nx)
        same_row = (p[:, 1] // nx) == r
        rows = np.where(same_row[:, None], r[:, None] * scale + t, r[:, None] * scale + scale - 1)
        cols = np.where(same_row[:, None], c[:, None] * scale + scale - 1, c[:, None] * scale + t)
        img[rows, cols] = colour
    return img


def grains(xmap: Any, config: GrainConfig | None = None) -> GrainMap:
    """Grains of an orix ``CrystalMap`` (dpm's results, or any map read from .ang/.ctf/.h5).

    Parameters
    ----------
    xmap
        A single-phase orix ``CrystalMap`` on a full rectangular grid; pixels
        with phase id -1 (not indexed) are unindexed.
    config
        Thresholds, grid and interface direction; the map's step size is used
        when ``config`` is None or leaves ``step_size`` at its default.

    Returns
    -------
    GrainMap
        Its summary also counts the pixels that cleanup changed, for each of
        :data:`CLEANUP_FLAGS` the map carries as a property
        (``replaced_pixels``, ...).
    """
    ny, nx = (1, xmap.size) if len(xmap.shape) == 1 else xmap.shape
    if ny * nx != xmap.size or not xmap.is_in_data.all():
        raise ValueError(f"grain reconstruction needs a full rectangular map; this one has "
                         f"{xmap.size} points for shape {xmap.shape}")
    phase_ids = [i for i in xmap.phases.ids if i >= 0]
    if len(phase_ids) != 1:
        raise ValueError(f"grain reconstruction handles one phase; the map has "
                         f"{len(phase_ids)} ({xmap.phases.names})")
    step = float(xmap.dx) if getattr(xmap, "dx", 0) else 1.0
    config = config or GrainConfig(step_size=step)
    if config.step_size == GrainConfig.step_size and step != config.step_size:
        config = replace(config, step_size=step)
    q = np.asarray(xmap.rotations.data, dtype=np.float64).reshape(-1, 4)
    if q.shape[0] != ny * nx:  # several rotations per point: the best one
        q = q.reshape(ny * nx, -1, 4)[:, 0]
    indexed = np.asarray(xmap.phase_id) >= 0
    point_group = xmap.phases[phase_ids[0]].point_group
    grain_map = reconstruct_grains(q, indexed, (ny, nx), point_group, config=config)
    for flag in CLEANUP_FLAGS:
        if flag in xmap.prop:
            grain_map.summary[f"{flag}_pixels"] = int(np.count_nonzero(xmap.prop[flag]))
    s = grain_map.summary
    if s["astm_e2627_excluded_edge"] == s["n_grains"] + s["n_small_grains"]:
        log.warning("ASTM E2627 does not apply to this map: every grain touches the map edge")
    elif not s["astm_e2627_valid"]:
        log.warning("ASTM E2627 does not apply to this map: the mean interior grain has %.0f "
                    "pixels (at least %d needed)", s["astm_e2627_mean_pixels_before_cut"],
                    config.astm_min_mean_pixels)
    return grain_map


def write_grain_outputs(grain_map: GrainMap, xmap: Any, out: str | Path,
                        boundary_config: Any = None) -> list[Path]:
    """Write the grain layer's files into ``out``.

    ``grains.csv`` and ``grains.parquet`` (the grain table), ``grains.json``
    (the map summary, with the HAGB trace statistics of
    :func:`dpm.boundaries.boundary_traces` under ``hagb_trace_...`` keys),
    ``boundaries.csv`` (one row per smoothed HAGB chain: grains, length,
    trace angle, angle to the interface, perpendicular flag),
    ``boundaries.png`` (HAGB black, LAGB white over the IPF-z map),
    ``trace_rose.png`` (length-weighted HAGB trace angles),
    ``kam.png`` (kernel average misorientation, 0 to the KAM threshold,
    unindexed black) and ``grain_widths.png`` (histogram of the widths along the
    interface of the grains not flagged ``small``). The IPF maps come with
    the map itself (:func:`dpm.maps.write_ipf_maps`).

    Parameters
    ----------
    grain_map
        From :func:`grains` or :func:`reconstruct_grains`.
    xmap
        The orix ``CrystalMap`` the grains were reconstructed from.
    out
        Existing output folder.
    boundary_config
        :class:`dpm.boundaries.BoundaryConfig` of the traces (HAGB); None =
        the defaults.

    Returns
    -------
    paths
        The files written.
    """
    import json

    from dpm.boundaries import BoundaryConfig, boundary_traces, save_trace_rose, write_trace_table
    from dpm.maps import ipf_colors, save_histogram, save_rgb, save_scalar

    out = Path(out)
    paths = [out / "grains.csv", out / "grains.parquet", out / "grains.json",
             out / "boundaries.csv", out / "boundaries.png", out / "trace_rose.png",
             out / "kam.png", out / "grain_widths.png"]
    traces = boundary_traces(grain_map, config=replace(boundary_config or BoundaryConfig(),
                                                       kind="hagb"))
    write_grain_table(grain_map, paths[0])
    write_grain_table_parquet(grain_map, paths[1])
    summary = grain_map.summary | {f"hagb_trace_{k}": v for k, v in traces.summary().items()
                                   if k not in ("boundary_kind", "interface_direction")}
    atomic_write(paths[2], lambda tmp: tmp.write_text(json.dumps(_jsonable(summary), indent=2)
                                                      + "\n"))
    write_trace_table(traces, paths[3])
    save_rgb(paths[4], boundary_overlay(grain_map, ipf_colors(xmap, "z")), scale=1)
    save_trace_rose(paths[5], traces)
    save_scalar(paths[6], grain_map.kam, cmap="viridis", vmin=0.0,
                vmax=grain_map.config.kam_threshold)
    keep = ~grain_map.table["small"]
    save_histogram(paths[7], grain_map.table["width_um"][keep],
                   xlabel=f"width along the interface ({grain_map.config.interface_direction}), µm")
    return paths


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    """Plain Python values for json; NaN (undefined, e.g. no interior grain) as null."""
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in summary.items()}
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in plain.items()}


class _GrainsModule(types.ModuleType):
    """This module, callable as :func:`grains`: DESIGN.md's ``dpm.grains(xmap)`` works
    whether ``dpm.grains`` resolves to the function or, once imported, to this module."""

    def __call__(self, xmap: Any, config: GrainConfig | None = None) -> GrainMap:
        return grains(xmap, config)


sys.modules[__name__].__class__ = _GrainsModule
