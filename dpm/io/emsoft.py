"""Master patterns in EMsoft's HDF5 layout (``EMEBSDmaster.f90`` output).

:func:`write_master_pattern` writes the groups kikuchipy's EMsoft master
pattern reader needs, so ``kikuchipy.load(path, projection="lambert",
hemisphere="both")`` opens dpm's files:

* ``EMheader/EBSDmaster/ProgramName`` = ``"EMEBSDmaster.f90"``;
* ``NMLparameters/EBSDMasterNameList/{npx, dmin [nm], latgridtype}``,
  ``NMLparameters/MCCLNameList/{EkeV, Ehistmin, Ebinsize [keV], xtalname, ...}``
  and ``NMLparameters/DPMNameList`` (dpm's own simulation parameters);
* ``CrystalData``: ``AtomData`` (5, ntype) float32 = x, y, z, occupancy,
  B [nm²] of the asymmetric unit, ``Atomtypes`` (Z), ``Natomtypes``,
  ``LatticeParameters`` (a, b, c in nm; α, β, γ in degrees),
  ``SpaceGroupNumber``, ``SpaceGroupSetting``, ``CrystalSystem``, ``Source``;
* ``EMData/EBSDmaster``: ``mLPNH``/``mLPSH`` float32 (numset = 1, numEbins = 1,
  2 npx + 1, 2 npx + 1) with ``[.., row = Lambert y, col = Lambert x]``,
  ``masterSPNH``/``masterSPSH`` (1, 2 npx + 1, 2 npx + 1) stereographic
  projections computed from the Lambert data, ``EkeVs``, ``numEbins``,
  ``numset``, ``lastEnergy``, ``xtalname``.

Scalars are stored as 1-element arrays and strings as 1-element fixed-length
byte strings, as EMsoft does. :func:`read_master_pattern` reads such files
(EMsoft's, kikuchipy's test files, dpm's) and falls back to
``kikuchipy.load`` for any other master-pattern file kikuchipy reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpm.io.writers import atomic_write_hdf5
from dpm.master import MasterPattern
from dpm.master.lambert import lambert_to_stereographic

if TYPE_CHECKING:
    import h5py
    from orix.crystal_map import Phase

__all__ = [
    "MasterPatternFileError",
    "read_master_pattern",
    "write_master_pattern",
]

_PROGRAM_NAMES = ("EMEBSDmaster.f90", "EMEBSDmasterOpenCL.f90")
_DATA = "EMData/EBSDmaster"


class MasterPatternFileError(ValueError):
    """A master-pattern file is missing, not HDF5, or lacks a required dataset."""


# --------------------------------------------------------------------------- writing


def _crystal_system(space_group: int) -> int:
    """EMsoft's crystal-system code: 1 cubic, 2 tetragonal, 3 orthorhombic,
    4 hexagonal, 5 trigonal, 6 monoclinic, 7 triclinic."""
    for last, code in ((2, 7), (15, 6), (74, 3), (142, 2), (167, 5), (194, 4), (230, 1)):
        if space_group <= last:
            return code
    raise ValueError(f"space group number must be 1-230, got {space_group}")


def _asymmetric_unit(phase: Phase) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One atom per space-group orbit (EMsoft expands ``AtomData`` itself)."""
    from dpm.crystal import unit_cell_atoms

    z, xyz, occ, b_iso = unit_cell_atoms(phase)
    ops = phase.space_group.symop_list
    rot = np.array([op.R for op in ops], dtype=np.float64)
    trans = np.array([op.t for op in ops], dtype=np.float64)
    keep: list[int] = []
    covered = np.zeros(len(z), dtype=bool)
    for i in range(len(z)):
        if covered[i]:
            continue
        keep.append(i)
        images = np.mod(np.round(np.einsum("mij,j->mi", rot, xyz[i]) + trans, 6), 1.0)
        diff = np.abs(xyz[:, None, :] - images[None, :, :])
        diff = np.minimum(diff, 1 - diff).max(axis=-1)  # (atoms, images), periodic
        covered |= (diff < 1e-4).any(axis=1) & (z == z[i])
    k = np.array(keep)
    return z[k], xyz[k], occ[k], b_iso[k]


def _bytes(text: str) -> np.ndarray:
    data = str(text).encode("utf-8")
    return np.array([data], dtype=f"S{max(len(data), 1)}")


def _write_group(group: h5py.Group, content: dict[str, Any]) -> None:
    for key, value in content.items():
        if isinstance(value, dict):
            _write_group(group.require_group(key), value)
        elif isinstance(value, str):
            group.create_dataset(key, data=_bytes(value))
        elif isinstance(value, np.ndarray) and value.size >= 4096:  # pattern arrays
            group.create_dataset(key, data=value, compression="gzip", compression_opts=4,
                                 shuffle=True)
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        elif isinstance(value, bool | np.bool_):
            group.create_dataset(key, data=np.array([int(value)], dtype=np.int32))
        elif isinstance(value, int | np.integer):
            group.create_dataset(key, data=np.array([value], dtype=np.int32))
        elif isinstance(value, float | np.floating):
            group.create_dataset(key, data=np.array([value], dtype=np.float64))
        else:
            raise TypeError(f"cannot write {key!r} of type {type(value).__name__} to HDF5")


def write_master_pattern(mp: MasterPattern, path: str | Path) -> Path:
    """Write a master pattern to an HDF5 file in EMsoft's ``EMEBSDmaster`` layout.

    Parameters
    ----------
    mp
        Master pattern (one energy, both hemispheres).
    path
        Output file (overwritten). Lattice parameters are written in nm and
        Debye–Waller factors in nm², as EMsoft does. The file is written
        whole or not at all (:func:`dpm.io.writers.atomic_write_hdf5`).

    Returns
    -------
    path
        The written file.

    Raises
    ------
    ValueError
        If the phase has no space group.
    dpm.io.writers.OutputError
        If the file cannot be written (named in the message).

    Examples
    --------
    >>> import kikuchipy as kp                                   # doctest: +SKIP
    >>> write_master_pattern(mp, "li.h5")                        # doctest: +SKIP
    >>> kp.load("li.h5", projection="lambert", hemisphere="both")  # doctest: +SKIP
    """
    import h5py

    import dpm
    from dpm.crystal import electron_wavelength

    path = Path(path)
    phase = mp.phase
    if phase.space_group is None:
        raise ValueError(f"phase {phase.name!r} of the master pattern has no space group")
    z, xyz, occ, b_iso = _asymmetric_unit(phase)
    atom_data = np.stack([xyz[:, 0], xyz[:, 1], xyz[:, 2], occ, b_iso / 100.0]).astype(np.float32)
    lat = phase.structure.lattice
    lattice = np.array([lat.a / 10, lat.b / 10, lat.c / 10, lat.alpha, lat.beta, lat.gamma])
    sg = int(phase.space_group.number)
    name = phase.name or "phase"  # "li/li.xtal": kikuchipy names the phase by the folder
    npx = mp.npx
    params = dict(mp.params)
    dmin = float(params.get("dmin_nm", 0.05))
    north = mp.northern[None, None]
    south = mp.southern[None, None]
    content = {
        "EMheader": {"EBSDmaster": {
            "ProgramName": np.array([b"EMEBSDmaster.f90"], dtype="S16"),
            "Version": f"dpm {dpm.__version__}",
        }},
        "NMLparameters": {
            "EBSDMasterNameList": {
                "npx": npx, "dmin": dmin, "latgridtype": "Lambert", "combinesites": 1,
                "energyfile": "", "Esel": -1,
            },
            "MCCLNameList": {
                "EkeV": float(mp.energy), "Ehistmin": float(mp.energy), "Ebinsize": 1.0,
                "xtalname": f"{name}/{name}.xtal", "numsx": npx, "MCmode": "none",
            },
            "DPMNameList": {
                "method": mp.method,
                "energy_keV": float(mp.energy),
                "wavelength_nm": electron_wavelength(mp.energy),
                "params_json": json.dumps(params, sort_keys=True, default=str),
            },
        },
        "CrystalData": {
            "AtomData": atom_data,
            "Atomtypes": z.astype(np.int32),
            "Natomtypes": len(z),
            "LatticeParameters": lattice,
            "SpaceGroupNumber": sg,
            "SpaceGroupSetting": 1,
            "CrystalSystem": _crystal_system(sg),
            "Source": f"dpm {dpm.__version__}: phase {name!r}",
        },
        "EMData": {"EBSDmaster": {
            "mLPNH": north,
            "mLPSH": south,
            "masterSPNH": lambert_to_stereographic(mp.northern)[None],
            "masterSPSH": lambert_to_stereographic(mp.southern)[None],
            "EkeVs": np.array([mp.energy], dtype=np.float32),
            "numEbins": 1,
            "numset": 1,
            "lastEnergy": 1,
            "xtalname": f"{name}/{name}.xtal",
        }},
    }

    def fill(buffer: Any) -> None:
        with h5py.File(buffer, "w") as f:
            _write_group(f, content)
            f[_DATA].attrs["HDF_FileVersion"] = np.bytes_("4.0")

    return atomic_write_hdf5(path, fill)


# --------------------------------------------------------------------------- reading


def _scalar(ds: h5py.Dataset) -> Any:
    value = ds[()]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        value = value.decode("utf-8", errors="replace").strip()
    return value


def _phase_from_crystal_data(group: h5py.Group, name: str) -> Phase:
    """orix phase (lattice in Å, B in Å²) from EMsoft's ``CrystalData``."""
    from diffpy.structure import Atom, Lattice, Structure
    from orix.crystal_map import Phase

    from dpm._scattering_tables import SYMBOLS

    n = int(_scalar(group["Natomtypes"]))
    atom_data = np.asarray(group["AtomData"][()], dtype=np.float64).reshape(5, -1)[:, :n]
    types = np.asarray(group["Atomtypes"][()]).reshape(-1)[:n]
    a, b, c, alpha, beta, gamma = np.asarray(group["LatticeParameters"][()], dtype=np.float64)
    atoms = [Atom(SYMBOLS[int(t) - 1], xyz=atom_data[:3, i], occupancy=atom_data[3, i],
                  Uisoequiv=atom_data[4, i] * 100 / (8 * math.pi**2))
             for i, t in enumerate(types)]
    structure = Structure(atoms=atoms, lattice=Lattice(10 * a, 10 * b, 10 * c, alpha, beta, gamma))
    return Phase(name=name, space_group=int(_scalar(group["SpaceGroupNumber"])), structure=structure)


def _require(f: h5py.File, key: str, path: Path) -> h5py.Dataset | h5py.Group:
    if key not in f:
        raise MasterPatternFileError(f"{str(path)!r}: missing dataset {key!r} "
                                     f"(not an EMsoft EBSD master-pattern file?)")
    return f[key]


def _read_emsoft(f: h5py.File, path: Path, energy: float | None) -> MasterPattern:
    _require(f, _DATA, path)
    energies = np.atleast_1d(np.asarray(_require(f, f"{_DATA}/EkeVs", path)[()], dtype=np.float64))
    if energy is None:
        index = int(np.argmax(energies))
    else:
        index = int(np.argmin(np.abs(energies - energy)))
        if abs(energies[index] - energy) > 0.5:
            raise MasterPatternFileError(
                f"{str(path)!r}: no energy slice near {energy} keV; the file has "
                f"{np.round(energies, 3).tolist()} keV")
    hemispheres = []
    for key in ("mLPNH", "mLPSH"):
        ds = _require(f, f"{_DATA}/{key}", path)
        if ds.ndim == 4:  # (numset, numEbins, N, N): sum over sites, as kikuchipy does
            arr = np.asarray(ds[:, index], dtype=np.float64).sum(axis=0)
        elif ds.ndim == 3:  # (numEbins, N, N)
            arr = np.asarray(ds[index], dtype=np.float64)
        elif ds.ndim == 2:
            arr = np.asarray(ds[()], dtype=np.float64)
        else:
            raise MasterPatternFileError(
                f"{str(path)!r}: dataset '{_DATA}/{key}' has shape {ds.shape}; expected "
                f"(numset, numEbins, N, N)")
        hemispheres.append(arr)
    name = path.stem
    if f"{_DATA}/xtalname" in f:
        name = Path(str(_scalar(f[f"{_DATA}/xtalname"]))).stem or name
    phase = _phase_from_crystal_data(_require(f, "CrystalData", path), name)
    method, params = "file", {}
    dpm_group = "NMLparameters/DPMNameList"
    if dpm_group in f:
        method = str(_scalar(f[f"{dpm_group}/method"]))
        params = json.loads(str(_scalar(f[f"{dpm_group}/params_json"])))
    params.setdefault("source_file", str(path))
    return MasterPattern(hemispheres[0], hemispheres[1], phase=phase,
                         energy=float(energies[index]), method=method, params=params)


def read_master_pattern(path: str | Path, energy: float | None = None) -> MasterPattern:
    """Read one energy of a master pattern (Lambert, both hemispheres).

    EMsoft ``EMEBSDmaster`` files (and dpm's, which use that layout) are read
    directly: the ``mLPNH``/``mLPSH`` slice of the chosen energy, summed over
    the ``numset`` (site) axis as kikuchipy does; the phase comes from
    ``CrystalData`` with the lattice converted to Å and B to Å². Any other
    HDF5 master-pattern file is handed to ``kikuchipy.load``.

    Parameters
    ----------
    path
        HDF5 file.
    energy
        Beam energy in keV; the nearest slice (within 0.5 keV) is read. None
        reads the highest energy, kikuchipy's default for projections.

    Returns
    -------
    MasterPattern
        float32 hemispheres; ``method`` is the simulation method for dpm's
        files and ``"file"`` otherwise.

    Raises
    ------
    MasterPatternFileError
        If the file is missing, not HDF5, lacks a required dataset, or has no
        such energy; the message names the file and the dataset.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MasterPatternFileError(f"master-pattern file {str(path)!r} does not exist")
    if not h5py.is_hdf5(path):
        raise MasterPatternFileError(f"master-pattern file {str(path)!r} is not an HDF5 file")
    with h5py.File(path, "r") as f:
        program_key = "EMheader/EBSDmaster/ProgramName"
        if program_key in f and str(_scalar(f[program_key])) in _PROGRAM_NAMES:
            return _read_emsoft(f, path, energy)
    return _read_with_kikuchipy(path, energy)


def _read_with_kikuchipy(path: Path, energy: float | None) -> MasterPattern:
    import kikuchipy as kp

    try:
        signal = kp.load(path, projection="lambert", hemisphere="both")
    except Exception as exc:  # kikuchipy raises IOError/KeyError/ValueError by format
        raise MasterPatternFileError(
            f"{str(path)!r} is neither an EMsoft EBSD master-pattern file (no dataset "
            f"'EMheader/EBSDmaster/ProgramName') nor a file kikuchipy reads as a master "
            f"pattern: {exc}") from exc
    if type(signal).__name__ not in ("EBSDMasterPattern", "LazyEBSDMasterPattern"):
        raise MasterPatternFileError(
            f"{str(path)!r} holds a {type(signal).__name__}, not an EBSD master pattern")
    mp = MasterPattern.from_kikuchipy(signal, energy=energy)
    phase = mp.phase
    # kikuchipy keeps EMsoft's lattice in nm; no crystal has a lattice length below 1.5 Å.
    if phase.structure.lattice.a < 1.5:
        phase = _phase_in_angstrom(phase)
    return MasterPattern(mp.northern, mp.southern, phase=phase, energy=mp.energy, method="file",
                         params={"source_file": str(path)})


def _phase_in_angstrom(phase: Phase) -> Phase:
    """Copy of *phase* with its lattice lengths multiplied by 10 (nm -> Å), same fractions."""
    import copy

    from orix.crystal_map import Phase as OrixPhase

    structure = copy.deepcopy(phase.structure)
    lat = structure.lattice
    lat.setLatPar(10 * lat.a, 10 * lat.b, 10 * lat.c, lat.alpha, lat.beta, lat.gamma)
    return OrixPhase(name=phase.name, space_group=phase.space_group, structure=structure)
