"""Synthetic EBSD maps with known truth: columnar grains, pores, noise.

Electrodeposited Li and Na films grow as columns ("row of teeth"): grain
boundaries stand roughly perpendicular to the current collector, grains span
the film, and pores do not diffract. :func:`synthetic_map` draws such a map,
projects a master pattern for every pixel and turns it into camera counts with
a smooth background, Kikuchi contrast, Poisson noise and optical blur. Tests,
benches and ``dpm demo`` use it because the true orientation of every pixel is
known.

Two defects of real Li and Na maps can be added: *weak* pixels, which still
diffract but with a much fainter Kikuchi signal (surface damage,
contamination), and a detector *shadow*, a region of the pattern that the
same obstacle darkens in every pattern.

Map frame: x (columns) runs along the interface, y (rows) across the film.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from dpm.calibration import PatternCentreField, pattern_centre_field
from dpm.detector import Detector
from dpm.master import MasterPattern
from dpm.preprocess import gaussian_taps
from dpm.projection import project

#: Fraction of the intensity (background and Kikuchi signal) that reaches the
#: detector inside the shadow.
SHADOW_TRANSMISSION = 0.1
#: Width of the shadow's soft edge: the transmission changes as a logistic
#: function of the distance to the edge with this scale, as a fraction of the
#: detector width (pixels within ±2 scales of the edge are partly shadowed).
SHADOW_EDGE = 0.02
#: Angle in degrees between the shadow's edge and the detector rows; the
#: shadow covers the bottom of the pattern, deepest in the lower-left corner.
SHADOW_EDGE_ANGLE = 20.0


@dataclass(frozen=True)
class SyntheticConfig:
    """How a synthetic map looks.

    Attributes
    ----------
    map_shape
        ``(ny, nx)`` map pixels; y runs across the film, x along the interface.
    step_size
        Map step in µm.
    grain_width
        Mean column width in map pixels (widths are gamma-distributed, shape 4).
    boundary_tilt
        Standard deviation of the boundary slope ``dx/dy`` (0 = vertical).
    pore_fraction
        Fraction of map pixels inside non-diffracting pores (small discs).
    counts
        Mean detector counts per pixel at the background maximum (sets the
        Poisson noise: fewer counts, noisier patterns).
    contrast
        Standard deviation of the Kikuchi signal relative to the background.
    blur
        Gaussian blur of each pattern, σ in detector pixels (0 = none).
    background_width
        σ of the Gaussian background hump as a fraction of the detector width.
    supersample
        Each pattern pixel is the mean of ``supersample²`` projected sub-pixels,
        as a binned camera pixel integrates the intensity over its area (1 =
        point sampling).
    weak_fraction
        Fraction of the diffracting pixels that are *weak*: drawn at random
        (without replacement, ``round(weak_fraction · n_diffracting)`` pixels),
        they get Kikuchi contrast ``weak_contrast`` instead of ``contrast``.
        The draw uses its own random stream, so the grains, orientations and
        pores of a map do not depend on ``weak_fraction``.
    weak_contrast
        Standard deviation of the Kikuchi signal of weak pixels relative to
        the background. The default 0.065 is about the faintest signal that
        :func:`dpm.quality.band_contrast` still puts above 10 for at least
        95 % of the weak pixels of default 60 × 60 px Li maps (background
        removed as the mean of the stack). The 2° dictionary alone still
        finds about 98 % of such pixels within 2°; at 0.03 it finds fewer than
        half, but then band contrast no longer tells weak pixels from pores.
    weak_distortion
        Standard deviation of a smooth random intensity modulation (σ = 1/8
        of the detector width) multiplied into every weak pattern, as surface
        topography or charging imprint on it (:func:`distortion_fields`): it
        lowers the NCC of any template far more than the band contrast,
        which only sees sharp bands. 0 = none.
    shadow_fraction
        Fraction of the pattern area behind a detector shadow (see
        :func:`shadow`), the same on every pattern; 0 = no shadow.
    pc_drift
        Pattern-centre drift over the map, as a real scan has it: PCx
        changes by ± this much (PC units) from the map centre to its left
        and right edges, and PCy and PCz follow over the rows as the geometry
        of a flat sample at the detector's tilts has them
        (:func:`drift_field`). The detector's PC is the one of the map
        centre. 0 = every pattern at the detector's PC.
    seed
        Random seed; the same seed gives the same map.
    """

    map_shape: tuple[int, int] = (40, 60)
    step_size: float = 1.0
    grain_width: float = 8.0
    boundary_tilt: float = 0.1
    pore_fraction: float = 0.03
    counts: float = 40.0
    contrast: float = 0.08
    blur: float = 0.7
    background_width: float = 0.55
    supersample: int = 4
    weak_fraction: float = 0.0
    weak_contrast: float = 0.065
    weak_distortion: float = 0.0
    shadow_fraction: float = 0.0
    pc_drift: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        ny, nx = self.map_shape
        if ny < 1 or nx < 1:
            raise ValueError(f"map_shape must be two positive sizes, got {self.map_shape}")
        if not 0 <= self.pore_fraction < 1:
            raise ValueError(f"pore_fraction must be in [0, 1), got {self.pore_fraction}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be at least 1, got {self.supersample}")
        if self.counts <= 0 or self.contrast < 0 or self.grain_width <= 0:
            raise ValueError("counts and grain_width must be positive and contrast non-negative")
        if not 0 <= self.weak_fraction <= 1:
            raise ValueError(f"weak_fraction must be in [0, 1], got {self.weak_fraction}")
        if self.weak_distortion < 0:
            raise ValueError(f"weak_distortion must be non-negative, got {self.weak_distortion}")
        if self.weak_contrast < 0:
            raise ValueError(f"weak_contrast must be non-negative, got {self.weak_contrast}")
        if not 0 <= self.shadow_fraction < 1:
            raise ValueError(f"shadow_fraction must be in [0, 1), got {self.shadow_fraction}")
        if not 0 <= self.pc_drift < 0.2:
            raise ValueError(f"pc_drift must be in [0, 0.2) PC units, got {self.pc_drift}")
        if self.pc_drift > 0 and nx < 2:
            raise ValueError("pc_drift needs a map at least 2 pixels wide")


@dataclass(frozen=True, eq=False)
class SyntheticMap:
    """A synthetic map and its truth.

    Attributes
    ----------
    patterns : (ny, nx, sy, sx) uint8 array
        Raw patterns as a camera delivers them (background not removed).
    quaternions : (ny * nx, 4) float64 array
        True orientation of every pixel (row-major map order), also for pores.
    grain_ids : (ny, nx) int array
        Grain of every pixel, numbered from 0 along x.
    diffracting : (ny, nx) bool array
        False inside pores.
    weak : (ny, nx) bool array
        True at weak pixels (diffracting, with ``config.weak_contrast``).
    detector
        Detector the patterns were projected with.
    static_background : (sy, sx) float32 array or None
        The static background the camera would record, in the units of
        ``patterns``: the expected pattern without Kikuchi signal (background
        hump times shadow, blurred, times the map's gain). None for maps read
        from files written before it was stored.
    step_size
        Map step in µm.
    config
        The configuration the map was drawn with (the default configuration
        for maps read from a file).
    pcs : (ny * nx, 3) float64 array or None
        True PC (Bruker) of every pixel when the map drifts
        (``config.pc_drift``); None when every pattern has the detector's PC.
    """

    patterns: np.ndarray
    quaternions: np.ndarray
    grain_ids: np.ndarray
    diffracting: np.ndarray
    weak: np.ndarray
    detector: Detector
    static_background: np.ndarray | None = None
    step_size: float = 1.0
    config: SyntheticConfig = field(default_factory=SyntheticConfig)
    pcs: np.ndarray | None = None


def columnar_grains(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Grain id of every map pixel for columns spanning the film.

    Boundaries are lines ``x = x0 + slope (y - ny/2)`` with gamma-distributed
    spacing of mean ``config.grain_width`` and slopes of σ ``config.boundary_tilt``.

    Returns
    -------
    grain_ids : (ny, nx) int array
    """
    ny, nx = config.map_shape
    widths = rng.gamma(4.0, config.grain_width / 4.0, size=int(3 * nx / config.grain_width) + 4)
    x0 = np.cumsum(np.maximum(widths, 2.0)) - widths[0] * rng.random()
    x0 = x0[x0 < nx + 2 * config.grain_width]
    slopes = rng.normal(0.0, config.boundary_tilt, size=len(x0))
    _, ids = np.unique(_columns(x0, slopes, (ny, nx)), return_inverse=True)
    return ids.reshape(ny, nx)


def _columns(x0: np.ndarray, slopes: np.ndarray, map_shape: tuple[int, int]) -> np.ndarray:
    """(ny, nx) column index of every pixel centre: the number of boundary lines
    ``x = x0 + slope (y - ny/2)`` (pixel units) at or left of it."""
    ny, nx = map_shape
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    boundary_x = x0[None, None, :] + slopes[None, None, :] * (y[..., None] - ny / 2)
    return (x[..., None] >= boundary_x).sum(axis=-1)


@dataclass(frozen=True, eq=False)
class ColumnarFilm:
    """A columnar film (orientation map without patterns) and its truth.

    Square grid, x (columns) along the interface, y (rows) across the film;
    every grain spans the film. Lengths in µm.

    Attributes
    ----------
    grain_ids : (ny, nx) int array
        Grain of every pixel, numbered from 0 along x.
    grain_quaternions : (g, 4) array
        Orientation of each grain.
    quaternions : (ny · nx, 4) array
        Orientation of every pixel: its grain's, rotated by the orientation
        noise; random at wild spikes.
    diffracting : (ny, nx) bool array
        False inside pores (which must stay unindexed).
    spikes : (ny, nx) bool array
        Wild spikes: single pixels with a random orientation.
    zero_solutions : (ny, nx) bool array
        Diffracting pixels left unindexed (to be filled from their neighbours).
    trace_angle_deg : (g - 1,) array
        Angle of each boundary line to the interface, measured from +x towards
        +y, in (0, 180); 90 is perpendicular.
    boundary_grains : (g - 1, 2) int array
        The grains on either side of each boundary (boundary ``k`` separates
        grains ``k`` and ``k + 1``).
    width_um : (g,) array
        Caliper extent of each grain along x: from the leftmost point of its
        left boundary to the rightmost point of its right boundary over the
        film (the map edge for the first and last grain).
    step_size
        Map step in µm.
    """

    grain_ids: np.ndarray
    grain_quaternions: np.ndarray
    quaternions: np.ndarray
    diffracting: np.ndarray
    spikes: np.ndarray
    zero_solutions: np.ndarray
    trace_angle_deg: np.ndarray
    boundary_grains: np.ndarray
    width_um: np.ndarray
    step_size: float


def columnar_film(map_shape: tuple[int, int], rng: np.random.Generator, *, step_size: float = 1.0,
                  width_range: tuple[float, float] = (10.0, 150.0),
                  perpendicular_fraction: float = 0.5, perpendicular_tilt: float = 2.0,
                  tilt_range: tuple[float, float] = (4.0, 12.0), pore_fraction: float = 0.02,
                  spike_fraction: float = 0.01, zero_solution_fraction: float = 0.0,
                  noise_deg: float = 0.3, min_gap: float = 5.0,
                  min_misorientation: float = 15.0) -> ColumnarFilm:
    """Draw a columnar film: grains spanning the film with known widths and boundary angles.

    Grain widths (at mid-film, along x) are uniform in ``width_range`` µm;
    each boundary is a straight line whose tilt from the film normal is
    uniform in ``±perpendicular_tilt`` degrees with probability
    ``perpendicular_fraction`` and otherwise uniform in ``tilt_range`` with a
    random sign; tilts are redrawn until neighbouring boundaries stay
    ``min_gap`` pixels apart across the whole film. Grain orientations are
    uniformly random, redrawn until neighbouring grains are more than
    ``min_misorientation`` degrees apart (m-3m); every pixel's orientation
    is rotated by ``noise_deg`` about a random axis. Then pores
    (:func:`pores`, ``pore_fraction``), wild spikes (``spike_fraction`` of
    the diffracting pixels get a random orientation more than
    ``min_misorientation`` from their grain's, its neighbour grains' and any
    neighbouring spike's) and zero solutions
    (``zero_solution_fraction`` of the other diffracting pixels) are placed
    at random. Pores never cut a grain in two: a piece of a grain they cut
    off (a 4-connected remnant beside the map edge) is made part of the pore,
    so every grain is one connected region.

    Returns
    -------
    ColumnarFilm
    """
    from orix.quaternion import Rotation
    from orix.quaternion.symmetry import Oh

    from dpm.grains import disorientation_angles, neighbours

    ny, nx = (int(v) for v in map_shape)
    lo, hi = (w / step_size for w in width_range)
    widths = rng.uniform(lo, hi, size=int(nx / lo) + 2)
    x0 = np.cumsum(widths) - rng.uniform(0.0, widths[0])
    x0 = x0[(x0 > min_gap) & (x0 < nx - 1 - min_gap)]
    edges = np.array([-0.5, ny - 0.5]) - ny / 2          # film top and bottom, from mid-film
    while True:
        perpendicular = rng.random(len(x0)) < perpendicular_fraction
        tilt = np.where(perpendicular, rng.uniform(-perpendicular_tilt, perpendicular_tilt, len(x0)),
                        rng.uniform(*tilt_range, len(x0)) * rng.choice([-1.0, 1.0], len(x0)))
        slopes = np.tan(np.radians(tilt))                 # dx/dy of each line
        ends = x0[:, None] + slopes[:, None] * edges       # (b, 2): x at top and bottom
        if (np.diff(ends, axis=0) >= min_gap).all() and (ends > 0).all() and (ends < nx - 1).all():
            break
    ids = _columns(x0, slopes, (ny, nx))
    n_grains = len(x0) + 1
    while True:
        grain_q = random_quaternions(n_grains, rng)
        if disorientation_angles(grain_q[:-1], grain_q[1:], Oh).min() > min_misorientation:
            break
    left = np.concatenate([[-0.5], ends.min(axis=1)])
    right = np.concatenate([ends.max(axis=1), [nx - 0.5]])
    q = grain_q[ids.ravel()]
    axes = rng.normal(size=(len(q), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    half = np.radians(noise_deg) / 2
    noise = np.concatenate([np.full((len(q), 1), np.cos(half)), np.sin(half) * axes], axis=1)
    q = (Rotation(noise) * Rotation(q)).data
    diffracting = pores(SyntheticConfig(map_shape=(ny, nx), pore_fraction=pore_fraction), rng)
    for k in range(n_grains):   # a piece of a grain cut off by pores joins the pores
        pieces, n_pieces = ndimage.label((ids == k) & diffracting)
        if n_pieces > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            diffracting &= ~((pieces > 0) & (pieces != np.argmax(sizes) + 1))
    spikes = weak_pixels(diffracting, spike_fraction, rng)
    # A spike differs by more than min_misorientation from its grain, the grains beside
    # it and the spikes around it (two agreeing neighbours would be a grain of two pixels).
    table = neighbours((ny, nx))
    at = np.flatnonzero(spikes)
    while len(at):
        q[at] = random_quaternions(len(at), rng)
        near = [disorientation_angles(q[at], grain_q[np.clip(ids.ravel()[at] + d, 0, n_grains - 1)],
                                      Oh) for d in (-1, 0, 1)]
        for k in range(table.shape[1]):
            j = table[at, k]
            other = (j >= 0) & spikes.ravel()[np.maximum(j, 0)]
            near.append(np.where(other, disorientation_angles(q[at], q[np.maximum(j, 0)], Oh), 180.0))
        at = at[np.min(near, axis=0) <= min_misorientation]
    zero = weak_pixels(diffracting & ~spikes, zero_solution_fraction, rng)
    trace = np.degrees(np.arctan2(1.0, slopes))           # direction (slope, 1) from +x
    return ColumnarFilm(
        grain_ids=ids, grain_quaternions=grain_q, quaternions=q, diffracting=diffracting,
        spikes=spikes, zero_solutions=zero, trace_angle_deg=trace,
        boundary_grains=np.stack([np.arange(len(x0)), np.arange(1, len(x0) + 1)], axis=1),
        width_um=(right - left) * step_size, step_size=float(step_size))



def pores(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Non-diffracting discs (radius 1–2.5 px) covering about ``pore_fraction`` of the map.

    Returns
    -------
    diffracting : (ny, nx) bool array, False inside pores
    """
    ny, nx = config.map_shape
    diffracting = np.ones((ny, nx), dtype=bool)
    y, x = np.mgrid[0:ny, 0:nx]
    while (~diffracting).mean() < config.pore_fraction:
        cy, cx, r = rng.random() * ny, rng.random() * nx, rng.uniform(1.0, 2.5)
        diffracting &= (y - cy) ** 2 + (x - cx) ** 2 > r**2
    return diffracting


def weak_pixels(diffracting: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random set of ``round(fraction · n_diffracting)`` diffracting pixels.

    Parameters
    ----------
    diffracting : (ny, nx) bool array
        False inside pores (which are never weak).
    fraction
        Fraction of the diffracting pixels to pick, in [0, 1].

    Returns
    -------
    weak : (ny, nx) bool array
    """
    candidates = np.flatnonzero(diffracting)
    weak = np.zeros(diffracting.shape, dtype=bool)
    k = int(round(fraction * len(candidates)))
    if k:
        weak.ravel()[rng.choice(candidates, size=k, replace=False)] = True
    return weak


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random unit quaternions ``(a, b, c, d)`` with ``a >= 0``, shape (n, 4)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def background(shape: tuple[int, int], pc: tuple[float, float, float], width: float,
               pad: int = 0) -> np.ndarray:
    """Smooth background hump (max 1) centred on the pattern centre.

    Parameters
    ----------
    shape
        Detector ``(sy, sx)``.
    pc
        Bruker pattern centre; the hump peaks at ``(PCx · sx, PCy · sy)``.
    width
        σ as a fraction of the detector width.
    pad
        Pixels of screen beyond each detector edge to include.

    Returns
    -------
    background : (sy + 2 pad, sx + 2 pad) float32 array
    """
    sy, sx = shape
    r, c = np.mgrid[-pad:sy + pad, -pad:sx + pad]
    d2 = (c + 0.5 - pc[0] * sx) ** 2 + (r + 0.5 - pc[1] * sy) ** 2
    return (0.25 + 0.75 * np.exp(-d2 / (2 * (width * sx) ** 2))).astype(np.float32)


def distortion_fields(shape: tuple[int, int], n: int, amplitude: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Smooth random intensity modulations, as topography or charging imprint on a pattern.

    Each field is white noise blurred with σ = 1/8 of the detector width,
    scaled to standard deviation ``amplitude`` around 1 and clipped at 0.

    Returns
    -------
    fields : (n, sy, sx) float32 array
    """
    sy, sx = shape
    noise = ndimage.gaussian_filter(rng.normal(size=(n, sy, sx)), sigma=(0, sx / 8, sx / 8),
                                    mode="wrap")
    noise /= np.maximum(noise.std(axis=(1, 2), keepdims=True), 1e-12)
    return np.clip(1.0 + amplitude * noise, 0.0, None).astype(np.float32)


def shadow(shape: tuple[int, int], fraction: float, pad: int = 0) -> np.ndarray:
    """Transmission of a detector shadow covering ``fraction`` of the pattern area.

    The shadow enters from the bottom of the pattern (rows of high index), its
    straight edge tilted by :data:`SHADOW_EDGE_ANGLE` so that it is deepest in
    the lower-left corner, as the sample or its holder shadows the phosphor in
    sodium maps. Inside it the transmission is :data:`SHADOW_TRANSMISSION`;
    across the edge it changes smoothly (logistic, scale :data:`SHADOW_EDGE`
    of the detector width). The edge is placed where the hard-edged shadow
    would cover ``fraction`` of the pixel centres, so the covered area is
    ``fraction`` to within the symmetric blur of the edge.

    Parameters
    ----------
    shape
        Detector ``(sy, sx)``.
    fraction
        Shadowed fraction of the pattern area, in [0, 1); 0 gives no shadow.
    pad
        Pixels of screen beyond each detector edge to include (the edge is
        placed by the detector's own pixels).

    Returns
    -------
    transmission : (sy + 2 pad, sx + 2 pad) float32 array
        1 outside the shadow, :data:`SHADOW_TRANSMISSION` inside.
    """
    sy, sx = shape
    if fraction <= 0:
        return np.ones((sy + 2 * pad, sx + 2 * pad), dtype=np.float32)
    r, c = np.mgrid[-pad:sy + pad, -pad:sx + pad] + 0.5
    phi = np.deg2rad(SHADOW_EDGE_ANGLE)
    depth = r * np.cos(phi) - c * np.sin(phi)  # px, grows towards the lower-left corner
    edge = np.quantile(depth[pad:pad + sy, pad:pad + sx], 1.0 - fraction)
    inside = 0.5 * (1.0 + np.tanh((depth - edge) / (2.0 * SHADOW_EDGE * sx)))  # logistic
    return (1.0 - (1.0 - SHADOW_TRANSMISSION) * inside).astype(np.float32)


def camera_patterns(master: MasterPattern, detector: Detector, quaternions: np.ndarray,
                    supersample: int = 4, pcs: np.ndarray | None = None) -> np.ndarray:
    """Kikuchi patterns as a binned camera records them: pixel means of a finer projection.

    Parameters
    ----------
    master, detector
        What to project and onto which detector.
    quaternions : (n, 4) array
        Orientations.
    supersample
        Sub-pixels per pattern pixel along each axis.
    pcs : (n, 3) array, optional
        Each pattern's own PC (Bruker) instead of the detector's.

    Returns
    -------
    patterns : (n, sy, sx) float32 array
    """
    sy, sx = detector.shape
    fine = replace(detector, shape=(sy * supersample, sx * supersample))
    out = np.empty((len(quaternions), sy, sx), dtype=np.float32)
    if pcs is not None:   # one projection per PC
        for i, (q, pc) in enumerate(zip(quaternions, np.asarray(pcs, dtype=np.float64))):
            sub = project(master, replace(fine, pc=tuple(float(v) for v in pc)), q[None])
            out[i] = sub.reshape(sy, supersample, sx, supersample).mean(axis=(1, 3))
        return out
    for start in range(0, len(quaternions), 512):  # bounded scratch memory
        q = quaternions[start:start + 512]
        sub = project(master, fine, q).reshape(len(q), sy, supersample, sx, supersample)
        out[start:start + len(q)] = sub.mean(axis=(2, 4))
    return out


def padded_pc(shape: tuple[int, int], pc: np.ndarray | tuple[float, float, float],
              pad: int) -> np.ndarray:
    """Bruker PC(s) of a detector seen as part of the screen padded by ``pad`` pixels.

    The padded screen has ``(sy + 2 pad, sx + 2 pad)`` pixels and the same
    pixel pitch, so ``PCx' (sx + 2 pad) = PCx sx + pad``,
    ``PCy' (sy + 2 pad) = PCy sy + pad`` and ``PCz' (sy + 2 pad) = PCz sy``.

    Parameters
    ----------
    shape
        Detector ``(sy, sx)``.
    pc : (3,) or (n, 3) array
        Bruker PC(s) on the detector.
    pad
        Pixels added beyond each edge.
    """
    sy, sx = shape
    pc = np.asarray(pc, dtype=np.float64)
    return np.stack([(pc[..., 0] * sx + pad) / (sx + 2 * pad),
                     (pc[..., 1] * sy + pad) / (sy + 2 * pad),
                     pc[..., 2] * sy / (sy + 2 * pad)], axis=-1)


def drift_field(detector: Detector, map_shape: tuple[int, int], step_size: float,
                drift: float) -> PatternCentreField:
    """The PC field of a flat sample whose PCx changes by ``± drift`` across the map's width.

    The field of :func:`dpm.calibration.pattern_centre_field` about the map
    centre (beam positions in map pixels, x = column, y = row), with the
    screen size that gives that drift: ``step_size (nx − 1) / (2 drift Nx)``
    µm per pattern pixel. PCy and PCz change over the rows by the same screen
    scale, PCz by ``−tan(90° − σ + θ)`` of PCy's change.
    """
    ny, nx = map_shape
    screen = step_size * (nx - 1) / (2.0 * drift * detector.shape[1])
    geometry = replace(detector, px_size=screen / detector.binning)
    return pattern_centre_field(geometry, centre=((nx - 1) / 2.0, (ny - 1) / 2.0),
                                step=step_size)


def synthetic_map(
    master: MasterPattern,
    detector: Detector,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    grain_orientations: np.ndarray | None = None,
) -> SyntheticMap:
    """Draw a columnar-grain map and simulate its raw patterns.

    Each diffracting pixel's pattern is ``counts · B · T · (1 + c · K)``
    with Poisson noise, where ``B`` is :func:`background`, ``T`` the
    :func:`shadow` transmission, ``K`` the projected master pattern scaled to
    zero mean and unit standard deviation, and ``c`` the contrast
    (``weak_contrast`` at weak pixels); pores get ``counts · B · T`` alone.
    Patterns are blurred on the screen (light from beyond the detector's
    edges included, as a camera's optics blur it), then rescaled into uint8
    with the same gain for the whole map.

    Parameters
    ----------
    master
        Master pattern to project.
    detector
        Detector geometry (sets the pattern shape and PC).
    config
        Map layout and noise levels.
    grain_orientations : (g, 4) array, optional
        Quaternions to give the grains (grain ``i`` gets row ``i % g``);
        uniformly random orientations when None.
    """
    rng = np.random.default_rng(config.seed)
    ny, nx = config.map_shape
    grain_ids = columnar_grains(config, rng)
    n_grains = int(grain_ids.max()) + 1
    if grain_orientations is None:
        grain_q = random_quaternions(n_grains, rng)
    else:
        given = np.asarray(grain_orientations, dtype=np.float64).reshape(-1, 4)
        grain_q = given[np.arange(n_grains) % len(given)]
    quaternions = grain_q[grain_ids.ravel()]
    diffracting = pores(config, rng)
    weak = weak_pixels(diffracting, config.weak_fraction, np.random.default_rng([config.seed, 1]))

    pcs = None
    if config.pc_drift > 0:
        rows, cols = np.divmod(np.arange(ny * nx), nx)
        pcs = drift_field(detector, (ny, nx), config.step_size, config.pc_drift).at(cols, rows)
    # The camera blurs the light on its screen: the pixels at the detector's edges also get
    # light from just beyond it. So the patterns are recorded on the screen padded by the
    # blur's radius (scipy's, truncate 4), blurred, then cropped to the detector.
    pad = gaussian_taps(config.blur).size // 2
    sy, sx = detector.shape
    inner = (slice(None), slice(pad, pad + sy), slice(pad, pad + sx))
    screen = replace(detector, shape=(sy + 2 * pad, sx + 2 * pad),
                     pc=tuple(padded_pc(detector.shape, detector.pc, pad)))
    kikuchi = camera_patterns(master, screen, quaternions, config.supersample,
                              pcs=None if pcs is None else padded_pc(detector.shape, pcs, pad))
    # zero mean, unit std over the detector itself
    kikuchi -= kikuchi[inner].mean(axis=(1, 2), keepdims=True)
    kikuchi /= np.maximum(kikuchi[inner].std(axis=(1, 2), keepdims=True), 1e-12)
    kikuchi[~diffracting.ravel()] = 0.0
    contrast = np.full((ny * nx, 1, 1), config.contrast, dtype=np.float32)
    contrast[weak.ravel()] = config.weak_contrast
    bg = background(detector.shape, detector.pc, config.background_width, pad)
    bg = bg * shadow(detector.shape, config.shadow_fraction, pad)
    intensity = config.counts * bg[None] * np.clip(1.0 + contrast * kikuchi, 0.0, None)
    if config.weak_distortion > 0 and weak.any():
        fields = distortion_fields(detector.shape, int(weak.sum()), config.weak_distortion,
                                   np.random.default_rng([config.seed, 2]))
        intensity[weak.ravel()] *= np.pad(fields, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    # The detector's pixels draw their noise from the map's stream as an unpadded camera
    # would; the ring beyond the edge from a stream of its own.
    counts = np.empty_like(intensity)
    counts[inner] = rng.poisson(intensity[inner])
    ring = np.ones(intensity.shape[1:], dtype=bool)
    ring[inner[1:]] = False
    counts[:, ring] = np.random.default_rng([config.seed, 3]).poisson(intensity[:, ring])
    mean_background = np.float32(config.counts) * bg
    if config.blur > 0:
        counts = ndimage.gaussian_filter(counts, sigma=(0, config.blur, config.blur))
        mean_background = ndimage.gaussian_filter(mean_background, sigma=config.blur)
    counts, mean_background = counts[inner], mean_background[inner[1:]]
    gain = 255.0 / np.percentile(counts, 99.9)
    patterns = np.clip(np.rint(counts * gain), 0, 255).astype(np.uint8)
    return SyntheticMap(
        patterns=patterns.reshape(ny, nx, *detector.shape),
        quaternions=quaternions,
        grain_ids=grain_ids,
        diffracting=diffracting,
        weak=weak,
        detector=detector,
        static_background=(mean_background * gain).astype(np.float32),
        step_size=config.step_size,
        config=config,
        pcs=pcs,
    )


def save_synthetic_map(smap: SyntheticMap, path: str | Path) -> None:
    """Write a synthetic map and its truth to a compressed ``.npz`` file."""
    det = smap.detector
    extra = {} if smap.static_background is None else {"static_background": smap.static_background}
    if smap.pcs is not None:
        extra["pcs"] = smap.pcs
    np.savez_compressed(
        path, patterns=smap.patterns, quaternions=smap.quaternions, grain_ids=smap.grain_ids,
        diffracting=smap.diffracting, weak=smap.weak, pc=np.asarray(det.pc),
        sample_tilt=det.sample_tilt, detector_tilt=det.tilt, step_size=smap.step_size, **extra)


def load_synthetic_map(path: str | Path) -> SyntheticMap:
    """Read a map written by :func:`save_synthetic_map`.

    Files written before weak pixels and the static background were stored
    (such as the bundled demo map) read with no weak pixels and
    ``static_background = None``.
    """
    with np.load(path) as f:
        patterns = f["patterns"]
        diffracting = f["diffracting"]
        det = Detector(shape=patterns.shape[2:], pc=tuple(f["pc"]),
                       sample_tilt=float(f["sample_tilt"]), tilt=float(f["detector_tilt"]))
        return SyntheticMap(
            patterns=patterns, quaternions=f["quaternions"], grain_ids=f["grain_ids"],
            diffracting=diffracting,
            weak=f["weak"] if "weak" in f.files else np.zeros_like(diffracting),
            detector=det,
            static_background=f["static_background"] if "static_background" in f.files else None,
            step_size=float(f["step_size"]), pcs=f["pcs"] if "pcs" in f.files else None)
