"""Small pattern files in each vendor's own layout, for tests.

Each ``write_*`` function writes ``patterns`` (a ``(ny, nx, sy, sx)`` array
in row-major map order) and the metadata it is given in the layout the
vendor's software writes, as kikuchipy's readers
(``kikuchipy/io/plugins/*/_api.py``) and its test-file scripts
(``kikuchipy/data/**/create_dummy_*.py``) document it. Values are written
in the file's own conventions (PC, units, angles); the test compares what
dpm reads against what it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _scalar(group: Any, name: str, value: Any, dtype: Any = None) -> None:
    """A one-element dataset (how h5ebsd writers store header values)."""
    if isinstance(value, str):
        group.create_dataset(name, data=np.array([value.encode()]))
    else:
        group.create_dataset(name, data=np.array([value], dtype=dtype))


def _flat(patterns: np.ndarray) -> np.ndarray:
    ny, nx, sy, sx = patterns.shape
    return patterns.reshape(ny * nx, sy, sx)


def write_h5oina(path: Path, patterns: np.ndarray, *, pc: Any = (0.5, 0.4, 0.6),
                 unprocessed: np.ndarray | None = None, static_background: np.ndarray | None = None,
                 step: float = 0.5, sample_tilt: float = 70.0, detector_tilt: float = 0.0,
                 camera_mode: str | None = "4x4 (311x256 px)", band_contrast: Any = None,
                 mad: Any = None, phases: tuple[str, ...] = (), version: str = "6.0") -> None:
    """An Oxford Instruments H5OINA file (oinanoanalysis/h5oina H5OINAFile.md).

    Parameters
    ----------
    patterns
        Written as ``1/EBSD/Data/Processed Patterns``.
    pc
        Oxford convention ``(PCx, PCy, DD)``, fractions of the pattern width
        from the bottom left; ``(3,)`` for every pattern, or ``(n, 3)``.
    unprocessed
        Written as ``Unprocessed Patterns`` when given.
    static_background
        Written as ``Header/Processed Static Background``.
    sample_tilt, detector_tilt
        Degrees; stored in radians, the detector tilt as the second Euler
        angle of ``Detector Orientation Euler`` minus 90°.
    camera_mode
        AZtec's camera mode text, stored as ``Camera Binning Mode``
        (version < 7) or ``Camera Mode``.
    band_contrast, mad
        Per-pattern ``Band Contrast`` (uint8) and ``Mean Angular Deviation``.
    phases
        Phase names, as ``Header/Phases/<k>/Phase Name``.
    """
    import h5py

    ny, nx, sy, sx = patterns.shape
    n = ny * nx
    pcs = np.broadcast_to(np.asarray(pc, dtype=np.float32), (n, 3))
    with h5py.File(path, "w") as f:
        f.create_dataset("Format Version", data=version.encode())
        f.create_dataset("Manufacturer", data=b"Oxford Instruments")
        f.create_dataset("Software Version", data=b"6.0.8014.1")
        header = f.create_group("1/EBSD/Header")
        for key, value, dtype in (("X Cells", nx, "int32"), ("Y Cells", ny, "int32"),
                                  ("Pattern Width", sx, "int32"), ("Pattern Height", sy, "int32"),
                                  ("X Step", step, "float32"), ("Y Step", step, "float32"),
                                  ("Beam Voltage", 20.0, "float32"),
                                  ("Working Distance", 15.0, "float32"),
                                  ("Magnification", 500.0, "float32"),
                                  ("Tilt Angle", np.deg2rad(sample_tilt), "float32")):
            header.create_dataset(key, data=np.asarray(value, dtype=dtype))
        header.create_dataset("Detector Orientation Euler", dtype="float32",
                              data=np.deg2rad([0.0, 90.0 + detector_tilt, 0.0]))
        if camera_mode is not None:
            name = "Camera Mode" if float(version) >= 7 else "Camera Binning Mode"
            header.create_dataset(name, data=camera_mode.encode())
        if static_background is not None:
            header.create_dataset("Processed Static Background", data=static_background)
        for k, phase in enumerate(phases, start=1):
            header.create_dataset(f"Phases/{k}/Phase Name", data=phase.encode())
        data = f.create_group("1/EBSD/Data")
        data.create_dataset("Processed Patterns", data=_flat(patterns))
        if unprocessed is not None:
            data.create_dataset("Unprocessed Patterns", data=_flat(unprocessed))
        for k, key in enumerate(("Pattern Center X", "Pattern Center Y", "Detector Distance")):
            data.create_dataset(key, data=pcs[:, k].copy())
        if band_contrast is not None:
            data.create_dataset("Band Contrast", data=np.asarray(band_contrast, dtype=np.uint8))
        if mad is not None:
            data.create_dataset("Mean Angular Deviation", data=np.asarray(mad, dtype=np.float32))


def write_bruker_h5ebsd(path: Path, patterns: np.ndarray, *, pc: Any = (0.5, 0.3, 0.6),
                        step: float = 1.5, sample_tilt: float = 70.0, camera_tilt: float = 0.0,
                        detector_height_um: float | None = None,
                        static_background: np.ndarray | None = None,
                        radon_quality: Any = None, mad: Any = None, phases: tuple[str, ...] = (),
                        roi_origin: tuple[int, int] | None = None,
                        file_order: np.ndarray | None = None) -> None:
    """A Bruker Nano (Esprit) h5ebsd file (kikuchipy's ``create_dummy_bruker_h5ebsd_file``).

    Parameters
    ----------
    pc
        Bruker convention ``(PCX, PCY, DD)``, per pattern ``(n, 3)`` or one ``(3,)``.
    sample_tilt, camera_tilt
        Degrees, as ``Header/SampleTilt`` and ``Header/CameraTilt``.
    detector_height_um
        ``DetectorFullHeightMicrons`` (with ``UnClippedPatternHeight`` = sy):
        the pixel size is their ratio.
    radon_quality, mad
        Per-pattern ``RadonQuality`` and ``MAD``, in map order.
    phases
        Phase names, as ``Header/Phases/<k>/Name``.
    roi_origin
        ``(row, column)`` of the map's top left pixel in the SEM image:
        writes a region of interest (``EBSD/SEM/IY``, ``IX``) instead of
        ``NROWS``/``NCOLS``.
    file_order
        With a region of interest, the map pixel of each stored pattern
        (a permutation of ``range(n)``; default map order).
    """
    import h5py

    ny, nx, sy, sx = patterns.shape
    n = ny * nx
    order = np.arange(n) if file_order is None else np.asarray(file_order)
    pcs = np.broadcast_to(np.asarray(pc, dtype=np.float32), (n, 3))[order]
    with h5py.File(path, "w") as f:
        _scalar(f, "Manufacturer", "Bruker Nano")
        _scalar(f, "Version", "Esprit 2.X")
        scan = f.create_group("Scan 0")
        data = scan.create_group("EBSD/Data")
        data.create_dataset("RawPatterns", data=_flat(patterns)[order])
        for k, key in enumerate(("PCX", "PCY", "DD")):
            data.create_dataset(key, data=pcs[:, k].copy())
        for key, values in (("RadonQuality", radon_quality), ("MAD", mad)):
            if values is not None:
                data.create_dataset(key, data=np.asarray(values, np.float32).ravel()[order])
        data.create_dataset("Phase", data=np.ones(n, dtype=np.int32))
        header = scan.create_group("EBSD/Header")
        header.create_dataset("Grid Type", data=np.array([b"isometric"], dtype="|S9"))
        for key, value, dtype in (("PatternHeight", sy, np.int32), ("PatternWidth", sx, np.int32),
                                  ("XSTEP", step, float), ("YSTEP", step, float),
                                  ("SampleTilt", sample_tilt, float),
                                  ("CameraTilt", camera_tilt, float), ("KV", 20.0, float),
                                  ("WD", 16.0, float), ("Magnification", 300.0, float),
                                  ("NPoints", n, np.int32)):
            header.create_dataset(key, data=np.asarray(value, dtype=dtype))
        if detector_height_um is not None:
            header.create_dataset("DetectorFullHeightMicrons", data=np.float64(detector_height_um))
            header.create_dataset("UnClippedPatternHeight", data=np.int32(sy))
        if static_background is not None:
            header.create_dataset("StaticBackground", data=static_background)
        for k, phase in enumerate(phases, start=1):
            header.create_dataset(f"Phases/{k}/Name", data=np.array([phase.encode()]))
        if roi_origin is None:
            header.create_dataset("NROWS", data=np.int32(ny))
            header.create_dataset("NCOLS", data=np.int32(nx))
        else:
            row, col = np.divmod(order, nx)
            sem = scan.create_group("EBSD/SEM")
            sem.create_dataset("IY", data=(row + roi_origin[0]).astype(np.int32))
            sem.create_dataset("IX", data=(col + roi_origin[1]).astype(np.int32))


def hex_rows(ny: int, nx: int) -> np.ndarray:
    """(ny, nx) bool: the pixels a TSL HexGrid file stores (odd rows one short, at their end)."""
    stored = np.ones((ny, nx), dtype=bool)
    stored[1::2, -1] = False
    return stored


def write_edax_h5ebsd(path: Path, patterns: np.ndarray, *, pc: Any = (0.5, 0.6, 0.7),
                      grid: str = "SqrGrid", step: float = 1.0, sample_tilt: float = 70.0,
                      elevation: float = 0.0, azimuthal: float = 0.0, iq: Any = None,
                      ci: Any = None, phases: tuple[str, ...] = ()) -> None:
    """An EDAX TSL (OIM Analysis) h5ebsd file (kikuchipy's ``data/edax_h5ebsd/patterns.h5``).

    Parameters
    ----------
    patterns
        The ``(ny, nx, sy, sx)`` map; on a ``"HexGrid"`` only the pixels of
        :func:`hex_rows` are written (row by row, odd rows ``nx − 1`` long).
    pc
        EDAX/TSL ``(x*, y*, z*)``, as ``Header/Pattern Center Calibration``.
    iq, ci
        Per-pattern ``IQ`` and ``CI`` as ``(ny, nx)`` maps (the stored pixels
        are written).
    phases
        Material names, as ``Header/Phase/<k>/MaterialName``.
    """
    import h5py

    ny, nx, sy, sx = patterns.shape
    stored = hex_rows(ny, nx) if grid == "HexGrid" else np.ones((ny, nx), dtype=bool)
    with h5py.File(path, "w") as f:
        _scalar(f, " Manufacturer", "EDAX")  # OIM writes some keys with a leading space
        _scalar(f, " Version", "OIM Analysis 8.6.0101 x64 [09-01-2020]")
        header = f.create_group("Scan 1/EBSD/Header")
        _scalar(header, "Grid Type", grid)
        for key, value, dtype in (("nColumns", nx, np.int32), ("nRows", ny, np.int32),
                                  ("Pattern Width", sx, np.int32), ("Pattern Height", sy, np.int32),
                                  ("Step X", step, np.float32),
                                  ("Step Y", step * (np.sqrt(3) / 2 if grid == "HexGrid" else 1),
                                   np.float32),
                                  ("Sample Tilt", sample_tilt, np.float32),
                                  ("Camera Elevation Angle", elevation, np.float32),
                                  ("Camera Azimuthal Angle", azimuthal, np.float32),
                                  ("Working Distance", 14.0, np.float32)):
            _scalar(header, key, value, dtype)
        for key, value in zip(("x-star", "y-star", "z-star"), pc):
            _scalar(header, f"Pattern Center Calibration/{key}", value, np.float32)
        for k, phase in enumerate(phases, start=1):
            _scalar(header, f"Phase/{k}/MaterialName", phase)
            _scalar(header, f"Phase/{k}/Formula", phase[:2])
        data = f.create_group("Scan 1/EBSD/Data")
        data.create_dataset("Pattern", data=patterns[stored])
        for key, values in (("IQ", iq), ("CI", ci)):
            if values is not None:
                data.create_dataset(key, data=np.asarray(values, np.float32)[stored])
        data.create_dataset("Phase", data=np.zeros(int(stored.sum()), dtype=np.int8))


def write_up(path: Path, patterns: np.ndarray, *, version: int = 3, step: tuple[float, float] = (1.0, 1.0),
             hexagonal: bool = False, short_rows: bool = False, extra: int = 0) -> None:
    """An EDAX .up1 (uint8) or .up2 (uint16) file, by ``path``'s suffix (PyEBSDIndex's UPFile).

    Version 1: a 16-byte header (version, width, height, data offset);
    version 3: 42 bytes, adding an "extra patterns" byte, the map width and
    height, a hexagonal-grid flag and the x and y steps (float64, µm).

    Parameters
    ----------
    step
        ``(dx, dy)`` in µm.
    hexagonal
        Set the hexagonal-grid flag.
    short_rows
        Write only the pixels of :func:`hex_rows` (a TSL HexGrid map).
    extra
        The "extra patterns" byte; that many blank patterns are appended.
    """
    ny, nx, sy, sx = patterns.shape
    dtype = np.uint8 if Path(path).suffix.lower() == ".up1" else np.uint16
    stored = hex_rows(ny, nx) if short_rows else np.ones((ny, nx), dtype=bool)
    with open(path, "wb") as fh:
        if version == 1:
            np.array([1, sx, sy, 16], dtype="<u4").tofile(fh)
        else:
            np.array([version, sx, sy, 42], dtype="<u4").tofile(fh)
            np.array([extra], dtype="u1").tofile(fh)
            np.array([nx, ny], dtype="<u4").tofile(fh)
            np.array([int(hexagonal)], dtype="u1").tofile(fh)
            np.array(step, dtype="<f8").tofile(fh)
        patterns[stored].astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tofile(fh)
        np.zeros((extra, sy, sx), dtype=dtype).tofile(fh)


def write_ebsp(path: Path, patterns: np.ndarray, *, step: float = 1.5, version: int = 2,
               file_order: np.ndarray | None = None, missing: tuple[int, ...] = (),
               positions: bool = True, compressed: bool = False) -> None:
    """An Oxford Instruments .ebsp file (kikuchipy's ``create_dummy_oxford_binary_file``).

    Layout: the version as a negative int64 (absent in version 0; one more
    byte follows it in versions > 3), a table of int64 byte positions, one
    per map pixel in row-major order (0: pattern not stored), then each
    stored pattern: a header of int32 (``map_x, map_y`` from version 5, then
    ``is_compressed, nrows, ncols, n_bytes``), the pixels (uint8 or uint16),
    and a footer with the beam position (µm): two float64 in version 1,
    ``bool, float64`` for x and for y from version 2.

    Parameters
    ----------
    file_order
        Map pixel of each stored pattern, in file order (default map order).
    missing
        Map pixels whose patterns are not stored (table entry 0).
    positions
        Write the beam positions (version ≥ 2: else both footer flags are
        false and the footer is two bytes).
    compressed
        The header's ``is_compressed`` flag (the pixels are written raw).
    """
    ny, nx, sy, sx = patterns.shape
    n = ny * nx
    order = [i for i in (np.arange(n) if file_order is None else file_order) if i not in missing]
    itemsize = patterns.dtype.itemsize
    header_size = 24 if version >= 5 else 16
    footer_size = {0: 0, 1: 16}.get(version, 18 if positions else 2)
    head = 0 if version == 0 else (9 if version > 3 else 8)
    record = header_size + sy * sx * itemsize + footer_size
    table = np.zeros(n, dtype="<i8")
    for slot, pixel in enumerate(order):
        table[pixel] = head + 8 * n + slot * record
    with open(path, "wb") as fh:
        if version > 0:
            np.array([-version], dtype="<i8").tofile(fh)
        if version > 3:
            np.array([0], dtype="u1").tofile(fh)
        table.tofile(fh)
        for pixel in order:
            r, c = divmod(int(pixel), nx)
            fields = ([c, r] if version >= 5 else []) + [int(compressed), sy, sx, sy * sx * itemsize]
            np.array(fields, dtype="<i4").tofile(fh)
            patterns[r, c].astype(patterns.dtype.newbyteorder("<")).tofile(fh)
            if version == 1:
                np.array([c * step, r * step], dtype="<f8").tofile(fh)
            elif version > 1 and not positions:
                np.zeros(2, dtype="u1").tofile(fh)
            elif version > 1:
                for value in (c * step, r * step):
                    np.array([1], dtype="u1").tofile(fh)
                    np.array([value], dtype="<f8").tofile(fh)


_NORDIF_SETTING = """[NORDIF]\t\t
Software version\t3.1.2\t
\t\t
[Microscope]\t\t
Manufacturer\tHitachi\t
Model\tSU-6600\t
Magnification\t{magnification}\t#
Scan direction\tDirect\t
Accelerating voltage\t{beam_energy}\tkV
Working distance\t{working_distance}\tmm
Tilt angle\t{sample_tilt}\t\xb0
\t\t
[Electron image]\t\t
Frame rate\t0.25\tfps
Resolution\t1000x1000\tpx
\t\t
[EBSD detector]\t\t
Model\tUF1100\t
\t\t
[Detector angles]\t\t
Euler 1\t0\t\xb0
Euler 2\t0\t\xb0
Euler 3\t0\t\xb0
Azimuthal\t{azimuthal}\t\xb0
Elevation\t{elevation}\t\xb0
\t\t
[Acquisition settings]\t\t
Frame rate\t202\tfps
Resolution\t{sx}x{sy}\tpx
Exposure time\t3500\t\xb5s
Gain\t0\t
\t\t
[Calibration settings]\t\t
Frame rate\t10\tfps
Resolution\t{sx}x{sy}\tpx
Exposure time\t99950\t\xb5s
Gain\t8\t
\t\t
{phases}[Region of interest]\t\t
\t\t
[Area]\t\t
Top\t89.200 (223)\t\xb5m (px)
Left\t60.384 (152)\t\xb5m (px)
Width\t4.500 (11)\t\xb5m (px)
Height\t4.500 (11)\t\xb5m (px)
Step size\t{step}\t\xb5m
Number of samples\t{ny}x{nx}\t#
"""


def write_nordif(folder: Path, patterns: np.ndarray, *, step: float = 1.5,
                 sample_tilt: float = 70.0, elevation: float = 0.0, azimuthal: float = 0.0,
                 background: np.ndarray | None = None, phases: tuple[str, ...] = (),
                 beam_energy: float = 20.0, working_distance: float = 24.7,
                 magnification: int = 200) -> Path:
    """A NORDIF acquisition: ``Pattern.dat``, ``Setting.txt`` and the background image.

    ``Pattern.dat`` holds the uint8 patterns one after the other in map
    order; ``Setting.txt`` is NORDIF's tab-separated, latin-1 settings file
    (kikuchipy's ``data/nordif/Setting.txt``, read by line position within
    its ``[Microscope]``, ``[Detector angles]``, ``[Acquisition settings]``
    and ``[Area]`` blocks; the pattern resolution as ``sx x sy``, the number
    of samples as ``ny x nx``); ``background`` goes to ``Background
    acquisition pattern.bmp``. Returns the path of ``Pattern.dat``.

    Parameters
    ----------
    sample_tilt, elevation, azimuthal
        Degrees (the detector tilt is minus the elevation).
    """
    from PIL import Image

    ny, nx, sy, sx = patterns.shape
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = "".join(f"[Phase {k}]\t\t\nName\t{name}\t\nPearson S.T.\t\t\nIT\t\t\n\t\t\n"
                     for k, name in enumerate(phases, start=1))
    text = _NORDIF_SETTING.format(
        magnification=magnification, beam_energy=beam_energy, working_distance=working_distance,
        sample_tilt=sample_tilt, azimuthal=azimuthal, elevation=elevation, sx=sx, sy=sy,
        phases=blocks, step=f"{step:.3f}", ny=ny, nx=nx)
    (folder / "Setting.txt").write_bytes(text.replace("\n", "\r\n").encode("latin-1"))
    patterns.astype(np.uint8).tofile(folder / "Pattern.dat")
    if background is not None:
        Image.fromarray(background.astype(np.uint8)).save(folder / "Background acquisition pattern.bmp")
    return folder / "Pattern.dat"


def write_emsoft_ebsd(path: Path, patterns: np.ndarray, *, xpc: float = 1.5, ypc: float = -10.0,
                      L: float = 15000.0, delta: float = 50.0, binning: int = 1,
                      thetac: float = 10.0, xtal: str = "Ni/ni.xtal", energymax: float = 20.0) -> None:
    """An EMsoft EMEBSD.f90 output file (kikuchipy's ``create_dummy_emsoft_ebsd_file``).

    Parameters
    ----------
    patterns
        ``(n, sy, sx)``, as ``EMData/EBSD/EBSDPatterns``.
    xpc, ypc, L
        EMsoft 5 PC: ``(xpc, ypc)`` in unbinned pixels from the detector
        centre, ``L`` in µm.
    delta
        Unbinned detector pixel size in µm.
    thetac
        Detector tilt in degrees.
    xtal
        Crystal file name; its stem is the phase name.
    """
    import h5py

    n, sy, sx = patterns.shape
    with h5py.File(path, "w") as f:
        _scalar(f, "Manufacturer", "EMsoft")
        f.create_dataset("EMheader/EBSD/ProgramName", data=np.array([b"EMEBSD.f90"], dtype="S10"))
        f.create_dataset("EMheader/EBSD/Version", data=np.array([b"5_0_20200217_0"], dtype="S14"))
        crystal = f.create_group("CrystalData")
        crystal.create_dataset("AtomData", data=np.array([[0.0], [0.0], [0.0], [1.0], [0.0035]],
                                                          dtype=np.float32))
        _scalar(crystal, "Atomtypes", 28, np.int32)
        crystal.create_dataset("LatticeParameters", data=np.array([0.3524, 0.3524, 0.3524, 90, 90, 90.0]))
        for key, value in (("CrystalSystem", 1), ("Natomtypes", 1), ("SpaceGroupNumber", 225),
                           ("SpaceGroupSetting", 1)):
            _scalar(crystal, key, value, np.int32)
        ebsd = f.create_group("EMData/EBSD")
        ebsd.create_dataset("EBSDPatterns", data=patterns)
        ebsd.create_dataset("EulerAngles", data=np.zeros((n, 3), dtype=np.float32))
        _scalar(ebsd, "numangles", n, np.int32)
        ebsd.create_dataset("xtalname", data=np.array([xtal.encode()]))
        nml = f.create_group("NMLparameters/EBSDNameList")
        for key, value, dtype in (("numsx", sx, np.int32), ("numsy", sy, np.int32),
                                  ("binning", binning, np.int32), ("delta", delta, float),
                                  ("thetac", thetac, float), ("xpc", xpc, float),
                                  ("ypc", ypc, float), ("L", L, float),
                                  ("energymax", energymax, float), ("energymin", 10.0, float)):
            _scalar(nml, key, value, dtype)


def write_image_series(folder: Path, patterns: np.ndarray, *, suffix: str = ".png") -> None:
    """One image per pattern, named ``pattern_x{col}y{row}{suffix}`` (kikuchipy's naming)."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ny, nx = patterns.shape[:2]
    for r in range(ny):
        for c in range(nx):
            iio.imwrite(folder / f"pattern_x{c}y{r}{suffix}", patterns[r, c])
