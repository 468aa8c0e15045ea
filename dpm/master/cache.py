"""On-disk cache of simulated master patterns, keyed by a hash of their inputs.

A simulated master pattern depends only on the crystal (lattice, space group,
atoms with occupancies and Debye–Waller factors), the beam energy, the grid
size, the method and its options. :func:`cached_master_pattern` hashes those
inputs, and reads the EMsoft-layout file from the cache folder when it exists,
or simulates and writes it when not. The folder is ``$DPM_CACHE_DIR`` when set,
else ``$XDG_CACHE_HOME/dpm`` (``~/.cache/dpm``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from orix.crystal_map import Phase

    from dpm.master import MasterPattern

log = logging.getLogger("dpm")

#: Bumped whenever a simulation's physics changes, so old cache entries are not reused.
CACHE_VERSION = 2


def cache_dir() -> Path:
    """The master-pattern cache folder (not created here)."""
    if os.environ.get("DPM_CACHE_DIR"):
        return Path(os.environ["DPM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpm"


def input_hash(phase: Phase, kv: float, npx: int, method: str, options: dict[str, Any]) -> str:
    """SHA-256 (hex, 16 characters) of everything a simulation depends on."""
    from dpm.crystal import unit_cell_atoms

    z, xyz, occupancy, b_iso = unit_cell_atoms(phase)
    lattice = phase.structure.lattice
    record = {
        "version": CACHE_VERSION,
        "space_group": int(phase.space_group.number) if phase.space_group is not None else None,
        "lattice": [round(float(v), 8) for v in lattice.abcABG()],
        "atoms": np.round(np.column_stack([z, xyz, occupancy, b_iso]), 8).tolist(),
        "kv": round(float(kv), 6),
        "npx": int(npx),
        "method": method,
        "options": {k: options[k] for k in sorted(options)},
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_master_pattern(
    phase: str | Phase,
    kv: float = 20.0,
    npx: int = 500,
    method: str = "dynamical",
    **options: Any,
) -> MasterPattern:
    """:func:`dpm.master.simulate_master_pattern`, reusing an earlier result from the cache.

    A cache folder that cannot be written only costs the reuse: the pattern is
    simulated and returned, and a warning says why it was not stored.
    """
    from dpm.crystal import get_phase
    from dpm.io.emsoft import read_master_pattern, write_master_pattern
    from dpm.master import simulate_master_pattern

    ph = get_phase(phase) if isinstance(phase, str) else phase
    path = cache_dir() / f"{ph.name or 'phase'}-{method}-{kv:g}kV-npx{npx}-{input_hash(ph, kv, npx, method, options)}.h5"
    if path.is_file():
        try:
            mp = read_master_pattern(path)
            log.info("master pattern from the cache: %s", path)
            return mp
        except ValueError as e:  # a damaged entry is simulated again
            log.warning("ignoring unreadable cache entry %s (%s)", path, e)
    mp = simulate_master_pattern(ph, kv=kv, npx=npx, method=method, **options)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_master_pattern(mp, tmp)
        tmp.replace(path)  # atomic: a reader never sees a half-written entry
    except OSError as e:
        log.warning("could not cache the master pattern in %s (%s)", path.parent, e)
        if tmp.is_file():
            tmp.unlink()
    return mp
