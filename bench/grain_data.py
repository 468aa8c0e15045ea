"""Data for the grain benches: a 2000 x 2000-pixel map of stacked columnar films.

:func:`stacked_columns` stacks ten 200 x 2000-pixel columnar films
(:func:`dpm.synthetic.columnar_grains`), each with its own grains, into one
map of true grain ids.
"""

from __future__ import annotations

import numpy as np

from dpm.synthetic import SyntheticConfig, columnar_grains

LAYERS = 10
LAYER_SHAPE = (200, 2000)


def stacked_columns(rng: np.random.Generator, grain_width: float) -> np.ndarray:
    """(2000, 2000) true grain ids: ``LAYERS`` films of mean column width ``grain_width`` px."""
    cfg = SyntheticConfig(map_shape=LAYER_SHAPE, grain_width=grain_width)
    layers, offset = [], 0
    for _ in range(LAYERS):
        ids = columnar_grains(cfg, rng)
        layers.append(ids + offset)
        offset += int(ids.max()) + 1
    return np.concatenate(layers)
