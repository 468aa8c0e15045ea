"""The noisy-pattern set-up that the search and compression tests share.

A 2.5° cubochoric grid of the shipped 20 kV Li master pattern, its dictionary
on a 32 x 32 px detector (52 607 rows, low-passed for the grid's cells), and
150 patterns of random orientations (some next to the zone's faces) with
Gaussian noise of 0.3 times the patterns' standard deviation, with their
exhaustive matches: the oracle both tests compare against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from orix.quaternion import Orientation
from orix.quaternion.symmetry import O

from dpm.detector import Detector
from dpm.dictionary import Dictionary
from dpm.match import MatchConfig, match, prepare_patterns
from dpm.projection import integrate_pixels
from dpm.sampling import cubochoric_grid

#: Grid spacing of the set-up, degrees.
RESOLUTION = 2.5


def noisy_patterns_setup(master: Any, keep: int) -> dict[str, Any]:
    """The set-up's arrays: ``grid``, ``dictionary``, ``rows`` (every dictionary row),
    ``patterns``, ``truth`` (orix Orientations), ``exhaustive`` (best ``keep``
    MatchResult), ``master`` and ``detector``."""
    detector = Detector(shape=(32, 32), pc=(0.5, 0.3, 0.6))
    grid = cubochoric_grid(master.phase, RESOLUTION)
    smooth = integrate_pixels(master, detector, orientation_spread=RESOLUTION / 2)
    dictionary = Dictionary(smooth, detector, grid.rotations.data.astype(np.float32))
    rng = np.random.default_rng(7)
    q = rng.normal(size=(150, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = Orientation(q, symmetry=O).reduce()
    sharp = Dictionary(master, detector, truth.data.astype(np.float32)).chunk(0, 150)
    noisy = sharp + rng.normal(scale=0.3 * float(sharp.std()), size=sharp.shape).astype(np.float32)
    patterns, _ = prepare_patterns(noisy.astype(np.float32))
    rows = dictionary.chunk(0, len(dictionary))
    exhaustive = match(patterns, rows, config=MatchConfig(keep=keep))
    return {"grid": grid, "dictionary": dictionary, "rows": rows, "patterns": patterns,
            "truth": truth, "exhaustive": exhaustive, "master": master, "detector": detector}
