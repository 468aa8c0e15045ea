"""Grain-boundary traces on square and hexagonal maps and their angle to the interface.

Columnar Li and Na films are asked one question above all: do the grain
boundaries stand perpendicular to the current-collector interface? This
module answers it from a :class:`dpm.grains.GrainMap`.

Segments
--------
Every boundary pair of neighbouring pixels (HAGB, or LAGB on request) stands
for one edge of the pixels' Voronoi cells: the perpendicular bisector of the
two pixel centres, ``step`` long on square grids and ``step/√3`` on the
hexagonal ``.ang`` HexGrid (pixel centres as in :mod:`dpm.grains`; the cells
are hexagons with vertical left and right edges). Cell vertices lie on an
integer lattice (``step/4`` along x; ``step/4`` or ``step/(4√3)`` along y),
so vertices shared by several segments are identified exactly. Grains never
border pores or the map edge with a boundary: no pixel pair exists there,
and a boundary simply ends.

Chains
------
Segments are grouped by their unordered grain pair ``(a, b)``, ``a <= b``
(``a == b`` for LAGB). A *chain* is a maximal run of segments of one group
joined end to end at vertices where exactly two segments of the traced kind
meet, both of that group. It therefore ends at a *junction* (three or more
segments meet: triple and quadruple points), at a vertex where the boundary
turns into one with another grain pair (beside a pore or the map edge), or
at a free end (the boundary meets a pore or the map edge). A chain whose
every vertex is interior is *closed* (a grain enclosed by one other grain,
or an LAGB loop).

Smoothing
---------
Pixel boundaries are staircases: raw segments run only at 0° and 90°
(square grid) or 30°, 90° and 150° (hexagonal). Interior chain vertices are
smoothed as MTEX ``grains.smooth(iter)`` does with its default ``rate``
kernel: each iteration (all vertices at once) takes the mean ``m`` of a
vertex's closed neighbourhood, the vertex counted with its degree (2), i.e.
``m = (2 v + v₁ + v₂) / 4``, and moves the vertex to ``v - λ (v - m)``
(``λ = BoundaryConfig.rate``, 0.5 as in MTEX). Chain end vertices (junctions
and free ends) stay fixed, as MTEX keeps triple points and the outer
boundary.

Trace angle
-----------
The trace of a chain is the total-least-squares line of its smoothed
polyline, taken as a curve of uniform density: the major axis of the
length-weighted second moments of its points (each segment integrated
exactly). For a straight boundary drawn on the grid, the staircase swings
to both sides of the true line evenly, so the orthogonal-regression line
keeps the true direction whatever the smoothing left of the staircase. A
length-weighted mean of the segment directions does not: the raw segments of
any staircase point only along the grid axes, so their mean (doubled-angle)
direction is 0° or 90° (square) until the smoothing has removed the
staircase completely, which it never does for boundaries close to a grid
axis (their jogs are far apart, and Laplacian smoothing damps slow
undulations slowly). The trace of a closed or curved chain is its major
axis, the direction of its best-fitting line.

Angles are in degrees, measured from the interface direction (+x for
interface ``"x"``, +y for ``"y"``) towards the other in-plane map axis (+y,
down the image, for ``"x"``; +x for ``"y"``), as ``long_axis_deg`` of
:func:`dpm.grains.reconstruct_grains`: the trace angle lies in [0, 180), 90
is perpendicular to the interface, and the angle to the interface
``min(θ, 180 - θ)`` lies in [0, 90].

Accuracy
--------
A straight boundary L steps long drawn on the grid reads within 0.5° of its
true angle for L >= 60 when it lies at least 1.5° from a grid axis (tests:
worst 0.37° square, 0.09° hexagonal). Nearer a grid axis the grid itself
limits it: a line that drifts by less than a pixel across its length is
drawn as a straight pixel edge or with a single jog, and since the staircase
stays within half a step of the line the fitted slope can be off by up to
about ``1.5 / L`` radians (1.4° at 60 px, 0.4° at 200 px); the pixels
themselves leave any estimator an ambiguity of order ``1 / L`` there.

Lengths are those of the smoothed polylines, in µm. Short chains keep grid
directions after any smoothing (MTEX's *Grain Smoothing* notes the same
0°/90° spikes in length-weighted histograms), so map-level statistics are
weighted by length, where long boundaries dominate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dpm.grains import GrainMap
from dpm.io.writers import atomic_write

Kind = Literal["hagb", "lagb"]


@dataclass(frozen=True)
class BoundaryConfig:
    """How boundary traces are smoothed and summarised.

    Attributes
    ----------
    kind
        ``"hagb"`` (boundaries between grains) or ``"lagb"`` (low-angle
        boundaries inside grains, :attr:`dpm.grains.GrainMap.lagb`).
    iterations
        Laplacian smoothing iterations (MTEX ``grains.smooth(iter)``; 0 = raw
        staircase).
    rate
        MTEX's smoothing rate λ in (0, 1] (see the module notes).
    bin_width
        Width of the trace-angle histogram bins in degrees; 180 must be a
        whole number of bins.
    perpendicular_tolerance
        Degrees: a chain whose trace angle lies within this much of 90 is
        perpendicular to the interface.
    """

    kind: Kind = "hagb"
    iterations: int = 10
    rate: float = 0.5
    bin_width: float = 5.0
    perpendicular_tolerance: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("hagb", "lagb"):
            raise ValueError(f"Expected kind 'hagb' or 'lagb', got {self.kind!r}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"Expected a whole number of iterations >= 0, got {self.iterations}")
        if not 0 < self.rate <= 1:
            raise ValueError(f"Expected rate in (0, 1], got {self.rate}")
        bins = 180.0 / self.bin_width if self.bin_width > 0 else 0.0
        if not (self.bin_width > 0 and abs(bins - round(bins)) < 1e-9 and round(bins) >= 1):
            raise ValueError("Expected bin_width in degrees dividing 180 into whole bins, "
                             f"got {self.bin_width}")
        if not 0 <= self.perpendicular_tolerance <= 90:
            raise ValueError("Expected perpendicular_tolerance in [0, 90] degrees, got "
                             f"{self.perpendicular_tolerance}")


@dataclass(frozen=True, eq=False)
class BoundarySegments:
    """Boundary segments of a map: the cell edges between boundary pixel pairs.

    Attributes
    ----------
    pair_index : (s,) int64 array
        Row of ``GrainMap.pairs`` of each segment.
    grain_a, grain_b : (s,) int64 arrays
        Grain ids on either side, ``grain_a <= grain_b`` (equal for LAGB).
    vertices : (s, 2) int64 array
        Indices into ``points`` of the segment's two ends.
    points : (v, 2) float64 array
        Cell vertex coordinates ``(x, y)`` in µm, in the pixel-centre frame
        of :mod:`dpm.grains` (y down the map image).
    """

    pair_index: np.ndarray
    grain_a: np.ndarray
    grain_b: np.ndarray
    vertices: np.ndarray
    points: np.ndarray

    @property
    def coordinates(self) -> np.ndarray:
        """(s, 2, 2) float64: ``[segment, end, (x, y)]`` in µm."""
        return self.points[self.vertices]


@dataclass(frozen=True, eq=False)
class BoundaryTraces:
    """Smoothed boundary chains of a map and their traces.

    Attributes
    ----------
    grain_a, grain_b : (c,) int64 arrays
        Grain pair of each chain, ``grain_a <= grain_b``.
    length_um : (c,) float64 array
        Length of the smoothed polyline in µm.
    trace_angle_deg : (c,) float64 array
        Trace direction in degrees in [0, 180), from the interface direction
        towards the other map axis (see the module notes); 90 =
        perpendicular to the interface.
    angle_to_interface_deg : (c,) float64 array
        ``min(θ, 180 - θ)`` in degrees in [0, 90].
    n_segments : (c,) int64 array
        Pixel-face segments in the chain.
    closed : (c,) bool array
        The chain is a loop without end vertices.
    perpendicular : (c,) bool array
        ``|trace_angle_deg - 90| <= perpendicular_tolerance``.
    pair_grain_a, pair_grain_b : (b,) int64 arrays
        Grain pair of each whole boundary: all chains between two grains
        (one boundary that pores or the other kind of boundary interrupt).
    pair_length_um : (b,) float64 array
        Smoothed length of each whole boundary in µm.
    pair_trace_angle_deg : (b,) float64 array
        Trace angle of each whole boundary: the major axis of all its
        chains' smoothed segments together (as for a chain).
    pair_n_chains : (b,) int64 array
        Chains of each whole boundary.
    pair_perpendicular : (b,) bool array
        ``|pair_trace_angle_deg - 90| <= perpendicular_tolerance``.
    segments : (s, 2, 2) float64 array
        Smoothed segments ``[segment, end, (x, y)]`` in µm, chain by chain.
    segment_chain : (s,) int64 array
        Chain of each row of ``segments``.
    histogram_um : (b,) float64 array
        Length-weighted trace-angle histogram: µm of boundary per bin.
    bin_edges_deg : (b + 1,) float64 array
        Bin edges in degrees, 0 to 180.
    total_length_um : float
        Sum of ``length_um``.
    perpendicular_fraction : float
        Length fraction of the whole boundaries that are perpendicular
        (``pair_perpendicular``; NaN without boundaries): a short piece of a
        boundary between two pores takes the direction of the whole boundary,
        which its few pixel faces cannot give.
    interface_direction
        ``"x"`` or ``"y"``, from the grain map's configuration.
    config : BoundaryConfig
        The configuration used.
    """

    grain_a: np.ndarray
    grain_b: np.ndarray
    length_um: np.ndarray
    trace_angle_deg: np.ndarray
    angle_to_interface_deg: np.ndarray
    n_segments: np.ndarray
    closed: np.ndarray
    perpendicular: np.ndarray
    pair_grain_a: np.ndarray
    pair_grain_b: np.ndarray
    pair_length_um: np.ndarray
    pair_trace_angle_deg: np.ndarray
    pair_n_chains: np.ndarray
    pair_perpendicular: np.ndarray
    segments: np.ndarray
    segment_chain: np.ndarray
    histogram_um: np.ndarray
    bin_edges_deg: np.ndarray
    total_length_um: float
    perpendicular_fraction: float
    interface_direction: str
    config: BoundaryConfig

    def summary(self) -> dict[str, Any]:
        """Map-level numbers as plain Python values (for JSON).

        ``boundary_kind``, ``n_chains``, ``n_boundaries`` (grain pairs), ``total_length_um``,
        ``perpendicular_fraction``, ``perpendicular_tolerance_deg``,
        ``mean_angle_to_interface_deg`` (length-weighted; NaN without
        boundaries), ``smoothing_iterations``, ``bin_width_deg`` and
        ``interface_direction``.
        """
        total = self.total_length_um
        mean = float(np.sum(self.length_um * self.angle_to_interface_deg) / total) if total > 0 else float("nan")
        return {
            "boundary_kind": self.config.kind,
            "n_chains": int(len(self.length_um)),
            "n_boundaries": int(len(self.pair_length_um)),
            "total_length_um": float(total),
            "perpendicular_fraction": float(self.perpendicular_fraction),
            "perpendicular_tolerance_deg": float(self.config.perpendicular_tolerance),
            "mean_angle_to_interface_deg": mean,
            "smoothing_iterations": int(self.config.iterations),
            "bin_width_deg": float(self.config.bin_width),
            "interface_direction": self.interface_direction,
        }


def boundary_segments(grain_map: GrainMap, *, kind: Kind = "hagb") -> BoundarySegments:
    """Cell edges between the boundary pixel pairs of a grain map.

    Parameters
    ----------
    grain_map
        From :func:`dpm.grains.reconstruct_grains`; its configuration gives
        the grid and the step size (µm).
    kind
        ``"hagb"`` or ``"lagb"`` pairs.

    Returns
    -------
    BoundarySegments
        One segment per boundary pair, in the order of ``grain_map.pairs``:
        the perpendicular bisector of the two pixel centres, ``step`` long
        (square) or ``step/√3`` (hexagonal), exactly.

    Examples
    --------
    >>> from orix.quaternion.symmetry import Oh
    >>> from dpm.grains import reconstruct_grains
    >>> q = np.array([[1.0, 0, 0, 0], [np.cos(np.pi / 8), 0, 0, np.sin(np.pi / 8)]])
    >>> q = q[[0, 0, 1, 0, 0, 1]]   # 2 x 3 map: two columns of grain 0, one of grain 1
    >>> seg = boundary_segments(reconstruct_grains(q, np.ones(6, bool), (2, 3), Oh))
    >>> seg.coordinates.tolist()
    [[[1.5, -0.5], [1.5, 0.5]], [[1.5, 0.5], [1.5, 1.5]]]
    """
    if kind not in ("hagb", "lagb"):
        raise ValueError(f"Expected kind 'hagb' or 'lagb', got {kind!r}")
    cfg = grain_map.config
    nx = grain_map.labels.shape[1]
    index = np.flatnonzero(grain_map.hagb if kind == "hagb" else grain_map.lagb)
    pairs = grain_map.pairs[index]
    lab = grain_map.labels.ravel()
    la, lb = lab[pairs[:, 0]], lab[pairs[:, 1]]

    # Pixel centres on the integer lattice (X in step/2; Y in step/2 on square
    # grids, in step/(2√3) on hexagonal ones), then the two cell vertices of
    # each pair in doubled lattice units: (P_i + P_j) ± (-dY/k, dX), k = 1
    # (square) or 3 (hexagonal), the perpendicular bisector of P_i P_j.
    hexagonal = cfg.grid == "hexagonal"
    row, col = np.divmod(pairs, nx)
    cx = 2 * col + (row % 2 if hexagonal else 0)
    cy = (3 if hexagonal else 2) * row
    sx, sy = cx[:, 0] + cx[:, 1], cy[:, 0] + cy[:, 1]
    dx, dy = cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0]
    hx = -dy // 3 if hexagonal else -dy
    ends_x = np.stack([sx - hx, sx + hx], axis=1)
    ends_y = np.stack([sy - dx, sy + dx], axis=1)
    width = 4 * nx + 8
    keys = (ends_y + 4) * width + (ends_x + 4)
    uniq, inverse = np.unique(keys.ravel(), return_inverse=True)
    ux = cfg.step_size / 4.0
    uy = ux / np.sqrt(3.0) if hexagonal else ux
    points = np.stack([(uniq % width - 4) * ux, (uniq // width - 4) * uy], axis=1)
    return BoundarySegments(index, np.minimum(la, lb), np.maximum(la, lb),
                            inverse.reshape(-1, 2).astype(np.int64), points)


def boundary_traces(grain_map: GrainMap, *, config: BoundaryConfig = BoundaryConfig()) -> BoundaryTraces:
    """Boundary chains of a grain map, smoothed, with their trace angles to the interface.

    Parameters
    ----------
    grain_map
        From :func:`dpm.grains.reconstruct_grains`; its configuration gives
        the grid, the step size (µm) and the interface direction.
    config
        Boundary kind, smoothing, histogram bins and perpendicular tolerance.

    Returns
    -------
    BoundaryTraces
        Chains ordered by grain pair, then by their first pixel pair (see the
        module notes for chains, smoothing and the angle convention).

    Examples
    --------
    >>> from orix.quaternion.symmetry import Oh
    >>> from dpm.grains import reconstruct_grains
    >>> q = np.array([[1.0, 0, 0, 0], [np.cos(np.pi / 8), 0, 0, np.sin(np.pi / 8)]])
    >>> q = q[np.tile([0, 0, 1, 1], 8)]   # 8 x 4 map: grain 0 left, grain 1 right
    >>> tr = boundary_traces(reconstruct_grains(q, np.ones(32, bool), (8, 4), Oh))
    >>> tr.trace_angle_deg.tolist(), tr.length_um.tolist(), bool(tr.perpendicular[0])
    ([90.0], [8.0], True)
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    seg = boundary_segments(grain_map, kind=config.kind)
    n_grains = int(grain_map.labels.max()) + 1
    group = seg.grain_a * n_grains + seg.grain_b
    order = np.argsort(group, kind="stable")
    group, ends = group[order], seg.vertices[order]
    s, v = len(ends), len(seg.points)

    # Vertices where exactly two traced segments meet, both of one grain pair,
    # link those two segments; the rest are chain ends.
    flat = ends.ravel()
    by_vertex = np.argsort(flat, kind="stable")
    vsorted = flat[by_vertex]
    degree = np.bincount(flat, minlength=v)
    k = np.flatnonzero((vsorted[:-1] == vsorted[1:]) & (degree[vsorted[:-1]] == 2))
    s1, s2 = by_vertex[k] // 2, by_vertex[k + 1] // 2
    linked = group[s1] == group[s2]
    s1, s2, hinge = s1[linked], s2[linked], vsorted[k[linked]]
    graph = coo_matrix((np.ones(len(s1), np.int8), (s1, s2)), shape=(s, s))
    _, comp = connected_components(graph, directed=False)
    uniq, first, inverse = np.unique(comp, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    chain = rank[inverse].reshape(-1)
    n_chains = len(uniq)
    heads = np.sort(first)  # first segment of each chain

    points = _smooth(seg.points, ends, s1, s2, hinge, config.iterations, config.rate)

    axes = [0, 1] if grain_map.config.interface_direction == "x" else [1, 0]
    uv = points[:, axes]
    total, theta = _major_axes(uv, ends, chain, n_chains)
    perpendicular = np.abs(theta - 90.0) <= config.perpendicular_tolerance
    # Whole boundaries: all chains of one grain pair (a boundary that pores split).
    pair_keys, pair_of_chain = np.unique(group[heads], return_inverse=True)
    pair_length, pair_theta = _major_axes(uv, ends, pair_of_chain[chain], len(pair_keys))
    pair_perpendicular = np.abs(pair_theta - 90.0) <= config.perpendicular_tolerance
    n_segments = np.bincount(chain, minlength=n_chains)
    closed = np.bincount(chain[s1], minlength=n_chains) == n_segments
    edges = np.linspace(0.0, 180.0, int(round(180.0 / config.bin_width)) + 1)
    hist, _ = np.histogram(theta, bins=edges, weights=total)
    length = float(total.sum())
    fraction = (float(pair_length[pair_perpendicular].sum() / length) if length > 0
                else float("nan"))
    by_chain = np.argsort(chain, kind="stable")
    return BoundaryTraces(
        grain_a=seg.grain_a[order][heads], grain_b=seg.grain_b[order][heads],
        length_um=total, trace_angle_deg=theta, angle_to_interface_deg=np.minimum(theta, 180 - theta),
        n_segments=n_segments, closed=closed, perpendicular=perpendicular,
        pair_grain_a=pair_keys // n_grains, pair_grain_b=pair_keys % n_grains,
        pair_length_um=pair_length, pair_trace_angle_deg=pair_theta,
        pair_n_chains=np.bincount(pair_of_chain, minlength=len(pair_keys)),
        pair_perpendicular=pair_perpendicular,
        segments=points[ends[by_chain]], segment_chain=chain[by_chain],
        histogram_um=hist, bin_edges_deg=edges, total_length_um=length,
        perpendicular_fraction=fraction, interface_direction=grain_map.config.interface_direction,
        config=config)


def _major_axes(uv: np.ndarray, ends: np.ndarray, label: np.ndarray,
                n: int) -> tuple[np.ndarray, np.ndarray]:
    """Length and major-axis direction of the polylines formed by the segments of each label.

    The direction is the major axis of the length-weighted second moments of
    the segments (a curve of uniform density), in coordinates ``uv`` along
    and across the interface taken relative to each label's first vertex;
    each segment p -> q is integrated exactly: ``∫ u = ℓ (p + q)/2``,
    ``∫ u v = ℓ (2 pu pv + 2 qu qv + pu qv + qu pv)/6``.

    Returns ``length`` (n,) and ``theta`` (n,) in degrees in [0, 180).
    """
    first = np.full(n, len(label), dtype=np.int64)
    np.minimum.at(first, label, np.arange(len(label)))
    ref = uv[ends[first, 0]][label]
    pu, pv = (uv[ends[:, 0]] - ref).T
    qu, qv = (uv[ends[:, 1]] - ref).T
    ell = np.hypot(qu - pu, qv - pv)
    total = np.bincount(label, ell, minlength=n)

    def mean(w: np.ndarray) -> np.ndarray:
        return np.bincount(label, ell * w, minlength=n) / total

    mu, mv = mean(0.5 * (pu + qu)), mean(0.5 * (pv + qv))
    cuu = mean((pu * pu + qu * qu + pu * qu) / 3.0) - mu * mu
    cvv = mean((pv * pv + qv * qv + pv * qv) / 3.0) - mv * mv
    cuv = mean((2.0 * (pu * pv + qu * qv) + pu * qv + qu * pv) / 6.0) - mu * mv
    theta = np.mod(np.degrees(0.5 * np.arctan2(2.0 * cuv, cuu - cvv)), 180.0)
    return total, np.where(theta >= 180.0, 0.0, theta)  # mod of a tiny negative rounds to 180


def _smooth(points: np.ndarray, ends: np.ndarray, s1: np.ndarray, s2: np.ndarray,
            hinge: np.ndarray, iterations: int, rate: float) -> np.ndarray:
    """Vertex positions after MTEX-rate Laplacian smoothing of the chain interiors.

    ``hinge[k]`` is the interior vertex joining segments ``s1[k]`` and
    ``s2[k]`` (rows of ``ends``); all other vertices stay where they are.
    """
    from scipy.sparse import csr_matrix

    if iterations == 0 or len(hinge) == 0:
        return points.copy()
    v = len(points)
    # The far end of each of the two segments at each hinge.
    n1 = np.where(ends[s1, 0] == hinge, ends[s1, 1], ends[s1, 0])
    n2 = np.where(ends[s2, 0] == hinge, ends[s2, 1], ends[s2, 0])
    # One Jacobi step as a sparse matrix: v - λ (v - (2v + v1 + v2)/4) =
    # (1 - λ/2) v + (λ/4)(v1 + v2) at hinges, the identity elsewhere.
    fixed = np.ones(v, dtype=bool)
    fixed[hinge] = False
    rest = np.flatnonzero(fixed)
    rows = np.concatenate([rest, hinge, hinge, hinge])
    cols = np.concatenate([rest, hinge, n1, n2])
    vals = np.concatenate([np.ones(len(rest)), np.full(len(hinge), 1.0 - 0.5 * rate),
                           np.full(2 * len(hinge), 0.25 * rate)])
    step = csr_matrix((vals, (rows, cols)), shape=(v, v))
    for _ in range(iterations):
        points = step @ points
    return points


def save_trace_rose(path: str | Path, traces: BoundaryTraces) -> None:
    """Save the length-weighted trace-angle rose of a map as PNG.

    A half rose over 0–180°, drawn in the map's own frame (x to the right,
    y down, as the map image shows it): the bar at θ points along the trace
    direction θ, so a boundary perpendicular to the interface points across
    the film. Bars are µm of boundary per bin; the interface direction is
    drawn as a thick line and the perpendicular tolerance band is shaded.

    Parameters
    ----------
    path
        PNG file to write.
    traces
        From :func:`boundary_traces`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    edges = np.radians(traces.bin_edges_deg)
    fig, ax = plt.subplots(figsize=(5, 4), subplot_kw={"projection": "polar"}, layout="constrained")
    # Zero along the interface; angles grow towards the other map axis as
    # the image shows it (+y down for "x", +x to the right for "y").
    if traces.interface_direction == "x":
        ax.set_theta_zero_location("E")
        ax.set_theta_direction(-1)
    else:
        ax.set_theta_zero_location("S")
        ax.set_theta_direction(1)
    ax.set_thetamin(0)
    ax.set_thetamax(180)
    top = max(float(traces.histogram_um.max(initial=0.0)), 1e-12) * 1.08
    tol = np.radians(traces.config.perpendicular_tolerance)
    ax.bar(np.pi / 2, top, width=2 * tol, color="tab:green", alpha=0.15, linewidth=0,
           label=f"90° ± {traces.config.perpendicular_tolerance:g}°")
    ax.bar(edges[:-1], traces.histogram_um, width=np.diff(edges), align="edge",
           color="0.6", edgecolor="k", linewidth=0.5)
    ax.plot([0.0, np.pi], [top, top], color="tab:blue", linewidth=3,
            label=f"interface ({traces.interface_direction})")
    ax.set_ylim(0, top)
    ax.yaxis.set_major_locator(MaxNLocator(3))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"{traces.config.kind.upper()} traces, {traces.total_length_um:.4g} µm; "
                 f"{100 * traces.perpendicular_fraction:.3g} % perpendicular", fontsize=9)
    fig.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=8,
               title="bars: µm of boundary per bin", title_fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=150))
    plt.close(fig)


#: Columns of :func:`write_trace_table` (fields of :class:`BoundaryTraces`
#: without their ``pair_`` prefix), units in the names.
TRACE_COLUMNS = ("grain_a", "grain_b", "length_um", "trace_angle_deg", "n_chains",
                 "perpendicular")


def write_trace_table(traces: BoundaryTraces, path: str | Path) -> None:
    """Write one CSV row per whole boundary (grain pair): the columns of :data:`TRACE_COLUMNS`.

    Booleans are written ``0``/``1``; floats with 8 significant digits.
    """
    from dpm.grains import write_csv_table

    write_csv_table({c: getattr(traces, f"pair_{c}") for c in TRACE_COLUMNS}, path)
