"""The EBSD detector: geometry of the screen relative to the sample.

:class:`Detector` follows kikuchipy's ``EBSDDetector`` conventions exactly, so a
kikuchipy detector and a dpm detector built from the same numbers see the same
pattern (:func:`as_detector` accepts either). The projection centre (PC) is
stored in Bruker's convention; :meth:`Detector.from_pc` converts from the
EDAX/TSL, Oxford and EMsoft conventions.

:func:`direction_vectors` gives, for every detector pixel, the unit vector
from the beam spot on the sample to that pixel in the sample frame: the input
of :mod:`dpm.projection`.

Frames
------
*Detector frame* (``X_d, Y_d, Z_d``): the pattern is viewed from the detector
towards the sample; ``X_d`` points right along the pattern columns, ``Y_d`` up
(against the row index), ``Z_d`` from the screen towards the sample.

*Sample frame* (``X_s, Y_s, Z_s``): orix/kikuchipy's, with ``Z_s`` the sample
surface normal. With the default angles (sample tilt 70°, detector tilt 0°) the
detector basis in sample coordinates is ``X_d = (0, 1, 0)``,
``Y_d = (-cos 20°, 0, sin 20°)``, ``Z_d = (sin 20°, 0, cos 20°)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kikuchipy.detectors import EBSDDetector

#: PC conventions understood by :meth:`Detector.from_pc` (kikuchipy's names).
PC_CONVENTIONS: tuple[str, ...] = (
    "bruker", "tsl", "edax", "amatek", "oxford", "aztec", "emsoft", "emsoft4", "emsoft5",
)


@dataclass(frozen=True)
class Detector:
    r"""An EBSD detector: pattern shape, projection centre and tilts (kikuchipy conventions).

    Parameters
    ----------
    shape
        ``(sy, sx)``: number of rows :math:`N_y` and columns :math:`N_x` of
        the (binned) patterns, in pixels.
    pc
        Projection centre ``(PCx, PCy, PCz)`` in **Bruker's** convention:
        PCx is the beam spot's horizontal position as a fraction of the
        pattern width :math:`N_x`, measured from the left edge; PCy its
        vertical position as a fraction of the pattern height :math:`N_y`,
        measured from the *top* edge; PCz the sample-to-screen distance as a
        fraction of :math:`N_y`. Must be finite with ``PCz > 0`` (the sample
        in front of the screen). PCx, PCy outside ``[0, 1]`` (beam spot
        projected beyond the screen edge, e.g. a cropped detector) are
        allowed. Use :meth:`from_pc` for the other conventions.
    sample_tilt
        Sample tilt :math:`\sigma` about the microscope :math:`X_m` axis, in
        degrees (default 70°).
    tilt
        Detector tilt :math:`\theta` about the detector horizontal
        :math:`X_d`, in degrees (default 0°). A positive angle moves features
        on the pattern upward.
    azimuthal
        Detector tilt :math:`\omega` about the detector vertical :math:`Y_d`,
        in degrees (default 0°). A positive angle moves features to the right.
    twist
        Detector rotation :math:`\gamma` about the detector normal
        :math:`Z_d`, in degrees (default 0°). A positive angle moves features
        counter-clockwise about the PC.
    binning
        Binning factor :math:`b` of the patterns (default 1). Used only by the
        EMsoft PC conversion and to describe the unbinned detector.
    px_size
        Size :math:`\delta` of the square *unbinned* detector pixel, in µm
        (default 1.0). Used only by the EMsoft PC conversion.

    Raises
    ------
    ValueError
        If ``shape`` is not two positive integers, the PC is not three finite
        numbers with ``PCz > 0``, an angle is not finite, ``binning`` is not a
        positive integer or ``px_size`` is not positive.

    Examples
    --------
    >>> from dpm.detector import Detector, direction_vectors
    >>> det = Detector((60, 60), pc=(0.42, 0.21, 0.50))
    >>> direction_vectors(det).shape
    (3600, 3)
    """

    shape: tuple[int, int]
    pc: tuple[float, float, float]
    sample_tilt: float = 70.0
    tilt: float = 0.0
    azimuthal: float = 0.0
    twist: float = 0.0
    binning: int = 1
    px_size: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _parse_shape(self.shape))
        object.__setattr__(self, "pc", _parse_pc(self.pc))
        for name in ("sample_tilt", "tilt", "azimuthal", "twist"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"Expected `{name}` to be a finite angle in degrees, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not _is_int(self.binning) or self.binning < 1:
            raise ValueError(f"Expected `binning` to be a positive integer, got {self.binning!r}")
        object.__setattr__(self, "binning", int(self.binning))
        if not _is_real(self.px_size) or not (math.isfinite(self.px_size) and self.px_size > 0):
            raise ValueError(f"Expected `px_size` to be a positive size in µm, got {self.px_size!r}")
        object.__setattr__(self, "px_size", float(self.px_size))

    @property
    def size(self) -> int:
        """Number of pattern pixels ``sy * sx``."""
        return self.shape[0] * self.shape[1]

    @classmethod
    def from_pc(
        cls,
        pc: Any,
        convention: str = "bruker",
        *,
        shape: tuple[int, int],
        sample_tilt: float = 70.0,
        tilt: float = 0.0,
        azimuthal: float = 0.0,
        twist: float = 0.0,
        binning: int = 1,
        px_size: float = 1.0,
    ) -> Detector:
        r"""Build a detector from a PC given in any vendor's convention.

        Parameters
        ----------
        pc : (3,) array_like
            Projection centre in ``convention``:

            * ``"bruker"``: fractions of :math:`(N_x, N_y, N_y)` from the top left;
            * ``"tsl"``/``"edax"``/``"amatek"``: fractions of
              :math:`(N_x, N_y, \min(N_x, N_y))` from the bottom left,
              :math:`y_B = 1 - y_T`, :math:`z_B = z_T \min(N_x, N_y) / N_y`;
            * ``"oxford"``/``"aztec"``: fractions of :math:`N_x` from the bottom
              left, :math:`y_B = 1 - y_O N_x / N_y`, :math:`z_B = z_O N_x / N_y`;
            * ``"emsoft"``/``"emsoft5"``: ``(x_pc, y_pc)`` in unbinned pixels
              from the detector centre (right, up) and ``L`` in µm,
              :math:`x_B = 1/2 - x_{pc}/(N_x b)`, :math:`y_B = 1/2 - y_{pc}/(N_y b)`,
              :math:`z_B = L / (N_y b \delta)`; ``"emsoft4"`` has :math:`x_{pc}`
              pointing left.
        convention
            One of :data:`PC_CONVENTIONS` (case-insensitive).
        shape, sample_tilt, tilt, azimuthal, twist, binning, px_size
            As for :class:`Detector`.

        Raises
        ------
        ValueError
            If the convention is unknown, or the converted detector is invalid.
        """
        conv = str(convention).lower()
        if conv not in PC_CONVENTIONS:
            raise ValueError(f"Expected `convention` to be one of {PC_CONVENTIONS}, got {convention!r}")
        pc_in = np.asarray(pc, dtype=float)
        if pc_in.shape != (3,):
            raise ValueError(f"Expected `pc` to have shape (3,), got {pc_in.shape}")
        shape = _parse_shape(shape)
        if conv != "bruker":
            from kikuchipy.detectors import EBSDDetector

            kp_det = EBSDDetector(shape=shape, pc=pc_in, convention=conv,
                                  binning=binning, px_size=px_size)
            pc_in = kp_det.pc[0]
        return cls(shape, tuple(pc_in), sample_tilt=sample_tilt, tilt=tilt,
                   azimuthal=azimuthal, twist=twist, binning=binning, px_size=px_size)

    def pc_in(self, convention: str = "bruker") -> np.ndarray:
        """The PC in another convention (see :meth:`from_pc` for the definitions).

        Returns
        -------
        pc : (3,) float64 array
        """
        conv = str(convention).lower()
        if conv not in PC_CONVENTIONS:
            raise ValueError(f"Expected `convention` to be one of {PC_CONVENTIONS}, got {convention!r}")
        if conv == "bruker":
            return np.array(self.pc)
        det = self.to_kikuchipy()
        if conv in ("tsl", "edax", "amatek"):
            pc = det.pc_tsl()
        elif conv in ("oxford", "aztec"):
            pc = det.pc_oxford()
        else:
            pc = det.pc_emsoft(version=4 if conv == "emsoft4" else 5)
        return np.asarray(pc, dtype=float).reshape(3)

    @classmethod
    def from_kikuchipy(cls, detector: EBSDDetector) -> Detector:
        """Build from a kikuchipy ``EBSDDetector`` with one PC (or all PCs equal).

        Raises
        ------
        ValueError
            If the kikuchipy detector holds several different PCs: a dpm
            detector has one; pass ``detector.pc_average`` to a new detector
            to use the mean.
        """
        pcs = np.asarray(detector.pc, dtype=float).reshape(-1, 3)
        if not np.all(pcs == pcs[0]):
            raise ValueError(
                f"a dpm Detector holds one PC, but the kikuchipy detector has "
                f"{len(pcs)} different PCs (navigation shape {detector.navigation_shape}); "
                f"build it from `detector.pc_average` to use their mean")
        return cls(tuple(int(s) for s in detector.shape), tuple(pcs[0]),
                   sample_tilt=detector.sample_tilt, tilt=detector.tilt,
                   azimuthal=detector.azimuthal, twist=detector.twist,
                   binning=detector.binning, px_size=detector.px_size)

    def to_kikuchipy(self) -> EBSDDetector:
        """Return the equivalent kikuchipy ``EBSDDetector`` (PC in Bruker's convention)."""
        from kikuchipy.detectors import EBSDDetector

        return EBSDDetector(shape=self.shape, pc=self.pc, convention="bruker",
                            sample_tilt=self.sample_tilt, tilt=self.tilt,
                            azimuthal=self.azimuthal, twist=self.twist,
                            binning=self.binning, px_size=self.px_size)


def as_detector(obj: Detector | EBSDDetector) -> Detector:
    """Return ``obj`` as a dpm :class:`Detector` (accepts a kikuchipy ``EBSDDetector``).

    Raises
    ------
    TypeError
        If ``obj`` is neither.
    """
    if isinstance(obj, Detector):
        return obj
    if type(obj).__name__ == "EBSDDetector" and type(obj).__module__.startswith("kikuchipy"):
        return Detector.from_kikuchipy(obj)
    raise TypeError(
        f"Expected `detector` to be a dpm Detector or a kikuchipy EBSDDetector, "
        f"got {type(obj).__name__}")


def sample_to_detector_matrix(detector: Detector | EBSDDetector) -> np.ndarray:
    """Rows are the detector axes ``X_d, Y_d, Z_d`` in sample-frame coordinates.

    So ``M @ v_sample = v_detector`` and ``M.T @ v_detector = v_sample``.
    Built, as in kikuchipy, by rotating the basis ``X_d = Y_s``,
    ``Y_d = Z_s``, ``Z_d = X_s`` (a vertical screen facing a flat sample)
    successively by ``-sample_tilt`` about ``X_d``, ``tilt`` about ``X_d``,
    ``-azimuthal`` about ``Y_d`` and ``-twist`` about ``Z_d`` (Rodrigues'
    formula, each axis taken from the current basis).

    Returns
    -------
    m : (3, 3) float64 array
    """
    det = as_detector(detector)
    basis = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    steps = ((0, -det.sample_tilt), (0, det.tilt), (1, -det.azimuthal), (2, -det.twist))
    for axis, angle_deg in steps:
        u = basis[axis] / np.linalg.norm(basis[axis])
        angle = math.radians(angle_deg)
        c, s = math.cos(angle), math.sin(angle)
        basis = (basis * c + np.cross(u, basis) * s
                 + np.outer(basis @ u, u) * (1.0 - c))
    return basis


def direction_vectors(detector: Detector | EBSDDetector, *, dtype: Any = np.float64) -> np.ndarray:
    """Unit vectors from the beam spot to every detector pixel, in the sample frame.

    For pattern pixel ``(r, c)`` the point on the screen, in the detector
    frame and units of the pattern height :math:`N_y`, is
    ``x_d = (c + 0.5 - PCx N_x) / N_y``, ``y_d = (PCy N_y - r - 0.5) / N_y``,
    ``z_d = PCz``; it is rotated to the sample frame with
    :func:`sample_to_detector_matrix` and normalised. The same numbers as
    kikuchipy's ``_get_direction_cosines_for_fixed_pc``.

    Parameters
    ----------
    detector
        A dpm :class:`Detector` or a kikuchipy ``EBSDDetector`` (one PC).
    dtype
        Output float dtype (float64 or float32).

    Returns
    -------
    v : (sy * sx, 3) array
        Row-major pixel order: row ``r * sx + c`` is pixel ``(r, c)``.
    """
    det = as_detector(detector)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected `dtype` to be float32 or float64, got {dtype}")
    sy, sx = det.shape
    pcx, pcy, pcz = det.pc
    x = (np.arange(sx) + 0.5 - pcx * sx) / sy
    y = (pcy * sy - np.arange(sy) - 0.5) / sy
    v_det = np.empty((sy, sx, 3))
    v_det[..., 0] = x[None, :]
    v_det[..., 1] = y[:, None]
    v_det[..., 2] = pcz
    v = v_det.reshape(-1, 3) @ sample_to_detector_matrix(det)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(dtype, copy=False)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _parse_shape(shape: Any) -> tuple[int, int]:
    try:
        items = tuple(shape)
    except TypeError:
        items = ()
    if len(items) != 2 or not all(_is_int(s) and s > 0 for s in items):
        raise ValueError(
            f"Expected `shape` to be two positive integers (rows, columns), got {shape!r}")
    return int(items[0]), int(items[1])


def _parse_pc(pc: Any) -> tuple[float, float, float]:
    arr = np.asarray(pc, dtype=float) if not isinstance(pc, str) else np.array([])
    if arr.shape != (3,):
        raise ValueError(
            f"Expected `pc` to be three numbers (PCx, PCy, PCz), got shape {arr.shape}: {pc!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"Expected a finite PC, got {tuple(arr.tolist())}")
    if arr[2] <= 0:
        raise ValueError(
            f"Expected PCz > 0 (sample in front of the screen), got PC {tuple(arr.tolist())}")
    return float(arr[0]), float(arr[1]), float(arr[2])
