"""Kinematical master patterns: flat Kikuchi bands weighted by |F_hkl|².

Each reflector ``g`` with Bragg angle ``theta_B = asin(lambda / 2d)`` paints a
band of total width ``2 theta_B`` about its lattice plane: a direction ``v``
of the crystal frame lies in the band when ``|v · g_hat| <= sin(theta_B)``.
The intensity of a direction is the sum of the weights of the bands it lies
in, ``w = |F_g|²`` (``scaling="square"``) or ``|F_g|`` (``"linear"``), with
``F_g`` from :func:`dpm.crystal.structure_factor` (Weickenmeier–Kohl
electron scattering factors, per-site Debye–Waller factors). ``g`` and
``-g`` describe the same band, which is counted once.

This is the model of kikuchipy's ``KikuchiPatternSimulator`` (there ``±g``
each paint one half of the band), evaluated directly on the square Lambert
grids of both hemispheres rather than resampled from a stereographic grid.
The band condition is even in ``v``, so the southern hemisphere is the
northern one rotated by 180° about the grid centre (pixel ``(a, b)`` of the
south is direction ``-v`` of north pixel ``(-a, -b)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from dpm.master import MasterPattern
from dpm.master.lambert import grid_vectors

if TYPE_CHECKING:
    from orix.crystal_map import Phase

__all__ = ["KinematicalConfig", "kinematical_bands", "kinematical_master_pattern"]

_MIN_NPX = 10
_SCATTERING = "Weickenmeier & Kohl, Acta Cryst. A47 (1991) 590 (EMsoft 4-term table)"


@dataclass(frozen=True)
class KinematicalConfig:
    """Settings of a kinematical master-pattern simulation.

    Attributes
    ----------
    dmin
        Smallest interplanar spacing of the reflectors, in nm. 0.05 nm is
        EMsoft's usual value; for Li and Na at room temperature the
        Debye–Waller factor puts every band with d < 0.08 nm below the
        default *min_intensity* anyway (Li at 20 kV keeps 88 of 341 bands).
    min_intensity
        Bands weaker than this fraction of the strongest band weight (after
        scaling) are dropped; 0 keeps every allowed reflector.
    scaling
        Band weight: ``"square"`` (``|F|²``, the default) or ``"linear"`` (``|F|``).
    chunk_pixels
        Number of Lambert pixels evaluated per block (bounds the temporary
        ``chunk_pixels × n_bands`` float32 arrays).
    """

    dmin: float = 0.05
    min_intensity: float = 1e-3
    scaling: Literal["square", "linear"] = "square"
    chunk_pixels: int = 32768

    def __post_init__(self) -> None:
        if not self.dmin > 0:
            raise ValueError(f"dmin must be positive (nm), got {self.dmin}")
        if not 0 <= self.min_intensity < 1:
            raise ValueError(f"min_intensity must be in [0, 1), got {self.min_intensity}")
        if self.scaling not in ("square", "linear"):
            raise ValueError(f"scaling must be 'square' or 'linear', got {self.scaling!r}")
        if int(self.chunk_pixels) < 1:
            raise ValueError(f"chunk_pixels must be >= 1, got {self.chunk_pixels}")


def kinematical_bands(
    phase: Phase, *, kv: float, config: KinematicalConfig = KinematicalConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One band per Friedel pair ``±g``: plane normal, half-width and weight.

    Parameters
    ----------
    phase
        orix phase (lattice in Å).
    kv
        Accelerating voltage in kV.
    config
        Simulation settings.

    Returns
    -------
    hkl : (m, 3) int array
        Miller indices (the member of ``±g`` whose first non-zero index is positive).
    normal : (m, 3) float64 array
        Unit plane normals ``g_hat`` in the crystal frame.
    sin_theta : (m,) float64 array
        ``sin(theta_B) = lambda / 2d`` (half-width of the band, as a sine).
    weight : (m,) float64 array
        ``|F|²`` (Å²) or ``|F|`` (Å), by ``config.scaling``.
    """
    from dpm.crystal import reflectors

    ref = reflectors(phase, config.dmin, kv)
    h, k, l = ref.hkl.T
    first_positive = (h > 0) | ((h == 0) & (k > 0)) | ((h == 0) & (k == 0) & (l > 0))
    weight = ref.intensity[first_positive]
    if config.scaling == "linear":
        weight = np.sqrt(weight)
    keep = weight >= config.min_intensity * weight.max()
    g = ref.g[first_positive][keep]
    normal = g / np.linalg.norm(g, axis=1, keepdims=True)
    return (ref.hkl[first_positive][keep], normal, np.sin(ref.theta[first_positive][keep]),
            weight[keep])


def _band_sum(v: np.ndarray, normal: np.ndarray, sin_theta: np.ndarray, weight: np.ndarray,
              chunk: int) -> np.ndarray:
    """Sum of band weights at each direction, in blocks of *chunk* directions.

    ``v`` is (n, 3); returns (n,) float64.
    """
    normal_t = np.ascontiguousarray(normal.T, dtype=np.float32)  # (3, m)
    sin_t = sin_theta.astype(np.float32)
    w = weight.astype(np.float32)
    v32 = v.astype(np.float32)
    out = np.empty(len(v), dtype=np.float64)
    for start in range(0, len(v), chunk):
        dots = v32[start:start + chunk] @ normal_t  # (c, m)
        np.abs(dots, out=dots)
        inside = np.less_equal(dots, sin_t, out=np.empty(dots.shape, dtype=bool))
        out[start:start + chunk] = inside.astype(np.float32) @ w
    return out


def kinematical_master_pattern(
    phase: Phase, *, kv: float, npx: int, config: KinematicalConfig = KinematicalConfig()
) -> MasterPattern:
    """Kinematical master pattern of a phase on the Lambert grids of both hemispheres.

    Parameters
    ----------
    phase
        orix phase (lattice in Å, space group and atoms set).
    kv
        Accelerating voltage in kV (> 0); also the energy of the result in keV.
    npx
        Half-width of the Lambert grid (>= 10); each hemisphere is
        ``(2 npx + 1)²`` pixels.
    config
        Simulation settings (dmin in nm, intensity cutoff, scaling).

    Returns
    -------
    MasterPattern
        float32 hemispheres, ``method="kinematical"``, ``params`` recording
        kv, npx, dmin (nm), scaling, cutoff, number of bands and the
        scattering-factor parametrisation.

    Examples
    --------
    >>> from dpm.crystal import get_phase
    >>> mp = kinematical_master_pattern(get_phase("li"), kv=20.0, npx=50)
    >>> mp.northern.shape
    (101, 101)
    """
    if isinstance(npx, bool) or int(npx) != npx or npx < _MIN_NPX:
        raise ValueError(f"npx must be an integer >= {_MIN_NPX}, got {npx!r}")
    if not kv > 0:
        raise ValueError(f"accelerating voltage must be positive (kV), got {kv}")
    npx = int(npx)
    from dpm.crystal import electron_wavelength

    hkl, normal, sin_theta, weight = kinematical_bands(phase, kv=kv, config=config)
    v = grid_vectors(npx, "north").reshape(-1, 3)
    north = _band_sum(v, normal, sin_theta, weight, int(config.chunk_pixels))
    north = north.reshape(2 * npx + 1, 2 * npx + 1).astype(np.float32)
    south = north[::-1, ::-1].copy()
    params = {
        "kv": float(kv),
        "npx": npx,
        "dmin_nm": float(config.dmin),
        "min_intensity": float(config.min_intensity),
        "scaling": config.scaling,
        "n_bands": len(hkl),
        "wavelength_nm": electron_wavelength(kv),
        "scattering_factors": _SCATTERING,
    }
    return MasterPattern(north, south, phase=phase, energy=float(kv), method="kinematical",
                         params=params)
