"""Peak memory of ``dpm index`` against the number of patterns, at a fixed memory budget.

Run with ``python -m pytest bench/test_bench_chunks.py --benchmark-only -s``.

Synthetic Li stacks of 5 000 and 20 000 patterns (60 × 60 px, uint8; written by
``bench/large_stack.py``) are indexed by the ``dpm`` command in a child process
with ``--memory-budget 256MB`` against the 4° dictionary (12 500 orientations:
more than a quarter of the budget, so it is read from the on-disk cache). Each
child's peak resident memory comes from ``os.wait4``: it should not grow with
the number of patterns. The 100 000-pattern, 2° figure of the README comes
from the same command under ``/usr/bin/time -v``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from large_stack import PC, write_stack


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chunks-bench")
    paths = {}
    for n in (5_000, 20_000):
        paths[n] = folder / f"li{n}.npy"
        write_stack(str(paths[n]), n)
    return folder, paths


@pytest.mark.parametrize("n", [5_000, 20_000])
def test_bench_peak_memory_at_a_fixed_budget(benchmark, stacks, n, tmp_path):
    folder, paths = stacks
    command = [sys.executable, "-m", "dpm.cli", "--quiet", "index", str(paths[n]), "--pc",
               *map(str, PC), "--resolution", "4", "--memory-budget", "256MB", "--device", "cpu",
               "--out", str(tmp_path / "out")]
    env = os.environ | {"MPLBACKEND": "Agg", "DPM_CACHE_DIR": str(folder / "cache")}
    peak = {}

    def run() -> None:
        proc = subprocess.Popen(command, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        peak["mb"] = usage.ru_maxrss / 1024

    benchmark.pedantic(run, rounds=1, iterations=1)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    timings = summary["timings_s"]
    benchmark.extra_info.update(peak_rss_mb=peak["mb"], patterns=n, cores=os.cpu_count(),
                                n_chunks=summary["chunks"]["count"], **timings)
    print(f"\ndpm index, {n} patterns of 60x60, 4° dictionary ({summary['dictionary_size']} "
          f"orientations), --memory-budget 256MB, {os.cpu_count()} cores: "
          f"{summary['chunks']['count']} chunks, {timings['total']:.1f} s "
          f"({n / timings['total']:.0f} patterns/s), peak RSS {peak['mb']:.0f} MB")
