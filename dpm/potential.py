"""Complex Fourier coefficients of the crystal potential for Bloch-wave simulations.

This is EMsoft's ``CalcUcg`` in Weickenmeier–Kohl mode with absorption (the
mode ``Initialize_Cell`` always uses), rewritten as vectorised NumPy:

* atomic scattering amplitudes: elastic ``f`` (Weickenmeier & Kohl, Acta
  Cryst. A47 (1991) 590) and absorptive ``f'`` = core (inner-shell) loss
  (``FCORE``, after H. Rose, Optik 45 (1976) 139) plus thermal diffuse
  scattering (``FPHON``, closed-form integrals with the exponential integral),
  as in EMsoft ``others.f90``;
* ``V_g + i V'_g = h² / (2 pi m0 e Omega) · sum_atoms occ · (f + i f') · exp(-2 pi i g·r)``
  (volts), with the relativistic factor ``gamma`` in ``f`` and ``gamma²/K0``
  in ``f'``;
* ``U_g + i U'_g = (2 m0 e / h²) (V_g + i V'_g)`` (nm⁻², EMsoft's complex
  ``Ucg``); mean inner potential, refraction-corrected wavelength,
  interaction constant, extinction distances and absorption lengths
  (EMsoft ``CalcWaveLength``).

Units, everywhere in this module:

* reciprocal vectors ``g`` without a 2 pi factor; ``s = sin(theta)/lambda = |g|/2``
  in Å⁻¹ for the atomic amplitudes, which are in Å;
* Debye–Waller factors ``B = 8 pi² <u²>`` in Å², applied as ``exp(-B s²)``
  (this is EMsoft's ``DEWA = exp(-u² G² / 2)`` with ``G = 4 pi s``);
* potentials in V; ``U`` in nm⁻²; wavelengths, extinction distances and
  absorption lengths in nm; wave numbers ``k0 = 1/lambda`` in nm⁻¹;
* accelerating voltage in kV.

Physical constants are CODATA values from :mod:`scipy.constants`, where
EMsoft has rounded literals (``preg = 0.664840340614319``, ``0.04787801``,
``511`` keV, Bohr radius ``0.5289`` Å, ``K0 = 0.5068 sqrt(1022 E + E²)``);
the two agree to better than 2e-4. EMsoft works in single precision and
evaluates the exponential integral with a rational/series approximation and
a 21-entry table; here ``Ei`` is :func:`scipy.special.expi` and the scaled
``exp(-x) Ei(x)`` its asymptotic series for large ``x``. The elastic ``f`` is
:func:`dpm.crystal.electron_scattering_factor`, exact where EMsoft's ``WEKO``
switches to a small-argument expansion (a <= 0.17 % difference per term).

Sign convention: the phase factor is EMsoft's ``exp(-2 pi i g·r)``, the
complex conjugate of :func:`dpm.crystal.structure_factor`'s.

Examples
--------
>>> from dpm.crystal import get_phase
>>> from dpm.potential import fourier_coefficients
>>> fc = fourier_coefficients(get_phase("li"), [[0, 0, 0], [1, 1, 0]], kv=20.0)
>>> round(fc.V0, 2), round(fc.wavelength_nm, 6)          # V, nm
(7.53, 0.008587)
>>> fc.U.real.round(3), fc.xi.round(0)                    # nm⁻², nm
(array([5.004, 0.927]), array([ 23., 126.]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import constants, special

from dpm._scattering_tables import SYMBOLS, WK_A, WK_B
from dpm.crystal import (
    electron_scattering_factor,
    electron_wavelength,
    reciprocal_vectors,
    unit_cell_atoms,
)

if TYPE_CHECKING:
    from orix.crystal_map import Phase

__all__ = [
    "FourierCoefficients",
    "FourierLUT",
    "absorptive_form_factor",
    "fourier_coefficients",
    "hkl_max_for",
    "lookup_table",
]

_WK_A = np.asarray(WK_A, dtype=np.float64)  # Å⁻¹
_WK_B = np.asarray(WK_B, dtype=np.float64)  # Å²
_FOURPI = 4.0 * math.pi
#: Rest energy m0 c² in keV.
_MC2_KEV = constants.m_e * constants.c**2 / constants.e / 1e3
#: Bohr radius in Å.
_BOHR_A = constants.physical_constants["Bohr radius"][0] * 1e10
#: ``2 m0 e / h²`` in nm⁻² V⁻¹: U = U_PER_VOLT · V (EMsoft ``preg`` = 0.664840340614319).
U_PER_VOLT = 2 * constants.m_e * constants.e / constants.h**2 * 1e-18
#: ``h² / (2 pi m0 e)`` in V nm³ Å⁻¹: V_g = _VPREF / Omega[nm³] · F_g[Å] (EMsoft 0.04787801).
_VPREF = constants.h**2 / (2 * math.pi * constants.m_e * constants.e) * 1e18 * 0.1
#: Geometric phase sums below this magnitude are systematic absences (set to exactly 0).
_ABSENT = 1e-9


# --------------------------------------------------------------------------- special functions

def _exp_ei(x1: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``exp(-x1) · Ei(x)`` for ``x > 0``, without overflow for large ``x``.

    ``Ei(x) e^{-x}`` is taken from :func:`scipy.special.expi` up to ``x = 500``
    and from its asymptotic series ``(1/x) sum_k k!/x^k`` (8 terms, relative
    error < 1e-16) beyond; EMsoft's ``RIH1``/``RIH2`` do the same with a
    table in ``1/x`` above ``x = 20``.
    """
    x = np.asarray(x, dtype=np.float64)
    large = x > 500.0
    xs = np.where(large, 500.0, x)
    scaled = np.exp(-xs) * special.expi(xs)
    xl = np.where(large, x, 1.0)
    series = np.zeros_like(xl)
    term = np.ones_like(xl)
    for k in range(8):
        series += term
        term = term * (k + 1) / xl
    scaled = np.where(large, series / xl, scaled)
    return np.exp(x - x1) * scaled


def _rih1(x1: np.ndarray, x2: np.ndarray, x3: np.ndarray) -> np.ndarray:
    """EMsoft ``RIH1``: ``exp(-x1) (Ei(x2) - Ei(x3))`` for positive arguments."""
    return _exp_ei(x1, x2) - _exp_ei(x1, x3)


def _ri1(bi: np.ndarray, bj: np.ndarray, g: np.ndarray) -> np.ndarray:
    """EMsoft ``RI1``: ``∫ d²q φ_i(q) φ_j(|G - q|)`` with ``φ(q) = (1 - exp(-b q²)) / q²``.

    ``b`` in Å² (WK ``B / (4 pi)²``), ``G = 4 pi s`` in Å⁻¹. Below
    ``max(b_i, b_j) G² = 0.1`` the second-order expansion in ``G`` is used,
    as in EMsoft (the closed form cancels there).
    """
    g2 = g * g
    bsum = bi + bj
    small = np.maximum(bi, bj) * g2 <= 0.1
    # series branch
    series = math.pi * (bi * np.log(bsum / bi) + bj * np.log(bsum / bj))
    temp = (0.5 * bi**2 * np.log(bi / bsum) + 0.5 * bj**2 * np.log(bj / bsum)
            + 0.75 * (bi**2 + bj**2) - 0.25 * bsum**2 - 0.5 * (bi - bj) ** 2)
    series = series + math.pi * g2 * temp
    # closed-form branch (only evaluated where G is large enough)
    g2l = np.where(small, 1.0, g2)
    big2, bjg2 = bi * g2l, bj * g2l
    closed = (2 * np.euler_gamma + np.log(big2) + np.log(bjg2)
              - 2 * special.expi(-bi * bj * g2l / bsum)
              + _rih1(big2, big2 * bi / bsum, big2)
              + _rih1(bjg2, bjg2 * bj / bsum, bjg2))
    return np.where(small, series, closed * math.pi / g2l)


def _ri2(bi: np.ndarray, bj: np.ndarray, g: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """EMsoft ``RI2``: ``∫ d²q φ_i(q) φ_j(|G - q|) exp(-u² (q² + |G - q|²) / 2)``.

    ``u2 = <u²>`` in Å² (must be > 0), other arguments as :func:`_ri1`.
    """
    g2 = g * g
    u22 = 0.5 * u2
    biuh, bjuh = bi + u22, bj + u22
    biu, bju = bi + u2, bj + u2
    huh = biuh + bjuh
    small = np.maximum(np.maximum(bi, bj), u2) * g2 <= 0.1
    series = math.pi * (biu * np.log((bi + bj + u2) / biu) + bj * np.log((bi + bj + u2) / bju)
                        + u2 * np.log(u2 / bju))
    temp = (0.5 * u22**2 * np.log(biu * bju / (u2 * u2))
            + 0.5 * biuh**2 * np.log(biu / huh) + 0.5 * bjuh**2 * np.log(bju / huh)
            + 0.25 * biu**2 + 0.5 * bi**2 + 0.25 * bju**2 + 0.5 * bj**2
            - 0.25 * huh**2 - 0.5 * ((bi * biu - bj * bju) / huh) ** 2 - u22**2)
    series = series + math.pi * g2 * temp
    g2l = np.where(small, 1.0, g2)
    closed = 2 * (special.expi(-0.5 * u2 * g2l * biuh / biu) + special.expi(-0.5 * u2 * g2l * bjuh / bju)
                  - special.expi(-biuh * bjuh * g2l / huh) - special.expi(-0.25 * u2 * g2l))
    closed = (closed
              + _rih1(0.5 * u2 * g2l, 0.25 * u2 * g2l, 0.25 * u2 * u2 * g2l / biu)
              + _rih1(0.5 * u2 * g2l, 0.25 * u2 * g2l, 0.25 * u2 * u2 * g2l / bju)
              + _rih1(biuh * g2l, biuh**2 * g2l / huh, biuh**2 * g2l / biu)
              + _rih1(bjuh * g2l, bjuh**2 * g2l / huh, bjuh**2 * g2l / bju))
    return np.where(small, series, closed * math.pi / g2l)


_PAIR_I, _PAIR_J = np.triu_indices(4)  # the 10 pairs i <= j of WK terms
_PAIR_WEIGHT = np.where(_PAIR_I == _PAIR_J, 1.0, 2.0)


def _fphon(g: np.ndarray, z: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """EMsoft ``FPHON``: thermal-diffuse absorptive amplitude, in EMsoft units (4 pi · Å²).

    ``sum_{i,j} A1_i A1_j [exp(-u² G²/2) RI1(b_i, b_j, G) - RI2(b_i, b_j, G, u)]`` with
    ``A1 = (4 pi)² A``, ``b = B / (4 pi)²``. Zero where ``u2 = 0``.

    Parameters
    ----------
    g : (m,) array
        ``G = 4 pi s`` in Å⁻¹.
    z : (m,) int array
        Atomic numbers 1–98.
    u2 : (m,) array
        Mean-square displacement ``<u²> = B / (8 pi²)`` in Å².
    """
    a1 = _WK_A[z - 1] * _FOURPI**2  # (m, 4)
    b1 = _WK_B[z - 1] / _FOURPI**2
    ai, aj = a1[:, _PAIR_I], a1[:, _PAIR_J]  # (m, 10)
    bi, bj = b1[:, _PAIR_I], b1[:, _PAIR_J]
    gg = g[:, None]
    thermal = u2 > 0
    uu = np.where(thermal, u2, 1.0)[:, None]  # placeholder where u = 0 (result masked)
    dewa = np.exp(-0.5 * uu * gg * gg)
    terms = _PAIR_WEIGHT * ai * aj * (dewa * _ri1(bi, bj, gg) - _ri2(bi, bj, gg, uu))
    return np.where(thermal, terms.sum(axis=1), 0.0)


def _fcore(g: np.ndarray, z: np.ndarray, kv: float) -> np.ndarray:
    """EMsoft ``FCORE``: inner-shell (core-loss) absorptive amplitude, in EMsoft units (4 pi · Å²).

    Rose's (1976) approximation to the mixed dynamic form factor for a Yukawa
    atom of screening radius ``R = 0.885 a0 Z^(-1/3)``, with the
    characteristic energy loss ``ΔE = 6 Z`` eV and its relativistic angle
    ``θ_E = ΔE / (2E) · (2E + 2 m0c²) / (E + 2 m0c²)``.

    Parameters
    ----------
    g : (m,) array
        ``G = 4 pi s`` in Å⁻¹.
    z : (m,) int array
        Atomic numbers.
    kv
        Accelerating voltage in kV.
    """
    k0 = 2 * math.pi / (10.0 * electron_wavelength(kv))  # Å⁻¹, vacuum (EMsoft .5068 sqrt(1022E+E²))
    zf = z.astype(np.float64)
    de = 6.0 * zf * 1e-3  # keV
    theta_e = de / (2 * kv) * (2 * kv + 2 * _MC2_KEV) / (kv + 2 * _MC2_KEV)
    r = 0.885 * _BOHR_A / np.cbrt(zf)
    ta = 1.0 / (k0 * r)
    omega = g * r  # = 2 theta_B / theta_a with theta_B = G / (2 K0)
    kappa = theta_e / ta
    k2, o2 = kappa * kappa, omega * omega
    x1 = omega / ((1 + o2) * np.sqrt(o2 + 4 * k2)) * np.log((omega + np.sqrt(o2 + 4 * k2)) / (2 * kappa))
    root = np.sqrt((1 + o2) ** 2 + 4 * k2 * o2)
    x2 = np.log((1 + 2 * k2 + o2 + root) / (2 * kappa * np.sqrt(1 + k2))) / root
    om = np.where(omega > 1e-2, omega, 1.0)
    x3_closed = np.log((om + np.sqrt(o2 + 4 * (1 + k2))) / (2 * np.sqrt(1 + k2))) / (
        om * np.sqrt(om * om + 4 * (1 + k2)))
    x3 = np.where(omega > 1e-2, x3_closed, 1.0 / (4 * (1 + k2)))
    hi = 2 * zf / (ta * ta) * (-x1 + x2 - x3)
    return 4.0 / _BOHR_A**2 * 2 * math.pi / (k0 * k0) * hi


# --------------------------------------------------------------------------- atomic amplitudes

def _check_kv(kv: float) -> float:
    kv = float(kv)
    if not (math.isfinite(kv) and kv > 0):
        raise ValueError(f"Expected the accelerating voltage `kv` to be a positive number of kV, got {kv}")
    return kv


def _check_z(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.integer):
        raise TypeError(f"Expected integer atomic numbers, got dtype {z.dtype}")
    bad = z[(z < 1) | (z > len(SYMBOLS))] if z.size else z
    if bad.size:
        raise ValueError(f"no Weickenmeier-Kohl scattering parameters for Z = {np.unique(bad)}; "
                         f"tabulated for Z = 1-{len(SYMBOLS)} (H-{SYMBOLS[-1]})")
    return z


def _gamma(kv: float) -> float:
    """Relativistic factor ``1 + eE / (m0 c²)``."""
    return 1.0 + kv / _MC2_KEV


def absorptive_form_factor(z: int | np.ndarray, s: float | np.ndarray, b_iso: float | np.ndarray,
                           kv: float) -> np.ndarray:
    """Absorptive electron scattering amplitude ``f'`` (Weickenmeier & Kohl 1991), in Å.

    ``f'(s) = gamma² / (4 pi K0) · [FCORE(G, Z, E) · exp(-B s²) + FPHON(G, u, A, B)]``
    with ``G = 4 pi s``, ``u² = B / (8 pi²)``, ``K0 = 2 pi / lambda`` (vacuum,
    Å⁻¹) and EMsoft's ``FCORE`` (core losses) and ``FPHON`` (thermal diffuse
    scattering) from ``others.f90``. This is ``Im FSCATT / (4 pi)`` of EMsoft
    with ``ABSFLG = 3`` and ``ACCFLG = DWFLG = .TRUE.``; the matching elastic
    amplitude is ``gamma · exp(-B s²) ·``
    :func:`dpm.crystal.electron_scattering_factor`, and both enter
    ``V_g + i V'_g`` alike (:func:`fourier_coefficients`).

    Parameters
    ----------
    z : (...) int array
        Atomic numbers, 1–98.
    s : (...) array
        ``sin(theta)/lambda = |g|/2`` in Å⁻¹ (>= 0).
    b_iso : (...) array
        Debye–Waller factors ``B`` in Å² (>= 0; ``B = 0`` gives no thermal
        diffuse part).
    kv
        Accelerating voltage in kV (> 0).

    Returns
    -------
    f_prime : (...) float64 array
        Broadcast shape of *z*, *s*, *b_iso*; in Å.

    Examples
    --------
    >>> round(float(absorptive_form_factor(3, 0.0, 4.58, 20.0)), 4)   # Li, f'(0) in Å
    0.3064
    """
    kv = _check_kv(kv)
    z = _check_z(z)
    s = np.asarray(s, dtype=np.float64)
    b_iso = np.asarray(b_iso, dtype=np.float64)
    if s.size and not np.nanmin(s) >= 0:
        raise ValueError("Expected s = sin(theta)/lambda >= 0 (Å⁻¹)")
    if b_iso.size and not np.nanmin(b_iso) >= 0:
        raise ValueError(f"Expected Debye-Waller factors B >= 0 (Å²), got {np.unique(b_iso)}")
    z, s, b_iso = np.broadcast_arrays(z, s, b_iso)
    shape = z.shape
    z, s, b_iso = z.ravel(), s.ravel(), b_iso.ravel()
    g = _FOURPI * s
    dewa = np.exp(-b_iso * s * s)
    u2 = b_iso / (8 * math.pi**2)
    k0 = 2 * math.pi / (10.0 * electron_wavelength(kv))  # Å⁻¹
    f = (_fcore(g, z, kv) * dewa + _fphon(g, z, u2)) * _gamma(kv) ** 2 / k0 / _FOURPI
    return f.reshape(shape)


# --------------------------------------------------------------------------- Fourier coefficients

@dataclass(frozen=True)
class FourierCoefficients:
    """Fourier coefficients of the crystal potential for a list of ``g``.

    Attributes
    ----------
    hkl : (n, 3) int64 array
        Miller indices ``g`` of the conventional cell.
    U : (n,) complex128 array
        ``U_g + i U'_g`` in nm⁻² (EMsoft's ``Ucg``): ``U_g = (2 m0 e/h²) V_g``
        is the elastic, ``U'_g`` the absorptive coefficient. For a
        centrosymmetric crystal with the origin on an inversion centre both
        are real, so ``U.real = U_g`` and ``U.imag = U'_g``; in general
        ``U = (2 m0 e/h²) (V + i V_prime)`` with complex ``V``, ``V_prime``.
    V : (n,) complex128 array
        Elastic potential coefficient ``V_g`` in V (includes ``gamma``).
    V_prime : (n,) complex128 array
        Absorptive potential coefficient ``V'_g`` in V.
    xi : (n,) float64 array
        Extinction distances ``1 / (|U_g| lambda)`` in nm; ``inf`` where ``U_g = 0``.
    xi_prime : (n,) float64 array
        Absorption lengths ``1 / (|U'_g| lambda)`` in nm; ``inf`` where ``U'_g = 0``.
    U0 : complex
        ``U_0 + i U'_0`` in nm⁻² (``g = 0``); ``U0.imag`` is the normal
        absorption coefficient.
    xi0_prime : float
        Normal absorption length ``1 / (U'_0 lambda)`` in nm.
    V0 : float
        Mean inner potential ``Re V_0`` in V (includes ``gamma``).
    wavelength_nm : float
        Electron wavelength in the crystal, refraction-corrected, in nm:
        ``h / sqrt(2 m0 e Psi)``, ``Psi = E (1 + eE/(2 m0 c²)) + V0``.
    k0 : float
        ``1 / wavelength_nm`` in nm⁻¹.
    sigma : float
        Interaction constant ``2 pi m0 gamma e lambda / h²`` in V⁻¹ nm⁻¹.
    gamma : float
        Relativistic factor ``1 + eE/(m0 c²)``.
    kv : float
        Accelerating voltage in kV.
    """

    hkl: np.ndarray
    U: np.ndarray
    V: np.ndarray
    V_prime: np.ndarray
    xi: np.ndarray
    xi_prime: np.ndarray
    U0: complex
    xi0_prime: float
    V0: float
    wavelength_nm: float
    k0: float
    sigma: float
    gamma: float
    kv: float

    def __len__(self) -> int:
        return len(self.hkl)


def _potential(phase: Phase, hkl: np.ndarray, kv: float) -> tuple[np.ndarray, np.ndarray]:
    """``(V_g, V'_g)`` in V for integer ``hkl`` (n, 3), both complex (n,)."""
    z, xyz, occ, b_iso = unit_cell_atoms(phase)
    omega_nm3 = float(phase.structure.lattice.volume) * 1e-3
    # Group the cell's atoms into sites of one (Z, occ, B): one amplitude per group and g,
    # and a geometric sum that is exactly 0 for systematic absences.
    keys = np.column_stack([z, occ, b_iso])
    groups, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    hklf = hkl.astype(np.float64)
    s = 0.5 * np.linalg.norm(reciprocal_vectors(phase, hklf), axis=1)  # Å⁻¹
    # Amplitudes depend on |g| only: evaluate them once per distinct length.
    s_distinct, s_index = np.unique(np.round(s, 12), return_inverse=True)
    gamma = _gamma(kv)
    v = np.zeros(len(hkl), dtype=np.complex128)
    v_prime = np.zeros(len(hkl), dtype=np.complex128)
    for k, (zk, occ_k, b_k) in enumerate(groups):
        zk = int(zk)
        phase_sum = np.exp(-2j * math.pi * (hklf @ xyz[inverse == k].T)).sum(axis=1)
        phase_sum[np.abs(phase_sum) < _ABSENT] = 0.0
        f = gamma * np.exp(-b_k * s_distinct**2) * electron_scattering_factor(zk, s_distinct)
        f_prime = absorptive_form_factor(zk, s_distinct, b_k, kv)
        v += occ_k * f[s_index.ravel()] * phase_sum
        v_prime += occ_k * f_prime[s_index.ravel()] * phase_sum
    return _VPREF / omega_nm3 * v, _VPREF / omega_nm3 * v_prime


def fourier_coefficients(phase: Phase, hkl: np.ndarray, kv: float) -> FourierCoefficients:
    """Complex Fourier coefficients ``U_g + i U'_g`` of the crystal potential, in nm⁻².

    EMsoft ``CalcUcg`` (Weickenmeier–Kohl with absorption) and
    ``CalcWaveLength``: every atom of the conventional cell
    (:func:`dpm.crystal.unit_cell_atoms`) contributes
    ``occ · (f + i f') · exp(-2 pi i g·r)``, with the elastic amplitude
    ``f = gamma · exp(-B s²) · f_WK(s)`` and the absorptive ``f'`` of
    :func:`absorptive_form_factor` (both Å), ``s = |g|/2`` in Å⁻¹ and the
    atom's own ``B`` (Å²); ``V_g + i V'_g = h²/(2 pi m0 e Omega) · sum`` and
    ``U = (2 m0 e/h²)(V_g + i V'_g)``.

    Parameters
    ----------
    phase
        orix phase (lattice in Å, space group set, atoms with Z = 1–98).
    hkl : (n, 3) or (3,) int array
        Miller indices of the conventional cell; ``(0, 0, 0)`` is allowed.
    kv
        Accelerating voltage in kV (> 0).

    Returns
    -------
    FourierCoefficients
        Per-``g`` arrays in the order of *hkl*, plus the scalars of
        ``g = 0``: mean inner potential, refraction-corrected wavelength,
        ``k0``, interaction constant, ``gamma``.

    Raises
    ------
    ValueError
        If *kv* is not positive, *hkl* is not (n, 3) integers, or an atom
        has no scattering parameters (Z > 98; the message names it).

    Examples
    --------
    >>> from dpm.crystal import get_phase
    >>> fc = fourier_coefficients(get_phase("na"), [[1, 1, 0], [1, 0, 0]], kv=20.0)
    >>> fc.U.real.round(3)          # nm⁻²; 100 is forbidden in bcc
    array([1.326, 0.   ])
    """
    kv = _check_kv(kv)
    hkl_arr = np.atleast_2d(np.asarray(hkl))
    if hkl_arr.ndim != 2 or hkl_arr.shape[1] != 3:
        raise ValueError(f"Expected `hkl` to have shape (n, 3), got {np.shape(hkl)}")
    if not np.issubdtype(hkl_arr.dtype, np.integer):
        if not np.array_equal(hkl_arr, np.round(hkl_arr)):
            raise ValueError("Expected integer Miller indices in `hkl`")
        hkl_arr = np.round(hkl_arr)
    hkl_arr = hkl_arr.astype(np.int64)
    everything = np.vstack([np.zeros((1, 3), dtype=np.int64), hkl_arr])
    v_all, vp_all = _potential(phase, everything, kv)
    v0 = float(v_all[0].real)
    wavelength = electron_wavelength(kv, inner_potential=v0)  # nm
    gamma = _gamma(kv)
    v, v_prime = v_all[1:], vp_all[1:]
    u = U_PER_VOLT * (v + 1j * v_prime)
    with np.errstate(divide="ignore"):
        xi = 1.0 / (U_PER_VOLT * np.abs(v) * wavelength)
        xi_prime = 1.0 / (U_PER_VOLT * np.abs(v_prime) * wavelength)
    u0 = complex(U_PER_VOLT * (v_all[0] + 1j * vp_all[0]))
    return FourierCoefficients(
        hkl=hkl_arr, U=u, V=v, V_prime=v_prime, xi=xi, xi_prime=xi_prime,
        U0=u0, xi0_prime=1.0 / (abs(U_PER_VOLT * vp_all[0]) * wavelength), V0=v0,
        wavelength_nm=wavelength, k0=1.0 / wavelength,
        sigma=math.pi * U_PER_VOLT * gamma * wavelength, gamma=gamma, kv=kv)


# --------------------------------------------------------------------------- lookup table

def hkl_max_for(phase: Phase, dmin_nm: float) -> tuple[int, int, int]:
    """Index range of the beams for a smallest spacing ``dmin_nm``, as EMsoft counts it.

    EMsoft's ``Initialize_Cell`` takes, along each of a*, b*, c*, the first
    index ``h`` with ``d(h00) < dmin`` (so one more than the last index with
    ``d >= dmin``): ``h_max = floor(1 / (|a*| dmin)) + 1``. Every ``g`` with
    ``d > dmin`` has ``|h| <= h_max`` etc. only along the axes; beam lists
    should still filter by ``d``.

    Parameters
    ----------
    phase
        orix phase (lattice in Å).
    dmin_nm
        Smallest interplanar spacing in nm (> 0), e.g. 0.05.

    Returns
    -------
    (h_max, k_max, l_max)
        Positive integers. Ni (a = 0.35236 nm) at 0.05 nm gives (8, 8, 8).
    """
    if not (math.isfinite(dmin_nm) and dmin_nm > 0):
        raise ValueError(f"Expected `dmin_nm` to be a positive spacing in nm, got {dmin_nm}")
    astar_nm = 10.0 * np.linalg.norm(reciprocal_vectors(phase, np.eye(3)), axis=1)  # |a*|, |b*|, |c*| in nm⁻¹
    return tuple(int(n) for n in np.floor(1.0 / (astar_nm * dmin_nm)) + 1)


@dataclass(frozen=True)
class FourierLUT:
    """Dense table of ``U_g + i U'_g`` over the box ``|h| <= 2 h_max`` etc.

    The Bloch-wave matrix needs ``U_{g-h}`` for every pair of beams with
    ``|g|, |h|`` inside ``h_max``, hence twice the range (EMsoft ``cell%LUT``).

    Attributes
    ----------
    table : (4 h_max + 1, 4 k_max + 1, 4 l_max + 1) complex128 array
        ``U_g + i U'_g`` in nm⁻² at ``table[h + offset[0], k + offset[1], l + offset[2]]``.
    offset : (3,) tuple of int
        ``2 · hkl_max``; ``table[offset]`` is ``U0``.
    coefficients : FourierCoefficients
        The same coefficients as flat arrays over the box (C order of
        *table*), with the scalars ``V0``, ``wavelength_nm``, ``k0``,
        ``sigma``, ``gamma``, ``U0``, ``xi0_prime``.
    """

    table: np.ndarray
    offset: tuple[int, int, int]
    coefficients: FourierCoefficients

    def lookup(self, hkl: np.ndarray) -> np.ndarray:
        """``U_g + i U'_g`` (nm⁻²) for integer ``hkl`` of shape (..., 3), e.g. ``g[:, None] - g[None]``.

        Raises
        ------
        IndexError
            If an index lies outside the table.
        """
        idx = np.asarray(hkl, dtype=np.int64) + np.asarray(self.offset)
        if idx.shape[-1:] != (3,):
            raise ValueError(f"Expected `hkl` to have shape (..., 3), got {np.shape(hkl)}")
        if idx.size and (idx.min() < 0 or np.any(idx.reshape(-1, 3).max(axis=0) >= self.table.shape)):
            raise IndexError(f"Miller indices outside the table range ±{self.offset}")
        return self.table[idx[..., 0], idx[..., 1], idx[..., 2]]


def lookup_table(phase: Phase, hkl_max: int | tuple[int, int, int], kv: float) -> FourierLUT:
    """Fourier coefficients for every ``g`` with ``|h|, |k|, |l| <= 2 hkl_max``.

    Parameters
    ----------
    phase
        orix phase (lattice in Å, space group set).
    hkl_max
        Largest beam index per axis (one int for all three), e.g. from
        :func:`hkl_max_for`.
    kv
        Accelerating voltage in kV (> 0).

    Returns
    -------
    FourierLUT
        Dense complex table in nm⁻² indexed by offset.

    Examples
    --------
    >>> from dpm.crystal import get_phase
    >>> lut = lookup_table(get_phase("li"), hkl_max_for(get_phase("li"), 0.1), kv=20.0)
    >>> lut.table.shape
    (17, 17, 17)
    >>> lut.lookup([[1, 1, 0], [1, 0, 0]]).round(3)          # nm⁻²
    array([0.927+0.037j, 0.   +0.j   ])
    """
    hmax = np.broadcast_to(np.asarray(hkl_max), (3,))
    if not np.issubdtype(hmax.dtype, np.integer) or np.any(hmax < 0):
        raise ValueError(f"Expected `hkl_max` to be non-negative integer(s), got {hkl_max}")
    offset = tuple(int(2 * n) for n in hmax)
    axes = [np.arange(-o, o + 1) for o in offset]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    fc = fourier_coefficients(phase, hkl, kv)
    table = fc.U.reshape(tuple(2 * o + 1 for o in offset))
    return FourierLUT(table=table, offset=offset, coefficients=fc)
