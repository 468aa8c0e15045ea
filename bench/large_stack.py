"""Write a large synthetic Li stack for memory and throughput measurements of ``dpm index``.

``python3 bench/large_stack.py OUT.npy [--patterns 100000] [--size 60]`` draws a
columnar Li map (the shipped 20 kV dynamical master pattern, a 60 × 60
detector) of about ``--patterns`` patterns, row block by row block so the
generator itself stays small, and writes it as a ``(ny, nx, sy, sx)`` uint8
``.npy`` file (100 000 × 60 × 60 px: 360 MB). The command that indexes it
and the pattern centre to give are printed.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from dpm.detector import Detector
from dpm.master.shipped import shipped_master_pattern
from dpm.synthetic import SyntheticConfig, synthetic_map

#: Pattern centre (Bruker) of the generated patterns.
PC = (0.5, 0.3, 0.6)
#: Map rows drawn per block.
BLOCK_ROWS = 16


def write_stack(path: str, patterns: int = 100_000, size: int = 60) -> tuple[int, int]:
    """Write a columnar Li map of about ``patterns`` patterns of ``size``² px; returns (ny, nx)."""
    nx = int(math.ceil(math.sqrt(patterns)))
    ny = int(math.ceil(patterns / nx))
    det = Detector((size, size), pc=PC)
    master = shipped_master_pattern("li", 20)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(ny, nx, size, size))
    for r0 in range(0, ny, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, ny - r0)
        block = synthetic_map(master, det, SyntheticConfig(map_shape=(rows, nx), grain_width=12,
                                                           seed=r0))
        out[r0:r0 + rows] = block.patterns
    out.flush()
    return ny, nx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--patterns", type=int, default=100_000)
    p.add_argument("--size", type=int, default=60)
    args = p.parse_args()
    ny, nx = write_stack(args.out, args.patterns, args.size)
    print(f"{args.out}: {ny} x {nx} patterns of {args.size} x {args.size} px, uint8")
    print(f"dpm index {args.out} --pc {PC[0]} {PC[1]} {PC[2]} --memory-budget 1GB --out DIR")


if __name__ == "__main__":
    main()
