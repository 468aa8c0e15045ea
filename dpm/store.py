"""The result store of an indexing run: chunk results on disk, so a run resumes.

``dpm index --out DIR`` keeps in ``DIR``:

- ``run.json``: the manifest — dpm's version, the run's resolved config, the
  input (source, shape, dtype and a fingerprint of its content), the chunk
  layout (map blocks) and memory budget the run uses, what the run resolved
  before its first chunk (pattern centre), its state (``"running"``,
  ``"complete"``) and, when complete, the content hash of every pattern read;
- ``chunks/NNNNNN.npz``: the per-pattern results of each chunk of map pixels
  (see :data:`CHUNK_FIELDS`), one file per chunk;
- ``chunks/static_background.npy``, ``chunks/mask.npy``: the static background
  and signal mask the run resolved, when it uses them.

Every file is written whole or not at all (:func:`dpm.io.writers.atomic_write`:
a temporary file, fsync, rename), so after Ctrl-C, ``kill -9`` or a full disk
the store holds complete chunks only, and the manifest says which run they
belong to. ``--resume`` checks that the config and the input are those of the
manifest, reads the complete chunks and computes only the missing ones: each
chunk's results depend only on its patterns and on what the manifest records,
so a resumed run's results equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("dpm")

#: Version of the store layout; a store of another version is not resumed.
STORE_VERSION = 1
#: Arrays of one chunk file (one value, or row, per pattern of the chunk).
CHUNK_FIELDS = ("readable", "band_contrast", "pattern_quality", "topk_indices", "topk_scores",
                "quaternions", "scores", "pcs", "iterations")
#: Bytes read at each of the sampled positions of a file's fingerprint.
FINGERPRINT_BLOCK = 1 << 20
#: Positions sampled (evenly spaced, first and last block included).
FINGERPRINT_SAMPLES = 16


class ResumeError(ValueError):
    """A store cannot be resumed (another run's config or input), or would be overwritten."""


def fingerprint(source: str | Path | None, data: Any = None) -> str:
    """A quick content fingerprint of a pattern input (hex BLAKE2b, 32 characters).

    A file is fingerprinted by its size and :data:`FINGERPRINT_SAMPLES` blocks
    of :data:`FINGERPRINT_BLOCK` bytes at evenly spaced offsets (a folder, by
    the names, sizes and fingerprints of its files), so the check costs the
    same for a 100 GB file as for a small one; an array without a file, by all
    its bytes. The whole content is hashed chunk by chunk as the run reads it
    (:func:`combined_hash`).
    """
    h = hashlib.blake2b(digest_size=16)
    if source is not None and Path(source).exists():
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            size = file.stat().st_size
            h.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size};".encode())
            with open(file, "rb") as fh:
                span = max(size - FINGERPRINT_BLOCK, 0)
                for k in range(FINGERPRINT_SAMPLES):
                    fh.seek(span * k // (FINGERPRINT_SAMPLES - 1))
                    h.update(fh.read(FINGERPRINT_BLOCK))
        return h.hexdigest()
    return array_hash(data)


def combined_hash(chunk_hashes: list[str]) -> str:
    """Content hash of the whole input: BLAKE2b of the chunks' hashes in map order."""
    return hashlib.blake2b("".join(chunk_hashes).encode(), digest_size=16).hexdigest()


def array_hash(*arrays: Any, extra: str = "") -> str:
    """Content hash of arrays (hex BLAKE2b, 32 characters): each array's shape, dtype and
    bytes in turn, then ``extra``. Used for a chunk's raw patterns, an array input, the
    mask and background a caller gives, and the dictionary cache's file names."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(memoryview(a).cast("B"))
    h.update(extra.encode())
    return h.hexdigest()


def _comparable(value: Any) -> Any:
    """JSON round trip (tuples become lists), so a config compares with its manifest copy."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class ResultStore:
    """The result store in an output folder (see the module notes).

    Attributes
    ----------
    folder
        The output folder.
    manifest
        The content of ``run.json``.
    """

    folder: Path
    manifest: dict[str, Any]

    @property
    def chunk_dir(self) -> Path:
        return self.folder / "chunks"

    @property
    def blocks(self) -> list[tuple[int, int, int, int]]:
        """Map blocks ``(row0, row1, col0, col1)`` of the chunks, in map order."""
        return [tuple(b) for b in self.manifest["blocks"]]

    def chunk_path(self, k: int) -> Path:
        return self.chunk_dir / f"{k:06d}.npz"

    @classmethod
    def open(cls, folder: str | Path, manifest: dict[str, Any], *, resume: bool,
             overwrite: bool = False) -> "ResultStore":
        """Open the store of a run in ``folder``: a new one, or the one to resume.

        Parameters
        ----------
        folder
            Output folder (exists and is writable, see
            :func:`dpm.io.writers.prepare_output_dir`).
        manifest
            The run's manifest: ``config``, ``input`` (``fingerprint``,
            ``shape``, ``dtype``, ``source``), ``blocks``, ``memory_budget``,
            ``device``, and whatever else the run records.
        resume
            Continue the run stored in ``folder``: its config and input must
            be the same (device and budget: the stored run's are kept).
        overwrite
            Start afresh even if ``folder`` holds another run (its chunks are deleted).

        Raises
        ------
        ResumeError
            ``resume`` without a stored run, or with one of another config or
            input (naming what differs); a stored run without ``resume`` or
            ``overwrite``.
        """
        from dpm.io.writers import atomic_write

        folder = Path(folder)
        path = folder / "run.json"
        stored = None
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ResumeError(f"{path}: unreadable run manifest ({e})") from None
        if resume:
            if stored is None:
                raise ResumeError(f"--resume: {folder} holds no run to resume (no run.json)")
            cls._check_same_run(path, stored, manifest)
            store = cls(folder, stored)
            for tmp in store.chunk_dir.glob(".tmp-*"):   # left by a killed write
                tmp.unlink()
            log.info("resuming the run in %s: %d of %d chunks complete", folder,
                     len(store.completed()), len(store.blocks))
            return store
        if stored is not None and not overwrite:
            state = stored.get("state")
            raise ResumeError(
                f"{folder} holds {'a complete' if state == 'complete' else 'an interrupted'} run "
                f"({path}); give --resume to continue it, --overwrite to replace it, or "
                "another --out folder")
        store = cls(folder, _comparable(manifest) | {"state": "running", "version": STORE_VERSION})
        store.chunk_dir.mkdir(exist_ok=True)
        for old in store.chunk_dir.glob("*"):
            old.unlink()
        atomic_write(path, lambda p: p.write_text(json.dumps(store.manifest, indent=1)))
        return store

    @staticmethod
    def _check_same_run(path: Path, stored: dict[str, Any], manifest: dict[str, Any]) -> None:
        if stored.get("version") != STORE_VERSION:
            raise ResumeError(f"{path}: store version {stored.get('version')} cannot be "
                              f"resumed by this dpm (store version {STORE_VERSION})")
        new = _comparable(manifest)
        for key in ("input", "config"):
            if stored.get(key) != new.get(key):
                a, b = stored.get(key) or {}, new.get(key) or {}
                differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ResumeError(f"--resume: the {key} differs from the run in {path} "
                                  f"({', '.join(differ)}); resume with the same {key} or "
                                  "start a new run")
        # The stored run's device, budget and BLAS threads are kept; say so when the
        # command asked for others (a default budget, half the free memory, is not asked).
        for key in ("device", "memory_budget_given", "blas_threads"):
            if stored.get(key) != new.get(key):
                name = key.removesuffix("_given")
                log.warning("resuming with the stored run's %s %s (given: %s), so the "
                            "results equal an uninterrupted run's", name, stored.get(name),
                            new.get(key))

    def update(self, **entries: Any) -> None:
        """Record ``entries`` in the manifest (written atomically)."""
        from dpm.io.writers import atomic_write

        self.manifest.update(_comparable(entries))
        atomic_write(self.folder / "run.json",
                     lambda p: p.write_text(json.dumps(self.manifest, indent=1)))

    def completed(self) -> list[int]:
        """Chunks whose results are on disk."""
        return [k for k in range(len(self.blocks)) if self.chunk_path(k).exists()]

    def write_chunk(self, k: int, results: dict[str, Any]) -> None:
        """Write chunk ``k``'s results (:data:`CHUNK_FIELDS` and ``raw_hash``) whole."""
        from dpm.io.writers import atomic_write

        arrays = {name: np.asarray(results[name]) for name in CHUNK_FIELDS}
        arrays["raw_hash"] = np.asarray(results["raw_hash"])

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(self.chunk_path(k), write)

    def read_chunk(self, k: int) -> dict[str, Any]:
        """Results of chunk ``k`` (raises :class:`ResumeError` naming a damaged file)."""
        path = self.chunk_path(k)
        try:
            with np.load(path) as data:
                out = {name: data[name] for name in (*CHUNK_FIELDS, "raw_hash")}
        except (OSError, ValueError, KeyError) as e:
            raise ResumeError(f"{path}: damaged chunk file ({e}); delete it and --resume "
                              "to compute it again") from None
        out["raw_hash"] = str(out["raw_hash"])
        return out

    def save_array(self, name: str, array: np.ndarray | None) -> None:
        """Keep an array the run resolved (``chunks/NAME.npy``), or remove it for None."""
        from dpm.io.writers import atomic_write

        path = self.chunk_dir / f"{name}.npy"
        if array is None:
            path.unlink(missing_ok=True)
            return
        atomic_write(path, lambda p: np.save(p, np.asarray(array)))

    def load_array(self, name: str) -> np.ndarray | None:
        path = self.chunk_dir / f"{name}.npy"
        return np.load(path) if path.exists() else None
