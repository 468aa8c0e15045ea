"""Project a master pattern onto the detector: the patterns of a dictionary.

For every orientation ``q`` (orix convention: rotation from the sample to the
crystal frame, scalar-first unit quaternion ``(a, b, c, d)``) and every
detector pixel with sample-frame direction ``v`` (:func:`dpm.detector.direction_vectors`),
the pattern intensity is the master pattern at the crystal direction
``R(q) v``: square-Lambert coordinates of that direction, bilinear
interpolation on the grid of the hemisphere that holds it (northern for
``z >= 0``), exactly as kikuchipy's ``EBSDMasterPattern.get_patterns`` and
EMsoft do. Each pattern is then made zero-mean and unit-norm over its pixels,
the form dictionary matching needs.

:func:`project_vectors` is the kernel contract: a numba kernel on the CPU, and
``kernels/project.cu`` on a GPU (CuPy arrays in, CuPy arrays out).
:func:`project` is the public entry point over dpm/kikuchipy/orix objects.
"""

from __future__ import annotations

import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numba as nb
import numpy as np

from dpm import backend
from dpm.detector import Detector, as_detector, direction_vectors
from dpm.master import MasterPattern
from dpm.master.lambert import filter_hemispheres, vector_to_lambert_scalar

if TYPE_CHECKING:
    from kikuchipy.detectors import EBSDDetector
    from orix.quaternion import Rotation

#: Orientations projected by one CUDA block; equals DPM_PROJECT_TILE in kernels/project.cu.
_ORIENTATIONS_PER_BLOCK = 4
#: Largest CUDA block (threads); see the launch comment in :func:`_project_cuda`.
_MAX_BLOCK = 256
#: A row whose standard deviation is at most this fraction of its mean (16
#: float32 ulps) is constant up to rounding and is returned as zeros.
_CONSTANT_RTOL = 16.0 * float(np.finfo(np.float32).eps)

#: Master-pattern hemispheres uploaded to a device, per MasterPattern object.
_DEVICE_MASTERS: weakref.WeakKeyDictionary[MasterPattern, tuple[ModuleType, Any, Any]] = (
    weakref.WeakKeyDictionary())


@nb.njit(inline="always", cache=True)
def rotation_matrix_scalar(a: float, b: float, c: float, d: float) -> tuple:  # pragma: no cover
    """Row-major active rotation matrix of quaternion ``(a, b, c, d)`` (any norm), in float64.

    The CPU twin of the kernels' rotation: ``u = R v`` takes a sample-frame
    direction to the crystal frame (orix convention).
    """
    a, b, c, d = np.float64(a), np.float64(b), np.float64(c), np.float64(d)
    s = 1.0 / (a * a + b * b + c * c + d * d)
    return ((a * a + b * b - c * c - d * d) * s, 2.0 * (b * c - a * d) * s,
            2.0 * (a * c + b * d) * s, 2.0 * (a * d + b * c) * s,
            (a * a - b * b + c * c - d * d) * s, 2.0 * (c * d - a * b) * s,
            2.0 * (b * d - a * c) * s, 2.0 * (a * b + c * d) * s,
            (a * a - b * b - c * c + d * d) * s)


@nb.njit(inline="always", cache=True)
def lambert_cell(side: int, a: float, b: float) -> tuple[int, int, int, int, float, float]:  # pragma: no cover
    """Grid cell of Lambert point ``(a, b)`` on a ``side²`` grid, as kikuchipy and EMsoft.

    Returns ``(r0, c0, r1, c1, dy, dx)``: the rows and columns of the four
    nodes (clamped to the grid) and the fractional offsets for bilinear weights.
    """
    last = side - 1
    half = 0.5 * last
    xp = min(max(half * a + half, 0.0), last)
    yp = min(max(half * b + half, 0.0), last)
    c0 = int(xp)
    r0 = int(yp)
    c1 = c0 + 1 if c0 + 1 < side else c0
    r1 = r0 + 1 if r0 + 1 < side else r0
    return r0, c0, r1, c1, yp - r0, xp - c0


@nb.njit(parallel=True, fastmath=True, cache=True)
def _project_numba(northern: np.ndarray, southern: np.ndarray, vectors: np.ndarray,
                   quaternions: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (numba)
    """CPU twin of ``kernels/project.cu``: fill ``out`` (n, npix) in place.

    One parallel iteration per orientation: rotation matrix, then for every
    pixel rotate, Lambert-project, interpolate and accumulate the row's sums
    of I and I² (float64), then normalise the row in place.
    """
    n = quaternions.shape[0]
    npix = vectors.shape[0]
    side = northern.shape[0]
    for i in nb.prange(n):
        m00, m01, m02, m10, m11, m12, m20, m21, m22 = rotation_matrix_scalar(
            quaternions[i, 0], quaternions[i, 1], quaternions[i, 2], quaternions[i, 3])
        total = 0.0
        total2 = 0.0
        for p in range(npix):
            x = np.float64(vectors[p, 0])
            y = np.float64(vectors[p, 1])
            z = np.float64(vectors[p, 2])
            xc = m00 * x + m01 * y + m02 * z
            yc = m10 * x + m11 * y + m12 * z
            zc = m20 * x + m21 * y + m22 * z
            la, lb = vector_to_lambert_scalar(xc, yc, zc)
            r0, c0, r1, c1, dy, dx = lambert_cell(side, la, lb)
            mp = northern if zc >= 0.0 else southern
            value = np.float32(mp[r0, c0] * (1.0 - dy) * (1.0 - dx)
                               + mp[r1, c0] * dy * (1.0 - dx)
                               + mp[r0, c1] * (1.0 - dy) * dx
                               + mp[r1, c1] * dy * dx)
            out[i, p] = value
            value64 = np.float64(value)
            total += value64
            total2 += value64 * value64
        mean = total / npix
        var = max(total2 / npix - mean * mean, 0.0)
        tol = _CONSTANT_RTOL * mean
        inv_norm = 0.0 if var <= tol * tol else 1.0 / np.sqrt(var * npix)
        mean32 = np.float32(mean)
        inv32 = np.float32(inv_norm)
        for p in range(npix):
            out[i, p] = (out[i, p] - mean32) * inv32


def project_vectors(northern: Any, southern: Any, vectors: Any, quaternions: Any, *,
                    out: Any = None) -> Any:
    """Zero-mean, unit-norm patterns of a master pattern for given pixel directions.

    Runs the numba kernel for NumPy inputs and ``kernels/project.cu`` for
    CuPy inputs (chosen by ``backend.namespace(quaternions)``); all arrays
    must live on the same device.

    Parameters
    ----------
    northern, southern : (2 npx + 1, 2 npx + 1) float32 array
        Master pattern hemispheres (``z >= 0`` and ``z < 0`` in the crystal
        frame), ``[row, col] = [Lambert y, Lambert x]``.
    vectors : (npix, 3) float32 array
        Unit vectors of the detector pixels in the sample frame.
    quaternions : (n, 4) float32 array
        Unit quaternions ``(a, b, c, d)``, rotations from the sample to the
        crystal frame (orix ``Rotation.data``); normalised in the kernel.
    out : (n, npix) float32 array, optional
        C-contiguous output buffer on the same device, overwritten.

    Returns
    -------
    patterns : (n, npix) float32 array
        Row ``i`` is the pattern of orientation ``i``, zero-mean and unit L2
        norm over its ``npix`` pixels; a constant pattern gives a row of zeros.

    Raises
    ------
    ValueError
        On wrong shapes, dtypes of ``out``, or ``npix == 0``.
    TypeError
        If the arrays are not all on the device of ``quaternions``.
    """
    xp = backend.namespace(quaternions)
    north = _kernel_input(xp, "northern", northern, 2)
    south = _kernel_input(xp, "southern", southern, 2)
    vecs = _kernel_input(xp, "vectors", vectors, 2)
    quats = _kernel_input(xp, "quaternions", quaternions, 2)
    side = north.shape[0]
    if north.shape != (side, side) or side % 2 != 1:
        raise ValueError(f"Expected `northern` to have shape (2 npx + 1, 2 npx + 1), got {north.shape}")
    if south.shape != north.shape:
        raise ValueError(f"Expected `southern` to have shape {north.shape}, got {south.shape}")
    if vecs.shape[1] != 3 or vecs.shape[0] == 0:
        raise ValueError(f"Expected `vectors` to have shape (npix, 3) with npix > 0, got {vecs.shape}")
    if quats.shape[1] != 4:
        raise ValueError(f"Expected `quaternions` to have shape (n, 4), got {quats.shape}")
    n, npix = quats.shape[0], vecs.shape[0]
    if out is None:
        out = xp.empty((n, npix), dtype=xp.float32)
    else:
        _check_same_device(xp, "out", out)
        if out.shape != (n, npix) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(
                f"Expected `out` to be a C-contiguous float32 array of shape {(n, npix)}, "
                f"got {out.dtype} {out.shape} (C-contiguous: {out.flags.c_contiguous})")
    if n == 0:
        return out
    if xp is np:
        _project_numba(north, south, vecs, quats, out)
    else:
        _project_cuda(north, south, vecs, quats, out)
    return out


def _project_cuda(northern: Any, southern: Any, vectors: Any, quaternions: Any, out: Any) -> None:
    """Launch ``kernels/project.cu::project_patterns``; writes ``out`` in place."""
    for name, arr in (("northern", northern), ("southern", southern), ("vectors", vectors),
                      ("quaternions", quaternions), ("out", out)):
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            raise ValueError(f"kernel argument `{name}` must be C-contiguous float32, "
                             f"got {arr.dtype} (C-contiguous: {arr.flags.c_contiguous})")
    n, npix = out.shape
    side = northern.shape[0]
    kernel = backend.load_kernel("project", "project_patterns")
    # One block projects _ORIENTATIONS_PER_BLOCK (= 4) orientations, so each
    # direction vector loaded from global memory serves 4 patterns; a thread
    # walks the pixels p = t, t + block, ... of those 4 rows (consecutive
    # threads -> consecutive pixels: coalesced loads and stores), then the
    # block reduces the rows' sums of I and I² in shared memory and the same
    # threads normalise their pixels in place. The block size is a power of
    # two (the tree reduction needs it): 256 threads for real patterns
    # (60 x 60 = 3600 px -> 14 px per thread; 16 KB of double partial sums
    # lets 8+ blocks share an SM), fewer for tiny patterns so no warp idles.
    # Buffer written in place: `out` only.
    block = min(_MAX_BLOCK, max(32, 1 << (npix - 1).bit_length()))
    grid = (n + _ORIENTATIONS_PER_BLOCK - 1) // _ORIENTATIONS_PER_BLOCK
    shared = 2 * _ORIENTATIONS_PER_BLOCK * block * np.dtype(np.float64).itemsize
    kernel((grid,), (block,),
           (northern, southern, np.int32(side), vectors, np.int32(npix),
            quaternions, np.int32(n), out),
           shared_mem=shared)


def project(master: MasterPattern, detector: Detector | EBSDDetector, rotations: Rotation | Any,
            *, mask: Any = None, device: str | None = None) -> Any:
    """Simulated patterns of a master pattern for a batch of orientations.

    Parameters
    ----------
    master
        One energy of a master pattern (:class:`dpm.master.MasterPattern`).
    detector
        dpm :class:`~dpm.detector.Detector` or kikuchipy ``EBSDDetector``
        (one PC): pattern shape ``(sy, sx)``, PC, sample and detector tilts.
    rotations
        orix ``Rotation``/``Orientation`` (any shape, flattened in C order) or
        an ``(n, 4)`` NumPy/CuPy array of unit quaternions ``(a, b, c, d)``;
        rotations from the sample to the crystal frame.
    mask : (sy, sx) bool array, optional
        Signal mask: True where a pixel is used. Pixels outside it are 0, and
        each pattern's mean and norm are taken over the masked pixels only.
    device
        ``"cpu"``, ``"gpu"`` or ``"auto"``. None: the device of ``rotations``
        when it is a GPU array, else ``DPM_DEVICE`` (default ``"auto"``).

    Returns
    -------
    patterns : (n, sy, sx) float32 array
        On the chosen device. Each pattern is zero-mean and unit-norm over the
        (masked) pixels; a constant pattern is all zeros.

    Raises
    ------
    TypeError
        If ``master``, ``detector`` or ``rotations`` has the wrong type.
    ValueError
        On a wrong quaternion shape, non-finite or zero quaternions, or a mask
        of the wrong shape/dtype or selecting no pixel.

    Examples
    --------
    >>> from orix.quaternion import Rotation
    >>> from dpm.detector import Detector
    >>> det = Detector((60, 60), pc=(0.42, 0.21, 0.50), tilt=0.0)
    >>> patterns = project(master, det, Rotation.random(10))   # doctest: +SKIP
    >>> patterns.shape                                          # doctest: +SKIP
    (10, 60, 60)
    """
    if not isinstance(master, MasterPattern):
        raise TypeError(f"Expected `master` to be a dpm MasterPattern, got {type(master).__name__}")
    det = as_detector(detector)
    if device is None and backend.is_device_array(rotations):
        xp = backend.namespace(rotations)
    else:
        xp = backend.array_module(device)
    quats = _quaternions(xp, rotations)
    vectors = direction_vectors(det, dtype=np.float32)
    sy, sx = det.shape
    index = None
    if mask is not None:
        mask_host = backend.to_host(mask)
        if mask_host.shape != det.shape or mask_host.dtype != bool:
            raise ValueError(f"Expected `mask` to be a bool array of shape {det.shape}, "
                             f"got {mask_host.dtype} {mask_host.shape}")
        index = np.flatnonzero(mask_host)
        if index.size == 0:
            raise ValueError("`mask` selects no pixel: at least one must be True")
        vectors = vectors[index]
    north, south = master_on_device(xp, master)
    rows = project_vectors(north, south, xp.asarray(vectors), quats)
    n = rows.shape[0]
    if index is None:
        return rows.reshape(n, sy, sx)
    patterns = xp.zeros((n, sy * sx), dtype=xp.float32)
    patterns[:, xp.asarray(index)] = rows
    return patterns.reshape(n, sy, sx)


def _quaternions(xp: ModuleType, rotations: Any) -> Any:
    """(n, 4) C-contiguous float32 quaternions on ``xp``'s device."""
    data = getattr(rotations, "data", None)
    if type(rotations).__module__.startswith("orix") and isinstance(data, np.ndarray):
        quats = data.reshape(-1, 4)
    elif isinstance(rotations, np.ndarray) or backend.is_device_array(rotations):
        quats = rotations
        if quats.ndim != 2 or quats.shape[1] != 4:
            raise ValueError(f"Expected `rotations` to have shape (n, 4), got {quats.shape}")
    else:
        raise TypeError(f"Expected `rotations` to be an orix Rotation or an (n, 4) quaternion "
                        f"array, got {type(rotations).__name__}")
    if not backend.is_device_array(quats):  # value checks only where they cost no device sync
        norm2 = np.einsum("ij,ij->i", quats, quats, dtype=np.float64)
        if not (np.isfinite(norm2).all() and (norm2 > 0).all()):
            raise ValueError("`rotations` contains non-finite or zero quaternions")
    if xp is np:
        return np.ascontiguousarray(backend.to_host(quats), dtype=np.float32)
    return xp.ascontiguousarray(xp.asarray(quats), dtype=xp.float32)


def master_on_device(xp: ModuleType, master: MasterPattern) -> tuple[Any, Any]:
    """The hemispheres on ``xp``'s device, uploaded once per MasterPattern object."""
    if xp is np:
        return master.northern, master.southern
    cached = _DEVICE_MASTERS.get(master)
    if cached is not None and cached[0] is xp:
        return cached[1], cached[2]
    north = xp.ascontiguousarray(xp.asarray(master.northern), dtype=xp.float32)
    south = xp.ascontiguousarray(xp.asarray(master.southern), dtype=xp.float32)
    _DEVICE_MASTERS[master] = (xp, north, south)
    return north, south


def _check_same_device(xp: ModuleType, name: str, array: Any) -> None:
    on_device = backend.is_device_array(array)
    if on_device != (xp is not np):
        where, other = ("GPU", "host") if xp is not np else ("host", "GPU")
        raise TypeError(f"Expected `{name}` on the {where} like `quaternions`, got a {other} array "
                        f"({type(array).__name__})")


def _kernel_input(xp: ModuleType, name: str, array: Any, ndim: int) -> Any:
    """``array`` as a C-contiguous float32 array of ``ndim`` dims on ``xp``'s device."""
    _check_same_device(xp, name, array)
    if array.ndim != ndim:
        raise ValueError(f"Expected `{name}` to have {ndim} dimensions, got shape {array.shape}")
    return xp.ascontiguousarray(array, dtype=xp.float32)


def pixel_angle(detector: Detector | EBSDDetector) -> float:
    """Mean angle between the directions of neighbouring detector pixels, in radians.

    A pixel of a binned camera integrates the intensity over this angular
    extent; it shrinks towards the detector edges (oblique incidence), so the
    mean over all horizontal and vertical neighbour pairs is used.
    """
    det = as_detector(detector)
    v = direction_vectors(det).reshape(*det.shape, 3)
    along_x = np.einsum("ijk,ijk->ij", v[:, 1:], v[:, :-1])
    along_y = np.einsum("ijk,ijk->ij", v[1:], v[:-1])
    cosines = np.concatenate([along_x.ravel(), along_y.ravel()])
    return float(np.arccos(np.clip(cosines, -1.0, 1.0)).mean())


def integrate_pixels(master: MasterPattern, detector: Detector | EBSDDetector,
                     orientation_spread: float = 0.0) -> MasterPattern:
    """Low-pass a master pattern to the angular size of the detector's pixels.

    A camera pixel (after binning) records the mean intensity over its solid
    angle, while a projection samples the master pattern at the pixel centre.
    Dynamical master patterns carry fine detail (thin Kikuchi lines, band-edge
    fringes) far below a binned pixel's 1–2°, which point sampling aliases
    into the dictionary. Filtering each Lambert hemisphere with a Gaussian
    whose σ equals that of a box one pixel wide (``pixel_angle / sqrt(12)``),
    in Lambert pixels of ``sqrt(2 pi) / (2 npx + 1)`` rad (the grid is equal
    area), makes point samples approximate pixel means. Across the equator the
    filter continues into the other hemisphere.

    A dictionary entry also stands for every orientation of its grid cell:
    ``orientation_spread`` (σ in degrees) widens the filter in quadrature so an
    entry is the mean pattern of its cell rather than a pattern that
    decorrelates within a fraction of the grid spacing (a sharp 20 kV Li
    pattern keeps NCC 0.2 at 2° from its orientation).

    Parameters
    ----------
    master
        Master pattern to filter (not modified).
    detector
        Detector whose pixel size sets the filter width.
    orientation_spread
        Additional Gaussian σ in degrees (0: pixel integration only).

    Returns
    -------
    MasterPattern
        Filtered copy; ``params["dictionary_filter_sigma"]`` records σ in
        Lambert pixels.
    """
    from dataclasses import replace

    from scipy import ndimage

    if orientation_spread < 0:
        raise ValueError(f"orientation_spread must be >= 0 degrees, got {orientation_spread}")
    lambert_pixel = np.sqrt(2 * np.pi) / (2 * master.npx + 1)
    sigma = np.hypot(pixel_angle(detector) / np.sqrt(12.0),
                     np.deg2rad(orientation_spread)) / lambert_pixel
    if sigma < 0.3:  # the master pattern is already coarser than the pixels
        return master
    north, south = filter_hemispheres(
        master.northern, master.southern,
        lambda a: ndimage.gaussian_filter(a, sigma, mode="nearest"), pad=int(np.ceil(4 * sigma)))
    return replace(master, northern=north, southern=south,
                   params={**master.params, "dictionary_filter_sigma": float(sigma)})
