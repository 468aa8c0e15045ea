"""Tests for dpm.match: NCC top-k matching on NumPy and through the CuPy stand-in.

The oracle is brute force: the full score matrix ``patterns @ dictionary.T`` in
float64 and a lexicographic sort by (descending score, ascending index), the
tie order both merge implementations promise.
"""

from __future__ import annotations

import logging
import re
import subprocess
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import requires_nvcc

from dpm import backend
from dpm.match import (
    MatchConfig,
    MatchResult,
    _GPU_MAX_KEEP,
    _topk_merge,
    _topk_merge_cpu,
    match,
    prepare_patterns,
)

NPIX = 64
KEEP = 5


def normalised(rng: np.random.Generator, n: int, npix: int = NPIX) -> np.ndarray:
    """Random zero-mean unit-norm float32 rows."""
    return prepare_patterns(rng.random((n, npix))).data


def brute_force(patterns: np.ndarray, dictionary: np.ndarray, keep: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``keep`` (indices, scores) by full score matrix and lexicographic sort."""
    scores = patterns.astype(np.float64) @ dictionary.astype(np.float64).T
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((columns, -scores), axis=1)[:, :keep]
    return order, np.take_along_axis(scores, order, axis=1)


def reference_merge(tiles: list[np.ndarray], offsets: list[int], keep: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The merge contract by sorting every candidate (NaN excluded)."""
    scores = np.concatenate(tiles, axis=1).astype(np.float64)
    index = np.concatenate([o + np.arange(t.shape[1]) for t, o in zip(tiles, offsets)])
    out_s = np.full((len(scores), keep), -np.inf, np.float32)
    out_i = np.full((len(scores), keep), -1, np.int64)
    for r, row in enumerate(scores):
        ok = ~np.isnan(row)
        order = np.lexsort((index[ok], -row[ok]))[:keep]
        out_s[r, : len(order)] = row[ok][order]
        out_i[r, : len(order)] = index[ok][order]
    return out_i, out_s


class ChunkSource:
    """A dictionary that hands out rows of an array chunk by chunk and logs requests."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.requests: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.array)

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        self.requests.append((start, stop))
        return xp.asarray(self.array[start:stop])


def assert_matches_brute_force(result: MatchResult, patterns: np.ndarray,
                               dictionary: np.ndarray, keep: int) -> None:
    indices, scores = brute_force(patterns, dictionary, keep)
    np.testing.assert_array_equal(backend.to_host(result.indices), indices)
    np.testing.assert_allclose(backend.to_host(result.scores), scores, atol=2e-6)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """40 patterns and a 300-pattern dictionary of 64 pixels, normalised."""
    rng = np.random.default_rng(7)
    return normalised(rng, 40), normalised(rng, 300)


class TestPreparePatterns:
    def test_rows_zero_mean_unit_norm(self, xp: ModuleType) -> None:
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, (6, 5, 7), dtype=np.uint8)
        data, valid = prepare_patterns(xp.asarray(raw))
        assert isinstance(data, xp.ndarray) and data.dtype == np.float32
        assert data.shape == (6, 35)
        rows = raw.reshape(6, -1).astype(np.float64)
        rows -= rows.mean(axis=1, keepdims=True)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        np.testing.assert_allclose(backend.to_host(data), rows, atol=1e-6)
        assert backend.to_host(valid).all()

    def test_flat_input_equals_stacked(self, xp: ModuleType) -> None:
        raw = np.random.default_rng(1).random((4, 3, 3))
        stacked, _ = prepare_patterns(xp.asarray(raw))
        flat, _ = prepare_patterns(xp.asarray(raw.reshape(4, 9)))
        np.testing.assert_array_equal(backend.to_host(stacked), backend.to_host(flat))

    def test_mask_keeps_used_pixels_only(self, xp: ModuleType) -> None:
        raw = np.random.default_rng(2).random((3, 4, 4)).astype(np.float32)
        mask = np.zeros((4, 4), bool)
        mask[1:, :3] = True
        raw_outside = raw.copy()
        raw_outside[:, ~mask] = 1e6  # must not influence the result
        data, _ = prepare_patterns(xp.asarray(raw_outside), mask=mask)
        expected, _ = prepare_patterns(raw[:, mask])
        assert data.shape == (3, 9)
        np.testing.assert_allclose(backend.to_host(data), expected, atol=1e-6)

    def test_input_not_mutated(self, xp: ModuleType) -> None:
        raw = xp.asarray(np.random.default_rng(3).random((3, 8)).astype(np.float32))
        before = backend.to_host(raw).copy()
        prepare_patterns(raw)
        np.testing.assert_array_equal(backend.to_host(raw), before)

    def test_bad_patterns_become_flagged_zero_rows(self, xp: ModuleType,
                                                   caplog: pytest.LogCaptureFixture) -> None:
        raw = np.random.default_rng(4).random((6, 10))
        raw[1] = 3.0
        raw[3, 4] = np.nan
        raw[4, 0] = np.inf
        with caplog.at_level(logging.WARNING, logger="dpm"):
            data, valid = prepare_patterns(xp.asarray(raw))
        assert backend.to_host(valid).tolist() == [True, False, True, False, False, True]
        host = backend.to_host(data)
        assert (host[[1, 3, 4]] == 0).all()
        np.testing.assert_allclose(np.linalg.norm(host[[0, 2, 5]], axis=1), 1, atol=1e-6)
        assert "3 of 6 patterns" in caplog.text and "[1, 3, 4]" in caplog.text

    def test_constant_only_in_mask_is_flagged(self) -> None:
        raw = np.random.default_rng(5).random((2, 2, 3))
        raw[0, 0, :] = 0.5
        _, valid = prepare_patterns(raw, mask=np.array([[True] * 3, [False] * 3]))
        assert valid.tolist() == [False, True]

    def test_whole_stack_non_finite_is_an_error(self, xp: ModuleType) -> None:
        with pytest.raises(ValueError, match="every one of the 3 patterns holds NaN"):
            prepare_patterns(xp.asarray(np.full((3, 4, 4), np.nan)))

    def test_all_constant_is_flagged_not_raised(self) -> None:
        _, valid = prepare_patterns(np.full((3, 4, 4), 7, np.uint8))
        assert not valid.any()

    @pytest.mark.parametrize(("patterns", "mask", "error", "message"), [
        (np.zeros((0, 4, 4)), None, ValueError, r"empty \(shape \(0, 4, 4\)\)"),
        (np.zeros(16), None, ValueError, r"got \(16,\)"),
        (np.ones((2, 4, 4)), np.ones((4, 3), bool), ValueError,
         r"mask shape \(4, 3\) differs from the pattern shape \(4, 4\)"),
        (np.ones((2, 16)), np.ones(15, bool), ValueError, "15 elements, patterns have 16"),
        (np.ones((2, 4, 4)), np.eye(4, dtype=bool)[:1], ValueError, "mask shape"),
        (np.ones((2, 2, 2)), np.eye(2, dtype=bool) & False, ValueError, "at least 2 pixels"),
        (np.ones((2, 3), complex), None, TypeError, "real numeric dtype, got complex128"),
    ])
    def test_bad_input(self, patterns: np.ndarray, mask: np.ndarray | None,
                       error: type, message: str) -> None:
        with pytest.raises(error, match=message):
            prepare_patterns(patterns, mask=mask)


class TestTopkMerge:
    """The kernel contract: numba twin, its pure-Python body, and topk.cu."""

    @staticmethod
    def tiles(seed: int, rows: int = 6) -> tuple[list[np.ndarray], list[int]]:
        """Tiles with many ties (scores on a 0.05 grid), a NaN, a first tile narrower
        than k, and offsets that are not a multiple of the tile width."""
        rng = np.random.default_rng(seed)
        widths = [3, 40, 17, 129]
        tiles = [np.round(rng.uniform(-1, 1, (rows, w)) * 20).astype(np.float32) / 20
                 for w in widths]
        tiles[1][2, 5] = np.nan
        offsets = list(np.cumsum([0] + widths[:-1]) + 11)
        return tiles, offsets

    @staticmethod
    def run(merge: Any, xp: ModuleType, tiles: list[np.ndarray], offsets: list[int],
            keep: int) -> tuple[np.ndarray, np.ndarray]:
        rows = tiles[0].shape[0]
        best_s = xp.full((rows, keep), -np.inf, dtype=xp.float32)
        best_i = xp.full((rows, keep), -1, dtype=xp.int64)
        for tile, offset in zip(tiles, offsets):
            merge(xp.asarray(tile), int(offset), best_s, best_i)
        return backend.to_host(best_i), backend.to_host(best_s)

    @pytest.mark.parametrize("keep", [1, KEEP, 12])
    def test_dispatch_matches_sorted_reference(self, xp: ModuleType, keep: int) -> None:
        tiles, offsets = self.tiles(keep)
        merge = lambda *args: _topk_merge(xp, *args)  # noqa: E731
        indices, scores = self.run(merge, xp, tiles, offsets, keep)
        ref_i, ref_s = reference_merge(tiles, offsets, keep)
        np.testing.assert_array_equal(indices, ref_i)
        np.testing.assert_array_equal(scores, ref_s)

    def test_py_func_matches_compiled(self) -> None:
        tiles, offsets = self.tiles(3)
        compiled = self.run(_topk_merge_cpu, np, tiles, offsets, KEEP)
        python = self.run(_topk_merge_cpu.py_func, np, tiles, offsets, KEEP)
        np.testing.assert_array_equal(compiled[0], python[0])
        np.testing.assert_array_equal(compiled[1], python[1])

    def test_fewer_candidates_than_keep_leave_empty_slots(self, xp: ModuleType) -> None:
        tile = np.array([[0.5, np.nan, 0.25]], np.float32)
        merge = lambda *args: _topk_merge(xp, *args)  # noqa: E731
        indices, scores = self.run(merge, xp, [tile], [100], 4)
        assert indices.tolist() == [[100, 102, -1, -1]]
        assert scores.tolist() == [[0.5, 0.25, -np.inf, -np.inf]]

    def test_kernel_and_twin_agree_on_wide_tiles(self, gpu_standin: ModuleType) -> None:
        rng = np.random.default_rng(9)
        tiles = [rng.standard_normal((3, 500)).astype(np.float32) for _ in range(2)]
        twin = self.run(_topk_merge_cpu, np, tiles, [0, 500], KEEP)
        kernel = self.run(lambda *a: _topk_merge(gpu_standin, *a), gpu_standin, tiles,
                          [0, 500], KEEP)
        np.testing.assert_array_equal(twin[0], kernel[0])
        np.testing.assert_array_equal(twin[1], kernel[1])

    def test_max_keep_matches_kernel_source(self) -> None:
        source = backend.kernel_source("topk")
        assert re.search(rf"#define TOPK_MAX_K {_GPU_MAX_KEEP}\b", source)

    @requires_nvcc
    @pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
    def test_kernel_compiles_with_nvcc(self, arch: str, tmp_path: Any) -> None:
        path = backend.kernel_dir() / "topk.cu"
        run = subprocess.run(["nvcc", f"-arch={arch}", *backend.KERNEL_OPTIONS, "-c",
                              str(path), "-o", str(tmp_path / "topk.o")],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


class TestMatch:
    def test_equals_brute_force(self, xp: ModuleType, data: tuple[np.ndarray, np.ndarray]
                                ) -> None:
        patterns, dictionary = data
        result = match(xp.asarray(patterns), xp.asarray(dictionary),
                       config=MatchConfig(keep=KEEP))
        assert isinstance(result.indices, xp.ndarray) and isinstance(result.scores, xp.ndarray)
        assert result.indices.dtype == np.int64 and result.scores.dtype == np.float32
        assert result.indices.shape == result.scores.shape == (40, KEEP)
        assert_matches_brute_force(result, patterns, dictionary, KEEP)

    def test_finds_noisy_copies(self, xp: ModuleType, data: tuple[np.ndarray, np.ndarray]
                                ) -> None:
        _, dictionary = data
        rng = np.random.default_rng(1)
        truth = rng.choice(len(dictionary), 30, replace=False)
        noisy = dictionary[truth] + 0.02 * rng.standard_normal((30, NPIX))
        patterns = prepare_patterns(noisy).data
        result = match(xp.asarray(patterns), xp.asarray(dictionary), config=MatchConfig(keep=1))
        np.testing.assert_array_equal(backend.to_host(result.indices)[:, 0], truth)

    def test_tiny_budget_equals_unchunked(self, xp: ModuleType,
                                          data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        config = MatchConfig(keep=KEEP)
        whole = match(xp.asarray(patterns), xp.asarray(dictionary), config=config)
        source = ChunkSource(dictionary)
        chunked = match(xp.asarray(patterns), source,
                        config=MatchConfig(keep=KEEP, memory_budget=12_000))
        assert len(source.requests) > 20  # many dictionary chunks, several super-chunks
        np.testing.assert_array_equal(backend.to_host(chunked.indices),
                                      backend.to_host(whole.indices))
        np.testing.assert_allclose(backend.to_host(chunked.scores),
                                   backend.to_host(whole.scores), atol=2e-6)

    def test_each_chunk_generated_once_when_patterns_fit(
            self, xp: ModuleType, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        source = ChunkSource(dictionary)
        result = match(xp.asarray(patterns), source,
                       config=MatchConfig(keep=KEEP, memory_budget=30_000))
        starts = [start for start, _ in source.requests]
        stops = [stop for _, stop in source.requests]
        assert len(source.requests) > 3
        assert starts == [0] + stops[:-1] and stops[-1] == len(dictionary)
        assert_matches_brute_force(result, patterns, dictionary, KEEP)

    def test_super_chunks_regenerate_the_dictionary(
            self, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        source = ChunkSource(dictionary)
        steps: list[tuple[int, int]] = []
        result = match(patterns, source, config=MatchConfig(
            keep=KEEP, memory_budget=12_000, progress=lambda d, t: steps.append((d, t))))
        requests = {r: source.requests.count(r) for r in source.requests}
        super_chunks = set(requests.values())
        assert len(super_chunks) == 1 and super_chunks.pop() > 1
        assert steps[-1] == (40 * 300, 40 * 300)
        assert all(a[0] < b[0] for a, b in zip(steps, steps[1:]))
        assert_matches_brute_force(result, patterns, dictionary, KEEP)

    def test_dictionary_kept_when_it_fits_and_patterns_do_not(self, xp: ModuleType) -> None:
        rng = np.random.default_rng(3)
        patterns, dictionary = normalised(rng, 150), normalised(rng, 60)
        source = ChunkSource(dictionary)
        steps: list[int] = []
        result = match(xp.asarray(patterns), source, config=MatchConfig(
            keep=KEEP, memory_budget=64_000, progress=lambda d, t: steps.append(d)))
        assert len(steps) > len(source.requests)  # more than one super-chunk ...
        assert sorted(set(source.requests)) == sorted(source.requests)  # ... one generation
        assert_matches_brute_force(result, patterns, dictionary, KEEP)

    def test_host_dictionary_with_device_patterns(
            self, gpu_standin: ModuleType, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        result = match(gpu_standin.asarray(patterns), dictionary, config=MatchConfig(keep=KEEP))
        assert isinstance(result.indices, gpu_standin.ndarray)
        assert_matches_brute_force(result, patterns, dictionary, KEEP)

    def test_progress_bar(self, data: tuple[np.ndarray, np.ndarray],
                          capsys: pytest.CaptureFixture[str]) -> None:
        patterns, dictionary = data
        match(patterns, dictionary, config=MatchConfig(keep=KEEP, progress=True))
        assert "matching" in capsys.readouterr().err

    def test_inputs_not_mutated(self, xp: ModuleType, data: tuple[np.ndarray, np.ndarray]
                                ) -> None:
        patterns, dictionary = data
        p, d = xp.asarray(patterns), xp.asarray(dictionary)
        match(p, d, config=MatchConfig(keep=KEEP, memory_budget=12_000))
        np.testing.assert_array_equal(backend.to_host(p), patterns)
        np.testing.assert_array_equal(backend.to_host(d), dictionary)


class TestMatchErrors:
    def test_pixel_count_mismatch_names_both_shapes(self, xp: ModuleType,
                                                    data: tuple[np.ndarray, np.ndarray]
                                                    ) -> None:
        patterns, dictionary = data
        with pytest.raises(ValueError, match=r"dictionary shape \(300, 63\) does not match "
                                             r"patterns shape \(40, 64\)"):
            match(xp.asarray(patterns), xp.asarray(np.ascontiguousarray(dictionary[:, :63])))

    def test_chunk_pixel_count_mismatch(self, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        with pytest.raises(ValueError, match=r"chunk \[0:300\] has shape \(300, 63\), "
                                             r"expected \(300, 64\)"):
            match(patterns, ChunkSource(np.ascontiguousarray(dictionary[:, :63])))

    def test_chunk_on_wrong_device(self, gpu_standin: ModuleType,
                                   data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data

        class HostSource(ChunkSource):
            def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
                return self.array[start:stop]

        with pytest.raises(TypeError, match="another device"):
            match(gpu_standin.asarray(patterns), HostSource(dictionary))

    def test_keep_larger_than_dictionary(self, xp: ModuleType,
                                         data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        with pytest.raises(ValueError, match="keep=301 exceeds the dictionary size 300"):
            match(xp.asarray(patterns), xp.asarray(dictionary), config=MatchConfig(keep=301))

    def test_keep_beyond_gpu_limit(self, gpu_standin: ModuleType,
                                   data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        with pytest.raises(ValueError, match=f"exceeds {_GPU_MAX_KEEP}"):
            match(gpu_standin.asarray(patterns), gpu_standin.asarray(dictionary),
                  config=MatchConfig(keep=_GPU_MAX_KEEP + 1))

    def test_empty_inputs(self, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        with pytest.raises(ValueError, match=r"patterns is empty \(shape \(0, 64\)\)"):
            match(patterns[:0], dictionary)
        with pytest.raises(ValueError, match="dictionary is empty"):
            match(patterns, dictionary[:0])

    def test_dtypes(self, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        with pytest.raises(TypeError, match="patterns must be float32.*float64"):
            match(patterns.astype(np.float64), dictionary)
        with pytest.raises(TypeError, match="dictionary must be float32, got float64"):
            match(patterns, dictionary.astype(np.float64))
        with pytest.raises(TypeError, match="got list"):
            match(patterns, dictionary.tolist())
        with pytest.raises(ValueError, match=r"shape \(n, npix\), got \(40, 8, 8\)"):
            match(patterns.reshape(40, 8, 8), dictionary)

    def test_budget_too_small(self, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        with pytest.raises(ValueError, match="memory budget of 100 bytes is too small"):
            match(patterns, dictionary, config=MatchConfig(memory_budget=100))

    def test_nan_dictionary(self, xp: ModuleType, data: tuple[np.ndarray, np.ndarray]) -> None:
        patterns, dictionary = data
        bad = dictionary[:8].copy()
        bad[3:] = np.nan
        with pytest.raises(ValueError, match="fewer than keep=5 finite scores"):
            match(xp.asarray(patterns), xp.asarray(bad), config=MatchConfig(keep=KEEP))

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"keep": 0}, "keep must be a positive integer, got 0"),
        ({"keep": 2.5}, "got 2.5"),
        ({"memory_budget": 0}, "memory_budget must be a positive number of bytes"),
    ])
    def test_config_validation(self, kwargs: dict[str, Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            MatchConfig(**kwargs)
