"""Tests for dpm.sampling: the fundamental-zone grid is orix's, it covers SO(3), and its
lattice positions, coarse sub-grids and neighbour boxes are those of the cubochoric cube."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from orix.crystal_map import Phase
from orix.quaternion import Orientation, Rotation
from orix.quaternion.symmetry import Oh
from orix.sampling import get_sample_fundamental, uniform_SO3_sample
from scipy.spatial import cKDTree

from dpm.sampling import cubochoric_grid, sample_orientations

RESOLUTION = 2.0


@pytest.fixture(scope="module")
def grid_m3m() -> Rotation:
    """The 2° grid of m-3m through dpm (shared by the tests below)."""
    return sample_orientations("m-3m", RESOLUTION)


class TestSampleOrientations:
    def test_count_and_grid_equal_orix(self, grid_m3m: Rotation) -> None:
        reference = get_sample_fundamental(RESOLUTION, point_group=Oh.proper_subgroup,
                                           method="cubochoric")
        assert grid_m3m.size == reference.size == 100_347  # DYNAMICAL.md §7, orix 0.15
        # Same points in the same order; orix evaluates the formulas with fast math.
        np.testing.assert_allclose(grid_m3m.data, reference.data, rtol=0, atol=1e-12)

    def test_random_orientations_lie_near_a_sample(self, grid_m3m: Rotation) -> None:
        # Nearest neighbour in quaternion space is exact: for unit quaternions
        # |q - p|^2 = 2 - 2 q.p, so the Euclidean-nearest of {±p} to a symmetry
        # equivalent s q is the sample of smallest rotation angle to s q, and
        # taking the best of the 24 proper equivalents gives the disorientation.
        #
        # orix's 2° cubochoric grid does not put *every* orientation within 2°:
        # its covering radius is about 2.33° (the full, unreduced grid's is
        # 2.13°), and 0.04% of 50 000 random orientations lie beyond 2°. The
        # test pins those measured properties of the grid dpm uses.
        samples = grid_m3m.data
        # compact_nodes=False: SciPy 1.17's shrunken node boxes make queries on this
        # regular grid ~30x slower (minutes for the 480 000 queries below).
        tree = cKDTree(np.concatenate([samples, -samples]), compact_nodes=False)
        q = np.random.default_rng(0).normal(size=(20_000, 4))
        random = Orientation(q / np.linalg.norm(q, axis=1, keepdims=True), symmetry=Oh)
        proper = Oh.proper_subgroup
        equivalents = (proper.outer(Rotation(random.data))).data  # (24, n, 4)
        distance, neighbour = tree.query(equivalents.reshape(-1, 4))
        distance = distance.reshape(proper.size, random.size)
        neighbour = neighbour.reshape(proper.size, random.size)
        best = neighbour[np.argmin(distance, axis=0), np.arange(random.size)]
        nearest = Orientation(samples[best % len(samples)], symmetry=Oh)
        angles = random.angle_with(nearest, degrees=True)
        assert (angles <= RESOLUTION).mean() >= 0.999
        assert angles.max() <= 2.4
        # The chordal distance agrees with orix's disorientation angle.
        chord_angles = np.rad2deg(4 * np.arcsin(distance.min(axis=0) / 2))
        np.testing.assert_allclose(chord_angles, angles, atol=1e-4)

    @pytest.mark.parametrize("spec", ["m-3m", "432", Oh, Phase(point_group="m-3m")])
    def test_accepts_name_point_group_and_phase(self, spec: object) -> None:
        rotations = sample_orientations(spec, resolution=10)
        reference = get_sample_fundamental(10, point_group=Oh.proper_subgroup)
        np.testing.assert_allclose(rotations.data, reference.data, rtol=0, atol=1e-12)

    def test_logs_count(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.INFO, logger="dpm"):
            rotations = sample_orientations("m-3m", resolution=10)
        assert f"sampled {rotations.size} orientations" in caplog.text

    def test_unknown_name(self) -> None:
        with pytest.raises(ValueError, match="'m-3x'"):
            sample_orientations("m-3x")

    def test_wrong_type(self) -> None:
        with pytest.raises(TypeError, match="got int"):
            sample_orientations(225)  # type: ignore[arg-type]

    @pytest.mark.parametrize("resolution", [0.0, -1.0])
    def test_non_positive_resolution(self, resolution: float) -> None:
        with pytest.raises(ValueError, match="positive"):
            sample_orientations("m-3m", resolution)

    def test_phase_without_point_group(self) -> None:
        with pytest.raises(ValueError, match="no point group"):
            sample_orientations(Phase(name="empty"))


PROPER_GROUPS = ["1", "2", "3", "4", "6", "222", "32", "422", "622", "23", "432"]


class TestCubochoricGrid:
    @pytest.mark.parametrize("name", PROPER_GROUPS)
    def test_every_proper_group_equals_orix(self, name: str) -> None:
        point_group = Phase(point_group=name).point_group
        grid = cubochoric_grid(point_group, 9.0)
        reference = get_sample_fundamental(9.0, point_group=point_group, method="cubochoric")
        assert len(grid) == reference.size
        np.testing.assert_allclose(grid.rotations.data, reference.data, rtol=0, atol=1e-12)

    def test_lattice_positions_are_those_of_orix_full_cube(self) -> None:
        # orix's unreduced cubochoric sample lists the whole cube in lattice order,
        # i (slowest), j, k over [-N + 1, N]: a point's linear key is its row there.
        grid = cubochoric_grid("m-3m", 7.0)
        full = uniform_SO3_sample(7.0, method="cubochoric", unique=False)
        assert full.size == (2 * grid.steps) ** 3
        np.testing.assert_allclose(full.data[grid.keys], grid.rotations.data, rtol=0, atol=1e-12)
        assert np.all(np.diff(grid.keys) > 0)

    def test_coarse_subgrid_is_the_grid_of_every_factorth_point(self) -> None:
        grid = cubochoric_grid("m-3m", 2.0)
        rows = grid.coarse(3)
        assert np.all(grid.lattice[rows] % 3 == 0)
        assert np.array_equal(grid.rotations.data[rows[np.all(grid.lattice[rows] == 0, axis=1)]],
                              [[1.0, 0.0, 0.0, 0.0]])
        # Three times the spacing: about a 27th of the points (zone faces aside).
        assert abs(rows.size * 27 / len(grid) - 1) < 0.1
        with pytest.raises(ValueError, match="positive integer"):
            grid.coarse(0)

    def test_neighbour_boxes_against_brute_force(self) -> None:
        grid = cubochoric_grid("m-3m", 5.0)
        rows = np.random.default_rng(1).choice(len(grid), 40, replace=False)
        boxes = grid.neighbours(rows, 2)
        assert boxes.shape == (40, 125)
        for row, box in zip(rows, boxes):
            distance = np.abs(grid.lattice - grid.lattice[row]).max(axis=1)
            np.testing.assert_array_equal(np.sort(box[box >= 0]), np.flatnonzero(distance <= 2))
        # A box of radius r holds orientations within about r lattice steps of
        # its centre: at 5° and r = 2, none beyond 2.5 x 2 x 5° of rotation.
        centre = Rotation(grid.rotations.data[np.repeat(rows, 125)])
        found = boxes.ravel() >= 0
        other = Rotation(grid.rotations.data[boxes.ravel()[found]])
        angles = np.rad2deg((~centre[found] * other).angle)
        assert angles.max() < 25.0

    def test_bad_radius(self) -> None:
        with pytest.raises(ValueError, match="radius"):
            cubochoric_grid("m-3m", 10.0).neighbours(np.array([0]), -1)


def test_nearest_grid_point_of_any_orientation() -> None:
    """Against a brute-force search over every grid point with orix's disorientation:
    the row found is the closest one (ties within 1e-9 rad aside), for random
    orientations and for symmetry-equivalents of grid points."""
    from orix.quaternion.symmetry import O

    grid = cubochoric_grid("m-3m", 8.0)
    random = Rotation.random(40).data
    rows = np.arange(0, len(grid), max(1, len(grid) // 20))
    ops = O.data[np.arange(len(rows)) % 24]
    equivalent = (Rotation(ops) * Rotation(grid.rotations.data[rows])).data
    found = grid.nearest(np.concatenate([random, equivalent]))
    np.testing.assert_array_equal(found[len(random):], rows)
    points = Orientation(grid.rotations.data, symmetry=O)
    for q, row in zip(random, found[:len(random)]):
        angles = points.angle_with(Orientation(q, symmetry=O))
        assert angles[row] <= angles.min() + 1e-9
