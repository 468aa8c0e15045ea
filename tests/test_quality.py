"""Band contrast and image quality: the Radon GEMM against direct line sums, the noise floor,
realistic Li maps with pores and weak pixels, and kikuchipy's image quality as the oracle."""

import numpy as np
import pytest
from scipy import ndimage

from dpm import backend, quality
from dpm.quality import (BandContrastConfig, band_contrast, pattern_quality, radon_matrix,
                         radon_transform)


def _direct_radon(image: np.ndarray, theta_step: float, rho_fraction: float) -> np.ndarray:
    """Oracle: the sum of every line over every pixel of the disc, one loop per index."""
    sy, sx = image.shape
    radius = min(sy, sx) / 2
    half = int(np.floor(rho_fraction * radius))
    thetas = np.deg2rad(np.arange(0.0, 180.0, theta_step))
    out = np.zeros((len(thetas), 2 * half + 1))
    for row in range(sy):
        for col in range(sx):
            x, y = col + 0.5 - sx / 2, row + 0.5 - sy / 2
            if x * x + y * y > radius * radius:
                continue
            for k, t in enumerate(thetas):
                rho = x * np.cos(t) + y * np.sin(t)
                for j in range(-half, half + 1):
                    out[k, j + half] += max(0.0, 1.0 - abs(rho - j)) * image[row, col]
    return out


def _band_patterns(n: int, amplitude: float, seed: int, size: int = 60) -> np.ndarray:
    """Unit white noise plus six straight bands (Gaussian profile, σ = 0.8 px) per pattern."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    out = rng.normal(size=(n, size, size))
    for pattern in out:
        for t, rho in zip(rng.uniform(0, np.pi, 6), rng.uniform(-18, 18, 6)):
            pattern += amplitude * np.exp(-0.5 * ((c * np.cos(t) + r * np.sin(t) - rho) / 0.8) ** 2)
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def li_map():
    """A 12 x 12 Li map (60 x 60 px raw patterns, realistic noise) with pores and weak pixels."""
    from dpm.detector import Detector
    from dpm.master.shipped import shipped_master_pattern
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = shipped_master_pattern("li", 20)
    config = SyntheticConfig(map_shape=(12, 12), grain_width=3.0, pore_fraction=0.1,
                             weak_fraction=0.3, seed=0)
    return synthetic_map(master, Detector((60, 60), pc=(0.5, 0.5, 0.6)), config)


class TestRadonTransform:
    def test_gemm_matches_direct_line_sums(self, xp):
        image = np.random.default_rng(0).normal(size=(20, 21)).astype(np.float32)
        sino = radon_transform(xp.asarray(image[None]), theta_step=10.0, rho_fraction=0.9)
        assert backend.is_device_array(sino) == (xp is not np)
        np.testing.assert_allclose(backend.to_host(sino)[0], _direct_radon(image, 10.0, 0.9),
                                   atol=1e-4)

    def test_known_line_peaks_at_its_angle_and_offset(self, xp):
        size, theta, rho = 41, 30.0, 5
        r, c = np.mgrid[0:size, 0:size] + 0.5 - size / 2
        t = np.deg2rad(theta)
        image = (np.abs(c * np.cos(t) + r * np.sin(t) - rho) < 0.5).astype(np.float32)
        sino = backend.to_host(radon_transform(xp.asarray(image[None])))[0]
        half = sino.shape[1] // 2
        assert np.unravel_index(sino.argmax(), sino.shape) == (int(theta / 2), half + rho)

    def test_matches_rotated_column_sums(self):
        # independent interpolation: rotating by θ turns the lines of normal θ into columns
        size = 41
        image = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(size, size)), 2)
        r, c = np.mgrid[0:size, 0:size] - size // 2
        image = (image * (r**2 + c**2 <= (size / 2) ** 2)).astype(np.float32)
        sino = radon_transform(image[None], theta_step=15.0, rho_fraction=0.9)[0]
        half = sino.shape[1] // 2
        for k, theta in enumerate(range(0, 180, 15)):
            columns = ndimage.rotate(image, theta, reshape=False, order=3).sum(axis=0)
            profile = columns[size // 2 - half:size // 2 + half + 1]
            assert np.corrcoef(profile, sino[k])[0, 1] > 0.99, theta

    def test_mask_removes_pixels(self):
        mask = np.ones((20, 20), dtype=bool)
        mask[12:] = False
        matrix = radon_matrix((20, 20), mask=mask).reshape(-1, 20, 20)
        assert not matrix[:, 12:].any() and matrix[:, :12].any()


class TestBandContrast:
    def test_pure_noise_is_at_most_10(self, xp):
        noise = np.random.default_rng(1).normal(size=(64, 60, 60)).astype(np.float32)
        bc = band_contrast(xp.asarray(noise))
        assert backend.is_device_array(bc) == (xp is not np) and bc.dtype == np.float32
        bc = backend.to_host(bc)
        assert bc.shape == (64,) and bc.max() <= 10 and np.median(bc) == 0
        # offset and scale of the pattern do not matter
        shifted = backend.to_host(band_contrast(xp.asarray(1000 * noise + 50)))
        np.testing.assert_allclose(shifted, bc, atol=0.05)

    def test_clear_bands_score_high_and_grow_with_contrast(self, xp):
        amplitudes = [1.0, 1.5, 2.0, 3.0, 4.0]
        medians = [np.median(backend.to_host(band_contrast(xp.asarray(_band_patterns(8, a, 2)))))
                   for a in amplitudes]
        assert np.all(np.diff(medians) > 0), medians
        assert medians[0] < 10 < medians[1] and medians[-1] > 60

    def test_li_map_pores_weak_and_normal_pixels(self, xp, li_map):
        raw = li_map.patterns.astype(np.float32)
        bc = backend.to_host(band_contrast(xp.asarray(raw - li_map.static_background)))
        pores = ~li_map.diffracting.ravel()
        weak = li_map.weak.ravel()
        normal = ~pores & ~weak
        assert pores.sum() >= 10 and weak.sum() >= 20
        assert bc[pores].max() <= 10
        assert (bc[weak] > 10).mean() >= 0.95
        assert bc[normal].min() > 10 and np.median(bc[normal]) > 30
        assert np.median(bc[normal]) > np.median(bc[weak]) > bc[pores].max()

    @pytest.mark.parametrize("window", [(2, 2), (1, 3), (3, 0)])
    def test_numba_band_peaks_equal_the_array_path(self, li_map, window):
        """Steps 5-6 on the CPU (numba, per pattern) and as array operations (the GPU
        path): the same band-peak heights for Li patterns, noise and tied values."""
        from dpm.quality import _band_peaks, _band_peaks_numba, _device_operator

        raw = li_map.patterns.astype(np.float32)
        work = (raw - li_map.static_background).reshape(-1, 3600)[:40]
        rng = np.random.default_rng(4)
        noise = rng.normal(size=(20, 3600)).astype(np.float32)
        lines = quality._working_lines((60, 60), quality._binning((60, 60), 60), None,
                                       BandContrastConfig())
        operator, used, n_theta, n_rho = _device_operator(lines, np)
        d = np.concatenate([work, noise]) @ operator
        tied = np.round(d[:5] * 2) / 2                  # many equal values
        for contrasts in (d, tied, np.zeros((2, d.shape[1]), np.float32)):
            contrasts = np.ascontiguousarray(contrasts, dtype=np.float32)
            expected = _band_peaks(np, contrasts, n_theta, n_rho, *window, 6)
            got = np.empty(len(contrasts), dtype=np.float32)
            _band_peaks_numba(contrasts, n_theta, n_rho, *window, 6, got)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def test_chunks_and_map_shape_do_not_change_the_result(self, xp):
        patterns = _band_patterns(6, 2.0, 3).reshape(2, 3, 60, 60)
        whole = backend.to_host(band_contrast(xp.asarray(patterns)))
        small = BandContrastConfig(memory_budget=250_000)  # one or two patterns per chunk
        chunked = backend.to_host(band_contrast(xp.asarray(patterns.reshape(6, 60, 60)),
                                                config=small))
        assert whole.shape == (6,)
        np.testing.assert_allclose(chunked, whole, atol=1e-3)

    def test_patterns_are_binned_to_the_working_size(self):
        patterns = _band_patterns(4, 2.0, 4)
        large = np.kron(patterns, np.ones((2, 2), np.float32))  # 120 x 120 px, bins back exactly
        np.testing.assert_allclose(band_contrast(large), band_contrast(patterns), atol=1e-2)

    def test_masked_noise_stays_at_most_10(self):
        mask = np.ones((60, 60), dtype=bool)
        mask[40:] = False  # a shadow over the lower third
        noise = np.random.default_rng(5).normal(size=(32, 60, 60)).astype(np.float32)
        noise[:, 40:] *= 0.1
        assert band_contrast(noise, mask=mask).max() <= 10
        with pytest.raises(ValueError, match=r"signal mask shape \(30, 30\) differs from the "
                                             r"pattern shape \(60, 60\)"):
            band_contrast(noise, mask=np.ones((30, 30), dtype=bool))

    def test_dask_and_constant_patterns(self):
        import dask.array as da

        patterns = _band_patterns(4, 2.0, 6)
        patterns[1] = 7.0
        lazy = da.from_array(patterns, chunks=(2, 60, 60))
        bc = band_contrast(lazy)
        np.testing.assert_allclose(bc, band_contrast(patterns))
        assert bc[1] == 0 and (np.delete(bc, 1) > 10).all()

    @pytest.mark.parametrize("kwargs, message", [
        ({"theta_step": 7.0}, "theta_step"),
        ({"rho_fraction": 1.0}, "rho_fraction"),
        ({"n_bands": 0}, "n_bands"),
        ({"working_size": 4}, "working_size"),
    ])
    def test_bad_config(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            BandContrastConfig(**kwargs)

    def test_bad_rank(self):
        with pytest.raises(ValueError, match=r"patterns must have shape .* got shape \(60, 60\)"):
            band_contrast(np.zeros((60, 60), np.float32))


class TestPatternQuality:
    def test_matches_kikuchipy_image_quality(self, xp):
        import kikuchipy as kp

        s = kp.data.nickel_ebsd_small()
        raw_iq = s.get_image_quality()
        s.remove_static_background()
        s.remove_dynamic_background()
        for data, expected in ((s.data, s.get_image_quality()), (kp.data.nickel_ebsd_small().data,
                                                                  raw_iq)):
            iq = pattern_quality(xp.asarray(data))
            assert backend.is_device_array(iq) == (xp is not np) and iq.dtype == np.float32
            np.testing.assert_allclose(backend.to_host(iq), np.ravel(expected), rtol=1e-4)

    def test_odd_shapes_match_kikuchipy(self, xp):
        from kikuchipy.pattern import get_image_quality

        patterns = np.random.default_rng(7).random((3, 7, 10)).astype(np.float32)
        expected = [get_image_quality(p) for p in patterns]
        iq = pattern_quality(xp.asarray(patterns), memory_budget=1000)  # one pattern per chunk
        np.testing.assert_allclose(backend.to_host(iq), expected, rtol=1e-4)

    def test_constant_pattern_is_zero(self, xp):
        iq = backend.to_host(pattern_quality(xp.full((2, 8, 8), 3.0, dtype=xp.float32)))
        np.testing.assert_array_equal(iq, 0.0)
