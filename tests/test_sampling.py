"""Tests for dpm.sampling: the fundamental-zone grid is orix's, and it covers SO(3)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from orix.crystal_map import Phase
from orix.quaternion import Orientation, Rotation
from orix.quaternion.symmetry import Oh
from orix.sampling import get_sample_fundamental
from scipy.spatial import cKDTree

from dpm.sampling import sample_orientations

RESOLUTION = 2.0


@pytest.fixture(scope="module")
def grid_m3m() -> Rotation:
    """The 2° grid of m-3m through dpm (about 7 s, shared by the tests below)."""
    return sample_orientations("m-3m", RESOLUTION)


class TestSampleOrientations:
    def test_count_and_grid_equal_orix(self, grid_m3m: Rotation) -> None:
        reference = get_sample_fundamental(RESOLUTION, point_group=Oh.proper_subgroup,
                                           method="cubochoric")
        assert grid_m3m.size == reference.size == 100_347  # DYNAMICAL.md §7, orix 0.15
        np.testing.assert_array_equal(grid_m3m.data, reference.data)

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
        np.testing.assert_array_equal(rotations.data, reference.data)

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
