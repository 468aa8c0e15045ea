"""Orientation and pattern-centre refinement: maximise the NCC, many patterns at once.

A 2° dictionary leaves about a degree of error. Refinement moves each
orientation (and optionally the pattern centre, PC) to the maximum of the
normalised cross-correlation (NCC) between the experimental pattern ``e`` and
the pattern ``s(p)`` projected from the master pattern at parameters ``p``.
Both are zero-mean and unit-norm over the used pixels, so maximising the NCC
is minimising ``|s(p) - e|² = 2 - 2 NCC``: a least-squares problem solved by
Levenberg–Marquardt with a trust region, for every pattern at once.

Parameters
----------
Orientation: a rotation vector ``δ`` (radians) applied in the crystal frame,
``q -> exp(δ) q`` (orix convention: ``q`` rotates the sample frame onto the
crystal frame; the crystal direction of a pixel moves by ``δ × u``).
Pattern centre: Bruker ``(PCx, PCy, PCz)`` as :class:`dpm.detector.Detector`.

One kernel per iteration
------------------------
Every iteration evaluates, for each candidate, 42 sums over the pixels
(``kernels/refine.cu``; numba twin :func:`_refine_sums_numba`): of the
projected intensity ``I``, its derivatives ``D_j`` with respect to the six
parameters, and products with each other and with ``e``. From them, with
``μ`` the mean and ``N`` the norm of ``I - μ``:

* ``NCC = Σ e I / N``;
* ``∂NCC/∂p_j = (Σ e D_j - NCC (s·D_j)) / N``, ``s·D_j = (Σ I D_j - μ Σ D_j) / N``;
* ``(JᵀJ)_jk = (Σ D_j D_k - Σ D_j Σ D_k / n - (s·D_j)(s·D_k)) / N²``, the
  Gauss–Newton matrix of the normalised pattern; ``NCC · JᵀJ`` approximates
  ``-∇²NCC`` (see :func:`correlation_terms`).

No Jacobian is ever stored, so memory is a few hundred bytes per candidate.
Intensity derivatives come from Lambert-square gradient maps of the master
pattern (central differences), interpolated like the intensity, and the
Lambert map differentiated along two tangent directions; the master pattern
is first low-passed to the detector's pixel size
(:func:`dpm.projection.integrate_pixels`), which makes the NCC smooth at the
scale refinement works on and models the camera's pixel integration.

Iteration (per candidate)
-------------------------
Solve ``(H + λ diag H) Δ = ∇NCC`` with ``H = NCC · JᵀJ`` for the free parameters, shorten Δ to
the trust radius, evaluate the NCC at the trial point; accept it when the NCC
rises (radius × 2, up to 4 × ``trust_radius``; λ / 3), else reject (radius a
quarter of the shorter of the radius and the rejected step; λ × 4). A candidate has
converged when its own Newton step, or an accepted step, is below ``tolerance``
(and a PC step below ``pc_tolerance``; a stationary point is not evaluated
again), or its radius has shrunk below them; every candidate stops after
``max_iterations``. Converged candidates leave the
batch, so late iterations cost little. Candidates are refined in batches of
whole patterns sized from ``memory_budget``.

Starts
------
Each pattern is refined from its best ``n_starts`` dictionary matches,
skipping a match within ``distinct_angle`` of a better one (it would climb the
same maximum); the candidate with the highest refined NCC is kept.
Candidates whose NCC is below 0.9 times their pattern's best after one
iteration (when every candidate is close to its maximum) stop there (successive halving; not when the PC of every pattern
is refined, as a start's NCC then also reflects its PC error).

Pattern centre
--------------
``pattern_centre="fixed"`` refines orientations only; ``"pattern"`` refines
orientation and PC of every pattern (6 parameters); ``"shared"`` first fits
one PC for the whole map, jointly with the orientations of the
``pc_subset`` patterns with the highest starting NCC (a bundle adjustment: the
orientation blocks are eliminated by their Schur complement, so the shared
step is a 3 × 3 solve), then refines every orientation at that PC.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numba as nb
import numpy as np

from dpm import backend
from dpm.detector import Detector, as_detector, sample_to_detector_matrix
from dpm.master import MasterPattern
from dpm.preprocess import gaussian_taps
from dpm.projection import lambert_cell, rotation_matrix_scalar

if TYPE_CHECKING:
    from kikuchipy.detectors import EBSDDetector

log = logging.getLogger("dpm")

#: Sums per candidate written by the kernel; equals REFINE_N_SUMS in kernels/refine.cu.
N_SUMS = 42
#: Successive halving: after ``k`` iterations, candidates whose NCC is below
#: ``fraction`` times their pattern's best stop (``(k, fraction)`` pairs).
_PRUNE_SCHEDULE = ((1, 0.9),)
#: Device bytes per candidate: optimiser state (quaternion, PC, NCC, gradient,
#: 6 x 6 matrix, radii, damping), a trial copy, the kernel's 42 sums, slack.
_BYTES_PER_CANDIDATE = 2048
#: Threads per block of the CUDA kernel (a power of two; see the launch site).
_GPU_THREADS = 128
#: Candidates per CUDA launch with a PSF, whose scratch images take ~230 KB
#: each at 60 × 60 (~0.5 GB per launch; 15 waves of blocks on an H100).
_PSF_BATCH = 2048
#: Smallest NCC used to scale the curvature (a weaker correlation is noise).
_MIN_CURVATURE_NCC = 0.05
#: Upper-triangle index pairs (j <= k) of the 6 x 6 sums, in kernel order.
_TRIU = np.triu_indices(6)
#: Position of D_j D_j among the 42 sums (row j of the upper triangle starts there).
_TRIU_ROW = np.array([21 + 6 * j - j * (j - 1) // 2 for j in range(6)], dtype=np.int64)

PatternCentreMode = Literal["fixed", "shared", "pattern"]


@dataclass(frozen=True)
class RefineConfig:
    """Options of :func:`refine`.

    Attributes
    ----------
    pattern_centre
        ``"fixed"`` (orientations only), ``"shared"`` (one PC fitted for the
        map, then orientations) or ``"pattern"`` (orientation and PC per pattern).
    n_starts
        Best dictionary matches tried per pattern (distinct ones only).
    distinct_angle
        Degrees: a start within this disorientation of a better start is skipped.
    trust_radius
        Initial and largest rotation step, in degrees (it grows up to 4 × this).
    pc_trust_radius
        Initial and largest PC step (fractions, Bruker convention; grows up to 4 ×).
    tolerance
        Rotation step in degrees below which a candidate has converged.
    pc_tolerance
        PC step below which the PC has converged.
    max_iterations
        Iterations at most (each is one kernel call over the unconverged candidates).
    pc_subset
        Patterns used to fit a shared PC (those with the highest starting NCC).
    memory_budget
        Bytes the candidates' optimiser state may take on the patterns' device
        (None: half the free memory); candidates are refined in batches of
        whole patterns that fit it.
    psf
        Gaussian σ of the camera's point-spread function in detector pixels
        (0: none): every projected pattern is blurred by it on the screen
        (:func:`refinement_master`), as the camera blurs the experimental
        one. Used when :func:`refine` is given a master pattern; a
        :class:`RefinementMaster` carries its own.
    """

    pattern_centre: PatternCentreMode = "fixed"
    n_starts: int = 10
    distinct_angle: float = 4.0
    trust_radius: float = 1.0
    pc_trust_radius: float = 0.005
    tolerance: float = 0.01
    pc_tolerance: float = 1e-4
    max_iterations: int = 50
    pc_subset: int = 256
    memory_budget: int | None = None
    psf: float = 0.0

    def __post_init__(self) -> None:
        if self.pattern_centre not in ("fixed", "shared", "pattern"):
            raise ValueError(f"pattern_centre must be 'fixed', 'shared' or 'pattern', "
                             f"got {self.pattern_centre!r}")
        for name in ("n_starts", "max_iterations", "pc_subset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        for name in ("trust_radius", "pc_trust_radius", "tolerance", "pc_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes or None, "
                             f"got {self.memory_budget!r}")
        if not self.distinct_angle >= 0:
            raise ValueError(f"distinct_angle must be >= 0 degrees, got {self.distinct_angle}")
        if not (math.isfinite(self.psf) and self.psf >= 0):
            raise ValueError(f"psf must be a finite σ >= 0 in detector pixels, got {self.psf!r}")


@dataclass(frozen=True)
class RefineResult:
    """Refined parameters of every pattern (host arrays).

    Attributes
    ----------
    quaternions : (n, 4) float64
        Refined orientations ``(a, b, c, d)``, ``a >= 0``; the start where a
        pattern was not refined.
    scores : (n,) float32
        NCC at the refined parameters (0 where the pattern was not refined).
    pcs : (n, 3) float64
        Bruker pattern centre of every pattern after refinement.
    iterations : (n,) int32
        Iterations of the kept candidate.
    start : (n,) int32
        Which dictionary match (0 = best) the kept candidate started from; -1
        where the pattern was not refined.
    """

    quaternions: np.ndarray
    scores: np.ndarray
    pcs: np.ndarray
    iterations: np.ndarray
    start: np.ndarray


# ----------------------------------------------------------------- the tables


@dataclass(frozen=True, eq=False)
class RefinementMaster:
    """A master pattern prepared for refinement on one detector.

    Attributes
    ----------
    tables : (2, side, side, 4) float32
        Northern and southern hemispheres, each Lambert node holding
        ``(I, ∂I/∂a, ∂I/∂b, 0)`` with ``a, b`` the Lambert coordinates in [-1, 1].
    master
        The pixel-integrated master pattern the tables come from.
    psf
        Gaussian σ of the camera's point-spread function in detector pixels
        (0: none), applied to every projected pattern on the screen.
    """

    tables: np.ndarray
    master: MasterPattern
    psf: float = 0.0


def refinement_master(master: MasterPattern, detector: Detector | EBSDDetector,
                      psf: float = 0.0) -> RefinementMaster:
    """Low-pass a master pattern to the detector's pixels and tabulate its gradients.

    Parameters
    ----------
    master
        Master pattern (not the dictionary's orientation-spread copy: refinement
        needs the sharp pattern, integrated over a camera pixel only).
    detector
        Detector whose pixel size sets the low-pass filter.
    psf
        Gaussian σ of the camera's point-spread function (scintillator and
        optics) in this detector's pixels. It blurs each projected pattern on
        the screen, after the pixel integration, as the camera blurs the
        experimental one. A blur on the sphere instead (in the master pattern)
        would be wrong away from the PC, where a pixel spans a smaller angle,
        and leaves an orientation-dependent bias of ~0.001 in the refined PC
        on 60 × 60 patterns blurred by 0.7 px (``dpm.calibration``).
    """
    from dpm.projection import integrate_pixels

    if not (math.isfinite(psf) and psf >= 0):
        raise ValueError(f"psf must be a finite σ >= 0 in detector pixels, got {psf}")
    smooth = integrate_pixels(master, detector)
    npx = (smooth.northern.shape[0] - 1) / 2
    tables = np.zeros((2, *smooth.northern.shape, 4), dtype=np.float32)
    for h, hemisphere in enumerate((smooth.northern, smooth.southern)):
        grid = np.asarray(hemisphere, dtype=np.float64)
        tables[h, ..., 0] = grid
        tables[h, ..., 1] = np.gradient(grid, 1.0 / npx, axis=1)  # columns: Lambert a
        tables[h, ..., 2] = np.gradient(grid, 1.0 / npx, axis=0)  # rows: Lambert b
    return RefinementMaster(tables=tables, master=smooth, psf=float(psf))


# --------------------------------------------------------------- the kernels


@nb.njit(inline="always", cache=True)
def _atan_unit(t: float) -> float:  # pragma: no cover
    """atan(t) for |t| <= 1: odd minimax polynomial of degree 11 (error < 2e-6 rad)."""
    t2 = t * t
    return t * (0.99997726 + t2 * (-0.33262347 + t2 * (0.19354346 + t2 * (
        -0.11643287 + t2 * (0.05265332 + t2 * -0.01172120)))))


@nb.njit(inline="always", cache=True)
def _lambert(x: float, y: float, z: float, s: float) -> tuple[float, float]:  # pragma: no cover
    """Lambert (a, b) of a unit vector on the hemisphere of sign ``s`` (as refine.cu,
    with a polynomial arctangent good to 2e-6 rad where the kernel calls ``atanf``)."""
    rr = x * x + y * y
    if rr == 0.0:
        return 0.0, 0.0
    r = math.sqrt(2.0 * rr / (1.0 + s * z))
    if abs(y) <= abs(x):
        q = r if x >= 0.0 else -r
        return q * 0.7071067811865476, q * 0.9003163161571061 * _atan_unit(y / x)
    q = r if y >= 0.0 else -r
    return q * 0.9003163161571061 * _atan_unit(x / y), q * 0.7071067811865476


@nb.njit(inline="always", cache=True)
def _bilinear3(tables: np.ndarray, h: int, a: float, b: float) -> tuple[float, float, float]:  # pragma: no cover
    """Bilinear lookup of (I, ∂I/∂a, ∂I/∂b) on hemisphere ``h`` of the tables (as refine.cu)."""
    r0, c0, r1, c1, dy, dx = lambert_cell(tables.shape[1], a, b)
    w00 = (1.0 - dy) * (1.0 - dx)
    w10 = dy * (1.0 - dx)
    w01 = (1.0 - dy) * dx
    w11 = dy * dx
    out0 = (w00 * tables[h, r0, c0, 0] + w10 * tables[h, r1, c0, 0]
            + w01 * tables[h, r0, c1, 0] + w11 * tables[h, r1, c1, 0])
    out1 = (w00 * tables[h, r0, c0, 1] + w10 * tables[h, r1, c0, 1]
            + w01 * tables[h, r0, c1, 1] + w11 * tables[h, r1, c1, 1])
    out2 = (w00 * tables[h, r0, c0, 2] + w10 * tables[h, r1, c0, 2]
            + w01 * tables[h, r0, c1, 2] + w11 * tables[h, r1, c1, 2])
    return out0, out1, out2


@nb.njit(inline="always", cache=True)
def _lambert_gradient(x: float, y: float, z: float, s: float, a: float, b: float, ga: float,
                      gb: float) -> tuple[float, float, float]:  # pragma: no cover
    """``ga ∇a + gb ∇b``: the gradient of I(a(u), b(u)) at unit ``u`` (as refine.cu).

    Both ``a`` and ``b`` are ``r = sqrt(2 (1 - s z))`` times a function of the
    azimuth, so ``∂/∂z = (a, b) (∂r/∂z) / r`` with ``∂r/∂z = -s / r``; the
    azimuthal parts are those of ``atan(y / x)`` (or ``atan(x / y)``). Only its
    tangential part is used. Zero at the pole.
    """
    rr = x * x + y * y
    if rr == 0.0:
        return 0.0, 0.0, 0.0
    r2 = 2.0 * rr / (1.0 + s * z)
    k = 0.9003163161571061  # 2 sqrt(2) / pi
    gz = -s * (ga * a + gb * b) / r2
    if abs(y) <= abs(x):  # a = sg r / sqrt(2), b = sg r k atan(y / x)
        c = gb * (1.0 if x >= 0.0 else -1.0) * math.sqrt(r2) * k / rr
        return -c * y, c * x, gz
    c = ga * (1.0 if y >= 0.0 else -1.0) * math.sqrt(r2) * k / rr  # a = sg r k atan(x / y)
    return c * y, -c * x, gz


# Cached, with reassociation as the only fast-math flag: with numba 0.68 a cache-loaded
# copy of this kernel compiled with the full fast-math set computes other last bits than a
# freshly compiled one, so an interrupted first run (chunks refined before the cache
# existed) resumed later would not be bit-identical. With {"reassoc"} alone (reductions
# still vectorise) fresh and cached copies agree bit for bit and run as fast (5 000
# candidates x 3 600 px with the PC free: 0.74 s vs 0.89 s on 2 cores), and a
# process loads the kernel in ~0.4 s instead of compiling it in ~4 s.
@nb.njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _refine_sums_numba(tables: np.ndarray, S: np.ndarray, pixels: np.ndarray, sx: float, sy: float,
                       patterns: np.ndarray, item_pattern: np.ndarray, quaternions: np.ndarray,
                       pcs: np.ndarray, n_params: int, taps: np.ndarray, used: np.ndarray,
                       out: np.ndarray) -> None:  # pragma: no cover
    """CPU twin of ``kernels/refine.cu::refine_sums``: fill ``out`` (m, 42).

    Without a PSF (one tap) ``pixels`` are the used pixels; with one they are
    the whole detector padded by the PSF's radius, blurred and then read at
    ``used`` (flat indices into the detector image)."""
    m = quaternions.shape[0]
    ngrid = pixels.shape[0]
    radius = (taps.shape[0] - 1) // 2
    blur = radius > 0
    npix = used.shape[0] if blur else ngrid
    width = int(sx)
    grid_width = width + 2 * radius
    grid_height = ngrid // grid_width if blur else 0
    ratio = sx / sy
    # One PC for every candidate (the usual case): the pixel directions are
    # the same for all of them and are computed once.
    common = True
    for i in range(1, m):
        for k in range(3):
            if pcs[i, k] != pcs[0, k]:
                common = False
    directions = np.empty((ngrid if common else 0, 4))
    if common and m > 0:
        for p in range(ngrid):
            xd = (pixels[p, 0] - np.float64(pcs[0, 0]) * sx) / sy
            yd = np.float64(pcs[0, 1]) - pixels[p, 1] / sy
            zd = np.float64(pcs[0, 2])
            wx = xd * S[0] + yd * S[3] + zd * S[6]
            wy = xd * S[1] + yd * S[4] + zd * S[7]
            wz = xd * S[2] + yd * S[5] + zd * S[8]
            wn = math.sqrt(wx * wx + wy * wy + wz * wz)
            directions[p, 0] = wx / wn
            directions[p, 1] = wy / wn
            directions[p, 2] = wz / wn
            directions[p, 3] = wn
    for i in nb.prange(m):
        r00, r01, r02, r10, r11, r12, r20, r21, r22 = rotation_matrix_scalar(
            quaternions[i, 0], quaternions[i, 1], quaternions[i, 2], quaternions[i, 3])
        pcx = np.float64(pcs[i, 0])
        pcy = np.float64(pcs[i, 1])
        pcz = np.float64(pcs[i, 2])
        dw = np.empty((3, 3))
        for k in range(3):
            dw[0, k] = -ratio * S[k]
            dw[1, k] = S[3 + k]
            dw[2, k] = S[6 + k]
        e_row = patterns[item_pattern[i]]
        # Pass 1: intensity and derivatives per pixel; pass 2: the sums as
        # contiguous dot products, which the compiler vectorises.
        values = np.empty(ngrid)
        D = np.zeros((6, ngrid))
        for p in range(ngrid):
            if common:
                vx = directions[p, 0]
                vy = directions[p, 1]
                vz = directions[p, 2]
                wn = directions[p, 3]
            else:
                xd = (pixels[p, 0] - pcx * sx) / sy
                yd = pcy - pixels[p, 1] / sy
                wx = xd * S[0] + yd * S[3] + pcz * S[6]
                wy = xd * S[1] + yd * S[4] + pcz * S[7]
                wz = xd * S[2] + yd * S[5] + pcz * S[8]
                wn = math.sqrt(wx * wx + wy * wy + wz * wz)
                vx = wx / wn
                vy = wy / wn
                vz = wz / wn
            ux = r00 * vx + r01 * vy + r02 * vz
            uy = r10 * vx + r11 * vy + r12 * vz
            uz = r20 * vx + r21 * vy + r22 * vz
            s = 1.0 if uz >= 0.0 else -1.0
            a, b = _lambert(ux, uy, uz, s)
            value, ga, gb = _bilinear3(tables, 0 if s > 0.0 else 1, a, b)
            gx, gy, gz = _lambert_gradient(ux, uy, uz, s, a, b, ga, gb)
            values[p] = value
            D[0, p] = uy * gz - uz * gy
            D[1, p] = uz * gx - ux * gz
            D[2, p] = ux * gy - uy * gx
            if n_params == 6:
                gsx = r00 * gx + r10 * gy + r20 * gz
                gsy = r01 * gx + r11 * gy + r21 * gz
                gsz = r02 * gx + r12 * gy + r22 * gz
                gv = gsx * vx + gsy * vy + gsz * vz
                for k in range(3):
                    gdw = gsx * dw[k, 0] + gsy * dw[k, 1] + gsz * dw[k, 2]
                    vdw = vx * dw[k, 0] + vy * dw[k, 1] + vz * dw[k, 2]
                    D[3 + k, p] = (gdw - gv * vdw) / wn
        if blur:
            # The camera's PSF on the projected pattern and (being linear) on
            # its derivatives: separable, rows then columns at the used pixels.
            channels = 1 + (n_params if n_params == 3 else 6)
            row_pass = np.empty((channels, grid_height * width))
            for c in range(channels):
                src = values if c == 0 else D[c - 1]
                for y in range(grid_height):
                    for x in range(width):
                        t = 0.0
                        for k in range(2 * radius + 1):
                            t += taps[k] * src[y * grid_width + x + k]
                        row_pass[c, y * width + x] = t
            values = np.empty(npix)
            D = np.zeros((6, npix))
            for c in range(channels):
                for p in range(npix):
                    t = 0.0
                    for k in range(2 * radius + 1):
                        t += taps[k] * row_pass[c, used[p] + k * width]
                    if c == 0:
                        values[p] = t
                    else:
                        D[c - 1, p] = t
        acc = np.zeros(N_SUMS)
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for p in range(npix):
            value = values[p]
            s0 += value
            s1 += value * value
            s2 += e_row[p] * value
        acc[0] = s0
        acc[1] = s1
        acc[2] = s2
        for j in range(n_params):
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            for p in range(npix):
                dj = D[j, p]
                t0 += dj
                t1 += values[p] * dj
                t2 += e_row[p] * dj
            acc[3 + j] = t0
            acc[9 + j] = t1
            acc[15 + j] = t2
            c = _TRIU_ROW[j]
            for k in range(j, n_params):
                t0 = 0.0
                for p in range(npix):
                    t0 += D[j, p] * D[k, p]
                acc[c + k - j] = t0
        for j in range(N_SUMS):
            out[i, j] = acc[j]


def _refine_sums_cuda(tables: Any, S: Any, pixels: Any, sx: float, sy: float, patterns: Any,
                      item_pattern: Any, quaternions: Any, pcs: Any, n_params: int, taps: Any,
                      used: Any, out: Any) -> None:
    """Launch ``kernels/refine.cu::refine_sums``; writes ``out`` in place.

    With a PSF the kernel needs :func:`_scratch_floats` floats of scratch per
    candidate: launched over slices of at most ``_PSF_BATCH`` candidates."""
    xp = backend.namespace(out)
    m = quaternions.shape[0]
    ngrid = pixels.shape[0]
    npix = used.shape[0]
    side = tables.shape[1]
    n_taps = taps.shape[0]
    kernel = backend.load_kernel("refine", "refine_sums")
    # One block per candidate: 128 threads walk its pixels with stride 128
    # (coalesced loads of pixel centres and of the experimental row; 60 x 60
    # patterns give 28 pixels per thread), each keeping 42 double partial sums
    # in registers; the block reduces them in 42 * 128 doubles (43 KB) of
    # shared memory. Fewer threads for tiny patterns so no warp idles.
    block = min(_GPU_THREADS, max(32, 1 << (npix - 1).bit_length()))
    shared = N_SUMS * block * np.dtype(np.float64).itemsize
    per_item = _scratch_floats(ngrid, n_taps, int(sx))
    step = m if per_item == 0 else _PSF_BATCH
    scratch = xp.empty(max(1, min(m, step) * per_item), dtype=xp.float32)
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        kernel((hi - lo,), (block,),
               (tables, np.int32(side), S, pixels, np.int32(ngrid), np.float32(sx), np.float32(sy),
                patterns, item_pattern[lo:hi], quaternions[lo:hi], pcs[lo:hi], np.int32(hi - lo),
                np.int32(n_params), taps, np.int32(n_taps), used, np.int32(npix), scratch,
                out[lo:hi]),
               shared_mem=shared)


def _scratch_floats(ngrid: int, n_taps: int, width: int) -> int:
    """Scratch floats per candidate of the CUDA kernel: 7 channels of the padded
    grid and of its row-blurred copy (0 without a PSF)."""
    if n_taps == 1:
        return 0
    grid_height = ngrid // (width + n_taps - 1)
    return 7 * (ngrid + grid_height * width)


@dataclass(frozen=True, eq=False)
class _Problem:
    """Everything the kernel needs that does not change between iterations."""

    xp: ModuleType
    tables: Any
    S: Any
    pixels: Any
    sx: float
    sy: float
    patterns: Any
    taps: Any
    used: Any

    @property
    def npix(self) -> int:
        return int(self.patterns.shape[1])

    def sums(self, item_pattern: Any, quaternions: Any, pcs: Any, n_params: int = 6) -> Any:
        """(m, 42) float64 sums on the device for the given candidates.

        With ``n_params = 3`` the pattern-centre derivatives are skipped (their
        sums are 0): orientation-only refinement costs less."""
        xp = self.xp
        m = int(quaternions.shape[0])
        out = xp.zeros((m, N_SUMS), dtype=xp.float64)
        if m == 0:
            return out
        q = xp.ascontiguousarray(quaternions, dtype=xp.float32)
        pc = xp.ascontiguousarray(pcs, dtype=xp.float32)
        ip = xp.ascontiguousarray(item_pattern, dtype=xp.int32)
        if xp is np:
            _refine_sums_numba(self.tables, self.S, self.pixels, self.sx, self.sy, self.patterns,
                               ip, q, pc, n_params, self.taps, self.used, out)
        else:
            _refine_sums_cuda(self.tables, self.S, self.pixels, self.sx, self.sy, self.patterns,
                              ip, q, pc, n_params, self.taps, self.used, out)
        return out


def _problem(patterns: Any, rmaster: RefinementMaster, detector: Detector,
             mask: np.ndarray | None) -> _Problem:
    xp = backend.namespace(patterns)
    sy, sx = detector.shape
    rows, cols = np.divmod(np.arange(sy * sx), sx)
    if mask is not None:
        keep = np.asarray(backend.to_host(mask), dtype=bool)
        if keep.shape != tuple(detector.shape):
            raise ValueError(f"mask shape {keep.shape} differs from the detector shape "
                             f"{tuple(detector.shape)}")
        rows, cols = rows[keep.ravel()], cols[keep.ravel()]
    if rows.size != patterns.shape[1]:
        raise ValueError(f"patterns have {patterns.shape[1]} pixels per row but the detector "
                         f"{detector.shape} and mask give {rows.size}")
    used = (rows * sx + cols).astype(np.int32)
    taps = gaussian_taps(rmaster.psf)
    if taps.size > 1:
        # Evaluate on the detector padded by the PSF's radius (light from
        # just outside the screen's edge reaches its edge pixels), blur, read.
        radius = (taps.size - 1) // 2
        rows, cols = np.divmod(np.arange((sy + 2 * radius) * (sx + 2 * radius)), sx + 2 * radius)
        rows, cols = rows - radius, cols - radius
    pixels = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float32)
    S = sample_to_detector_matrix(detector).astype(np.float32).ravel()
    return _Problem(xp=xp, tables=xp.asarray(rmaster.tables), S=xp.asarray(S),
                    pixels=xp.asarray(pixels), sx=float(sx), sy=float(sy),
                    patterns=xp.ascontiguousarray(patterns, dtype=xp.float32),
                    taps=xp.asarray(taps), used=xp.asarray(used))


# ------------------------------------------------------- sums -> NCC, ∇, JᵀJ


def correlation_terms(sums: Any, npix: int) -> tuple[Any, Any, Any]:
    """NCC, its gradient and the Gauss–Newton matrix from the kernel's sums.

    Parameters
    ----------
    sums : (m, 42) float64 array
        Output of the refinement kernel.
    npix
        Pixels summed over.

    Returns
    -------
    ncc : (m,) array
        0 where the projected pattern is constant.
    gradient : (m, 6) array
        ∂NCC/∂(δ₁, δ₂, δ₃, PCx, PCy, PCz).
    hessian : (m, 6, 6) array
        ``NCC · JᵀJ`` with ``J`` the Jacobian of the normalised projected
        pattern: the Newton approximation of ``-∇²NCC`` (positive semi-definite).
    """
    xp = backend.namespace(sums)
    s1, s2, se = sums[:, 0], sums[:, 1], sums[:, 2]
    a, b, c = sums[:, 3:9], sums[:, 9:15], sums[:, 15:21]
    mean = s1 / npix
    norm2 = s2 - s1 * mean
    ok = norm2 > 1e-12 * xp.maximum(s2, 1e-300)
    norm = xp.sqrt(xp.where(ok, norm2, 1.0))
    ncc = xp.where(ok, se / norm, 0.0)
    sd = (b - mean[:, None] * a) / norm[:, None]
    gradient = xp.where(ok[:, None], (c - ncc[:, None] * sd) / norm[:, None], 0.0)
    g = xp.zeros((sums.shape[0], 6, 6), dtype=xp.float64)
    g[:, _TRIU[0], _TRIU[1]] = sums[:, 21:]
    g[:, _TRIU[1], _TRIU[0]] = sums[:, 21:]
    hessian = (g - a[:, :, None] * a[:, None, :] / npix - sd[:, :, None] * sd[:, None, :])
    # -∇²NCC = <e, -∇²s> ≈ NCC · JᵀJ when e = NCC · s + noise (<s, ∇²s> = -JᵀJ
    # for unit s): plain Gauss–Newton (JᵀJ alone) assumes small residuals and
    # would shorten every step by the factor NCC (0.1–0.4 for real patterns).
    weight = xp.maximum(ncc, _MIN_CURVATURE_NCC) / (norm2 + (~ok))
    hessian = xp.where(ok[:, None, None], hessian * weight[:, None, None], 0.0)
    return ncc, gradient, hessian


# ------------------------------------------------------------- quaternions


def _rotate(xp: ModuleType, delta: Any, q: Any) -> Any:
    """``exp(delta) ⊗ q`` for rotation vectors ``delta`` (m, 3) in radians, ``a >= 0``."""
    angle = xp.sqrt((delta * delta).sum(axis=1))
    half = 0.5 * angle
    scale = xp.where(angle > 0, xp.sin(half) / xp.where(angle > 0, angle, 1.0), 0.5)
    pa, pv = xp.cos(half), delta * scale[:, None]
    qa, qv = q[:, 0], q[:, 1:]
    out = xp.empty_like(q)
    out[:, 0] = pa * qa - (pv * qv).sum(axis=1)
    out[:, 1:] = pa[:, None] * qv + qa[:, None] * pv + xp.cross(pv, qv)
    out /= xp.sqrt((out * out).sum(axis=1))[:, None]
    return out * xp.where(out[:, :1] < 0, -1.0, 1.0)


def _symmetry_quaternions(master: MasterPattern) -> np.ndarray:
    """(s, 4) proper rotations of the master pattern's Laue group."""
    return np.asarray(master.phase.point_group.laue_proper_subgroup.data, dtype=np.float64)


def distinct_starts(quaternions: np.ndarray, symmetry: np.ndarray, angle: float) -> np.ndarray:
    """Which of each pattern's ranked candidates are worth refining.

    Candidate ``j`` is kept unless a better-ranked kept candidate lies within
    ``angle`` degrees of it (disorientation under the crystal symmetry).

    Parameters
    ----------
    quaternions : (n, k, 4) array
        Candidates, best first.
    symmetry : (s, 4) array
        Proper symmetry rotations of the crystal (crystal frame).
    angle
        Degrees.

    Returns
    -------
    keep : (n, k) bool array (column 0 always True)
    """
    n, k, _ = quaternions.shape
    keep = np.zeros((n, k), dtype=bool)
    keep[:, 0] = True
    if k == 1:
        return keep
    cos_half = math.cos(math.radians(angle) / 2)
    # Symmetry-equivalent candidates s ⊗ q: (n, k, s, 4).
    sa, sv = symmetry[:, 0], symmetry[:, 1:]
    qa, qv = quaternions[..., 0], quaternions[..., 1:]
    eq = np.empty((n, k, len(symmetry), 4))
    eq[..., 0] = sa * qa[..., None] - np.einsum("sc,nkc->nks", sv, qv)
    eq[..., 1:] = (sa[:, None] * qv[:, :, None, :] + qa[..., None, None] * sv
                   + np.cross(sv[None, None], qv[:, :, None, :]))
    for j in range(1, k):
        # |<q_j, s ⊗ q_l>| for the better candidates l < j.
        dots = np.abs(np.einsum("nc,nlsc->nls", quaternions[:, j], eq[:, :j])).max(axis=2)
        near = (dots >= cos_half) & keep[:, :j]
        keep[:, j] = ~near.any(axis=1)
    return keep


# ------------------------------------------------------------ the optimiser


@dataclass
class _State:
    """Levenberg–Marquardt state of every candidate (device arrays)."""

    q: Any
    pc: Any
    ncc: Any
    grad: Any
    hess: Any
    radius: Any      # rotation trust radius, radians
    pc_radius: Any
    lam: Any
    iterations: Any
    active: Any      # host bool


def _init_state(problem: _Problem, item_pattern: Any, q: Any, pc: Any,
                config: RefineConfig, n_params: int) -> _State:
    xp = problem.xp
    m = int(q.shape[0])
    ncc, grad, hess = correlation_terms(problem.sums(item_pattern, q, pc, n_params), problem.npix)
    return _State(
        q=q, pc=pc, ncc=ncc, grad=grad, hess=hess,
        radius=xp.full(m, math.radians(config.trust_radius)),
        pc_radius=xp.full(m, float(config.pc_trust_radius)),
        lam=xp.full(m, 1e-3), iterations=xp.zeros(m, dtype=xp.int32),
        active=backend.to_host(ncc != 0).astype(bool))


def _lm_step(xp: ModuleType, hess: Any, grad: Any, lam: Any, free: slice) -> Any:
    """Damped Gauss–Newton step for the parameters ``free`` (Marquardt scaling)."""
    h = hess[:, free, free]
    d = xp.diagonal(h, axis1=1, axis2=2)
    n = h.shape[-1]
    eye = xp.eye(n)
    scale = xp.maximum(d, 1e-12 * xp.maximum(d.max(axis=1, keepdims=True), 1e-300))
    damped = h + (lam[:, None] * scale + 1e-300)[:, :, None] * eye[None]
    return xp.linalg.solve(damped, grad[:, free, None])[..., 0]


def _clamp(xp: ModuleType, step: Any, radius: Any, pc_radius: Any, with_pc: bool) -> Any:
    """Shorten each step to its trust radii (rotation and PC parts separately)."""
    rot = xp.sqrt((step[:, :3] ** 2).sum(axis=1))
    factor = xp.minimum(1.0, radius / xp.maximum(rot, 1e-300))
    if with_pc:
        pcn = xp.sqrt((step[:, 3:] ** 2).sum(axis=1))
        factor = xp.minimum(factor, pc_radius / xp.maximum(pcn, 1e-300))
    return step * factor[:, None]


def _small(xp: ModuleType, step: Any, tol: float, pc_tol: float, with_pc: bool) -> Any:
    """(m,) bool: rotation step below ``tol`` radians (and PC step below ``pc_tol``)."""
    small = xp.sqrt((step[:, :3] ** 2).sum(axis=1)) < tol
    if with_pc:
        small &= xp.sqrt((step[:, 3:] ** 2).sum(axis=1)) < pc_tol
    return small


def _run_lm(problem: _Problem, item_pattern: Any, state: _State, config: RefineConfig,
            with_pc: bool, progress: Callable[[int], None] | None = None) -> _State:
    """Iterate every active candidate to convergence; returns the updated state."""
    xp = problem.xp
    free = slice(0, 6) if with_pc else slice(0, 3)
    tol = math.radians(config.tolerance)
    max_radius = 4 * math.radians(config.trust_radius)
    max_pc_radius = 4 * config.pc_trust_radius
    for _ in range(config.max_iterations):
        idx_host = np.flatnonzero(state.active)
        if idx_host.size == 0:
            break
        idx = xp.asarray(idx_host)
        step = _lm_step(xp, state.hess[idx], state.grad[idx], state.lam[idx], free)
        # A point whose own Newton step is below the tolerances is stationary:
        # it has converged without evaluating that step.
        stationary = backend.to_host(_small(xp, step, tol, config.pc_tolerance, with_pc))
        if stationary.any():
            state.active[idx_host[stationary]] = False
            if progress is not None:
                progress(int(stationary.sum()))
            idx_host = idx_host[~stationary]
            if idx_host.size == 0:
                break
            idx = xp.asarray(idx_host)
            step = step[xp.asarray(np.flatnonzero(~stationary))]
        step = _clamp(xp, step, state.radius[idx], state.pc_radius[idx], with_pc)
        q_try = _rotate(xp, step[:, :3], state.q[idx])
        pc_try = state.pc[idx] + step[:, 3:] if with_pc else state.pc[idx]
        ncc, grad, hess = correlation_terms(
            problem.sums(item_pattern[idx], q_try, pc_try, 6 if with_pc else 3), problem.npix)
        better = ncc > state.ncc[idx]
        rot_step = xp.sqrt((step[:, :3] ** 2).sum(axis=1))
        small = _small(xp, step, tol, config.pc_tolerance, with_pc)
        acc = idx[better]
        state.q[acc] = q_try[better]
        state.pc[acc] = pc_try[better]
        state.ncc[acc] = ncc[better]
        state.grad[acc] = grad[better]
        state.hess[acc] = hess[better]
        state.iterations[idx] += 1
        # A rejected step shrinks the radius to a quarter of that step, so the
        # next trial is shorter even when the step was inside the radius.
        state.radius[idx] = xp.where(better, xp.minimum(2 * state.radius[idx], max_radius),
                                     xp.minimum(state.radius[idx], rot_step) / 4)
        if with_pc:
            pc_step = xp.sqrt((step[:, 3:] ** 2).sum(axis=1))
            state.pc_radius[idx] = xp.where(
                better, xp.minimum(2 * state.pc_radius[idx], max_pc_radius),
                xp.minimum(state.pc_radius[idx], pc_step) / 4)
        state.lam[idx] = xp.where(better, xp.maximum(state.lam[idx] / 3, 1e-9),
                                  xp.minimum(state.lam[idx] * 4, 1e9))
        shrunk = state.radius[idx] < tol
        if with_pc:
            shrunk &= state.pc_radius[idx] < config.pc_tolerance
        done = backend.to_host((better & small) | shrunk)
        state.active[idx_host[done]] = False
        if progress is not None:
            progress(int(done.sum()))
    return state


def fit_shared_pattern_centre(patterns: Any, rmaster: RefinementMaster, detector: Detector,
                              quaternions: Any, *, mask: np.ndarray | None = None,
                              config: RefineConfig = RefineConfig()) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit one pattern centre to a set of patterns jointly with their orientations.

    Levenberg–Marquardt on the sum of the NCCs over ``3 n + 3`` parameters:
    each iteration solves the normal equations by eliminating every pattern's
    3 × 3 orientation block (Schur complement), so the shared PC step is a
    3 × 3 solve and the orientation steps follow by back-substitution. A step
    is accepted when the summed NCC rises.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Zero-mean unit-norm experimental rows (the subset to fit on), on the
        device to use.
    rmaster
        From :func:`refinement_master`.
    detector
        Detector with the starting PC.
    quaternions : (n, 4) array
        Starting orientations (e.g. the best dictionary matches).
    mask
        Signal mask the rows were taken over.
    config
        Trust radii, tolerances and iteration limit.

    Returns
    -------
    pc : (3,) float64
        Fitted Bruker PC.
    quaternions : (n, 4) float64
        Orientations refined with it.
    ncc : float
        Mean NCC at the fit.
    """
    n = int(np.shape(backend.to_host(quaternions))[0])
    jacobian = np.broadcast_to(np.eye(3), (n, 3, 3))
    shift, q, ncc = fit_linear_pattern_centres(patterns, rmaster, detector, quaternions, jacobian,
                                               mask=mask, config=config)
    return np.asarray(detector.pc, dtype=np.float64) + shift, q, ncc


def fit_linear_pattern_centres(patterns: Any, rmaster: RefinementMaster, detector: Detector,
                               quaternions: Any, jacobian: np.ndarray, *,
                               base: np.ndarray | None = None,
                               mask: np.ndarray | None = None,
                               config: RefineConfig = RefineConfig()
                               ) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit PCs that are linear in shared parameters, jointly with the orientations.

    Pattern ``i`` sees the PC ``base[i] + jacobian[i] @ theta`` (e.g. a PC
    field over beam position, :mod:`dpm.calibration`); ``theta`` (``k``
    parameters, from 0) and every orientation are fitted by Levenberg–Marquardt
    on the sum of the NCCs, each pattern's 3 × 3 orientation block eliminated
    (Schur complement), so a step is one ``k × k`` solve. The PC trust radius
    bounds the largest PC change of any pattern.

    Parameters
    ----------
    patterns, rmaster, detector, quaternions, mask, config
        As :func:`fit_shared_pattern_centre`.
    jacobian : (n, 3, k) float array
        ``d PC_i / d theta``.
    base : (n, 3) float array, optional
        Each pattern's PC at ``theta = 0`` (default: the detector's PC).

    Returns
    -------
    theta : (k,) float64
        Fitted parameters.
    quaternions : (n, 4) float64
        Orientations refined with them.
    ncc : float
        Mean NCC at the fit.
    """
    det = as_detector(detector)
    problem = _problem(patterns, rmaster, det, mask)
    xp = problem.xp
    n = int(patterns.shape[0])
    jac_host = np.asarray(jacobian, dtype=np.float64)
    if jac_host.ndim != 3 or jac_host.shape[:2] != (n, 3):
        raise ValueError(f"jacobian must have shape (n, 3, k) with n = {n}, got "
                         f"{jac_host.shape}")
    k = jac_host.shape[2]
    jac = xp.asarray(jac_host)
    item_pattern = xp.arange(n, dtype=xp.int32)
    q = xp.asarray(backend.to_host(quaternions), dtype=xp.float64).reshape(n, 4)
    base_host = np.broadcast_to(np.asarray(det.pc, dtype=np.float64), (n, 3)) if base is None \
        else np.asarray(base, dtype=np.float64)
    if base_host.shape != (n, 3):
        raise ValueError(f"base must have shape (n, 3) = ({n}, 3), got {base_host.shape}")
    start = xp.asarray(np.ascontiguousarray(base_host))
    theta = xp.zeros(k)

    def pcs_of(t: Any) -> Any:
        return start + xp.matmul(jac, t[:, None])[..., 0]

    ncc, grad, hess = correlation_terms(problem.sums(item_pattern, q, pcs_of(theta)), problem.npix)
    total = float(backend.to_host(ncc.sum()))
    radius, pc_radius, lam = math.radians(config.trust_radius), config.pc_trust_radius, 1e-3
    tol = math.radians(config.tolerance)
    eye_k = xp.eye(k)
    for _ in range(config.max_iterations):
        schur, rhs, a_inv_op, a_inv_go = _profiled_terms(xp, grad, hess, jac, lam)
        schur, rhs = schur.sum(axis=0), rhs.sum(axis=0)
        schur = schur + lam * xp.diagonal(schur) * eye_k + 1e-300 * eye_k
        dt = xp.linalg.solve(schur, rhs[:, None])[:, 0]
        moves = xp.matmul(jac, dt[:, None])[..., 0]             # (n, 3) PC changes
        dp_norm = float(backend.to_host(xp.sqrt((moves * moves).sum(axis=1)).max()))
        if dp_norm > pc_radius:
            dt = dt * (pc_radius / dp_norm)
            dp_norm = pc_radius
        do = a_inv_go - (a_inv_op * dt[None, None, :]).sum(axis=2)
        rot = xp.sqrt((do * do).sum(axis=1))
        do = do * xp.minimum(1.0, radius / xp.maximum(rot, 1e-300))[:, None]
        q_try = _rotate(xp, do, q)
        theta_try = theta + dt
        n_try, g_try, h_try = correlation_terms(
            problem.sums(item_pattern, q_try, pcs_of(theta_try)), problem.npix)
        t_try = float(backend.to_host(n_try.sum()))
        max_rot = float(backend.to_host(rot.max()))
        if t_try > total:
            q, theta, ncc, grad, hess, total = q_try, theta_try, n_try, g_try, h_try, t_try
            radius, pc_radius, lam = (min(2 * radius, 4 * math.radians(config.trust_radius)),
                                      min(2 * pc_radius, 4 * config.pc_trust_radius), max(lam / 3, 1e-9))
            if dp_norm < config.pc_tolerance and max_rot < tol:
                break
        else:
            radius, pc_radius, lam = radius / 4, pc_radius / 4, min(lam * 4, 1e9)
            if pc_radius < config.pc_tolerance and radius < tol:
                break
    return backend.to_host(theta), backend.to_host(q), total / n


def _profiled_terms(xp: ModuleType, grad: Any, hess: Any, jac: Any,
                    lam: float) -> tuple[Any, Any, Any, Any]:
    """Each pattern's NCC terms in shared PC parameters with its orientation eliminated.

    With the orientation block ``A = H_oo`` (damped by ``lam`` on its diagonal),
    ``H_op = H_o,pc J`` and ``H_pp = Jᵀ H_pc,pc J``: per pattern, the Schur
    complement ``H_pp − H_opᵀ A⁻¹ H_op`` (n, k, k), the profiled gradient
    ``Jᵀ g_pc − H_opᵀ A⁻¹ g_o`` (n, k), ``A⁻¹ H_op`` (n, 3, k) and ``A⁻¹ g_o``
    (n, 3) for the back-substitution of the orientation steps.
    """
    jac_t = xp.swapaxes(jac, 1, 2)
    h_oo = hess[:, :3, :3]
    h_op = xp.matmul(hess[:, :3, 3:], jac)                     # (n, 3, k)
    h_po = xp.swapaxes(h_op, 1, 2)
    h_pp = xp.matmul(jac_t, xp.matmul(hess[:, 3:, 3:], jac))
    g_p = xp.matmul(jac_t, grad[:, 3:, None])[..., 0]         # (n, k)
    d_oo = xp.diagonal(h_oo, axis1=1, axis2=2)
    a = h_oo + (lam * xp.maximum(d_oo, 1e-30))[:, :, None] * xp.eye(3)[None]
    a_inv = xp.linalg.inv(a)
    a_inv_op = xp.matmul(a_inv, h_op)
    a_inv_go = xp.matmul(a_inv, grad[:, :3, None])[..., 0]
    schur = h_pp - xp.matmul(h_po, a_inv_op)
    rhs = g_p - xp.matmul(h_po, a_inv_go[..., None])[..., 0]
    return schur, rhs, a_inv_op, a_inv_go


def linear_pattern_centre_covariance(patterns: Any, rmaster: RefinementMaster,
                                     detector: Detector, quaternions: Any, pcs: np.ndarray,
                                     jacobian: np.ndarray, *,
                                     mask: np.ndarray | None = None) -> np.ndarray:
    """Covariance of the shared PC parameters of :func:`fit_linear_pattern_centres` at its fit.

    The sandwich (cluster-robust) estimate ``S⁻¹ (Σ uᵢ uᵢᵀ) S⁻¹ · n / (n − k)``, with
    ``S`` the summed Schur complement of the NCC's Gauss–Newton matrix (orientations
    eliminated) and ``uᵢ`` each pattern's profiled gradient: how much the fitted
    parameters would scatter between sets of calibration patterns, whatever the noise.

    Parameters
    ----------
    patterns, rmaster, detector, mask
        As :func:`fit_linear_pattern_centres`.
    quaternions : (n, 4) array
        The orientations it returned.
    pcs : (n, 3) float array
        Each pattern's PC at the fit.
    jacobian : (n, 3, k) float array
        ``d PC_i / d theta``.

    Returns
    -------
    (k, k) float64 array
    """
    det = as_detector(detector)
    problem = _problem(patterns, rmaster, det, mask)
    xp = problem.xp
    n = int(patterns.shape[0])
    k = int(np.shape(jacobian)[2])
    if n <= k:
        raise ValueError(f"{n} patterns cannot give the covariance of {k} parameters")
    q = xp.asarray(backend.to_host(quaternions), dtype=xp.float64).reshape(n, 4)
    _, grad, hess = correlation_terms(
        problem.sums(xp.arange(n, dtype=xp.int32), q,
                     xp.asarray(np.ascontiguousarray(pcs, dtype=np.float64))), problem.npix)
    schur, u, _, _ = _profiled_terms(xp, grad, hess, xp.asarray(jacobian, dtype=xp.float64), 0.0)
    s_inv = np.linalg.pinv(backend.to_host(schur.sum(axis=0)))
    u = backend.to_host(u)
    return s_inv @ (u.T @ u) @ s_inv * (n / (n - k))


def _refine_candidates(problem: _Problem, item_pattern: Any, q0: Any, pcs: Any,
                       pattern_of: np.ndarray, n: int, config: RefineConfig, with_pc: bool,
                       report: Callable[[int], None]) -> _State:
    """Levenberg–Marquardt for one batch of candidates, with successive halving."""
    state = _init_state(problem, item_pattern, q0, pcs, config, 6 if with_pc else 3)
    report(int((~state.active).sum()))
    # Successive halving: candidates far below their pattern's best NCC cannot
    # win once every candidate is near its maximum; they stop early.
    # Not with a per-pattern PC: a start NCC then also reflects the PC error.
    done = 0
    for after, fraction in () if with_pc else _PRUNE_SCHEDULE:
        if after > done:
            state = _run_lm(problem, item_pattern, state,
                            replace(config, max_iterations=min(after, config.max_iterations) - done),
                            with_pc=with_pc, progress=report)
            done = min(after, config.max_iterations)
        ncc_now = backend.to_host(state.ncc)
        best = np.zeros(n)
        np.maximum.at(best, pattern_of, ncc_now)
        dominated = state.active & (ncc_now < fraction * best[pattern_of])
        state.active &= ~dominated
        report(int(dominated.sum()))
    if config.max_iterations > done:
        state = _run_lm(problem, item_pattern, state,
                        replace(config, max_iterations=config.max_iterations - done),
                        with_pc=with_pc, progress=report)
    return state


def refine(
    patterns: Any,
    master: MasterPattern | RefinementMaster,
    detector: Detector | EBSDDetector,
    starts: Any,
    *,
    mask: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    config: RefineConfig = RefineConfig(),
    progress: bool | Callable[[int, int], None] = False,
    pcs: np.ndarray | None = None,
) -> RefineResult:
    """Refine the orientations (and optionally pattern centres) of many patterns.

    Parameters
    ----------
    patterns : (n, npix) float32 array
        Experimental patterns as :func:`dpm.match.prepare_patterns` returns
        them (zero mean, unit norm over the masked pixels), NumPy or CuPy; the
        refinement runs on their device.
    master
        Master pattern (low-passed to the detector's pixel size here) or a
        :class:`RefinementMaster` prepared once with :func:`refinement_master`.
    detector
        Detector geometry and starting PC (Bruker convention).
    starts : (n, k, 4) or (n, 4) array
        Candidate orientations per pattern, best first (dictionary matches).
    mask : (sy, sx) bool array, optional
        Signal mask the rows were taken over.
    valid : (n,) bool array, optional
        Patterns to refine (default: rows that are not all zero).
    config
        Options.
    progress
        False, True (tqdm bar over candidates) or ``progress(done, total)``.
    pcs : (n, 3) float array, optional
        Each pattern's own PC (Bruker), e.g. from a PC field
        (:mod:`dpm.calibration`), used instead of the detector's: kept with
        ``pattern_centre="fixed"``, the start with ``"pattern"``; not with
        ``"shared"``.

    Returns
    -------
    RefineResult
    """
    det = as_detector(detector)
    rmaster = master if isinstance(master, RefinementMaster) else refinement_master(
        master, det, psf=config.psf)
    problem = _problem(patterns, rmaster, det, mask)
    xp = problem.xp
    n = int(patterns.shape[0])
    starts_host = np.asarray(backend.to_host(starts), dtype=np.float64)
    if starts_host.ndim == 2:
        starts_host = starts_host[:, None, :]
    if starts_host.ndim != 3 or starts_host.shape[0] != n or starts_host.shape[2] != 4:
        raise ValueError(f"starts must have shape (n, k, 4) or (n, 4) with n = {n}, "
                         f"got {np.shape(backend.to_host(starts))}")
    norms = np.linalg.norm(starts_host[:, :config.n_starts], axis=2, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError("starts contain non-finite or zero quaternions")
    starts_host = starts_host[:, :config.n_starts] / norms
    if valid is None:
        valid_host = backend.to_host(xp.abs(problem.patterns).max(axis=1) > 0)
    else:
        valid_host = np.asarray(backend.to_host(valid), dtype=bool)
    keep = distinct_starts(starts_host, _symmetry_quaternions(rmaster.master),
                           config.distinct_angle) & valid_host[:, None]
    pattern_of, start_of = np.nonzero(keep)
    q0 = starts_host[pattern_of, start_of]
    pc_start = np.asarray(det.pc, dtype=np.float64)
    if pcs is not None:
        pcs = np.asarray(pcs, dtype=np.float64)
        if pcs.shape != (n, 3) or not np.isfinite(pcs).all():
            raise ValueError(f"pcs must be finite with shape (n, 3) = ({n}, 3), got shape "
                             f"{pcs.shape}")
        if config.pattern_centre == "shared":
            raise ValueError("per-pattern pcs and pattern_centre='shared' exclude each other: "
                             "a shared PC is one PC for every pattern")
    # Candidates in batches of whole patterns, sized from the byte budget.
    batch = max(1, backend.memory_budget(xp, config.memory_budget) // _BYTES_PER_CANDIDATE)

    if config.pattern_centre == "shared":
        best = np.flatnonzero(valid_host)
        score0 = np.full(n, -np.inf)
        for lo in range(0, len(best), batch):
            part = best[lo:lo + batch]
            ncc0 = correlation_terms(problem.sums(
                xp.asarray(part.astype(np.int32)), xp.asarray(starts_host[part, 0]),
                xp.tile(xp.asarray(pc_start), (len(part), 1)), 3), problem.npix)[0]
            score0[part] = backend.to_host(ncc0)
        subset = best[np.argsort(-score0[best], kind="stable")[:config.pc_subset]]
        pc_start, _, _ = fit_shared_pattern_centre(
            problem.patterns[xp.asarray(subset)], rmaster, replace(det, pc=tuple(pc_start)),
            starts_host[subset, 0], mask=mask, config=config)
        log.info("shared pattern centre fitted on %d patterns: %s", len(subset), pc_start)

    with_pc = config.pattern_centre == "pattern"
    quats = starts_host[:, 0].copy()
    quats *= np.where(quats[:, :1] < 0, -1.0, 1.0)
    scores = np.zeros(n, dtype=np.float32)
    pcs_start = np.tile(pc_start, (n, 1)) if pcs is None else pcs
    pcs_out = pcs_start.copy()
    iterations = np.zeros(n, dtype=np.int32)
    start = np.full(n, -1, dtype=np.int32)
    report, close = _progress(progress, len(pattern_of))
    hi = 0
    while hi < len(pattern_of):
        lo, hi = hi, min(hi + batch, len(pattern_of))
        if hi < len(pattern_of):  # end on a pattern boundary (one pattern at least)
            boundary = int(np.searchsorted(pattern_of[lo:hi], pattern_of[hi], side="left"))
            hi = lo + boundary if boundary > 0 else int(
                lo + np.searchsorted(pattern_of[lo:], pattern_of[lo], side="right"))
        part = slice(lo, hi)
        state = _refine_candidates(problem, xp.asarray(pattern_of[part].astype(np.int32)),
                                   xp.asarray(q0[lo:hi]),
                                   xp.asarray(pcs_start[pattern_of[part]]),
                                   pattern_of[part], n, config, with_pc, report)
        ncc = backend.to_host(state.ncc)
        order = np.lexsort((-ncc, pattern_of[part]))     # by pattern, best NCC first
        first = np.ones(len(order), dtype=bool)
        first[1:] = pattern_of[part][order][1:] != pattern_of[part][order][:-1]
        best_item = order[first]
        rows = pattern_of[part][best_item]
        quats[rows] = backend.to_host(state.q)[best_item]
        scores[rows] = ncc[best_item]
        pcs_out[rows] = backend.to_host(state.pc)[best_item]
        iterations[rows] = backend.to_host(state.iterations)[best_item]
        start[rows] = start_of[part][best_item]
    close()
    if config.pattern_centre == "shared":
        pcs_out[:] = pc_start
    return RefineResult(quaternions=quats, scores=scores, pcs=pcs_out, iterations=iterations,
                        start=start)


def _progress(progress: bool | Callable[[int, int], None], total: int):
    """``(report(newly_done), close())`` for a progress option."""
    if callable(progress):
        done = [0]

        def report(k: int) -> None:
            done[0] += k
            progress(done[0], total)

        return report, lambda: None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="refine", unit="candidate")
        return bar.update, bar.close
    return (lambda k: None), (lambda: None)
