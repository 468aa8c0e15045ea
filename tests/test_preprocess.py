"""Preprocessing steps against SciPy and kikuchipy, and the chunked stage against itself."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from dpm import backend
from dpm import preprocess as pp
from dpm.detector import Detector
from dpm.io.readers import PatternStack, as_pattern_stack

MAP = (5, 6)
SHAPE = (16, 20)


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """A (5, 6, 16, 20) float32 map: smooth background, bands, noise; all positive."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    background = 100 + 60 * np.exp(-((x - 9) ** 2 + (y - 5) ** 2) / 120)
    bands = 20 * np.cos(0.6 * x[None, None] + rng.uniform(0, 6, MAP + (1, 1)) * y[None, None] / 8)
    return (background + bands + 5 * rng.standard_normal(MAP + SHAPE)).astype(np.float32)


def _ebsd(data: np.ndarray):
    """A kikuchipy EBSD signal of a copy of ``data``."""
    import kikuchipy as kp

    return kp.signals.EBSD(data.copy())


def _flat(a) -> np.ndarray:
    return backend.to_host(a).reshape(-1, *backend.to_host(a).shape[-2:])


def _on_device(xp, out) -> bool:
    return backend.is_device_array(out) == (xp is not np)


class TestGaussianBlur:
    @pytest.mark.parametrize("sigma", [0.6, 2.0, 6.0])
    def test_matches_scipy_gaussian_filter(self, xp, raw, sigma):
        p = raw[0]
        out = pp.gaussian_blur(xp.asarray(p), sigma)
        expected = np.stack([ndi.gaussian_filter(q, sigma) for q in p])
        assert _on_device(xp, out) and out.dtype == np.float32
        np.testing.assert_allclose(backend.to_host(out), expected, rtol=1e-5, atol=1e-4)

    def test_kernel_wider_than_pattern_reflects_like_scipy(self):
        p = np.arange(5 * 7, dtype=np.float32).reshape(1, 5, 7)
        np.testing.assert_allclose(pp.gaussian_blur(p, 3.0)[0], ndi.gaussian_filter(p[0], 3.0),
                                   rtol=1e-5, atol=1e-5)

    def test_matrices_are_cached(self):
        assert pp._gaussian_matrix(20, 1.5) is pp._gaussian_matrix(20, 1.5)

    def test_nonpositive_sigma_is_rejected(self, raw):
        with pytest.raises(ValueError, match="sigma"):
            pp.gaussian_blur(raw[0], 0.0)


class TestStaticBackground:
    @pytest.mark.parametrize("operation", ["subtract", "divide"])
    def test_matches_kikuchipy(self, xp, raw, operation):
        bg = raw.mean(axis=(0, 1)).astype(np.float32)
        s = _ebsd(raw)
        s.remove_static_background(operation=operation, static_bg=bg, show_progressbar=False)
        out = pp.remove_static_background(xp.asarray(raw.reshape(-1, *SHAPE)), bg, operation)
        assert _on_device(xp, out)
        # kikuchipy stretches float32 patterns to [-1, 1], dpm to [0, 1]
        np.testing.assert_allclose(2 * _flat(out) - 1, _flat(s.data), atol=2e-6)

    def test_wrong_background_shape_names_both(self, raw):
        with pytest.raises(ValueError, match=r"\(16, 19\) differs from the pattern shape \(16, 20\)"):
            pp.remove_static_background(raw[0], np.ones((16, 19)))


class TestSmoothedMeanBackground:
    def test_a_linear_background_is_kept_to_its_edges(self):
        rows, cols = np.mgrid[0:40, 0:50]
        ramp = 100.0 + 0.8 * cols - 0.5 * rows
        np.testing.assert_allclose(pp.smooth_background(ramp, 4.0), ramp, atol=1e-9)

    def test_a_band_is_damped_as_the_gaussian_predicts(self):
        # A one-pixel line of height h on a flat background: the filter leaves h / (σ √(2π))
        # on the line (the kernel's centre value; scipy normalises the truncated taps).
        image = np.full((41, 41), 50.0)
        image[:, 20] += 10.0
        sigma = 3.0
        taps = np.exp(-0.5 * (np.arange(-12, 13) / sigma) ** 2)
        out = pp.smooth_background(image, sigma)
        np.testing.assert_allclose(out[:, 20] - 50.0, 10.0 / taps.sum(), rtol=1e-6)
        np.testing.assert_array_equal(pp.smooth_background(image, 0), image)

    def test_too_wide_a_sigma_is_named(self):
        with pytest.raises(ValueError, match="mean_sigma 5 px reaches 20 px"):
            pp.smooth_background(np.ones((16, 20)), 5.0)

    def test_mean_of_a_few_grain_map_loses_its_bands(self):
        """The smoothed mean (width / 15) of a few-grain map is closer to the camera's true
        static background (known to the synthetic map) than the raw mean, which keeps the
        bands."""
        from dpm.master.shipped import shipped_master_pattern
        from dpm.synthetic import SyntheticConfig, synthetic_map

        smap = synthetic_map(shipped_master_pattern("li", 20.0),
                             Detector(shape=(40, 40), pc=(0.5, 0.45, 0.55)),
                             SyntheticConfig(map_shape=(12, 24), grain_width=3.0, seed=4))
        stack = as_pattern_stack(smap.patterns)
        truth = smap.static_background
        raw_mean = pp.resolve_static_background(stack, pp.PreprocessConfig(mean_sigma=0))
        smooth = pp.resolve_static_background(stack, pp.PreprocessConfig(mean_sigma=None))
        np.testing.assert_allclose(raw_mean, smap.patterns.reshape(-1, 40, 40).mean(0),
                                   rtol=1e-5)
        rms = [np.sqrt(np.mean((b / b.mean() - truth / truth.mean()) ** 2))
               for b in (raw_mean, smooth)]
        assert rms[1] < 0.5 * rms[0], rms

    def test_a_given_mean_is_not_smoothed_again(self, raw):
        bg = raw.mean(axis=(0, 1))
        out = pp.resolve_static_background(as_pattern_stack(raw),
                                           pp.PreprocessConfig(mean_sigma=2.0), background=bg)
        np.testing.assert_allclose(out, bg, rtol=1e-6)


class TestBinning:
    @pytest.mark.parametrize("mode", ["sum", "mean"])
    def test_matches_strided_block_sums(self, xp, raw, mode):
        p = raw[0]
        out = pp.bin_patterns(xp.asarray(p), 4, mode)
        blocks = sum(p[:, i::4, j::4].astype(np.float64) for i in range(4) for j in range(4))
        assert _on_device(xp, out) and out.shape == (6, 4, 5)
        np.testing.assert_allclose(backend.to_host(out), blocks / (16 if mode == "mean" else 1),
                                   rtol=1e-6)

    def test_indivisible_shape_names_shape_and_factor(self, raw):
        with pytest.raises(ValueError, match=r"pattern shape \(16, 20\) is not divisible by "
                                             r"the binning factor 3"):
            pp.bin_patterns(raw[0], 3)

    def test_binned_detector_keeps_the_physical_pattern_centre(self):
        det = Detector((60, 80), pc=(0.42, 0.21, 0.55), binning=2, px_size=50.0)
        binned = pp.binned_detector(det.to_kikuchipy(), 4)
        assert binned.shape == (15, 20) and binned.binning == 8 and binned.pc == det.pc
        # the EMsoft PC is in unbinned pixels and microns: binning must not change it
        np.testing.assert_allclose(binned.pc_in("emsoft"), det.pc_in("emsoft"))

    def test_mask_bins_to_blocks_fully_inside(self):
        mask = np.ones(SHAPE, bool)
        mask[0, 0] = False
        binned = pp.bin_mask(mask, 4)
        assert binned.shape == (4, 5) and not binned[0, 0] and binned.sum() == 19
        mask[::4, ::4] = False  # one hidden pixel in every 4 x 4 block
        with pytest.raises(ValueError, match="hides every detector pixel"):
            pp.bin_mask(mask, 4)


class TestDynamicBackground:
    @pytest.mark.parametrize("operation, sigma", [("subtract", 2.5), ("divide", None)])
    def test_matches_kikuchipy_spatial_domain(self, xp, raw, operation, sigma):
        s = _ebsd(raw)
        s.remove_dynamic_background(operation=operation, filter_domain="spatial", std=sigma,
                                    show_progressbar=False)
        out = pp.remove_dynamic_background(xp.asarray(raw.reshape(-1, *SHAPE)), sigma, operation)
        assert _on_device(xp, out)
        np.testing.assert_allclose(2 * _flat(out) - 1, _flat(s.data), atol=5e-6)


class TestNeighbourAveraging:
    def test_matches_kikuchipy_gaussian_window(self, xp, raw):
        s = _ebsd(raw)
        s.average_neighbour_patterns(window="gaussian", window_shape=(5, 5), std=1.3,
                                     show_progressbar=False)
        out = pp.average_neighbour_patterns(xp.asarray(raw), 1.3, truncate=1.2)  # radius 2
        assert _on_device(xp, out)
        # kikuchipy stretches the averages to [-1, 1]
        np.testing.assert_allclose(_flat(pp.rescale_intensity(_flat(out), (-1, 1))),
                                   _flat(s.data), atol=5e-6)

    def test_excluded_patterns_take_no_weight(self, xp, raw):
        readable = np.ones(MAP, bool)
        readable[0, 0] = readable[2, 3] = readable[2, 4] = False
        out = backend.to_host(pp.average_neighbour_patterns(xp.asarray(raw), 1.0,
                                                            readable=xp.asarray(readable)))
        expected = np.empty_like(raw, dtype=np.float64)
        for r, c in np.ndindex(*MAP):  # brute force: sum w P / sum w over the 5 x 5 window
            num, den = 0.0, 0.0
            for dr, dc in np.ndindex(5, 5):
                rr, cc = r + dr - 2, c + dc - 2
                if 0 <= rr < MAP[0] and 0 <= cc < MAP[1] and readable[rr, cc]:
                    w = np.exp(-((dr - 2) ** 2 + (dc - 2) ** 2) / 2)
                    num, den = num + w * raw[rr, cc], den + w
            expected[r, c] = num / den
        np.testing.assert_allclose(out, expected, rtol=1e-5)


class TestRescaleIntensity:
    def test_matches_kikuchipy(self, xp, raw):
        s = _ebsd(raw)
        s.rescale_intensity(out_range=(0.2, 3.0), show_progressbar=False)
        out = pp.rescale_intensity(xp.asarray(raw.reshape(-1, *SHAPE)), (0.2, 3.0))
        assert _on_device(xp, out)
        np.testing.assert_allclose(_flat(out), _flat(s.data), atol=2e-6)


class TestMasks:
    def test_circular_mask_is_the_inscribed_circle(self):
        mask = pp.circular_mask((60, 80))
        assert mask[30, 40] and mask[0, 40] and mask[30, 10] and not mask[30, 9]
        assert not mask[0, 0] and mask.sum() == pytest.approx(np.pi * 30**2, rel=0.02)
        assert pp.circular_mask((60, 80), radius=10).sum() == pytest.approx(np.pi * 100, rel=0.05)

    def test_circular_mask_without_pixels_is_an_error(self):
        with pytest.raises(ValueError, match="hides every detector pixel"):
            pp.circular_mask((4, 4), radius=0.5)

    def test_mask_from_png_and_npy(self, tmp_path):
        from matplotlib.image import imsave

        image = np.zeros(SHAPE)
        image[4:12, 5:15] = 1.0
        imsave(tmp_path / "mask.png", image, cmap="gray", vmin=0, vmax=1)
        np.save(tmp_path / "mask.npy", (image * 255).astype(np.uint8))
        for name in ("mask.png", "mask.npy"):
            mask = pp.mask_from_image(tmp_path / name, shape=SHAPE)
            assert np.array_equal(mask, image > 0.5)

    def test_bad_mask_images_are_named(self, tmp_path):
        np.save(tmp_path / "small.npy", np.ones((4, 4)))
        with pytest.raises(ValueError, match=r"small\.npy: mask shape \(4, 4\) differs from the "
                                             r"pattern shape \(16, 20\)"):
            pp.mask_from_image(tmp_path / "small.npy", shape=SHAPE)
        np.save(tmp_path / "stack.npy", np.ones((2, 4, 4)))
        with pytest.raises(ValueError, match=r"stack\.npy: expected a 2-D .* shape \(2, 4, 4\)"):
            pp.mask_from_image(tmp_path / "stack.npy")
        with pytest.raises(ValueError, match="hides every detector pixel"):
            pp.mask_from_image(np.zeros(SHAPE))
        with pytest.raises(FileNotFoundError, match="missing.png"):
            pp.mask_from_image(tmp_path / "missing.png")
        with pytest.raises(ValueError, match=r"\.tif: a mask image must be a \.png or \.npy"):
            (tmp_path / "mask.tif").write_bytes(b"")
            pp.mask_from_image(tmp_path / "mask.tif")

    def test_shadow_mask_finds_a_known_shadow(self):
        rng = np.random.default_rng(1)
        y, x = np.mgrid[:80, :100].astype(float)
        illumination = 1000 * np.exp(-((x - 50) ** 2 / 4050 + (y - 30) ** 2 / 5000)) + 200
        edge = 55 + 0.004 * (x - 50) ** 2  # a curved shadow along the bottom edge
        shadow = 1 - 0.88 / (1 + np.exp(-(y - edge)))
        bg = illumination * shadow * (1 + 0.03 * rng.standard_normal(y.shape))
        bg[rng.integers(0, 50, 6), rng.integers(0, 100, 6)] = 0  # dead pixels are not shadow
        found, truth = ~pp.shadow_mask(bg), y > edge
        assert (found & truth).sum() / (found | truth).sum() > 0.95

    def test_dark_background_is_an_error(self):
        with pytest.raises(ValueError, match="no illuminated pixel"):
            pp.shadow_mask(np.zeros((20, 20)))


FULL = pp.PreprocessConfig(binning=2, dynamic_background=True, gaussian_sigma=0.8,
                           neighbour_sigma=1.0, rescale=True)


def _run(stack, config, xp, chunk_size, **kwargs):
    """(n, sy', sx') host patterns and (n,) readable from the chunked stage."""
    n = stack.map_shape[0] * stack.map_shape[1]
    patterns, readable, starts = None, np.zeros(n, bool), []
    for start, p, ok in pp.preprocess_stack(stack, config, xp=xp, chunk_size=chunk_size, **kwargs):
        assert _on_device(xp, p) and p.dtype == np.float32 and ok.dtype == bool
        if patterns is None:
            patterns = np.full((n, *p.shape[1:]), np.nan, np.float32)
        patterns[start:start + len(p)] = backend.to_host(p)
        readable[start:start + len(p)] = ok
        starts.append(start)
    assert starts == sorted(starts)
    return patterns, readable


class TestPreprocessStack:
    def test_small_chunks_equal_one_chunk(self, xp, raw):
        data = raw.copy()
        data[1, 2] = 7.0  # a constant pattern: unreadable, excluded from mean and averages
        stack = as_pattern_stack(data)
        whole, readable = _run(stack, FULL, np, chunk_size=30)
        assert whole.shape == (30, 8, 10) and not np.isnan(whole).any()
        assert np.flatnonzero(~readable).tolist() == [8] and not whole[8].any()
        for chunk_size in (1, 4, 6, 13):  # row segments with column halos, then whole rows
            chunked, ok = _run(stack, FULL, xp, chunk_size)
            np.testing.assert_array_equal(ok, readable)
            np.testing.assert_allclose(chunked, whole, atol=2e-6)

    def test_steps_compose_as_kikuchipy_does(self, raw):
        s = _ebsd(raw)
        s.remove_static_background(static_bg=raw.mean(axis=(0, 1)), show_progressbar=False)
        s = s.rebin(scale=(1, 1, 2, 2))
        s.remove_dynamic_background(filter_domain="spatial", std=1.5, show_progressbar=False)
        s.average_neighbour_patterns(window="gaussian", window_shape=(3, 3), std=1.0,
                                     show_progressbar=False)
        config = pp.PreprocessConfig(mean_sigma=0, binning=2, dynamic_background=True,
                                     dynamic_sigma=1.5, neighbour_sigma=1.0,
                                     neighbour_truncate=1.0, rescale=True,
                                     rescale_range=(-1, 1))
        out, _ = _run(as_pattern_stack(raw), config, np, chunk_size=7)
        np.testing.assert_allclose(out, _flat(s.data), atol=2e-5)

    def test_dask_and_memory_mapped_stacks(self, raw, tmp_path):
        import dask.array as da

        np.save(tmp_path / "raw.npy", raw)
        expected, _ = _run(as_pattern_stack(raw), FULL, np, chunk_size=12)
        for data in (da.from_array(raw, chunks=(2, 3, 16, 20)), np.load(tmp_path / "raw.npy",
                                                                         mmap_mode="r")):
            np.testing.assert_allclose(_run(as_pattern_stack(data), FULL, np, 12)[0], expected)

    def test_given_background_from_the_call_or_the_file(self, raw):
        bg = raw.mean(axis=(0, 1)) * 0.9
        given = pp.PreprocessConfig(static_background="given")
        from_call, _ = _run(as_pattern_stack(raw), given, np, 8, background=bg)
        from_file, _ = _run(PatternStack(data=raw, static_background=bg), given, np, 8)
        expected = pp.remove_static_background(raw.reshape(-1, *SHAPE), bg)
        np.testing.assert_allclose(from_call, expected)
        np.testing.assert_allclose(from_file, expected)
        with pytest.raises(ValueError, match="neither the call nor the file"):
            pp.preprocess_stack(as_pattern_stack(raw), given)
        with pytest.raises(ValueError, match=r"\(4, 4\) differs from the pattern shape \(16, 20\)"):
            pp.preprocess_stack(as_pattern_stack(raw), given, background=np.ones((4, 4)))

    def test_nan_pattern_is_named(self, raw):
        bad = raw.copy()
        bad[3, 4, 2, 2] = np.inf
        with pytest.raises(ValueError, match=r"pattern 22 \(row 3, column 4\) holds NaN"):
            _run(as_pattern_stack(bad), pp.PreprocessConfig(neighbour_sigma=1.0), np, 6)

    def test_all_constant_is_an_error(self):
        stack = as_pattern_stack(np.full((2, 3, 4, 4), 5.0, np.float32))
        with pytest.raises(ValueError, match="every pattern is constant"):
            pp.preprocess_stack(stack)
        with pytest.raises(ValueError, match="every pattern is constant"):
            _run(stack, pp.PreprocessConfig(static_background="none"), np, 2)

    def test_bad_masks_and_binning_fail_at_the_call(self, raw):
        stack = as_pattern_stack(raw)
        with pytest.raises(ValueError, match="signal mask hides every detector pixel"):
            pp.preprocess_stack(stack, mask=np.zeros(SHAPE, bool))
        with pytest.raises(ValueError, match=r"mask shape \(8, 10\) differs from the pattern "
                                             r"shape \(16, 20\)"):
            pp.preprocess_stack(stack, mask=np.ones((8, 10), bool))
        with pytest.raises(ValueError, match="not divisible by the binning factor 3"):
            pp.preprocess_stack(stack, pp.PreprocessConfig(binning=3))


class TestPreprocessConfig:
    @pytest.mark.parametrize("field", ["dynamic_sigma", "gaussian_sigma", "neighbour_sigma"])
    @pytest.mark.parametrize("value", [0, -1.0, float("nan")])
    def test_nonpositive_sigma_is_rejected_at_construction(self, field, value):
        with pytest.raises(ValueError, match=field):
            pp.PreprocessConfig(**{field: value})

    @pytest.mark.parametrize("fields", [{"binning": 0}, {"binning": 1.5}, {"operation": "add"},
                                        {"rescale_range": (1, 0)}, {"neighbour_truncate": 0},
                                        {"mean_sigma": -1}, {"mean_sigma": float("inf")},
                                        {"mean_sigma": True}])
    def test_bad_values_are_rejected(self, fields):
        with pytest.raises(ValueError):
            pp.PreprocessConfig(**fields)

    def test_steps_lists_what_is_applied_in_order(self):
        import json

        assert pp.PreprocessConfig(static_background="none").steps() == []
        config = pp.PreprocessConfig(binning=2, dynamic_background=True, gaussian_sigma=1,
                                     neighbour_sigma=1.0, rescale=True, rescale_range=[0, 255])
        steps = config.steps(pattern_shape=(60, 80))
        assert [s["step"] for s in steps] == [
            "static_background", "binning", "dynamic_background", "gaussian_filter",
            "neighbour_averaging", "rescale_intensity"]
        assert steps[2]["sigma"] == 5.0 and steps[4]["radius"] == 2
        assert steps[0]["smoothing_sigma"] == 0.0
        assert pp.PreprocessConfig(mean_sigma=None).steps((60, 80))[0]["smoothing_sigma"] == 80 / 15
        assert steps[5]["range"] == [0.0, 255.0] and config.rescale_range == (0.0, 255.0)
        json.dumps(steps)


def test_unreadable_patterns_do_not_warn_twice(raw, caplog):
    """prepare_stack: one warning for the unreadable patterns, none per chunk."""
    from dpm.pipeline import IndexConfig, prepare_stack

    data = raw.copy()
    data[0, :3] = 1.0
    det = Detector(SHAPE, pc=(0.5, 0.5, 0.5))
    config = IndexConfig(chunk_size=6, preprocess=pp.PreprocessConfig(binning=2))
    with caplog.at_level("WARNING", logger="dpm"):
        rows, readable = prepare_stack(as_pattern_stack(data), det, mask=pp.circular_mask(SHAPE),
                                       config=config, background=None, xp=np)
    assert rows.shape == (30, int(pp.bin_mask(pp.circular_mask(SHAPE), 2).sum()))
    assert readable.tolist() == [False] * 3 + [True] * 27 and not rows[:3].any()
    np.testing.assert_allclose(np.linalg.norm(rows[3:], axis=1), 1, rtol=1e-5)
    assert len(caplog.records) == 1 and "3 unreadable patterns" in caplog.messages[0]
