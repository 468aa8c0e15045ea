"""End-to-end ``dpm index`` on the acceptance map: wall time per stage and peak memory.

Run with ``python -m pytest bench/test_bench_index.py --benchmark-only -s``.

A synthetic 60 x 40 Li map (60 x 60 px raw patterns with background, Poisson
noise and blur; 3% pores) is written to ``.npy`` and indexed by the ``dpm``
command in a child process against the full 2° dictionary (100,347
orientations), with ``--memory-budget 1GB``. The child's peak resident memory
comes from ``getrusage(RUSAGE_CHILDREN)``; the stage timings from
``summary.json``. Ends with a loose accuracy check against the known truth.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

from dpm.demo import disorientation
from dpm.detector import Detector
from dpm.io.emsoft import write_master_pattern
from dpm.master import simulate_master_pattern
from dpm.synthetic import SyntheticConfig, synthetic_map

PC = (0.49, 0.27, 0.58)


@pytest.fixture(scope="module")
def acceptance_map(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index-bench")
    master = simulate_master_pattern("li", kv=20, npx=200)
    write_master_pattern(master, folder / "li.h5")
    smap = synthetic_map(master, Detector(shape=(60, 60), pc=PC), SyntheticConfig(map_shape=(40, 60), seed=42))
    np.save(folder / "patterns.npy", smap.patterns)
    return folder, smap, master


def test_bench_index_cli(benchmark, acceptance_map):
    folder, smap, master = acceptance_map
    out = folder / "out"
    command = [sys.executable, "-m", "dpm.cli", "--quiet", "index", str(folder / "patterns.npy"),
               "--master-pattern", str(folder / "li.h5"), "--pc", *map(str, PC),
               "--memory-budget", "1GB", "--keep", "1", "--device", "cpu", "--overwrite",
               "--out", str(out)]

    def run() -> None:
        subprocess.run(command, check=True, env=os.environ | {"MPLBACKEND": "Agg"})

    benchmark.pedantic(run, rounds=1, iterations=1)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads((out / "summary.json").read_text())
    n = summary["patterns"]
    timings = summary["timings_s"]
    benchmark.extra_info.update(peak_rss_mb=peak_mb, patterns=n, cores=os.cpu_count(), **timings)
    print(f"\ndpm index: {n} patterns of 60x60 vs {summary['dictionary_size']} orientations, "
          f"{os.cpu_count()} cores: total {timings['total']:.1f} s "
          f"({n / timings['total']:.0f} patterns/s end to end; sampling {timings['sampling']:.1f} s, "
          f"match incl. dictionary {timings['match']:.1f} s, refine {timings['refine']:.1f} s); "
          f"peak RSS {peak_mb:.0f} MB")

    from orix import io as orix_io
    xmap = orix_io.load(out / "map.h5")
    found = xmap.rotations.data.reshape(n, -1, 4)[:, 0]
    angles = disorientation(found, smap.quaternions, master.phase.point_group)
    assert (angles[smap.diffracting.ravel()] <= 2.0).mean() > 0.95
