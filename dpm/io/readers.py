"""Readers: pattern stacks (NumPy and every format kikuchipy reads) and orientation maps.

:func:`read_patterns` never loads a whole stack: ``.npy`` files are memory
mapped and vendor files come back as kikuchipy's lazy dask arrays, so stages
read the chunks they process. What the file says about the detector, the static
background, the step size and the vendor's band contrast is returned beside
the data.

:func:`read_map` reads an orientation map (.ang on a square or hexagonal grid,
.ctf, orix/dpm .h5) into dpm's layout: one rotation per pixel, row-major map
order ``i = row · nx + col``, every row ``nx`` pixels long, and the grid, map
shape and step beside it. Map coordinates and the hexagonal layout are those of
:mod:`dpm.grains`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpm.detector import Detector

log = logging.getLogger("dpm")


class PatternFileError(ValueError):
    """A pattern file is missing, unreadable, or holds no usable pattern stack."""


@dataclass(frozen=True, eq=False)
class PatternStack:
    """Patterns of one map and what their file says about them.

    Attributes
    ----------
    data : (ny, nx, sy, sx) array
        NumPy (possibly memory mapped) or dask array; a plain stack of ``n``
        patterns is a map of shape ``(1, n)``.
    source
        Where the patterns came from (file path, or ``"array"``).
    detector
        Detector geometry stored in the file, or None.
    static_background : (sy, sx) array or None
        Static background stored in the file.
    step_size
        Map step in µm, or None when the file does not say.
    band_contrast : (ny, nx) float32 array or None
        Band contrast (0–255) the acquisition software stored per pattern
        (Oxford h5oina: ``EBSD/Data/Band Contrast`` of the scan read), or None.
    """

    data: Any
    source: str = "array"
    detector: Detector | None = None
    static_background: np.ndarray | None = None
    step_size: float | None = None
    band_contrast: np.ndarray | None = None

    @property
    def map_shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return tuple(self.data.shape[:2])

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """``(sy, sx)``."""
        return tuple(self.data.shape[2:])


def as_pattern_stack(data: Any, source: str = "array") -> PatternStack:
    """Wrap an array of shape ``(n, sy, sx)`` or ``(ny, nx, sy, sx)`` as a :class:`PatternStack`.

    Raises
    ------
    PatternFileError
        If the array has another rank, no patterns, or a non-numeric dtype.
    """
    if isinstance(data, PatternStack):
        return data
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        data = np.asarray(data)
    if data.ndim == 3:
        data = data.reshape(1, *data.shape)
    if data.ndim != 4:
        raise PatternFileError(
            f"{source}: patterns must have shape (n, sy, sx) or (ny, nx, sy, sx), "
            f"got shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        raise PatternFileError(f"{source}: pattern stack is empty, shape {tuple(data.shape)}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise PatternFileError(f"{source}: patterns must be integer or float, got dtype {data.dtype}")
    return PatternStack(data=data, source=source)


def read_patterns(path: str | Path) -> PatternStack:
    """Open a pattern file lazily.

    Parameters
    ----------
    path
        A ``.npy`` array of shape ``(n, sy, sx)`` or ``(ny, nx, sy, sx)``, or
        any file kikuchipy reads (h5oina, .ebsp, Bruker/EDAX h5ebsd, up1/up2,
        NORDIF .dat, EMsoft, kikuchipy h5ebsd, image folders).

    Raises
    ------
    PatternFileError
        Naming the file, when it is missing, unreadable or holds no EBSD patterns.
    """
    path = Path(path)
    if not path.exists():
        raise PatternFileError(f"pattern file {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            data = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise PatternFileError(f"{path}: not a readable .npy array ({e})") from None
        return as_pattern_stack(data, source=str(path))
    return _read_with_kikuchipy(path)


def _read_with_kikuchipy(path: Path) -> PatternStack:
    import kikuchipy as kp

    try:
        signal = kp.load(path, lazy=True)
    except Exception as e:  # kikuchipy raises many types for unreadable files
        raise PatternFileError(f"{path}: kikuchipy cannot read it ({type(e).__name__}: {e})") from None
    if isinstance(signal, list):
        ebsd = [s for s in signal if isinstance(s, kp.signals.EBSD)]
        if not ebsd:
            raise PatternFileError(f"{path}: holds no EBSD pattern dataset")
        signal = ebsd[0]
    if not isinstance(signal, kp.signals.EBSD):
        raise PatternFileError(f"{path}: holds a {type(signal).__name__}, not EBSD patterns")
    stack = as_pattern_stack(signal.data, source=str(path))
    nav = signal.axes_manager.navigation_axes
    step = float(nav[0].scale) if nav and str(nav[0].units) in ("um", "µm") else None
    background = getattr(signal, "static_background", None)
    if background is not None:
        background = np.asarray(background)
        if background.shape != stack.pattern_shape:
            background = None
    return PatternStack(
        data=stack.data, source=str(path), detector=_detector_from_kikuchipy(signal.detector),
        static_background=background, step_size=step,
        band_contrast=_oxford_band_contrast(path, stack.map_shape))


def _oxford_band_contrast(path: Path, map_shape: tuple[int, int]) -> np.ndarray | None:
    """Band contrast of an Oxford h5oina file, as a ``(ny, nx)`` float32 array, or None.

    kikuchipy reads the patterns of the first top-level group of an h5oina
    file but not its band contrast, so it is read here from the same group:
    dataset ``EBSD/Data/Band Contrast`` (one value per pattern, 0–255, in
    acquisition order, which is row-major map order). Files of other vendors,
    and h5oina files without the dataset, give None; a dataset whose size
    differs from the map's is ignored with a warning.
    """
    import h5py

    if not h5py.is_hdf5(path):
        return None
    with h5py.File(path, "r") as f:
        manufacturer = f.get("Manufacturer")
        if not isinstance(manufacturer, h5py.Dataset):
            return None
        name = manufacturer[()]
        name = name.item() if isinstance(name, np.ndarray) else name
        name = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        groups = [f[key] for key in f if isinstance(f[key], h5py.Group)]
        if "oxford" not in name.lower() or not groups:
            return None
        dataset = groups[0].get("EBSD/Data/Band Contrast")
        if not isinstance(dataset, h5py.Dataset):
            return None
        where = dataset.name
        values = np.asarray(dataset[()], dtype=np.float32)
    if values.size != map_shape[0] * map_shape[1]:
        log.warning("%s: %s holds %d values for a map of %d x %d patterns; ignoring it",
                    path, where, values.size, *map_shape)
        return None
    return values.reshape(map_shape)


def _detector_from_kikuchipy(det: Any) -> Detector | None:
    """A single-PC dpm detector from a kikuchipy detector (mean PC of a PC map)."""
    from dpm.detector import as_detector

    pc = np.asarray(det.pc, dtype=float).reshape(-1, 3)
    spread = np.ptp(pc, axis=0).max()
    if spread > 1e-6:
        log.warning("file holds a PC per pattern (spread %.4f); using their mean", spread)
    single = det.deepcopy()
    single.pc = pc.mean(axis=0)
    return as_detector(single)


class MapFileError(ValueError):
    """An orientation-map file is missing, unreadable, or not a full map on one grid."""


@dataclass(frozen=True, eq=False)
class OrientationMapFile:
    """An orientation map read from a file, in dpm's layout.

    Attributes
    ----------
    xmap
        orix ``CrystalMap`` with one rotation per pixel in row-major map
        order (``i = row · nx + col``), ``ny · nx`` pixels, and the
        coordinates ``x = col · step``, ``y = row · step`` in µm on either
        grid (as :func:`dpm.index` builds maps; the hexagonal pixel centres
        follow from ``grid``, see :mod:`dpm.grains`). Phase ids run
        0 … m−1 in ascending order of the file's phase numbers; unindexed
        pixels have phase id −1.
    grid
        ``"square"`` or ``"hexagonal"`` (TSL HexGrid: rows √3/2 steps apart,
        odd rows shifted by half a step towards +x).
    map_shape
        ``(ny, nx)``.
    step_size
        Distance between neighbouring pixel centres along x, in µm.
    """

    xmap: Any
    grid: str
    map_shape: tuple[int, int]
    step_size: float


#: .ang columns (orix's names) that pad the short rows of a HexGrid file
#: (and mark its unindexed points): confidence index −1, pattern fit 180°;
#: every other column is 0, the rotation is the identity, the phase id −1.
ANG_PADDING = {"ci": -1.0, "fit": 180.0}

#: Relative tolerance on the step sizes of a header (XSTEP against YSTEP).
_STEP_RTOL = 1e-3
#: A point may lie this fraction of a step from its grid position (files
#: round coordinates to 4 or 5 decimals).
_POSITION_TOL = 0.05


def read_map(path: str | Path) -> OrientationMapFile:
    """Read an orientation map into dpm's layout.

    Parameters
    ----------
    path
        - ``.ang`` (EDAX TSL, EMsoft, orix, dpm): ``# GRID: SqrGrid`` or
          ``HexGrid``; the grid, ``XSTEP``, ``NCOLS_ODD``, ``NCOLS_EVEN`` and
          ``NROWS`` come from the header. Properties keep orix's column names
          (``iq``, ``ci``, ``detector_signal``, ``fit``, …); in TSL, orix and
          dpm files points with confidence index −1 are unindexed (orix's rule). A HexGrid row shorter than the
          longest (TSL's ``NCOLS_EVEN = NCOLS_ODD − 1``) is padded at its end
          (+x) with unindexed pixels holding :data:`ANG_PADDING`. The
          ``Symmetry`` code of a phase is a Laue class, so the phase's point
          group is its Laue group (TSL ``43``: m-3m).
        - ``.ctf`` (Oxford Channel 5 / AZtec, Bruker, EMsoft, MTEX, dpm):
          square grid, ``XCells``, ``YCells``, ``XStep`` from the header;
          properties ``bands``, ``error``, ``MAD``, ``BC``, ``BS``; phase 0
          is unindexed.
        - ``.h5`` / ``.hdf5`` that orix reads (orix and dpm ``map.h5``,
          EDAX/Bruker/EMsoft h5ebsd): square grid, shape and step from the
          coordinates (1 µm for a single pixel); a map with several
          rotations per point keeps the first (the best match), its
          properties are kept whole.

    Returns
    -------
    OrientationMapFile

    Raises
    ------
    MapFileError
        A ``ValueError`` naming the file, when it is missing, of another
        format, unreadable or truncated, or when its points do not fill a
        rectangular map in row-major order on the grid its header states.

    Examples
    --------
    >>> m = read_map("map.ang")  # doctest: +SKIP
    >>> m.grid, m.map_shape, m.step_size  # doctest: +SKIP
    ('hexagonal', (40, 61), 0.5)
    """
    path = Path(path)
    if not path.is_file():
        raise MapFileError(f"orientation map file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".ang":
        return _read_ang(path)
    if suffix == ".ctf":
        return _read_ctf(path)
    if suffix in (".h5", ".hdf5"):
        return _read_h5(path)
    raise MapFileError(f"{path}: unknown orientation-map format {path.suffix!r}; "
                       "expected .ang, .ctf or .h5")


def map_layout(xmap: Any) -> tuple[tuple[int, int], float]:
    """Map shape and step of a CrystalMap whose points fill a square grid in row-major order.

    Parameters
    ----------
    xmap
        orix ``CrystalMap``; its coordinates (of the points in data) must be
        ``x = x₀ + col · step``, ``y = y₀ + row · step`` (``x₀``, ``y₀`` the
        smallest), point ``i`` at ``row = i // nx``, ``col = i % nx``.

    Returns
    -------
    map_shape
        ``(ny, nx)``; a single row or column of points is ``(1, n)`` or ``(n, 1)``.
    step
        In the map's unit (µm for dpm maps): ``dx``, or ``dy`` for a single
        column, or 1.0 for a single point.

    Raises
    ------
    ValueError
        If the points do not fill the grid, x and y steps differ, or the
        order is not row-major.
    """
    n = int(xmap.size)
    shape = tuple(int(s) for s in xmap.shape)
    if len(shape) == 2:
        ny, nx = shape
    elif xmap.x is None and xmap.y is not None:
        ny, nx = n, 1
    else:
        ny, nx = 1, n
    if ny * nx != n:
        raise ValueError(f"its {n} points do not fill a rectangular map (coordinates span {ny} x {nx})")
    dx, dy = float(xmap.dx), float(xmap.dy)
    if nx > 1 and ny > 1 and not math.isclose(dx, dy, rel_tol=_STEP_RTOL):
        raise ValueError(f"x step {dx} and y step {dy} differ; dpm maps have one step size")
    step = dx if nx > 1 else dy if ny > 1 else 1.0
    row, col = np.divmod(np.arange(n), nx)
    _check_positions(_coordinates(xmap), row, col, "square", step, step)
    return (ny, nx), step


def _coordinates(xmap: Any) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the points in data (zeros where orix holds one value only)."""
    zeros = np.zeros(int(xmap.size))
    x = zeros if xmap.x is None else np.asarray(xmap.x, dtype=np.float64)
    y = zeros if xmap.y is None else np.asarray(xmap.y, dtype=np.float64)
    return x, y


def _check_positions(xy: tuple[np.ndarray, np.ndarray], row: np.ndarray, col: np.ndarray,
                     grid: str, step: float, ystep: float) -> None:
    """Raise ValueError unless point k lies at its grid position (row[k], col[k]).

    Positions are ``x = x₀ + (col + ½ (row mod 2 on hexagonal grids)) · step``,
    ``y = y₀ + row · ystep``, with ``(x₀, y₀)`` the smallest x and y.
    """
    x, y = xy
    if len(x) == 0:
        raise ValueError("it holds no points")
    shift = 0.5 * (row % 2) if grid == "hexagonal" else 0.0
    ex = x.min() + (col + shift) * step
    ey = y.min() + row * ystep
    off = np.hypot(x - ex, y - ey)
    bad = np.flatnonzero(off > _POSITION_TOL * step)
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"point {k} lies at (x, y) = ({x[k]:g}, {y[k]:g}), not at "
                         f"({ex[k]:g}, {ey[k]:g}) where row {row[k]}, column {col[k]} of a "
                         f"row-major {grid} grid with step {step:g} would put it")


def _file_points(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each point of a file whose row r holds ``counts[r]`` points."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    row = np.repeat(np.arange(len(counts_arr)), counts_arr)
    start = np.repeat(np.cumsum(counts_arr) - counts_arr, counts_arr)
    return row, np.arange(int(counts_arr.sum())) - start


def _orix_load(path: Path, **kwargs: Any) -> Any:
    import warnings

    from orix import io as orix_io

    try:
        with warnings.catch_warnings():
            # the Euler angles 4π of unindexed .ang points, the format's marker
            warnings.filterwarnings("ignore", message="Angles are quite high")
            return orix_io.load(str(path), **kwargs)
    except Exception as e:  # orix and NumPy raise many types for unreadable files
        raise MapFileError(f"{path}: not an orientation map orix reads ({type(e).__name__}: {e})") from None


def _header_number(values: dict[str, str], key: str, path: Path, kind: type) -> Any:
    if key not in values:
        raise MapFileError(f"{path}: header has no {key}")
    try:
        return kind(values[key].split()[0])
    except (ValueError, IndexError):
        raise MapFileError(f"{path}: header {key} {values[key]!r} is not a number") from None


def _ang_header(path: Path) -> dict[str, str]:
    """``KEY: value`` pairs of the ``#`` header of an .ang file, keys upper case."""
    values: dict[str, str] = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if not line.startswith("#"):
                break
            key, sep, value = line[1:].partition(":")
            if sep:
                values[key.strip().upper()] = value.strip()
    return values


def _read_ang(path: Path) -> OrientationMapFile:
    header = _ang_header(path)
    if "GRID" not in header:
        raise MapFileError(f"{path}: header has no GRID")
    grid_name = header["GRID"]
    grids = {"sqrgrid": "square", "squaregrid": "square", "hexgrid": "hexagonal"}
    if grid_name.lower() not in grids:
        raise MapFileError(f"{path}: header GRID {grid_name!r} is neither SqrGrid nor HexGrid")
    grid = grids[grid_name.lower()]
    step = _header_number(header, "XSTEP", path, float)
    ystep = _header_number(header, "YSTEP", path, float)
    n_odd = _header_number(header, "NCOLS_ODD", path, int)
    n_even = _header_number(header, "NCOLS_EVEN", path, int)
    ny = _header_number(header, "NROWS", path, int)
    if min(n_odd, n_even, ny) < 1 or step <= 0:
        raise MapFileError(f"{path}: header gives an empty map (NCOLS_ODD {n_odd}, NCOLS_EVEN "
                           f"{n_even}, NROWS {ny}, XSTEP {step})")
    if grid == "square" and n_odd != n_even:
        raise MapFileError(f"{path}: a SqrGrid map with rows of {n_odd} and {n_even} points is "
                           "not rectangular")
    expected_ystep = step * math.sqrt(3) / 2 if grid == "hexagonal" else step
    if ny > 1 and not math.isclose(ystep, expected_ystep, rel_tol=_STEP_RTOL):
        raise MapFileError(f"{path}: YSTEP {ystep} with XSTEP {step} on a {grid_name}; expected "
                           f"YSTEP {expected_ystep:.6f}")
    raw = _orix_load(path, autogen_names=False)
    counts = [n_odd if r % 2 == 0 else n_even for r in range(ny)]
    if raw.size != sum(counts):
        raise MapFileError(f"{path}: holds {raw.size} points; its header ({grid_name}, "
                           f"NCOLS_ODD {n_odd}, NCOLS_EVEN {n_even}, NROWS {ny}) needs {sum(counts)}")
    row, col = _file_points(counts)
    try:
        _check_positions(_coordinates(raw), row, col, grid, step, expected_ystep)
    except ValueError as e:
        raise MapFileError(f"{path}: {e}") from None
    map_shape = (ny, max(n_odd, n_even))
    xmap = _rebuild(raw, row, col, map_shape, step, ANG_PADDING, laue=True)
    return OrientationMapFile(xmap=xmap, grid=grid, map_shape=map_shape, step_size=step)


def _ctf_header(path: Path) -> dict[str, str]:
    """``Key<tab>value`` pairs of a .ctf header (up to the data's column names)."""
    values: dict[str, str] = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("Phase\tX\tY"):
                break
            key, _, value = line.strip().partition("\t")
            values.setdefault(key, value.strip())
    return values


def _read_ctf(path: Path) -> OrientationMapFile:
    header = _ctf_header(path)
    nx = _header_number(header, "XCells", path, int)
    ny = _header_number(header, "YCells", path, int)
    step = _header_number(header, "XStep", path, float)
    ystep = _header_number(header, "YStep", path, float)
    if min(nx, ny) < 1 or step <= 0:
        raise MapFileError(f"{path}: header gives an empty map (XCells {nx}, YCells {ny}, XStep {step})")
    if ny > 1 and not math.isclose(ystep, step, rel_tol=_STEP_RTOL):
        raise MapFileError(f"{path}: XStep {step} and YStep {ystep} differ; dpm maps have one step size")
    raw = _orix_load(path)
    if raw.size != nx * ny:
        raise MapFileError(f"{path}: holds {raw.size} points; XCells {nx} x YCells {ny} needs {nx * ny}")
    row, col = np.divmod(np.arange(nx * ny), nx)
    try:
        _check_positions(_coordinates(raw), row, col, "square", step, step)
    except ValueError as e:
        raise MapFileError(f"{path}: {e}") from None
    xmap = _rebuild(raw, row, col, (ny, nx), step, {}, laue=False)
    return OrientationMapFile(xmap=xmap, grid="square", map_shape=(ny, nx), step_size=step)


def _read_h5(path: Path) -> OrientationMapFile:
    raw = _orix_load(path)
    try:
        map_shape, step = map_layout(raw)
    except ValueError as e:
        raise MapFileError(f"{path}: {e}") from None
    row, col = np.divmod(np.arange(raw.size), map_shape[1])
    xmap = _rebuild(raw, row, col, map_shape, step, {}, laue=False)
    return OrientationMapFile(xmap=xmap, grid="square", map_shape=map_shape, step_size=step)


def _rebuild(raw: Any, row: np.ndarray, col: np.ndarray, map_shape: tuple[int, int], step: float,
             padding: dict[str, float], *, laue: bool) -> Any:
    """dpm's CrystalMap of ``raw``'s points placed at (row, col); missing pixels are padding.

    Padding pixels are unindexed (phase −1) with the identity rotation and
    ``padding.get(name, 0)`` in every property. Phases are renumbered
    0 … m−1 in ascending order of their ids in ``raw``; with ``laue`` each
    phase's point group becomes its Laue group.
    """
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    ny, nx = map_shape
    n = ny * nx
    target = row * nx + col
    q = np.asarray(raw.rotations.data, dtype=np.float64)
    q = q.reshape(raw.size, -1, 4)[:, 0]  # several rotations per point: the best
    quaternions = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))
    quaternions[target] = q
    old_ids = [int(i) for i in raw.phases.ids if i >= 0]
    phases = {}
    for new, old in enumerate(old_ids):
        phase = raw.phases[old].deepcopy()
        if laue and phase.point_group is not None:
            phase.point_group = phase.point_group.laue
        phases[new] = phase
    phase_id = np.full(n, -1, dtype=np.int64)
    file_ids = np.asarray(raw.phase_id, dtype=np.int64)
    renumbered = np.full(file_ids.shape, -1, dtype=np.int64)
    for new, old in enumerate(old_ids):
        renumbered[file_ids == old] = new
    phase_id[target] = renumbered
    prop = {}
    for name in raw.prop:
        values = np.asarray(raw.prop[name])  # the points in data
        filled = np.full((n,) + values.shape[1:], padding.get(name, 0), dtype=values.dtype)
        filled[target] = values
        prop[name] = filled
    y, x = np.divmod(np.arange(n), nx)
    return CrystalMap(Rotation(quaternions), phase_id=phase_id, x=x * step, y=y * step,
                      phase_list=PhaseList(phases) if phases else None, prop=prop, scan_unit="um")
