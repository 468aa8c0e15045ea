"""The indexing pipeline: raw patterns in, an orix CrystalMap out.

:func:`index` strings the stages together from one :class:`IndexConfig`:

1. read the stack lazily (:mod:`dpm.io.readers`) and check it against the
   detector; resolve the signal mask (given, circular, detector shadow, image);
2. preprocess every pattern chunk by chunk — static and dynamic background,
   binning, Gaussian filter, neighbour averaging, rescaling — and normalise it
   (:mod:`dpm.preprocess`, :func:`dpm.match.prepare_patterns`);
3. band contrast and image quality of every pattern (:mod:`dpm.quality`), or
   the band contrast stored in the file;
4. take the master pattern given, read it from a file, or simulate it (:mod:`dpm.master`);
5. sample the fundamental zone (:mod:`dpm.sampling`) and match every pattern
   against the dictionary projected chunk by chunk (:mod:`dpm.dictionary`,
   :mod:`dpm.match`), keeping the best ``keep`` matches;
   Before the chunks, the PC field of the map is calibrated on patterns
   spread over it (:mod:`dpm.calibration`, ``pc_field``), after the map's PC
   is found in a search box when none is known (``pc_search``);
6. refine the orientation (and optionally the pattern centre) of every
   pattern from its best matches (:mod:`dpm.refine`), each at its own PC
   from the field;
7. find zero solutions and replace those that diffract (band contrast above
   the threshold) from their neighbours, then remove wild spikes and fill zero
   solutions from 6, then 5 agreeing neighbours (:mod:`dpm.cleanup`), then
   re-match grains in the 60° <111> pseudo-symmetry relation against both
   candidates (:mod:`dpm.pseudo_symmetry`);
8. return the map with every per-pixel property, timings and stage records.

The CLI (:mod:`dpm.cli`) is a thin shell over this module.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpm import backend
from dpm.boundaries import BoundaryConfig
from dpm.calibration import CalibrationConfig, PCSearchConfig
from dpm.cleanup import MapCleanupConfig, ZeroSolutionConfig
from dpm.grains import GrainConfig, Grid, check_grid
from dpm.preprocess import PreprocessConfig
from dpm.pseudo_symmetry import PseudoSymmetryConfig
from dpm.refine import RefineConfig
from dpm.search import SearchConfig

log = logging.getLogger("dpm")

#: Stages of :class:`IndexConfig` that work on refined orientations (None = off).
NEEDS_REFINE = ("zero_solutions", "cleanup", "pseudo_symmetry")
#: ``IndexConfig.pc_field`` values and the PC field model each fits (:mod:`dpm.calibration`).
PC_FIELD_MODELS = {"auto": "constrained", "plane": "plane", "constant": "constant"}


@dataclass(frozen=True)
class IndexConfig:
    """Everything :func:`index` and ``dpm index`` can be told.

    Attributes
    ----------
    kv
        Beam energy in kV for a simulated master pattern.
    npx
        Half-width of a simulated master pattern's Lambert grid.
    method
        Master-pattern simulation method when none is given: ``"dynamical"``
        (Bloch waves; Li and Na at 20 and 10 kV with ``npx = 250`` come
        shipped, anything else is simulated once and cached) or ``"kinematical"``.
    resolution
        Orientation sampling of the dictionary in degrees.
    keep
        Best matches kept per pattern.
    search
        How the dictionary is searched (:mod:`dpm.search`): coarse-to-fine by
        default (a coarse grid first, then the fine grid near each pattern's
        best coarse matches; the exhaustive result on ≥ 99.9 % of diffracting
        pixels at a fraction of the work), or exhaustive.
    pixel_integration
        Low-pass the master pattern before projecting the dictionary
        (:func:`dpm.projection.integrate_pixels`) to the detector's pixel size
        and to the orientation spread of a grid cell (σ = resolution / 2, the
        angular standard deviation of a cell), so dictionary patterns
        approximate what binned camera pixels record and stay representative
        across their cell.
    refine
        Refine orientations after matching (:mod:`dpm.refine`), starting from
        the best ``keep`` matches, with the sharp master pattern. False also
        turns off the stages that need refined orientations
        (:data:`NEEDS_REFINE`: zero solutions, cleanup, pseudo-symmetry).
    refinement
        Refinement options (pattern-centre mode, starts, trust region, tolerances).
    zero_solutions
        Zero-solution detection and neighbour replacement options
        (:mod:`dpm.cleanup`; needs ``refine``); None skips the stage.
    cleanup
        Map cleanup after the zero-solution replacement (:func:`dpm.cleanup.clean_map`:
        wild spikes, then zero-solution fill from 6, then 5 agreeing neighbours;
        pixels with band contrast at or below the zero-solution threshold, pores,
        are never filled); None skips it. Needs ``refine``.
    pseudo_symmetry
        Pseudo-symmetry cleanup after the map cleanup
        (:func:`dpm.pseudo_symmetry.clean_pseudo_symmetry`: grains in the
        60° <111> relation re-matched against both candidates, a pixel
        changed only where its pattern prefers the other); None skips it.
        With the default axis (None, <111>) it runs on m-3m phases only and
        is skipped, with a log message, for others. Needs ``refine``.
    mask
        Signal mask when the call gives none: ``"none"``, ``"circular"``,
        ``"shadow"`` (estimated from the static background) or an image path
        (.png or .npy; bright/True = used).
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``.
    memory_budget
        Bytes the run may use (None: half the free memory of the device). It
        sets the chunk size (a quarter for a chunk's patterns, half for its
        matching, a quarter for refinement and the rows the map stages
        re-read) and whether the dictionary is kept in memory or read from
        the on-disk cache (:mod:`dpm.chunks`); peak memory does not grow with
        the number of patterns.
    chunk_size
        Patterns per chunk at most (fewer when the budget asks).
    preprocess
        Preprocessing steps.
    grid
        The map grid, ``"square"`` or ``"hexagonal"`` (the .ang HexGrid
        layout of :mod:`dpm.cleanup`); it sets the ``grid`` of the
        ``zero_solutions``, ``cleanup`` and ``grains`` configs.
    grains
        Grain reconstruction and statistics of the indexed map (run by
        ``dpm index`` and ``dpm demo`` on the result; the step size comes
        from the map).
    boundaries
        Smoothing and summary of the grain-boundary traces
        (:func:`dpm.boundaries.boundary_traces`) written with the grains.
    pc_field
        The pattern centre over the map (:mod:`dpm.calibration`).
        ``"auto"`` (default): before the chunks, calibration patterns spread
        over the map are matched and their orientations and PCs refined, and
        the physically constrained field (PCx linear in x, PCy in y, PCz tied
        to PCy by the tilts) is fitted to them; every pattern is then refined
        at its own PC from the field. ``"plane"``: the same with each PC
        component a free affine plane. ``"constant"``: the detector's one PC
        for every pattern. The given PC is taken as the map centre's; with
        too few diffracting calibration patterns the run warns and keeps it.
        Needs ``refine`` and ``refinement.pattern_centre`` ``"fixed"`` or
        ``"pattern"`` (``"shared"`` fits one PC instead).
    calibration
        Calibration grid, window, minimum count and outlier rejection of the
        PC field (its ``field.model`` follows ``pc_field``).
    pc_search
        When set, the detector's PC is not known: before the PC field, the
        map's PC is found in this box (:func:`dpm.calibration.search_pattern_centre`)
        on the calibration patterns, and the run goes on as if it had been
        given. :func:`index` sets it (box about the screen centre, ±0.05)
        when neither the call nor the pattern file gives a detector. None:
        the detector's PC is used.
    """

    kv: float = 20.0
    npx: int = 250
    method: str = "dynamical"
    resolution: float = 2.0
    keep: int = 10
    pixel_integration: bool = True
    refine: bool = True
    refinement: RefineConfig = field(default_factory=RefineConfig)
    zero_solutions: ZeroSolutionConfig | None = field(default_factory=ZeroSolutionConfig)
    cleanup: MapCleanupConfig | None = field(default_factory=MapCleanupConfig)
    pseudo_symmetry: PseudoSymmetryConfig | None = field(default_factory=PseudoSymmetryConfig)
    mask: str = "none"
    device: str = "auto"
    memory_budget: int | None = None
    chunk_size: int = 4096
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    grid: Grid = "square"
    grains: GrainConfig = field(default_factory=GrainConfig)
    boundaries: BoundaryConfig = field(default_factory=BoundaryConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    pc_field: str = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pc_search: PCSearchConfig | None = None

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if self.pc_field not in PC_FIELD_MODELS:
            raise ValueError(f"pc_field must be one of {tuple(PC_FIELD_MODELS)}, got "
                             f"{self.pc_field!r}")
        model = PC_FIELD_MODELS[self.pc_field]
        if self.calibration.field.model != model:
            object.__setattr__(self, "calibration", replace(
                self.calibration, field=replace(self.calibration.field, model=model)))
        for stage in ("zero_solutions", "cleanup", "pseudo_symmetry", "grains"):
            value = getattr(self, stage)
            if value is not None and value.grid != self.grid:
                object.__setattr__(self, stage, replace(value, grid=self.grid))
        if not self.kv > 0:
            raise ValueError(f"beam energy must be positive, got {self.kv} kV")
        if not 0 < self.resolution <= 15:
            raise ValueError(f"orientation resolution must be in (0, 15] degrees, got {self.resolution}")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, got {self.keep}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if not self.refine:   # the stages that work on refined orientations are off
            for stage in NEEDS_REFINE:
                object.__setattr__(self, stage, None)

    @property
    def uses_pc_field(self) -> bool:
        """Whether the run calibrates a PC field: ``pc_field`` not ``"constant"``, refinement
        on, and no shared PC fitted instead."""
        return (self.pc_field != "constant" and self.refine
                and self.refinement.pattern_centre != "shared")

    @property
    def band_contrast_limit(self) -> float:
        """Band contrast above which a pixel diffracts: the zero-solution threshold
        (its default when the stage is off)."""
        zero = self.zero_solutions if self.zero_solutions is not None else ZeroSolutionConfig()
        return float(zero.band_contrast_threshold)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for ``config.toml`` and ``summary.json``); a stage that is
        off (``zero_solutions=None``) is written as ``False``, which TOML can hold."""
        out = dataclasses.asdict(self)
        for stage in NEEDS_REFINE:
            if getattr(self, stage) is None:
                out[stage] = False
        return out


@dataclass(frozen=True, eq=False)
class IndexResult:
    """Result of :func:`index`.

    Attributes
    ----------
    xmap
        orix ``CrystalMap``: top-``keep`` rotations per pixel, properties
        ``scores`` (n, keep), ``simulation_indices`` (n, keep) and
        ``readable`` (False for constant patterns, which are not indexed).
    scores : (ny, nx) float32 array
        Best NCC score per pixel (0 where the pattern was unreadable).
    dictionary_size
        Number of dictionary orientations.
    refined
        Whether orientations were refined.
    timings
        Seconds per stage.
    config
        The resolved configuration.
    source
        Where the patterns came from.
    band_contrast : (ny, nx) float32 array
        Band contrast (0–255) of every pattern.
    details
        Stage records for ``summary.json``: preprocessing steps, pattern
        centre used, zero-solution thresholds and counts.
    """

    xmap: Any
    scores: np.ndarray
    dictionary_size: int
    refined: bool
    timings: dict[str, float]
    config: IndexConfig
    source: str = "array"
    band_contrast: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def run_config(self) -> dict[str, Any]:
        """The resolved options of the run as ``dpm index --config`` reads them back
        (``config.toml``): phase, master-pattern file and detector (PC in Bruker's
        convention), then every field of :class:`IndexConfig`."""
        return dict(self.details.get("run", {})) | self.config.to_dict()

    def summary(self) -> dict[str, Any]:
        """Map-level numbers for ``summary.json``."""
        readable = np.asarray(self.xmap.prop["readable"], dtype=bool)
        return {
            "source": self.source,
            "map_shape": list(self.scores.shape),
            "patterns": int(self.scores.size),
            "unreadable_patterns": int((~readable).sum()),
            "dictionary_size": self.dictionary_size,
            "refined": self.refined,
            "score_mean": float(self.scores[readable.reshape(self.scores.shape)].mean()),
            "indexed_patterns": int((self.xmap.phase_id >= 0).sum()),
            "timings_s": self.timings,
            "phase": self.xmap.phases[0].name,
        } | self.details


def _resolve_master(phase: Any, master_pattern: Any, config: IndexConfig):
    from dpm.master import MasterPattern
    from dpm.master.cache import cached_master_pattern
    from dpm.master.shipped import SHIPPED_NPX, shipped_master_pattern

    if isinstance(master_pattern, MasterPattern):
        return master_pattern
    if master_pattern is not None:
        from dpm.io.emsoft import read_master_pattern

        return read_master_pattern(master_pattern, energy=config.kv)
    if isinstance(phase, str) and config.method == "dynamical" and config.npx == SHIPPED_NPX:
        shipped = shipped_master_pattern(phase, config.kv)
        if shipped is not None:
            log.info("using the shipped dynamical %s master pattern at %g kV", phase, config.kv)
            return shipped
    return cached_master_pattern(phase, kv=config.kv, npx=config.npx, method=config.method)


def prepare_stack(stack, detector, *, mask: np.ndarray | None, config: IndexConfig,
                  background: np.ndarray | None, xp, progress: bool = False) -> tuple[Any, np.ndarray]:
    """Preprocess and normalise every pattern of a stack into one array, chunk by chunk.

    The whole-stack form of the chunk stage's first step
    (:func:`dpm.chunks.block_rows`) for callers that want every row in memory.
    Runs :func:`dpm.preprocess.preprocess_block` with ``config.preprocess``
    on blocks of ``config.chunk_size`` patterns, then
    :func:`dpm.match.prepare_patterns`. Constant raw patterns (a blanked
    beam, a dead frame) are not indexed: they get zero rows and
    ``readable = False``, and are left out of the mean background and of
    neighbour averaging.

    Parameters
    ----------
    stack
        The :class:`~dpm.io.readers.PatternStack`.
    detector
        Detector of the raw (unbinned) patterns.
    mask : (sy, sx) bool array, optional
        Signal mask of the raw patterns; binned with the patterns
        (:func:`dpm.preprocess.bin_mask`) before normalisation.
    config
        ``preprocess`` and ``chunk_size`` are used.
    background : (sy, sx) array, optional
        Static background, used with ``static_background="given"``.
    xp
        Array module of the output.
    progress
        Show a progress bar over the chunks.

    Returns
    -------
    patterns : (n, npix) float32 array on ``xp``
        Zero-mean unit-norm rows over the (binned) masked pixels; zero rows
        where the pattern is unreadable.
    readable : (n,) bool array

    Raises
    ------
    ValueError
        Naming the first pixel, when a pattern holds NaN or infinite values,
        or when no pattern is readable.
    """
    from dpm.chunks import block_rows
    from dpm.detector import as_detector
    from dpm.preprocess import map_blocks

    ny, nx = stack.map_shape
    given = background if config.preprocess.static_background == "given" else None
    context = _context(stack, as_detector(detector), mask, config, given, xp,
                       budget=0, master=None, rotations=None)
    out = xp.zeros((ny * nx, context.n_pixels), dtype=xp.float32)
    readable = np.zeros(ny * nx, dtype=bool)
    blocks = list(map_blocks(ny, nx, config.chunk_size))
    for r0, r1, c0, c1 in _progress_iter(blocks, "preprocess", progress):
        rows, ok = block_rows(context, (r0, r1, c0, c1))
        start = r0 * nx + c0
        out[start:start + len(ok)] = rows
        readable[start:start + len(ok)] = ok
    _check_readable(stack, readable)
    return out, readable


def _check_readable(stack, readable: np.ndarray) -> None:
    """ValueError when no pattern is readable; one warning naming the first unreadable one."""
    nx = stack.map_shape[1]
    if not readable.any():
        raise ValueError(f"{stack.source}: no pattern is readable after preprocessing; "
                         "nothing to index")
    if not readable.all():
        first = int(np.flatnonzero(~readable)[0])
        log.warning("%d unreadable patterns are not indexed (first: pattern %d, row %d, "
                    "column %d)", int((~readable).sum()), first, first // nx, first % nx)


def _from_file(stack) -> bool:
    """Whether a stack's patterns come from a file that other processes can open."""
    return stack.source != "array" and Path(stack.source).exists()


def _context(stack, det, raw_mask: np.ndarray | None, config: IndexConfig,
             background: np.ndarray | None, xp, *, budget: int, master, rotations,
             key: str = "", device: str | None = None, blas_threads: int = 1,
             lattice: np.ndarray | None = None, lattice_steps: int = 0):
    """A :class:`dpm.chunks.ChunkContext` for a stack (its ``background`` resolved here)."""
    from dpm.chunks import ChunkContext
    from dpm.preprocess import bin_mask, binned_detector, resolve_static_background

    pre = config.preprocess
    bg = resolve_static_background(stack, pre, background=background, mask=raw_mask,
                                   chunk_size=config.chunk_size)
    is_file = _from_file(stack)
    context = ChunkContext(
        key=key or uuid.uuid4().hex, source=stack.source if is_file else None,
        data=None if is_file else stack.data, map_shape=stack.map_shape, detector=det,
        det_used=binned_detector(det, pre.binning) if pre.binning > 1 else det,
        raw_mask=raw_mask, mask_used=bin_mask(raw_mask, pre.binning) if raw_mask is not None else None,
        background=bg, file_band_contrast=stack.band_contrast, master=master,
        rotations=rotations, config=config, budget=int(budget),
        device=device or ("cpu" if xp is np else "gpu"), blas_threads=int(blas_threads),
        lattice=lattice, lattice_steps=int(lattice_steps))
    context._local["stack"] = stack
    return context


def _resolve_mask(spec: str, stack, config: IndexConfig, background: np.ndarray | None,
                  mask: np.ndarray | None) -> np.ndarray | None:
    """The raw-shape signal mask: the caller's array, else ``config.mask``."""
    from dpm.preprocess import circular_mask, mask_from_image, resolve_static_background, shadow_mask

    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != stack.pattern_shape:
            raise ValueError(f"signal mask shape {mask.shape} differs from the pattern shape "
                             f"{stack.pattern_shape}")
        if not mask.any():
            raise ValueError("signal mask hides every detector pixel")
        return mask
    if spec == "none":
        return None
    if spec == "circular":
        return circular_mask(stack.pattern_shape)
    if spec == "shadow":
        bg = background if background is not None else stack.static_background
        if bg is None:
            bg = resolve_static_background(stack, replace(config.preprocess, static_background="mean"),
                                           chunk_size=config.chunk_size)
        return shadow_mask(bg)
    return mask_from_image(spec, shape=stack.pattern_shape)


def _full_patterns(xp, rows: Any, index: np.ndarray | None, shape: tuple[int, int]) -> Any:
    """(k, sy, sx) patterns from masked rows (0 outside the mask)."""
    if index is None:
        return rows.reshape(rows.shape[0], *shape)
    full = xp.zeros((rows.shape[0], shape[0] * shape[1]), dtype=xp.float32)
    full[:, xp.asarray(index)] = rows
    return full.reshape(rows.shape[0], *shape)


def pattern_quality_maps(rows: Any, detector, mask: np.ndarray | None, chunk_size: int,
                         progress: bool = False, band_contrast: np.ndarray | None = None,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Band contrast (0–255) and image quality of every preprocessed pattern.

    Parameters
    ----------
    rows : (n, npix) array
        Normalised rows over ``mask`` (as :func:`prepare_stack` returns them).
    detector
        Detector of the preprocessed patterns (sets their shape).
    mask
        Signal mask of the rows.
    chunk_size
        Patterns per chunk.
    progress
        Show a progress bar.
    band_contrast
        Band contrast the acquisition software stored in the file (any shape
        of n values): used as it is, not computed.

    Returns
    -------
    band_contrast, quality : (n,) float32 host arrays
    """
    from dpm import quality

    xp = backend.namespace(rows)
    index = None if mask is None else np.flatnonzero(mask)
    n = rows.shape[0]
    given = band_contrast is not None
    bc = (np.asarray(band_contrast, dtype=np.float32).ravel() if given
          else np.zeros(n, dtype=np.float32))
    iq = np.zeros(n, dtype=np.float32)
    for start in _progress_iter(range(0, n, chunk_size), "band contrast", progress):
        full = _full_patterns(xp, rows[start:start + chunk_size], index, detector.shape)
        if not given:
            bc[start:start + len(full)] = backend.to_host(quality.band_contrast(full, mask=mask))
        iq[start:start + len(full)] = backend.to_host(quality.pattern_quality(full))
    return bc, iq


def _progress_iter(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="chunk")


def _fit_shared_pattern_centre(context, blocks: list[tuple[int, int, int, int]], refinement,
                               progress: bool) -> np.ndarray:
    """One PC for the map, fitted on the ``pc_subset`` patterns of highest band contrast.

    One pass over the map measures every pattern's band contrast (or takes
    the file's); the subset is matched against the dictionary at the
    starting PC (projected on the fly), then its orientations and the PC are
    refined jointly (:func:`dpm.refine.fit_shared_pattern_centre`).
    """
    from dpm.chunks import PatternRows, block_rows, match_rows
    from dpm.refine import fit_shared_pattern_centre

    nx = context.map_shape[1]
    n = int(np.prod(context.map_shape))
    bc = np.zeros(n, dtype=np.float32)
    readable = np.zeros(n, dtype=bool)
    for block in _progress_iter(blocks, "pattern centre", progress):
        rows, ok = block_rows(context, block)
        start = block[0] * nx + block[2]
        bc[start:start + len(ok)] = context.block_quality(block, rows)[0]
        readable[start:start + len(ok)] = ok
    candidates = np.flatnonzero(readable)
    subset = np.sort(candidates[np.argsort(-bc[candidates], kind="stable")[:refinement.pc_subset]])
    sub_rows = PatternRows(context, blocks, context.budget // 4)[subset]
    best = match_rows(context, sub_rows, 1)
    starts = context.rotations[backend.to_host(best.indices)[:, 0]].astype(np.float64)
    pc, _, _ = fit_shared_pattern_centre(sub_rows, context.refinement_master(), context.det_used,
                                         starts, mask=context.mask_used, config=refinement)
    return pc


def _calibration_refinement(config: IndexConfig, context) -> RefineConfig:
    """The run's refinement options for the few patterns of the PC search and the PC
    field: their memory budget, when not given, a quarter of the run's."""
    return replace(config.refinement, memory_budget=config.refinement.memory_budget
                   or max(1, context.budget // 4))


@dataclass(frozen=True)
class _CalibrationPatterns:
    """The calibration patterns of a map (:func:`_calibration_patterns`).

    Attributes
    ----------
    rows : (k, npix) float32 array
        Their preprocessed, normalised rows on the run's device: each the mean
        of the pixels of its window that show the same grain
        (:func:`dpm.calibration.average_same_grain`).
    pixels : list of (row, col)
        Their map pixels (the one of highest band contrast), window by window.
    positions : (k, 2) float array
        Mean (row, column) of the pixels averaged into each: the beam
        position whose PC the pattern has.
    band_contrast : (k,) float array
        Their band contrast.
    windows
        Calibration windows read.
    """

    rows: Any
    pixels: list[tuple[int, int]]
    positions: np.ndarray
    band_contrast: np.ndarray
    windows: int


def _calibration_patterns(context, config: IndexConfig, progress: bool) -> _CalibrationPatterns:
    """Patterns spread over the map for the PC search and the PC field.

    Reads only the ``calibration.window`` blocks at the centres of the
    ``calibration.grid`` cells (:func:`dpm.calibration.calibration_windows`):
    each block's diffracting pixel (band contrast above the zero-solution
    threshold) of highest band contrast is a calibration pattern, averaged
    with the block's pixels of the same grain.
    """
    from dpm.calibration import average_same_grain, calibration_windows, select_calibration_patterns
    from dpm.chunks import block_rows

    cal = config.calibration
    windows = calibration_windows(context.map_shape, cal.grid, cal.window)
    window_rows, window_ok = [], []
    for block in _progress_iter(windows, "calibration patterns", progress):
        rows, ok = block_rows(context, block)
        window_rows.append(rows)
        window_ok.append(ok)
    # One band-contrast call for all windows: its line-contrast product reads the whole
    # operator once per call, whatever the number of patterns.
    file_bc = [context.block_file_band_contrast(block) for block in windows]
    all_rows = context.xp.concatenate(window_rows)
    bc_all = pattern_quality_maps(all_rows, context.det_used, context.mask_used, len(all_rows),
                                  band_contrast=None if file_bc[0] is None
                                  else np.concatenate(file_bc))[0]
    picked_rows, picked, positions, picked_bc = [], [], [], []
    offset = 0
    for (r0, r1, c0, c1), ok in zip(windows, window_ok):
        shape = (r1 - r0, c1 - c0)
        bc = bc_all[offset:offset + len(ok)]
        usable = ok & (bc > config.band_contrast_limit)
        best = select_calibration_patterns(bc.reshape(shape), usable.reshape(shape), grid=(1, 1))
        for r, c in zip(*best):    # the window's one calibration pattern, if it has one
            row, members = average_same_grain(all_rows[offset:offset + len(ok)],
                                              int(r) * shape[1] + int(c), usable)
            mr, mc = np.divmod(np.flatnonzero(members), shape[1])
            picked_rows.append(row)
            picked.append((r0 + int(r), c0 + int(c)))
            positions.append((r0 + mr.mean(), c0 + mc.mean()))
            picked_bc.append(float(bc[int(r) * shape[1] + int(c)]))
        offset += len(ok)
    npix = int(all_rows.shape[1])
    rows = (context.xp.concatenate([row[None] for row in picked_rows]) if picked_rows
            else context.xp.zeros((0, npix), dtype=all_rows.dtype))
    return _CalibrationPatterns(rows, picked, np.asarray(positions, dtype=np.float64).reshape(-1, 2),
                                np.asarray(picked_bc), len(windows))


def _search_pattern_centre(context, config: IndexConfig,
                           calibration: _CalibrationPatterns) -> dict[str, Any]:
    """The record of the PC found in ``config.pc_search``'s box, on the calibration
    patterns of highest band contrast (:func:`dpm.calibration.search_pattern_centre`);
    they are matched against the dictionary at the box centre (``context.det_used``).

    Raises
    ------
    ValueError
        Too few diffracting calibration patterns, or no PC found in the box.
    """
    from dpm.calibration import search_pattern_centre
    from dpm.chunks import match_rows

    search = config.pc_search
    record: dict[str, Any] = {"box_centre": list(search.centre),
                              "half_width": search.half_width,
                              "binnings": list(search.binnings)}
    if len(calibration.pixels) < 3:
        raise ValueError(
            f"no pattern centre given and none found: only {len(calibration.pixels)} of the "
            f"{calibration.windows} calibration cells have a diffracting pattern (band "
            f"contrast above {config.band_contrast_limit:g}); give the PC (--pc X Y Z)")
    t = time.perf_counter()
    order = np.argsort(-calibration.band_contrast, kind="stable")[:search.patterns]
    rows = calibration.rows[context.xp.asarray(order)]
    # Candidates only: at a PC this far off every pattern would look unsure and take the
    # whole binned grid, which the PC starts of the search make up for anyway.
    coarse_only = replace(config, search=replace(config.search, confidence=0.0))
    found = match_rows(replace(context, config=coarse_only), rows, config.keep)
    starts = context.rotations[backend.to_host(found.indices)].astype(np.float64)
    refinement = _calibration_refinement(config, context)
    result = search_pattern_centre(rows, starts, context.master, context.det_used,
                                   mask=context.mask_used, config=search,
                                   refine_config=refinement)
    record |= {"pc": [float(v) for v in result.pc], "ncc": result.ncc,
               "pixels": [list(calibration.pixels[i]) for i in order],
               "converged": [bool(v) for v in result.converged],
               "seconds": time.perf_counter() - t}
    log.info("pattern centre found in the box %s ± %g: (%.4f, %.4f, %.4f), mean NCC %.3f on "
             "%d of %d patterns", search.centre, search.half_width, *record["pc"], result.ncc,
             int(result.converged.sum()), len(order))
    return record


def _calibrate_pc_field(context, config: IndexConfig, step: float,
                        calibration: _CalibrationPatterns) -> dict[str, Any]:
    """The record of the map's PC field, fitted to the calibration patterns.

    The calibration patterns are matched against the dictionary at the
    detector's PC, then their orientations and PCs refined and the field
    fitted (:func:`dpm.calibration.calibrate_pattern_centre_field`). Beam
    positions are map pixels (x the column, y the row).

    Returns
    -------
    record : dict
        For ``summary.json`` and the result store (JSON types only; the field
        itself by :func:`_field_of`). Its ``status`` is ``"fitted"``, or
        ``"given PC kept"`` with the ``reason`` when the map has too few
        diffracting calibration patterns or the fit fails (warned).
    """
    from dpm.calibration import calibrate_pattern_centre_field
    from dpm.chunks import match_rows

    cal = config.calibration
    ny, nx = context.map_shape
    given = [float(v) for v in context.det_used.pc]
    record: dict[str, Any] = {"model": cal.field.model, "given_pc": given,
                              "grid": list(cal.grid), "window": cal.window}
    picked = calibration.pixels
    record["calibration_pixels"] = [list(p) for p in picked]

    def fallback(reason: str) -> dict[str, Any]:
        log.warning("PC field not calibrated: %s; every pattern is indexed at the given PC "
                    "(%.4f, %.4f, %.4f)", reason, *given)
        return record | {"status": "given PC kept", "reason": reason}

    if len(picked) < cal.min_patterns:
        return fallback(f"only {len(picked)} of the {calibration.windows} calibration cells "
                        f"have a diffracting pattern (band contrast above "
                        f"{config.band_contrast_limit:g}); at least {cal.min_patterns} are needed")
    patterns = calibration.rows
    found = match_rows(context, patterns, config.keep)
    starts = context.rotations[backend.to_host(found.indices)].astype(np.float64)
    r, c = calibration.positions.T
    refinement = _calibration_refinement(config, context)
    try:
        fit = calibrate_pattern_centre_field(
            patterns, starts, c, r, context.refinement_master(), context.det_used,
            mask=context.mask_used, refine_config=refinement, config=cal.field)
    except ValueError as e:
        return fallback(str(e))
    if fit.inliers.sum() < cal.min_patterns:
        return fallback(f"{int(fit.inliers.sum())} of {len(picked)} calibration patterns agree "
                        f"with one field; at least {cal.min_patterns} are needed")
    record |= _field_record(fit.field, (ny, nx), step) | {
        "status": "fitted", "inliers": [bool(v) for v in fit.inliers],
        "residuals_rms": [float(v) for v in fit.rms],
        "gradient_z": None if fit.gradient_z is None else [float(v) for v in fit.gradient_z]}
    log.info("PC field (%s, %d of %d calibration patterns): (%.4f, %.4f, %.4f) at the map "
             "centre, spread (%.4f, %.4f, %.4f), residual rms (%.4f, %.4f, %.4f), gradients "
             "%s standard errors from zero", cal.field.model, int(fit.inliers.sum()),
             len(picked), *record["pc_at_map_centre"], *record["spread"],
             *record["residuals_rms"], record["gradient_z"])
    return record


def _field_record(pc_field: Any, map_shape: tuple[int, int], step: float) -> dict[str, Any]:
    """A PC field (beam positions in map pixels) as JSON types: its PC at the map centre,
    gradient per µm, spread over the map and parameters."""
    ny, nx = map_shape
    map_rows, map_cols = np.mgrid[0:ny, 0:nx]
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    return {"pc_at_map_centre": [float(v) for v in pc_field.at(*centre)],
            "gradient_per_um": (np.asarray(pc_field.gradient) / step).tolist(),
            "spread": [float(v) for v in pc_field.spread(map_cols, map_rows)],
            "field_px": {"centre": np.asarray(pc_field.centre).tolist(),
                         "pc": np.asarray(pc_field.pc).tolist(),
                         "gradient": np.asarray(pc_field.gradient).tolist()}}


def _field_of(record: dict[str, Any]) -> Any:
    """The :class:`dpm.calibration.PatternCentreField` of a field record, or None."""
    from dpm.calibration import PatternCentreField

    if record.get("status") not in ("fitted", "given"):
        return None
    px = record["field_px"]
    return PatternCentreField(np.asarray(px["centre"]), np.asarray(px["pc"]),
                              np.asarray(px["gradient"]))


def _content_hash(*arrays: Any) -> str | None:
    """:func:`dpm.store.array_hash` of the arrays given (mask, background), None for none."""
    from dpm.store import array_hash

    present = [a for a in arrays if a is not None]
    return array_hash(*present) if present else None


def _manifest(stack, det, master, config: IndexConfig, blocks, budget: int, device: str,
              step_size: float | None, mask: Any, background: Any) -> dict[str, Any]:
    """The run manifest of :class:`dpm.store.ResultStore`: what its results depend on."""
    from dpm import __version__
    from dpm.chunks import blas_threads
    from dpm.store import fingerprint

    is_file = _from_file(stack)
    run_config = {k: v for k, v in config.to_dict().items() if k not in ("device", "memory_budget")}
    run_config |= {"phase": master.phase.name,
                   "master_pattern": _content_hash(master.northern, master.southern),
                   "detector": repr(det), "step_size": step_size,
                   "mask_given": _content_hash(mask), "background_given": _content_hash(background)}
    return {
        "dpm_version": __version__,
        "input": {"source": str(Path(stack.source).resolve()) if is_file else stack.source,
                  "shape": list(stack.data.shape), "dtype": str(stack.data.dtype),
                  "fingerprint": fingerprint(stack.source if is_file else None,
                                             None if is_file else stack.data)},
        "config": run_config, "blocks": [list(b) for b in blocks], "memory_budget": int(budget),
        "memory_budget_given": config.memory_budget, "device": device,
        "blas_threads": blas_threads()}


#: Per-pattern result arrays of the chunk stage: name -> (dtype, trailing shape; "keep" = config.keep).
_RESULT_ARRAYS = {"readable": (bool, ()), "band_contrast": (np.float32, ()),
                  "pattern_quality": (np.float32, ()), "topk_indices": (np.int64, ("keep",)),
                  "topk_scores": (np.float32, ("keep",)), "quaternions": (np.float64, (4,)),
                  "scores": (np.float32, ()), "pcs": (np.float64, (3,)),
                  "iterations": (np.int32, ())}


def _map_stages(config: IndexConfig, arrays: dict[str, np.ndarray], rows, context, master,
                rotations: np.ndarray, props: dict[str, np.ndarray], details: dict[str, Any],
                timings: dict[str, float], budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero solutions, cleanup and pseudo-symmetry on the map the chunks made.

    Fills ``props``, ``details`` and ``timings``; returns the rotations
    ``(n, 4)`` (``(n, keep, 4)`` unrefined) and phase ids of the map.
    """
    from dpm.cleanup import clean_map, replace_zero_solutions
    from dpm.pseudo_symmetry import clean_pseudo_symmetry

    ny, nx = context.map_shape
    n = ny * nx
    readable, bc = arrays["readable"], arrays["band_contrast"]
    indices, dict_scores = arrays["topk_indices"], arrays["topk_scores"]
    det_used, mask_used = context.det_used, context.mask_used
    topk = rotations[indices].astype(np.float64)   # (n, keep, 4)
    if config.refine:
        quaternions, scores, pcs = arrays["quaternions"], arrays["scores"], arrays["pcs"]
        mean_pc = tuple(pcs.mean(axis=0))
        details["pattern_centre"] = list(mean_pc)
        props["refinement_iterations"] = arrays["iterations"]
        props.update(pcx=pcs[:, 0], pcy=pcs[:, 1], pcz=pcs[:, 2])
        rmaster = context.refinement_master()
        field_pcs = context.block_pcs((0, ny, 0, nx))   # None without a PC field
        map_refinement = replace(config.refinement, pattern_centre="fixed",
                                 memory_budget=config.refinement.memory_budget or budget // 4)
        indexed = readable.copy()
        replaced = np.zeros(n, dtype=bool)
        if config.zero_solutions is not None:
            t = time.perf_counter()
            zs = replace_zero_solutions(
                rows, quaternions, scores, readable, bc, (ny, nx), rmaster,
                replace(det_used, pc=mean_pc), mask=mask_used, config=config.zero_solutions,
                refine_config=map_refinement, pcs=field_pcs)
            timings["zero_solutions"] = time.perf_counter() - t
            quaternions, scores, indexed, replaced = zs.quaternions, zs.scores, zs.indexed, zs.replaced
            details["zero_solutions"] = {
                "threshold": zs.threshold, "replace_threshold": zs.replace_threshold,
                "zero_solutions": zs.n_zero_solutions, "replaced": zs.n_replaced,
                "passes": zs.passes, "left_unindexed": int((~indexed).sum())}
        if config.cleanup is not None:
            t = time.perf_counter()
            cleaned = clean_map(quaternions, indexed, readable & (bc > config.band_contrast_limit),
                                (ny, nx),
                                master.phase.point_group, config.cleanup)
            timings["cleanup"] = time.perf_counter() - t
            quaternions, indexed = cleaned.quaternions, cleaned.indexed
            props.update(despiked=cleaned.despiked, filled=cleaned.filled)
            details["cleanup"] = cleaned.changed
        ps = config.pseudo_symmetry
        if ps is not None and ps.axis is None and master.phase.point_group.laue.name != "m-3m":
            log.info("pseudo-symmetry cleanup skipped: the default 60° <111> operator is defined "
                     "for Laue group m-3m, %s is %s", master.phase.name,
                     master.phase.point_group.laue.name)
        elif ps is not None:
            t = time.perf_counter()
            pseudo = clean_pseudo_symmetry(
                rows, quaternions, scores, indexed, (ny, nx), rmaster,
                replace(det_used, pc=mean_pc), mask=mask_used, config=ps,
                refine_config=map_refinement, pcs=field_pcs)
            timings["pseudo_symmetry"] = time.perf_counter() - t
            quaternions, scores = pseudo.quaternions, pseudo.scores
            props["pseudo_symmetry"] = pseudo.changed
            details["pseudo_symmetry"] = pseudo.summary()
        props.update(scores=scores.astype(np.float32), replaced=replaced,
                     dictionary_score=dict_scores[:, 0], simulation_index=indices[:, 0],
                     topk_indices=indices, topk_scores=dict_scores)
        rotation_data = quaternions
        phase_id = np.where(indexed, 0, -1)
    else:
        props.update(scores=dict_scores, simulation_indices=indices)
        rotation_data = topk
        phase_id = np.where(readable, 0, -1)
        if config.keep == 1:  # orix writers expect one rotation per point as 1-D
            rotation_data, props["scores"] = topk[:, 0], dict_scores[:, 0]
            props["simulation_indices"] = indices[:, 0]
    return rotation_data, phase_id


def index(
    patterns: Any,
    phase: Any = "li",
    detector: Any = None,
    *,
    master_pattern: Any = None,
    mask: np.ndarray | None = None,
    background: np.ndarray | None = None,
    step_size: float | None = None,
    config: IndexConfig | None = None,
    progress: bool = False,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    scheduler: Any = None,
    pc_field: Any = None,
) -> IndexResult:
    """Index a stack of EBSD patterns: preprocess, match, refine, replace zero solutions.

    The map is processed in chunks of whole rows sized from the memory
    budget (:mod:`dpm.chunks`): each chunk is read, preprocessed, matched
    and refined on its own, so peak memory is set by ``config.memory_budget``,
    not by the number of patterns. With ``out``, every chunk's results are
    written to the result store in that folder as it completes
    (:mod:`dpm.store`), and an interrupted run continues with ``resume=True``.

    Parameters
    ----------
    patterns
        ``(n, sy, sx)`` or ``(ny, nx, sy, sx)`` NumPy/dask array, a
        :class:`~dpm.io.readers.PatternStack`, or a path to any pattern file
        dpm reads.
    phase
        ``"li"``, ``"na"``, ``"al"``, ``"cu"``, a CIF path or an orix ``Phase``
        (ignored when ``master_pattern`` is given: its phase is used).
    detector
        dpm ``Detector`` or kikuchipy ``EBSDDetector`` of the raw (unbinned)
        patterns; when None, the one stored in the pattern file; when the file
        stores none either, the PC is searched (``config.pc_search``, default
        (0.5, 0.5, 0.5) ± 0.05) with sample tilt 70° and detector tilt 0°.
        With ``config.pc_search`` set, the detector's PC is not used.
    master_pattern
        A :class:`~dpm.master.MasterPattern`, a master-pattern file, or None to
        simulate one for ``phase``.
    mask : (sy, sx) bool array, optional
        Signal mask of the raw patterns, True where detector pixels are used
        (overrides ``config.mask``).
    background : (sy, sx) array, optional
        Static background (with ``config.preprocess.static_background="given"``).
    step_size
        Map step in µm (default: from the file, else 1).
    config
        Options; defaults as the CLI.
    progress
        Show progress bars (patterns/s of the chunk stage, and per stage).
    out
        Folder of the result store (``run.json``, ``chunks/``); None keeps
        the chunk results in memory only.
    resume
        Continue the run stored in ``out`` (same config and input); only the
        missing chunks are computed and the results equal an uninterrupted
        run's bit for bit.
    overwrite
        Replace a run stored in ``out`` instead of refusing to.
    scheduler
        ``dask.distributed`` scheduler address or ``Client``: the chunks run
        as tasks on its workers (:func:`dpm.chunks.run_chunks`).
    pc_field
        A known PC field (:class:`dpm.calibration.PatternCentreField`, beam
        positions in map pixels: x the column, y the row), e.g. from the
        geometry (:func:`dpm.calibration.pattern_centre_field`) or an earlier
        calibration: every pattern is refined at its PC from it and nothing is
        calibrated (``config.pc_field`` is not used).

    Returns
    -------
    IndexResult

    Raises
    ------
    dpm.store.ResumeError
        ``out`` holds another run (without ``resume``/``overwrite``), or
        ``resume`` finds no run or one of another config or input.
    dpm.io.writers.OutputError
        A chunk cannot be written (full disk): the chunks written before are
        kept and ``resume=True`` continues from them.
    """
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation
    from threadpoolctl import threadpool_limits

    from dpm.chunks import PatternRows, blas_threads, chunk_patterns, run_chunks
    from dpm.detector import Detector, as_detector
    from dpm.io.readers import as_pattern_stack, read_patterns
    from dpm.preprocess import map_blocks
    from dpm.sampling import cubochoric_grid
    from dpm.store import ResultStore, combined_hash

    config = config or IndexConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stack = read_patterns(patterns) if isinstance(patterns, (str, Path)) else as_pattern_stack(patterns)
    if detector is None and stack.detector is None:
        # Nothing says where the PC is: find it in the default box about the screen centre.
        search = config.pc_search or PCSearchConfig()
        log.info("%s: no detector given and the file stores none: the pattern centre is "
                 "searched in %s ± %g (sample tilt 70°, detector tilt 0°)", stack.source,
                 search.centre, search.half_width)
        config = replace(config, pc_search=search)
        detector = Detector(shape=stack.pattern_shape, pc=search.centre)
    det = as_detector(detector if detector is not None else stack.detector)
    if config.pc_search is not None:    # the box centre: what the search matches at
        det = replace(det, pc=config.pc_search.centre)
    if tuple(det.shape) != stack.pattern_shape:
        raise ValueError(f"{stack.source}: pattern shape {stack.pattern_shape} does not match the "
                         f"detector shape {tuple(det.shape)}")
    device = backend.resolve_device(config.device)
    xp = backend.array_module(device)
    budget = backend.memory_budget(xp, config.memory_budget)
    ny, nx = stack.map_shape
    n = ny * nx

    t = time.perf_counter()
    master = _resolve_master(phase, master_pattern, config)
    timings["master_pattern"] = time.perf_counter() - t

    per_chunk = chunk_patterns(stack.pattern_shape, np.dtype(stack.data.dtype).itemsize, budget,
                               config.chunk_size)
    blocks = list(map_blocks(ny, nx, per_chunk))
    threads = blas_threads()
    store = None
    if out is not None:
        from dpm.io.writers import prepare_output_dir

        store = ResultStore.open(prepare_output_dir(out), _manifest(stack, det, master, config, blocks, budget, device,
                                                step_size, mask, background),
                                 resume=resume, overwrite=overwrite)
        budget, blocks = store.manifest["memory_budget"], store.blocks
        threads = store.manifest["blas_threads"]
        if store.manifest["device"] != device:
            device = store.manifest["device"]
            xp = backend.array_module(device)

    # What the run resolves before its first chunk: mask, static background, dictionary
    # orientations (and a shared pattern centre): recorded in the store, so a resumed run
    # uses the same.
    t = time.perf_counter()
    if store is not None and store.manifest.get("resolved"):
        raw_mask, resolved_bg = store.load_array("mask"), store.load_array("static_background")
        stored_pc = store.manifest.get("fitted_pattern_centre")
    else:
        raw_mask = _resolve_mask(config.mask, stack, config, background, mask)
        resolved_bg, stored_pc = None, None
    given = background if config.preprocess.static_background == "given" else resolved_bg
    t_sampling = time.perf_counter()
    grid = cubochoric_grid(master.phase, config.resolution)
    rotations = grid.rotations.data.astype(np.float32)
    timings["sampling"] = time.perf_counter() - t_sampling
    context = _context(stack, det, raw_mask, config, given, xp, budget=budget, master=master,
                       rotations=rotations, device=device, blas_threads=threads,
                       lattice=grid.lattice, lattice_steps=grid.steps)
    if store is not None and not store.manifest.get("resolved"):
        store.save_array("mask", raw_mask)
        store.save_array("static_background", context.background)
        store.update(resolved=True)
    timings["preprocess_setup"] = time.perf_counter() - t

    step = step_size if step_size is not None else (stack.step_size or 1.0)
    calibration = None
    pc_search_record = None
    if config.pc_search is not None:
        # No PC known: find it before anything that needs one, once (stored for a resume).
        t = time.perf_counter()
        pc_search_record = store.manifest.get("pc_search") if store is not None else None
        if pc_search_record is None:
            with threadpool_limits(limits=threads, user_api="blas"):
                calibration = _calibration_patterns(context, config, progress)
                pc_search_record = _search_pattern_centre(context, config, calibration)
            if store is not None:
                store.update(pc_search=pc_search_record)
        found = tuple(pc_search_record["pc"])
        det = replace(det, pc=found)
        context = replace(context, detector=replace(context.detector, pc=found),
                          det_used=replace(context.det_used, pc=found))
        timings["pc_search"] = time.perf_counter() - t
    pc_field_record = None
    if pc_field is not None:
        if not config.refine or config.refinement.pattern_centre == "shared":
            raise ValueError("a given pc_field needs refinement with pattern_centre 'fixed' or "
                             "'pattern'")
        pc_field_record = _field_record(pc_field, context.map_shape, step) | {"status": "given"}
    elif config.uses_pc_field:
        # The PC field first, as for a shared PC: the chunks refine every pattern at its PC.
        t = time.perf_counter()
        pc_field_record = store.manifest.get("pc_field") if store is not None else None
        if pc_field_record is None:
            with threadpool_limits(limits=threads, user_api="blas"):  # as the chunks: the
                # same field in any process
                if calibration is None:
                    calibration = _calibration_patterns(context, config, progress)
                pc_field_record = _calibrate_pc_field(context, config, step, calibration)
            if store is not None:
                store.update(pc_field=pc_field_record)
        pc_field = _field_of(pc_field_record)
        timings["pc_field"] = time.perf_counter() - t
    elif config.pc_field != "constant":
        log.info("no PC field: it needs refinement with pattern_centre 'fixed' or 'pattern'")
    if pc_field is not None:
        centre_pc = tuple(float(v) for v in pc_field_record["pc_at_map_centre"])
        moved = np.abs(np.subtract(centre_pc, context.det_used.pc)).max()
        if moved > config.calibration.dictionary_tolerance:
            log.info("dictionary projected at the field's PC at the map centre, %.4f from "
                     "the given PC", moved)
            context = replace(context, det_used=replace(context.det_used, pc=centre_pc))
        pc_field_record["dictionary_pc"] = [float(v) for v in context.det_used.pc]
        context = replace(context, pc_field=pc_field)

    refinement = config.refinement
    if config.refine and refinement.pattern_centre == "shared":
        # Calibrate first, as the protocol does: fit one PC on a subset, then
        # match the whole map with it (a wrong PC costs dictionary matches).
        t = time.perf_counter()
        start_pc = context.det_used.pc
        pc = stored_pc
        if pc is None:
            pc = [float(v) for v in _fit_shared_pattern_centre(context, blocks, refinement,
                                                                progress)]
            if store is not None:
                store.update(fitted_pattern_centre=pc)
        timings["pattern_centre"] = time.perf_counter() - t
        log.info("pattern centre fitted: (%.4f, %.4f, %.4f) from (%.4f, %.4f, %.4f)",
                 *pc, *start_pc)
        context = replace(context, det_used=replace(context.det_used, pc=tuple(pc)))
        refinement = replace(refinement, pattern_centre="fixed")

    # The chunk stage: stored chunks are read, the others computed (here or on a cluster).
    t = time.perf_counter()
    keep = config.keep
    arrays = {name: np.zeros((n, *(keep if d == "keep" else d for d in shape)), dtype=dtype)
              for name, (dtype, shape) in _RESULT_ARRAYS.items()}
    hashes: list[str | None] = [None] * len(blocks)
    rows = PatternRows(context, blocks, budget // 4)
    stage_seconds: dict[str, float] = {}

    def fill(k: int, results: dict[str, Any]) -> None:
        start = blocks[k][0] * nx + blocks[k][2]
        for name in _RESULT_ARRAYS:
            value = np.asarray(results[name])
            arrays[name][start:start + len(value)] = value
        hashes[k] = str(results["raw_hash"])

    done = store.completed() if store is not None else []
    for k in done:
        fill(k, store.read_chunk(k))
    pending = [k for k in range(len(blocks)) if k not in set(done)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="pattern", desc="index", unit_scale=True,
                   initial=sum((b[1] - b[0]) * (b[3] - b[2]) for k, b in enumerate(blocks)
                               if k in set(done)))

    def on_result(k: int, results: dict[str, Any]) -> None:
        if store is not None:
            store.write_chunk(k, results)
        fill(k, results)
        for stage, seconds in results["seconds"].items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
        if "rows" in results:
            rows.offer(k, results["rows"])
        if bar is not None:
            bar.update((blocks[k][1] - blocks[k][0]) * (blocks[k][3] - blocks[k][2]))
            bar.set_postfix_str(", ".join(
                f"{stage} {bar.n / max(s, 1e-9):.0f}/s" for stage, s in stage_seconds.items()
                if stage in ("preprocess", "match", "refine")))

    try:
        run_chunks(context, blocks, pending, on_result, scheduler=scheduler)
    finally:
        if bar is not None:
            bar.close()
    timings.update(stage_seconds)
    timings["chunks"] = time.perf_counter() - t
    log.info("indexed %d patterns in %d chunks (%d read from the store) against %d "
             "orientations in %.1f s", n, len(blocks), len(done), len(rotations), timings["chunks"])

    readable, bc = arrays["readable"], arrays["band_contrast"]
    _check_readable(stack, readable)
    props: dict[str, np.ndarray] = {"readable": readable, "band_contrast": bc,
                                    "pattern_quality": arrays["pattern_quality"]}
    content_hash = combined_hash([h for h in hashes])
    details: dict[str, Any] = {
        "run": {"phase": phase if isinstance(phase, str) and master_pattern is None
                else master.phase.name,
                "master_pattern": str(master_pattern) if isinstance(master_pattern, (str, Path))
                else None,
                "pc": [float(v) for v in det.pc], "pc_convention": "bruker",
                "sample_tilt": float(det.sample_tilt), "detector_tilt": float(det.tilt)},
        "preprocessing": config.preprocess.steps(stack.pattern_shape),
        "detector_shape": list(context.det_used.shape),
        "input_hash": content_hash, "memory_budget_bytes": int(budget),
        **({"pc_field": pc_field_record} if pc_field_record is not None else {}),
        **({"pc_search": pc_search_record} if pc_search_record is not None else {}),
        "chunks": {"count": len(blocks),
                   "patterns_per_chunk": (blocks[0][1] - blocks[0][0]) * (blocks[0][3] - blocks[0][2]),
                   "read_from_store": len(done)}}
    # The map stages with the chunks' BLAS threads, so their results do not depend on
    # the process either.
    limits = threadpool_limits(limits=threads, user_api="blas")
    try:
        rotation_data, phase_id = _map_stages(
            config, arrays, rows, context, master, rotations, props, details, timings, budget)
    finally:
        limits.restore_original_limits()
    y, x = np.divmod(np.arange(n), nx)
    xmap = CrystalMap(
        rotations=Rotation(rotation_data), phase_id=phase_id, x=x * step, y=y * step,
        phase_list=PhaseList(master.phase), prop=props, scan_unit="um")
    timings["total"] = time.perf_counter() - t0
    if store is not None:
        store.update(state="complete", input_hash=content_hash)
    best = np.asarray(props["scores"]).reshape(n, -1)[:, 0]
    return IndexResult(
        xmap=xmap, scores=best.reshape(ny, nx), dictionary_size=len(rotations),
        refined=bool(config.refine), timings=timings, config=config, source=stack.source,
        band_contrast=bc.reshape(ny, nx), details=details)
