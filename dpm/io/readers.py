"""Readers: pattern stacks (NumPy, HDF5 and every format kikuchipy reads) and orientation maps.

:func:`read_patterns` never loads a whole stack: every reader returns an
array-like that reads the map block a stage asks for and nothing else.

- HDF5 vendor files (Oxford h5oina, Bruker h5ebsd, kikuchipy h5ebsd, EMsoft
  EBSD simulations) come back as kikuchipy's lazy dask arrays, image series
  too; EDAX h5ebsd files (square and hexagonal grids) and plain HDF5
  datasets as :class:`HDF5Patterns`, which reads its block with one h5py
  read per map row.
- Raw binary files (``.npy``, NORDIF ``.dat``, EDAX ``.up1``/``.up2``,
  Oxford ``.ebsp``) come back as :class:`PatternFile`, which reads the
  patterns of a block with explicit file reads. A memory map would do the
  same job, but every page a run touches stays in the process's resident
  set for as long as the map lives, so a 100 000-pattern run would report
  the whole file in its peak memory.

What the file says about the detector (PC, tilts, binning, pixel size), the
static background, the step size and grid, the per-pattern values the
acquisition software stored (band contrast, image quality, …) and the
phases it lists come back beside the data (:class:`PatternStack`);
:func:`describe` turns that into the text ``dpm info`` prints.

:func:`read_map` reads an orientation map (.ang on a square or hexagonal grid,
.ctf, orix/dpm .h5) into dpm's layout: one rotation per pixel, row-major map
order ``i = row · nx + col``, every row ``nx`` pixels long, and the grid, map
shape and step beside it. Map coordinates and the hexagonal layout are those of
:mod:`dpm.grains`.
"""

from __future__ import annotations

import abc
import glob
import logging
import math
import operator
import re
import warnings
from dataclasses import dataclass, field
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
        NumPy or dask array, or a lazy :class:`PatternFile` /
        :class:`HDF5Patterns` (index with ``data[r0:r1, c0:c1]``, or
        ``np.asarray(data)`` for everything); a plain stack of ``n``
        patterns is a map of shape ``(1, n)``. Pixels the file holds no
        pattern for (the short rows of a hexagonal grid, patterns an .ebsp
        file left out, the missing end of a truncated NORDIF file) hold
        zeros, a constant pattern that the stages treat as unreadable.
    source
        Where the patterns came from (file path, ``FILE:/dataset`` for a
        named HDF5 dataset, or ``"array"``).
    detector
        Detector geometry stored in the file (PC in Bruker's convention), or
        None when the file stores no calibrated PC (then ``metadata`` still
        holds the tilts it stores).
    static_background : (sy, sx) array or None
        Static background stored in the file, for the patterns in ``data``.
    step_size
        Map step along x in µm, or None when the file does not say.
    band_contrast : (ny, nx) float32 array or None
        Band contrast (0–255) the acquisition software stored per pattern
        (Oxford h5oina: ``EBSD/Data/Band Contrast`` of the scan read), or
        None. Other vendors' quality values (EDAX IQ, Bruker RadonQuality)
        have other scales and are in ``properties``.
    grid
        ``"square"`` or ``"hexagonal"`` (TSL HexGrid: rows √3/2 steps apart,
        odd rows shifted by half a step towards +x, short rows padded at
        their end as in :func:`read_map`).
    phases
        Names of the phases the file lists, in the file's order.
    properties
        Per-pattern values the file stores, by the file's dataset name
        (e.g. ``"Band Contrast"``, ``"MAD"``, ``"IQ"``, ``"CI"``,
        ``"RadonQuality"``), each a ``(ny, nx)`` float32 array in map order,
        NaN where the file holds no pattern.
    in_file : (ny, nx) bool array or None
        True where the file holds a pattern; None when it holds all.
    metadata
        What was read, with these keys where the format has them:
        ``format`` (a key of :data:`FORMATS`), ``vendor``, ``version``,
        ``scan`` (HDF5 group), ``dataset``, ``pc_file`` (mean PC in the
        file's convention), ``pc_convention`` (kikuchipy's name),
        ``pc_spread`` (largest range of a PC coordinate over the patterns),
        ``sample_tilt``, ``detector_tilt``, ``azimuthal`` (degrees),
        ``binning``, ``px_size`` (µm), ``step_x``, ``step_y`` (µm),
        ``beam_energy`` (kV), ``working_distance`` (mm), ``magnification``
        and ``size_bytes`` (on disk). A geometry key holds None when the
        file does not store that value (the detector then has dpm's default).
    """

    data: Any
    source: str = "array"
    detector: Detector | None = None
    static_background: np.ndarray | None = None
    step_size: float | None = None
    band_contrast: np.ndarray | None = None
    grid: str = "square"
    phases: tuple[str, ...] = ()
    properties: dict[str, np.ndarray] = field(default_factory=dict)
    in_file: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def map_shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return tuple(self.data.shape[:2])

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """``(sy, sx)``."""
        return tuple(self.data.shape[2:])


#: Pattern-file formats :func:`read_patterns` recognises, and their names.
FORMATS: dict[str, str] = {
    "npy": "NumPy .npy array",
    "hdf5": "HDF5 dataset",
    "oxford_h5ebsd": "Oxford Instruments h5oina",
    "oxford_binary": "Oxford Instruments .ebsp",
    "bruker_h5ebsd": "Bruker Nano h5ebsd",
    "edax_h5ebsd": "EDAX TSL h5ebsd",
    "edax_binary": "EDAX TSL .up1/.up2",
    "nordif": "NORDIF .dat",
    "emsoft_ebsd": "EMsoft EBSD simulation (EMEBSD.f90)",
    "kikuchipy_h5ebsd": "kikuchipy h5ebsd",
    "image_series": "image files",
}

#: Image suffixes kikuchipy reads as one pattern per file.
_IMAGE_SUFFIXES = (".tif", ".tiff", ".bmp", ".png")

#: Per-pattern datasets of a vendor's ``EBSD/Data`` group kept in ``properties``.
_PROPERTIES = {
    "oxford_h5ebsd": ("Band Contrast", "Band Slope", "Bands", "Error",
                      "Mean Angular Deviation", "Pattern Quality", "Phase"),
    "bruker_h5ebsd": ("RadonQuality", "RadonBandCount", "MAD", "NIndexedBands", "Phase"),
    "edax_h5ebsd": ("IQ", "CI", "Fit", "Phase", "SEM Signal"),
}


def _check_shape(shape: tuple[int, ...], dtype: Any, where: str) -> None:
    """PatternFileError unless ``shape``/``dtype`` is a non-empty numeric 3-D or 4-D stack."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise PatternFileError(
            f"{where}: patterns must have shape (n, sy, sx) or (ny, nx, sy, sx), got shape {shape}")
    if min(shape) < 1:
        raise PatternFileError(f"{where}: pattern stack is empty, shape {shape}")
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise PatternFileError(f"{where}: patterns must be integer or float, got dtype {dtype}")


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
    _check_shape(data.shape, data.dtype, source)
    if data.ndim == 3:
        data = data.reshape(1, *data.shape)
    return PatternStack(data=data, source=source)


def read_patterns(path: str | Path) -> PatternStack:
    """Open a pattern file lazily.

    Parameters
    ----------
    path
        - ``.npy``: an array of shape ``(n, sy, sx)`` or ``(ny, nx, sy, sx)``
          in C order;
        - HDF5 vendor files, recognised by their ``Manufacturer`` dataset:
          Oxford h5oina, Bruker h5ebsd, EDAX h5ebsd (square or hexagonal
          grid), kikuchipy h5ebsd; EMsoft EBSD simulations (EMEBSD.f90),
          recognised by ``EMData/EBSD/EBSDPatterns``. The first scan group
          of a file with several is read; of an h5oina file the unprocessed
          patterns where it holds them (with the static background AZtec
          removed from them), else the processed ones (without it);
        - any other HDF5 file: its one 3-D or 4-D numeric dataset, or the one
          named as ``FILE:/group/dataset``;
        - Oxford ``.ebsp`` (uncompressed), EDAX ``.up1``/``.up2``, NORDIF
          ``.dat`` with its ``Setting.txt`` (and ``Background acquisition
          pattern.bmp``) beside it;
        - a folder of images (.tif, .tiff, .bmp, .png; one suffix) or a glob
          pattern such as ``"scan/*.png"``: one pattern per image, placed on
          the map by names like ``_x5y10.tif`` or ``-5-10.bmp``
          (kikuchipy's rule), else one row in name order.

    Returns
    -------
    PatternStack
        The data read block by block, and what the file says about it.

    Raises
    ------
    PatternFileError
        A ``ValueError`` naming the file (and dataset, shape or value): the
        file is missing, of an unknown format, unreadable or truncated, its
        patterns have the wrong rank, no patterns or a non-numeric dtype,
        or a PC field it stores lies outside ``[0, 1]``.

    Examples
    --------
    >>> stack = read_patterns("map.h5oina")  # doctest: +SKIP
    >>> stack.map_shape, stack.detector.pc, stack.phases  # doctest: +SKIP
    ((120, 160), (0.5012, 0.2987, 0.6113), ('Lithium',))
    >>> block = stack.data[0:10, 0:160]  # reads these 1600 patterns only # doctest: +SKIP
    """
    text = str(path)
    p = Path(path)
    if p.is_dir():
        return _read_image_series(_image_glob(p))
    if not p.exists():
        file, dataset = _split_dataset_path(text)
        if file is not None:
            return _read_hdf5(file, dataset)
        if glob.has_magic(text) and glob.glob(text):
            return _read_image_series(text)
        raise PatternFileError(f"pattern file {p} does not exist")
    fmt = _detect_format(p)
    return _READERS[fmt](p)


# --------------------------------------------------------------------------- lazy arrays


class LazyPatterns(abc.ABC):
    """A ``(ny, nx, sy, sx)`` pattern array read from its file block by block.

    Supports what the stages do with pattern data: ``shape``, ``dtype``,
    ``ndim``, ``data[rows, cols]`` and ``data[rows, cols, ...]`` with an
    integer or a slice on each map axis (any further index applies to the
    patterns read), and ``np.asarray(data)`` for everything. Each index
    reads the patterns it selects and keeps nothing: the object holds the
    file's layout, never its patterns.
    """

    ndim = 4

    def __init__(self, path: Path, shape: tuple[int, int, int, int], dtype: Any) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype).newbyteorder("=")

    @property
    def size(self) -> int:
        """Number of pattern pixels in the array."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the whole array would take in memory."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-D pattern array: {key!r}")
        key = key + (slice(None),) * (self.ndim - len(key))
        picks, keep = [], []
        for k, n, axis in zip(key[:2], self.shape[:2], ("row", "column")):
            if isinstance(k, slice):
                picks.append(np.arange(*k.indices(n)))
                keep.append(slice(None))
                continue
            try:
                i = operator.index(k)
            except TypeError:
                raise IndexError(f"{self.path}: a {type(self).__name__} takes an integer or a "
                                 f"slice as the map {axis} index, got {k!r}") from None
            if not -n <= i < n:
                raise IndexError(f"map {axis} index {i} is out of range for {n} {axis}s")
            picks.append(np.array([i % n]))
            keep.append(0)
        block = self._read_block(picks[0], picks[1])
        return block[tuple(keep) + key[2:]]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype, copy=False)

    @abc.abstractmethod
    def _read_block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Patterns at ``rows × cols`` as a new ``(len(rows), len(cols), sy, sx)`` array."""


class PatternFile(LazyPatterns):
    """Patterns at known byte offsets of a binary file, read with explicit file reads.

    Parameters
    ----------
    path
        The file.
    dtype
        Pattern pixel type as stored (byte order included); patterns come
        back in native byte order.
    pattern_shape
        ``(sy, sx)``; each pattern is ``sy · sx`` values in row-major order.
    offsets : (ny, nx) int array
        Byte offset of each map pixel's pattern in the file; −1 where the
        file holds none (the pixel reads as zeros).

    Raises
    ------
    PatternFileError
        If the file is shorter than its last pattern's end (truncated).
    """

    def __init__(self, path: Path, dtype: Any, pattern_shape: tuple[int, int],
                 offsets: np.ndarray) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        super().__init__(path, offsets.shape + tuple(pattern_shape), dtype)
        self.file_dtype = np.dtype(dtype)
        self.offsets = offsets
        self.pattern_nbytes = int(pattern_shape[0] * pattern_shape[1] * self.file_dtype.itemsize)
        size = self.path.stat().st_size
        end = int(offsets.max()) + self.pattern_nbytes if (offsets >= 0).any() else 0
        if end > size:
            raise PatternFileError(f"{self.path}: truncated: its last pattern ends at byte {end}, "
                                   f"but the file has {size} bytes")

    def _read_block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        offs = self.offsets[np.ix_(rows, cols)].ravel()
        out = np.zeros((offs.size, self.pattern_nbytes), dtype=np.uint8)
        present = np.flatnonzero(offs >= 0)
        if present.size:
            starts = offs[present]
            # runs of pixels whose patterns follow each other in the file: one read each
            cut = np.flatnonzero((np.diff(present) != 1)
                                 | (np.diff(starts) != self.pattern_nbytes)) + 1
            with open(self.path, "rb", buffering=0) as fh:
                for lo, hi in zip(np.r_[0, cut], np.r_[cut, present.size]):
                    first = present[lo]
                    fh.seek(int(starts[lo]))
                    self._fill(fh, out[first:first + hi - lo].reshape(-1), int(starts[lo]))
        patterns = out.view(self.file_dtype).astype(self.dtype, copy=False)
        return patterns.reshape(len(rows), len(cols), *self.shape[2:])

    def _fill(self, fh: Any, buffer: np.ndarray, offset: int) -> None:
        view = memoryview(buffer)
        done = 0
        while done < buffer.size:
            got = fh.readinto(view[done:])
            if not got:
                raise PatternFileError(f"{self.path}: truncated: reading {buffer.size} bytes at "
                                       f"byte {offset} hit the end of the file")
            done += got


class HDF5Patterns(LazyPatterns):
    """Patterns of an HDF5 dataset, read with h5py one map row (or one run) at a time.

    Parameters
    ----------
    path
        The HDF5 file; it is opened for each read, so the object holds no
        open file and pickles.
    dataset
        Dataset name: ``(ny, nx, sy, sx)``, or ``(n, sy, sx)`` with ``index``.
    index : (ny, nx) int array, optional
        For an ``(n, sy, sx)`` dataset: the dataset entry of each map pixel,
        −1 where the file holds none (the pixel reads as zeros). Default:
        the ``n`` patterns as one row.
    """

    def __init__(self, path: Path, dataset: str, index: np.ndarray | None = None) -> None:
        with _open_h5(Path(path)) as f:
            ds = f[dataset]
            shape, dtype = tuple(ds.shape), ds.dtype
        _check_shape(shape, dtype, f"{path}:{dataset}")
        if len(shape) == 3 and index is None:
            index = np.arange(shape[0], dtype=np.int64).reshape(1, -1)
        if len(shape) == 4 and index is not None:
            raise ValueError("`index` maps the entries of an (n, sy, sx) dataset, not a 4-D one")
        self.dataset = dataset
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        map_shape = shape[:2] if self.index is None else self.index.shape
        super().__init__(path, tuple(map_shape) + shape[-2:], dtype)

    def _read_block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        import h5py

        out = np.zeros((len(rows), len(cols)) + self.shape[2:], dtype=self.dtype)
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[self.dataset]
                if self.index is None:
                    self._read_rows(ds, rows, cols, out)
                else:
                    self._read_entries(ds, self.index[np.ix_(rows, cols)], out)
        except OSError as e:
            raise PatternFileError(f"{self.path}:{self.dataset}: unreadable ({e})") from None
        return out

    @staticmethod
    def _read_rows(ds: Any, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
        if cols.size == 0:
            return
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        if _is_run(rows) and _is_run(cols):
            out[...] = ds[int(rows[0]):int(rows[-1]) + 1, c0:c1]
            return
        for i, r in enumerate(rows):
            out[i] = ds[int(r), c0:c1][cols - c0]

    @staticmethod
    def _read_entries(ds: Any, entries: np.ndarray, out: np.ndarray) -> None:
        flat_out = out.reshape(-1, *out.shape[2:])
        flat = entries.ravel()
        present = np.flatnonzero(flat >= 0)
        if present.size == 0:
            return
        if _is_run(flat[present]) and _is_run(present):
            k0 = int(flat[present[0]])
            flat_out[present[0]:present[-1] + 1] = ds[k0:k0 + present.size]
            return
        for i, row in enumerate(entries):  # one read per map row, over the row's span
            keep = np.flatnonzero(row >= 0)
            if keep.size:
                k0, k1 = int(row[keep].min()), int(row[keep].max()) + 1
                flat_out[i * entries.shape[1] + keep] = ds[k0:k1][row[keep] - k0]


def _is_run(values: np.ndarray) -> bool:
    """True when ``values`` is non-empty and counts up by one."""
    return values.size > 0 and bool(np.all(np.diff(values) == 1))


# --------------------------------------------------------------------------- formats


def _detect_format(p: Path) -> str:
    suffix = p.suffix.lower()
    by_suffix = {".npy": "npy", ".up1": "edax_binary", ".up2": "edax_binary",
                 ".ebsp": "oxford_binary", ".dat": "nordif"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix in _IMAGE_SUFFIXES:
        return "image_series"
    import h5py

    if h5py.is_hdf5(p):
        return _hdf5_format(p)
    raise PatternFileError(
        f"{p}: not a pattern file dpm reads (suffix {p.suffix!r} and not an HDF5 file); expected "
        ".npy, HDF5 (.h5, .hdf5, .h5ebsd, .h5oina), .ebsp, .up1/.up2, NORDIF .dat or images "
        f"({', '.join(_IMAGE_SUFFIXES)})")


def _hdf5_format(p: Path) -> str:
    with _open_h5(p) as f:
        em = f.get("EMData")
        if em is not None and "EBSD/EBSDPatterns" in em:
            return "emsoft_ebsd"
        masters = [k for k in (em or {}) if k.lower().endswith("master")]
        if masters:
            raise PatternFileError(f"{p}: an EMsoft master pattern file (EMData/{masters[0]}), "
                                   "not a pattern stack")
        manufacturer = _manufacturer(f) or ""
    known = {"oxford instruments": "oxford_h5ebsd", "bruker nano": "bruker_h5ebsd",
             "edax": "edax_h5ebsd", "kikuchipy": "kikuchipy_h5ebsd"}
    return known.get(manufacturer.lower(), "hdf5")


def _open_h5(p: Path) -> Any:
    import h5py

    try:
        return h5py.File(p, "r")
    except OSError as e:
        raise PatternFileError(f"{p}: unreadable or truncated HDF5 file ({e})") from None


def _split_dataset_path(text: str) -> tuple[Path | None, str | None]:
    """``("FILE", "/group/dataset")`` for ``FILE:/group/dataset`` where FILE exists."""
    file, sep, dataset = text.rpartition(":")
    if not sep or not file or not Path(file).is_file():
        return None, None
    if not dataset.strip("/"):
        raise PatternFileError(f"{text}: no dataset named after the ':'; write FILE:/group/dataset")
    return Path(file), dataset


def _read_npy(p: Path) -> PatternStack:
    from numpy.lib import format as npy_format

    with open(p, "rb") as fh:
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]} (used for structured "
                                 "dtypes only) is not a pattern array")
        except ValueError as e:
            raise PatternFileError(f"{p}: not a readable .npy array ({e})") from None
        offset = fh.tell()
    _check_shape(shape, dtype, str(p))
    if fortran_order and sum(s > 1 for s in shape) > 1:
        raise PatternFileError(
            f"{p}: a Fortran-order .npy array (shape {tuple(shape)}), whose patterns are not "
            "contiguous on disk; dpm reads C-order files: save it with "
            "np.save(path, np.ascontiguousarray(a))")
    shape = tuple(shape) if len(shape) == 4 else (1,) + tuple(shape)
    nbytes = shape[2] * shape[3] * dtype.itemsize
    offsets = offset + nbytes * np.arange(shape[0] * shape[1], dtype=np.int64)
    data = PatternFile(p, dtype, shape[2:], offsets.reshape(shape[:2]))
    return _stack(data, p, {"format": "npy"})


def _read_hdf5(p: Path, dataset: str | None = None) -> PatternStack:
    import h5py

    with _open_h5(p) as f:
        if dataset is None:
            found: list[tuple[str, tuple[int, ...], np.dtype]] = []
            f.visititems(lambda name, obj: found.append((name, obj.shape, obj.dtype))
                         if isinstance(obj, h5py.Dataset) else None)
            candidates = [c for c in found if len(c[1]) in (3, 4) and c[2].kind in "iuf"]
            if not candidates:
                listed = ", ".join(f"/{n} {s} {d}" for n, s, d in found[:10]) or "none"
                raise PatternFileError(f"{p}: holds no 3-D or 4-D numeric dataset to read as "
                                       f"patterns (datasets: {listed})")
            if len(candidates) > 1:
                listed = ", ".join(f"/{n} {s} {d}" for n, s, d in candidates)
                raise PatternFileError(f"{p}: holds {len(candidates)} 3-D or 4-D numeric datasets; "
                                       f"name one as {p}:/group/dataset: {listed}")
            name, source = "/" + candidates[0][0], str(p)
        else:
            obj = f.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                what = "a group" if isinstance(obj, h5py.Group) else "nothing"
                raise PatternFileError(f"{p}: {dataset!r} is {what}, not a dataset")
            name = obj.name
            source = f"{p}:{name}"
    data = HDF5Patterns(p, name)
    return _stack(data, p, {"format": "hdf5", "dataset": name}, source=source)


def _read_oxford_h5(p: Path) -> PatternStack:
    with _open_h5(p) as f:
        scan = _first_scan(f, p)
        header, group = scan["EBSD/Header"], scan["EBSD/Data"]
        processed = "Unprocessed Patterns" not in group
        dataset = "Processed Patterns" if processed else "Unprocessed Patterns"
        if dataset not in group:
            raise PatternFileError(f"{p}: {group.name} holds neither 'Processed Patterns' nor "
                                   "'Unprocessed Patterns'")
        ny, nx = _header_int(header, "Y Cells", p), _header_int(header, "X Cells", p)
        sy, sx = _header_int(header, "Pattern Height", p), _header_int(header, "Pattern Width", p)
        tilt_angle = _number(header, "Tilt Angle")
        euler = _value(header, "Detector Orientation Euler")
        meta = {
            "format": "oxford_h5ebsd", "vendor": _manufacturer(f), "version": _text(f, "Format Version"),
            "scan": scan.name, "dataset": group[dataset].name, "pc_convention": "oxford",
            "sample_tilt": None if tilt_angle is None else math.degrees(tilt_angle),
            "detector_tilt": (math.degrees(float(np.ravel(euler)[1])) - 90.0
                              if euler is not None and np.size(euler) == 3 else None),
            "azimuthal": None, "binning": _oxford_binning(header), "px_size": None,
            "step_x": _number(header, "X Step"), "step_y": _number(header, "Y Step"),
            "beam_energy": _number(header, "Beam Voltage"),
            "working_distance": _number(header, "Working Distance"),
            "magnification": _number(header, "Magnification"),
        }
        pc = _pc_fields(group, ("Pattern Center X", "Pattern Center Y", "Detector Distance"), p, meta)
        index = np.arange(ny * nx, dtype=np.int64).reshape(ny, nx)
        properties = _properties(group, _PROPERTIES["oxford_h5ebsd"], index, p)
        # the static background is what AZtec removed from the unprocessed patterns
        background = None if processed else _value(header, "Processed Static Background")
        phases = _phase_names(header.get("Phases"), ("Phase Name",))
    signal = _kikuchipy_load(p, processed=processed, scan_group_names=meta["scan"].lstrip("/"))
    data = _kikuchipy_data(signal)
    bc = properties.get("Band Contrast")
    return _stack(data, p, meta, detector=_detector(pc, meta, (sy, sx), p),
                  static_background=background, band_contrast=bc, properties=properties,
                  phases=phases)


def _oxford_binning(header: Any) -> int | None:
    """Binning from AZtec's camera mode, e.g. ``"4x4 (311x256 px)"``: 1024 / pattern rows.

    As kikuchipy reads it (after Oxford Instruments' note in
    oinanoanalysis/h5oina issue 5): full resolution is 1244 x 1024 px, and
    the 88-row "Speed 3" mode is binning 8 with 20 rows cut top and bottom.
    """
    mode = _text(header, "Camera Mode") or _text(header, "Camera Binning Mode")
    found = re.findall(r"\((\d+)x(\d+) px\)", mode or "")
    if len(found) != 1:
        return None
    rows = int(found[0][1])
    return 8 if rows == 88 else max(1, round(1024 / rows))


def _read_bruker_h5(p: Path) -> PatternStack:
    with _open_h5(p) as f:
        scan = _first_scan(f, p)
        header, group = scan["EBSD/Header"], scan["EBSD/Data"]
        grid_type = _text(header, "Grid Type")
        if grid_type != "isometric":
            raise PatternFileError(f"{p}: {header.name}/Grid Type is {grid_type!r}; dpm (and "
                                   "kikuchipy) read Bruker maps on a square ('isometric') grid only")
        sy, sx = _header_int(header, "PatternHeight", p), _header_int(header, "PatternWidth", p)
        if "EBSD/SEM/IX" in scan and "EBSD/SEM/IY" in scan:
            # a region of interest: pattern k was taken at map pixel (IY[k], IX[k])
            iy = np.asarray(scan["EBSD/SEM/IY"][()], dtype=np.int64).ravel()
            ix = np.asarray(scan["EBSD/SEM/IX"][()], dtype=np.int64).ravel()
            ny, nx = int(np.ptp(iy)) + 1, int(np.ptp(ix)) + 1
            if ny * nx != iy.size:
                raise PatternFileError(f"{p}: its region of interest (EBSD/SEM/IX, IY) is not a "
                                       f"rectangle: {iy.size} patterns in a {ny} x {nx} box")
            index = np.ravel_multi_index((iy - iy.min(), ix - ix.min()), (ny, nx)).argsort()
            index = index.reshape(ny, nx)
        else:
            ny, nx = _header_int(header, "NROWS", p), _header_int(header, "NCOLS", p)
            index = np.arange(ny * nx, dtype=np.int64).reshape(ny, nx)
        height_um = _number(header, "DetectorFullHeightMicrons")
        height_px = _number(header, "UnClippedPatternHeight")
        sample_tilt = _number(header, "SampleTilt")
        meta = {
            "format": "bruker_h5ebsd", "vendor": _manufacturer(f), "version": _text(f, "Version"),
            "scan": scan.name, "dataset": f"{group.name}/RawPatterns", "pc_convention": "bruker",
            # kikuchipy 0.13 looks for "Sample Tilt"; Esprit writes "SampleTilt"
            "sample_tilt": sample_tilt if sample_tilt is not None else _number(header, "Sample Tilt"),
            "detector_tilt": _number(header, "CameraTilt"), "azimuthal": None, "binning": None,
            "px_size": height_um / height_px if height_um and height_px else None,
            "step_x": _number(header, "XSTEP"), "step_y": _number(header, "YSTEP"),
            "beam_energy": _number(header, "KV"), "working_distance": _number(header, "WD"),
            "magnification": _number(header, "Magnification"),
        }
        pc = _pc_fields(group, ("PCX", "PCY", "DD"), p, meta)
        properties = _properties(group, _PROPERTIES["bruker_h5ebsd"], index, p)
        background = _value(header, "StaticBackground")
        phases = _phase_names(header.get("Phases"), ("Name",))
    signal = _kikuchipy_load(p, scan_group_names=meta["scan"].lstrip("/"))
    return _stack(_kikuchipy_data(signal), p, meta, detector=_detector(pc, meta, (sy, sx), p),
                  static_background=background, properties=properties, phases=phases)


def _read_edax_h5(p: Path) -> PatternStack:
    with _open_h5(p) as f:
        scan = _first_scan(f, p)
        header, group = scan["EBSD/Header"], scan["EBSD/Data"]
        grid_type = _text(header, "Grid Type")
        grids = {"SqrGrid": "square", "HexGrid": "hexagonal"}
        if grid_type not in grids:
            raise PatternFileError(f"{p}: {header.name}/Grid Type is {grid_type!r}, neither "
                                   "SqrGrid nor HexGrid")
        ds = _member(group, "Pattern")
        if not isinstance(ds, _h5py().Dataset):
            raise PatternFileError(f"{p}: {group.name} holds no 'Pattern' dataset")
        _check_shape(ds.shape, ds.dtype, f"{p}:{ds.name}")
        ny, nx = _header_int(header, "nRows", p), _header_int(header, "nColumns", p)
        sy, sx = _header_int(header, "Pattern Height", p), _header_int(header, "Pattern Width", p)
        if ds.ndim != 3 or ds.shape[1:] != (sy, sx):
            raise PatternFileError(f"{p}:{ds.name}: shape {ds.shape}; the header's Pattern Height "
                                   f"{sy} and Pattern Width {sx} need (n, {sy}, {sx})")
        grid = grids[grid_type]
        index = _grid_index(ds.shape[0], ny, nx, grid, f"{p}:{ds.name}")
        pc_group = _member(header, "Pattern Center Calibration")
        meta = {
            "format": "edax_h5ebsd", "vendor": _manufacturer(f), "version": _text(f, "Version"),
            "scan": scan.name, "dataset": ds.name, "pc_convention": "tsl",
            "sample_tilt": _number(header, "Sample Tilt"),
            "detector_tilt": _number(header, "Camera Elevation Angle"),
            "azimuthal": _number(header, "Camera Azimuthal Angle"), "binning": None, "px_size": None,
            "step_x": _number(header, "Step X"), "step_y": _number(header, "Step Y"),
            "working_distance": _number(header, "Working Distance"),
        }
        pc = (None if pc_group is None else
              _pc_fields(pc_group, ("x-star", "y-star", "z-star"), p, meta))
        properties = _properties(group, _PROPERTIES["edax_h5ebsd"], index, p)
        phases = _phase_names(_member(header, "Phase"), ("MaterialName", "Formula"))
        dataset = ds.name
    in_file = None if (index >= 0).all() else index >= 0
    data = HDF5Patterns(p, dataset, index=index)
    return _stack(data, p, meta, detector=_detector(pc, meta, (sy, sx), p), grid=grid,
                  properties=properties, phases=phases, in_file=in_file)


def _read_kikuchipy_h5(p: Path) -> PatternStack:
    signal = _kikuchipy_load(p)
    det = signal.detector
    nav = signal.axes_manager.navigation_axes
    steps = {a.name: float(a.scale) for a in nav if str(a.units) in ("um", "µm")}
    meta = {"format": "kikuchipy_h5ebsd", "vendor": "kikuchipy",
            "version": _kikuchipy_file_version(p), "scan": None, "pc_convention": "bruker",
            "sample_tilt": float(det.sample_tilt), "detector_tilt": float(det.tilt),
            "azimuthal": float(det.azimuthal), "binning": int(det.binning),
            "px_size": float(det.px_size), "step_x": steps.get("x"), "step_y": steps.get("y")}
    detector = _detector_from_kikuchipy(det, p, meta)
    return _stack(_kikuchipy_data(signal), p, meta, detector=detector,
                  static_background=getattr(signal, "static_background", None),
                  phases=_xmap_phase_names(signal))


def _kikuchipy_file_version(p: Path) -> str | None:
    with _open_h5(p) as f:
        return _text(f, "version")


def _read_emsoft(p: Path) -> PatternStack:
    signal = _kikuchipy_load(p)
    det = signal.detector
    with _open_h5(p) as f:
        nml = f["NMLparameters/EBSDNameList"]
        pc_file = tuple(_number(nml, k) for k in ("xpc", "ypc", "L"))
        meta = {"format": "emsoft_ebsd", "vendor": "EMsoft",
                "version": _text(f, "EMheader/EBSD/Version"), "scan": None,
                "dataset": "/EMData/EBSD/EBSDPatterns", "pc_convention": "emsoft",
                "sample_tilt": None, "detector_tilt": _number(nml, "thetac"), "azimuthal": None,
                "binning": _number(nml, "binning", int), "px_size": _number(nml, "delta"),
                "step_x": None, "step_y": None, "beam_energy": _number(nml, "energymax")}
    detector = _detector_from_kikuchipy(det, p, meta)
    meta["pc_file"] = pc_file
    return _stack(_kikuchipy_data(signal), p, meta, detector=detector,
                  phases=_xmap_phase_names(signal))


def _read_nordif(p: Path) -> PatternStack:
    setting = p.with_name("Setting.txt")
    if not setting.is_file():
        raise PatternFileError(f"{p}: a NORDIF pattern file needs its Setting.txt beside it "
                               f"({setting} does not exist)")
    signal = _kikuchipy_load(p)
    ny, nx = _kikuchipy_map_shape(signal)
    sy, sx = signal.axes_manager.signal_shape[::-1]
    det = signal.detector
    steps = {a.name: float(a.scale) for a in signal.axes_manager.navigation_axes}
    header = signal.original_metadata.as_dictionary().get("nordif_header", [])
    nbytes = sy * sx
    n_file = p.stat().st_size // nbytes
    if n_file == 0:
        raise PatternFileError(f"{p}: holds no whole {sy} x {sx} pattern ({p.stat().st_size} bytes)")
    offsets = nbytes * np.arange(ny * nx, dtype=np.int64)
    offsets[n_file:] = -1
    if n_file < ny * nx:
        log.warning("%s: holds %d of the %d x %d patterns Setting.txt announces; the rest read "
                    "as zeros", p, n_file, ny, nx)
    meta = {"format": "nordif", "vendor": "NORDIF", "version": _nordif_value(header, "Software version"),
            "sample_tilt": float(det.sample_tilt), "detector_tilt": float(det.tilt),
            "azimuthal": float(det.azimuthal), "binning": None, "px_size": None,
            "step_x": steps.get("x", steps.get("y")), "step_y": steps.get("y", steps.get("x")),
            "beam_energy": _to_float(_nordif_value(header, "Accelerating voltage")),
            "working_distance": _to_float(_nordif_value(header, "Working distance")),
            "magnification": _to_float(_nordif_value(header, "Magnification"))}
    data = PatternFile(p, np.uint8, (sy, sx), offsets.reshape(ny, nx))
    in_file = None if n_file >= ny * nx else (offsets >= 0).reshape(ny, nx)
    return _stack(data, p, meta, static_background=getattr(signal, "static_background", None),
                  phases=_nordif_phases(header), in_file=in_file)


def _nordif_value(header: list[str], key: str) -> str | None:
    """The value after ``key<tab>`` on the first Setting.txt line starting with it."""
    for line in header:
        name, _, rest = line.partition("\t")
        if name.strip() == key:
            return rest.split("\t")[0].strip()
    return None


def _nordif_phases(header: list[str]) -> tuple[str, ...]:
    """Non-empty ``Name`` lines of the ``[Phase k]`` blocks of a Setting.txt."""
    names, in_phase = [], False
    for line in header:
        if line.startswith("["):
            in_phase = re.match(r"\[Phase \d+\]", line) is not None
        elif in_phase and line.partition("\t")[0].strip() == "Name":
            name = line.split("\t")[1].strip() if "\t" in line else ""
            if name:
                names.append(name)
    return tuple(names)


def _read_edax_binary(p: Path) -> PatternStack:
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(42)
    if len(head) < 16:
        raise PatternFileError(f"{p}: truncated: {len(head)} bytes, shorter than an .up header")
    version = int(np.frombuffer(head, "<u4", 1)[0])
    sx, sy, offset = (int(v) for v in np.frombuffer(head, "<u4", 3, 4))
    if version == 2 or version < 1:
        raise PatternFileError(f"{p}: .up file version {version}; dpm reads versions 1 and 3 or later")
    if min(sx, sy) < 1:
        raise PatternFileError(f"{p}: header gives a pattern shape of {sy} x {sx} pixels")
    dtype = np.dtype("<u1" if p.suffix.lower() == ".up1" else "<u2")
    nbytes = sx * sy * dtype.itemsize
    n_file = max(0, size - offset) // nbytes
    meta: dict[str, Any] = {"format": "edax_binary", "vendor": "EDAX", "version": str(version),
                            "step_x": None, "step_y": None}
    grid = "square"
    if version == 1:
        index = np.arange(n_file, dtype=np.int64).reshape(1, -1)
    else:
        if len(head) < 42:
            raise PatternFileError(f"{p}: truncated: {len(head)} bytes, shorter than a version "
                                   f"{version} .up header (42 bytes)")
        extra = head[16]
        nx, ny = (int(v) for v in np.frombuffer(head, "<u4", 2, 17))
        grid = "hexagonal" if head[25] else "square"
        dx, dy = (float(v) for v in np.frombuffer(head, "<f8", 2, 26))
        meta.update(step_x=dx, step_y=dy)
        index = _grid_index(n_file, ny, nx, grid, str(p), extra=extra)
    _check_shape(index.shape + (sy, sx), dtype, str(p))
    offsets = np.where(index >= 0, offset + nbytes * index, -1)
    data = PatternFile(p, dtype, (sy, sx), offsets)
    in_file = None if (index >= 0).all() else index >= 0
    return _stack(data, p, meta, grid=grid, in_file=in_file)


def _grid_index(n_file: int, ny: int, nx: int, grid: str, where: str, *, extra: int = 0) -> np.ndarray:
    """File entry of each pixel of a ``ny × nx`` map stored row by row (−1: padding).

    Every row holds ``nx`` patterns, or, on a hexagonal grid, the odd rows
    (0-based) hold ``nx − 1`` (TSL HexGrid's ``NCOLS_EVEN = NCOLS_ODD − 1``)
    and are padded at their end. The layout is the one whose pattern count
    is ``n_file`` (or ``n_file − extra``, .up files' "extra patterns").
    """
    full = ny * nx
    short = (ny + 1) // 2 * nx + ny // 2 * (nx - 1)
    for n in dict.fromkeys((n_file, n_file - extra)):
        if n == full and full > 0:
            return np.arange(full, dtype=np.int64).reshape(ny, nx)
        if grid == "hexagonal" and n == short and nx > 1:
            index = np.full((ny, nx), -1, dtype=np.int64)
            start = 0
            for r in range(ny):
                count = nx if r % 2 == 0 else nx - 1
                index[r, :count] = np.arange(start, start + count)
                start += count
            return index
    hint = f", or {short} with the short odd rows of a TSL HexGrid" if grid == "hexagonal" else ""
    raise PatternFileError(f"{where}: holds {n_file} patterns, but its header's {ny} x {nx} "
                           f"{grid} map needs {full}{hint} (truncated file?)")


def _read_oxford_binary(p: Path) -> PatternStack:
    size = p.stat().st_size
    with open(p, "rb") as fh:
        first = _read_array(fh, 0, "<i8", 1, p)[0]
        version = int(-first) if first < 0 else 0
        table = 0 if version == 0 else (9 if version > 3 else 8)
        starts = _ebsp_pattern_starts(fh, table, size, p)
        present = starts > 0
        names = (["map_x", "map_y"] if version >= 5 else []) + ["is_compressed", "nrows", "ncols", "n_bytes"]
        header_dtype = np.dtype([(name, "<i4") for name in names])
        head = _read_array(fh, int(starts[present].min()), header_dtype, 1, p)[0]
        if head["is_compressed"]:
            raise PatternFileError(f"{p}: holds compressed patterns; dpm reads uncompressed .ebsp files")
        sy, sx, nbytes = int(head["nrows"]), int(head["ncols"]), int(head["n_bytes"])
        if min(sy, sx) < 1 or nbytes not in (sy * sx, 2 * sy * sx):
            raise PatternFileError(f"{p}: pattern header gives {sy} x {sx} pixels in {nbytes} bytes; "
                                   "expected 1 or 2 bytes per pixel")
        dtype = np.dtype("<u1" if nbytes == sy * sx else "<u2")
        xy = _ebsp_beam_positions(fh, starts[present] + header_dtype.itemsize + nbytes, version, p)
    n = starts.size
    map_shape, step = _ebsp_map(xy, present, n, p)
    offsets = np.where(present, starts + header_dtype.itemsize, -1).reshape(map_shape)
    meta = {"format": "oxford_binary", "vendor": "Oxford Instruments", "version": str(version),
            "step_x": step, "step_y": step}
    data = PatternFile(p, dtype, (sy, sx), offsets)
    in_file = None if present.all() else present.reshape(map_shape)
    return _stack(data, p, meta, in_file=in_file)


def _read_array(fh: Any, offset: int, dtype: Any, count: int, p: Path) -> np.ndarray:
    dtype = np.dtype(dtype)
    fh.seek(offset)
    raw = fh.read(dtype.itemsize * count)
    if len(raw) < dtype.itemsize * count:
        raise PatternFileError(f"{p}: truncated: reading {dtype.itemsize * count} bytes at byte "
                               f"{offset} hit the end of the file")
    return np.frombuffer(raw, dtype, count)


def _ebsp_pattern_starts(fh: Any, table: int, size: int, p: Path) -> np.ndarray:
    """The .ebsp table of pattern byte positions, one int64 per map pixel (0: not stored).

    The table ends where the first stored pattern begins: after ``n``
    entries where ``table + 8 n`` equals the smallest position among them.
    """
    parts, smallest, pos = [], np.inf, table
    while pos + 8 <= size:
        chunk = _read_array(fh, pos, "<i8", min(4096, (size - pos) // 8), p)
        running = np.minimum.accumulate(np.where(chunk > 0, chunk, np.inf))
        running = np.minimum(running, smallest)
        after = pos + 8 * np.arange(1, chunk.size + 1)
        done = np.flatnonzero(after >= running)
        if done.size:
            j = int(done[0])
            parts.append(chunk[:j + 1])
            if after[j] != running[j] or (np.concatenate(parts) < 0).any():
                raise PatternFileError(f"{p}: not an .ebsp file (its pattern table is malformed)")
            return np.concatenate(parts)
        parts.append(chunk)
        smallest, pos = running[-1], int(after[-1])
    if not np.isfinite(smallest):
        raise PatternFileError(f"{p}: its pattern table lists no stored pattern")
    raise PatternFileError(f"{p}: truncated: its pattern table runs past the end of the file "
                           f"({size} bytes)")


def _ebsp_beam_positions(fh: Any, footers: np.ndarray, version: int, p: Path) -> np.ndarray | None:
    """Beam (x, y) in µm from each stored pattern's footer, or None where the file has none.

    Version 0 has no footer; version 1 footers are two float64; later ones
    are ``bool, float64`` for x, then for y, a value absent when its flag
    is false.
    """
    if version == 0:
        return None
    size = 16 if version == 1 else 18
    xy = np.empty((footers.size, 2))
    for i, at in enumerate(footers):
        fh.seek(int(at))
        raw = fh.read(size)
        if version > 1 and ((len(raw) >= 1 and not raw[0]) or (len(raw) >= 10 and not raw[9])):
            return None  # a beam position left out
        if len(raw) < size:
            raise PatternFileError(f"{p}: truncated: the footer of the pattern at byte {int(at)} "
                                   "runs past the end of the file")
        if version == 1:
            xy[i] = np.frombuffer(raw, "<f8", 2)
        else:
            xy[i] = np.frombuffer(raw, "<f8", 1, 1)[0], np.frombuffer(raw, "<f8", 1, 10)[0]
    return xy


def _ebsp_map(xy: np.ndarray | None, present: np.ndarray, n: int,
             p: Path) -> tuple[tuple[int, int], float | None]:
    """Map shape and step (µm) of an .ebsp file from its stored patterns' beam positions.

    Entry ``i`` of the pattern table is map pixel ``i`` (row-major). The
    step is the smallest spacing of the beam positions; the map is as wide
    as they span. Without positions, or where they do not put each stored
    pattern at its pixel, the patterns are one row.
    """
    if xy is None or n < 2:
        return (1, n), None
    spacings = [np.diff(np.unique(np.round(v, 6))) for v in xy.T]
    spacings = [s.min() for s in spacings if s.size]
    if not spacings:
        return (1, n), None
    step = float(min(spacings))
    col = np.round((xy[:, 0] - xy[:, 0].min()) / step).astype(np.int64)
    row = np.round((xy[:, 1] - xy[:, 1].min()) / step).astype(np.int64)
    nx = int(col.max()) + 1
    pixel = np.flatnonzero(present)
    prow, pcol = np.divmod(pixel, nx)
    if n % nx or not (np.array_equal(col - col.min(), pcol - pcol.min())
                      and np.array_equal(row - row.min(), prow - prow.min())):
        log.warning("%s: the beam positions do not place the patterns on a row-major map; "
                    "reading them as one row", p)
        return (1, n), step
    return (n // nx, nx), step


def _read_image_series(pattern: str) -> PatternStack:
    signal = _kikuchipy_load(Path(pattern))
    files = sorted(glob.glob(pattern))
    meta = {"format": "image_series", "vendor": None, "size_bytes": sum(Path(f).stat().st_size for f in files),
            "files": len(files)}
    return _stack(_kikuchipy_data(signal), Path(pattern), meta, source=pattern)


def _image_glob(folder: Path) -> str:
    suffixes = sorted({f.suffix.lower() for f in folder.iterdir()
                       if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES})
    if len(suffixes) != 1:
        found = ", ".join(suffixes) if suffixes else "none"
        raise PatternFileError(f"{folder}: a pattern folder must hold images of one type "
                               f"({', '.join(_IMAGE_SUFFIXES)}); found {found}")
    names = {f.suffix for f in folder.iterdir() if f.suffix.lower() == suffixes[0]}
    return str(folder / f"*{sorted(names)[0]}")


_READERS = {
    "npy": _read_npy, "hdf5": _read_hdf5, "oxford_h5ebsd": _read_oxford_h5,
    "oxford_binary": _read_oxford_binary, "bruker_h5ebsd": _read_bruker_h5,
    "edax_h5ebsd": _read_edax_h5, "edax_binary": _read_edax_binary, "nordif": _read_nordif,
    "emsoft_ebsd": _read_emsoft, "kikuchipy_h5ebsd": _read_kikuchipy_h5,
    "image_series": _read_image_series,
}


# --------------------------------------------------------------------------- helpers


def _stack(data: Any, p: Path, metadata: dict[str, Any], *, source: str | None = None,
           detector: Detector | None = None, static_background: Any = None,
           band_contrast: np.ndarray | None = None, grid: str = "square",
           properties: dict[str, np.ndarray] | None = None, phases: tuple[str, ...] = (),
           in_file: np.ndarray | None = None) -> PatternStack:
    """The :class:`PatternStack` of a reader's ``(ny, nx, sy, sx)`` data, checked, its background matched."""
    where = source or str(p)
    _check_shape(data.shape, data.dtype, where)
    pattern_shape = tuple(data.shape[2:])
    background = None
    if static_background is not None:
        background = np.asarray(static_background)
        if background.ndim == 3 and background.shape[-1] in (3, 4):  # an RGB(A) image file
            background = background[..., 0]
        if background.shape != pattern_shape:
            log.warning("%s: its static background has shape %s, the patterns %s; ignoring it",
                        where, background.shape, pattern_shape)
            background = None
    metadata = dict(metadata)
    metadata.setdefault("size_bytes", p.stat().st_size if p.is_file() else None)
    return PatternStack(data=data, source=where, detector=detector, static_background=background,
                        step_size=metadata.get("step_x"), band_contrast=band_contrast, grid=grid,
                        phases=tuple(phases), properties=properties or {}, in_file=in_file,
                        metadata=metadata)


def _kikuchipy_load(p: Path, **kwargs: Any) -> Any:
    """kikuchipy's lazy EBSD signal of ``p``; kikuchipy's warnings go to the dpm log."""
    import kikuchipy as kp

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)  # kikuchipy's lazy readers keep files open
        try:
            signal = kp.load(p, lazy=True, **kwargs)
        except Exception as e:  # kikuchipy raises many types for unreadable files
            raise PatternFileError(f"{p}: kikuchipy cannot read it ({type(e).__name__}: {e})") from None
    for w in caught:
        log.warning("%s: kikuchipy: %s", p, w.message)
    if isinstance(signal, list):
        signal = signal[0]
    if not isinstance(signal, kp.signals.EBSD):
        raise PatternFileError(f"{p}: holds a {type(signal).__name__}, not EBSD patterns")
    return signal


def _kikuchipy_map_shape(signal: Any) -> tuple[int, int]:
    """``(ny, nx)`` of a kikuchipy signal (its data may have 0–2 navigation axes)."""
    nav = signal.axes_manager.navigation_axes
    if len(nav) == 2:
        return tuple(int(s) for s in signal.axes_manager.navigation_shape[::-1])
    if len(nav) == 1:
        n = int(nav[0].size)
        return (n, 1) if nav[0].name == "y" else (1, n)
    return 1, 1


def _kikuchipy_data(signal: Any) -> Any:
    """A kikuchipy signal's lazy data as ``(ny, nx, sy, sx)``."""
    data = signal.data
    return data.reshape(_kikuchipy_map_shape(signal) + tuple(data.shape[-2:]))


def _xmap_phase_names(signal: Any) -> tuple[str, ...]:
    xmap = getattr(signal, "xmap", None)
    if xmap is None:
        return ()
    return tuple(phase.name for i, phase in xmap.phases if i >= 0 and phase.name)


def _h5py() -> Any:
    import h5py

    return h5py


def _member(group: Any, name: str) -> Any:
    """``group[name]``, allowing for the leading spaces some EDAX keys carry; None if absent."""
    if group is None:
        return None
    if name in group:
        return group[name]
    for key in group:
        if key.strip() == name:
            return group[key]
    return None


def _value(group: Any, name: str) -> Any:
    """A dataset's value (a one-element array as its element, bytes decoded), or None."""
    obj = _member(group, name)
    if not isinstance(obj, _h5py().Dataset):
        return None
    value = obj[()]
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "SOUiuf":
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("latin-1").strip()
    return value.item() if isinstance(value, np.generic) else value


def _text(group: Any, name: str) -> str | None:
    value = _value(group, name)
    return None if value is None else str(value)


def _number(group: Any, name: str, kind: type = float) -> Any:
    """A numeric header value as ``kind``, or None when absent or not a number."""
    value = _value(group, name)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        log.warning("%s/%s holds %r, not a number; ignoring it", group.name, name, value)
        return None
    return int(number) if kind is int else number


def _to_float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _manufacturer(f: Any) -> str | None:
    for key in f:
        if key.strip().lower() == "manufacturer":
            return _text(f, key)
    return None


def _first_scan(f: Any, p: Path) -> Any:
    """The first top-level group with ``EBSD/Data`` and ``EBSD/Header``."""
    h5py = _h5py()
    scans = [f[k] for k in f if isinstance(f[k], h5py.Group) and "EBSD/Data" in f[k]
             and "EBSD/Header" in f[k]]
    if not scans:
        raise PatternFileError(f"{p}: no top-level scan group with EBSD/Data and EBSD/Header")
    if len(scans) > 1:
        log.info("%s: holds %d scans; reading %s", p, len(scans), scans[0].name)
    return scans[0]


def _header_int(group: Any, name: str, p: Path) -> int:
    """A header value that must be there: a positive integer."""
    value = _number(group, name, int)
    if value is None or value < 1:
        raise PatternFileError(f"{p}: {group.name}/{name} is "
                               f"{'missing' if value is None else value}; expected a positive integer")
    return value


def _phase_names(group: Any, keys: tuple[str, ...]) -> tuple[str, ...]:
    """Names of a vendor's numbered phase groups (``Phases/1``, ``Phases/2``, …)."""
    if group is None:
        return ()
    names = []
    for key in sorted((k for k in group if k.strip().isdigit()), key=lambda k: int(k)):
        for name_key in keys:
            name = _text(group[key], name_key)
            if name:
                names.append(name)
                break
    return tuple(names)


def _pc_fields(group: Any, names: tuple[str, str, str], p: Path,
               meta: dict[str, Any]) -> np.ndarray | None:
    """Mean PC (file convention) of the three PC datasets; None when absent or all zero.

    Each dataset holds one value or one per pattern; every value must be a
    fraction in ``[0, 1]`` (the Bruker, EDAX/TSL and Oxford conventions).
    Sets ``meta["pc_file"]`` and ``meta["pc_spread"]``.

    Raises
    ------
    PatternFileError
        Naming the file, the dataset and the value, for a value outside
        ``[0, 1]`` or not finite.
    """
    objs = [_member(group, name) for name in names]
    missing = [n for n, o in zip(names, objs) if not isinstance(o, _h5py().Dataset)]
    if missing:
        if len(missing) < 3:
            log.warning("%s: %s has no %s; no PC read", p, group.name, ", ".join(missing))
        return None
    values = []
    for obj in objs:
        v = np.asarray(obj[()], dtype=np.float64).ravel()
        bad = np.flatnonzero(~(np.isfinite(v) & (v >= 0) & (v <= 1)))
        if v.size == 0 or bad.size:
            at = f" (pattern {bad[0]})" if v.size > 1 else ""
            value = f"{v[bad[0]]:g}{at}" if v.size else "no value"
            raise PatternFileError(f"{p}: PC field {obj.name} holds {value}; PC fields of this "
                                   "format are fractions of the pattern size in [0, 1]")
        values.append(v)
    pc = np.array([v.mean() for v in values])
    if not pc.any():
        log.warning("%s: its PC fields (%s) are all zero, the PC was not calibrated; give one",
                    p, ", ".join(names))
        return None
    meta["pc_file"] = tuple(float(c) for c in pc)
    meta["pc_spread"] = float(max(np.ptp(v) for v in values))
    if meta["pc_spread"] > 1e-6:
        log.warning("%s: holds a PC per pattern (spread %.4f); using their mean", p, meta["pc_spread"])
    return pc


def _detector(pc: np.ndarray | None, meta: dict[str, Any], shape: tuple[int, int],
              p: Path) -> Detector | None:
    """The dpm detector from a file's PC (in ``meta["pc_convention"]``) and geometry."""
    if pc is None:
        return None
    geometry = {"sample_tilt": meta.get("sample_tilt"), "tilt": meta.get("detector_tilt"),
                "azimuthal": meta.get("azimuthal"), "binning": meta.get("binning"),
                "px_size": meta.get("px_size")}
    try:
        return Detector.from_pc(tuple(pc), meta["pc_convention"], shape=shape,
                                **{k: v for k, v in geometry.items() if v is not None})
    except ValueError as e:
        raise PatternFileError(f"{p}: its detector geometry is invalid ({e})") from None


def _properties(group: Any, names: tuple[str, ...], index: np.ndarray,
                p: Path) -> dict[str, np.ndarray]:
    """Per-pattern datasets of ``group`` as ``(ny, nx)`` float32 maps in map order.

    Parameters
    ----------
    group
        The vendor's ``EBSD/Data`` group.
    names
        Datasets to read, where present (one value per stored pattern).
    index : (ny, nx) int array
        File entry of each map pixel; −1 where the file holds no pattern
        (NaN in the map).
    p
        The file, for the log.
    """
    out = {}
    stored = index >= 0
    n = int(stored.sum())
    for name in names:
        obj = _member(group, name)
        if not isinstance(obj, _h5py().Dataset) or obj.dtype.kind not in "iufb":
            continue
        values = np.asarray(obj[()], dtype=np.float32).ravel()
        if values.size != n:
            log.warning("%s: %s holds %d values, not one for each of the %d patterns of the "
                        "%d x %d map; ignoring it", p, obj.name, values.size, n, *index.shape)
            continue
        prop = np.full(index.shape, np.nan, dtype=np.float32)
        prop[stored] = values[index[stored]]
        out[name] = prop
    return out


def _detector_from_kikuchipy(det: Any, p: Path, meta: dict[str, Any]) -> Detector:
    """A single-PC dpm detector from a kikuchipy detector (the mean PC of a PC map).

    Sets ``meta["pc_file"]`` (the mean PC, Bruker convention) and
    ``meta["pc_spread"]``.
    """
    pc = np.asarray(det.pc, dtype=float).reshape(-1, 3)
    spread = float(np.ptp(pc, axis=0).max())
    if spread > 1e-6:
        log.warning("%s: holds a PC per pattern (spread %.4f); using their mean", p, spread)
    meta["pc_file"] = tuple(float(c) for c in pc.mean(axis=0))
    meta["pc_spread"] = spread
    single = det.deepcopy()
    single.pc = pc.mean(axis=0)
    try:
        return Detector.from_kikuchipy(single)
    except ValueError as e:
        raise PatternFileError(f"{p}: its detector geometry is invalid ({e})") from None


# --------------------------------------------------------------------------- describe

_CONVENTION_NAMES = {"bruker": "Bruker", "oxford": "Oxford", "tsl": "EDAX/TSL", "emsoft": "EMsoft"}


def describe(stack: PatternStack) -> str:
    """What a pattern file holds, as the lines ``dpm info FILE`` prints.

    Parameters
    ----------
    stack
        From :func:`read_patterns` (or :func:`as_pattern_stack`).

    Returns
    -------
    text
        One ``name: value`` line each for the file and its format (vendor,
        version, scan, dataset), the map shape ``(ny, nx)`` and number of
        patterns, the pattern shape ``(sy, sx)`` and dtype, the size on
        disk, the step size (µm) and grid, the pattern centre (Bruker
        convention, and the file's own), the sample tilt, detector tilt and
        azimuthal angle (degrees), binning, pixel size (µm), static
        background, band contrast, other per-pattern values and the phases
        the file lists. Detector values the file does not store are marked
        as dpm's defaults. No trailing newline.

    Examples
    --------
    >>> print(describe(read_patterns("map.h5oina")))  # doctest: +SKIP
    file:               map.h5oina
    format:             Oxford Instruments h5oina (version 6.0, scan /1, ...)
    ...
    """
    meta = stack.metadata
    (ny, nx), (sy, sx) = stack.map_shape, stack.pattern_shape
    fmt = meta.get("format")
    details = [f"{key} {meta[key]}" for key in ("vendor", "version", "scan", "dataset")
               if meta.get(key) is not None and not (key == "vendor" and str(meta[key]).lower()
                                                     in FORMATS.get(fmt, "").lower())]
    lines = [("file", stack.source),
             ("format", FORMATS.get(fmt, "array in memory")
              + (f" ({', '.join(details)})" if details else ""))]
    n = ny * nx
    stored = n if stack.in_file is None else int(np.count_nonzero(stack.in_file))
    lines.append(("map shape", f"({ny}, {nx}) (ny, nx), {n} patterns"
                  + (f", {stored} of them in the file" if stored != n else "")))
    lines.append(("pattern shape", f"({sy}, {sx}) (sy, sx), dtype {np.dtype(stack.data.dtype)}"))
    size = meta.get("size_bytes")
    lines.append(("size on disk", "-" if size is None else _bytes_text(size)))
    step = "not stored" if stack.step_size is None else f"{stack.step_size:g} µm"
    lines.append(("step size", f"{step}, {stack.grid} grid"))
    det, convention = stack.detector, meta.get("pc_convention")
    if det is None:
        lines.append(("pattern centre", "not stored (give one: dpm index --pc PCX PCY PCZ)"))
    else:
        pc = "({:.4f}, {:.4f}, {:.4f}) Bruker".format(*det.pc)
        if convention not in (None, "bruker") and meta.get("pc_file") is not None:
            pc += f"; {_pc_text(meta['pc_file'], convention)} {_CONVENTION_NAMES[convention]}"
        lines.append(("pattern centre", pc))
    for label, key, attr, unit in (("sample tilt", "sample_tilt", "sample_tilt", "°"),
                                   ("detector tilt", "detector_tilt", "tilt", "°"),
                                   ("azimuthal", "azimuthal", "azimuthal", "°"),
                                   ("binning", "binning", "binning", ""),
                                   ("pixel size", "px_size", "px_size", " µm")):
        value = meta.get(key)
        if det is not None:
            text = f"{getattr(det, attr):g}{unit}" + ("" if value is not None else " (dpm default)")
        else:
            text = "not stored" if value is None else f"{value:g}{unit}"
        lines.append((label, text))
    bg = stack.static_background
    lines.append(("static background", "no" if bg is None else f"yes, {bg.shape[0]} x {bg.shape[1]}"))
    lines.append(("band contrast", "yes" if stack.band_contrast is not None else "no"))
    if stack.properties:
        lines.append(("per-pattern values", ", ".join(stack.properties)))
    lines.append(("phases", ", ".join(stack.phases) if stack.phases else "none listed"))
    width = max(len(label) for label, _ in lines) + 2
    return "\n".join(f"{label + ':':<{width}}{value}" for label, value in lines)


def _pc_text(pc: tuple[float, float, float], convention: str) -> str:
    if convention == "emsoft":
        return "(xpc {:.2f} px, ypc {:.2f} px, L {:.1f} µm)".format(*pc)
    return "({:.4f}, {:.4f}, {:.4f})".format(*pc)


def _bytes_text(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


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
