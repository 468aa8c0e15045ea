"""Monte Carlo of backscattered electrons: exit energy, escape depth and exit direction.

The model is EMsoft's (``opencl/EMMC.cl``, driven by ``Source/SEM/EMMCOpenCL.f90``;
D. C. Joy, *Monte Carlo Modeling for Electron Microscopy and Microanalysis*,
Oxford University Press, 1995): single elastic scattering with the screened
Rutherford cross-section and a continuous slowing-down approximation (CSDA)
with the Joy–Luo stopping power. For an electron of energy ``E`` (keV) in a
solid of mean atomic number ``Z``, mean atomic weight ``A`` (g/mol) and density
``ρ`` (g/cm³):

* screening parameter ``α = 3.4·10⁻³ Z^0.66667 / E``;
* cross-section ``σ = 5.21 · 602.2 · Z²/E² · 4π/(α (1 + α)) · ((E + 511)/(E + 1024))²``
  and mean free path ``λ = A·10⁷/(ρ σ)`` nm; step lengths ``s = -λ ln R``;
* polar scattering angle ``cos φ = 1 - 2αR/(1 + α - R)``, azimuth ``ψ = 2πR``
  (``R`` uniform in [0, 1), fresh for every use);
* mean ionisation energy ``J = (9.76 Z + 58.5 Z^-0.19)·10⁻³`` keV and energy
  loss per step ``ΔE = -s ρ · 0.00785 Z/(A E) · ln(1.166 E/J + 0.9911)``
  (keV, nm, g/cm³; Joy & Luo's 78 500 keV cm²/g), charged on every step
  including the first.

These are the formulas of EMsoft's current kernel. An older ``EMMC.cl``
(still in some EMsoft snapshots) used 0.00758 instead of 0.00785, ``Z^0.67``,
``(E0 + 1024)`` at the beam energy, and no energy loss on the first step; with
those, the 20.0–20.1 keV yield of Ni at 20.1 kV comes out 43 % above the one in
EMsoft's own Ni file (kikuchipy's ``ni_mc_mp_20kv``), with these within 2 %.

Geometry (EMsoft's, after the ``(x, y) -> (y, -x)`` turn it applies when
binning, so the arrays compare 1:1 with EMsoft's ``accum_e``/``accum_z``):
the sample surface is the plane ``z = 0`` with ``z`` pointing *into* the
sample, and the sample is tilted by ``σ`` about the ``x`` axis: the beam
enters at the origin along ``(0, -sin σ, cos σ)``. The first step goes along
the beam without scattering; then every step scatters, moves and loses
energy. An electron leaves when its position has ``z <= 0``; it is recorded
with

* its energy after the last step (EMsoft charges the whole last step, also
  the part above the surface);
* its *escape depth*: EMsoft's ``r.z / c.z`` at the last scattering event,
  the path length from the last scattering point to the surface along the
  exit direction (``|r_z / c_z|``, nm);
* its exit direction ``u = (c_x, c_y, -c_z)`` (``z`` now *out of* the
  surface), as the square Lambert coordinates ``(X, Y)`` of the northern
  hemisphere (:func:`dpm.master.lambert.vector_to_lambert`).

Forward-scattered electrons therefore leave towards ``-y`` (Lambert ``Y < 0``).

Histograms (EMsoft's binning, ``EMMCOpenCL.f90``): energy bin
``i = nint((E - E_min)/ΔE)`` for ``E > E_min`` (bins centred on
``E_min + i ΔE``, ``i = 0 … int((E0 - E_min)/ΔE)``); depth bin
``k = nint(d/Δz)`` (centres ``k Δz``, ``k = 0 … int(d_max/Δz)``; deeper escape
paths are left out of the depth histogram only); direction pixel
``(nint(n Y) + n, nint(n X) + n)`` of a ``(2n + 1)²`` grid with
``n = (nsx - 1)/2``; the depth histogram is kept on EMsoft's coarse grid,
``nint(pixel/10)``, half-width ``n // 10``. ``nint`` rounds half away from zero.

Electrons are advanced in lock-step on ``xp`` (NumPy or CuPy), a batch at a
time; an electron drops out of the batch when it leaves the sample, when its
energy falls below ``E_min`` (it can no longer be counted; EMsoft follows it to
a fixed 300 steps instead) or after ``max_steps``. The random numbers are drawn
on the host from ``numpy.random.default_rng(seed)`` in a fixed order, so a
seed gives the same histograms on every device up to floating-point
differences of the device's ``log``/``cos``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from orix.crystal_map import Phase

__all__ = ["BackscatterHistograms", "Material", "MonteCarloConfig", "backscatter_histograms",
           "material_parameters"]

_log = logging.getLogger("dpm")

#: Joy–Luo CSDA constant (EMsoft ``EMMC.cl``: ``de_ds = -0.00785f*(z/(A*E))*log(...)``):
#: times ``ρ Z/(A E)`` (g/cm³, g/mol, keV) it gives keV per nm.
_STOPPING_CONSTANT = 0.00785
#: Directions with ``|c_z|`` below this keep the previous escape depth (EMsoft).
_MIN_COSZ = 1e-5
#: Standard atomic weights (g/mol) for Z = 1 … 98 (IUPAC; longest-lived isotope for the
#: elements without a stable one), as in EMsoft's ``ATOM_weights``.
_ATOMIC_WEIGHTS = (
    1.00794, 4.002602, 6.941, 9.012182, 10.811, 12.0107, 14.0067, 15.9994, 18.9984032,
    20.1797, 22.98976928, 24.3050, 26.9815386, 28.0855, 30.973762, 32.065, 35.453, 39.948,
    39.0983, 40.078, 44.955912, 47.867, 50.9415, 51.9961, 54.938045, 55.845, 58.933195,
    58.6934, 63.546, 65.38, 69.723, 72.64, 74.92160, 78.96, 79.904, 83.798, 85.4678, 87.62,
    88.90585, 91.224, 92.90638, 95.96, 98.0, 101.07, 102.90550, 106.42, 107.8682, 112.411,
    114.818, 118.710, 121.760, 127.60, 126.90447, 131.293, 132.9054519, 137.327, 138.90547,
    140.116, 140.90765, 144.242, 145.0, 150.36, 151.964, 157.25, 158.92535, 162.500,
    164.93032, 167.259, 168.93421, 173.054, 174.9668, 178.49, 180.94788, 183.84, 186.207,
    190.23, 192.217, 195.084, 196.966569, 200.59, 204.3833, 207.2, 208.98040, 209.0, 210.0,
    222.0, 223.0, 226.0, 227.0, 232.03806, 231.03588, 238.02891, 237.0, 244.0, 243.0, 247.0,
    247.0, 251.0,
)
_AVOGADRO = 6.02214076e23


@dataclass(frozen=True)
class MonteCarloConfig:
    """Settings of a backscattered-electron Monte Carlo run.

    Attributes
    ----------
    n_electrons
        Incident electrons (>= 1).
    sample_tilt
        Tilt of the sample surface from horizontal, in degrees, about the
        sample ``x`` axis (EMsoft's ``sig``; 70 for EBSD).
    e_min
        Lowest energy counted, keV (EMsoft's ``Ehistmin``); electrons are
        followed until they leave or fall below it. None takes half the beam
        energy (EMsoft's template: 15 keV of 30).
    e_bin
        Energy bin width, keV (EMsoft's ``Ebinsize``, 1).
    depth_max, depth_step
        Escape-depth histogram range and bin width, nm (EMsoft's ``depthmax``
        = 100, ``depthstep`` = 1). Light elements need more: at 20 kV Li's
        escape depths reach ~1 µm, so the default here is 1000 nm.
    nsx
        Side of the square Lambert grid of exit directions (odd, >= 21;
        EMsoft's ``numsx``, whose template uses 501). The depth histogram uses
        the grid ten times coarser.
    max_steps
        Scattering events after which an electron still inside is dropped
        (EMsoft: 300); None follows it until it leaves or falls below *e_min*.
    seed
        Seed of the host random-number generator.
    batch_size
        Electrons advanced together (bounds memory: ~300 bytes each).
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"`` (None reads ``DPM_DEVICE``).
    """

    n_electrons: int = 200_000
    sample_tilt: float = 70.0
    e_min: float | None = None
    e_bin: float = 1.0
    depth_max: float = 1000.0
    depth_step: float = 1.0
    nsx: int = 101
    max_steps: int | None = None
    seed: int = 0
    batch_size: int = 100_000
    device: str | None = None

    def __post_init__(self) -> None:
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        whole("n_electrons", self.n_electrons, 1)
        whole("batch_size", self.batch_size, 1)
        whole("nsx", self.nsx, 21)
        if self.nsx % 2 != 1:
            raise ValueError(f"nsx must be odd (2 n + 1 Lambert pixels), got {self.nsx}")
        if self.max_steps is not None:
            whole("max_steps", self.max_steps, 1)
        if not 0 <= self.sample_tilt < 90:
            raise ValueError(f"sample_tilt must be in [0, 90) degrees, got {self.sample_tilt}")
        if self.e_min is not None and not self.e_min > 0:
            raise ValueError(f"e_min must be positive (keV) or None, got {self.e_min}")
        for name in ("e_bin", "depth_max", "depth_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.depth_step > self.depth_max:
            raise ValueError(f"depth_step ({self.depth_step} nm) must not exceed depth_max "
                             f"({self.depth_max} nm)")


@dataclass(frozen=True)
class Material:
    """Mean scattering parameters of a phase for the Monte Carlo."""

    density: float  # g/cm³
    mean_z: float
    mean_a: float  # g/mol


@dataclass(frozen=True, eq=False)
class BackscatterHistograms:
    """Backscattered electrons by exit energy, escape depth and exit direction.

    Attributes
    ----------
    energies : (n_e,) float64 array
        Energy-bin centres in keV, ascending (EMsoft's ``EkeVs``).
    depths : (n_z,) float64 array
        Escape-depth bin centres in nm, ``0, Δz, …, d_max``.
    counts : (n_e, nsx, nsx) int64 array
        Electrons per energy bin and exit direction, ``[energy, row = Lambert
        Y, col = Lambert X]`` (EMsoft's ``accum_e`` in the order h5py shows).
    depth_counts : (n_e, n_z, nc, nc) int64 array
        Electrons per energy bin, depth bin and coarse direction pixel
        (``nc = 2 (n // 10) + 1``; EMsoft's ``accum_z``).
    n_incident
        Incident electrons.
    kv
        Beam energy, keV.
    material
        Density, mean Z and A used.
    config
        The run's settings (``e_min`` resolved).
    seconds
        Wall time of the run.
    """

    energies: np.ndarray
    depths: np.ndarray
    counts: np.ndarray
    depth_counts: np.ndarray
    n_incident: int
    kv: float
    material: Material
    config: MonteCarloConfig
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def energy_histogram(self) -> np.ndarray:
        """(n_e,) backscattered electrons per energy bin."""
        return self.counts.sum(axis=(1, 2))

    @property
    def depth_histogram(self) -> np.ndarray:
        """(n_e, n_z) electrons per energy and escape-depth bin, all directions."""
        return self.depth_counts.sum(axis=(2, 3))

    @property
    def backscatter_yield(self) -> float:
        """Backscattered electrons with ``E > e_min`` per incident electron (EMsoft's yield)."""
        return float(self.counts.sum()) / self.n_incident

    def depth_profile(self, index: int) -> np.ndarray:
        """(n_z,) escape-depth histogram of energy bin *index*, summed over directions."""
        return self.depth_histogram[index]

    def depth_cutoff(self, indices: Any = None, fraction: float = 0.99) -> int:
        """EMsoft's integration depth: bins needed to hold *fraction* of every coarse pixel.

        The smallest ``k`` such that, in every coarse direction pixel and
        every energy bin of *indices* (all when None), the first ``k`` depth
        bins hold at least *fraction* of that pixel's electrons
        (``EMEBSDmaster.f90``: ``izzmax``).
        """
        dc = self.depth_counts if indices is None else self.depth_counts[np.atleast_1d(indices)]
        total = dc.sum(axis=1, keepdims=True)
        cum = np.cumsum(dc, axis=1)
        need = (cum < fraction * total).sum(axis=1) + 1  # (e, nc, nc)
        need = np.where(total[:, 0] > 0, need, 0)
        return int(min(max(need.max(initial=1), 1), dc.shape[1]))


def material_parameters(phase: Phase) -> Material:
    """Density (g/cm³) and mean ``Z`` and ``A`` of a phase from its unit cell.

    ``ρ = Σ occ·A / (N_A V_cell)``; ``Z`` and ``A`` are the occupancy-weighted
    means over the atoms of the conventional cell (EMsoft ``CalcDensity``,
    which weights ``A`` by occupancy but not ``Z``; the two agree for fully
    occupied sites).
    """
    from dpm.crystal import unit_cell_atoms

    z, _xyz, occ, _b = unit_cell_atoms(phase)
    if np.any(z < 1) or np.any(z > len(_ATOMIC_WEIGHTS)):
        raise ValueError(f"phase {phase.name!r}: no atomic weight for Z = {sorted(set(z.tolist()))}"
                         f" (table covers 1–{len(_ATOMIC_WEIGHTS)})")
    a = np.asarray(_ATOMIC_WEIGHTS)[z - 1]
    volume_cm3 = float(phase.structure.lattice.volume) * 1e-24  # Å³ -> cm³
    mass = float((occ * a).sum())
    n = float(occ.sum())
    return Material(density=mass / (_AVOGADRO * volume_cm3), mean_z=float((occ * z).sum()) / n,
                    mean_a=mass / n)


def _nint(x: Any, xp: ModuleType) -> Any:
    """Fortran ``nint``: round half away from zero, as integers."""
    return (xp.sign(x) * xp.floor(xp.abs(x) + 0.5)).astype(xp.int64)


class _Run:
    """Physics of one material and beam energy, applied to arrays on ``xp``."""

    def __init__(self, material: Material, kv: float, e_min: float, xp: ModuleType) -> None:
        self.xp = xp
        z, a, rho = material.mean_z, material.mean_a, material.density
        self.rho = rho
        self.alpha_e = 3.4e-3 * z**0.66667  # α·E
        self.sigma_pre = 5.21 * 602.2 * z * z * 4.0 * math.pi  # σ·E²·α(1+α)/(...)²
        self.mfp_pre = a * 1.0e7 / rho
        self.j = (9.76 * z + 58.5 * z**-0.19) * 1e-3
        self.loss_pre = _STOPPING_CONSTANT * z / a * rho  # keV/nm times E⁻¹ ln(...)
        self.kv = kv
        self.e_min = e_min

    def alpha(self, e: Any) -> Any:
        return self.alpha_e / e

    def mean_free_path(self, e: Any) -> Any:
        """Elastic mean free path, nm."""
        alpha = self.alpha(e)
        rel = (e + 511.0) / (e + 1024.0)
        sigma = self.sigma_pre / (e * e) / (alpha * (1.0 + alpha)) * rel * rel
        return self.mfp_pre / sigma

    def loss_per_nm(self, e: Any) -> Any:
        """CSDA energy loss, keV/nm (positive)."""
        return self.loss_pre / e * self.xp.log(1.166 * e / self.j + 0.9911)


def _track_batch(run: _Run, n: int, tilt: float, rng: np.random.Generator,
                 max_steps: int | None) -> tuple[np.ndarray, ...]:
    """Follow *n* electrons; return host arrays (ux, uy, uz, escape depth, energy) of the BSE."""
    xp = run.xp
    sin_t, cos_t = math.sin(tilt), math.cos(tilt)
    e = xp.full(n, run.kv, dtype=xp.float64)
    cx = xp.zeros(n, dtype=xp.float64)
    cy = xp.full(n, -sin_t, dtype=xp.float64)
    cz = xp.full(n, cos_t, dtype=xp.float64)
    # first step: along the beam, no scattering (EMsoft)
    step = -run.mean_free_path(e) * xp.log1p(-xp.asarray(rng.random(n)))
    x, y, z = step * cx, step * cy, step * cz
    e = e - step * run.loss_per_nm(e)
    escape = xp.zeros(n, dtype=xp.float64)
    out: list[tuple[Any, ...]] = []
    count = 0
    while e.shape[0] and (max_steps is None or count < max_steps):
        m = e.shape[0]
        r = xp.asarray(rng.random((3, m)))
        alpha = run.alpha(e)
        step = -run.mean_free_path(e) * xp.log1p(-r[0])
        loss = run.loss_per_nm(e)
        cos_p = 1.0 - 2.0 * alpha * r[1] / (1.0 + alpha - r[1])
        sin_p = xp.sqrt(xp.maximum(1.0 - cos_p * cos_p, 0.0))
        psi = 2.0 * math.pi * r[2]
        cos_s, sin_s = xp.cos(psi), xp.sin(psi)
        # new direction (Joy's rotation; along ±z the frame is the lab's)
        polar = xp.abs(cz) >= 0.99999
        dsq = xp.sqrt(xp.maximum(1.0 - cz * cz, 0.0))
        dsqi = 1.0 / xp.where(polar, 1.0, dsq)
        nx = xp.where(polar, sin_p * cos_s,
                      sin_p * (cx * cz * cos_s - cy * sin_s) * dsqi + cx * cos_p)
        ny = xp.where(polar, sin_p * sin_s,
                      sin_p * (cy * cz * cos_s + cx * sin_s) * dsqi + cy * cos_p)
        nz = xp.where(polar, xp.sign(cz) * cos_p, -sin_p * cos_s * dsq + cz * cos_p)
        escape = xp.where(xp.abs(nz) > _MIN_COSZ, z / xp.where(nz == 0, 1.0, nz), escape)
        x, y, z = x + step * nx, y + step * ny, z + step * nz
        cx, cy, cz = nx, ny, nz
        e = e - step * loss
        count += 1
        left = z <= 0.0
        keep = ~left & (e > run.e_min)
        idx = xp.nonzero(left & (e > run.e_min))[0]
        if idx.shape[0]:
            out.append((cx[idx], cy[idx], -cz[idx], xp.abs(escape[idx]), e[idx]))
        if not bool(keep.all()):
            kidx = xp.nonzero(keep)[0]
            e, x, y, z, cx, cy, cz, escape = (a[kidx] for a in (e, x, y, z, cx, cy, cz, escape))
    if not out:
        return tuple(np.empty(0) for _ in range(5))
    from dpm import backend

    return tuple(np.concatenate([backend.to_host(o[i]) if xp is not np else o[i] for o in out])
                 for i in range(5))


def backscatter_histograms(
    phase: Phase, kv: float, config: MonteCarloConfig = MonteCarloConfig()
) -> BackscatterHistograms:
    """Monte Carlo histograms of the backscattered electrons of a phase.

    Parameters
    ----------
    phase
        orix phase; its density and mean ``Z``, ``A`` come from the unit cell
        (:func:`material_parameters`).
    kv
        Beam energy in keV (> 0).
    config
        Electron count, tilt, bins, seed, batch size and device.

    Returns
    -------
    BackscatterHistograms
        Counts by energy and exit direction, and by energy, escape depth and
        coarse direction; ``backscatter_yield`` is the fraction of incident
        electrons that leave with ``E > e_min``.

    Raises
    ------
    ValueError
        For ``kv <= 0`` or ``e_min >= kv``.

    Examples
    --------
    >>> from dpm.crystal import get_phase
    >>> h = backscatter_histograms(get_phase("li"), 20.0,
    ...                            MonteCarloConfig(n_electrons=2000))  # doctest: +SKIP
    >>> h.energies[-1], 0.1 < h.backscatter_yield < 0.4                 # doctest: +SKIP
    (20.0, True)
    """
    from dpm import backend
    from dpm.master.lambert import vector_to_lambert

    if not isinstance(config, MonteCarloConfig):
        raise TypeError(f"config must be a MonteCarloConfig, got {type(config).__name__}")
    if not kv > 0:
        raise ValueError(f"accelerating voltage must be positive (kV), got {kv}")
    kv = float(kv)
    e_min = float(config.e_min) if config.e_min is not None else kv / 2.0
    if not e_min < kv:
        raise ValueError(f"e_min ({e_min} keV) must be below the beam energy ({kv} keV)")
    xp = backend.array_module(config.device)
    material = material_parameters(phase)
    run = _Run(material, kv, e_min, xp)
    n_e = int((kv - e_min) / config.e_bin) + 1
    n_z = int(config.depth_max / config.depth_step) + 1
    half = (config.nsx - 1) // 2
    chalf = half // 10
    nc = 2 * chalf + 1
    counts = np.zeros((n_e, config.nsx, config.nsx), dtype=np.int64)
    depth_counts = np.zeros((n_e, n_z, nc, nc), dtype=np.int64)
    rng = np.random.default_rng(config.seed)
    tilt = math.radians(config.sample_tilt)
    t0 = time.perf_counter()
    n_steps_cap = config.max_steps
    for start in range(0, config.n_electrons, config.batch_size):
        n = min(config.batch_size, config.n_electrons - start)
        ux, uy, uz, depth, energy = _track_batch(run, n, tilt, rng, n_steps_cap)
        if not len(energy):
            continue
        ab = vector_to_lambert(np.stack([ux, uy, uz], axis=-1))
        col = _nint(half * ab[:, 0], np) + half
        row = _nint(half * ab[:, 1], np) + half
        ok = (row >= 0) & (row < config.nsx) & (col >= 0) & (col < config.nsx)
        ie = np.minimum(_nint((energy - e_min) / config.e_bin, np), n_e - 1)
        np.add.at(counts, (ie[ok], row[ok], col[ok]), 1)
        iz = _nint(depth / config.depth_step, np)
        inz = ok & (iz < n_z)
        crow = np.clip(_nint((row - half) / 10.0, np), -chalf, chalf) + chalf
        ccol = np.clip(_nint((col - half) / 10.0, np), -chalf, chalf) + chalf
        np.add.at(depth_counts, (ie[inz], iz[inz], crow[inz], ccol[inz]), 1)
    seconds = time.perf_counter() - t0
    backend.synchronize(xp)
    _log.info("Monte Carlo of %s at %.1f keV: %d electrons in %.2f s (%.0f /s), yield %.4f",
              phase.name, kv, config.n_electrons, seconds, config.n_electrons / max(seconds, 1e-9),
              counts.sum() / config.n_electrons)
    resolved = MonteCarloConfig(**{**config.__dict__, "e_min": e_min})
    return BackscatterHistograms(
        energies=e_min + config.e_bin * np.arange(n_e),
        depths=config.depth_step * np.arange(n_z),
        counts=counts, depth_counts=depth_counts, n_incident=int(config.n_electrons), kv=kv,
        material=material, config=resolved, seconds=seconds)
