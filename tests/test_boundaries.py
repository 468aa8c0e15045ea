"""Boundary traces against analytic geometry.

Oracles: the Voronoi diagram of the pixel centres (:class:`scipy.spatial.Voronoi`)
for the segments; maps drawn from straight lines of known angle and the
lengths of those lines inside the map for the traces; MTEX's
``grains.smooth`` written out literally (dense vertex adjacency ``A = I Iᵀ``)
for the smoothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from orix.quaternion.symmetry import Oh
from scipy.spatial import Voronoi

from dpm.boundaries import (BoundaryConfig, BoundaryTraces, boundary_segments, boundary_traces,
                            save_trace_rose)
from dpm.grains import GrainConfig, neighbour_pairs, pixel_coordinates, reconstruct_grains
from dpm.synthetic import random_quaternions

GRIDS = ("square", "hexagonal")
#: Trace angles to the interface of the straight-boundary tests, degrees.
ANGLES = (90.0, 88.5, 91.7, 80.0, 60.0, 45.0, 30.0, 10.0, 135.0, 170.0)
#: Worst trace-angle error allowed on boundaries at least 60 px long and at
#: least 1.5° away from a grid axis (the worst measured over random line
#: offsets is 0.37° on square and 0.09° on hexagonal grids).
ANGLE_TOL = 0.5
#: Boundaries closer to a grid axis are limited by the grid itself: a line
#: drifting by less than a pixel across its length is drawn as a straight
#: pixel edge, or with one jog. The staircase stays within e = ½ step of the
#: line, so the fitted slope is off by at most cov(e, t) / var(t) ≤
#: (½ · L/4) / (L²/12) = 1.5 / L for a boundary L steps long: 1.4° at 60 px
#: (the worst measured is 0.92 of it on square grids, 0.5 on hexagonal ones).
NEAR_AXIS_ANGLES = (89.9, 89.6, 90.3, 0.2, 179.7)
#: Length error allowed, in steps: each chain end is the cell vertex on the
#: map edge nearest the line, up to about ¾ step from where the line leaves
#: the map (worst measured: 1.34 steps, a 45° line through a map corner).
LENGTH_TOL = 1.5


def _rotation_z(deg: float) -> np.ndarray:
    half = np.radians(deg) / 2
    return np.array([np.cos(half), 0.0, 0.0, np.sin(half)])


def _grain_map(truth: np.ndarray, grid: str = "square", *, step: float = 1.0, interface: str = "x",
               indexed: np.ndarray | None = None, seed: int = 0):
    """Grains of a map whose pixels carry one random orientation per ``truth`` label;
    checks that every pair between two labels, and only those, is a HAGB pair."""
    rng = np.random.default_rng(seed)
    q = random_quaternions(int(truth.max()) + 1, rng)[truth.ravel()]
    ok = np.ones(truth.size, bool) if indexed is None else indexed.ravel()
    gm = reconstruct_grains(q, ok, truth.shape, Oh,
                            config=GrainConfig(grid=grid, step_size=step, interface_direction=interface))
    t = truth.ravel()
    assert np.array_equal(gm.hagb, t[gm.pairs[:, 0]] != t[gm.pairs[:, 1]]), "labels merged"
    return gm


def _half_planes(shape: tuple[int, int], grid: str, alpha: float, centre: tuple[float, float],
                 step: float = 1.0) -> np.ndarray:
    """1 on the +normal side of the line through ``centre`` (µm) at ``alpha`` degrees from +x towards +y."""
    x, y = pixel_coordinates(shape, grid, step)
    a = np.radians(alpha)
    return (((x - centre[0]) * -np.sin(a) + (y - centre[1]) * np.cos(a)) > 0).astype(int).reshape(shape)


def _map_outline(shape: tuple[int, int], grid: str, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corners (µm) of the map's cell region (hexagonal: its mean, jagged edges)."""
    ny, nx = shape
    if grid == "square":
        return np.array([-0.5, -0.5]) * step, np.array([nx - 0.5, ny - 0.5]) * step
    r, h = step / np.sqrt(3.0), step * np.sqrt(3.0) / 2
    return np.array([-0.25 * step, -0.75 * r]), np.array([(nx - 0.25) * step, (ny - 1) * h + 0.75 * r])


def _length_inside(lo: np.ndarray, hi: np.ndarray, point: np.ndarray, alpha: float) -> float:
    """Length of the line through ``point`` at ``alpha`` degrees inside the box ``[lo, hi]``."""
    d = np.array([np.cos(np.radians(alpha)), np.sin(np.radians(alpha))])
    t0, t1 = -np.inf, np.inf
    for k in range(2):
        if abs(d[k]) > 1e-12:
            a, b = sorted(((lo[k] - point[k]) / d[k], (hi[k] - point[k]) / d[k]))
            t0, t1 = max(t0, a), min(t1, b)
    return t1 - t0


def _angle_error(measured: np.ndarray, truth: float | np.ndarray) -> np.ndarray:
    """Axial difference in degrees, in [-90, 90)."""
    return (np.asarray(measured) - truth + 90.0) % 180.0 - 90.0


class TestBoundarySegments:
    @pytest.mark.parametrize("grid", GRIDS)
    def test_segments_are_voronoi_edges(self, grid):
        ny, nx, step = 7, 9, 1.5
        truth = np.arange(ny * nx).reshape(ny, nx)  # every pixel its own grain
        rng = np.random.default_rng(1)
        q = random_quaternions(ny * nx, rng)
        gm = reconstruct_grains(q, np.ones(ny * nx, bool), (ny, nx), Oh,
                                config=GrainConfig(grid=grid, step_size=step, high_angle=1.0, low_angle=0.5))
        seg = boundary_segments(gm)
        assert len(seg.pair_index) == gm.hagb.sum() > 0.9 * len(gm.pairs)
        # Voronoi diagram of a lattice two rows and columns larger on each side
        # (an even row shift keeps the hexagonal row parity).
        big = (ny + 4, nx + 4)
        bx, by = pixel_coordinates(big, grid, step)
        shift = np.array([bx[2 * big[1] + 2], by[2 * big[1] + 2]])
        vor = Voronoi(np.stack([bx, by], axis=1))
        ridges = {tuple(sorted(p)): r for p, r in zip(vor.ridge_points.tolist(), vor.ridge_vertices)}
        r, c = np.divmod(gm.pairs[seg.pair_index], nx)
        big_index = (r + 2) * big[1] + (c + 2)
        for (i, j), ends in zip(big_index.tolist(), seg.coordinates):
            expected = vor.vertices[ridges[tuple(sorted((i, j)))]] - shift
            match = np.allclose(ends, expected, atol=1e-9) or np.allclose(ends, expected[::-1], atol=1e-9)
            assert match, (i, j, ends, expected)
        assert np.array_equal(seg.grain_a, np.minimum(*truth.ravel()[gm.pairs[seg.pair_index]].T))
        assert np.all(seg.grain_a < seg.grain_b)

    @pytest.mark.parametrize("grid", GRIDS)
    def test_segment_lengths_and_shared_vertices(self, grid):
        truth = _half_planes((20, 20), grid, 30.0, (9.3, 8.1))
        seg = boundary_segments(_grain_map(truth, grid, step=2.0))
        lengths = np.linalg.norm(np.diff(seg.coordinates, axis=1)[:, 0], axis=1)
        face = 2.0 if grid == "square" else 2.0 / np.sqrt(3.0)
        assert np.allclose(lengths, face, rtol=1e-12)
        # One connected staircase from edge to edge: two vertices of degree 1.
        degree = np.bincount(seg.vertices.ravel())
        assert sorted(set(degree.tolist())) == [1, 2] and (degree == 1).sum() == 2

    def test_lagb_segments_inside_one_grain(self):
        truth = _half_planes((64, 64), "square", 60.0, (31.4, 30.7))
        q = np.stack([_rotation_z(0.0), _rotation_z(5.0)])[truth.ravel()]
        gm = reconstruct_grains(q, np.ones(truth.size, bool), truth.shape, Oh)
        assert gm.labels.max() == 0 and gm.lagb.sum() > 60
        seg = boundary_segments(gm, kind="lagb")
        assert len(seg.pair_index) == gm.lagb.sum() and np.all(seg.grain_a == 0) and np.all(seg.grain_b == 0)
        assert len(boundary_segments(gm).pair_index) == 0
        tr = boundary_traces(gm, config=BoundaryConfig(kind="lagb"))
        assert len(tr.length_um) == 1 and tr.grain_a[0] == tr.grain_b[0] == 0
        assert abs(_angle_error(tr.trace_angle_deg[0], 60.0)) < ANGLE_TOL

    def test_every_face_pair_has_a_segment(self):
        shape = (5, 6)
        gm = reconstruct_grains(random_quaternions(30, np.random.default_rng(2)), np.ones(30, bool), shape, Oh,
                                config=GrainConfig(high_angle=0.5, low_angle=0.25))
        assert len(boundary_segments(gm).pair_index) == len(neighbour_pairs(shape))

    def test_unknown_kind_raises(self):
        gm = _grain_map(np.zeros((3, 3), int))
        with pytest.raises(ValueError, match="'subgrain'"):
            boundary_segments(gm, kind="subgrain")


class TestBoundaryTraces:
    @pytest.mark.parametrize("grid", GRIDS)
    @pytest.mark.parametrize("alpha", ANGLES)
    def test_straight_boundary_angle_and_length(self, grid, alpha):
        shape, step = (76, 64), 0.5
        lo, hi = _map_outline(shape, grid, step)
        rng = np.random.default_rng(int(alpha * 10))
        for _ in range(3):  # the line at random sub-pixel offsets
            centre = 0.5 * (lo + hi) + (rng.random(2) - 0.5) * 4 * step
            gm = _grain_map(_half_planes(shape, grid, alpha, centre, step), grid, step=step)
            tr = boundary_traces(gm)
            assert len(tr.length_um) == 1 and (tr.grain_a[0], tr.grain_b[0]) == (0, 1)
            assert not tr.closed[0]
            assert abs(_angle_error(tr.trace_angle_deg[0], alpha)) <= ANGLE_TOL
            assert 0.0 <= tr.trace_angle_deg[0] < 180.0
            assert tr.angle_to_interface_deg[0] == pytest.approx(min(alpha % 180, 180 - alpha % 180), abs=ANGLE_TOL)
            truth_length = _length_inside(lo, hi, centre, alpha)
            assert truth_length >= 60 * step
            assert abs(tr.length_um[0] - truth_length) <= LENGTH_TOL * step

    @pytest.mark.parametrize("grid", GRIDS)
    @pytest.mark.parametrize("alpha", NEAR_AXIS_ANGLES)
    def test_near_axis_boundary_within_grid_bound(self, grid, alpha):
        shape = (76, 64)
        lo, hi = _map_outline(shape, grid)
        rng = np.random.default_rng(int(alpha * 10))
        for _ in range(5):
            centre = 0.5 * (lo + hi) + (rng.random(2) - 0.5) * 2
            tr = boundary_traces(_grain_map(_half_planes(shape, grid, alpha, centre), grid))
            length = _length_inside(lo, hi, centre, alpha)
            assert len(tr.length_um) == 1 and length >= 60
            assert abs(_angle_error(tr.trace_angle_deg[0], alpha)) <= np.degrees(np.arctan(1.5 / length))

    def test_45_degree_staircase_reads_45(self):
        truth = np.greater.outer(np.arange(80), np.arange(80)).astype(int)  # row > col
        gm = _grain_map(truth)
        raw = boundary_segments(gm).coordinates
        d = np.diff(raw, axis=1)[:, 0]
        assert set((np.degrees(np.arctan2(d[:, 1], d[:, 0])).round(9) % 180).tolist()) == {0.0, 90.0}
        rough = boundary_traces(gm, config=BoundaryConfig(iterations=0))
        smooth = boundary_traces(gm)
        for tr in (rough, smooth):
            assert abs(tr.trace_angle_deg[0] - 45.0) < 1e-9
            assert tr.histogram_um[[8, 9]].sum() == pytest.approx(tr.total_length_um)
        # From (-0.5, 0.5) to (78.5, 79.5): the staircase is √2 longer than the line.
        line = 79 * np.sqrt(2.0)
        assert rough.length_um[0] == pytest.approx(158.0)
        assert abs(smooth.length_um[0] - line) <= LENGTH_TOL

    def test_triple_junction_splits_chains_square(self):
        # A | B above row 50, C below: a T junction at (49.5, 49.5).
        truth = np.full((100, 100), 2)
        truth[:50, :50], truth[:50, 50:] = 0, 1
        tr = boundary_traces(_grain_map(truth, step=2.0))
        pairs = list(zip(tr.grain_a.tolist(), tr.grain_b.tolist()))
        assert pairs == [(0, 1), (0, 2), (1, 2)]
        assert np.allclose(tr.length_um, 100.0)  # 50 steps, all three
        assert np.allclose(tr.trace_angle_deg, [90.0, 0.0, 0.0])
        assert tr.n_segments.tolist() == [50, 50, 50]
        # The junction vertex is an end of all three chains and did not move.
        ends = {tuple(p) for p in tr.segments.reshape(-1, 2).round(9).tolist()}
        assert (99.0, 99.0) in ends

    def test_triple_junction_splits_chains_hexagonal(self):
        # Three grains meeting at 120°: rays from the centre at 90° (down the
        # map), 210° and 330° (from +x towards +y).
        shape, grid = (120, 120), "hexagonal"
        x, y = pixel_coordinates(shape, grid)
        lo, hi = _map_outline(shape, grid)
        centre = 0.5 * (lo + hi) + np.array([0.21, -0.13])
        phi = np.degrees(np.arctan2(y - centre[1], x - centre[0])) % 360
        truth = (np.digitize(phi, [90.0, 210.0, 330.0]) % 3).reshape(shape)
        gm = _grain_map(truth, grid)
        tr = boundary_traces(gm)
        assert len(tr.length_um) == 3
        chains = {(a, b): k for k, (a, b) in enumerate(zip(tr.grain_a.tolist(), tr.grain_b.tolist()))}
        grain_of = {int(t): int(g) for t, g in zip(truth.ravel(), gm.labels.ravel())}
        # Ray: the truth labels on either side.
        for ray, sides in {90.0: (0, 1), 210.0: (1, 2), 330.0: (0, 2)}.items():
            k = chains[tuple(sorted(grain_of[s] for s in sides))]
            assert abs(_angle_error(tr.trace_angle_deg[k], ray)) <= ANGLE_TOL
            d = np.array([np.cos(np.radians(ray)), np.sin(np.radians(ray))])
            to_edge = min((np.where(d > 0, hi, lo) - centre)[d != 0] / d[d != 0])
            assert to_edge > 45
            assert abs(tr.length_um[k] - to_edge) <= LENGTH_TOL

    def test_pore_on_a_boundary_splits_it(self):
        shape = (80, 40)
        truth = _half_planes(shape, "square", 90.0, (19.5, 0.0))
        x, y = pixel_coordinates(shape)
        pore = ((x - 19.5) ** 2 + (y - 40.0) ** 2 < 9.0).reshape(shape)
        gm = _grain_map(truth, indexed=~pore)
        tr = boundary_traces(gm)
        assert len(tr.length_um) == 2 and np.allclose(tr.trace_angle_deg, 90.0)
        assert tr.total_length_um == pytest.approx(80 - pore[:, 19].sum())
        lab = gm.labels.ravel()
        seg = boundary_segments(gm)
        assert np.all(lab[gm.pairs[seg.pair_index]] >= 0)

    def test_enclosed_grain_is_a_closed_chain(self):
        truth = np.zeros((12, 12), int)
        truth[4:7, 5:8] = 1
        tr = boundary_traces(_grain_map(truth))
        assert tr.closed.tolist() == [True] and tr.n_segments.tolist() == [12]
        assert tr.length_um[0] < 12.0  # Laplacian smoothing shrinks a free loop

    @pytest.mark.parametrize("grid", GRIDS)
    def test_columnar_perpendicular_classification(self, grid):
        # Columns 30 px apart; boundary k is x = x0_k + tan(δ_k) (y - y_mid):
        # its trace angle is 90 - δ_k.
        deviation = np.array([0.0, 3.5, 0.8, -1.2, -7.0, -1.7, 1.5, 10.0, 5.0, -0.8, -3.5])
        shape = (150, 30 * (len(deviation) + 1))
        x, y = pixel_coordinates(shape, grid)
        x0 = 30.0 * (np.arange(len(deviation)) + 1) + 0.37
        bx = x0[None, :] + np.tan(np.radians(deviation))[None, :] * (y[:, None] - 0.5 * y.max())
        truth = (x[:, None] >= bx).sum(axis=1).reshape(shape)
        tr = boundary_traces(_grain_map(truth, grid), config=BoundaryConfig(perpendicular_tolerance=2.0))
        assert tr.grain_a.tolist() == list(range(len(deviation)))
        assert tr.grain_b.tolist() == list(range(1, len(deviation) + 1))
        true_angle = 90.0 - deviation
        assert np.abs(_angle_error(tr.trace_angle_deg, true_angle)).max() <= ANGLE_TOL
        assert np.all(tr.perpendicular[np.abs(deviation) <= 2.0])
        assert not np.any(tr.perpendicular[np.abs(deviation) > 3.0])
        near = np.abs(deviation) <= 2.0
        assert tr.perpendicular_fraction == pytest.approx(tr.length_um[near].sum() / tr.length_um.sum())

    def test_histogram_weights_sum_to_total_length(self):
        truth = np.full((100, 100), 2)
        truth[:50, :60], truth[:50, 60:] = 0, 1
        truth += _half_planes((100, 100), "square", 30.0, (50.3, 70.1)) * 3
        tr = boundary_traces(_grain_map(truth), config=BoundaryConfig(bin_width=7.5))
        assert len(tr.histogram_um) == 24 and tr.bin_edges_deg[[0, -1]].tolist() == [0.0, 180.0]
        assert tr.histogram_um.sum() == pytest.approx(tr.total_length_um, rel=1e-12)
        assert tr.total_length_um == pytest.approx(tr.length_um.sum(), rel=1e-12)
        k = np.floor(tr.trace_angle_deg / 7.5).astype(int)
        assert np.allclose(np.bincount(k, tr.length_um, minlength=24), tr.histogram_um)

    def test_interface_y_swaps_axes(self):
        deviation = np.array([0.0, 12.0, -25.0, 40.0])
        shape = (90, 150)
        x, y = pixel_coordinates(shape)
        bx = 30.0 * (np.arange(4) + 1)[None, :] + np.tan(np.radians(deviation))[None, :] * (y[:, None] - 45.0)
        truth = (x[:, None] >= bx).sum(axis=1).reshape(shape)
        along_x = boundary_traces(_grain_map(truth, interface="x"))
        along_y = boundary_traces(_grain_map(truth.T.copy(), interface="y"))
        a, b = np.argsort(along_x.length_um), np.argsort(along_y.length_um)
        assert np.allclose(along_x.length_um[a], along_y.length_um[b], rtol=1e-12)
        assert np.allclose(_angle_error(along_x.trace_angle_deg[a], along_y.trace_angle_deg[b]), 0.0, atol=1e-9)
        assert np.allclose(along_x.histogram_um, along_y.histogram_um)
        # The same map read with the other interface: angles θ -> 90 - θ.
        across = boundary_traces(_grain_map(truth, interface="y"))
        assert np.allclose(_angle_error(across.trace_angle_deg, 90.0 - along_x.trace_angle_deg), 0.0, atol=1e-9)

    def test_smoothing_is_mtex_smooth(self):
        # MTEX grains.smooth, literally: A = I_VF I_VFᵀ, vertices of degree
        # > 2 (triple points) and at the outer boundary (here: degree 1) fixed,
        # V <- V - λ (V - A V / rowsum A) for the others.
        rng = np.random.default_rng(4)
        truth = np.full((24, 24), 2)
        truth[:12, :12], truth[:12, 12:] = 0, 1
        truth[rng.random((24, 24)) < 0.1] = 3  # scattered single-pixel grains
        truth += 4 * _half_planes((24, 24), "square", 70.0, (11.3, 12.6))
        for grid in GRIDS:
            gm = _grain_map(truth, grid)
            seg = boundary_segments(gm)
            v = len(seg.points)
            incidence = np.zeros((v, len(seg.vertices)))
            incidence[seg.vertices[:, 0], np.arange(len(seg.vertices))] = 1
            incidence[seg.vertices[:, 1], np.arange(len(seg.vertices))] = 1
            adjacency = incidence @ incidence.T
            degree = np.diag(adjacency)
            # Our chains also end where a degree-2 vertex joins two grain pairs.
            key = seg.grain_a * (gm.labels.max() + 1) + seg.grain_b
            pair_count = np.array([len(set(key[np.any(seg.vertices == k, axis=1)].tolist())) for k in range(v)])
            moving = (degree == 2) & (pair_count == 1)
            points = seg.points.copy()
            for _ in range(3):
                mean = adjacency @ points / adjacency.sum(axis=1, keepdims=True)
                points[moving] -= 0.5 * (points[moving] - mean[moving])
            tr = boundary_traces(gm, config=BoundaryConfig(iterations=3))
            expected = np.sort(points[seg.vertices].reshape(len(seg.vertices), 4).round(9), axis=0)
            got = np.sort(tr.segments.reshape(len(seg.vertices), 4).round(9), axis=0)
            assert np.allclose(expected, got, atol=1e-9)
            assert moving.any() and (~moving).any()

    def test_no_boundaries(self, tmp_path):
        tr = boundary_traces(_grain_map(np.zeros((5, 6), int)))
        assert len(tr.length_um) == 0 and tr.segments.shape == (0, 2, 2)
        assert tr.total_length_um == 0.0 and np.isnan(tr.perpendicular_fraction)
        assert tr.histogram_um.sum() == 0.0
        assert json.loads(json.dumps(tr.summary()))["n_chains"] == 0
        save_trace_rose(tmp_path / "rose.png", tr)
        assert (tmp_path / "rose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_summary_is_plain_json(self):
        truth = _half_planes((64, 64), "square", 80.0, (31.6, 31.3))
        tr = boundary_traces(_grain_map(truth, step=0.25))
        s = tr.summary()
        assert all(type(v) in (int, float, str) for v in s.values())
        assert json.loads(json.dumps(s)) == s
        assert s["n_chains"] == 1 and s["perpendicular_fraction"] == 1.0
        assert s["total_length_um"] == pytest.approx(tr.length_um[0])
        assert s["mean_angle_to_interface_deg"] == pytest.approx(80.0, abs=ANGLE_TOL)
        assert s["interface_direction"] == "x" and s["boundary_kind"] == "hagb"


class TestBoundaryConfig:
    @pytest.mark.parametrize("field, value", [
        ("kind", "twin"), ("iterations", -1), ("iterations", 2.5), ("rate", 0.0), ("rate", 1.5),
        ("bin_width", 0.0), ("bin_width", 7.0), ("bin_width", -5.0), ("bin_width", 360.0),
        ("perpendicular_tolerance", -1.0), ("perpendicular_tolerance", 95.0),
    ])
    def test_bad_config_raises_naming_the_value(self, field, value):
        with pytest.raises(ValueError, match=f"{field}.*{repr(value) if isinstance(value, str) else value}"):
            BoundaryConfig(**{field: value})


class TestSaveTraceRose:
    @pytest.mark.parametrize("interface", ["x", "y"])
    def test_writes_png(self, tmp_path, interface):
        truth = np.full((60, 60), 2)
        truth[:30, :30], truth[:30, 30:] = 0, 1
        tr = boundary_traces(_grain_map(truth, interface=interface))
        assert isinstance(tr, BoundaryTraces)
        path = tmp_path / f"rose_{interface}.png"
        save_trace_rose(path, tr)
        import matplotlib.image as mpimg

        img = mpimg.imread(str(path))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
