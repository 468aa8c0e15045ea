"""Master patterns: Kikuchi intensity over the whole sphere, on square Lambert grids.

A :class:`MasterPattern` holds one beam energy of a master pattern as two
``(2 npx + 1)²`` float32 arrays, one per hemisphere, in EMsoft's layout
(``[row, col] = [Lambert y, Lambert x]``, see :mod:`dpm.master.lambert`).
:func:`simulate_master_pattern` makes one for a phase; files are read and
written in EMsoft's HDF5 layout by :mod:`dpm.io.emsoft`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from orix.crystal_map import Phase

Method = Literal["kinematical", "dynamical"]


@dataclass(frozen=True, eq=False)
class MasterPattern:
    """One energy of a master pattern on the square Lambert grids of both hemispheres.

    Attributes
    ----------
    northern, southern : (2 npx + 1, 2 npx + 1) float32 array
        Intensity of the northern (``z >= 0``) and southern hemisphere of the
        crystal frame; ``[row, col]`` is Lambert ``(y, x)``.
    phase
        orix phase (space group, lattice in Å, atoms).
    energy
        Beam energy of this slice in keV.
    method
        How it was made: ``"kinematical"``, ``"dynamical"`` or ``"file"``.
    params
        Parameters of the simulation (recorded in written files).
    """

    northern: np.ndarray
    southern: np.ndarray
    phase: Phase
    energy: float
    method: str = "kinematical"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        north = np.ascontiguousarray(self.northern, dtype=np.float32)
        south = np.ascontiguousarray(self.southern, dtype=np.float32)
        if north.ndim != 2 or north.shape[0] != north.shape[1] or north.shape[0] % 2 != 1:
            raise ValueError(
                f"master pattern hemispheres must be square with an odd side (2 npx + 1), "
                f"got shape {north.shape}")
        if south.shape != north.shape:
            raise ValueError(
                f"northern {north.shape} and southern {south.shape} hemispheres differ in shape")
        if not (np.isfinite(north).all() and np.isfinite(south).all()):
            raise ValueError("master pattern contains NaN or infinite values")
        if not self.energy > 0:
            raise ValueError(f"beam energy must be positive (keV), got {self.energy}")
        object.__setattr__(self, "northern", north)
        object.__setattr__(self, "southern", south)

    @property
    def npx(self) -> int:
        """Half-width of the Lambert grid in pixels (side ``2 npx + 1``)."""
        return (self.northern.shape[0] - 1) // 2

    def to_kikuchipy(self):
        """Return a kikuchipy ``EBSDMasterPattern`` (Lambert, both hemispheres)."""
        from kikuchipy.signals import EBSDMasterPattern

        data = np.stack([self.northern, self.southern])
        mp = EBSDMasterPattern(data, projection="lambert", hemisphere="both", phase=self.phase)
        mp._energy = np.array([self.energy])  # noqa: SLF001 (kikuchipy keeps the energy here)
        return mp

    @classmethod
    def from_kikuchipy(cls, mp, energy: float | None = None) -> MasterPattern:
        """Build from a kikuchipy ``EBSDMasterPattern`` in Lambert projection.

        Parameters
        ----------
        mp
            Master pattern with ``hemisphere="both"`` and optionally an energy axis.
        energy
            Energy slice in keV; the highest when None (kikuchipy's default).
        """
        if mp.projection != "lambert":
            raise ValueError(f"master pattern must be in the Lambert projection, got {mp.projection!r}")
        if mp.hemisphere != "both":
            raise ValueError(f"master pattern must hold both hemispheres, got {mp.hemisphere!r}")
        data = np.asarray(mp.data)
        energy_axes = [a for a in mp.axes_manager.navigation_axes if a.name == "energy"]
        if data.ndim == 4 and energy_axes:  # (hemisphere, energy, row, col)
            energies = np.asarray(energy_axes[0].axis, dtype=float)
            i = int(np.argmax(energies)) if energy is None else int(np.argmin(abs(energies - energy)))
            data, e = data[:, i], float(energies[i])
        elif data.ndim == 3 and energy is not None:
            e = float(energy)
        else:
            raise ValueError(f"cannot tell the beam energy of a master pattern of shape "
                             f"{data.shape}; pass energy= (keV)")
        return cls(data[0], data[1], phase=mp.phase.deepcopy(), energy=e, method="file")


def simulate_master_pattern(
    phase: str | Phase,
    kv: float = 20.0,
    npx: int = 500,
    method: Method = "dynamical",
    supersample: int = 2,
    **options: Any,
) -> MasterPattern:
    """Simulate the master pattern of a phase.

    Parameters
    ----------
    phase
        ``"li"``, ``"na"``, ``"al"``, ``"cu"``, a CIF path, or an orix ``Phase``.
    kv
        Accelerating voltage in kV.
    npx
        Half-width of the Lambert grid (side ``2 npx + 1``), at least 10.
    method
        ``"dynamical"`` (Bloch waves with Bethe potentials and absorption,
        EMsoft's model) or ``"kinematical"`` (band intensities from |F|²).
    supersample
        Anti-aliasing: simulate on a grid ``supersample`` times finer and
        decimate it (:func:`dpm.master.lambert.downsample`). Dynamical master
        patterns hold lines far thinner than a Lambert pixel; sampled at the
        pixel centres alone they alias, and the pattern loses the crystal's
        3-fold symmetry between grid points (1 = no anti-aliasing).
    **options
        Passed to the method's config (:class:`dpm.master.kinematical.KinematicalConfig`
        or :class:`dpm.master.dynamical.DynamicalConfig`).

    Examples
    --------
    >>> import dpm
    >>> mp = dpm.simulate_master_pattern("li", kv=20, npx=60)  # doctest: +SKIP
    """
    from dataclasses import replace

    from dpm.crystal import get_phase
    from dpm.master.lambert import downsample

    if int(npx) != npx or npx < 10:
        raise ValueError(f"npx must be an integer of at least 10, got {npx!r}")
    if int(supersample) != supersample or supersample < 1:
        raise ValueError(f"supersample must be a positive integer, got {supersample!r}")
    ph = get_phase(phase) if isinstance(phase, str) else phase
    fine_npx = int(npx) * int(supersample)
    if method == "kinematical":
        from dpm.master.kinematical import KinematicalConfig, kinematical_master_pattern

        fine = kinematical_master_pattern(ph, kv=kv, npx=fine_npx, config=KinematicalConfig(**options))
    elif method == "dynamical":
        from dpm.master.dynamical import DynamicalConfig, dynamical_master_pattern

        fine = dynamical_master_pattern(ph, kv=kv, npx=fine_npx, config=DynamicalConfig(**options))
    else:
        raise ValueError(f"unknown master-pattern method {method!r}; available: 'dynamical', "
                         "'kinematical'")
    north, south = downsample(fine.northern, fine.southern, int(supersample))
    return replace(fine, northern=north, southern=south,
                   params={**fine.params, "npx": int(npx), "supersample": int(supersample)})
