"""dpm: dynamic pattern matching for EBSD — dictionary indexing on NumPy or CuPy.

``import dpm`` is cheap: the public names below are resolved on first use, so
NumPy-only callers never import CuPy, kikuchipy or dask until a stage needs them.

Examples
--------
>>> import dpm
>>> mp = dpm.simulate_master_pattern("li", kv=20, npx=60)    # doctest: +SKIP
>>> result = dpm.index(patterns, phase="li", detector=det)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger("dpm").addHandler(logging.NullHandler())

#: Public name -> module that defines it.
_PUBLIC = {
    "index": "dpm.pipeline",
    "IndexConfig": "dpm.pipeline",
    "IndexResult": "dpm.pipeline",
    "get_phase": "dpm.crystal",
    "MasterPattern": "dpm.master",
    "simulate_master_pattern": "dpm.master",
    "read_master_pattern": "dpm.io.emsoft",
    "write_master_pattern": "dpm.io.emsoft",
    "Detector": "dpm.detector",
    "project": "dpm.projection",
    "sample_orientations": "dpm.sampling",
    "Dictionary": "dpm.dictionary",
    "match": "dpm.match",
    "MatchConfig": "dpm.match",
    "MatchResult": "dpm.match",
    "synthetic_map": "dpm.synthetic",
    "read_patterns": "dpm.io.readers",
    "PreprocessConfig": "dpm.preprocess",
    "preprocess_stack": "dpm.preprocess",
    "band_contrast": "dpm.quality",
    "pattern_quality": "dpm.quality",
    "refine": "dpm.refine",
    "RefineConfig": "dpm.refine",
    "RefineResult": "dpm.refine",
    "replace_zero_solutions": "dpm.cleanup",
    "ZeroSolutionConfig": "dpm.cleanup",
    "clean_map": "dpm.cleanup",
    "MapCleanupConfig": "dpm.cleanup",
    "clean_pseudo_symmetry": "dpm.pseudo_symmetry",
    "PseudoSymmetryConfig": "dpm.pseudo_symmetry",
    "grains": "dpm.grains",
    "GrainConfig": "dpm.grains",
    "GrainMap": "dpm.grains",
    "boundary_traces": "dpm.boundaries",
    "BoundaryConfig": "dpm.boundaries",
    "read_map": "dpm.io.readers",
    "write_ang": "dpm.io.writers",
    "write_ctf": "dpm.io.writers",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dpm' has no attribute {name!r}")
    value = importlib.import_module(module)
    if module != f"dpm.{name}":  # ``dpm.grains`` is its module, callable as its function
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
