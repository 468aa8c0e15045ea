"""Orientation sampling: the fundamental zone of SO(3) at a given spacing.

The dictionary of simulated patterns is projected at orientations that cover the
fundamental zone of the phase's proper point group uniformly: the cubochoric
grid of Singh & De Graef (MSMSE 24 (2016) 085013), the grid of orix's
:func:`orix.sampling.get_sample_fundamental` and so of kikuchipy (same points,
same order; see ``reference/DYNAMICAL.md`` §7 for the counts: 100,347
orientations for m-3m at 2°).

dpm builds the grid itself (:func:`cubochoric_grid`) because orix converts every
point of the full cube (2.4 million at 2°) and then discards 96 % of them for a
cubic phase, which takes 3–4 s. dpm converts only the points of the cube shell
that can reach the fundamental zone (rotation angles up to the zone's largest),
in parallel, and keeps each orientation's integer lattice position in the cube,
so that coarse sub-grids and neighbour lists (coarse-to-fine dictionary search,
:mod:`dpm.search`) are index arithmetic.

Cube → ball → rotation (Roşca, Morawiec & De Graef, MSMSE 22 (2014) 075013):
the cube of semi-edge ``a = π^(2/3) / 2`` maps, pyramid by pyramid, onto the
homochoric ball of radius ``(3π/4)^(1/3)``, each cube shell of max-norm ``c``
onto the sphere of equal volume (radius ``c (6/π)^(1/3)``); a homochoric vector
``h`` is the rotation of angle ``ω`` about ``h / |h|`` with
``|h|³ = 3/4 (ω − sin ω)``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numba as nb
import numpy as np
from orix.crystal_map import Phase
from orix.quaternion import Rotation
from orix.quaternion.symmetry import Symmetry

_log = logging.getLogger("dpm")

#: Semi-edge of the cubochoric cube, π^(2/3) / 2.
SEMI_EDGE = 0.5 * math.pi ** (2.0 / 3.0)


def _point_group(phase_or_point_group: Phase | Symmetry | str) -> Symmetry:
    """Point group of an orix Phase, a Symmetry, or a Hermann–Mauguin name."""
    if isinstance(phase_or_point_group, Phase):
        point_group = phase_or_point_group.point_group
        if point_group is None:
            raise ValueError(
                f"phase {phase_or_point_group.name!r} has no point group; give the "
                "phase a space group or point group"
            )
        return point_group
    if isinstance(phase_or_point_group, Symmetry):
        return phase_or_point_group
    if isinstance(phase_or_point_group, str):
        try:
            point_group = Phase(point_group=phase_or_point_group).point_group
        except Exception as error:  # orix raises ValueError/KeyError/IndexError by version
            raise ValueError(
                f"unknown point group name {phase_or_point_group!r}; expected a "
                "Hermann-Mauguin symbol such as 'm-3m' or '432'"
            ) from error
        if point_group is None:
            raise ValueError(f"unknown point group name {phase_or_point_group!r}")
        return point_group
    raise TypeError(
        "phase_or_point_group must be an orix Phase, an orix Symmetry or a point group "
        f"name such as 'm-3m', got {type(phase_or_point_group).__name__}"
    )


def semi_edge_steps(resolution: float) -> int:
    """Grid points N along the cube's semi-edge for a mean spacing of ``resolution`` degrees.

    Eq. (9) of Singh & De Graef (2016) as orix and EMsoft evaluate it:
    ``N = round(131.97049 / (resolution - 0.03732))``.
    """
    if not resolution > 0.03732:
        raise ValueError(f"resolution must be a positive angle in degrees, got {resolution}")
    return int(np.round(131.97049 / (resolution - 0.03732)))


#: Symmetry-equivalents of an orientation, nearest the identity first, searched for the
#: nearest grid point (a point near a vertex of the zone has several in or next to it).
_NEAREST_EQUIVALENTS = 6


@dataclass(frozen=True, eq=False)
class CubochoricGrid:
    """Orientations of the cubochoric grid inside a fundamental zone, with their lattice positions.

    Attributes
    ----------
    rotations : (m,) orix Rotation
        Sample → crystal rotations (orix convention), in the cube's lattice order
        (``i`` slowest, ``k`` fastest), exactly the points and order of
        ``orix.sampling.get_sample_fundamental(resolution, point_group=...)``.
    lattice : (m, 3) int32 array
        Integer position ``(i, j, k)`` of each rotation in the cube: its
        cubochoric coordinates are ``(i, j, k) * SEMI_EDGE / steps``, with
        ``i, j, k`` in ``[-steps + 1, steps]``.
    steps
        Grid points N along the cube's semi-edge (:func:`semi_edge_steps`).
    resolution
        The spacing asked for, in degrees.
    point_group
        Name of the proper point group whose fundamental zone was sampled.
    """

    rotations: Rotation
    lattice: np.ndarray
    steps: int
    resolution: float
    point_group: str

    def __len__(self) -> int:
        return int(self.lattice.shape[0])

    @property
    def keys(self) -> np.ndarray:
        """(m,) int64 linear lattice index of every rotation, ascending (lattice order)."""
        return _lattice_keys(self.lattice, self.steps)

    def coarse(self, factor: int) -> np.ndarray:
        """Rows of the sub-grid of every ``factor``-th lattice point along each axis.

        The sub-grid holds the identity and has ``factor`` times the spacing
        (about ``factor * resolution`` degrees).

        Returns
        -------
        rows : (m_coarse,) int64 array
            Indices into this grid, ascending.
        """
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(f"coarse factor must be a positive integer, got {factor!r}")
        on = np.all(self.lattice % int(factor) == 0, axis=1)
        return np.flatnonzero(on)

    def nearest(self, quaternions: np.ndarray) -> np.ndarray:
        """Row of the grid point nearest to each orientation, symmetry-equivalents included.

        Parameters
        ----------
        quaternions : (..., 4) array
            Unit quaternions (orix convention), anywhere in orientation space.

        Returns
        -------
        rows : (...,) int64 array
            The row whose rotation is closest (largest ``|q_row · s q|`` over the
            proper symmetry operators ``s`` acting on the left) to each input.
        """
        q = np.asarray(quaternions, dtype=np.float64)
        if q.shape[-1:] != (4,):
            raise ValueError(f"quaternions must have shape (..., 4), got {q.shape}")
        flat = q.reshape(-1, 4)
        ops = self._operators
        # The equivalents s q of each input (24 for m-3m); nearest of ±grid points by chord.
        a0, b0, c0, d0 = ops[:, None, 0], ops[:, None, 1], ops[:, None, 2], ops[:, None, 3]
        a1, b1, c1, d1 = flat[None, :, 0], flat[None, :, 1], flat[None, :, 2], flat[None, :, 3]
        equivalents = np.stack([a0 * a1 - b0 * b1 - c0 * c1 - d0 * d1,
                                a0 * b1 + b0 * a1 + c0 * d1 - d0 * c1,
                                a0 * c1 - b0 * d1 + c0 * a1 + d0 * b1,
                                a0 * d1 + b0 * c1 - c0 * b1 + d0 * a1], axis=-1)
        # The zone is the Voronoi cell of the identity: the equivalents with the largest
        # |a| lie in it or next to it, and only they can be near a grid point (querying
        # far points would visit most of the tree).
        near = np.argsort(-np.abs(equivalents[..., 0]), axis=0)[:_NEAREST_EQUIVALENTS]
        candidates = np.take_along_axis(equivalents, near[..., None], axis=0)
        distance, found = self._tree.query(candidates.reshape(-1, 4), workers=-1)
        distance = distance.reshape(len(near), -1)
        found = found.reshape(len(near), -1)
        best = np.argmin(distance, axis=0)
        rows = found[best, np.arange(flat.shape[0])] % len(self)
        return rows.reshape(q.shape[:-1])

    @functools.cached_property
    def _operators(self) -> np.ndarray:
        return np.asarray(_point_group(self.point_group).data, dtype=np.float64)

    @functools.cached_property
    def _tree(self):
        from scipy.spatial import cKDTree

        q = np.asarray(self.rotations.data, dtype=np.float64)
        return cKDTree(np.concatenate([q, -q]))

    def neighbours(self, rows: np.ndarray, radius: int) -> np.ndarray:
        """Grid rows within ``radius`` lattice steps (max-norm) of the given rows.

        Parameters
        ----------
        rows : (...,) int array
            Rows of this grid.
        radius
            Half-width of the lattice box searched, in lattice steps.

        Returns
        -------
        neighbours : (..., (2 radius + 1)^3) int64 array
            Rows of the grid points in each box (the row itself included), -1
            where the box position lies outside the fundamental zone or the cube.
            Boxes are not wrapped across the zone's faces: an orientation next
            to a face has its symmetry-equivalent neighbours elsewhere in the
            zone, which a search reaches from its own candidates there.
        """
        rows = np.asarray(rows, dtype=np.int64)
        r = int(radius)
        if r < 0:
            raise ValueError(f"radius must be >= 0 lattice steps, got {radius!r}")
        offsets = np.stack(np.meshgrid(*(np.arange(-r, r + 1),) * 3, indexing="ij"),
                           axis=-1).reshape(-1, 3)
        points = self.lattice[rows.ravel()][:, None, :].astype(np.int64) + offsets[None]
        inside = np.all((points > -self.steps) & (points <= self.steps), axis=-1)
        keys = _lattice_keys(points.reshape(-1, 3), self.steps).reshape(points.shape[:2])
        grid_keys = self.keys
        found = np.searchsorted(grid_keys, keys).clip(0, len(grid_keys) - 1)
        hit = inside & (grid_keys[found] == keys)
        out = np.where(hit, found, -1)
        return out.reshape(*rows.shape, offsets.shape[0])


def _lattice_keys(lattice: np.ndarray, steps: int) -> np.ndarray:
    """Linear index of lattice points ``(i, j, k)`` in ``[-steps + 1, steps]^3`` (k fastest)."""
    side = 2 * int(steps)
    shifted = np.asarray(lattice, dtype=np.int64) + (steps - 1)
    return (shifted[..., 0] * side + shifted[..., 1]) * side + shifted[..., 2]


@nb.njit(cache=True)
def _cube_to_quaternion(x: float, y: float, z: float) -> tuple:  # pragma: no cover
    """Unit quaternion (a, b, c, d), a >= 0, of the cubochoric point (x, y, z).

    Roşca et al. (2014): the point's pyramid is the one of its largest
    coordinate; in that pyramid's frame (largest coordinate last) the square
    face maps to the sphere by the equal-area square→disc map, scaled so that
    the cube shell of the point goes to the sphere of equal volume.
    """
    ax, ay, az = abs(x), abs(y), abs(z)
    if ax == 0.0 and ay == 0.0 and az == 0.0:
        return 1.0, 0.0, 0.0, 0.0
    # Pyramid pairs: z (top/bottom) as is; x (front/back) rolled (y, z, x);
    # y (left/right) rolled (z, x, y); rolled back at the end.
    if ax <= az and ay <= az:
        pyramid, u, v, w = 0, x, y, z
    elif az <= ax and ay <= ax:
        pyramid, u, v, w = 1, y, z, x
    else:
        pyramid, u, v, w = 2, z, x, y
    scale = (math.pi / 6.0) ** (1.0 / 6.0)
    u, v, w = u * scale, v * scale, w * scale
    if u == 0.0 and v == 0.0:
        h0, h1, h2 = 0.0, 0.0, math.sqrt(6.0 / math.pi) * w
    else:
        prefactor = (3.0 * math.pi / 4.0) ** (1.0 / 3.0) * 2.0 ** 0.25 / (
            math.pi ** (5.0 / 6.0) / 6.0 ** (1.0 / 6.0) / 2.0)
        sqrt2 = math.sqrt(2.0)
        if abs(v) <= abs(u):
            q = (math.pi / 12.0) * v / u
            cq, sq = math.cos(q), math.sin(q)
            q = prefactor * u / math.sqrt(sqrt2 - cq)
            t1 = (sqrt2 * cq - 1.0) * q
            t2 = sqrt2 * sq * q
        else:
            q = (math.pi / 12.0) * u / v
            cq, sq = math.cos(q), math.sin(q)
            q = prefactor * v / math.sqrt(sqrt2 - cq)
            t1 = sqrt2 * sq * q
            t2 = (sqrt2 * cq - 1.0) * q
        c = t1 * t1 + t2 * t2
        s = math.pi * c / (24.0 * w * w)
        c = math.sqrt(math.pi) * c / math.sqrt(24.0) / w
        q = math.sqrt(1.0 - s)
        h0, h1, h2 = t1 * q, t2 * q, math.sqrt(6.0 / math.pi) * w - c
    if pyramid == 0:
        hx, hy, hz = h0, h1, h2
    elif pyramid == 1:
        hx, hy, hz = h2, h0, h1
    else:
        hx, hy, hz = h1, h2, h0
    radius = math.sqrt(hx * hx + hy * hy + hz * hz)
    # Rotation angle from |h|^3 = 3/4 (w - sin w): Newton from the small-angle
    # solution w = 2|h|; f' = 1 - cos w > 0 and f is convex on (0, pi].
    target = 4.0 / 3.0 * radius ** 3
    omega = min(2.0 * radius, math.pi)
    for _ in range(50):
        f = omega - math.sin(omega) - target
        slope = 1.0 - math.cos(omega)
        if slope <= 0.0:
            break
        step = f / slope
        omega = min(max(omega - step, 0.0), math.pi)
        if abs(step) <= 1e-15 * max(omega, 1e-300):
            break
    half_sin = math.sin(0.5 * omega) / radius
    return math.cos(0.5 * omega), hx * half_sin, hy * half_sin, hz * half_sin


@nb.njit(parallel=True, cache=True)
def _lattice_quaternions(lattice: np.ndarray, step: float, out: np.ndarray) -> None:  # pragma: no cover
    """Quaternions of lattice points (n, 3) int32 at cube spacing ``step`` into out (n, 4)."""
    for n in nb.prange(lattice.shape[0]):
        a, b, c, d = _cube_to_quaternion(lattice[n, 0] * step, lattice[n, 1] * step,
                                         lattice[n, 2] * step)
        out[n, 0], out[n, 1], out[n, 2], out[n, 3] = a, b, c, d


def _largest_angle(point_group: Symmetry) -> float:
    """Largest rotation angle (radians) in the fundamental zone of a proper point group."""
    from orix.quaternion.orientation_region import OrientationRegion

    region = OrientationRegion.from_symmetry(point_group)
    try:
        vertices = region.vertices()
    except Exception:  # noqa: BLE001 - orix raises several types for unbounded zones
        return math.pi
    a = np.abs(np.asarray(vertices.data)[..., 0]).ravel()
    if a.size == 0 or not np.all(np.isfinite(a)):
        return math.pi
    # A zone bounded in Rodrigues space has its largest angle at a vertex.
    return float(2.0 * np.arccos(np.clip(a.min(), 0.0, 1.0)))


def cubochoric_grid(phase_or_point_group: Phase | Symmetry | str,
                    resolution: float = 2.0) -> CubochoricGrid:
    """The cubochoric grid of a phase's fundamental zone, with lattice positions.

    Parameters
    ----------
    phase_or_point_group
        An orix ``Phase``, an orix point group or a Hermann–Mauguin name;
        improper groups are reduced to their proper subgroup (``m-3m`` → ``432``).
    resolution
        Characteristic spacing of the grid in degrees (default 2°).

    Returns
    -------
    CubochoricGrid
        The orientations of orix's ``get_sample_fundamental(resolution,
        point_group=proper, method="cubochoric")``, same count and order
        (values equal to 1e-12: dpm evaluates the same formulas without fast
        math), and their lattice positions.
    """
    from orix.quaternion.orientation_region import OrientationRegion

    if not resolution > 0:
        raise ValueError(f"resolution must be a positive angle in degrees, got {resolution}")
    proper = _point_group(phase_or_point_group).proper_subgroup
    steps = semi_edge_steps(float(resolution))
    step = SEMI_EDGE / steps
    # Cube shell that can hold rotations up to the zone's largest angle: the
    # shell of max-norm c maps onto the sphere |h| = c (6/pi)^(1/3).
    omega = _largest_angle(proper)
    h_max = (0.75 * (omega - math.sin(omega))) ** (1.0 / 3.0)
    reach = min(steps, int(math.ceil(h_max / (6.0 / math.pi) ** (1.0 / 3.0) / step)) + 1)
    axis = np.arange(max(-reach, -steps + 1), reach + 1, dtype=np.int32)
    lattice = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    quaternions = np.empty((lattice.shape[0], 4))
    _lattice_quaternions(np.ascontiguousarray(lattice), step, quaternions)
    rotations = Rotation(quaternions)
    inside = rotations < OrientationRegion.from_symmetry(proper)
    rotations, lattice = rotations[inside], lattice[inside]
    if omega > math.pi - 1e-3:  # angle-pi rotations: q and -q may both be on the grid
        rotations, first = rotations.unique(return_index=True)
        lattice = lattice[first]
    _log.info("sampled %d orientations in the fundamental zone of %s at %g deg",
              rotations.size, proper.name, resolution)
    return CubochoricGrid(rotations=rotations, lattice=np.ascontiguousarray(lattice, np.int32),
                          steps=steps, resolution=float(resolution), point_group=proper.name)


def sample_orientations(
    phase_or_point_group: Phase | Symmetry | str, resolution: float = 2.0
) -> Rotation:
    """Sample the fundamental zone of a phase's proper point group.

    Parameters
    ----------
    phase_or_point_group
        An orix ``Phase`` (its ``point_group`` is used), an orix point group
        (``Symmetry``), or a Hermann–Mauguin point group name such as ``"m-3m"``.
        Improper groups are reduced to their proper subgroup (``m-3m`` → ``432``),
        as only rotations are sampled.
    resolution
        Characteristic spacing between neighbouring orientations, in degrees
        (default 2°). Must be positive.

    Returns
    -------
    rotations : (m,) orix Rotation
        Rotations (sample → crystal, orix convention) on the cubochoric grid
        that lie inside the fundamental zone, duplicates removed: the points and
        order of ``orix.sampling.get_sample_fundamental(resolution,
        point_group=pg.proper_subgroup, method="cubochoric")`` (see
        :func:`cubochoric_grid`, which also gives their lattice positions).

    Raises
    ------
    ValueError
        If ``resolution`` is not positive or the point group name is unknown.
    TypeError
        If ``phase_or_point_group`` is of another type.

    Examples
    --------
    >>> from dpm.sampling import sample_orientations
    >>> sample_orientations("m-3m", resolution=5).size
    6579
    """
    return cubochoric_grid(phase_or_point_group, resolution).rotations
