"""Crystal phases, electron wavelength and electron structure factors.

Units, everywhere in this module unless a name says otherwise:

* lattice parameters and interplanar spacings of orix/diffpy objects in Å
  (orix convention), but the public ``dmin_nm`` and the returned ``d`` of
  :func:`reflectors` in nm (EMsoft convention);
* reciprocal vectors ``g`` in Å⁻¹ without a 2π factor, ``|g| = 1/d``;
* ``s = sin(theta)/lambda = |g|/2`` in Å⁻¹;
* scattering amplitudes ``f`` and structure factors ``F`` in Å;
* Debye–Waller factors ``B = 8 pi² <u²>`` in Å², applied as ``exp(-B s²)``;
* the electron wavelength in nm, the accelerating voltage in kV.

The elastic electron scattering amplitude is the Weickenmeier–Kohl
parametrisation (Acta Cryst. A47 (1991) 590) in the four-term form EMsoft
uses (``others.f90``, ``GETWK``/``WEKO``), tabulated for Z = 1–98 in
:mod:`dpm._scattering_tables`.

Examples
--------
>>> from dpm.crystal import get_phase, structure_factor
>>> li = get_phase("li")
>>> abs(structure_factor(li, [[1, 0, 0], [1, 1, 0]], kv=20.0)).round(3)   # Å
array([0.   , 1.212])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import constants

from dpm._scattering_tables import SYMBOLS, WK_A, WK_B

if TYPE_CHECKING:
    from orix.crystal_map import Phase

__all__ = [
    "BUILTIN_PHASES",
    "PhaseNotFoundError",
    "Reflectors",
    "atomic_number",
    "electron_scattering_factor",
    "electron_wavelength",
    "get_phase",
    "reciprocal_vectors",
    "reflectors",
    "structure_factor",
    "unit_cell_atoms",
]

#: Elements beyond the scattering tables (Z = 99-118), recognised only to name them in errors.
_SYMBOLS_UNTABULATED = ("Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds",
                        "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og")

_WK_A = np.asarray(WK_A, dtype=np.float64)
_WK_B = np.asarray(WK_B, dtype=np.float64)


@dataclass(frozen=True)
class _BuiltinPhase:
    element: str
    space_group: int
    a: float  # Å
    sites: tuple[tuple[float, float, float], ...]  # every atom of the conventional cell
    B: float  # Å², room temperature
    source: str


_BCC = ((0.0, 0.0, 0.0), (0.5, 0.5, 0.5))
_FCC = ((0.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.5, 0.0, 0.5), (0.5, 0.5, 0.0))
_PENG = ("B at 293 K extrapolated linearly in T from the 280 K value of Peng, Ren, Dudarev & "
         "Whelan, Acta Cryst. A52 (1996) 456, Table 1")

#: Built-in phases (keys are the lower-case names :func:`get_phase` accepts).
#: Lattice parameters in Å; Debye–Waller B in Å² at room temperature (293 K).
BUILTIN_PHASES: dict[str, _BuiltinPhase] = {
    # a: Nadler & Kempter, Anal. Chem. 31 (1959) 2109. B(280 K) = 4.595 Å².
    "li": _BuiltinPhase("Li", 229, 3.51, _BCC, 4.81, _PENG),
    # a: Aruja & Perlitz, Z. Krist. 100 (1939) 195. B(280 K) = 6.364 Å².
    "na": _BuiltinPhase("Na", 229, 4.29, _BCC, 6.66, _PENG),
    # a: room-temperature handbook value. B(280 K) = 0.746 Å² (Sears & Shelley 1991: 0.81).
    "al": _BuiltinPhase("Al", 225, 4.0495, _FCC, 0.781, _PENG),
    # a: room-temperature handbook value. B(280 K) = 0.526 Å² (Sears & Shelley 1991: 0.56).
    "cu": _BuiltinPhase("Cu", 225, 3.6149, _FCC, 0.550, _PENG),
}


class PhaseNotFoundError(ValueError):
    """A phase name is neither a built-in phase nor an existing CIF file."""


def get_phase(name: str | Path) -> Phase:
    """Return an orix phase by built-in name or from a CIF file.

    Parameters
    ----------
    name
        ``"li"``, ``"na"`` (bcc, Im-3m, no. 229), ``"al"``, ``"cu"`` (fcc,
        Fm-3m, no. 225), case-insensitive, or the path of a CIF file.
        Built-ins hold every atom of the conventional cell (2 for bcc, 4 for
        fcc) with the room-temperature Debye–Waller factor of
        :data:`BUILTIN_PHASES`; a CIF's ``B_iso``/``U_iso`` is its sites'
        Debye–Waller factor.

    Returns
    -------
    phase
        orix phase with the lattice in Å and the space group set.

    Raises
    ------
    PhaseNotFoundError
        If *name* is not a built-in name (a ``ValueError``), or the CIF has
        no space group.
    FileNotFoundError
        If *name* looks like a file path (has a suffix or a directory) and no
        such file exists.
    """
    from diffpy.structure import Atom, Lattice, Structure
    from orix.crystal_map import Phase

    key = str(name).strip().lower()
    spec = BUILTIN_PHASES.get(key)
    if spec is not None:
        u_iso = spec.B / (8 * math.pi**2)
        atoms = [Atom(spec.element, xyz=xyz, Uisoequiv=u_iso) for xyz in spec.sites]
        lattice = Lattice(spec.a, spec.a, spec.a, 90, 90, 90)
        return Phase(name=key, space_group=spec.space_group,
                     structure=Structure(atoms=atoms, lattice=lattice))
    path = Path(name).expanduser()
    if not path.is_file():
        message = (f"phase {str(name)!r} is neither a built-in phase nor an existing CIF file; "
                   f"built-in phases: {', '.join(sorted(BUILTIN_PHASES))}")
        if path.suffix or len(path.parts) > 1:  # meant as a file
            raise FileNotFoundError(message)
        raise PhaseNotFoundError(message)
    import warnings

    with warnings.catch_warnings():  # orix warns and carries on; dpm raises below
        warnings.simplefilter("ignore", UserWarning)
        phase = Phase.from_cif(path)
    if len(phase.structure) == 0:
        raise PhaseNotFoundError(f"CIF file {str(path)!r} lists no atom sites "
                                 "(an _atom_site_ loop with fractional coordinates is needed)")
    if phase.space_group is None:
        raise PhaseNotFoundError(f"CIF file {str(path)!r} does not give a space group")
    return phase


def atomic_number(symbol: str | int) -> int:
    """Return the atomic number of an element symbol such as ``"Li"``, ``"Li1+"`` or ``3``.

    Raises
    ------
    ValueError
        If the symbol is not an element, or is one beyond the scattering
        tables (Z > 98, e.g. ``"Es"``; the message says so).
    """
    text = str(symbol).strip()
    if text.isdigit():
        z = int(text)
    else:
        match = re.match(r"[A-Za-z]{1,2}", text)
        cand = match.group(0).capitalize() if match else ""
        known = SYMBOLS + _SYMBOLS_UNTABULATED
        if cand not in known and cand[:1] in known:
            cand = cand[:1]  # "Cl" vs "C": take the two-letter symbol only when it exists
        z = known.index(cand) + 1 if cand in known else 0
    if len(SYMBOLS) < z <= len(SYMBOLS) + len(_SYMBOLS_UNTABULATED):
        raise ValueError(f"element {symbol!r} (Z = {z}) has no Weickenmeier-Kohl scattering "
                         f"parameters; dpm tabulates Z = 1-{len(SYMBOLS)} (H-{SYMBOLS[-1]})")
    if not 1 <= z <= len(SYMBOLS):
        raise ValueError(f"element {symbol!r} is not an element with Z = 1-{len(SYMBOLS)}")
    return z


def electron_wavelength(kv: float, inner_potential: float = 0.0) -> float:
    """Relativistic electron wavelength in nm.

    ``lambda = h / sqrt(2 m0 e Psi)`` with ``Psi = E (1 + e E / (2 m0 c²)) + V0``
    (EMsoft ``CalcWaveLength``), CODATA constants from :mod:`scipy.constants`.

    Parameters
    ----------
    kv
        Accelerating voltage ``E`` in kV (> 0).
    inner_potential
        Mean inner potential ``V0`` in V (refraction correction inside the
        crystal); 0 gives the vacuum wavelength.

    Returns
    -------
    wavelength
        In nm (0.0085885 nm at 20 kV in vacuum).

    Raises
    ------
    ValueError
        If *kv* is not positive or *inner_potential* is negative.
    """
    if not kv > 0:
        raise ValueError(f"accelerating voltage must be positive (kV), got {kv}")
    if inner_potential < 0:
        raise ValueError(f"mean inner potential must be >= 0 V, got {inner_potential}")
    e, m0, c, h = constants.e, constants.m_e, constants.c, constants.h
    volts = kv * 1e3
    psi = volts * (1 + e * volts / (2 * m0 * c**2)) + inner_potential
    return h / math.sqrt(2 * m0 * e * psi) * 1e9


def electron_scattering_factor(z: int | np.ndarray, s: float | np.ndarray) -> np.ndarray:
    """Elastic electron atomic scattering amplitude (Weickenmeier & Kohl 1991), in Å.

    ``f(s) = sum_{i=1..4} A_i (1 - exp(-B_i s²)) / s²`` with the four-term
    ``A_i`` (Å⁻¹), ``B_i`` (Å²) of :mod:`dpm._scattering_tables`, and its limit
    ``f(0) = sum_i A_i B_i``. EMsoft's ``WEKO`` replaces a term by
    ``A_i B_i (1 - B_i s² / 2)`` where ``B_i s² < 0.1``, which is off by up to
    0.17 % of that term and steps at the switch; here ``1 - exp(-x)`` is
    evaluated with ``expm1``, exact and smooth down to ``s -> 0``. No
    Debye–Waller factor and no relativistic factor are applied.

    Parameters
    ----------
    z : (...) int array
        Atomic numbers, 1–98.
    s : (...) array
        ``sin(theta)/lambda = |g|/2`` in Å⁻¹ (>= 0); broadcast against *z*.

    Returns
    -------
    f : (...) float64 array
        Scattering amplitude in Å.

    Examples
    --------
    >>> round(float(electron_scattering_factor(3, 0.0)), 3)   # Li, f(0) in Å
    3.271
    """
    z = np.asarray(z)
    s = np.asarray(s, dtype=np.float64)
    if not np.issubdtype(z.dtype, np.integer):
        raise TypeError(f"atomic numbers must be integers, got dtype {z.dtype}")
    if z.size and (z.min() < 1 or z.max() > len(SYMBOLS)):
        raise ValueError(f"atomic numbers must be in 1-{len(SYMBOLS)}, got {np.unique(z)}")
    if s.size and np.nanmin(s) < 0:
        raise ValueError("s = sin(theta)/lambda must be >= 0")
    z, s = np.broadcast_arrays(z, s)
    a = _WK_A[z - 1]  # (..., 4)
    b = _WK_B[z - 1]
    s2 = (s * s)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(s2 > 0, a * -np.expm1(-b * s2) / s2, a * b)
    return terms.sum(axis=-1)


def _fractional_positions(phase: Phase) -> np.ndarray:
    """Atom positions in fractions of the phase's own a, b, c.

    orix re-expresses a structure's positions in its aligned base
    (x || a, z || c*) when the phase is built; the original base it keeps in
    ``_diffpy_lattice`` (as orix's own ``expand_asymmetric_unit`` uses) is the
    one the space-group operations refer to.
    """
    structure = phase.structure
    xyz = np.asarray(structure.xyz, dtype=np.float64).reshape(-1, 3)
    old_base = getattr(phase, "_diffpy_lattice", None)
    if old_base is None:
        return xyz
    cart = xyz @ structure.lattice.base
    return cart @ np.linalg.inv(np.asarray(old_base, dtype=np.float64))


def unit_cell_atoms(phase: Phase) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every atom of the conventional unit cell, expanded with the space group.

    The phase's atoms are taken as an asymmetric unit (a full cell works too:
    images that coincide with an atom of the same element are merged).

    Parameters
    ----------
    phase
        orix phase with a structure and a space group.

    Returns
    -------
    z : (n,) int array
        Atomic numbers.
    xyz : (n, 3) float64 array
        Fractional coordinates in ``[0, 1)``.
    occupancy : (n,) float64 array
        Site occupancies.
    b_iso : (n,) float64 array
        Isotropic Debye–Waller factors ``B = 8 pi² U_iso`` in Å².
    """
    if phase.space_group is None:
        raise ValueError(f"phase {phase.name!r} has no space group; cannot expand its unit cell")
    if len(phase.structure) == 0:
        raise ValueError(f"phase {phase.name!r} has no atoms")
    ops = phase.space_group.symop_list
    rot = np.array([op.R for op in ops], dtype=np.float64)  # (m, 3, 3)
    trans = np.array([op.t for op in ops], dtype=np.float64)  # (m, 3)
    positions = _fractional_positions(phase)
    seen: dict[tuple[int, tuple[int, int, int]], int] = {}
    out_z, out_xyz, out_occ, out_b = [], [], [], []
    for atom, xyz in zip(phase.structure, positions):
        z = atomic_number(atom.element)
        images = np.einsum("mij,j->mi", rot, xyz) + trans
        images = np.mod(np.round(images, 6), 1.0)
        for pos in images:
            key = (z, tuple(int(round(c * 1e4)) % 10000 for c in pos))
            if key in seen:
                continue
            seen[key] = len(out_z)
            out_z.append(z)
            out_xyz.append(pos)
            out_occ.append(float(atom.occupancy))
            out_b.append(float(atom.Bisoequiv))
    return (np.array(out_z, dtype=np.int64), np.array(out_xyz), np.array(out_occ),
            np.array(out_b))


def reciprocal_vectors(phase: Phase, hkl: np.ndarray) -> np.ndarray:
    """Cartesian reciprocal-lattice vectors in the crystal frame, in Å⁻¹ (no 2π).

    The frame is orix's (x || a, z || c*), the frame of master patterns.

    Parameters
    ----------
    phase
        orix phase (lattice in Å).
    hkl : (n, 3) array
        Miller indices.

    Returns
    -------
    g : (n, 3) float64 array
        ``|g| = 1/d_hkl`` in Å⁻¹.
    """
    hkl = np.asarray(hkl, dtype=np.float64).reshape(-1, 3)
    return hkl @ np.asarray(phase.structure.lattice.recbase, dtype=np.float64).T


def structure_factor(phase: Phase, hkl: np.ndarray, kv: float) -> np.ndarray:
    """Electron structure factors of the conventional cell, in Å.

    ``F_g = sum_atoms occ · f_e(s) · exp(-B s²) · exp(2 pi i g·r)`` over every
    atom of the cell (:func:`unit_cell_atoms`), ``s = |g|/2`` in Å⁻¹, with
    ``f_e`` the Weickenmeier–Kohl amplitude (:func:`electron_scattering_factor`).

    Parameters
    ----------
    phase
        orix phase (lattice in Å, any crystal system).
    hkl : (n, 3) or (3,) int array
        Miller indices of the conventional cell.
    kv
        Accelerating voltage in kV. The elastic amplitude itself does not
        depend on it (no relativistic factor is applied, since it scales all
        ``F`` alike); it is validated and kept in the signature so absorptive
        form factors can be added without changing callers.

    Returns
    -------
    F : (n,) complex128 array
        Structure factors in Å; zero (to rounding) for centring-forbidden g.
    """
    if not kv > 0:
        raise ValueError(f"accelerating voltage must be positive (kV), got {kv}")
    hkl = np.atleast_2d(np.asarray(hkl))
    if hkl.ndim != 2 or hkl.shape[1] != 3:
        raise ValueError(f"Expected `hkl` to have shape (n, 3), got {np.shape(hkl)}")
    z, xyz, occ, b_iso = unit_cell_atoms(phase)
    s = 0.5 * np.linalg.norm(reciprocal_vectors(phase, hkl), axis=1)  # (n,)
    f = electron_scattering_factor(z[None, :], s[:, None])  # (n, atoms)
    amplitude = occ * f * np.exp(-b_iso[None, :] * (s * s)[:, None])
    phase_factor = np.exp(2j * np.pi * (hkl.astype(np.float64) @ xyz.T))
    return (amplitude * phase_factor).sum(axis=1)


@dataclass(frozen=True)
class Reflectors:
    """A list of reflectors ``g`` (both ``g`` and ``-g`` are listed).

    Attributes
    ----------
    hkl : (n, 3) int array
        Miller indices.
    d : (n,) float64 array
        Interplanar spacing in nm.
    intensity : (n,) float64 array
        ``|F_hkl|²`` in Å².
    theta : (n,) float64 array
        Bragg angle ``asin(lambda / 2d)`` in radians.
    g : (n, 3) float64 array
        Cartesian reciprocal vectors in the crystal frame, Å⁻¹.
    """

    hkl: np.ndarray
    d: np.ndarray
    intensity: np.ndarray
    theta: np.ndarray
    g: np.ndarray

    def __len__(self) -> int:
        return len(self.hkl)


def reflectors(phase: Phase, dmin_nm: float, kv: float, *, min_relative: float = 1e-6) -> Reflectors:
    """All reflectors with ``d >= dmin_nm`` that are not (near-)extinct.

    Parameters
    ----------
    phase
        orix phase (lattice in Å).
    dmin_nm
        Smallest interplanar spacing in nm (e.g. 0.05).
    kv
        Accelerating voltage in kV; sets the (vacuum) wavelength of ``theta``.
    min_relative
        Reflectors with ``|F|² < min_relative · max |F|²`` are dropped (this
        removes systematic absences, where ``|F|`` is zero to rounding).

    Returns
    -------
    Reflectors
        Sorted by decreasing ``d``, then by ``hkl``.
    """
    if not dmin_nm > 0:
        raise ValueError(f"dmin must be positive (nm), got {dmin_nm}")
    wavelength = electron_wavelength(kv)  # nm
    gmax = 1.0 / (10.0 * dmin_nm)  # Å⁻¹
    # |h| <= gmax * |a_1| bounds every index (|g · a_1| = |h| and |g| <= gmax).
    base = np.asarray(phase.structure.lattice.base, dtype=np.float64)
    nmax = np.floor(gmax * np.linalg.norm(base, axis=1) + 1e-9).astype(int)
    axes = [np.arange(-n, n + 1) for n in nmax]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    g = reciprocal_vectors(phase, hkl)
    glen = np.linalg.norm(g, axis=1)
    keep = glen <= gmax * (1 + 1e-9)
    hkl, g, glen = hkl[keep], g[keep], glen[keep]
    intensity = np.abs(structure_factor(phase, hkl, kv)) ** 2
    if len(intensity) == 0:
        raise ValueError(f"no reflector of phase {phase.name!r} has d >= {dmin_nm} nm")
    keep = intensity >= min_relative * intensity.max()
    hkl, g, glen, intensity = hkl[keep], g[keep], glen[keep], intensity[keep]
    d = 0.1 / glen  # nm
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], -d))
    d = d[order]
    theta = np.arcsin(np.clip(wavelength / (2 * d), -1, 1))
    return Reflectors(hkl=hkl[order].astype(np.int64), d=d, intensity=intensity[order],
                      theta=theta, g=g[order])
