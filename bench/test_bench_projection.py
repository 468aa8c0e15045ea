"""Dictionary generation: dpm's numba projection against kikuchipy, same data, same run.

Run with ``python -m pytest bench/test_bench_projection.py --benchmark-only -s``.
Both project kikuchipy's Ni master pattern (EMsoft, 20 kV, 401² Lambert
grids per hemisphere) onto a 60 x 60 detector for the same 10 000 random
orientations, on all cores of this machine. kikuchipy returns raw
intensities; dpm returns zero-mean, unit-norm patterns (its dictionary form),
so dpm does the normalisation kikuchipy leaves to the indexer on top.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from orix.quaternion import Rotation

from dpm.detector import Detector
from dpm.master import MasterPattern
from dpm.projection import project

N_ORIENTATIONS = 10_000
SHAPE = (60, 60)
RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    import kikuchipy as kp

    kp_master = kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="both")
    master = MasterPattern.from_kikuchipy(kp_master, energy=20.0)
    detector = Detector(SHAPE, pc=(0.42, 0.21, 0.50), sample_tilt=70.0, tilt=0.0)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(N_ORIENTATIONS, 4))
    rotations = Rotation(q / np.linalg.norm(q, axis=1, keepdims=True))
    project(master, detector, rotations[:8], device="cpu")  # numba compile / cache load
    return kp_master, master, detector, rotations


def _report(name: str, benchmark) -> None:
    rate = N_ORIENTATIONS / benchmark.stats.stats.min
    RATES[name] = rate
    print(f"\n{name}: {rate:,.0f} orientations/s ({N_ORIENTATIONS} x {SHAPE[0]}x{SHAPE[1]} "
          f"patterns, {os.cpu_count()} cores)")
    if len(RATES) == 2:
        print(f"dpm / kikuchipy: {RATES['dpm numba'] / RATES['kikuchipy']:.2f}x")


def test_bench_kikuchipy_get_patterns(benchmark, setup):
    kp_master, _, detector, rotations = setup
    kp_detector = detector.to_kikuchipy()
    sim = benchmark.pedantic(
        lambda: kp_master.get_patterns(rotations, kp_detector, energy=20.0, dtype_out=np.float32,
                                       compute=True, show_progressbar=False),
        rounds=2, iterations=1)
    _report("kikuchipy", benchmark)
    assert sim.data.shape == (N_ORIENTATIONS, *SHAPE)


def test_bench_dpm_project_numba(benchmark, setup):
    kp_master, master, detector, rotations = setup
    patterns = benchmark.pedantic(lambda: project(master, detector, rotations, device="cpu"),
                                  rounds=3, iterations=1, warmup_rounds=1)
    _report("dpm numba", benchmark)
    # Loose check: the first 20 patterns correlate with kikuchipy's at NCC > 0.999.
    ref = kp_master.get_patterns(rotations[:20], detector.to_kikuchipy(), energy=20.0,
                                 dtype_out=np.float32, compute=True, show_progressbar=False)
    ref = np.asarray(ref.data, dtype=np.float64).reshape(20, -1)
    ref -= ref.mean(axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ncc = (patterns[:20].reshape(20, -1) * ref).sum(axis=1)
    assert ncc.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(patterns.reshape(N_ORIENTATIONS, -1), axis=1),
                               1.0, atol=1e-4)


def test_bench_dpm_project_gpu(benchmark, setup):
    """The CUDA kernel on a real GPU (skipped unless CuPy sees a device)."""
    from dpm import backend

    cp = backend.cupy()
    if cp is None:
        pytest.skip("no CUDA device")
    kp_master, master, detector, rotations = setup
    q = cp.asarray(rotations.data.astype(np.float32))
    project(master, detector, q[:8])  # compile the kernel, upload the master pattern

    def run():
        out = project(master, detector, q)
        backend.synchronize(cp)
        return out

    patterns = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _report("dpm CUDA", benchmark)
    cpu = project(master, detector, rotations[:20], device="cpu")
    np.testing.assert_allclose(backend.to_host(patterns[:20]), cpu, atol=1e-4)
