"""Tests for dpm.calibration: the PC field against kikuchipy's extrapolate_pc (the
geometry oracle) and fits against synthetic fields with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from dpm.calibration import (PCFieldConfig, PatternCentreField, average_same_grain,
                             calibrate_pattern_centre_field, fit_pattern_centre_field,
                             pattern_centre_field,
                             select_calibration_patterns, tilt_slope)
from dpm.detector import Detector

DETECTOR = Detector(shape=(60, 60), pc=(0.49, 0.27, 0.58), sample_tilt=70.0, binning=4,
                    px_size=40.0)   # a 9.6 mm screen
MAP = (20, 30)      # (ny, nx) map pixels
STEP = 5.0          # µm per map pixel


def _map_positions() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.indices(MAP, dtype=float)
    return x, y


def test_geometry_field_equals_kikuchipy_extrapolate_pc():
    """Singh et al.'s relations as kikuchipy implements them: PCx with x, PCy and PCz
    with y (PCz at -tan(20°) of PCy's slope), for a PC given at map pixel (row 7, col 11)."""
    x, y = _map_positions()
    for tilt in (0.0, 4.0):
        detector = Detector(shape=DETECTOR.shape, pc=DETECTOR.pc, sample_tilt=70.0, tilt=tilt,
                            binning=4, px_size=40.0)
        expected = detector.to_kikuchipy().extrapolate_pc(
            pc_indices=np.array([7, 11]), navigation_shape=MAP, step_sizes=(STEP, STEP)).pc
        field = pattern_centre_field(detector, centre=(11.0, 7.0), step=STEP)
        np.testing.assert_allclose(field.at(x, y), expected, atol=1e-12)
        assert field.gradient[2, 1] == pytest.approx(tilt_slope(70.0, tilt) * field.gradient[1, 1])
    # This 145 µm wide map drifts by ~0.015 in PCx across its width.
    assert 0.01 < field.spread(x, y)[0] < 0.02


def _calibration(field: PatternCentreField, noise: tuple[float, float, float], seed: int = 1):
    rng = np.random.default_rng(seed)
    gy, gx = np.meshgrid(np.linspace(1, MAP[0] - 2, 5), np.linspace(1, MAP[1] - 2, 6),
                         indexing="ij")
    x, y = gx.ravel(), gy.ravel()
    pcs = field.at(x, y) + rng.normal(size=(len(x), 3)) * np.asarray(noise)
    return x, y, pcs


def test_constrained_fit_recovers_the_field_and_rejects_outliers():
    truth = pattern_centre_field(DETECTOR, centre=(14.5, 9.5), step=STEP)
    x, y, pcs = _calibration(truth, (2e-4, 2e-4, 5e-4))
    pcs[[3, 17, 22]] += [0.02, -0.015, 0.03]     # three calibrations gone wrong
    fit = fit_pattern_centre_field(x, y, pcs, sample_tilt=70.0)
    assert not fit.inliers[[3, 17, 22]].any() and fit.inliers.sum() >= len(x) - 5
    mx, my = _map_positions()
    error = np.abs(fit.field.at(mx, my) - truth.at(mx, my)).max()
    assert error < 5e-4, error
    assert np.all(fit.rms < 1e-3)
    # Without rejection the outliers pull the field off by more.
    once = fit_pattern_centre_field(x, y, pcs, config=PCFieldConfig(max_passes=1))
    assert np.abs(once.field.at(mx, my) - truth.at(mx, my)).max() > error


def test_plane_fits_any_affine_field_and_constrained_does_not():
    field = PatternCentreField(np.array([10.0, 5.0]), np.array([0.5, 0.3, 0.6]),
                               np.array([[1e-3, 2e-4], [-3e-4, 5e-4], [4e-4, -1e-4]]))
    x, y, pcs = _calibration(field, (0.0, 0.0, 0.0))
    plane = fit_pattern_centre_field(x, y, pcs, config=PCFieldConfig(model="plane"))
    mx, my = _map_positions()
    np.testing.assert_allclose(plane.field.at(mx, my), field.at(mx, my), atol=1e-12)
    assert plane.inliers.all()
    constrained = fit_pattern_centre_field(x, y, pcs)
    assert np.abs(constrained.field.at(mx, my) - field.at(mx, my)).max() > 1e-3


def test_no_drift_gives_a_flat_field():
    flat = PatternCentreField(np.zeros(2), np.asarray(DETECTOR.pc), np.zeros((3, 2)))
    x, y, pcs = _calibration(flat, (2e-4, 2e-4, 5e-4), seed=3)
    mx, my = _map_positions()
    for model in ("constrained", "plane"):
        fit = fit_pattern_centre_field(x, y, pcs, config=PCFieldConfig(model=model))
        assert np.all(fit.field.spread(mx, my) < 5e-4), (model, fit.field.spread(mx, my))
    constant = fit_pattern_centre_field(x, y, pcs, config=PCFieldConfig(model="constant"))
    np.testing.assert_allclose(constant.field.pc, DETECTOR.pc, atol=3e-4)
    assert not constant.field.gradient.any()


def test_bad_input_is_named():
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    pcs = np.tile(DETECTOR.pc, (3, 1))
    with pytest.raises(ValueError, match="lie on one line"):
        fit_pattern_centre_field(x, y, pcs, config=PCFieldConfig(model="plane"))
    with pytest.raises(ValueError, match="spread in both x and y"):
        fit_pattern_centre_field(x, y, pcs)
    with pytest.raises(ValueError, match="too few"):
        fit_pattern_centre_field(x[:1], y[:1], pcs[:1])
    with pytest.raises(ValueError, match="shape"):
        fit_pattern_centre_field(x, y, pcs[:2])
    with pytest.raises(ValueError, match="finite"):
        fit_pattern_centre_field(x, y, np.full((3, 3), np.nan))


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "spline"}, "model"), ({"outlier_limit": 0}, "outlier_limit"),
    ({"max_passes": 0}, "max_passes")])
def test_config_errors(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        PCFieldConfig(**kwargs)


def test_calibration_patterns_are_the_best_of_each_cell():
    rng = np.random.default_rng(2)
    bc = rng.uniform(0, 100, size=MAP)
    usable = np.ones(MAP, dtype=bool)
    usable[:4, :6] = False                  # the first cell holds no usable pixel
    rows, cols = select_calibration_patterns(bc, usable, grid=(5, 5))
    assert len(rows) == 24
    for r, c in zip(rows, cols):
        r0, c0 = 4 * (r // 4), 6 * (c // 6)
        block = np.where(usable[r0:r0 + 4, c0:c0 + 6], bc[r0:r0 + 4, c0:c0 + 6], -np.inf)
        assert bc[r, c] == block.max() and usable[r, c]
    with pytest.raises(ValueError, match="one shape"):
        select_calibration_patterns(bc, usable[:3])


def test_calibration_pattern_is_averaged_with_its_grain_only():
    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import prepare_patterns
    from dpm.synthetic import camera_patterns, random_quaternions

    # A 3 x 3 window: grain A in the first two rows, grain B in the last; the
    # same Poisson noise level as the realistic maps (NCC with the truth ~0.5).
    rng = np.random.default_rng(4)
    det = Detector(shape=(40, 40), pc=(0.5, 0.3, 0.6))
    grains = camera_patterns(shipped_master_pattern("li", 20), det, random_quaternions(2, rng))
    grain_of = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    clean = 1.0 + 0.3 * (grains - grains.mean(axis=(1, 2), keepdims=True)) / grains.std(
        axis=(1, 2), keepdims=True)
    noisy = rng.poisson(4.0 * np.clip(clean[grain_of], 0, None)).astype(np.float32)
    rows, _ = prepare_patterns(noisy - 4.0)               # the flat background removed
    usable = np.ones(9, dtype=bool)
    usable[1] = False                                    # a zero solution of grain A
    truth, _ = prepare_patterns(clean[:1])

    row, members = average_same_grain(rows, 4, usable)
    np.testing.assert_array_equal(members, (grain_of == 0) & usable)
    assert abs(float(np.linalg.norm(row)) - 1) < 1e-5 and abs(float(row.mean())) < 1e-6
    # Five noisy copies: signal-to-noise √5 times one copy's (NCC ρ -> ρ√5 / √(1 + 4ρ²)).
    rho = np.array([float(rows[i] @ truth[0]) for i in (0, 2, 3, 4, 5)])
    snr = np.sqrt(5) * np.mean(rho / np.sqrt(1 - rho**2))
    assert float(row @ truth[0]) > 0.95 * snr / np.sqrt(1 + snr**2) > 1.3 * rho.max()
    # The centre alone in its grain: kept alone.
    row, members = average_same_grain(rows, 7, np.isin(np.arange(9), [0, 2, 3, 5, 7]))
    np.testing.assert_array_equal(members, np.arange(9) == 7)
    np.testing.assert_allclose(row, rows[7], rtol=1e-5, atol=1e-7)


def test_calibration_on_drifting_patterns_recovers_the_field():
    """Li patterns rendered at the PCs of a realistic field (±0.007 in PCx across a
    145 µm map) with Poisson noise, 30 calibration pixels starting 1° off and at the
    map-centre PC: the field refined jointly on their NCCs is within 0.001 of the truth
    at every pixel, closer than a plane through their own refined PCs."""
    from dataclasses import replace

    from orix.quaternion import Rotation

    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import prepare_patterns
    from dpm.refine import refinement_master
    from dpm.synthetic import camera_patterns, random_quaternions

    truth = pattern_centre_field(DETECTOR, centre=(14.5, 9.5), step=STEP)
    rmaster = refinement_master(shipped_master_pattern("li", 20), DETECTOR)
    rng = np.random.default_rng(5)
    x, y, _ = _calibration(truth, (0.0, 0.0, 0.0))
    q = random_quaternions(len(x), rng)
    rows = []
    for qi, pc in zip(q, truth.at(x, y)):
        image = camera_patterns(rmaster.master, replace(DETECTOR, pc=tuple(pc)), qi[None],
                                supersample=1)
        # NCC about 0.46: each pattern's own refined PC is ~0.003 off.
        noisy = rng.poisson(1000 * (1 + image - image.min())).astype(np.float32)
        rows.append(noisy.reshape(1, -1))
    patterns, _ = prepare_patterns(np.concatenate(rows))
    turn = Rotation.from_axes_angles(rng.normal(size=(len(x), 3)), 1.0, degrees=True)
    starts = (turn * Rotation(q)).data
    centre = replace(DETECTOR, pc=tuple(truth.at(np.array(14.5), np.array(9.5))))
    fit = calibrate_pattern_centre_field(patterns, starts, x, y, rmaster, centre)
    mx, my = _map_positions()
    error = np.abs(fit.field.at(mx, my) - truth.at(mx, my)).max()
    assert error < 1e-3, (error, fit.rms)         # 0.0007 measured
    # A plane through the patterns' own PCs alone is further off (0.0013 measured).
    own = fit.residuals + fit.field.at(x, y)
    plane_only = fit_pattern_centre_field(x, y, own).field
    assert np.abs(plane_only.at(mx, my) - truth.at(mx, my)).max() > error


# --- the PC field in dpm.index ---------------------------------------------------------

DRIFT = 0.01        # PCx ±0.01 from the map centre to its left and right edges
DETECTOR_MAP = Detector(shape=(60, 60), pc=(0.49, 0.27, 0.58), sample_tilt=70.0)


@pytest.fixture(scope="module")
def drifting_map():
    """A 16 x 24 Li map (60 x 60 px, Poisson noise, blur, pores) rendered at the PCs of a
    flat sample's field, and its truth."""
    from dpm.master.shipped import shipped_master_pattern
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = shipped_master_pattern("li", 20)
    config = SyntheticConfig(map_shape=(16, 24), seed=3, pc_drift=DRIFT)
    return master, synthetic_map(master, DETECTOR_MAP, config)


def _median_error(result, smap) -> float:
    from dpm.demo import disorientation

    q = result.xmap.rotations.data.reshape(-1, 4)
    diff = smap.diffracting.ravel()
    return float(np.median(disorientation(q[diff], smap.quaternions[diff],
                                          result.xmap.phases[0].point_group)))


@pytest.fixture(scope="module")
def drifting_runs(drifting_map):
    """The drifting map indexed with one PC, the calibrated field (only the map-centre PC
    given) and the true PC of every pixel."""
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import drift_field

    master, smap = drifting_map
    ny, nx = smap.diffracting.shape
    truth = drift_field(DETECTOR_MAP, (ny, nx), smap.step_size, DRIFT)
    np.testing.assert_allclose(truth.at(*np.meshgrid(np.arange(nx), np.arange(ny))).reshape(-1, 3),
                               smap.pcs, atol=1e-12)
    return {name: index(smap.patterns, detector=DETECTOR_MAP, master_pattern=master,
                        pc_field=known, config=IndexConfig(resolution=3.0, pc_field=pc_field))
            for name, pc_field, known in (("one PC", "constant", None), ("field", "auto", None),
                                          ("true PCs", "constant", truth))}


def test_index_calibrates_the_pc_field_of_a_drifting_map(drifting_map, drifting_runs):
    """Only the map-centre PC given: the calibrated field (constrained model) is close to
    the truth everywhere, every pattern is refined at its PC from it, and the orientations
    are as good as with the true PC of every pixel; with one PC they are several times
    worse."""
    from dpm.pipeline import _field_of

    master, smap = drifting_map
    ny, nx = smap.diffracting.shape
    runs = drifting_runs
    record = runs["field"].details["pc_field"]
    assert record["status"] == "fitted" and record["model"] == "constrained"
    assert len(record["calibration_pixels"]) == 64
    assert min(record["gradient_z"]) > 3        # a real drift: both gradients kept
    field = _field_of(record)
    y, x = np.indices((ny, nx))
    error = np.abs(field.at(x, y).reshape(-1, 3) - smap.pcs).max()
    assert error < 0.003, error          # 0.0015 measured
    props = runs["field"].xmap.prop
    np.testing.assert_allclose(np.column_stack([props["pcx"], props["pcy"], props["pcz"]]),
                               field.at(x, y).reshape(-1, 3), atol=1e-12)
    assert "pc_field" not in runs["one PC"].details
    errors = {name: _median_error(result, smap) for name, result in runs.items()}
    # measured medians: one PC 0.575°, field 0.200°, true PCs 0.190°
    assert errors["field"] < errors["true PCs"] + 0.03, errors
    assert errors["one PC"] > 2.5 * errors["field"], errors


def test_too_few_diffracting_patterns_keep_the_given_pc(caplog):
    """A map without Kikuchi contrast has no calibration pattern: the run warns, says why
    in its record, and indexes every pattern at the given PC."""
    import logging

    from dpm.master import simulate_master_pattern
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = simulate_master_pattern("li", kv=20, npx=80, method="kinematical")
    detector = Detector(shape=(30, 30), pc=(0.5, 0.3, 0.6), sample_tilt=70)
    smap = synthetic_map(master, detector, SyntheticConfig(map_shape=(6, 8), contrast=0.0,
                                                           supersample=1, seed=1))
    with caplog.at_level(logging.WARNING, logger="dpm"):
        result = index(smap.patterns, detector=detector, master_pattern=master,
                       config=IndexConfig(resolution=10.0))
    record = result.details["pc_field"]
    assert record["status"] == "given PC kept"
    assert "at least 8 are needed" in record["reason"]
    assert any("PC field not calibrated" in r.message for r in caplog.records)
    pcs = np.column_stack([result.xmap.prop[k] for k in ("pcx", "pcy", "pcz")])
    np.testing.assert_array_equal(pcs, np.tile(detector.pc, (48, 1)))


def test_calibration_windows_sit_at_the_cell_centres():
    from dpm.calibration import calibration_windows

    blocks = calibration_windows((16, 24), (8, 8), 3)
    assert len(blocks) == 64
    assert blocks[0] == (0, 2, 0, 3) and blocks[-1] == (14, 16, 21, 24)
    # cells never exceed the map: one column, two row bands (edges 0, 2, 5)
    assert calibration_windows((5, 1), (2, 3), 3) == [(0, 2, 0, 1), (2, 5, 0, 1)]


def test_a_map_without_drift_gets_a_flat_field():
    """No drift: neither gradient is measurably different from zero, so the field is flat
    (the PC at the map centre refined on the calibration patterns)."""
    from dpm.master.shipped import shipped_master_pattern
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = shipped_master_pattern("li", 20)
    smap = synthetic_map(master, DETECTOR_MAP, SyntheticConfig(map_shape=(16, 24), seed=3))
    result = index(smap.patterns, detector=DETECTOR_MAP, master_pattern=master,
                   config=IndexConfig(resolution=3.0))
    record = result.details["pc_field"]
    assert record["status"] == "fitted" and max(record["gradient_z"]) < 3
    assert max(record["spread"]) <= 5e-4
    assert np.abs(np.subtract(record["pc_at_map_centre"], DETECTOR_MAP.pc)).max() < 3e-3


def test_gradient_standard_errors_match_their_scatter_over_noise():
    """The sandwich standard errors of the field's gradients predict how much the fitted
    gradients scatter between independent sets of noisy calibration patterns."""
    from dataclasses import replace

    from orix.quaternion import Rotation

    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import prepare_patterns
    from dpm.refine import refinement_master
    from dpm.synthetic import camera_patterns, random_quaternions

    truth = pattern_centre_field(DETECTOR, centre=(14.5, 9.5), step=STEP)
    rmaster = refinement_master(shipped_master_pattern("li", 20), DETECTOR)
    x, y, _ = _calibration(truth, (0.0, 0.0, 0.0))
    centre = replace(DETECTOR, pc=tuple(truth.at(np.array(14.5), np.array(9.5))))
    slopes, errors = [], []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        q = random_quaternions(len(x), rng)
        images = np.concatenate([
            camera_patterns(rmaster.master, replace(DETECTOR, pc=tuple(pc)), qi[None],
                            supersample=1).reshape(1, -1)
            for qi, pc in zip(q, truth.at(x, y))])
        noisy = rng.poisson(300 * (1 + images - images.min(axis=1, keepdims=True)))
        patterns, _ = prepare_patterns(noisy.astype(np.float32))
        turn = Rotation.from_axes_angles(rng.normal(size=(len(x), 3)), 1.0, degrees=True)
        fit = calibrate_pattern_centre_field(patterns, (turn * Rotation(q)).data, x, y,
                                             rmaster, centre,
                                             config=PCFieldConfig(significance=0.0))
        params = np.array([fit.field.gradient[0, 0], fit.field.gradient[1, 1]])
        slopes.append(params)
        errors.append(np.abs(params) / fit.gradient_z)
    scatter = np.std(slopes, axis=0, ddof=1)
    predicted = np.median(errors, axis=0)     # measured ratios 0.86 and 1.13
    assert np.all((0.5 < scatter / predicted) & (scatter / predicted < 2.0)), (scatter, predicted)


def test_calibration_takes_the_band_contrast_the_file_stores():
    """With band contrast in the file (as Oxford's), the calibration patterns are the
    pixels the file says diffract best, one per window, and the map keeps the file's
    band contrast."""
    from dataclasses import replace

    from dpm.calibration import calibration_windows
    from dpm.io.readers import as_pattern_stack
    from dpm.master import simulate_master_pattern
    from dpm.pipeline import IndexConfig, index
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = simulate_master_pattern("li", kv=20, npx=80, method="kinematical")
    detector = Detector(shape=(30, 30), pc=(0.5, 0.3, 0.6), sample_tilt=70)
    smap = synthetic_map(master, detector, SyntheticConfig(map_shape=(8, 12), supersample=1,
                                                           pore_fraction=0.0, seed=2))
    stored = np.full((8, 12), 5.0, dtype=np.float32)      # "does not diffract" ...
    expected = []
    for k, (r0, r1, c0, c1) in enumerate(calibration_windows((8, 12), (4, 4), 2)):
        r, c = r0 + k % (r1 - r0), c0 + (k // 2) % (c1 - c0)   # ... but one pixel per window
        stored[r, c] = 100.0 + k
        expected.append([r, c])
    stack = replace(as_pattern_stack(smap.patterns), band_contrast=stored)
    config = IndexConfig(resolution=10.0, calibration=replace(IndexConfig().calibration,
                                                              grid=(4, 4), window=2))
    result = index(stack, detector=detector, master_pattern=master, config=config)
    assert result.details["pc_field"]["calibration_pixels"] == expected
    np.testing.assert_array_equal(result.band_contrast, stored)


# --- no PC known: the search -------------------------------------------------------------

def test_index_without_a_pc_finds_it_in_the_search_box(drifting_map, drifting_runs):
    """No detector given and a box whose centre is 0.04 off the true map-centre PC in
    every component: the PC found is within 0.005 of the truth, and the calibrated field
    and the orientations are those of the run given the map-centre PC."""
    from dpm.calibration import PCSearchConfig
    from dpm.pipeline import IndexConfig, _field_of, index

    master, smap = drifting_map
    ny, nx = smap.diffracting.shape
    box = PCSearchConfig(centre=(0.53, 0.23, 0.62))     # truth (0.49, 0.27, 0.58)
    searched = index(smap.patterns, master_pattern=master,
                     config=IndexConfig(resolution=3.0, pc_search=box))
    given = drifting_runs["field"]
    record = searched.details["pc_search"]
    assert record["box_centre"] == list(box.centre) and sum(record["converged"]) >= 3
    pixels = np.asarray(record["pixels"])
    truth = smap.pcs.reshape(ny, nx, 3)[pixels[:, 0], pixels[:, 1]].mean(axis=0)
    assert np.abs(np.subtract(record["pc"], truth)).max() < 5e-3, (record["pc"], truth)
    assert searched.config.pc_search == box
    assert searched.details["run"]["pc"] == record["pc"]
    y, x = np.indices((ny, nx))
    fields = [_field_of(r.details["pc_field"]).at(x, y) for r in (searched, given)]
    # the joint fits start from other PCs: 0.0004 apart measured, each 0.0015 from the truth
    assert np.abs(fields[0] - fields[1]).max() < 1e-3
    assert np.abs(fields[0].reshape(-1, 3) - smap.pcs).max() < 3e-3
    errors = [_median_error(r, smap) for r in (searched, given)]
    assert abs(errors[0] - errors[1]) < 0.01, errors


def test_a_pc_outside_the_search_box_is_not_found():
    """Patterns of the drifting map's PC searched in a box 0.1 away: the search says it
    found none in that box, instead of returning its edge."""
    from dpm.calibration import PCSearchConfig, search_pattern_centre
    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import prepare_patterns
    from dpm.synthetic import camera_patterns, random_quaternions

    master = shipped_master_pattern("li", 20)
    rng = np.random.default_rng(4)
    q = random_quaternions(12, rng)
    images = camera_patterns(master, DETECTOR_MAP, q, supersample=1).reshape(12, -1)
    patterns, _ = prepare_patterns(rng.poisson(300 * (1 + images - images.min())).astype(
        np.float32))
    box = PCSearchConfig(centre=(0.5, 0.37, 0.48), half_width=0.03, binnings=(2, 1))
    with pytest.raises(ValueError, match="search box"):
        search_pattern_centre(patterns, q, master, DETECTOR_MAP, config=box)


@pytest.mark.parametrize("kwargs, message", [
    ({"centre": (0.5, 0.5)}, "three finite"), ({"half_width": 0.0}, "half_width"),
    ({"centre": (0.5, 0.5, 0.03)}, "PCz"), ({"binnings": ()}, "binnings"),
    ({"patterns": 0}, "patterns")])
def test_pc_search_config_errors(kwargs: dict, message: str):
    from dpm.calibration import PCSearchConfig

    with pytest.raises(ValueError, match=message):
        PCSearchConfig(**kwargs)


@pytest.mark.slow    # ~20 s: the refinement kernel through the host shim, twice per pyramid level
def test_pc_search_on_the_gpu_path_equals_numpy(gpu_standin):
    """The search on device arrays (the CuPy stand-in running the refinement kernel
    through the host shim) finds the PC the NumPy path finds, near the truth."""
    from dataclasses import replace

    from orix.quaternion import Rotation

    from dpm.calibration import PCSearchConfig, search_pattern_centre
    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import prepare_patterns
    from dpm.synthetic import camera_patterns, random_quaternions

    master = shipped_master_pattern("li", 20)
    detector = Detector(shape=(30, 30), pc=(0.52, 0.47, 0.53), sample_tilt=70.0)
    rng = np.random.default_rng(8)
    q = random_quaternions(6, rng)
    images = camera_patterns(master, detector, q, supersample=1).reshape(6, -1)
    patterns, _ = prepare_patterns(rng.poisson(500 * (1 + images - images.min())).astype(
        np.float32))
    starts = (Rotation.from_axes_angles(rng.normal(size=(6, 3)), 2.0, degrees=True)
              * Rotation(q)).data
    box = PCSearchConfig(half_width=0.04, binnings=(2, 1))
    host = search_pattern_centre(patterns, starts, master, replace(detector, pc=box.centre),
                                 config=box)
    device = search_pattern_centre(gpu_standin.asarray(patterns), starts, master,
                                   replace(detector, pc=box.centre), config=box)
    assert np.abs(host.pc - np.asarray(detector.pc)).max() < 3e-3, host.pc
    np.testing.assert_allclose(device.pc, host.pc, atol=1e-5)
    np.testing.assert_array_equal(device.converged, host.converged)
