"""A dictionary of simulated patterns that projects itself chunk by chunk.

Dictionary indexing compares each experimental pattern with one simulated
pattern per sampled orientation. A 2° dictionary of a cubic phase holds about
100 000 patterns (1.4 GB at 60 × 60 px in float32), so :class:`Dictionary`
never stores them: :func:`dpm.match.match` asks for rows ``start:stop`` and the
dictionary projects those orientations from the master pattern on the device
the matcher works on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from dpm.detector import Detector, as_detector, direction_vectors
from dpm.master import MasterPattern
from dpm.projection import master_on_device, project_vectors


@dataclass(frozen=True, eq=False)
class Dictionary:
    """Simulated patterns of a master pattern seen by a detector, one per orientation.

    Attributes
    ----------
    master
        Master pattern to project.
    detector
        Detector geometry (dpm :class:`~dpm.detector.Detector` or kikuchipy
        ``EBSDDetector``).
    quaternions : (m, 4) float32 array
        Orientations as unit quaternions ``(a, b, c, d)`` (orix convention,
        sample to crystal).
    mask : (sy, sx) bool array or None
        Signal mask, True where a detector pixel is used; None uses all pixels.
    """

    master: MasterPattern
    detector: Detector
    quaternions: np.ndarray
    mask: np.ndarray | None = None
    _device_cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        det = as_detector(self.detector)
        q = np.ascontiguousarray(np.asarray(self.quaternions, dtype=np.float32).reshape(-1, 4))
        if len(q) == 0:
            raise ValueError("dictionary needs at least one orientation")
        if self.mask is not None:
            mask = np.asarray(self.mask, dtype=bool)
            if mask.shape != det.shape:
                raise ValueError(f"signal mask shape {mask.shape} differs from the detector "
                                 f"shape {det.shape}")
            if not mask.any():
                raise ValueError("signal mask hides every detector pixel")
            object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "detector", det)
        object.__setattr__(self, "quaternions", q)

    def __len__(self) -> int:
        return len(self.quaternions)

    @property
    def n_pixels(self) -> int:
        """Pixels per dictionary pattern (inside the signal mask)."""
        return int(self.mask.sum()) if self.mask is not None else int(np.prod(self.detector.shape))

    def _vectors(self, xp: ModuleType) -> Any:
        """Directions of the (masked) detector pixels on ``xp``, uploaded once."""
        if xp not in self._device_cache:
            vectors = direction_vectors(self.detector).astype(np.float32)
            if self.mask is not None:
                vectors = vectors[self.mask.ravel()]
            self._device_cache[xp] = xp.asarray(np.ascontiguousarray(vectors))
        return self._device_cache[xp]

    def chunk(self, start: int, stop: int, xp: ModuleType = np, out: Any = None) -> Any:
        """Project dictionary rows ``start:stop`` on ``xp`` (into ``out`` when given: a
        C-contiguous ``(stop - start, n_pixels)`` float32 array on ``xp``).

        Returns
        -------
        patterns : (stop - start, n_pixels) float32 array on ``xp``
            Zero-mean, unit-norm rows over the masked pixels.
        """
        north, south = master_on_device(xp, self.master)
        q = xp.asarray(self.quaternions[start:stop])
        return project_vectors(north, south, self._vectors(xp), q, out=out)
