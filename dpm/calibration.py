"""Pattern-centre calibration: the PC field of a map over beam position.

As the beam scans a tilted sample, the source point of the patterns moves
relative to the detector, so the pattern centre (PC, Bruker convention: PCx
and PCy fractions of the pattern width and height, PCz of its height) is a
field over the map, not one point. For a flat sample, a beam step ``Δx``
along the map's x moves the source parallel to the screen's x axis and a step
``Δy`` along the map's y moves it in the plane of the beam and the detector
normal, at the angle ``α = 90° − σ + θ`` (sample tilt ``σ``, detector tilt
``θ``) to the screen (Singh et al. 2017, J. Appl. Cryst. 50, 1664,
appendix A; kikuchipy's ``EBSDDetector.extrapolate_pc``)::

    PCx = PCx0 − (x − x0) Δ / (δ b Nx)
    PCy = PCy0 − (y − y0) Δ cos α / (δ b Ny)
    PCz = PCz0 + (y − y0) Δ sin α / (δ b Ny)

with the length ``Δ`` of one map unit on the sample, detector pixel size
``δ`` (unbinned), binning ``b`` and pattern shape ``(Ny, Nx)``; x to the right
and y down the map, as its rows and columns. So PCx is linear in x alone, PCy in y alone, and PCz follows
PCy with the slope ``−tan α`` (−0.364 at 70° sample tilt and 0° detector
tilt). :func:`pattern_centre_field` builds that field from the geometry;
:func:`fit_pattern_centre_field` fits it to PCs refined at calibration
patterns (the ``"constrained"`` model, 5 parameters: the PC at the map
centre and the two gradients), or fits each component as a free affine
plane over the map (``"plane"``, 9 parameters), or takes one PC
(``"constant"``), rejecting outliers by their robust residuals.
:func:`calibrate_pattern_centre_field` refines the field jointly on the
calibration patterns' NCCs; when no PC is known at all,
:func:`search_pattern_centre` first finds one in a search box
(:class:`PCSearchConfig`).

Beam positions are in the map's own units (µm for a map with a step size,
map pixels otherwise); gradients are PC units per that unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dpm.detector import Detector

PCFieldModel = Literal["constrained", "plane", "constant"]
#: The field models.
MODELS: tuple[str, ...] = ("constrained", "plane", "constant")
#: Robust scale (1.4826 MAD) below which residuals count as exact, in PC units.
_RESIDUAL_FLOOR = 1e-6


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PCFieldConfig:
    """How a PC field is fitted.

    Attributes
    ----------
    model
        ``"constrained"`` (default: PCx linear in x, PCy linear in y, PCz
        tied to PCy by ``−tan α``), ``"plane"`` (each component a free
        affine function of x and y) or ``"constant"`` (one PC).
    outlier_limit
        A calibration PC is an outlier when one of its residuals exceeds this
        many robust standard deviations (1.4826 × MAD) of that component's
        residuals; the fit is repeated without the outliers.
    max_passes
        Most fit-and-reject passes.
    significance
        :func:`calibrate_pattern_centre_field` keeps a gradient of the field
        only when it lies at least this many standard errors from zero (the
        sandwich covariance of :func:`dpm.refine.linear_pattern_centre_covariance`);
        the others are set to zero and the rest refitted, so a map that does
        not drift measurably gets a flat field. 0 keeps every gradient.
    """

    model: PCFieldModel = "constrained"
    outlier_limit: float = 4.0
    max_passes: int = 5
    significance: float = 3.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"PC field model must be one of {MODELS}, got {self.model!r}")
        if not np.isfinite(self.outlier_limit) or self.outlier_limit <= 0:
            raise ValueError(f"outlier_limit must be a positive number of standard "
                             f"deviations, got {self.outlier_limit!r}")
        _check_positive_int("max_passes", self.max_passes)
        if not np.isfinite(self.significance) or self.significance < 0:
            raise ValueError(f"significance must be a number of standard errors >= 0, got "
                             f"{self.significance!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """How ``dpm index`` calibrates the PC field of a map (:func:`dpm.pipeline.index`).

    Attributes
    ----------
    grid
        Cells ``(rows, columns)`` the map is split into; each gives at most
        one calibration pattern.
    window
        Pixels ``window × window`` read at the centre of each cell: the one
        of highest band contrast that diffracts (band contrast above the
        zero-solution threshold) calibrates. Only these pixels are read and
        preprocessed before the chunks, so the cost stays a small fraction of
        the map's.
    min_patterns
        Calibration patterns (after outlier rejection) below which the field
        is not fitted: the run keeps the given PC and warns.
    dictionary_tolerance
        When the fitted field's PC at the map centre differs from the given
        PC by more than this in any component, the dictionary is projected at
        the fitted one; otherwise the given PC's dictionary (projected for the
        calibration's own matching) is kept, and each pattern's offset from it
        is corrected in refinement.
    field
        Model and outlier rejection of the fit (``model`` is set from
        ``IndexConfig.pc_field``).
    """

    grid: tuple[int, int] = (8, 8)
    window: int = 3
    min_patterns: int = 8
    dictionary_tolerance: float = 0.005
    field: PCFieldConfig = PCFieldConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"calibration grid must be two positive cell counts, got {self.grid}")
        for name in ("window", "min_patterns"):
            _check_positive_int(f"calibration {name}", getattr(self, name))
        if not self.dictionary_tolerance >= 0:
            raise ValueError(f"dictionary_tolerance must be >= 0 PC units, got "
                             f"{self.dictionary_tolerance!r}")


@dataclass(frozen=True)
class PatternCentreField:
    """A PC field, affine in beam position.

    Attributes
    ----------
    centre : (2,) float array
        Beam position ``(x0, y0)`` the field is expanded about.
    pc : (3,) float array
        PC (Bruker) at ``centre``.
    gradient : (3, 2) float array
        ``d PC_k / d x`` and ``d PC_k / d y`` per unit of beam position.
    """

    centre: np.ndarray
    pc: np.ndarray
    gradient: np.ndarray

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """PCs at beam positions ``x``, ``y`` (same shape): ``(*shape, 3)``."""
        dx = np.asarray(x, dtype=np.float64) - self.centre[0]
        dy = np.asarray(y, dtype=np.float64) - self.centre[1]
        return (self.pc + dx[..., None] * self.gradient[:, 0]
                + dy[..., None] * self.gradient[:, 1])

    def spread(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(3,) range (max − min) of each PC component over the beam positions given."""
        pcs = self.at(x, y).reshape(-1, 3)
        return pcs.max(axis=0) - pcs.min(axis=0)


@dataclass(frozen=True)
class PCFieldFit:
    """The result of :func:`fit_pattern_centre_field`.

    Attributes
    ----------
    field
        The fitted field.
    model
        The model fitted.
    residuals : (n, 3) float array
        Calibration PC minus field, for every calibration pattern.
    inliers : (n,) bool array
        Calibration patterns the final fit used.
    rms : (3,) float array
        Root-mean-square residual of each component over the inliers.
    gradient_z : float array or None
        From :func:`calibrate_pattern_centre_field`: each gradient parameter of
        the joint fit (``"constrained"``: d PCx / dx, d PCy / dy; ``"plane"``:
        the three d / dx, then the three d / dy) over its standard error;
        those below ``PCFieldConfig.significance`` were set to zero.
    """

    field: PatternCentreField
    model: str
    residuals: np.ndarray
    inliers: np.ndarray
    rms: np.ndarray
    gradient_z: np.ndarray | None = None


def tilt_slope(sample_tilt: float, detector_tilt: float = 0.0) -> float:
    """``d PCz / d PCy`` of a beam step along the map's y: ``−tan(90° − σ + θ)``."""
    return -float(np.tan(np.deg2rad(90.0 - sample_tilt + detector_tilt)))


def pattern_centre_field(detector: Detector, centre: tuple[float, float], step: float,
                         px_size: float | None = None) -> PatternCentreField:
    """The constrained PC field of a flat sample from the geometry (Singh et al. 2017).

    Parameters
    ----------
    detector
        Detector with the PC at beam position ``centre`` (its shape, binning,
        sample and detector tilt are used).
    centre
        Beam position ``(x0, y0)`` of that PC, in map units.
    step
        Length of one map unit on the sample, in µm (the step size when
        positions are map pixels, 1 when they are µm).
    px_size
        Unbinned detector pixel size in µm (default: the detector's).

    Returns
    -------
    PatternCentreField
    """
    ny, nx = detector.shape
    screen = (detector.px_size if px_size is None else px_size) * detector.binning
    alpha = np.deg2rad(90.0 - detector.sample_tilt + detector.tilt)
    gradient = np.zeros((3, 2))
    gradient[0, 0] = -step / (screen * nx)
    gradient[1, 1] = -step * np.cos(alpha) / (screen * ny)
    gradient[2, 1] = step * np.sin(alpha) / (screen * ny)
    return PatternCentreField(np.asarray(centre, dtype=np.float64),
                              np.asarray(detector.pc, dtype=np.float64), gradient)


def fit_pattern_centre_field(x: np.ndarray, y: np.ndarray, pcs: np.ndarray, *,
                             sample_tilt: float = 70.0, detector_tilt: float = 0.0,
                             config: PCFieldConfig = PCFieldConfig()) -> PCFieldFit:
    """Fit a PC field to PCs refined at calibration patterns, rejecting outliers.

    Parameters
    ----------
    x, y : (n,) float arrays
        Beam positions of the calibration patterns (map units).
    pcs : (n, 3) float array
        Their refined PCs (Bruker).
    sample_tilt, detector_tilt
        Degrees; the constrained model's PCz–PCy slope (:func:`tilt_slope`).
    config
        Model and outlier rejection.

    Returns
    -------
    PCFieldFit
        The field is expanded about the mean position of the inliers.

    Raises
    ------
    ValueError
        For mismatched shapes, non-finite input, or fewer calibration patterns
        (after outlier rejection) than the model needs: 1 for ``"constant"``,
        3 not on one line for ``"plane"``, and for ``"constrained"`` 2 apart
        in x and 2 apart in y.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    pcs = np.asarray(pcs, dtype=np.float64)
    if pcs.shape != (len(x), 3) or y.shape != x.shape:
        raise ValueError(f"need x and y of shape (n,) and pcs of shape (n, 3); got "
                         f"{x.shape}, {y.shape} and {pcs.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and np.isfinite(pcs).all()):
        raise ValueError("calibration positions and PCs must be finite")
    slope = tilt_slope(sample_tilt, detector_tilt)
    inliers = np.ones(len(x), dtype=bool)
    for _ in range(config.max_passes):
        field = _fit(x[inliers], y[inliers], pcs[inliers], config.model, slope)
        residuals = pcs - field.at(x, y)
        # Outliers pull a least-squares field towards them: judge each residual by its
        # distance from the inliers' median, in robust standard deviations.
        keep = _agrees(residuals, inliers, config.outlier_limit)
        if np.array_equal(keep, inliers) or keep.sum() < _least_points(config.model):
            break
        inliers = keep
    rms = np.sqrt((residuals[inliers] ** 2).mean(axis=0))
    return PCFieldFit(field, config.model, residuals, inliers, rms)


def _agrees(values: np.ndarray, reference: np.ndarray, limit: float) -> np.ndarray:
    """(n,) bool: the rows of ``values`` (n, 3) within ``limit`` robust standard
    deviations (1.4826 × MAD, per column, at least :data:`_RESIDUAL_FLOOR`) of the
    median of the ``reference`` rows (a bool mask), in every column."""
    median = np.median(values[reference], axis=0)
    scale = 1.4826 * np.median(np.abs(values[reference] - median), axis=0)
    scale = np.maximum(scale, _RESIDUAL_FLOOR)
    return (np.abs(values - median) <= limit * scale).all(axis=1)


def _least_points(model: str) -> int:
    return {"constant": 1, "plane": 3, "constrained": 2}[model]


def _fit(x: np.ndarray, y: np.ndarray, pcs: np.ndarray, model: str,
         slope: float) -> PatternCentreField:
    """Least-squares field of ``model`` about the mean position of the points given."""
    n = len(x)
    if n < _least_points(model):
        raise ValueError(f"{n} calibration patterns are too few for the {model!r} PC field "
                         f"model (at least {_least_points(model)})")
    centre = np.array([x.mean(), y.mean()])
    dx, dy = x - centre[0], y - centre[1]
    gradient = np.zeros((3, 2))
    if model == "constant":
        return PatternCentreField(centre, pcs.mean(axis=0), gradient)
    if model == "plane":
        design = np.column_stack([np.ones(n), dx, dy])
        if np.linalg.matrix_rank(design) < 3:
            raise ValueError(f"the {n} calibration patterns lie on one line: a 'plane' PC "
                             "field needs them spread in x and y")
        coefficients, *_ = np.linalg.lstsq(design, pcs, rcond=None)
        return PatternCentreField(centre, coefficients[0], coefficients[1:].T)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError(f"the {n} calibration patterns do not spread in both x and y: the "
                         "'constrained' PC field needs PCx's slope in x and PCy's in y")
    # Unknowns: PCx0, PCy0, PCz0, d PCx / dx, d PCy / dy (PCz's slope in y is slope × it).
    design = np.zeros((3 * n, 5))
    design[:n, 0], design[:n, 3] = 1.0, dx
    design[n:2 * n, 1], design[n:2 * n, 4] = 1.0, dy
    design[2 * n:, 2], design[2 * n:, 4] = 1.0, slope * dy
    coefficients, *_ = np.linalg.lstsq(design, pcs.T.ravel(), rcond=None)
    gradient[0, 0] = coefficients[3]
    gradient[1, 1] = coefficients[4]
    gradient[2, 1] = slope * coefficients[4]
    return PatternCentreField(centre, coefficients[:3], gradient)


def average_same_grain(rows: Any, centre: int, usable: np.ndarray, *,
                       fraction: float = 0.5, floor: float = 0.1) -> tuple[Any, np.ndarray]:
    """Average a calibration pattern with the neighbours in its window that show the same grain.

    A 3 × 3 window of one grain holds 9 noisy copies of one pattern at PCs
    that differ by a fraction of the map's drift per pixel: their mean has 3 ×
    the signal-to-noise ratio, and for a field linear in beam position its PC
    is the field at their mean position. Neighbours are recognised by their
    NCC with the centre pattern: noisy copies of one pattern correlate at
    about the product of their NCCs with the noise-free pattern (0.16–0.30 on
    the realistic 60 × 60 synthetic maps), patterns of different grains or
    pores at most ~0.09.

    Parameters
    ----------
    rows : (w, npix) float32 array
        The window's preprocessed rows (zero mean, unit norm; NumPy or CuPy).
    centre
        Row of the calibration pattern.
    usable : (w,) bool array
        Rows that may be averaged (readable and diffracting).
    fraction, floor
        A usable row joins when its NCC with the centre is at least
        ``fraction`` times the best neighbour's and at least ``floor``; with
        no neighbour above ``floor`` the centre pattern is kept alone.

    Returns
    -------
    row : (npix,) array
        The normalised mean pattern (the centre row when nothing joined).
    members : (w,) bool array
        The rows averaged (the centre included).
    """
    from dpm import backend
    from dpm.match import prepare_patterns

    xp = backend.namespace(rows)
    ncc = np.asarray(backend.to_host(rows @ rows[centre]), dtype=np.float64)
    usable = np.asarray(usable, dtype=bool).copy()
    usable[centre] = False
    best = ncc[usable].max() if usable.any() else -np.inf
    members = usable & (ncc >= max(fraction * best, floor))
    members[centre] = True
    mean = rows[xp.asarray(np.flatnonzero(members))].mean(axis=0)
    return prepare_patterns(mean[None]).data[0], members


def select_calibration_patterns(band_contrast: np.ndarray, usable: np.ndarray,
                                grid: tuple[int, int] = (5, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Calibration patterns spread over the map: the best one of each grid cell.

    Parameters
    ----------
    band_contrast : (ny, nx) float array
        Band contrast (or any pattern quality, higher is better) of every pixel.
    usable : (ny, nx) bool array
        Pixels that may calibrate (indexed, not zero solutions, not pores).
    grid
        Cells ``(rows, columns)`` the map is split into; each gives the usable
        pixel of highest band contrast, cells without one give none.

    Returns
    -------
    rows, cols : (k,) int arrays
        Map pixels of the calibration patterns, cell by cell in row-major order.
    """
    bc = np.asarray(band_contrast, dtype=np.float64)
    usable = np.asarray(usable, dtype=bool)
    if bc.ndim != 2 or usable.shape != bc.shape:
        raise ValueError(f"band_contrast and usable must be (ny, nx) maps of one shape, got "
                         f"{bc.shape} and {usable.shape}")
    row_edges, col_edges = _cell_edges(bc.shape, grid)
    rows, cols = [], []
    for r0, r1 in zip(row_edges[:-1], row_edges[1:]):
        for c0, c1 in zip(col_edges[:-1], col_edges[1:]):
            cell = np.where(usable[r0:r1, c0:c1], bc[r0:r1, c0:c1], -np.inf)
            if np.isfinite(cell).any():
                r, c = np.unravel_index(np.argmax(cell), cell.shape)
                rows.append(r0 + r)
                cols.append(c0 + c)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def _cell_edges(map_shape: tuple[int, int], grid: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Row and column edges of the ``grid`` cells of a map (at most one cell per pixel)."""
    gy, gx = (int(v) for v in grid)
    if gy < 1 or gx < 1:
        raise ValueError(f"calibration grid must be two positive cell counts, got {grid}")
    ny, nx = map_shape
    return (np.linspace(0, ny, min(gy, ny) + 1).round().astype(int),
            np.linspace(0, nx, min(gx, nx) + 1).round().astype(int))


def calibration_windows(map_shape: tuple[int, int], grid: tuple[int, int],
                        window: int) -> list[tuple[int, int, int, int]]:
    """Map blocks ``(row0, row1, col0, col1)`` at the centre of each grid cell.

    The map is split into ``grid`` cells as :func:`select_calibration_patterns`
    splits it; each cell gives the ``window × window`` block about its centre
    (clipped to the cell), in row-major cell order.
    """
    row_edges, col_edges = _cell_edges(map_shape, grid)
    blocks = []
    for r0, r1 in zip(row_edges[:-1], row_edges[1:]):
        for c0, c1 in zip(col_edges[:-1], col_edges[1:]):
            h, w = min(window, r1 - r0), min(window, c1 - c0)
            top, left = r0 + (r1 - r0 - h) // 2, c0 + (c1 - c0 - w) // 2
            blocks.append((int(top), int(top + h), int(left), int(left + w)))
    return blocks


def calibrate_pattern_centre_field(patterns: Any, starts: np.ndarray, x: np.ndarray,
                                   y: np.ndarray, master: Any, detector: Detector, *,
                                   mask: np.ndarray | None = None,
                                   refine_config: Any = None,
                                   config: PCFieldConfig = PCFieldConfig()) -> PCFieldFit:
    """Refine orientation and PC jointly on calibration patterns and fit the PC field.

    Parameters
    ----------
    patterns : (k, npix) float32 array
        The calibration patterns as :func:`dpm.match.prepare_patterns` gives
        them (NumPy or CuPy).
    starts : (k, m, 4) or (k, 4) array
        Their candidate orientations (dictionary matches), best first.
    x, y : (k,) float arrays
        Their beam positions (map units).
    master
        Master pattern or :class:`dpm.refine.RefinementMaster`.
    detector
        Detector with the starting PC (the map's one PC, e.g. at its centre).
    mask
        Signal mask the rows were taken over.
    refine_config
        :class:`dpm.refine.RefineConfig` (its ``pattern_centre`` is set to
        ``"pattern"``); default options otherwise.
    config
        Field model and outlier rejection.

    Returns
    -------
    PCFieldFit
        Residuals are refined PC minus field; the refined PCs are
        ``fit.residuals + fit.field.at(x, y)``.
    """
    from dataclasses import replace

    from dpm import backend
    from dpm.refine import (RefineConfig, RefinementMaster, fit_linear_pattern_centres,
                            linear_pattern_centre_covariance, refine, refinement_master)

    refine_config = RefineConfig() if refine_config is None else refine_config
    rmaster = master if isinstance(master, RefinementMaster) else refinement_master(
        master, detector, psf=refine_config.psf)
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    result = refine(patterns, rmaster, detector, starts, mask=mask,
                    config=replace(refine_config, pattern_centre="pattern"))
    first = fit_pattern_centre_field(x, y, result.pcs, sample_tilt=detector.sample_tilt,
                                     detector_tilt=detector.tilt, config=config)
    # Each pattern's own PC is noisy (~0.003 at NCC 0.45 on 60 x 60 px); the field's few
    # parameters are refined on the inliers' NCCs jointly, from the fitted field.
    keep = np.flatnonzero(first.inliers)
    xk, yk = x[keep], y[keep]
    slope = tilt_slope(detector.sample_tilt, detector.tilt)
    jacobian = field_jacobian(xk, yk, first.field.centre, config.model, slope)
    xp = backend.namespace(patterns)
    rows = patterns[xp.asarray(keep)]

    def joint(base: PatternCentreField, start: np.ndarray,
              columns: np.ndarray) -> tuple[PatternCentreField, np.ndarray]:
        """The field refined from ``base`` in the parameters ``columns``, and orientations."""
        theta, q, _ = fit_linear_pattern_centres(
            rows, rmaster, detector, start, jacobian[:, :, columns],
            base=base.at(xk, yk), mask=mask, config=refine_config)
        full = np.zeros(jacobian.shape[2])
        full[columns] = theta
        return PatternCentreField(base.centre, base.pc + full[:3],
                                  base.gradient + _gradient_of(full, config.model, slope)), q

    field, q = joint(first.field, result.quaternions[keep], np.arange(jacobian.shape[2]))
    gradient_z = None
    if jacobian.shape[2] > 3:
        covariance = linear_pattern_centre_covariance(rows, rmaster, detector, q,
                                                      field.at(xk, yk), jacobian, mask=mask)
        params = _gradient_params(field.gradient, config.model)
        gradient_z = np.abs(params) / np.sqrt(np.maximum(np.diag(covariance)[3:], 1e-300))
        weak = gradient_z < config.significance
        if weak.any():     # not measurably different from no drift: zero, refit the rest
            zeroed = np.concatenate([np.zeros(3), np.where(weak, -params, 0.0)])
            flatter = PatternCentreField(field.centre, field.pc,
                                         field.gradient + _gradient_of(zeroed, config.model, slope))
            field, _ = joint(flatter, q,
                             np.concatenate([np.arange(3), 3 + np.flatnonzero(~weak)]))
    residuals = result.pcs - field.at(x, y)
    rms = np.sqrt((residuals[first.inliers] ** 2).mean(axis=0))
    return PCFieldFit(field, config.model, residuals, first.inliers, rms, gradient_z)


def field_jacobian(x: np.ndarray, y: np.ndarray, centre: np.ndarray, model: str,
                   slope: float) -> np.ndarray:
    """(n, 3, k) derivatives of each position's PC by the field parameters of ``model``.

    Parameters: ``"constant"`` the PC (k = 3); ``"constrained"`` the PC at
    ``centre``, ``d PCx / dx`` and ``d PCy / dy`` (k = 5, PCz's slope in y is
    ``slope`` times PCy's); ``"plane"`` the PC and each component's two slopes
    (k = 9, ordered PC, d/dx, d/dy).
    """
    dx = np.asarray(x, dtype=np.float64) - centre[0]
    dy = np.asarray(y, dtype=np.float64) - centre[1]
    n = len(dx)
    if model == "constant":
        return np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    if model == "constrained":
        jac = np.zeros((n, 3, 5))
        jac[:, 0, 0] = jac[:, 1, 1] = jac[:, 2, 2] = 1.0
        jac[:, 0, 3] = dx
        jac[:, 1, 4] = dy
        jac[:, 2, 4] = slope * dy
        return jac
    jac = np.zeros((n, 3, 9))
    for c in range(3):
        jac[:, c, c] = 1.0
        jac[:, c, 3 + c] = dx
        jac[:, c, 6 + c] = dy
    return jac


def _gradient_params(gradient: np.ndarray, model: str) -> np.ndarray:
    """The gradient parameters of :func:`field_jacobian` (after the PC) of a (3, 2) gradient;
    the inverse of :func:`_gradient_of`."""
    if model == "constrained":
        return np.array([gradient[0, 0], gradient[1, 1]])
    if model == "plane":
        return np.concatenate([gradient[:, 0], gradient[:, 1]])
    return np.zeros(0)


def _gradient_of(theta: np.ndarray, model: str, slope: float) -> np.ndarray:
    """(3, 2) gradient change of the parameters ``theta`` of :func:`field_jacobian`."""
    gradient = np.zeros((3, 2))
    if model == "constrained":
        gradient[0, 0], gradient[1, 1], gradient[2, 1] = theta[3], theta[4], slope * theta[4]
    elif model == "plane":
        gradient[:, 0], gradient[:, 1] = theta[3:6], theta[6:9]
    return gradient


@dataclass(frozen=True)
class PCSearchConfig:
    """How a map's PC is found when none is known (:func:`search_pattern_centre`).

    Attributes
    ----------
    centre
        Centre of the search box, Bruker PC. The default, the screen centre
        ``(0.5, 0.5)`` at a detector distance of half the screen height, is
        where a PC is sought when nothing is known.
    half_width
        Half-width of the search box in PC units, the same for each
        component: PCs found outside ``centre ± half_width`` are rejected.
    binnings
        The image pyramid of the refinement: each pattern's orientation and
        PC are refined on its rows binned by each factor in turn (coarse
        first: a blurred pattern has a wide basin; full resolution last for
        precision), each level starting from the one before. The factors must
        divide the pattern shape; those that do not are skipped.
    patterns
        Calibration patterns used at most (the best band contrast first).
    """

    centre: tuple[float, float, float] = (0.5, 0.5, 0.5)
    half_width: float = 0.05
    binnings: tuple[int, ...] = (4, 2, 1)
    patterns: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre", tuple(float(v) for v in self.centre))
        object.__setattr__(self, "binnings", tuple(int(v) for v in self.binnings))
        if len(self.centre) != 3 or not all(np.isfinite(self.centre)):
            raise ValueError(f"PC search centre must be three finite numbers (Bruker PCx, PCy, "
                             f"PCz), got {self.centre}")
        if not 0 < self.half_width < 0.5:
            raise ValueError(f"PC search half_width must be in (0, 0.5) PC units, got "
                             f"{self.half_width!r}")
        low = self.box[0]
        if low[2] <= 0:
            raise ValueError(f"PC search box reaches PCz {low[2]:g} <= 0: the detector "
                             "distance must stay positive")
        if not self.binnings or min(self.binnings) < 1:
            raise ValueError(f"PC search binnings must be positive factors, got {self.binnings}")
        _check_positive_int("PC search patterns", self.patterns)

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """(3,) lower and upper corners of the search box."""
        centre = np.asarray(self.centre)
        return centre - self.half_width, centre + self.half_width


@dataclass(frozen=True)
class PCSearchResult:
    """The result of :func:`search_pattern_centre`.

    Attributes
    ----------
    pc : (3,) float array
        The PC found (Bruker), fitted jointly on the patterns that converged.
    ncc
        Mean NCC of those patterns at ``pc``.
    pattern_pcs : (n, 3) float array
        Each pattern's own PC after the pyramid.
    converged : (n,) bool array
        Patterns whose PC came out inside the search box and near the others
        (within 4 robust standard deviations of their median): the joint fit
        used these.
    quaternions : (n, 4) float array
        Orientations refined at ``pc`` (the converged patterns'; the pyramid's
        for the others).
    """

    pc: np.ndarray
    ncc: float
    pattern_pcs: np.ndarray
    converged: np.ndarray
    quaternions: np.ndarray


def search_pattern_centre(patterns: Any, starts: np.ndarray, master: Any, detector: Detector,
                          *, mask: np.ndarray | None = None,
                          config: PCSearchConfig = PCSearchConfig(),
                          refine_config: Any = None) -> PCSearchResult:
    """Find the PC of a map from a few good patterns, with no PC known.

    Every pattern's orientation and PC are refined together from its best
    dictionary matches at the box centre (``starts``), coarse to fine over an
    image pyramid (``config.binnings``): on patterns binned 4 × 4 the Kikuchi
    bands are broad and the NCC changes smoothly with the PC, so a PC several
    hundredths off still climbs towards the right one, and each finer level
    starts from the coarser one's result. A PC error is largely absorbed by
    a rotation, so not every pattern gets there; the patterns whose PCs land
    inside the box and agree with the median of the others (the robust
    estimate) are kept, and one PC is fitted jointly on them with their
    orientations (:func:`dpm.refine.fit_shared_pattern_centre`).

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean unit-norm rows of the patterns (:func:`dpm.match.prepare_patterns`)
        over ``mask``, NumPy or CuPy.
    starts : (n, k, 4) or (n, 4) float array
        Their best dictionary matches at the box centre's PC, best first.
    master
        The (sharp) master pattern; it is low-passed for each pyramid level.
    detector
        Detector of the patterns (shape, tilts, pixel size); its PC is not used.
    mask : (sy, sx) bool array, optional
        Signal mask the rows were taken over.
    config
        Search box and pyramid.
    refine_config
        :class:`dpm.refine.RefineConfig` for starts, iterations and budget;
        the PC trust radius is widened to a fifth of the box for the search.

    Returns
    -------
    PCSearchResult

    Raises
    ------
    ValueError
        When fewer than three patterns converge inside the box: the box is
        wrong or the patterns do not diffract; the message says which PCs
        were found.
    """
    from dataclasses import replace

    from dpm import backend
    from dpm.refine import (RefineConfig, fit_shared_pattern_centre, refine,
                            refinement_master)
    from dpm.search import PatternBinning, binned_detector

    refine_config = RefineConfig() if refine_config is None else refine_config
    search = replace(refine_config, pattern_centre="pattern",
                     pc_trust_radius=max(refine_config.pc_trust_radius, config.half_width / 5),
                     max_iterations=max(refine_config.max_iterations, 100))
    det = replace(detector, pc=config.centre)
    sy, sx = det.shape
    levels = [f for f in config.binnings if sy % f == 0 and sx % f == 0] or [1]
    if levels[-1] != 1:
        levels.append(1)
    low, high = config.box
    masters = {f: refinement_master(master, binned_detector(det, f), psf=refine_config.psf / f)
               for f in levels}
    xp = backend.namespace(patterns)
    n = int(patterns.shape[0])
    # The coarsest level starts from the box centre and the centres of its eight octants:
    # one of them lies within a quarter of the box of any PC in it. Each pattern keeps
    # the start that reached the highest NCC.
    octants = np.stack(np.meshgrid(*[[-0.5, 0.5]] * 3, indexing="ij"), -1).reshape(-1, 3)
    start_pcs = np.asarray(config.centre) + config.half_width * np.vstack([np.zeros(3), octants])
    quaternions = np.asarray(backend.to_host(starts), dtype=np.float64)
    if quaternions.ndim == 2:
        quaternions = quaternions[:, None]
    m = len(start_pcs)
    copies = xp.asarray(np.tile(np.arange(n), m))
    quaternions, pcs = np.tile(quaternions, (m, 1, 1)), np.repeat(start_pcs, n, axis=0)
    for level, factor in enumerate(levels):
        binning = PatternBinning(factor, (sy, sx), mask)
        small = binned_detector(det, factor)
        rows = binning.rows(patterns)
        result = refine(rows if level else rows[copies], masters[factor], small, quaternions,
                        mask=binning.binned_mask, config=search, pcs=pcs)
        quaternions, pcs = result.quaternions, result.pcs
        if level == 0:
            best = np.argmax(result.scores.reshape(m, n), axis=0) * n + np.arange(n)
            quaternions, pcs = quaternions[best], pcs[best]
    inside = ((pcs >= low) & (pcs <= high)).all(axis=1) & (result.scores > 0)
    converged = inside & _agrees(pcs, inside, 4.0) if inside.sum() >= 3 else inside
    if converged.sum() < 3:
        raise ValueError(
            f"no PC found in the search box {np.round(low, 4).tolist()} to "
            f"{np.round(high, 4).tolist()}: {int(inside.sum())} of {len(pcs)} patterns refined "
            f"to a PC inside it (too few agree); widen the box or give the PC")
    keep = np.flatnonzero(converged)
    start = replace(detector, pc=tuple(float(v) for v in np.median(pcs[keep], axis=0)))
    pc, q, ncc = fit_shared_pattern_centre(
        patterns[xp.asarray(keep)], masters[1], start, quaternions[keep],
        mask=mask, config=replace(search, pattern_centre="fixed"))
    if not ((pc >= low) & (pc <= high)).all():
        raise ValueError(f"the PC fitted on {len(keep)} patterns, {np.round(pc, 4).tolist()}, "
                         f"lies outside the search box {np.round(low, 4).tolist()} to "
                         f"{np.round(high, 4).tolist()}; widen the box or give the PC")
    quaternions[keep] = q
    return PCSearchResult(pc, float(ncc), pcs, converged, quaternions)
