"""The chunked stage of indexing: raw patterns to refined orientations, one map block at a time.

A map is cut into blocks of whole rows (:func:`dpm.preprocess.map_blocks`),
each small enough for the run's memory budget. :func:`index_chunk` takes one
block from raw patterns to results: read it (with its halo for neighbour
averaging), preprocess and normalise it, measure band contrast and image
quality, match it against the dictionary, and refine the best matches. It
depends only on the block's patterns and on a :class:`ChunkContext` — what
the run resolved before its first chunk — so chunks can run in any order, in
this process or as Dask tasks on a ``dask.distributed`` cluster
(:func:`run_chunks`), and a resumed run recomputes exactly the missing ones.

Dictionary: each process builds its own from the master pattern (the context
carries the master pattern and orientations, never dictionary patterns). A
dictionary that fits a quarter of the budget is projected once per process
and kept; a larger one is projected once into the on-disk cache
(:class:`DictionaryFile`, under ``$DPM_CACHE_DIR/dictionaries``, shared by
the workers of a cluster on a shared file system) and read from it chunk by
chunk, so memory stays within the budget whatever its size.

:class:`PatternRows` gives the map-level stages (zero solutions,
pseudo-symmetry) the preprocessed rows of the pixels they revisit, recomputed
block by block from the pattern file and cached within a byte budget.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from dpm import backend
from dpm.detector import Detector

log = logging.getLogger("dpm")

#: Bytes a pattern needs in the chunk stage beyond its raw bytes, in float32
#: pixels of the raw pattern (preprocessing temporaries, normalised row, quality).
_WORK_PIXELS = 6
#: Dictionary rows projected per step when a dictionary is built.
_PROJECT_ROWS = 8192

#: What a process keeps of the run it works for: (run key, name) -> value.
_CACHE: dict[tuple[str, str], Any] = {}


def _cached(key: str, name: str, build: Callable[[], Any]) -> Any:
    """The value of ``name`` for run ``key`` in this process, built once (other runs' dropped)."""
    for other in [k for k in _CACHE if k[0] != key]:
        del _CACHE[other]
    if (key, name) not in _CACHE:
        _CACHE[(key, name)] = build()
    return _CACHE[(key, name)]


@dataclass(frozen=True, eq=False)
class ChunkContext:
    """What every chunk of a run needs; pickled once per Dask worker.

    Attributes
    ----------
    key
        Identifies the run (worker caches are kept per key).
    source
        Pattern file, re-opened by each process; None for an array input.
    data
        The ``(ny, nx, sy, sx)`` pattern array when there is no file.
    map_shape
        ``(ny, nx)``.
    detector
        Detector of the raw patterns.
    det_used
        Detector of the preprocessed (binned) patterns, with the pattern centre
        the dictionary is projected for.
    raw_mask, mask_used : (sy, sx) bool arrays or None
        Signal mask of the raw and of the preprocessed patterns.
    background : (sy, sx) float32 array or None
        Static background to remove (resolved), or None.
    file_band_contrast : (ny, nx) array or None
        Band contrast stored in the pattern file (used instead of computed).
    master
        Master pattern (sharp: refinement uses it; the dictionary its
        pixel-integrated version when ``config.pixel_integration``).
    rotations : (m, 4) float32 array
        Dictionary orientations.
    config
        The run's :class:`~dpm.pipeline.IndexConfig`.
    budget
        Bytes this process may use for one chunk.
    device
        ``"cpu"`` or ``"gpu"``.
    blas_threads
        Threads every chunk's BLAS calls use, whatever the process's own
        setting: OpenBLAS's float32 products change in the last bits with the
        thread count, so fixing it makes a chunk's results the same in any
        process (a resumed run on another machine, a Dask worker).
    lattice : (m, 3) int32 array or None
        Cubochoric lattice position of every dictionary orientation
        (:class:`dpm.sampling.CubochoricGrid`), which the coarse-to-fine search
        needs; None allows the exhaustive search only.
    lattice_steps
        Semi-edge steps of that lattice.
    pc_field
        The map's PC field (:class:`dpm.calibration.PatternCentreField`, beam
        positions in map pixels: x the column, y the row), or None: every
        pattern is refined at its own PC from it, while the dictionary is
        projected at ``det_used.pc``.
    """

    key: str
    source: str | None
    data: Any
    map_shape: tuple[int, int]
    detector: Detector
    det_used: Detector
    raw_mask: np.ndarray | None
    mask_used: np.ndarray | None
    background: np.ndarray | None
    file_band_contrast: np.ndarray | None
    master: Any
    rotations: np.ndarray
    config: Any
    budget: int
    device: str
    blas_threads: int = 1
    lattice: np.ndarray | None = None
    lattice_steps: int = 0
    pc_field: Any = None
    _local: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_local"] = {}            # the process's own stack is not shipped
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def xp(self) -> ModuleType:
        return backend.array_module(self.device)

    @property
    def n_pixels(self) -> int:
        """Pixels per preprocessed row (inside the signal mask)."""
        if self.mask_used is not None:
            return int(self.mask_used.sum())
        return int(np.prod(self.det_used.shape))

    @property
    def _pc_key(self) -> str:
        """The PC of ``det_used``, in the names of what is built for it (dictionaries,
        filtered master patterns): a context replaced with another PC builds its own."""
        return repr(tuple(round(float(v), 12) for v in self.det_used.pc))

    def stack(self) -> Any:
        """The pattern stack, opened once per process."""
        if "stack" in self._local:
            return self._local["stack"]
        from dpm.io.readers import as_pattern_stack, read_patterns

        def open_stack() -> Any:
            if self.source is not None:
                return read_patterns(self.source)
            return as_pattern_stack(self.data)

        return _cached(self.key, "stack", open_stack)

    def dictionary(self) -> Any:
        """This process's dictionary for ``det_used`` (projected once, or on disk)."""
        return _cached(self.key, f"dictionary{self._pc_key}", self._build_dictionary)

    def dictionary_master(self) -> Any:
        """The master pattern dictionary rows are projected from (pixel-integrated if asked)."""
        from dpm.projection import integrate_pixels

        if not self.config.pixel_integration:
            return self.master
        return _cached(self.key, f"dictionary_master{self._pc_key}", lambda: integrate_pixels(
            self.master, self.det_used, orientation_spread=self.config.resolution / 2))

    def _build_dictionary(self) -> Any:
        from dpm.dictionary import Dictionary

        master = self.dictionary_master()
        dictionary = Dictionary(master, self.det_used, self.rotations, mask=self.mask_used)
        nbytes = len(dictionary) * dictionary.n_pixels * 4
        if nbytes <= self.budget // 4:
            return project_dictionary(dictionary, self.xp)
        log.info("dictionary of %d patterns (%.2f GB) exceeds a quarter of the memory budget "
                 "(%.2f GB): read from the on-disk cache", len(dictionary), nbytes / 1e9,
                 self.budget / 4e9)
        return DictionaryFile.cached(dictionary, master)

    def search(self) -> Any:
        """This process's coarse-to-fine search dictionaries for ``det_used``
        (:class:`dpm.search.SearchDictionaries`: coarse rows on the device, binned and
        full-resolution rows projected on demand and kept within a quarter of the budget)."""
        return _cached(self.key, f"search{self._pc_key}", self._build_search)

    def _build_search(self) -> Any:
        from orix.quaternion import Rotation

        from dpm.sampling import CubochoricGrid
        from dpm.search import search_dictionaries

        if self.lattice is None:
            raise ValueError("the coarse-to-fine search needs the dictionary's lattice positions")
        grid = CubochoricGrid(rotations=Rotation(self.rotations), lattice=self.lattice,
                              steps=self.lattice_steps, resolution=self.config.resolution,
                              point_group=self.master.phase.point_group.proper_subgroup.name)
        return search_dictionaries(self.master, self.dictionary_master(), self.det_used, grid,
                                   mask=self.mask_used, config=self.config.search, xp=self.xp,
                                   capacity=self.budget // 4)

    def compressed(self) -> tuple[Any, Any]:
        """This process's compressed dictionary for ``det_used`` (:func:`dpm.compression.compress`,
        read from or written to the on-disk cache) and its full-resolution rows
        (:class:`dpm.search.FineRows`, projected on demand for the exact rescoring)."""
        return _cached(self.key, f"compressed{self._pc_key}", self._build_compressed)

    def _build_compressed(self) -> tuple[Any, Any]:
        from dpm.compression import compress
        from dpm.dictionary import Dictionary
        from dpm.search import FineRows

        dictionary = Dictionary(self.dictionary_master(), self.det_used, self.rotations,
                                mask=self.mask_used)
        return compress(dictionary, xp=self.xp), FineRows(dictionary, self.xp, self.budget // 4)

    def refinement_master(self) -> Any:
        from dpm.refine import refinement_master

        return _cached(self.key, f"refinement_master{self._pc_key}",
                       lambda: refinement_master(self.master, self.det_used,
                                                 psf=self.config.refinement.psf))

    def block_pcs(self, block: tuple[int, int, int, int]) -> np.ndarray | None:
        """(k, 3) PCs of a block's pixels from the PC field (row-major), None without one."""
        if self.pc_field is None:
            return None
        rows, cols = np.mgrid[block[0]:block[1], block[2]:block[3]]
        return self.pc_field.at(cols.ravel(), rows.ravel())

    def block_file_band_contrast(self, block: tuple[int, int, int, int]) -> np.ndarray | None:
        """(k,) band contrast the file stores for a block's pixels (row-major), or None."""
        if self.file_band_contrast is None:
            return None
        r0, r1, c0, c1 = block
        return np.asarray(self.file_band_contrast).reshape(self.map_shape)[r0:r1, c0:c1].ravel()

    def block_quality(self, block: tuple[int, int, int, int],
                      rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """(k,) band contrast and image quality of a block's preprocessed rows
        (:func:`dpm.pipeline.pattern_quality_maps`); the band contrast the file stores
        where it stores one."""
        from dpm.pipeline import pattern_quality_maps

        return pattern_quality_maps(rows, self.det_used, self.mask_used, rows.shape[0],
                                    band_contrast=self.block_file_band_contrast(block))

    def background_on(self, xp: ModuleType) -> Any:
        return None if self.background is None else xp.asarray(self.background)


def chunk_patterns(pattern_shape: tuple[int, int], itemsize: int, budget: int,
                   chunk_size: int) -> int:
    """Patterns per chunk: ``chunk_size``, fewer if a quarter of ``budget`` cannot hold them."""
    per_pattern = pattern_shape[0] * pattern_shape[1] * (itemsize + 4 * _WORK_PIXELS)
    return max(1, min(int(chunk_size), (budget // 4) // per_pattern))


def project_dictionary(dictionary: Any, xp: ModuleType) -> Any:
    """Every row of a :class:`~dpm.dictionary.Dictionary` as one ``(m, npix)`` float32 array on ``xp``."""
    out = xp.empty((len(dictionary), dictionary.n_pixels), dtype=xp.float32)
    for start in range(0, len(dictionary), _PROJECT_ROWS):
        stop = min(start + _PROJECT_ROWS, len(dictionary))
        dictionary.chunk(start, stop, xp, out=out[start:stop])
    return out


def dictionary_key(dictionary: Any, master: Any) -> str:
    """Hash of everything a dictionary's patterns depend on."""
    from dpm.store import array_hash

    mask = dictionary.mask if dictionary.mask is not None else np.zeros(0)
    return array_hash(master.northern, master.southern, dictionary.quaternions, mask,
                      extra=repr(dictionary.detector))


class DictionaryFile:
    """A projected dictionary in the on-disk cache, read chunk by chunk (a ``PatternSource``).

    The file is a ``.npy`` array ``(m, npix)`` float32 named by the hash of
    the master pattern, detector, mask and orientations; it is written whole
    (temporary file, then rename) by the first process that needs it, so the
    workers of a cluster on a shared file system build it once.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise ValueError(f"{self.path}: not a dictionary cache file (shape {shape}, dtype {dtype})")
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def chunk(self, start: int, stop: int, xp: ModuleType) -> Any:
        npix = self.shape[1]
        rows = np.fromfile(self.path, dtype=np.float32, count=(stop - start) * npix,
                           offset=self.offset + 4 * start * npix).reshape(stop - start, npix)
        return rows if xp is np else xp.asarray(rows)

    @classmethod
    def cached(cls, dictionary: Any, master: Any) -> "DictionaryFile":
        """The cache file of ``dictionary`` (projected from ``master``), built if missing."""
        from dpm.io.writers import atomic_write
        from dpm.master.cache import cache_dir

        folder = cache_dir() / "dictionaries"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{dictionary_key(dictionary, master)}.npy"
        if not path.exists():
            t = time.perf_counter()

            def write(tmp: Path) -> None:
                header = {"descr": "<f4", "fortran_order": False,
                          "shape": (len(dictionary), dictionary.n_pixels)}
                with open(tmp, "wb") as fh:
                    np.lib.format.write_array_header_2_0(fh, header)
                    for start in range(0, len(dictionary), _PROJECT_ROWS):
                        stop = min(start + _PROJECT_ROWS, len(dictionary))
                        rows = backend.to_host(dictionary.chunk(start, stop, np))
                        fh.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())

            atomic_write(path, write)
            log.info("dictionary cache %s written in %.1f s", path, time.perf_counter() - t)
        return cls(path)


def block_rows(context: ChunkContext, block: tuple[int, int, int, int],
               digest: Callable[[np.ndarray], None] | None = None) -> tuple[Any, np.ndarray]:
    """Preprocessed, normalised rows of one map block.

    Returns
    -------
    rows : (k, npix) float32 array on the context's device
        Zero-mean unit-norm rows over ``mask_used``; zero rows where unreadable.
    readable : (k,) bool host array
        False for constant patterns and patterns constant after preprocessing.
    """
    from dpm.match import prepare_patterns
    from dpm.preprocess import preprocess_block

    xp = context.xp
    patterns, ok = preprocess_block(context.stack(), context.config.preprocess, block,
                                    background=context.background_on(xp), mask=context.raw_mask,
                                    xp=xp, digest=digest)
    rows = xp.zeros((len(ok), context.n_pixels), dtype=xp.float32)
    readable = np.zeros(len(ok), dtype=bool)
    idx = np.flatnonzero(ok)
    if len(idx):
        prepared, valid = prepare_patterns(patterns[xp.asarray(idx)], mask=context.mask_used)
        valid = backend.to_host(valid)
        rows[xp.asarray(idx[valid])] = prepared[xp.asarray(np.flatnonzero(valid))]
        readable[idx[valid]] = True
    return rows, readable


def blas_threads() -> int:
    """Threads this process's BLAS uses (1 when threadpoolctl sees none)."""
    from threadpoolctl import threadpool_info

    counts = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    return max(counts, default=1)


def index_chunk(context: ChunkContext, block: tuple[int, int, int, int]) -> dict[str, Any]:
    """Results of one map block: the arrays of :data:`dpm.store.CHUNK_FIELDS`.

    Also ``raw_hash`` (content hash of the block's raw patterns),
    ``seconds`` (per stage) and, for the caller's row cache, ``rows``
    (only when run in-process; a Dask task drops them). BLAS runs with
    ``context.blas_threads`` threads.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=context.blas_threads, user_api="blas"):
        return _index_chunk(context, block)


def match_rows(context: ChunkContext, rows: Any, keep: int) -> Any:
    """Best ``keep`` dictionary matches of normalised rows, by the run's search method.

    Returns
    -------
    dpm.match.MatchResult
        Rows of the context's orientations and their NCC, best first.
    """
    from dpm.match import MatchConfig, match
    from dpm.search import coarse_to_fine

    search = context.config.search
    budget = max(1, context.budget // 2)
    if search.uses_coarse_to_fine(context.config.resolution) and context.lattice is not None:
        return coarse_to_fine(rows, context.search(), keep=keep, config=search,
                              memory_budget=budget)
    if search.method == "pca":
        from dpm.compression import match_compressed

        compressed, fine = context.compressed()
        return match_compressed(rows, compressed, fine, keep=keep,
                                rerank=max(keep, compressed.config.rerank), memory_budget=budget)
    if search.method == "fused":
        from dpm.dictionary import Dictionary
        from dpm.fused import FusedConfig, match_on_the_fly

        dictionary = Dictionary(context.dictionary_master(), context.det_used,
                                context.rotations, mask=context.mask_used)
        return match_on_the_fly(rows, dictionary, config=FusedConfig(
            keep=keep, precision=search.precision, memory_budget=budget))
    return match(rows, context.dictionary(), config=MatchConfig(keep=keep, memory_budget=budget))


def _index_chunk(context: ChunkContext, block: tuple[int, int, int, int]) -> dict[str, Any]:
    from dpm.refine import refine
    from dpm.store import array_hash

    config = context.config
    seconds: dict[str, float] = {}
    hashes: list[str] = []
    t = time.perf_counter()
    rows, readable = block_rows(context, block, digest=lambda raw: hashes.append(array_hash(raw)))
    seconds["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    n = len(readable)
    bc, iq = context.block_quality(block, rows)
    seconds["band_contrast"] = time.perf_counter() - t

    t = time.perf_counter()
    found = match_rows(context, rows, config.keep)
    indices = backend.to_host(found.indices)
    dict_scores = backend.to_host(found.scores).astype(np.float32)
    dict_scores[~readable] = 0.0
    seconds["match"] = time.perf_counter() - t

    topk = context.rotations[indices].astype(np.float64)
    if config.refine:
        t = time.perf_counter()
        refinement = config.refinement
        if refinement.pattern_centre == "shared":   # fitted before the chunks
            refinement = replace(refinement, pattern_centre="fixed")
        refinement = replace(refinement, memory_budget=refinement.memory_budget
                             or max(1, context.budget // 4))
        refined = refine(rows, context.refinement_master(), context.det_used, topk,
                         mask=context.mask_used, valid=readable, pcs=context.block_pcs(block),
                         config=refinement)
        quaternions, scores = refined.quaternions, refined.scores.astype(np.float32)
        pcs, iterations = refined.pcs, refined.iterations.astype(np.int32)
        seconds["refine"] = time.perf_counter() - t
    else:
        quaternions, scores = topk[:, 0], dict_scores[:, 0]
        pcs = np.tile(np.asarray(context.det_used.pc, dtype=np.float64), (n, 1))
        iterations = np.zeros(n, dtype=np.int32)
    return {"readable": readable, "band_contrast": bc, "pattern_quality": iq,
            "topk_indices": indices, "topk_scores": dict_scores, "quaternions": quaternions,
            "scores": scores, "pcs": pcs, "iterations": iterations, "raw_hash": hashes[0],
            "seconds": seconds, "rows": rows}


def _remote_chunk(context: ChunkContext, block: tuple[int, int, int, int]) -> dict[str, Any]:
    """:func:`index_chunk` as a Dask task: the rows stay on the worker."""
    results = index_chunk(context, block)
    del results["rows"]
    return results


def run_chunks(context: ChunkContext, blocks: list[tuple[int, int, int, int]],
               pending: list[int], on_result: Callable[[int, dict[str, Any]], None], *,
               scheduler: Any = None) -> None:
    """Compute the chunks ``pending`` and pass each result to ``on_result(k, results)``.

    Parameters
    ----------
    context
        The run's :class:`ChunkContext`.
    blocks
        Map blocks of all chunks.
    pending
        Chunks to compute, in map order.
    on_result
        Called in this process, in completion order (map order without a
        scheduler), e.g. to write the chunk to the result store.
    scheduler
        None: run here, one chunk after another. Otherwise a
        ``dask.distributed`` scheduler address (``"tcp://host:8786"``) or
        ``Client``: every chunk is a task, the context is sent once to every
        worker (a few MB: master pattern and orientations), and each worker
        opens the pattern file and builds its dictionary itself.
    """
    if scheduler is None:
        for k in pending:
            on_result(k, index_chunk(context, blocks[k]))
        return
    from distributed import Client, as_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        if context.source is not None and not Path(context.source).is_absolute():
            context = replace(context, source=os.path.abspath(context.source))
        shared = client.scatter(context, broadcast=True, hash=False)
        futures = {client.submit(_remote_chunk, shared, blocks[k], pure=False,
                                 key=f"dpm-chunk-{context.key}-{k}"): k for k in pending}
        for future in as_completed(futures):
            on_result(futures[future], future.result())
            future.release()
    finally:
        if client is not scheduler:
            client.close()


class PatternRows:
    """Preprocessed rows of a map, read by fancy indexing and recomputed block by block.

    The map-level stages (:func:`dpm.cleanup.replace_zero_solutions`,
    :func:`dpm.pseudo_symmetry.clean_pseudo_symmetry`) revisit some pixels'
    patterns; ``rows[pixels]`` recomputes the blocks holding them exactly as
    the chunk stage did (:func:`block_rows`) and keeps the most recent blocks
    within ``budget`` bytes.

    Attributes
    ----------
    shape
        ``(n, npix)``.
    array_module
        NumPy or CuPy: where the rows come back.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, context: ChunkContext, blocks: list[tuple[int, int, int, int]],
                 budget: int) -> None:
        nx = context.map_shape[1]
        self.context = context
        self.blocks = blocks
        self.starts = np.array([b[0] * nx + b[2] for b in blocks], dtype=np.int64)
        n = int(np.prod(context.map_shape))
        self.shape = (n, context.n_pixels)
        self.array_module = context.xp
        self.budget = int(budget)
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return self.shape[0]

    def offer(self, k: int, rows: Any) -> None:
        """Keep block ``k``'s rows, computed elsewhere, if the budget has room."""
        if self._bytes + rows.nbytes <= self.budget and k not in self._cache:
            self._cache[k] = rows
            self._bytes += rows.nbytes

    def _block(self, k: int) -> Any:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=self.context.blas_threads, user_api="blas"):
            rows, _ = block_rows(self.context, self.blocks[k])
        while self._cache and self._bytes + rows.nbytes > self.budget:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        if rows.nbytes <= self.budget:
            self._cache[k] = rows
            self._bytes += rows.nbytes
        return rows

    def __getitem__(self, pixels: Any) -> Any:
        xp = self.array_module
        idx = np.asarray(backend.to_host(pixels), dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"pixel indices must be in [0, {self.shape[0]}), got "
                             f"{idx.min()}..{idx.max()}")
        out = xp.empty((len(idx), self.shape[1]), dtype=xp.float32)
        owner = np.searchsorted(self.starts, idx, side="right") - 1
        order = np.argsort(owner, kind="stable")
        bounds = np.flatnonzero(np.diff(owner[order])) + 1
        for part in np.split(order, bounds) if len(order) else []:
            k = int(owner[part[0]])
            rows = self._block(k)
            out[xp.asarray(part)] = rows[xp.asarray(idx[part] - self.starts[k])]
        return out
