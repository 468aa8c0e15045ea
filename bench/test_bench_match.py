"""Dictionary matching throughput against this machine's own float32 GEMM rate.

Run with ``python -m pytest bench/test_bench_match.py --benchmark-only -s``.

Measured in the same run, on all cores of this machine:

* the float32 GEMM rate of NumPy's BLAS on a large square-ish product
  (4096 x 3600 @ 3600 x 4096), best of a few;
* :func:`dpm.match.match` of 2400 patterns of 60 x 60 pixels against a full-size
  2° cubic dictionary (100,347 x 3600 float32, 1.44 GB; random normalised rows,
  which score like real ones for the purpose of timing), keeping the best 10.

Matching does ``2 n m npix`` FLOPs of GEMM plus the top-k merge and the
chunking; the figure of merit is the fraction of the GEMM rate it reaches
(target >= 0.8). The bench ends with a loose correctness check: every pattern
(a noisy copy of a known dictionary row) finds its row first, and a few rows
equal brute force.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from dpm.match import MatchConfig, match

N_PATTERNS = 2400
N_DICTIONARY = 100_347  # orix cubochoric 2° grid of m-3m (DYNAMICAL.md §7)
NPIX = 60 * 60
KEEP = 10
GEMM_SHAPE = (4096, 3600, 4096)  # (rows, inner, columns)
RATES: dict[str, float] = {}


def _normalise_rows(rows: np.ndarray) -> None:
    """Make float32 rows zero-mean and unit-norm in place, 8192 rows at a time."""
    for start in range(0, len(rows), 8192):
        block = rows[start:start + 8192]
        block -= block.mean(axis=1, keepdims=True)
        block /= np.linalg.norm(block, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gemm_operands() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows, inner, columns = GEMM_SHAPE
    return (rng.standard_normal((rows, inner), dtype=np.float32),
            rng.standard_normal((inner, columns), dtype=np.float32),
            np.empty((rows, columns), dtype=np.float32))


def _gemm_gflops(operands: tuple[np.ndarray, np.ndarray, np.ndarray], rounds: int = 4) -> float:
    """Best float32 GEMM rate over ``rounds`` products, in GFLOP/s."""
    a, b, out = operands
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    rows, inner, columns = GEMM_SHAPE
    return 2 * rows * inner * columns / best / 1e9


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patterns, dictionary, truth): noisy copies of known dictionary rows."""
    rng = np.random.default_rng(1)
    dictionary = rng.standard_normal((N_DICTIONARY, NPIX), dtype=np.float32)
    _normalise_rows(dictionary)
    truth = rng.choice(N_DICTIONARY, N_PATTERNS, replace=False)
    patterns = dictionary[truth] + rng.standard_normal((N_PATTERNS, NPIX), dtype=np.float32) / 60
    _normalise_rows(patterns)
    match(patterns[:8], dictionary[:4096], config=MatchConfig(keep=KEEP))  # numba cache load
    return patterns, dictionary, truth


def test_bench_gemm_rate(benchmark, gemm_operands) -> None:
    a, b, out = gemm_operands
    benchmark.pedantic(np.matmul, args=(a, b), kwargs={"out": out}, rounds=4, iterations=1,
                       warmup_rounds=1)
    rows, inner, columns = GEMM_SHAPE
    RATES["gemm"] = 2 * rows * inner * columns / benchmark.stats.stats.min / 1e9
    benchmark.extra_info["gflops"] = RATES["gemm"]
    print(f"\nfloat32 GEMM {rows}x{inner} @ {inner}x{columns}: {RATES['gemm']:.1f} GFLOP/s "
          f"({os.cpu_count()} cores)")


def test_bench_match(benchmark, problem, gemm_operands) -> None:
    patterns, dictionary, truth = problem
    gemm_rates = [RATES.get("gemm", 0.0)]

    def measure_gemm() -> None:
        # Before each round (untimed): the machine is shared, so the GEMM rate is
        # sampled between the match rounds and the best of all samples is used.
        gemm_rates.append(_gemm_gflops(gemm_operands, rounds=2))

    result = benchmark.pedantic(lambda: match(patterns, dictionary, config=MatchConfig(keep=KEEP)),
                                setup=measure_gemm, rounds=3, iterations=1)
    measure_gemm()
    seconds = benchmark.stats.stats.min
    gflops = 2 * N_PATTERNS * N_DICTIONARY * NPIX / seconds / 1e9
    gemm = max(gemm_rates)
    fraction = gflops / gemm
    benchmark.extra_info.update(patterns_per_s=N_PATTERNS / seconds, gflops=gflops,
                                gemm_gflops=gemm, fraction_of_gemm=fraction)
    print(f"\nmatch {N_PATTERNS} patterns x {N_DICTIONARY} dictionary x {NPIX} px, keep "
          f"{KEEP}: {seconds:.2f} s, {N_PATTERNS / seconds:,.0f} patterns/s, "
          f"{gflops:.1f} GFLOP/s = {fraction:.2f} of the GEMM rate {gemm:.1f} GFLOP/s "
          f"(best of {len(gemm_rates)} samples; {os.cpu_count()} cores)")

    # Loose correctness: every pattern finds its source row first (NCC ~0.7 against
    # ~0.07 for the best unrelated row), and four rows equal brute force.
    np.testing.assert_array_equal(result.indices[:, 0], truth)
    rows = [0, 1, N_PATTERNS // 2, N_PATTERNS - 1]
    scores = patterns[rows] @ dictionary.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :KEEP]
    np.testing.assert_array_equal(result.indices[rows], expected)
    np.testing.assert_allclose(result.scores[rows], np.take_along_axis(scores, expected, 1),
                               atol=1e-5)
