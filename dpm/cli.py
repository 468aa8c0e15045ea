"""Command line: a thin shell over :mod:`dpm.pipeline` (see DESIGN.md, "Command line").

Exit codes (for schedulers and pipelines): 0 on success; 2 on bad input or
usage (fix the input, do not retry); 3 when results cannot be written (full
disk, unwritable folder: what was written is kept, free space and rerun with
``--resume``); 130 when interrupted (Ctrl-C: rerun with ``--resume``); 1 on any
other failure. Errors are one line (``dpm index: error: ...``); ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_INDEX_OPTIONS = ("phase", "master_pattern", "pc", "pc_convention", "sample_tilt",
                  "detector_tilt", "resolution", "refine", "device", "memory_budget",
                  "kv", "npx", "keep", "method", "mask", "grid", "chunk_size", "scheduler",
                  "resume", "overwrite", "out", "pc_field")
#: Command-line flags that set a field of a nested config table: flag -> (table, field).
_TABLE_OPTIONS = {
    "binning": ("preprocess", "binning"),
    "dynamic_background": ("preprocess", "dynamic_sigma"),
    "gaussian": ("preprocess", "gaussian_sigma"),
    "average_neighbours": ("preprocess", "neighbour_sigma"),
    "refine_pc": ("refinement", "pattern_centre"),
    "search": ("search", "method"),
    "match_precision": ("search", "precision"),
    "zero_solution_threshold": ("zero_solutions", "threshold"),
    "band_contrast_threshold": ("zero_solutions", "band_contrast_threshold"),
    "interface_direction": ("grains", "interface_direction"),
    "pc_search_centre": ("pc_search", "centre"),
    "pc_search_width": ("pc_search", "half_width"),
}
_TABLES = ("preprocess", "refinement", "zero_solutions", "cleanup", "pseudo_symmetry", "grains",
           "boundaries", "search", "calibration", "pc_search")


class UsageError(ValueError):
    """Bad command-line usage or input."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpm", description="EBSD dictionary indexing on CPU or GPU.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate, index and analyse the bundled Li example")
    d.add_argument("--config", help="TOML file with any of the options below")
    d.add_argument("--out", default="dpm-demo", help="output folder (default: ./dpm-demo)")
    d.add_argument("--device", default=None, choices=("auto", "cpu", "gpu"))

    s = sub.add_parser("simulate", help="simulate a master pattern (EMsoft HDF5 layout)")
    s.add_argument("--config", help="TOML file with any of the options below")
    s.add_argument("--phase", help="li, na, al, cu or a CIF file (required)")
    s.add_argument("--kv", type=float, default=20.0, help="beam energy in kV (default 20)")
    s.add_argument("--npx", type=int, default=500, help="Lambert half-width in pixels (default 500)")
    s.add_argument("--method", default="dynamical", choices=("dynamical", "kinematical"),
                   help="Bloch-wave dynamical (default) or kinematical")
    s.add_argument("--energy-window", nargs=2, type=float, metavar=("LO", "HI"),
                   help="dynamical only: weight master patterns over this BSE energy window "
                        "(keV) by a Monte Carlo of backscattered electrons")
    s.add_argument("--out", help="output .h5 file (required)")

    i = sub.add_parser("index", help="index a pattern stack")
    i.add_argument("patterns", help=".npy (n, sy, sx) or (ny, nx, sy, sx), or any kikuchipy file")
    i.add_argument("--out", help="output folder (or out = \"DIR\" in the config file)")
    i.add_argument("--config", help="TOML file with any of the options below (the config.toml "
                   "a run writes repeats it)")
    i.add_argument("--phase", help="li, na, al, cu or a CIF file (default li)")
    i.add_argument("--master-pattern", help="master-pattern file (EMsoft HDF5 or kikuchipy)")
    i.add_argument("--pc", nargs=3, type=float, metavar=("X", "Y", "Z"), help="pattern centre")
    i.add_argument("--pc-convention", help="bruker (default), tsl, edax, oxford, emsoft")
    i.add_argument("--sample-tilt", type=float, help="sample tilt in degrees (default 70)")
    i.add_argument("--detector-tilt", type=float, help="detector tilt in degrees (default 0)")
    i.add_argument("--resolution", type=float, help="dictionary orientation spacing, degrees (default 2)")
    i.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                   help="report dictionary matches without refinement")
    i.add_argument("--device", choices=("auto", "cpu", "gpu"), help="default auto")
    i.add_argument("--memory-budget", help="bytes the run may use, e.g. 4GB; sets the chunk "
                   "size, independent of the number of patterns (default half the free memory)")
    i.add_argument("--chunk-size", type=int, help="patterns per chunk at most (default 4096; "
                   "fewer when the memory budget asks)")
    i.add_argument("--resume", action="store_true", default=None,
                   help="continue the interrupted run stored in --out (same input and options)")
    i.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a run already stored in --out")
    i.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the chunks as tasks on this dask.distributed scheduler "
                   "(e.g. tcp://host:8786); workers need dpm and the pattern file's path")
    i.add_argument("--kv", type=float, help="beam energy for a simulated master pattern (default 20)")
    i.add_argument("--npx", type=int, help="Lambert half-width of a simulated master pattern (default 250)")
    i.add_argument("--method", choices=("dynamical", "kinematical"),
                   help="master-pattern simulation method (default dynamical)")
    i.add_argument("--keep", type=int, help="best matches kept per pattern (default 10)")
    i.add_argument("--mask", help="signal mask: none (default), circular, shadow (from the "
                   "static background) or an image file (.png/.npy)")
    i.add_argument("--binning", type=int, help="bin patterns by this factor (default 1)")
    i.add_argument("--dynamic-background", type=float, metavar="SIGMA",
                   help="remove a dynamic background: Gaussian blur of σ pixels")
    i.add_argument("--gaussian", type=float, metavar="SIGMA",
                   help="Gaussian filter of each pattern, σ in pixels (the sodium step)")
    i.add_argument("--average-neighbours", type=float, metavar="SIGMA",
                   help="average neighbouring patterns with a Gaussian window of σ map pixels")
    i.add_argument("--search", choices=("coarse-to-fine", "exhaustive", "fused", "pca"),
                   help="dictionary search: coarse-to-fine (default: a 2x coarser grid, then "
                   "the fine grid near each pattern's best coarse matches), exhaustive, "
                   "fused (exhaustive with the dictionary made on the fly, never stored: the "
                   "GPU kernel) or pca (in the span of the dictionary's principal components, "
                   "the best 16 rescored exactly; cached on disk)")
    i.add_argument("--match-precision", choices=("fp32", "tf32", "fp16"),
                   help="operand rounding of --search fused (default fp32)")
    i.add_argument("--refine-pc", choices=("fixed", "shared", "pattern"),
                   help="pattern centre in refinement: fixed (default), one shared PC fitted "
                   "for the map, or per pattern")
    i.add_argument("--pc-field", choices=("auto", "plane", "constant"),
                   help="pattern centre over the map: auto (default: calibrated on patterns "
                   "spread over the map, the constrained field of a tilted flat sample, every "
                   "pattern refined at its own PC; the given PC is the map centre's), plane "
                   "(each PC component a free plane) or constant (the given PC everywhere)")
    i.add_argument("--pc-search-centre", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="find the PC in a box about this one (Bruker; default 0.5 0.5 0.5, "
                   "searched by itself when neither --pc nor the file gives a PC)")
    i.add_argument("--pc-search-width", type=float, metavar="W",
                   help="half-width of the PC search box in PC units (default 0.05)")
    i.add_argument("--no-zero-solutions", dest="zero_solutions", action="store_false",
                   default=None, help="keep zero solutions as matched (no neighbour replacement)")
    i.add_argument("--no-cleanup", dest="cleanup", action="store_false", default=None,
                   help="no wild-spike removal or neighbour fill after the zero solutions")
    i.add_argument("--no-pseudo-symmetry", dest="pseudo_symmetry", action="store_false",
                   default=None, help="no re-matching of grains in the 60° <111> relation")
    i.add_argument("--zero-solution-threshold", type=float, metavar="NCC",
                   help="NCC below which a pixel is a zero solution (default: from the map)")
    i.add_argument("--band-contrast-threshold", type=float, metavar="BC",
                   help="zero solutions are replaced only above this band contrast (default 10)")
    i.add_argument("--grid", choices=("square", "hexagonal"), help="map grid (default square)")
    i.add_argument("--interface-direction", choices=("x", "y"),
                   help="map axis along the interface, for grain widths (default x)")

    g = sub.add_parser("grains", help="grains and grain statistics of an orientation map")
    g.add_argument("map", help="orientation map: dpm's map.h5, an orix .h5, .ang or .ctf")
    g.add_argument("--config", help="TOML file with any of the options below (the config.toml "
                   "a run writes repeats it)")
    g.add_argument("--out", help="output folder (required)")
    g.add_argument("--interface-direction", choices=("x", "y"), default="x",
                   help="map axis along the interface (default x)")
    g.add_argument("--high-angle", type=float, default=10.0,
                   help="grain-boundary misorientation in degrees (default 10)")
    g.add_argument("--low-angle", type=float, default=2.0,
                   help="low-angle boundary misorientation in degrees (default 2)")
    g.add_argument("--min-size", type=int, default=1, help="smallest grain counted, pixels")
    g.add_argument("--grid", choices=("square", "hexagonal"),
                   help="map grid (default: the file's; .ctf and .h5 maps are square)")

    g.add_argument("--perpendicular-tolerance", type=float, default=10.0,
                   help="degrees from perpendicular to the interface within which a boundary "
                   "trace counts as perpendicular (default 10)")

    f = sub.add_parser("info", help="what dpm sees in a pattern or master-pattern file")
    f.add_argument("file")
    return p


def _config_fields() -> set[str]:
    """Every field of :class:`dpm.pipeline.IndexConfig` (what config.toml holds)."""
    import dataclasses

    from dpm.pipeline import IndexConfig

    return {f.name for f in dataclasses.fields(IndexConfig)}


def _load_toml(path: str) -> dict[str, Any]:
    """The content of a TOML config file (UsageError naming it when missing or invalid)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    return data


def _index_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < command line."""
    options: dict[str, Any] = {"phase": "li", "pc_convention": "bruker"}
    if args.config:
        data = _load_toml(args.config)
        unknown = set(data) - set(_INDEX_OPTIONS) - _config_fields()
        if unknown:
            raise UsageError(f"config file {args.config}: unknown option(s) {sorted(unknown)}")
        options.update(data)
    options.update({k: getattr(args, k) for k in _INDEX_OPTIONS if getattr(args, k) is not None})
    for flag, (table, name) in _TABLE_OPTIONS.items():
        value = getattr(args, flag)
        if value is not None:
            options.setdefault(table, {})[name] = value
    if flag_value := getattr(args, "dynamic_background"):
        options["preprocess"]["dynamic_background"] = bool(flag_value)
    if args.zero_solutions is False:
        options["zero_solutions"] = None
    if args.cleanup is False:
        options["cleanup"] = None
    if args.pseudo_symmetry is False:
        options["pseudo_symmetry"] = None
    return options


def _run_index(args: argparse.Namespace) -> int:
    import numpy as np

    from dpm import backend
    from dpm.detector import Detector
    from dpm.io.readers import read_patterns
    from dpm.io.writers import prepare_output_dir, write_index_outputs
    from dpm.cleanup import MapCleanupConfig, ZeroSolutionConfig
    from dpm.grains import GrainConfig
    from dpm.boundaries import BoundaryConfig
    from dpm.calibration import CalibrationConfig, PCFieldConfig, PCSearchConfig
    from dpm.pipeline import NEEDS_REFINE, IndexConfig, index
    from dpm.preprocess import PreprocessConfig
    from dpm.pseudo_symmetry import PseudoSymmetryConfig
    from dpm.refine import RefineConfig
    from dpm.search import SearchConfig

    opts = _index_options(args)
    if not opts.get("out"):
        raise UsageError("give the output folder: --out DIR, or out = \"DIR\" in the config file")
    out = prepare_output_dir(opts["out"])
    stack = read_patterns(args.patterns)
    # Tilts not given: the file's, else the defaults (70°, 0°).
    meta = getattr(stack, "metadata", {}) or {}
    sample_tilt = opts.get("sample_tilt", meta.get("sample_tilt"))
    detector_tilt = opts.get("detector_tilt", meta.get("detector_tilt"))
    if "pc" in opts:
        det = Detector.from_pc(tuple(opts["pc"]), convention=opts["pc_convention"],
                               shape=stack.pattern_shape,
                               sample_tilt=70.0 if sample_tilt is None else sample_tilt,
                               tilt=0.0 if detector_tilt is None else detector_tilt)
    else:
        det = stack.detector
        if det is not None and ("sample_tilt" in opts or "detector_tilt" in opts):
            det = replace(det, sample_tilt=det.sample_tilt if sample_tilt is None else sample_tilt,
                          tilt=det.tilt if detector_tilt is None else detector_tilt)
    if det is None:     # no PC anywhere: searched in the [pc_search] box (its defaults)
        opts.setdefault("pc_search", {})
    if "grid" not in opts and getattr(stack, "grid", "square") != "square":
        opts["grid"] = stack.grid    # the file's grid
    fields = {k: opts[k] for k in _config_fields() - set(_TABLES) if k in opts}
    if opts.get("memory_budget") is not None:
        fields["memory_budget"] = backend.parse_bytes(opts["memory_budget"])
    for stage in NEEDS_REFINE:
        if opts.get(stage) is False:  # config.toml's spelling of "stage off"
            opts[stage] = None
    for table, cls in (("preprocess", PreprocessConfig), ("refinement", RefineConfig),
                       ("zero_solutions", ZeroSolutionConfig), ("cleanup", MapCleanupConfig),
                       ("pseudo_symmetry", PseudoSymmetryConfig), ("grains", GrainConfig),
                       ("boundaries", BoundaryConfig), ("search", SearchConfig),
                       ("calibration", CalibrationConfig), ("pc_search", PCSearchConfig)):
        if table in opts:
            try:
                values = dict(opts[table]) if opts[table] is not None else None
                if table == "calibration" and isinstance(values.get("field"), dict):
                    values["field"] = PCFieldConfig(**values["field"])
                fields[table] = None if values is None else cls(**values)
            except TypeError as e:
                raise UsageError(f"[{table}] options: {e}") from None
    config = IndexConfig(**fields)
    if det is None:
        det = Detector(shape=stack.pattern_shape, pc=config.pc_search.centre,
                       sample_tilt=70.0 if sample_tilt is None else sample_tilt,
                       tilt=0.0 if detector_tilt is None else detector_tilt)
    try:
        result = index(stack, phase=opts["phase"], detector=det,
                       master_pattern=opts.get("master_pattern"), config=config,
                       progress=not args.quiet, out=out, resume=bool(opts.get("resume")),
                       overwrite=bool(opts.get("overwrite")), scheduler=opts.get("scheduler"))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the chunks completed are stored in {out}; run the same "
                                "command with --resume to continue") from None
    write_index_outputs(result, out)
    grain_map = _write_grains(result.xmap, out, result.config.grains,
                              result.config.boundaries)
    s = result.scores
    indexed = int((result.xmap.phase_id >= 0).sum())
    zs = result.details.get("zero_solutions")
    replaced = f", {zs['replaced']} zero solutions replaced from neighbours" if zs else ""
    print(f"indexed {indexed} of {s.size} patterns against {result.dictionary_size} orientations"
          f"{' (refined)' if result.refined else ''}{replaced} in "
          f"{result.timings['total']:.1f} s; mean NCC {float(np.mean(s)):.3f}; "
          f"{grain_map.summary['n_grains']} grains; results in {out}")
    return EXIT_OK


def _write_grains(xmap: Any, out: Path, config: Any, boundary_config: Any) -> Any:
    """Grains of a map and their files (:func:`dpm.grains.write_grain_outputs`) in ``out``."""
    from dpm.grains import grains, write_grain_outputs

    grain_map = grains(xmap, config)
    write_grain_outputs(grain_map, xmap, out, boundary_config)
    return grain_map


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[command]


def _with_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      argv: list[str] | None) -> argparse.Namespace:
    """Arguments of ``dpm simulate|grains|demo`` with the ``--config`` file's options as defaults.

    The file holds any option of the command, spelled as its long flag
    without dashes and with ``_`` for ``-`` (``high_angle = 15``); the
    command line overrides it. (``dpm index`` has its own, with tables.)
    """
    if args.command == "index" or not getattr(args, "config", None):
        return args
    sub = _subparser(parser, args.command)
    data = _load_toml(args.config)
    options = {a.dest for a in sub._actions if a.option_strings} - {"help", "config"}
    unknown = set(data) - options
    if unknown:
        raise UsageError(f"config file {args.config}: unknown option(s) {sorted(unknown)} for "
                         f"dpm {args.command} (known: {sorted(options)})")
    sub.set_defaults(**data)
    return parser.parse_args(argv)


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise UsageError(f"give --{name.replace('_', '-')} (or {name} = ... in the "
                             "--config file)")


def _resolved_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a command as its config file spells them (for ``config.toml``)."""
    skip = {"command", "config", "debug", "quiet"}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def _run_grains(args: argparse.Namespace) -> int:
    from dpm.boundaries import BoundaryConfig
    from dpm.grains import GrainConfig
    from dpm.io.readers import read_map
    from dpm.io.writers import atomic_write, prepare_output_dir, to_toml
    from dpm.maps import write_ipf_maps, write_property_maps

    _require(args, "out")
    path = Path(args.map)
    orientation_map = read_map(path)
    out = prepare_output_dir(args.out)
    if args.grid is None:
        args.grid = orientation_map.grid
    grain_map = _write_grains(orientation_map.xmap, out, GrainConfig(
        high_angle=args.high_angle, low_angle=args.low_angle, min_size=args.min_size,
        interface_direction=args.interface_direction,
        grid=args.grid),  # step: the map's
        BoundaryConfig(perpendicular_tolerance=args.perpendicular_tolerance))
    write_ipf_maps(orientation_map.xmap, out)
    write_property_maps(orientation_map.xmap, out, orientation_map.map_shape)
    options = {k: v for k, v in _resolved_options(args).items() if k not in ("map", "out")}
    atomic_write(out / "config.toml", lambda tmp: tmp.write_text(to_toml(options)))
    s = grain_map.summary
    print(f"{s['n_grains']} grains in {path.name}: mean width {s['mean_width_um']:.2f} um, "
          f"mean ECD {s['mean_ecd_um']:.2f} um, indexing rate {s['indexing_rate']:.3f}; "
          f"results in {out}")
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from dpm.demo import run_demo

    report = run_demo(args.out, device=args.device, progress=not args.quiet)
    print(report)
    return EXIT_OK


def _run_simulate(args: argparse.Namespace) -> int:
    from dpm.io.emsoft import write_master_pattern
    from dpm.master.cache import cached_master_pattern

    _require(args, "phase", "out")
    t = time.perf_counter()
    options = {}
    if args.energy_window:
        if args.method != "dynamical":
            raise UsageError("--energy-window needs --method dynamical")
        options["energy_window"] = tuple(args.energy_window)
    mp = cached_master_pattern(args.phase, kv=args.kv, npx=args.npx, method=args.method, **options)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise UsageError(f"output folder {out.parent} does not exist")
    write_master_pattern(mp, out)
    print(f"{args.method} master pattern of {mp.phase.name} at {args.kv} kV, "
          f"npx {mp.npx}, in {time.perf_counter() - t:.1f} s: {out}")
    return EXIT_OK


def _run_info(args: argparse.Namespace) -> int:
    from dpm.io.emsoft import read_master_pattern
    from dpm.io.readers import PatternFileError, describe, read_patterns

    try:
        stack = read_patterns(args.file)
    except PatternFileError as pattern_error:
        try:
            mp = read_master_pattern(args.file)
        except ValueError:
            raise pattern_error from None
        print(f"file:           {args.file} (master pattern)")
        print(f"phase:          {mp.phase.name}, space group {mp.phase.space_group.number}, "
              f"a = {mp.phase.structure.lattice.a:.4f} A")
        print(f"energy:         {mp.energy} keV; method {mp.method}")
        print(f"Lambert grid:   npx {mp.npx} ({2 * mp.npx + 1}^2 per hemisphere)")
        return EXIT_OK
    print(describe(stack))
    return EXIT_OK


_COMMANDS = {"index": _run_index, "demo": _run_demo, "simulate": _run_simulate,
             "grains": _run_grains, "info": _run_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpm`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="dpm: %(message)s")
    from dpm.backend import GPUUnavailableError
    from dpm.io.writers import OutputError

    try:
        args = _with_config_file(parser, args, argv)
        return _COMMANDS[args.command](args)
    except OutputError as e:
        if args.debug:
            raise
        print(f"dpm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except (ValueError, FileNotFoundError, GPUUnavailableError) as e:
        if args.debug:
            raise
        print(f"dpm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"dpm {args.command}: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 (report any other failure in one line, exit 1)
        if args.debug:
            raise
        print(f"dpm {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
