"""Tests for dpm.compression: the basis against numpy.linalg.svd, matching against
exhaustive dpm.match.match (the oracles), the cache and the config."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import ModuleType

import numpy as np
import pytest
import scipy.linalg

from dpm import backend, compression
from dpm.compression import (CompressionConfig, compress, compression_key, match_compressed,
                             principal_basis)
from dpm.dictionary import Dictionary
from dpm.search import FineRows
from search_data import noisy_patterns_setup

KEEP = 5
#: Settings of the fast tests: a sparser sample than the default.
CONFIG = CompressionConfig(energy=0.9, sample_stride=8)


@pytest.fixture(scope="module")
def li_master_module():
    from dpm.master.shipped import shipped_master_pattern

    return shipped_master_pattern("li", 20)


@pytest.fixture(scope="module")
def setup(li_master_module, tmp_path_factory):
    """The shared noisy-pattern set-up (:mod:`search_data`) and its compressed dictionary
    (cached in a folder of this module)."""
    setup = noisy_patterns_setup(li_master_module, KEEP)
    dictionary = setup["dictionary"]
    mp = pytest.MonkeyPatch()
    mp.setenv("DPM_CACHE_DIR", str(tmp_path_factory.mktemp("compressed-cache")))
    compressed = compress(dictionary, config=CONFIG)
    mp.undo()
    return {**setup, "compressed": compressed}


def _exact_spectrum(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right singular vectors (npix, r) and explained-energy curve of rows, by LAPACK."""
    _, s, vt = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
    return vt.T, np.cumsum(s**2) / (s**2).sum()


class TestPrincipalBasis:
    def test_spans_the_exact_principal_subspace(self, setup, xp: ModuleType) -> None:
        sample = setup["rows"][::16]
        vectors, curve = _exact_spectrum(sample)
        for near in (0.8, 0.9):
            # An energy half-way between two steps of the exact curve, so that the
            # count it needs does not hang on the last digits of the spectrum.
            k = int(np.searchsorted(curve, near) + 1)
            energy = float(curve[k - 2] + curve[k - 1]) / 2
            basis = principal_basis(xp.asarray(sample), config=replace(CONFIG, energy=energy),
                                    xp=xp)
            assert basis.components.shape == (k, sample.shape[1])
            assert type(basis.components) is np.ndarray
            gram = basis.components.astype(np.float64) @ basis.components.T.astype(np.float64)
            np.testing.assert_allclose(gram, np.eye(k), atol=1e-5)
            np.testing.assert_allclose(basis.explained[:k], curve[:k], atol=1e-3)
            # Singular values near the k-th differ by ~0.3 % from their neighbours, so
            # the trailing directions mix; the leading half lies within 1° of the exact
            # k-dimensional subspace, and the exact leading half within 1° of the basis.
            lead = k // 2
            ours, exact = basis.components.T.astype(np.float64), vectors[:, :k]
            assert np.degrees(scipy.linalg.subspace_angles(ours[:, :lead], exact)).max() < 1
            assert np.degrees(scipy.linalg.subspace_angles(exact[:, :lead], ours)).max() < 1
            # The whole basis keeps as much of the rows' energy as the exact one.
            kept = ((sample.astype(np.float64) @ basis.components.T.astype(np.float64)) ** 2).sum()
            assert kept / (sample.astype(np.float64) ** 2).sum() >= curve[k - 1] - 1e-3

    def test_a_pattern_source_gives_the_basis_of_its_rows(self, setup) -> None:
        dictionary = setup["dictionary"]
        few = Dictionary(dictionary.master, dictionary.detector, dictionary.quaternions[::32])
        from_source = principal_basis(few, config=CONFIG)
        from_array = principal_basis(few.chunk(0, len(few)), config=CONFIG)
        np.testing.assert_allclose(from_source.components, from_array.components, atol=1e-5)

    def test_low_rank_rows_need_their_rank_only(self) -> None:
        # 12 directions, far below the first guess of width (npix // 4 = 50) ...
        rng = np.random.default_rng(3)
        rows = (rng.standard_normal((400, 12)) @ rng.standard_normal((12, 200))).astype(np.float32)
        basis = principal_basis(rows, config=CompressionConfig(energy=0.9999, oversampling=4))
        assert basis.components.shape[0] <= 12
        residual = rows - (rows @ basis.components.T) @ basis.components
        assert np.abs(residual).max() < 1e-3 * np.abs(rows).max()
        # ... and a slowly decaying spectrum beyond it: the search widens.
        flat = rng.standard_normal((400, 200)).astype(np.float32)
        wide = principal_basis(flat, config=CompressionConfig(energy=0.95, oversampling=8))
        k_exact = int(np.searchsorted(_exact_spectrum(flat)[1], 0.95) + 1)
        assert abs(wide.components.shape[0] - k_exact) <= 2
        assert wide.components.shape[0] > 50

    def test_rows_without_energy_are_refused(self) -> None:
        with pytest.raises(ValueError, match="no energy"):
            principal_basis(np.zeros((10, 20), np.float32))
        with pytest.raises(TypeError, match="float32"):
            principal_basis(np.ones((10, 20)))


class TestMatchCompressed:
    def test_equals_exhaustive_matching_with_exact_scores(self, setup) -> None:
        compressed, exhaustive = setup["compressed"], setup["exhaustive"]
        assert compressed.n_components < setup["rows"].shape[1] // 2
        # The basis fits the sampled rows (every 8th) a little better than the rest:
        # 0.90 of the sample's energy is 0.88 of the whole dictionary's.
        k = compressed.n_components
        assert CONFIG.energy - 0.03 <= compressed.energy < compressed.explained[k - 1]
        fine = FineRows(setup["dictionary"], np, capacity=2**40)
        result = match_compressed(setup["patterns"], compressed, fine, keep=KEEP)
        indices, scores = result.indices, result.scores
        assert indices.dtype == np.int64 and scores.dtype == np.float32
        assert indices.shape == scores.shape == (150, KEEP)
        same = indices[:, 0] == exhaustive.indices[:, 0]
        assert same.mean() >= 0.99, f"{(~same).sum()} of 150 differ"
        # Exact NCC of real dictionary rows, best first.
        direct = np.einsum("np,nkp->nk", setup["patterns"], setup["rows"][indices])
        np.testing.assert_allclose(scores, direct, atol=1e-5)
        assert np.all(np.diff(scores, axis=1) <= 0)
        np.testing.assert_allclose(scores[same, 0], exhaustive.scores[same, 0], atol=1e-5)
        # Only the candidates were projected at full resolution.
        assert fine.projected <= 150 * CONFIG.rerank

    def test_gpu_path_equals_the_numpy_path(self, setup, gpu_standin: ModuleType) -> None:
        # The CuPy code path (device basis and coefficients, GPU top-k merge through
        # the host-compiled kernel) on a few patterns: the stand-in's kernel is slow.
        patterns = setup["patterns"][:12]
        fine = FineRows(setup["dictionary"], gpu_standin, capacity=2**40)
        result = match_compressed(gpu_standin.asarray(patterns), setup["compressed"], fine,
                                  keep=KEEP)
        assert backend.is_device_array(result.indices) and backend.is_device_array(result.scores)
        host = match_compressed(patterns, setup["compressed"],
                                FineRows(setup["dictionary"], np, capacity=0), keep=KEEP)
        np.testing.assert_array_equal(backend.to_host(result.indices), host.indices)
        np.testing.assert_allclose(backend.to_host(result.scores), host.scores, atol=1e-5)

    def test_more_candidates_never_lose_agreement(self, setup) -> None:
        fine = FineRows(setup["dictionary"], np, capacity=2**40)
        best = setup["exhaustive"].indices[:, 0]
        agree = [(match_compressed(setup["patterns"], setup["compressed"], fine,
                                   rerank=r).indices[:, 0] == best).mean() for r in (1, 4, 16)]
        assert agree[0] <= agree[1] <= agree[2]

    def test_invalid_requests(self, setup) -> None:
        compressed = setup["compressed"]
        fine = FineRows(setup["dictionary"], np, capacity=0)
        patterns = setup["patterns"]
        with pytest.raises(ValueError, match="rerank"):
            match_compressed(patterns, compressed, fine, keep=4, rerank=3)
        with pytest.raises(ValueError, match="shape"):
            match_compressed(patterns[:, :100], compressed, fine)
        other = FineRows(Dictionary(setup["dictionary"].master, setup["dictionary"].detector,
                                    setup["dictionary"].quaternions[:10]), np, capacity=0)
        with pytest.raises(ValueError, match="10-row"):
            match_compressed(patterns, compressed, other)


class TestCache:
    @pytest.fixture
    def small(self, setup, tmp_path, monkeypatch):
        monkeypatch.setenv("DPM_CACHE_DIR", str(tmp_path))
        d = setup["dictionary"]
        return Dictionary(d.master, d.detector, d.quaternions[:3000])

    def test_second_build_reads_the_file(self, small, monkeypatch) -> None:
        first = compress(small, config=CONFIG)
        assert first.path.is_file()
        assert first.path.name == f"{compression_key(small, CONFIG)}.npz"

        def refuse(*args, **kwargs):
            raise AssertionError("the cached basis was computed again")

        monkeypatch.setattr(compression, "principal_basis", refuse)
        second = compress(small, config=replace(CONFIG, rerank=3))   # rerank: same file
        np.testing.assert_array_equal(second.basis, first.basis)
        np.testing.assert_array_equal(second.coefficients, first.coefficients)
        assert second.energy == first.energy and second.config.rerank == 3
        # Coefficients are the dictionary rows times the basis.
        rows = small.chunk(0, len(small))
        np.testing.assert_allclose(first.coefficients, rows @ first.basis.T, atol=1e-5)

    def test_other_settings_or_dictionary_other_file(self, small, setup) -> None:
        keys = {compression_key(small, CONFIG), compression_key(small, replace(CONFIG, seed=1)),
                compression_key(small, replace(CONFIG, energy=0.8)),
                compression_key(setup["dictionary"], CONFIG)}
        assert len(keys) == 4
        assert compression_key(small, CONFIG) == compression_key(small, replace(CONFIG, rerank=2))

    @pytest.mark.parametrize("damage", ["truncate", "garbage", "other key"])
    def test_damaged_file_is_rebuilt(self, small, caplog, damage: str) -> None:
        first = compress(small, config=CONFIG)
        path = first.path
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "garbage":
            path.write_bytes(b"not a zip file")
        else:
            with np.load(path) as data:
                arrays = dict(data)
            arrays["key"] = np.array("0" * 32)
            with open(path, "wb") as fh:
                np.savez(fh, **arrays)
        with caplog.at_level(logging.WARNING, logger="dpm"):
            again = compress(small, config=CONFIG)
        assert str(path) in caplog.text and "rebuilding" in caplog.text
        np.testing.assert_array_equal(again.coefficients, first.coefficients)
        compress(small, config=CONFIG)   # the rebuilt file reads


class TestCompressionConfig:
    @pytest.mark.parametrize("kwargs, message", [
        ({"energy": 0}, "energy"), ({"energy": 1.5}, "energy"), ({"energy": True}, "energy"),
        ({"rerank": 0}, "rerank"), ({"rerank": 2.0}, "rerank"),
        ({"sample_stride": 0}, "sample_stride"), ({"oversampling": -1}, "oversampling"),
        ({"power_iterations": -1}, "power_iterations"), ({"seed": -3}, "seed"),
    ])
    def test_invalid_values_are_named(self, kwargs, message) -> None:
        with pytest.raises(ValueError, match=message) as error:
            CompressionConfig(**kwargs)
        assert repr(next(iter(kwargs.values()))) in str(error.value)
