"""Zero solutions: neighbour tables, thresholds, re-indexing a synthetic map with known truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from orix.quaternion import Orientation, Rotation
from skimage.filters import threshold_otsu

from dpm.cleanup import (MIN_NOISE_PIXELS, ZeroSolutionConfig, ZeroSolutionResult, neighbours,
                         otsu_threshold, replace_zero_solutions, zero_solution_threshold)
from dpm.detector import Detector
from dpm.refine import RefineConfig, RefinementMaster, refine, refinement_master
from dpm.synthetic import SyntheticMap, random_quaternions


def brute_force_neighbours(map_shape: tuple[int, int], grid: str) -> list[set[int]]:
    """Neighbours from pixel positions: the pixels one grid step away.

    Square: Chebyshev distance 1. Hexagonal: pixel ``(r, c)`` sits at
    ``x = c + (r % 2) / 2``, ``y = r √3 / 2`` (odd rows shifted half a step
    towards +x) and its neighbours are the pixels at Euclidean distance 1.
    """
    ny, nx = map_shape
    pos = []
    for r in range(ny):
        for c in range(nx):
            pos.append((c + 0.5 * (r % 2), r * np.sqrt(3) / 2) if grid == "hexagonal" else (c, r))
    out = []
    for i, (xi, yi) in enumerate(pos):
        near = set()
        for j, (xj, yj) in enumerate(pos):
            if i == j:
                continue
            if grid == "hexagonal":
                if abs(np.hypot(xi - xj, yi - yj) - 1.0) < 1e-9:
                    near.add(j)
            elif max(abs(xi - xj), abs(yi - yj)) == 1:
                near.add(j)
        out.append(near)
    return out


class TestNeighbours:
    @pytest.mark.parametrize("grid", ["square", "hexagonal"])
    @pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (2, 2), (5, 7), (6, 4)])
    def test_matches_brute_force(self, grid, shape):
        table = neighbours(shape, grid)
        assert table.shape == (shape[0] * shape[1], 8)
        expected = brute_force_neighbours(shape, grid)
        for i, row in enumerate(table):
            found = row[row >= 0]
            assert len(found) == len(set(found.tolist()))  # no neighbour twice
            assert set(found.tolist()) == expected[i]

    def test_hexagonal_interior_has_six(self):
        table = neighbours((5, 5), "hexagonal")
        assert ((table >= 0).sum(axis=1)[[6, 7, 8, 11, 12, 13]] == 6).all()
        assert (table[:, 6:] == -1).all()

    def test_bad_grid(self):
        with pytest.raises(ValueError, match="grid"):
            neighbours((3, 3), "triangular")  # type: ignore[arg-type]


def brute_force_otsu_split(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu by trying every split of the binned values and computing class variances directly."""
    edges = np.histogram_bin_edges(values, bins=nbins, range=(values.min(), values.max()))
    centres = 0.5 * (edges[:-1] + edges[1:])
    binned = centres[np.clip(np.searchsorted(edges, values, side="right") - 1, 0, nbins - 1)]
    best, split = -1.0, None
    for k in range(nbins - 1):
        low, high = binned[binned <= centres[k]], binned[binned > centres[k]]
        if len(low) == 0 or len(high) == 0:
            continue
        total = np.concatenate([low, high])
        within = len(low) * low.var() + len(high) * high.var()
        between = len(total) * total.var() - within  # = w0 w1 (μ0 - μ1)² / n
        if between > best * (1 + 1e-12):
            best, split = between, edges[k + 1]
    low, high = values[values < split], values[values >= split]
    return 0.5 * (low.max() + high.min())


class TestThresholds:
    @pytest.mark.parametrize("seed", range(4))
    def test_otsu_matches_skimage_and_brute_force(self, seed):
        rng = np.random.default_rng(seed)
        values = np.concatenate([rng.normal(0.05, 0.02, 300 + 50 * seed),
                                 rng.normal(0.3 + 0.05 * seed, 0.06, 500)])
        t = otsu_threshold(values)
        assert t == pytest.approx(brute_force_otsu_split(values), abs=1e-12)
        # skimage returns the centre of the last bin of the lower class
        edges = np.histogram_bin_edges(values, bins=256, range=(values.min(), values.max()))
        centres = 0.5 * (edges[:-1] + edges[1:])
        k = int(np.argmin(np.abs(centres - threshold_otsu(values, nbins=256))))
        assert np.array_equal(values < t, values < edges[k + 1])

    def test_otsu_threshold_in_the_gap(self):
        rng = np.random.default_rng(5)
        low, high = rng.uniform(0.0, 0.1, 200), rng.uniform(0.4, 0.5, 300)
        t = otsu_threshold(np.concatenate([low, high]))
        assert t == pytest.approx(0.5 * (low.max() + high.min()))

    def test_otsu_constant_and_empty(self):
        assert otsu_threshold(np.full(10, 0.2)) == pytest.approx(0.2)
        with pytest.raises(ValueError, match="finite"):
            otsu_threshold(np.array([np.nan]))

    def test_percentile_of_non_diffracting_pixels(self):
        rng = np.random.default_rng(1)
        n_dark, n_grain = 2000, 3000
        scores = np.concatenate([rng.uniform(0.0, 0.1, n_dark), rng.uniform(0.3, 0.6, n_grain),
                                 [0.9] * 50])
        bc = np.concatenate([rng.uniform(0, 10, n_dark - 1), [10.0],  # 10 itself: not diffracting
                             rng.uniform(10.5, 200, n_grain), np.zeros(50)])
        readable = np.r_[np.ones(n_dark + n_grain, dtype=bool), np.zeros(50, dtype=bool)]
        t = zero_solution_threshold(scores, readable, bc)
        # 99th percentile of U(0, 0.1); its standard error is sqrt(.99 .01 / 2000) 0.1 = 2.2e-4
        assert t == pytest.approx(0.099, abs=1e-3)
        assert t == pytest.approx(np.percentile(scores[:n_dark], 99))

    def test_few_non_diffracting_pixels_fall_back_to_otsu(self):
        rng = np.random.default_rng(2)
        k = MIN_NOISE_PIXELS - 1
        scores = np.concatenate([rng.uniform(0.0, 0.1, 400), rng.uniform(0.3, 0.6, 600)])
        bc = np.full(1000, 100.0)
        bc[:k] = 0.0
        t = zero_solution_threshold(scores, np.ones(1000, dtype=bool), bc)
        assert t == pytest.approx(otsu_threshold(scores))
        assert scores[:400].max() < t < scores[400:].min()

    def test_no_readable_pixel(self):
        with pytest.raises(ValueError, match="readable"):
            zero_solution_threshold(np.zeros(4), np.zeros(4, dtype=bool), np.zeros(4))


# ------------------------------------------------------------------ end to end


@dataclass(frozen=True, eq=False)
class Scene:
    """A refined synthetic map whose failures are known."""

    smap: SyntheticMap
    rmaster: RefinementMaster
    detector: Detector
    rows: np.ndarray
    readable: np.ndarray
    quaternions: np.ndarray
    scores: np.ndarray
    band_contrast: np.ndarray
    block: np.ndarray       # (n,) bool: a 3 x 3 block of normal pixels given random starts

    @property
    def map_shape(self) -> tuple[int, int]:
        return self.smap.diffracting.shape

    @property
    def weak(self) -> np.ndarray:
        return self.smap.weak.ravel()

    @property
    def pores(self) -> np.ndarray:
        return ~self.smap.diffracting.ravel()

    def errors(self, quaternions: np.ndarray) -> np.ndarray:
        """Disorientation to the truth in degrees (orix, m-3m)."""
        pg = self.rmaster.master.phase.point_group
        return np.asarray(Orientation(quaternions, symmetry=pg).angle_with(
            Orientation(self.smap.quaternions, symmetry=pg), degrees=True))

    def run(self, rows=None, *, band_contrast=None, **config) -> ZeroSolutionResult:
        return replace_zero_solutions(
            self.rows if rows is None else rows, self.quaternions, self.scores, self.readable,
            self.band_contrast if band_contrast is None else band_contrast, self.map_shape,
            self.rmaster, self.detector, config=ZeroSolutionConfig(**config))


def _grain_block(smap: SyntheticMap) -> np.ndarray:
    """The first 3 x 3 block (row-major) of normal pixels inside one grain."""
    ny, nx = smap.grain_ids.shape
    normal = smap.diffracting & ~smap.weak
    for r in range(1, ny - 1):
        for c in range(1, nx - 1):
            window = (slice(r - 1, r + 2), slice(c - 1, c + 2))
            if normal[window].all() and (smap.grain_ids[window] == smap.grain_ids[r, c]).all():
                block = np.zeros((ny, nx), dtype=bool)
                block[window] = True
                return block.ravel()
    raise AssertionError("no 3 x 3 block inside a grain")


@pytest.fixture(scope="module")
def scene() -> Scene:
    """A 16 x 16 Li map (60 x 60 px patterns) refined as a failed indexing would leave it.

    Weak pixels carry a smooth topography/charging modulation (too low an NCC
    to trust alone). Normal pixels start 1° from the truth; weak pixels, pores
    and one 3 x 3 block of normal pixels start at random orientations, as when
    dictionary indexing fails. Band contrast is a test-side stand-in derived
    from the truth (0 in pores, 100 elsewhere), so these tests judge the
    cleanup alone; the pipeline's band contrast is tested end to end in
    tests/test_refine_acceptance.py.
    """
    from dpm.io.readers import as_pattern_stack
    from dpm.master.shipped import shipped_master_pattern
    from dpm.pipeline import IndexConfig, prepare_stack
    from dpm.preprocess import PreprocessConfig
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = shipped_master_pattern("li", 20.0)
    det = Detector(shape=(60, 60), pc=(0.5, 0.45, 0.6))
    smap = synthetic_map(master, det, SyntheticConfig(
        map_shape=(16, 16), pore_fraction=0.1, weak_fraction=0.08, weak_contrast=0.08,
        weak_distortion=0.3, seed=1))
    # the map's own static background: few grains make the mean pattern a poor one
    rows, readable = prepare_stack(
        as_pattern_stack(smap.patterns), det, mask=None, background=smap.static_background,
        config=IndexConfig(preprocess=PreprocessConfig(static_background="given")), xp=np)
    rng = np.random.default_rng(0)
    truth = smap.quaternions
    n = len(truth)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    half = np.radians(1.0) / 2
    starts = (Rotation(np.c_[np.full(n, np.cos(half)), np.sin(half) * axes]) * Rotation(truth)).data
    block = _grain_block(smap)
    failed = smap.weak.ravel() | ~smap.diffracting.ravel() | block
    starts[failed] = random_quaternions(int(failed.sum()), rng)
    rmaster = refinement_master(master, det)
    refined = refine(rows, rmaster, det, starts)
    band_contrast = np.where(smap.diffracting.ravel(), 100.0, 0.0)
    return Scene(smap=smap, rmaster=rmaster, detector=det, rows=rows, readable=readable,
                 quaternions=refined.quaternions, scores=refined.scores,
                 band_contrast=band_contrast, block=block)


@pytest.fixture(scope="module")
def reference(scene: Scene) -> ZeroSolutionResult:
    return scene.run()


def check_replacement(scene: Scene, result: ZeroSolutionResult, min_weak: float = 0.9) -> None:
    """What every run must satisfy: weak pixels found, pores untouched, flags exact."""
    errors = scene.errors(result.quaternions)
    weak = scene.weak
    recovered = result.indexed[weak] & (errors[weak] < 2.0)
    assert recovered.mean() >= min_weak
    assert not result.replaced[scene.pores].any()
    zero = ~scene.readable | (scene.scores < result.threshold)
    assert result.n_zero_solutions == int(zero.sum())
    # replaced flags exactly the zero solutions that became indexed
    assert np.array_equal(result.replaced, zero & result.indexed)
    assert result.n_replaced == int(result.replaced.sum())
    # everything else is passed through untouched
    keep = ~result.replaced
    assert np.array_equal(result.quaternions[keep], scene.quaternions[keep])
    assert np.array_equal(result.scores[keep], scene.scores[keep])
    assert (result.scores[result.replaced] >= result.replace_threshold).all()
    assert (errors[result.replaced] < 2.0).all()


class TestReplaceZeroSolutions:
    def test_weak_pixels_recovered_and_pores_kept(self, scene, reference):
        check_replacement(scene, reference)
        assert reference.n_zero_solutions > int(scene.pores.sum())
        # pores and pores next to grains are enough to measure both thresholds on the map
        dark_scores = scene.scores[scene.pores]
        assert reference.threshold == pytest.approx(np.percentile(dark_scores, 99))
        assert 0.0 < reference.replace_threshold < 0.15

    def test_replaced_pixels_seed_the_next_pass(self, scene, reference):
        # The block's centre has no correctly indexed neighbour before the first pass (one
        # block pixel is misindexed above the threshold, which is not a zero solution and
        # stays); it is right once its neighbours are filled in.
        block = np.flatnonzero(scene.block)
        zero = scene.scores[block] < reference.threshold
        assert zero.sum() >= 8 and reference.replaced[block[zero]].all()
        centre = block[4]
        around = neighbours(scene.map_shape)[centre]
        right = scene.errors(scene.quaternions)[around] < 2.0
        assert not ((scene.scores[around] >= reference.threshold) & right).any()
        assert reference.passes >= 2
        assert scene.errors(reference.quaternions)[centre] < 2.0

    @pytest.mark.parametrize("view", ["transpose", "flip"])
    def test_independent_of_pixel_order(self, scene, reference, view):
        ny, nx = scene.map_shape

        def to_view(a):
            a = a.reshape(ny, nx, *a.shape[1:])
            a = a.transpose(1, 0, *range(2, a.ndim)) if view == "transpose" else a[::-1, ::-1]
            return np.ascontiguousarray(a).reshape(ny * nx, *a.shape[2:])

        def from_view(a):
            shape = (nx, ny) if view == "transpose" else (ny, nx)
            a = a.reshape(*shape, *a.shape[1:])
            a = a.transpose(1, 0, *range(2, a.ndim)) if view == "transpose" else a[::-1, ::-1]
            return a.reshape(ny * nx, *a.shape[2:])

        shape = (nx, ny) if view == "transpose" else (ny, nx)
        result = replace_zero_solutions(
            to_view(scene.rows), to_view(scene.quaternions), to_view(scene.scores),
            to_view(scene.readable), to_view(scene.band_contrast), shape, scene.rmaster,
            scene.detector)
        assert np.array_equal(from_view(result.replaced), reference.replaced)
        assert np.array_equal(from_view(result.indexed), reference.indexed)
        assert np.allclose(from_view(result.quaternions), reference.quaternions, atol=1e-6)
        assert np.allclose(from_view(result.scores), reference.scores, atol=1e-6)
        assert (result.threshold, result.replace_threshold, result.passes) == pytest.approx(
            (reference.threshold, reference.replace_threshold, reference.passes))

    def test_hexagonal_grid(self, scene, reference):
        result = scene.run(grid="hexagonal")
        check_replacement(scene, result)
        assert np.array_equal(result.replaced[scene.block], reference.replaced[scene.block])

    def test_gpu_path_matches_numpy(self, scene, reference, xp):
        result = scene.run(xp.asarray(scene.rows))
        for array in (result.quaternions, result.scores, result.indexed, result.replaced):
            assert type(array) is np.ndarray  # host arrays, whatever the device
        assert np.array_equal(result.replaced, reference.replaced)
        assert result.replace_threshold == pytest.approx(reference.replace_threshold, abs=1e-3)
        both = result.replaced
        moved = scene.errors(result.quaternions)[both] - scene.errors(reference.quaternions)[both]
        assert np.abs(moved).max() < 0.1
        assert np.allclose(result.scores, reference.scores, atol=1e-3)

    def test_replace_threshold_rejects_pores_band_contrast_misses(self, scene, reference):
        # every pixel "diffracts": only the measured replacement threshold keeps pores out
        result = scene.run(band_contrast=np.full_like(scene.band_contrast, 100.0),
                           threshold=reference.threshold,
                           replace_threshold=reference.replace_threshold)
        assert result.replaced[scene.pores].mean() <= 0.1
        assert result.indexed[scene.weak].mean() >= 0.9

    def test_thresholds_given(self, scene):
        result = scene.run(threshold=0.12, replace_threshold=0.99)
        assert (result.threshold, result.replace_threshold) == (0.12, 0.99)
        assert result.n_replaced == 0 and result.passes == 1
        assert np.array_equal(result.indexed, scene.readable & (scene.scores >= 0.12))

    def test_unreadable_patterns_are_never_replaced(self, scene, reference):
        pixel = int(np.flatnonzero(reference.replaced & scene.weak)[0])
        rows, readable = scene.rows.copy(), scene.readable.copy()
        rows[pixel] = 0.0
        readable[pixel] = False
        result = replace_zero_solutions(rows, scene.quaternions, scene.scores, readable,
                                        scene.band_contrast, scene.map_shape, scene.rmaster,
                                        scene.detector, config=ZeroSolutionConfig(
                                            threshold=reference.threshold,
                                            replace_threshold=reference.replace_threshold))
        assert not result.indexed[pixel] and not result.replaced[pixel]

    def test_bad_input(self, scene):
        with pytest.raises(ValueError, match="shared"):
            replace_zero_solutions(scene.rows, scene.quaternions, scene.scores, scene.readable,
                                   scene.band_contrast, scene.map_shape, scene.rmaster,
                                   scene.detector,
                                   refine_config=RefineConfig(pattern_centre="shared"))
        with pytest.raises(ValueError, match="patterns must have shape"):
            replace_zero_solutions(scene.rows[:-1], scene.quaternions, scene.scores,
                                   scene.readable, scene.band_contrast, scene.map_shape,
                                   scene.rmaster, scene.detector)
        with pytest.raises(ValueError, match="band_contrast"):
            replace_zero_solutions(scene.rows, scene.quaternions, scene.scores, scene.readable,
                                   scene.band_contrast[:-1], scene.map_shape, scene.rmaster,
                                   scene.detector)

    @pytest.mark.parametrize("kwargs, match", [({"grid": "triangle"}, "grid"),
                                               ({"max_passes": 0}, "max_passes"),
                                               ({"threshold": 2.0}, "threshold")])
    def test_bad_config(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ZeroSolutionConfig(**kwargs)


class TestMapCleanup:
    """Wild spikes and neighbour fill on a columnar map with known truth (no patterns)."""

    @staticmethod
    def scene(seed: int = 2):
        from orix.quaternion import Rotation

        from dpm.crystal import get_phase
        from dpm.synthetic import SyntheticConfig, columnar_grains, random_quaternions

        rng = np.random.default_rng(seed)
        ids = columnar_grains(SyntheticConfig(map_shape=(30, 60), grain_width=10), rng)
        n = ids.size
        truth = random_quaternions(int(ids.max()) + 1, rng)[ids.ravel()]
        noise = Rotation.from_axes_angles(rng.normal(size=(n, 3)),
                                          np.radians(rng.uniform(0, 0.3, n)))
        q = (noise * Rotation(truth)).data
        # 1% wild spikes: isolated interior pixels with random orientations
        interior = np.zeros(ids.shape, bool)
        interior[2:-2, 2:-2] = True
        same = np.ones(ids.shape, bool)  # pixel and its 8 neighbours in one grain
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same &= np.roll(np.roll(ids, dy, 0), dx, 1) == ids
        pore = np.zeros(ids.shape, bool)
        pore[10:13, 20:23] = True
        near_pore = np.zeros(ids.shape, bool)
        near_pore[9:14, 19:24] = True
        spots = np.flatnonzero((interior & same & ~near_pore).ravel())
        spikes = []
        taken = np.zeros(ids.shape, bool)  # spikes and their neighbours
        for i in rng.permutation(spots):   # isolated spikes: no two within one pixel
            r, c = divmod(int(i), ids.shape[1])
            if not taken[r - 1:r + 2, c - 1:c + 2].any() and len(spikes) < n // 100:
                spikes.append(i)
                taken[r - 1:r + 2, c - 1:c + 2] = True
        spikes = np.array(spikes)
        q[spikes] = random_quaternions(len(spikes), rng)
        # 2% zero solutions inside grains (fillable), away from the spikes, and a pore
        rest = np.setdiff1d(spots, np.flatnonzero(taken.ravel()))
        zeros = rng.choice(rest, size=n // 50, replace=False)
        indexed = np.ones(n, bool)
        indexed[zeros] = False
        indexed[pore.ravel()] = False
        return truth, q, indexed, ~pore.ravel(), spikes, zeros, ids.shape, get_phase("li").point_group

    def test_spikes_removed_and_zero_solutions_filled_pores_kept(self):
        from dpm.cleanup import MapCleanupConfig, clean_map
        from dpm.grains import disorientation_angles

        truth, q, indexed, fillable, spikes, zeros, shape, pg = self.scene()
        result = clean_map(q, indexed, fillable, shape, pg, MapCleanupConfig())
        error = disorientation_angles(result.quaternions, truth, pg)
        assert set(np.flatnonzero(result.despiked)) == set(spikes)
        assert (error[spikes] < 1.0).all()
        assert result.filled[zeros].all() and (error[zeros] < 1.0).all()
        pore = ~fillable
        assert not result.indexed[pore].any() and not result.filled[pore].any()
        untouched = ~result.despiked & ~result.filled
        np.testing.assert_array_equal(result.quaternions[untouched], q[untouched])
        assert result.changed["wild_spikes"] == len(spikes)
        assert result.changed["fill_6"] + result.changed["fill_5"] == len(zeros)

    def test_result_does_not_depend_on_scan_order(self):
        from dpm.cleanup import MapCleanupConfig, clean_map

        truth, q, indexed, fillable, spikes, zeros, shape, pg = self.scene(seed=4)
        ny, nx = shape
        flip = np.arange(ny * nx).reshape(ny, nx)[::-1, ::-1].ravel()
        a = clean_map(q, indexed, fillable, shape, pg, MapCleanupConfig())
        b = clean_map(q[flip], indexed[flip], fillable[flip], shape, pg, MapCleanupConfig())
        np.testing.assert_array_equal(a.filled[flip], b.filled)
        np.testing.assert_array_equal(a.despiked[flip], b.despiked)
        np.testing.assert_allclose(np.abs((a.quaternions[flip] * b.quaternions).sum(axis=1)),
                                   1.0, atol=1e-9)

    def test_bad_ladder(self):
        from dpm.cleanup import MapCleanupConfig

        with pytest.raises(ValueError, match="fill_ladder counts must be in 1..6"):
            MapCleanupConfig(fill_ladder=(7,), grid="hexagonal")
