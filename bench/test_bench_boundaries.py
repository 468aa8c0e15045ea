"""Boundary traces of a 2000 x 2000-pixel columnar map, square and hexagonal grids.

Run with ``python -m pytest bench/test_bench_boundaries.py --benchmark-only -s``.

The map stacks ten 200 x 2000-pixel columnar films
(:func:`dpm.synthetic.columnar_grains`, mean column width 10 px, boundary
slopes dx/dy of σ 0.1), a few thousand grains with random m-3m orientations
and 2 % unindexed pixels scattered at random, which cut the boundaries into
many chains. Grains are reconstructed once, untimed. Timed:
:func:`dpm.boundaries.boundary_traces` (segments, chains, 10 smoothing
iterations, trace angles, histogram). Target: a few seconds on 2 cores. The
bench ends with a loose check: the histogram holds the total length, the
smoothing shortens the staircases by at most 30 % (a hexagonal staircase
along a column is 4/3 the length of its line), and the length-weighted mean
angle to the interface is that of near-vertical columns (above 75°).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from orix.quaternion.symmetry import Oh

from dpm.boundaries import boundary_traces
from dpm.grains import GrainConfig, reconstruct_grains
from dpm.synthetic import random_quaternions
from grain_data import stacked_columns

GRAIN_WIDTH = 10.0


@pytest.fixture(scope="module", params=["square", "hexagonal"])
def grain_map(request):
    rng = np.random.default_rng(0)
    truth = stacked_columns(rng, GRAIN_WIDTH)
    q = random_quaternions(int(truth.max()) + 1, rng)[truth.ravel()]
    indexed = rng.random(truth.size) >= 0.02
    return reconstruct_grains(q, indexed, truth.shape, Oh, config=GrainConfig(grid=request.param))


def test_bench_boundary_traces(benchmark, grain_map):
    seconds = []

    def run():
        t0 = time.perf_counter()
        tr = boundary_traces(grain_map)
        seconds.append(time.perf_counter() - t0)
        return tr

    tr = benchmark.pedantic(run, rounds=3, iterations=1)
    best = min(seconds)
    ny, nx = grain_map.labels.shape
    n_seg = int(tr.n_segments.sum())
    s = tr.summary()
    print(f"\nboundary_traces {grain_map.config.grid} {ny} x {nx} px, {grain_map.summary['n_grains']} "
          f"grains, {n_seg} HAGB segments, {s['n_chains']} chains: {best:.2f} s best of {len(seconds)} "
          f"({n_seg / best / 1e6:.2f} M segments/s); {100 * s['perpendicular_fraction']:.1f} % of "
          f"{s['total_length_um']:.0f} µm within 10° of perpendicular")
    face = 1.0 if grain_map.config.grid == "square" else 1.0 / np.sqrt(3.0)
    assert n_seg == grain_map.hagb.sum()
    assert tr.histogram_um.sum() == pytest.approx(tr.total_length_um, rel=1e-9)
    assert 0.7 * n_seg * face < tr.total_length_um < n_seg * face
    assert s["mean_angle_to_interface_deg"] > 75.0
