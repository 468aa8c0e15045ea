"""PNG maps: IPF colours (orix's key) and scalar property maps.

Pixels that are not indexed are drawn black in IPF maps. Images keep the map's
pixel grid (one image pixel per map pixel), row 0 at the top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpm.io.writers import atomic_write


def ipf_colors(xmap, direction: str = "z") -> np.ndarray:
    """IPF colours of the best match of every pixel along a sample direction.

    Parameters
    ----------
    xmap
        orix ``CrystalMap`` with one phase (multi-phase maps colour each phase
        with its own key).
    direction
        Sample direction ``"x"``, ``"y"`` or ``"z"``.

    Returns
    -------
    rgb : (ny, nx, 3) float array in [0, 1]
    """
    from orix.plot import IPFColorKeyTSL
    from orix.vector import Vector3d

    axes = {"x": Vector3d.xvector(), "y": Vector3d.yvector(), "z": Vector3d.zvector()}
    if direction not in axes:
        raise ValueError(f"IPF direction must be 'x', 'y' or 'z', got {direction!r}")
    rgb = np.zeros((xmap.size, 3))
    for phase_id, phase in xmap.phases:
        if phase_id < 0:
            continue
        in_phase = xmap.phase_id == phase_id
        sub = xmap[in_phase]
        key = IPFColorKeyTSL(phase.point_group.laue, direction=axes[direction])
        ori = sub.orientations
        rgb[np.flatnonzero(in_phase & xmap.is_in_data)] = key.orientation2color(ori)
    return rgb.reshape(*xmap.shape, 3)


def _scale(shape: tuple[int, ...], scale: int | None) -> int:
    """Image pixels per map pixel: enough for a ~600 px wide image unless given."""
    return scale if scale is not None else max(1, -(-600 // max(shape[1], 1)))


def save_rgb(path: str | Path, rgb: np.ndarray, scale: int | None = None) -> None:
    """Save an ``(ny, nx, 3)`` image in [0, 1] as PNG, each map pixel ``scale`` image pixels wide."""
    import matplotlib.image as mpimg

    scale = _scale(rgb.shape, scale)
    big = np.repeat(np.repeat(np.clip(rgb, 0, 1), scale, axis=0), scale, axis=1)
    atomic_write(path, lambda tmp: mpimg.imsave(str(tmp), big))


def save_scalar(path: str | Path, values: np.ndarray, cmap: str = "gray",
                vmin: float | None = None, vmax: float | None = None, scale: int | None = None) -> None:
    """Save an ``(ny, nx)`` scalar map (e.g. NCC score) as PNG with a colour map; NaN black."""
    import matplotlib.image as mpimg

    import matplotlib

    scale = _scale(np.shape(values), scale)
    v = np.asarray(values, dtype=float)
    big = np.repeat(np.repeat(v, scale, axis=0), scale, axis=1)
    colours = matplotlib.colormaps[cmap].with_extremes(bad="black")
    atomic_write(path, lambda tmp: mpimg.imsave(str(tmp), np.ma.masked_invalid(big), cmap=colours,
                                                vmin=vmin, vmax=vmax))


#: Sample directions of the IPF maps written by :func:`write_ipf_maps`.
IPF_DIRECTIONS = ("x", "y", "z")


def save_ipf_key(path: str | Path, point_group) -> None:
    """Save orix's IPF colour key (``IPFColorKeyTSL``) of a point group's Laue group as PNG.

    The TSL key colours the crystal direction along the sample direction and
    is the same for every sample direction, so one key serves all IPF maps.
    """
    import matplotlib.pyplot as plt
    from orix.plot import IPFColorKeyTSL

    fig = IPFColorKeyTSL(point_group.laue).plot(return_figure=True)
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=150, bbox_inches="tight"))
    plt.close(fig)


def write_ipf_maps(xmap, out: str | Path) -> list[Path]:
    """Write ``ipf_x.png``, ``ipf_y.png``, ``ipf_z.png`` and ``ipf_key.png`` into ``out``.

    Parameters
    ----------
    xmap
        orix ``CrystalMap`` (unindexed pixels black).
    out
        Existing folder.

    Returns
    -------
    paths
        The files written.
    """
    out = Path(out)
    paths = [out / f"ipf_{d}.png" for d in IPF_DIRECTIONS] + [out / "ipf_key.png"]
    for d, path in zip(IPF_DIRECTIONS, paths):
        save_rgb(path, ipf_colors(xmap, d))
    phases = [phase for phase_id, phase in xmap.phases if phase_id >= 0]
    save_ipf_key(paths[-1], phases[0].point_group)
    return paths


def save_histogram(path: str | Path, values: np.ndarray, *, xlabel: str, bins: int = 30,
                   weights: np.ndarray | None = None, ylabel: str = "grains") -> None:
    """Save a histogram of ``values`` (e.g. grain widths in µm) as PNG, the mean marked.

    The mean is weighted by ``weights`` when given (and the bars are).
    """
    import matplotlib.pyplot as plt

    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    if v.size:
        ax.hist(v, bins=bins, weights=weights, color="0.6", edgecolor="k", linewidth=0.5)
        mean = float(np.average(v, weights=weights))
        ax.axvline(mean, color="tab:red", label=f"mean {mean:.3g}")
        ax.legend(frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=150))
    plt.close(fig)


#: Per-pixel properties drawn by :func:`write_property_maps`: file name ->
#: property names it is read from, first found (dpm's, Oxford .ctf, TSL .ang),
#: and the value range drawn (None: the map's own).
PROPERTY_MAPS = {
    "band_contrast.png": (("band_contrast", "BC"), (0.0, 255.0)),
    "scores.png": (("scores", "ci"), (0.0, None)),
}


def write_property_maps(xmap, out: str | Path, map_shape: tuple[int, int]) -> list[Path]:
    """Write the band contrast and NCC score maps a CrystalMap carries, as grey PNGs.

    ``band_contrast.png`` from ``band_contrast`` (dpm) or ``BC`` (.ctf), 0–255;
    ``scores.png`` from ``scores`` (dpm's refined NCC) or ``ci`` (.ang
    confidence index), from 0. A map without the property gets no file.

    Parameters
    ----------
    xmap
        orix ``CrystalMap``, row-major.
    out
        Existing folder.
    map_shape
        ``(ny, nx)``.

    Returns
    -------
    paths
        The files written.
    """
    paths = []
    for name, (props, (vmin, vmax)) in PROPERTY_MAPS.items():
        prop = next((p for p in props if p in xmap.prop), None)
        if prop is None:
            continue
        values = np.asarray(xmap.prop[prop], dtype=float).reshape(xmap.size, -1)[:, 0]
        paths.append(Path(out) / name)
        save_scalar(paths[-1], values.reshape(map_shape), cmap="gray", vmin=vmin, vmax=vmax)
    return paths


#: The per-pixel PC properties dpm writes into a CrystalMap (Bruker convention).
PC_PROPERTIES = ("pcx", "pcy", "pcz")


def pattern_centres(xmap) -> np.ndarray | None:
    """(n, 3) PC of every pixel of a CrystalMap from its ``pcx``, ``pcy``, ``pcz``
    properties, or None when it does not carry them."""
    if not all(k in xmap.prop for k in PC_PROPERTIES):
        return None
    return np.column_stack([np.asarray(xmap.prop[k], dtype=float) for k in PC_PROPERTIES])


def save_pc_field(path: str | Path, pcs: np.ndarray, *,
                  calibration: np.ndarray | None = None,
                  inliers: np.ndarray | None = None) -> None:
    """Save the pattern centre over a map as one PNG: PCx, PCy and PCz side by side.

    Each panel is the map (row 0 at the top) coloured by one PC component
    (Bruker convention), with its own colour bar; calibration patterns are
    marked, those the field fit rejected as outliers with a cross.

    Parameters
    ----------
    path
        The PNG to write.
    pcs : (ny, nx, 3) float array
        The PC of every map pixel.
    calibration : (k, 2) int array, optional
        Map pixels ``(row, col)`` of the calibration patterns.
    inliers : (k,) bool array, optional
        Which of them the field fit used (default: all).
    """
    import matplotlib.pyplot as plt

    pcs = np.asarray(pcs, dtype=float)
    if pcs.ndim != 3 or pcs.shape[2] != 3:
        raise ValueError(f"pcs must be a (ny, nx, 3) map of PCs, got shape {pcs.shape}")
    ny, nx = pcs.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6 * max(ny / nx, 0.35) + 0.8),
                             layout="constrained")
    for k, (ax, name) in enumerate(zip(axes, ("PCx", "PCy", "PCz"))):
        image = ax.imshow(pcs[..., k], cmap="viridis", interpolation="nearest",
                          extent=(-0.5, nx - 0.5, ny - 0.5, -0.5))
        bar = fig.colorbar(image, ax=ax, shrink=0.85)
        bar.formatter.set_useOffset(False)
        bar.update_ticks()
        ax.set_title(f"{name}: {pcs[..., k].min():.4f} to {pcs[..., k].max():.4f}")
        ax.set_xlabel("column")
        if calibration is not None and len(calibration):
            cal = np.asarray(calibration).reshape(-1, 2)
            used = (np.ones(len(cal), dtype=bool) if inliers is None
                    else np.asarray(inliers, dtype=bool))
            ax.scatter(cal[used, 1], cal[used, 0], s=12, facecolors="none", edgecolors="w",
                       linewidths=0.8, label="calibration")
            if (~used).any():
                ax.scatter(cal[~used, 1], cal[~used, 0], s=16, c="r", marker="x",
                           linewidths=1.0, label="outlier")
    axes[0].set_ylabel("row")
    atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=120))
    plt.close(fig)
