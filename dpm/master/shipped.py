"""Dynamical Li and Na master patterns shipped inside the package.

Indexing Li or Na at the users' two voltages (20 kV and 10 kV) needs no
simulation: the package carries their dynamical master patterns in EMsoft's
HDF5 layout (``dpm/data/{li,na}_{20,10}kv.h5``). They were made by
:func:`make_shipped_master_patterns`, i.e. ``dpm.simulate_master_pattern(phase,
kv=kv, npx=SHIPPED_NPX, method="dynamical")`` with the default
:class:`~dpm.master.dynamical.DynamicalConfig` (single energy, exponential
depth profile) and the built-in phases of :func:`dpm.crystal.get_phase`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpm.master import MasterPattern

#: Lambert half-width of the shipped master patterns (501² pixels per hemisphere).
SHIPPED_NPX = 250
#: (phase name, kV) -> file name in ``dpm/data``.
SHIPPED = {
    ("li", 20.0): "li_20kv.h5",
    ("li", 10.0): "li_10kv.h5",
    ("na", 20.0): "na_20kv.h5",
    ("na", 10.0): "na_10kv.h5",
}


def shipped_path(phase: str, kv: float) -> Path | None:
    """Path of the shipped master pattern of a built-in phase at ``kv``, or None."""
    name = SHIPPED.get((str(phase).lower(), float(kv)))
    if name is None:
        return None
    path = Path(str(resources.files("dpm.data") / name))
    return path if path.is_file() else None


def shipped_master_pattern(phase: str, kv: float) -> MasterPattern | None:
    """The shipped dynamical master pattern of ``phase`` at ``kv``, or None if none is shipped."""
    from dpm.io.emsoft import read_master_pattern

    path = shipped_path(phase, kv)
    return read_master_pattern(path) if path is not None else None


def make_shipped_master_patterns(folder: str | Path) -> list[Path]:
    """Simulate and write the shipped master patterns into ``folder`` (how they were made)."""
    from dpm.io.emsoft import write_master_pattern
    from dpm.master import simulate_master_pattern

    folder = Path(folder)
    written = []
    for (phase, kv), name in SHIPPED.items():
        mp = simulate_master_pattern(phase, kv=kv, npx=SHIPPED_NPX, method="dynamical")
        written.append(write_master_pattern(mp, folder / name))
    return written
