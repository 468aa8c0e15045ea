"""Pattern readers: NumPy arrays and every format kikuchipy reads, lazily.

:func:`read_patterns` never loads a whole stack: ``.npy`` files are memory
mapped and vendor files come back as kikuchipy's lazy dask arrays, so stages
read the chunks they process. What the file says about the detector, the static
background, the step size and the vendor's band contrast is returned beside
the data.
"""

from __future__ import annotations

import logging
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
