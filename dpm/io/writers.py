"""Writers for indexing results: orix CrystalMap HDF5, .ang, PNG maps, JSON and TOML.

:func:`write_index_outputs` fills an output folder the way ``dpm index``
promises (DESIGN.md, "Command line"): ``map.h5``, ``map.ang``, ``ipf_z.png``,
``scores.png``, ``summary.json`` and ``config.toml``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


class OutputError(OSError):
    """An output folder or file cannot be written."""


def prepare_output_dir(out: str | Path) -> Path:
    """Create ``out`` if needed and check that it is a writable folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dpm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output folder {out} is not writable ({e.strerror or e})") from None
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write {value} to TOML")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(config: dict[str, Any]) -> str:
    """Serialise a nested dict of scalars and lists as TOML (None values are left out)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def write_index_outputs(result, out: str | Path, extra_summary: dict[str, Any] | None = None) -> list[Path]:
    """Write the files of an indexing run into ``out``.

    Parameters
    ----------
    result
        :class:`dpm.pipeline.IndexResult`.
    out
        Output folder (created if missing).
    extra_summary
        Additional entries for ``summary.json`` (e.g. accuracy against a known truth).

    Returns
    -------
    paths
        The files written.
    """
    from orix import io as orix_io

    from dpm.maps import ipf_colors, save_rgb, save_scalar

    out = prepare_output_dir(out)
    xmap = result.xmap
    paths = [out / "map.h5", out / "map.ang", out / "ipf_z.png", out / "scores.png",
             out / "summary.json", out / "config.toml"]
    orix_io.save(str(paths[0]), xmap, overwrite=True)
    orix_io.save(str(paths[1]), xmap, confidence_index_prop="scores", overwrite=True)
    save_rgb(paths[2], ipf_colors(xmap, "z"))
    save_scalar(paths[3], result.scores, cmap="gray", vmin=0.0)
    if result.band_contrast is not None:
        paths.append(out / "band_contrast.png")
        save_scalar(paths[-1], result.band_contrast, cmap="gray", vmin=0.0, vmax=255.0)
    if "pattern_quality" in xmap.prop:
        paths.append(out / "pattern_quality.png")
        save_scalar(paths[-1], np.asarray(xmap.prop["pattern_quality"]).reshape(result.scores.shape),
                    cmap="gray", vmin=0.0)
    summary = result.summary() | (extra_summary or {})
    paths[4].write_text(json.dumps(summary, indent=2) + "\n")
    paths[5].write_text(to_toml(result.config.to_dict()))
    return paths
