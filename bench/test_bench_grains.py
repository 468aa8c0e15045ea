"""Grain reconstruction plus statistics on a 2000 x 2000-pixel map.

Run with ``python -m pytest bench/test_bench_grains.py --benchmark-only -s``.

The map stacks ten 200 x 2000-pixel columnar films
(:func:`dpm.synthetic.columnar_grains`, mean column width 20 px), about a
thousand grains with random m-3m orientations, 0.3° of orientation noise per
pixel and 2 % unindexed pixels scattered at random. Timed:
:func:`dpm.grains.reconstruct_grains` (neighbour pairs, closed-form cubic
disorientations, connected components, the whole grain table, KAM, ASTM E2627
and the summary) and :func:`dpm.boundaries.boundary_traces` (boundary chains,
smoothing, trace angles).
Target: under 20 s on 2 cores. The bench ends with a loose check: every HAGB
pair joins two true grains, and at least 97 % of the pairs joining two true
grains are HAGB (adjacent columns drawn within 10° of each other merge), with
LAGB pairs only on such merged true boundaries (the noise gives none).
"""

from __future__ import annotations

import time

import numpy as np
from orix.quaternion import Orientation
from orix.quaternion.symmetry import Oh

from dpm.boundaries import boundary_traces
from dpm.grains import GrainConfig, reconstruct_grains
from dpm.synthetic import random_quaternions
from grain_data import stacked_columns

NOISE_DEG = 0.3


def _map(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = stacked_columns(rng, 20.0)
    axes = rng.normal(size=(truth.size, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    half = np.radians(NOISE_DEG) / 2
    noise = np.concatenate([np.full((truth.size, 1), np.cos(half)), np.sin(half) * axes], axis=1)
    q = (Orientation(noise) * Orientation(random_quaternions(int(truth.max()) + 1, rng)[truth.ravel()])).data
    indexed = rng.random(truth.size) >= 0.02
    return truth, q, indexed


def test_bench_reconstruct_grains(benchmark):
    truth, q, indexed = _map(np.random.default_rng(0))
    seconds = []

    def run():
        t0 = time.perf_counter()
        gm = reconstruct_grains(q, indexed, truth.shape, Oh, config=GrainConfig())
        traces = boundary_traces(gm)
        seconds.append(time.perf_counter() - t0)
        return gm, traces

    gm, traces = benchmark.pedantic(run, rounds=3, iterations=1)
    best = min(seconds)
    print(f"\nreconstruct_grains + boundary_traces {truth.shape[0]} x {truth.shape[1]} px: "
          f"{best:.2f} s best of {len(seconds)}, {truth.size / best / 1e6:.2f} Mpx/s, "
          f"{gm.summary['n_grains']} grains ({truth.max() + 1} true columns), "
          f"{gm.summary['n_hagb_pairs']} HAGB pairs, {len(traces.length_um)} boundary chains")
    t = truth.ravel()
    true_boundary = t[gm.pairs[:, 0]] != t[gm.pairs[:, 1]]
    assert not (gm.hagb & ~true_boundary).any()
    assert gm.hagb[true_boundary].mean() > 0.97
    assert not (gm.lagb & ~true_boundary).any()
