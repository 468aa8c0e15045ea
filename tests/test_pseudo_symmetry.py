"""Pseudo-symmetry cleanup: the operator's alternatives against orix, and two synthetic maps
with known truth (a pseudo-symmetric mis-index that must merge, a real twin that must stay)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from orix.quaternion import Misorientation, Orientation, Rotation
from orix.quaternion.symmetry import D6h, Oh

from dpm.detector import Detector
from dpm.grains import neighbour_pairs, reconstruct_grains
from dpm.pseudo_symmetry import (PseudoSymmetryConfig, PseudoSymmetryResult, alternatives,
                                 clean_pseudo_symmetry, pseudo_symmetry_operator,
                                 pseudo_symmetry_variants)
from dpm.refine import RefineConfig, RefinementMaster, refine, refinement_master

MAP_SHAPE = (8, 16)
#: Gaussian noise per detector pixel, in units of the clean pattern's standard deviation.
NOISE = 1.0


class TestVariants:
    def test_four_alternatives_at_60_degrees_about_111_as_orix_reduces_them(self):
        m = pseudo_symmetry_operator(Oh)
        variants = pseudo_symmetry_variants(m, Oh)
        assert variants.shape == (4, 4)
        rng = np.random.default_rng(0)
        o = _random(3, rng)
        alt = alternatives(o, variants)                                   # (3, 4, 4)
        for i in range(len(o)):
            ori = Orientation(o[i], symmetry=Oh)
            found = Orientation(alt[i], symmetry=Oh)
            assert np.allclose(found.angle_with(ori, degrees=True), 60.0, atol=1e-6)
            # misorientation o' o⁻¹ (crystal frame), reduced by orix
            mori = Misorientation((Rotation(alt[i]) * ~Rotation(o[i])).data,
                                  symmetry=(Oh, Oh)).reduce()
            assert np.allclose(np.degrees(mori.angle), 60.0, atol=1e-6)
            axis = np.abs(mori.axis.unit.data)
            assert np.allclose(axis, 1 / np.sqrt(3), atol=1e-6)         # <111>
            # Brute force: every s1 m^±1 s2 o (24 · 2 · 24 products), clustered by orix's
            # symmetry-reduced angle, makes exactly the 4 classes found.
            ops = Oh.laue_proper_subgroup
            brute = []
            for mm in (Rotation(m), ~Rotation(m)):
                brute.append((ops.outer(mm).flatten().outer(ops).flatten()
                              * Rotation(o[i])).data)
            brute = Orientation(np.concatenate(brute), symmetry=Oh)
            dist = brute.angle_with_outer(found, degrees=True)           # (1152, 4)
            assert (dist.min(axis=1) < 1e-4).all()
            assert ((dist < 1e-4).sum(axis=0) == 288).all()              # 1152 / 4 each
            pair = found.angle_with_outer(found, degrees=True)
            assert (pair[~np.eye(4, dtype=bool)] > 1.0).all()          # 4 distinct classes

    def test_operator_that_is_a_symmetry_is_refused(self):
        with pytest.raises(ValueError, match="is a symmetry"):
            pseudo_symmetry_variants(pseudo_symmetry_operator(Oh, (0, 0, 1), 90.0), Oh)

    def test_default_axis_is_for_m3m_only(self):
        with pytest.raises(ValueError, match="Laue group 6/mmm"):
            pseudo_symmetry_operator(D6h)
        m = pseudo_symmetry_operator(D6h, (0, 0, 1), 30.0)   # 6/mmm: 30° about c is not a symmetry
        assert len(pseudo_symmetry_variants(m, D6h)) == 1

    @pytest.mark.parametrize("axis, angle, match", [((0, 0, 0), 60.0, "axis"),
                                                    ((1, 1), 60.0, "axis"),
                                                    ((1, 1, 1), 0.0, "angle"),
                                                    ((1, 1, 1), 190.0, "angle")])
    def test_bad_operator(self, axis, angle, match):
        with pytest.raises(ValueError, match=match):
            pseudo_symmetry_operator(Oh, axis, angle)


def _random(n: int, rng: np.random.Generator) -> np.ndarray:
    from dpm.synthetic import random_quaternions

    return random_quaternions(n, rng)


# ------------------------------------------------------------------ synthetic maps


@dataclass(frozen=True, eq=False)
class Scene:
    """An 8 x 16 Li map (40 x 40 px patterns); the right half is indexed at ``m A``.

    ``twin=False``: every pattern is simulated at ``A`` (a pseudo-symmetric
    mis-index of the right half). ``twin=True``: the right-half patterns are
    simulated at ``m A`` (a real twin). Every pixel is refined from its
    indexed orientation, as the pipeline would leave it.
    """

    rows: np.ndarray
    quaternions: np.ndarray
    scores: np.ndarray
    truth: np.ndarray
    rmaster: RefinementMaster
    detector: Detector

    @property
    def right(self) -> np.ndarray:
        return np.tile(np.arange(MAP_SHAPE[1]) >= MAP_SHAPE[1] // 2, MAP_SHAPE[0])

    def errors(self, quaternions: np.ndarray) -> np.ndarray:
        """Disorientation to the truth in degrees (orix, m-3m)."""
        return np.asarray(Orientation(quaternions, symmetry=Oh).angle_with(
            Orientation(self.truth, symmetry=Oh), degrees=True))

    def run(self, rows=None, *, refine_config: RefineConfig = RefineConfig(),
            **config) -> PseudoSymmetryResult:
        return clean_pseudo_symmetry(
            self.rows if rows is None else rows, self.quaternions, self.scores,
            np.ones(len(self.scores), dtype=bool), MAP_SHAPE, self.rmaster, self.detector,
            config=PseudoSymmetryConfig(**config), refine_config=refine_config)


@pytest.fixture(scope="module")
def setting():
    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import prepare_patterns
    from dpm.synthetic import camera_patterns

    master = shipped_master_pattern("li", 20.0)
    det = Detector(shape=(40, 40), pc=(0.5, 0.45, 0.6))
    a = _random(1, np.random.default_rng(3))
    ma = (Rotation(pseudo_symmetry_operator(Oh)) * Rotation(a)).data
    clean = camera_patterns(master, det, np.vstack([a, ma]))
    return master, det, refinement_master(master, det), a, ma, clean, prepare_patterns


def _scene(setting, twin: bool) -> Scene:
    master, det, rmaster, a, ma, clean, prepare_patterns = setting
    n = MAP_SHAPE[0] * MAP_SHAPE[1]
    right = np.tile(np.arange(MAP_SHAPE[1]) >= MAP_SHAPE[1] // 2, MAP_SHAPE[0])
    truth = np.where(right[:, None] & twin, ma, a)
    source = clean[(right & twin).astype(int)]
    rng = np.random.default_rng(7 + twin)
    noisy = source + rng.normal(scale=NOISE * clean.std(), size=source.shape).astype(np.float32)
    rows = prepare_patterns(noisy).data
    indexed = np.where(right[:, None], ma, a)
    refined = refine(rows, rmaster, det, indexed)
    return Scene(rows=rows, quaternions=refined.quaternions, scores=refined.scores,
                 truth=truth, rmaster=rmaster, detector=det)


@pytest.fixture(scope="module")
def misindex(setting) -> Scene:
    return _scene(setting, twin=False)


@pytest.fixture(scope="module")
def twin(setting) -> Scene:
    return _scene(setting, twin=True)


@pytest.fixture(scope="module")
def merged(misindex) -> PseudoSymmetryResult:
    return misindex.run()


def n_grains(quaternions: np.ndarray, grid: str = "square") -> int:
    from dpm.grains import GrainConfig

    return int(reconstruct_grains(quaternions, np.ones(len(quaternions), dtype=bool), MAP_SHAPE,
                                  Oh, config=GrainConfig(grid=grid)).summary["n_grains"])


class TestOracle:
    def test_patterns_of_the_two_candidates_differ(self, setting, misindex):
        _, _, _, a, ma, clean, prepare_patterns = setting
        rows = prepare_patterns(clean).data
        assert float(rows[0] @ rows[1]) < 0.7          # measured 0.59
        # The mis-indexed half sits at a local maximum near m A, well below A's NCC.
        right = misindex.right
        assert (misindex.errors(misindex.quaternions)[right] > 59.0).all()
        at_a = refine(misindex.rows[right], misindex.rmaster, misindex.detector,
                      np.tile(a, (int(right.sum()), 1))).scores
        assert at_a.min() > misindex.scores[right].max() + 0.15
        assert n_grains(misindex.quaternions) == 2


class TestCleanPseudoSymmetry:
    def test_mis_index_is_merged(self, misindex, merged):
        right = misindex.right
        assert np.array_equal(merged.changed, right)
        assert (misindex.errors(merged.quaternions) < 1.0).all()
        assert n_grains(merged.quaternions) == 1
        # the left half is passed through untouched; the right half gains NCC
        assert np.array_equal(merged.quaternions[~right], misindex.quaternions[~right])
        assert np.array_equal(merged.scores[~right], misindex.scores[~right])
        assert (merged.scores[right] > misindex.scores[right] + 0.15).all()
        assert merged.n_alternatives == 4
        assert (merged.n_boundary_pairs, merged.n_boundary_pairs_after) == (MAP_SHAPE[0], 0)
        assert (merged.n_tested, merged.n_changed, merged.passes) == (right.size, right.sum(), 1)
        assert merged.summary() == {
            "pseudo_symmetry_boundary_pairs": MAP_SHAPE[0],
            "pseudo_symmetry_boundary_pairs_after": 0, "pseudo_symmetry_tested": right.size,
            "pseudo_symmetry_changed": int(right.sum()), "pseudo_symmetry_passes": 1}
        for array in (merged.quaternions, merged.scores, merged.changed):
            assert type(array) is np.ndarray

    def test_real_twin_is_kept(self, twin):
        result = twin.run()
        assert not result.changed.any()
        assert np.array_equal(result.quaternions, twin.quaternions)
        assert np.array_equal(result.scores, twin.scores)
        assert (twin.errors(result.quaternions) < 1.0).all()
        assert n_grains(result.quaternions) == 2
        assert result.n_boundary_pairs == result.n_boundary_pairs_after == MAP_SHAPE[0]
        assert (result.n_tested, result.n_changed, result.passes) == (twin.right.size, 0, 1)

    def test_islands_merge_beside_a_twin(self, setting):
        # Grain A holds two 3 x 3 islands mis-indexed at two different alternatives of A
        # (patterns of A) and borders a real twin (patterns at a third alternative): the
        # matrix pixels try three candidates at once; the islands' pixels, once changed,
        # meet the twin in a second pass and keep A.
        master, det, rmaster, a, _, _, prepare_patterns = setting
        from dpm.synthetic import camera_patterns

        alt = alternatives(a, pseudo_symmetry_variants(pseudo_symmetry_operator(Oh), Oh))[0]
        shape = (10, 16)
        row, col = np.divmod(np.arange(shape[0] * shape[1]), shape[1])
        twin = col >= 12
        islands = [(abs(row - 4) <= 1) & (abs(col - 4) <= 1),
                   (abs(row - 6) <= 1) & (abs(col - 9) <= 1)]
        clean = camera_patterns(master, det, np.vstack([a, alt[0]]))
        rng = np.random.default_rng(0)
        noisy = clean[twin.astype(int)] + rng.normal(
            scale=NOISE * clean.std(), size=(twin.size, *det.shape)).astype(np.float32)
        rows = prepare_patterns(noisy).data
        truth = np.where(twin[:, None], alt[0], a)
        start = truth.copy()
        start[islands[0]], start[islands[1]] = alt[1], alt[2]
        refined = refine(rows, rmaster, det, start)
        result = clean_pseudo_symmetry(rows, refined.quaternions, refined.scores,
                                       np.ones(twin.size, dtype=bool), shape, rmaster, det)
        assert np.array_equal(result.changed, islands[0] | islands[1])
        error = Orientation(result.quaternions, symmetry=Oh).angle_with(
            Orientation(truth, symmetry=Oh), degrees=True)
        assert error.max() < 1.0
        assert result.passes == 2 and result.n_tested == twin.size
        assert result.n_boundary_pairs_after == shape[0]        # the twin boundary alone

    def test_margin(self, misindex):
        # the patterns favour A by about 0.3 NCC: a larger margin keeps the mis-index
        result = misindex.run(margin=0.5)
        assert not result.changed.any() and result.n_tested == misindex.right.size

    def test_hexagonal_grid(self, misindex):
        result = misindex.run(grid="hexagonal")
        right = misindex.right
        assert np.array_equal(result.changed, right)
        assert (misindex.errors(result.quaternions) < 1.0).all()
        assert n_grains(result.quaternions, "hexagonal") == 1
        pairs = neighbour_pairs(MAP_SHAPE, "hexagonal")
        across = int((right[pairs[:, 0]] != right[pairs[:, 1]]).sum())
        assert across > MAP_SHAPE[0]                   # diagonal faces cross too
        assert (result.n_boundary_pairs, result.n_boundary_pairs_after) == (across, 0)

    def test_independent_of_pixel_order(self, misindex, merged):
        # the map turned by 180°: the mis-indexed half is now the left one
        flip = np.arange(misindex.right.size)[::-1]
        result = clean_pseudo_symmetry(misindex.rows[flip], misindex.quaternions[flip],
                                       misindex.scores[flip], np.ones(flip.size, dtype=bool),
                                       MAP_SHAPE, misindex.rmaster, misindex.detector)
        assert np.array_equal(result.changed[flip], merged.changed)
        assert np.allclose(np.abs((result.quaternions[flip] * merged.quaternions).sum(axis=1)),
                           1.0, atol=1e-6)

    def test_gpu_path_matches_numpy(self, misindex, merged, xp):
        result = misindex.run(xp.asarray(misindex.rows))
        for array in (result.quaternions, result.scores, result.changed):
            assert type(array) is np.ndarray
        assert np.array_equal(result.changed, merged.changed)
        assert np.allclose(result.scores, merged.scores, atol=1e-3)
        assert np.abs(misindex.errors(result.quaternions)
                      - misindex.errors(merged.quaternions)).max() < 0.05

    def test_small_memory_budget_gives_the_same_result(self, misindex, merged):
        # 2 rows of 1600 float32 per pixel: half of 409600 bytes holds 16 pixels per batch
        result = misindex.run(refine_config=RefineConfig(memory_budget=409600))
        assert np.array_equal(result.changed, merged.changed)
        assert np.allclose(result.quaternions, merged.quaternions, atol=1e-6)
        assert np.allclose(result.scores, merged.scores, atol=1e-6)

    def test_unindexed_pixels_are_left_alone(self, misindex):
        indexed = np.ones(misindex.right.size, dtype=bool)
        indexed[[MAP_SHAPE[1] - 1, 2 * MAP_SHAPE[1] - 1]] = False     # right edge, rows 0 and 1
        result = clean_pseudo_symmetry(misindex.rows, misindex.quaternions, misindex.scores,
                                       indexed, MAP_SHAPE, misindex.rmaster, misindex.detector)
        assert np.array_equal(result.changed, misindex.right & indexed)

    def test_bad_input(self, misindex):
        args = [misindex.rows, misindex.quaternions, misindex.scores,
                np.ones(len(misindex.scores), dtype=bool), MAP_SHAPE, misindex.rmaster,
                misindex.detector]
        for k, match in ((0, "patterns"), (1, "quaternions"), (2, "scores"), (3, "indexed")):
            bad = list(args)
            bad[k] = bad[k][:-1]
            with pytest.raises(ValueError, match=match):
                clean_pseudo_symmetry(*bad)
        with pytest.raises(ValueError, match="shared"):
            clean_pseudo_symmetry(*args, refine_config=RefineConfig(pattern_centre="shared"))

    @pytest.mark.parametrize("kwargs, match", [
        ({"axis": (0.0, 0.0, 0.0)}, "axis"), ({"axis": (1.0, 1.0)}, "axis"),
        ({"axis": (1.0, np.nan, 1.0)}, "axis"), ({"angle": 0.0}, "angle"),
        ({"angle": 181.0}, "angle"), ({"tolerance": 10.0}, "tolerance"),
        ({"tolerance": 0.0}, "tolerance"), ({"high_angle": 0.0}, "high_angle"),
        ({"margin": -0.1}, "margin"), ({"max_passes": 0}, "max_passes"),
        ({"grid": "triangle"}, "grid")])
    def test_bad_config(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            PseudoSymmetryConfig(**kwargs)
