"""Benches reuse the tests' oracles (EMsoft's Ni settings reader, fixtures)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
