"""Dictionary compression (issue 7, item 2) against exhaustive matching on the bench map.

Run with ``python -m pytest bench/test_bench_compression.py --benchmark-only -m slow -s``
(set ``OMP_NUM_THREADS`` etc. for a fixed thread count; the figures printed name it).

The bench map: the 40 x 60 synthetic Li map of ``bench/test_bench_end_to_end.py``
(60 x 60 px, PC of ``bench/refine_data.py``, seed 42), preprocessed as
:func:`dpm.pipeline.prepare_stack` does (mean pattern subtracted, normalised),
and the pipeline's 2° dictionary (100 347 orientations, master low-passed by
pixel integration with σ = 1°). The oracle is exhaustive :func:`dpm.match.match`
against that dictionary. For each energy and ``rerank``, printed: the component
count, the energy the basis keeps of the whole dictionary, the fraction of
diffracting pixels whose best match equals the exhaustive one, the fraction
within 2° of the truth (exhaustive's alongside), the time to build the
compressed dictionary cold (basis and coefficients, empty cache) and to match
warm (compressed dictionary from the cache; the candidates' full-resolution
rows projected as a map would).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine_data import KV, PC  # noqa: E402

ENERGIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RERANKS = (1, 2, 4, 8, 16, 32)
#: Cheaper bases for the default energy and rerank: sparser samples, fewer passes.
BASIS_VARIANTS = ({"sample_stride": 8}, {"sample_stride": 16}, {"power_iterations": 0})
RESOLUTION = 2.0


@pytest.fixture(scope="module")
def bench_map(tmp_path_factory):
    from dpm.demo import disorientation
    from dpm.detector import Detector
    from dpm.dictionary import Dictionary
    from dpm.io.readers import as_pattern_stack
    from dpm.master.shipped import shipped_master_pattern
    from dpm.match import MatchConfig, match
    from dpm.pipeline import IndexConfig, prepare_stack
    from dpm.projection import integrate_pixels
    from dpm.sampling import cubochoric_grid
    from dpm.search import SearchConfig
    from dpm.synthetic import SyntheticConfig, synthetic_map

    master = shipped_master_pattern("li", KV)
    detector = Detector(shape=(60, 60), pc=PC)
    smap = synthetic_map(master, detector, SyntheticConfig(map_shape=(40, 60), seed=42))
    config = IndexConfig(kv=KV, device="cpu", refine=False,
                         search=SearchConfig(method="exhaustive"))
    patterns, _ = prepare_stack(as_pattern_stack(smap.patterns), detector, mask=None,
                                config=config, background=None, xp=np)
    grid = cubochoric_grid(master.phase, RESOLUTION)
    smooth = integrate_pixels(master, detector, orientation_spread=RESOLUTION / 2)
    dictionary = Dictionary(smooth, detector, grid.rotations.data.astype(np.float32))
    t = time.perf_counter()
    exhaustive = match(patterns, dictionary, config=MatchConfig(keep=1))
    seconds = time.perf_counter() - t
    diffracting = smap.diffracting.ravel()
    group = master.phase.point_group

    def within(rows: np.ndarray) -> float:
        found = dictionary.quaternions[rows[diffracting]].astype(np.float64)
        return float((disorientation(found, smap.quaternions[diffracting], group)
                      <= RESOLUTION).mean())

    return {"patterns": patterns, "dictionary": dictionary, "diffracting": diffracting,
            "best": exhaustive.indices[:, 0], "within": within, "exhaustive_s": seconds,
            "cache": tmp_path_factory.mktemp("compression-bench-cache")}


@pytest.mark.slow
def test_compression_against_exhaustive(bench_map, benchmark, monkeypatch) -> None:
    from dpm.compression import CompressionConfig, compress, match_compressed
    from dpm.search import FineRows

    monkeypatch.setenv("DPM_CACHE_DIR", str(bench_map["cache"]))
    patterns, dictionary = bench_map["patterns"], bench_map["dictionary"]
    diffracting, best = bench_map["diffracting"], bench_map["best"]
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"\n2400 patterns (60 x 60 px), {len(dictionary)} orientations, {threads} thread(s); "
          f"exhaustive: {bench_map['exhaustive_s']:.1f} s, "
          f"{bench_map['within'](best):.4f} within 2° of the truth")
    print("energy  k     kept    build_s  rerank  agree    within2  match_s")
    table = []
    for energy in ENERGIES:
        config = CompressionConfig(energy=energy)
        t = time.perf_counter()
        compressed = compress(dictionary, config=config)
        build = time.perf_counter() - t
        compress(dictionary, config=config)   # read back from the cache
        for rerank in RERANKS:
            fine = FineRows(dictionary, np, capacity=2**40)
            t = time.perf_counter()
            result = match_compressed(patterns, compressed, fine, rerank=rerank)
            seconds = time.perf_counter() - t
            rows = result.indices[:, 0]
            agree = float((rows == best)[diffracting].mean())
            table.append((energy, compressed.n_components, agree, rerank, seconds))
            print(f"{energy:<6}  {compressed.n_components:<4}  {compressed.energy:.4f}  "
                  f"{build:7.1f}  {rerank:<6}  {agree:.5f}  {bench_map['within'](rows):.4f}   "
                  f"{seconds:6.1f}")
    default = CompressionConfig()
    for variant in BASIS_VARIANTS:
        config = replace(default, **variant)
        t = time.perf_counter()
        compressed = compress(dictionary, config=config)
        build = time.perf_counter() - t
        result = match_compressed(patterns, compressed, FineRows(dictionary, np, capacity=2**40))
        rows = result.indices[:, 0]
        print(f"{variant}: k {compressed.n_components}, kept {compressed.energy:.4f}, build "
              f"{build:.1f} s, agree {float((rows == best)[diffracting].mean()):.5f}, within2 "
              f"{bench_map['within'](rows):.4f}")
    # The defaults reach the acceptance figure; timed once more by pytest-benchmark.
    compressed = compress(dictionary, config=default)

    def run():
        return match_compressed(patterns, compressed, FineRows(dictionary, np, capacity=2**40))

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    agree = float((result.indices[:, 0] == best)[diffracting].mean())
    print(f"defaults {default}: agreement {agree:.5f}")
    assert agree >= 0.999
    assert bench_map["within"](result.indices[:, 0]) >= bench_map["within"](best) - 0.001
