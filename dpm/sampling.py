"""Orientation sampling: the fundamental zone of SO(3) at a given spacing.

The dictionary of simulated patterns is projected at orientations that cover the
fundamental zone of the phase's proper point group uniformly. dpm delegates the
sampling to orix (:func:`orix.sampling.get_sample_fundamental`, cubochoric
method of Singh & De Graef, MSMSE 24 (2016) 085013) so its grids are those of
kikuchipy and orix one for one; see ``reference/DYNAMICAL.md`` §7 for the
counts (100,347 orientations for m-3m at 2°).
"""

from __future__ import annotations

import logging

from orix.crystal_map import Phase
from orix.quaternion import Rotation
from orix.quaternion.symmetry import Symmetry

_log = logging.getLogger("dpm")


def _point_group(phase_or_point_group: Phase | Symmetry | str) -> Symmetry:
    """Point group of an orix Phase, a Symmetry, or a Hermann–Mauguin name."""
    if isinstance(phase_or_point_group, Phase):
        point_group = phase_or_point_group.point_group
        if point_group is None:
            raise ValueError(
                f"phase {phase_or_point_group.name!r} has no point group; give the "
                "phase a space group or point group"
            )
        return point_group
    if isinstance(phase_or_point_group, Symmetry):
        return phase_or_point_group
    if isinstance(phase_or_point_group, str):
        try:
            point_group = Phase(point_group=phase_or_point_group).point_group
        except Exception as error:  # orix raises ValueError/KeyError/IndexError by version
            raise ValueError(
                f"unknown point group name {phase_or_point_group!r}; expected a "
                "Hermann-Mauguin symbol such as 'm-3m' or '432'"
            ) from error
        if point_group is None:
            raise ValueError(f"unknown point group name {phase_or_point_group!r}")
        return point_group
    raise TypeError(
        "phase_or_point_group must be an orix Phase, an orix Symmetry or a point group "
        f"name such as 'm-3m', got {type(phase_or_point_group).__name__}"
    )


def sample_orientations(
    phase_or_point_group: Phase | Symmetry | str, resolution: float = 2.0
) -> Rotation:
    """Sample the fundamental zone of a phase's proper point group.

    Parameters
    ----------
    phase_or_point_group
        An orix ``Phase`` (its ``point_group`` is used), an orix point group
        (``Symmetry``), or a Hermann–Mauguin point group name such as ``"m-3m"``.
        Improper groups are reduced to their proper subgroup (``m-3m`` → ``432``),
        as only rotations are sampled.
    resolution
        Characteristic spacing between neighbouring orientations, in degrees
        (default 2°). Must be positive.

    Returns
    -------
    rotations : (m,) orix Rotation
        Rotations (sample → crystal, orix convention) on the cubochoric grid
        that lie inside the fundamental zone, duplicates removed; exactly what
        ``orix.sampling.get_sample_fundamental(resolution,
        point_group=pg.proper_subgroup, method="cubochoric")`` returns.

    Raises
    ------
    ValueError
        If ``resolution`` is not positive or the point group name is unknown.
    TypeError
        If ``phase_or_point_group`` is of another type.

    Examples
    --------
    >>> from dpm.sampling import sample_orientations
    >>> sample_orientations("m-3m", resolution=5).size
    6579
    """
    from orix.sampling import get_sample_fundamental

    if not resolution > 0:
        raise ValueError(f"resolution must be a positive angle in degrees, got {resolution}")
    proper = _point_group(phase_or_point_group).proper_subgroup
    rotations = get_sample_fundamental(
        float(resolution), point_group=proper, method="cubochoric"
    )
    _log.info(
        "sampled %d orientations in the fundamental zone of %s at %g deg",
        rotations.size, proper.name, resolution,
    )
    return rotations
