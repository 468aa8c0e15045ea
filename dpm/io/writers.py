"""Writers for indexing results: orix CrystalMap HDF5, .ang, .ctf, PNG maps, JSON and TOML.

:func:`write_index_outputs` fills an output folder the way ``dpm index``
promises (DESIGN.md, "Command line"): ``map.h5``, ``map.ang``, ``map.ctf``,
the IPF maps with their key (:func:`dpm.maps.write_ipf_maps`), ``scores.png``,
``band_contrast.png`` (:func:`dpm.maps.write_property_maps`),
``pattern_quality.png``, ``summary.json`` and ``config.toml``.

Orientation-map files
---------------------
:func:`write_ang` (EDAX TSL .ang, square or hexagonal grid) and
:func:`write_ctf` (Oxford Channel Text File, square grid) take a map in dpm's
layout: one rotation per pixel (the first, i.e. best match, of several),
row-major map order ``i = row · nx + col``, every row ``nx`` pixels long, the
hexagonal layout of :mod:`dpm.grains`. orix's readers (``orix.io.load``) and
:func:`dpm.io.readers.read_map` read both back. Each file column is filled
from the first property of the map that is present among those listed in
:data:`ANG_COLUMNS` / :data:`CTF_COLUMNS` (the format's own name first, so a
map read from such a file is written back unchanged, then dpm's property),
else from the listed constant. Unindexed pixels (phase id −1) follow the
formats' conventions, as orix's readers expect them:

- .ang: Euler angles 4π, confidence index −1, pattern fit 180°, phase 0;
  image quality and detector signal keep their values.
- .ctf: Euler angles 0, Error 3 ("no solution"; a non-zero error code of the
  map's ``error`` property is kept), phase 0; the other columns keep their values.

``map.h5``
----------
orix's own CrystalMap HDF5 (orix's ``orix_hdf5`` writer, that of
``orix.io.save``): the rotations as Bunge Euler
angles (radians; ``(n, k)`` for several rotations per pixel) and every
property of the map as its own dataset ``crystal_map/data/<name>`` with the
property's shape and dtype: ``(n,)`` scores, band contrast, PC columns,
``(n, keep)`` ``topk_indices`` (int64) and ``topk_scores`` (float32), and
boolean flags (``readable``, ``replaced``, …; h5py's boolean enum). orix
0.15 writes and reads 2-D and boolean properties as they are, so nothing is
split or converted.

Every file these writers make is written whole or not at all
(:func:`atomic_write`, HDF5 files through :func:`atomic_write_hdf5`); an output folder that cannot take files is reported
before anything is computed (:func:`prepare_output_dir`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kikuchipy.detectors import EBSDDetector

    from dpm.detector import Detector

log = logging.getLogger("dpm")

#: .ang data columns after ``phi1 Phi phi2 x y`` and their sources: (column,
#: ((property, scale), …), value without one). TSL's ten-column order is
#: ``phi1 Phi phi2 x y IQ CI phase detector_signal fit``.
ANG_COLUMNS: tuple[tuple[str, tuple[tuple[str, float], ...], float], ...] = (
    ("IQ", (("iq", 1.0), ("pattern_quality", 1.0)), 0.0),
    ("CI", (("ci", 1.0), ("scores", 1.0)), 0.0),
    ("detector_signal", (("detector_signal", 1.0),), 0.0),
    ("fit", (("fit", 1.0),), 0.0),
)

#: .ctf columns besides ``Phase X Y Euler1 Euler2 Euler3`` and their sources,
#: as :data:`ANG_COLUMNS`. dpm detects no bands and fits none (Bands 0,
#: MAD 0°); BC is dpm's band contrast (0–255); BS is dpm's pattern quality
#: (Krieger Lassen image quality, 0–1) on the column's 0–255 scale. Bands,
#: Error, BC and BS are integers (BC and BS rounded and clipped to 0–255).
CTF_COLUMNS: tuple[tuple[str, tuple[tuple[str, float], ...], float], ...] = (
    ("Bands", (("bands", 1.0),), 0.0),
    ("Error", (("error", 1.0),), 0.0),
    ("MAD", (("MAD", 1.0),), 0.0),
    ("BC", (("BC", 1.0), ("band_contrast", 1.0)), 0.0),
    ("BS", (("BS", 1.0), ("pattern_quality", 255.0)), 0.0),
)

#: TSL .ang ``Symmetry`` code of each Laue group (orix names).
TSL_SYMMETRY = {"-1": "1", "2/m": "2", "mmm": "22", "4/m": "4", "4/mmm": "42", "-3": "3",
                "-3m": "32", "6/m": "6", "6/mmm": "62", "m-3": "23", "m-3m": "43"}

#: Channel 5 .ctf Laue group number of each Laue group (orix names).
CTF_LAUE = {"-1": 1, "2/m": 2, "mmm": 3, "4/m": 4, "4/mmm": 5, "-3": 6, "-3m": 7, "6/m": 8,
            "6/mmm": 9, "m-3": 10, "m-3m": 11}

#: Error code of an unindexed .ctf point ("no solution").
CTF_NO_SOLUTION = 3


class OutputError(OSError):
    """An output folder or file cannot be written."""


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write a file so that it is either complete or absent, never half written.

    ``write(tmp)`` writes the content to a temporary file beside ``path``
    (``.tmp-<pid>-<name>``: same folder and file system, same suffix, so
    writers that choose the format by suffix still do); it is flushed to
    disk and renamed onto ``path`` (``os.replace``, atomic on POSIX file
    systems). If writing fails (full disk, permissions, an exception in
    ``write``, a kill), ``path`` keeps its previous content or stays absent,
    and the temporary file is removed (after a kill, a ``.tmp-*`` file may be
    left; it is never mistaken for a result).

    Parameters
    ----------
    path
        The file to write (replaced if it exists).
    write
        Writes the whole content to the path it is given.

    Returns
    -------
    path

    Raises
    ------
    OutputError
        Naming the file and the reason, when the operating system refuses
        the write (e.g. ``No space left on device``, ``File too large``).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # h5py's strerror is HDF5's whole error stack; the errno says it in a few words
        reason = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
        raise OutputError(f"cannot write {path} ({reason}); files written before "
                          "are kept") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_hdf5(path: str | Path, fill: Callable[[io.BytesIO], Any]) -> Path:
    """Write an HDF5 file whole or not at all: built in memory, then written by :func:`atomic_write`.

    ``fill(buffer)`` writes the HDF5 file into an in-memory file object
    (``h5py.File(buffer, "w")`` accepts it); its bytes then go to disk in
    one plain write. HDF5 is never left to write to disk itself: when a
    write fails in the middle of HDF5's own (full disk, file-size limit),
    h5py 3.16 / HDF5 2.0 crash the process (segmentation fault) instead of
    raising. The file's size is held in memory once.

    Parameters
    ----------
    path
        The file to write (replaced if it exists).
    fill
        Writes the whole HDF5 content into the buffer it is given.

    Returns
    -------
    path

    Raises
    ------
    OutputError
        Naming the file and the reason, when the operating system refuses
        the write.
    """
    buffer = io.BytesIO()
    fill(buffer)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def prepare_output_dir(out: str | Path) -> Path:
    """Create the folder ``out`` if needed and check that files can be written in it.

    Returns
    -------
    out : Path

    Raises
    ------
    OutputError
        Naming the folder, if ``out`` is an existing file, cannot be created
        (e.g. a part of its path is a file, or permission denied) or does
        not take new files.
    """
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output folder {out} cannot be created ({e.strerror or e})") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OutputError(f"output folder {out} is not writable ({e.strerror or e})") from None
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write {value} to TOML")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(config: dict[str, Any]) -> str:
    """Serialise a nested dict of scalars and lists as TOML (None values are left out;
    a dict within a table is the table ``[outer.inner]``)."""
    return "\n".join(_toml_lines(config, "")) + "\n"


def _toml_lines(table: dict[str, Any], name: str) -> list[str]:
    lines = [f"\n[{name}]"] if name else []
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((f"{name}.{key}" if name else key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for sub, value in nested:
        lines += _toml_lines(value, sub)
    return lines


def _file_map(xmap: Any, map_shape: tuple[int, int] | None,
              step_size: float | None) -> tuple[np.ndarray, np.ndarray, list[Any], tuple[int, int], float]:
    """What a map file needs of ``xmap``.

    Returns
    -------
    quaternions : (n, 4) float64 array
        One rotation per pixel (the first of several).
    phase_number : (n,) int64 array
        File phase numbers: 1 … m for the map's phases in ascending id order,
        0 for unindexed pixels.
    phases
        The m orix phases.
    map_shape
        ``(ny, nx)``.
    step
        µm.
    """
    from dpm.io.readers import map_layout

    n = int(xmap.size)
    if map_shape is None:
        try:
            map_shape, layout_step = map_layout(xmap)
        except ValueError as e:
            raise ValueError(f"cannot write the map to a file: {e}; pass map_shape") from None
    else:
        map_shape = (int(map_shape[0]), int(map_shape[1]))
        if map_shape[0] * map_shape[1] != n or min(map_shape) < 1:
            raise ValueError(f"map_shape {map_shape} does not hold the map's {n} points")
        layout_step = float(xmap.dx) or float(xmap.dy) or 1.0
    step = float(step_size) if step_size is not None else layout_step
    if not step > 0:
        raise ValueError(f"Expected a positive step size in µm, got {step}")
    quaternions = np.asarray(xmap.rotations.data, dtype=np.float64).reshape(n, -1, 4)[:, 0]
    ids = [int(i) for i in xmap.phases.ids if i >= 0]
    phase_id = np.asarray(xmap.phase_id, dtype=np.int64)
    phase_number = np.zeros(n, dtype=np.int64)
    for number, i in enumerate(ids, start=1):
        phase_number[phase_id == i] = number
    return quaternions, phase_number, [xmap.phases[i] for i in ids], map_shape, step


def _columns(xmap: Any, spec: tuple[tuple[str, tuple[tuple[str, float], ...], float], ...]
             ) -> dict[str, np.ndarray]:
    """Each file column of ``spec`` as an (n,) float64 array (first value of 2-D properties)."""
    n = int(xmap.size)
    out = {}
    for column, sources, constant in spec:
        out[column] = np.full(n, constant, dtype=np.float64)
        for name, scale in sources:
            if name in xmap.prop:
                values = np.asarray(xmap.prop[name], dtype=np.float64).reshape(n, -1)[:, 0]
                out[column] = values * scale
                break
    return out


def _lattice(phase: Any) -> tuple[float, float, float, float, float, float]:
    """a, b, c (Å) and α, β, γ (degrees) of an orix phase's structure."""
    return tuple(float(v) for v in phase.structure.lattice.abcABG())


def _laue_name(phase: Any) -> str:
    return phase.point_group.laue.name if phase.point_group is not None else "-1"


def write_ang(xmap: Any, path: str | Path, *, grid: str = "square",
              map_shape: tuple[int, int] | None = None, step_size: float | None = None,
              detector: Detector | EBSDDetector | None = None) -> Path:
    """Write an orientation map as an EDAX TSL .ang file, on a square or hexagonal grid.

    Columns (TSL's ten): ``phi1 Phi phi2`` (Bunge Euler angles in radians,
    orix's sample-to-crystal convention), ``x y`` (µm), ``IQ`` ← property
    ``iq`` or ``pattern_quality``, ``CI`` ← ``ci`` or ``scores`` (NCC),
    ``phase`` (1 … m, 0 unindexed), ``detector_signal`` ← ``detector_signal``
    (else 0), ``fit`` ← ``fit`` (else 0). Unindexed pixels as in the
    module docstring. The header holds, per phase, ``# Phase``,
    ``# MaterialName`` and ``# Formula`` (the phase name), ``# Symmetry`` (TSL
    code of the Laue group, :data:`TSL_SYMMETRY`), ``# LatticeConstants``
    (Å, degrees, from the phase's structure), then ``# GRID``, ``# XSTEP``,
    ``# YSTEP`` (µm), ``# NCOLS_ODD``, ``# NCOLS_EVEN`` and ``# NROWS``.
    Before the phases, ``# x-star``, ``# y-star``, ``# z-star`` hold the
    ``detector``'s pattern centre in EDAX TSL's convention (fractions of
    the pattern width, of its height from the bottom edge, and of its
    shorter side; :meth:`dpm.detector.Detector.pc_in`), 0 without one, as
    TSL's own and orix's files lay them out. Properties with several values
    per pixel (e.g. ``topk_scores``) give a column their first value; the
    others are not written. The file is written whole or not at all
    (:func:`atomic_write`).

    Hexagonal grid (``# GRID: HexGrid``): TSL's rows 1, 3, … (dpm's rows 0,
    2, …) hold ``NCOLS_ODD`` points at ``x = i · XSTEP``, the rows between
    them ``NCOLS_EVEN`` points at ``x = (i + ½) · XSTEP``; ``YSTEP = XSTEP ·
    √3/2``. That is dpm's layout, so every row is written with its ``nx``
    pixels (``NCOLS_EVEN = NCOLS_ODD``: the scan of width ``(nx − ½) ·
    XSTEP``; readers that take the x, y columns, such as orix and MTEX,
    accept it) and nothing is lost. Only where the last pixel of every
    shifted row is exactly what a reader pads a short row with (unindexed,
    IQ and detector signal 0, see :data:`dpm.io.readers.ANG_PADDING`) are
    those pixels left out, giving TSL's own ``NCOLS_EVEN = NCOLS_ODD − 1``;
    :func:`dpm.io.readers.read_map` restores them, so a TSL HexGrid file read
    by dpm is written back with its own layout.

    Parameters
    ----------
    xmap
        orix ``CrystalMap`` in dpm's layout (module docstring).
    path
        File to write (overwritten).
    grid
        ``"square"`` or ``"hexagonal"``.
    map_shape
        ``(ny, nx)``; by default from the map's coordinates, which must then
        be ``x = col · step``, ``y = row · step`` (as :func:`dpm.index` makes
        them on either grid).
    step_size
        µm between neighbouring pixels along x; by default the map's x step.
    detector
        dpm ``Detector`` or kikuchipy ``EBSDDetector`` whose pattern centre
        (one PC, e.g. the map's mean) the header states.

    Returns
    -------
    path

    Raises
    ------
    ValueError
        If the grid is unknown or the map's shape cannot be told.
    OutputError
        If the file cannot be written (named in the message).

    Examples
    --------
    >>> write_ang(result.xmap, "map.ang", grid="hexagonal")  # doctest: +SKIP
    """
    from orix.quaternion import Rotation

    from dpm.detector import as_detector
    from dpm.grains import check_grid, pixel_coordinates
    from dpm.io.readers import ANG_PADDING

    check_grid(grid)
    path = Path(path)
    q, number, phases, (ny, nx), step = _file_map(xmap, map_shape, step_size)
    columns = _columns(xmap, ANG_COLUMNS)
    unindexed = number == 0
    euler = Rotation(q).to_euler()
    euler[unindexed] = 4 * np.pi
    columns["CI"][unindexed] = ANG_PADDING["ci"]
    columns["fit"][unindexed] = ANG_PADDING["fit"]
    row, col = np.divmod(np.arange(ny * nx), nx)
    x, y = pixel_coordinates((ny, nx), grid, step)
    keep = np.ones(ny * nx, dtype=bool)
    if grid == "hexagonal":
        ystep = step * math.sqrt(3) / 2
        last = (row % 2 == 1) & (col == nx - 1)
        padding = unindexed & (columns["IQ"] == 0) & (columns["detector_signal"] == 0)
        if nx > 1 and ny > 1 and padding[last].all():
            keep = ~last
        grid_name, n_even = "HexGrid", nx - 1 if not keep.all() else nx
    else:
        ystep, grid_name, n_even = step, "SqrGrid", nx
    pc_tsl = [0.0, 0.0, 0.0] if detector is None else as_detector(detector).pc_in("tsl")
    header = ["# TEM_PIXperUM          1.000000",
              *(f"# {name}-star                {v:.6f}" for name, v in zip("xyz", pc_tsl)),
              "# WorkingDistance       0.000000", "#"]
    for k, phase in enumerate(phases, start=1):
        name = phase.name or f"phase{k}"
        a, b, c, alpha, beta, gamma = _lattice(phase)
        header += [f"# Phase {k}", f"# MaterialName  \t{name}", f"# Formula     \t{name}",
                   "# Info\t\t", f"# Symmetry              {TSL_SYMMETRY[_laue_name(phase)]}",
                   f"# LatticeConstants      {a:.4f} {b:.4f} {c:.4f}  {alpha:.3f}  {beta:.3f}  "
                   f"{gamma:.3f}",
                   "# NumberFamilies        0", "#"]
    header += [f"# GRID: {grid_name}", f"# XSTEP: {step:.6f}", f"# YSTEP: {ystep:.6f}",
               f"# NCOLS_ODD: {nx}", f"# NCOLS_EVEN: {n_even}", f"# NROWS: {ny}", "#",
               "# OPERATOR: \tdpm", "#", "# SAMPLEID: \t", "#", "# SCANID: \t", "#"]
    data = np.column_stack([euler, x, y, columns["IQ"], columns["CI"], number,
                            columns["detector_signal"], columns["fit"]])[keep]
    return atomic_write(path, lambda tmp: _write_text_table(
        tmp, header, data, "%9.6f %9.6f %9.6f %12.5f %12.5f %12.5f %9.5f %2d %9.5f %9.5f"))


def _write_text_table(path: Path, header: list[str], data: np.ndarray, fmt: str) -> None:
    with open(path, "w", encoding="latin-1") as f:
        f.write("\n".join(header) + "\n")
        np.savetxt(f, data, fmt=fmt)


def write_ctf(xmap: Any, path: str | Path, *, map_shape: tuple[int, int] | None = None,
              step_size: float | None = None,
              detector: Detector | EBSDDetector | None = None) -> Path:
    """Write an orientation map on a square grid as an Oxford Channel Text File (.ctf).

    Columns: ``Phase`` (1 … m, 0 unindexed), ``X Y`` (µm), ``Bands`` ←
    property ``bands`` (else 0), ``Error`` ← ``error`` (else 0; 3 where
    unindexed), ``Euler1 Euler2 Euler3`` (Bunge, degrees, orix's
    sample-to-crystal convention; 0 where unindexed), ``MAD`` ← ``MAD``
    (else 0), ``BC`` ← ``BC`` or ``band_contrast`` (0–255), ``BS`` ← ``BS``
    or 255 × ``pattern_quality`` (:data:`CTF_COLUMNS`). The header holds
    ``XCells``, ``YCells``, ``XStep``, ``YStep`` (µm) and, per phase, the
    line ``a;b;c  α;β;γ  name  Laue group  space group`` (Å, degrees,
    Channel 5's Laue group number :data:`CTF_LAUE`, space group 0 when the
    phase has none), laid out as Channel 5 and AZtec write them (``Prj``,
    ``Author``, ``JobMode Grid``, …, ``AcqE1``–``AcqE3``, the ``Euler
    angles refer to Sample Coordinate system (CS0)!`` line with ``Mag``,
    ``Coverage``, ``Device``, ``KV``, ``TiltAngle``, ``TiltAxis``). The
    format has no field for a pattern centre; ``TiltAngle`` is the
    ``detector``'s sample tilt (degrees; 0 without a detector). The .ctf
    format has no hexagonal grid; write hexagonal maps with
    :func:`write_ang`. Properties with several values per pixel give a
    column their first value; the others are not written. The file is
    written whole or not at all (:func:`atomic_write`).

    Parameters
    ----------
    xmap
        orix ``CrystalMap`` in dpm's layout (module docstring).
    path
        File to write (overwritten).
    map_shape
        ``(ny, nx)``; by default from the map's coordinates.
    step_size
        µm; by default the map's x step.
    detector
        dpm ``Detector`` or kikuchipy ``EBSDDetector`` whose sample tilt the
        header states.

    Returns
    -------
    path

    Raises
    ------
    ValueError
        If the map's shape cannot be told.
    OutputError
        If the file cannot be written (named in the message).

    Examples
    --------
    >>> write_ctf(result.xmap, "map.ctf")  # doctest: +SKIP
    """
    from orix.quaternion import Rotation

    from dpm.detector import as_detector

    path = Path(path)
    q, number, phases, (ny, nx), step = _file_map(xmap, map_shape, step_size)
    columns = _columns(xmap, CTF_COLUMNS)
    unindexed = number == 0
    euler = np.degrees(Rotation(q).to_euler())
    euler[unindexed] = 0.0
    error = columns["Error"]
    error[unindexed & (error == 0)] = CTF_NO_SOLUTION
    for name in ("BC", "BS"):
        columns[name] = np.clip(np.rint(columns[name]), 0, 255)
    tilt = 0.0 if detector is None else as_detector(detector).sample_tilt
    header = ["Channel Text File", f"Prj\t{path.stem}", "Author\tdpm", "JobMode\tGrid",
              f"XCells\t{nx}", f"YCells\t{ny}", f"XStep\t{step:.6f}", f"YStep\t{step:.6f}",
              "AcqE1\t0.0000", "AcqE2\t0.0000", "AcqE3\t0.0000",
              "Euler angles refer to Sample Coordinate system (CS0)!\tMag\t0\tCoverage\t0\t"
              f"Device\t0\tKV\t0\tTiltAngle\t{tilt:.4f}\tTiltAxis\t0",
              f"Phases\t{len(phases)}"]
    for phase in phases:
        a, b, c, alpha, beta, gamma = _lattice(phase)
        space_group = phase.space_group.number if phase.space_group is not None else 0
        header.append(f"{a:.4f};{b:.4f};{c:.4f}\t{alpha:.3f};{beta:.3f};{gamma:.3f}\t"
                      f"{phase.name or 'phase'}\t{CTF_LAUE[_laue_name(phase)]}\t{space_group}\t\t\t"
                      "Created by dpm")
    header.append("Phase\tX\tY\tBands\tError\tEuler1\tEuler2\tEuler3\tMAD\tBC\tBS")
    row, col = np.divmod(np.arange(ny * nx), nx)
    data = np.column_stack([number, col * step, row * step, columns["Bands"], error, euler,
                            columns["MAD"], columns["BC"], columns["BS"]])
    return atomic_write(path, lambda tmp: _write_text_table(
        tmp, header, data, "%d\t%.4f\t%.4f\t%d\t%d\t%.4f\t%.4f\t%.4f\t%.4f\t%d\t%d"))


def _index_detector(details: dict[str, Any]) -> Detector | None:
    """The detector an indexing run's ``details`` describe, for the map files' headers.

    Parameters
    ----------
    details
        :attr:`dpm.pipeline.IndexResult.details`: ``"detector_shape"``
        (``(rows, columns)`` of the patterns, pixels), the map's pattern
        centre ``"pattern_centre"`` (Bruker convention, fractions; the mean
        refined PC), else the run's ``details["run"]["pc"]`` (with
        ``"pc_convention": "bruker"``), and the sample tilt
        ``details["run"]["sample_tilt"]`` (degrees, default 70°).

    Returns
    -------
    detector
        None if ``details`` lacks a Bruker pattern centre or the detector
        shape (the converted PC depends on the pattern's aspect ratio).
    """
    from dpm.detector import Detector

    run = details.get("run") or {}
    pc = details.get("pattern_centre")
    if pc is None and run.get("pc_convention", "bruker") == "bruker":
        pc = run.get("pc")
    if pc is None or details.get("detector_shape") is None:
        return None
    return Detector(tuple(details["detector_shape"]), tuple(pc),
                    sample_tilt=float(run.get("sample_tilt", 70.0)))


def write_index_outputs(result, out: str | Path, extra_summary: dict[str, Any] | None = None) -> list[Path]:
    """Write the files of an indexing run into ``out``.

    ``map.h5`` (orix's CrystalMap HDF5 with every property of ``result.xmap``
    as orix stores it, 2-D ``(n, k)`` and boolean ones included, which
    ``orix.io.load`` and :func:`dpm.io.readers.read_map` give back with their
    values and dtypes), ``map.ang`` (:func:`write_ang`, on the run's grid
    ``result.config.grid``), on square grids ``map.ctf`` (:func:`write_ctf`),
    then the PNG maps (with ``pc_field.png``, :func:`dpm.maps.save_pc_field`,
    when the run has a PC field), ``summary.json`` and ``config.toml``. The .ang and
    .ctf headers take the pattern centre, detector shape and sample tilt
    from ``result.details`` (:func:`_index_detector`). Every file but the
    PNG maps (written by :mod:`dpm.maps`) is written whole or not at all
    (:func:`atomic_write`).

    Parameters
    ----------
    result
        :class:`dpm.pipeline.IndexResult`.
    out
        Output folder (created if missing).
    extra_summary
        Additional entries for ``summary.json`` (e.g. accuracy against a known truth).

    Returns
    -------
    paths
        The files written.

    Raises
    ------
    OutputError
        If the folder or a file cannot be written (named in the message).
    """
    from orix.io.plugins import orix_hdf5

    from dpm.maps import (pattern_centres, save_pc_field, save_scalar, write_ipf_maps,
                          write_property_maps)

    out = prepare_output_dir(out)
    xmap = result.xmap
    grid = result.config.grid
    shape = result.scores.shape
    detector = _index_detector(result.details)
    paths = [out / "map.h5", out / "map.ang", out / "summary.json", out / "config.toml"]
    atomic_write_hdf5(paths[0], lambda buffer: orix_hdf5.file_writer(buffer, xmap))
    write_ang(xmap, paths[1], grid=grid, map_shape=shape, detector=detector)
    if grid == "square":
        paths.append(write_ctf(xmap, out / "map.ctf", map_shape=shape, detector=detector))
    else:
        log.info("no map.ctf: the .ctf format has no hexagonal grid (map.ang has it)")
    paths += write_ipf_maps(xmap, out) + write_property_maps(xmap, out, shape)
    record = result.details.get("pc_field")
    pcs = pattern_centres(xmap)
    if record is not None and pcs is not None:
        paths.append(out / "pc_field.png")
        save_pc_field(paths[-1], pcs.reshape(*shape, 3),
                      calibration=np.asarray(record.get("calibration_pixels", []), dtype=int),
                      inliers=record.get("inliers"))
    if "pattern_quality" in xmap.prop:
        paths.append(out / "pattern_quality.png")
        save_scalar(paths[-1], np.asarray(xmap.prop["pattern_quality"]).reshape(shape),
                    cmap="gray", vmin=0.0)
    summary = result.summary() | (extra_summary or {})
    atomic_write(paths[2], lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    atomic_write(paths[3], lambda tmp: tmp.write_text(to_toml(result.run_config())))
    return paths
