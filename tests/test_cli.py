"""The command line: exit codes, one-line errors, and the files `dpm index` promises."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dpm.cli import main
from dpm.detector import Detector
from dpm.io.emsoft import write_master_pattern
from dpm.master import simulate_master_pattern
from dpm.synthetic import SyntheticConfig, synthetic_map


@pytest.fixture(scope="module")
def master_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp") / "li.h5"
    write_master_pattern(simulate_master_pattern("li", kv=20, npx=60, method="kinematical"), path)
    return path


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    mp = simulate_master_pattern("li", kv=20, npx=60, method="kinematical")
    det = Detector(shape=(25, 25), pc=(0.5, 0.3, 0.6))
    smap = synthetic_map(mp, det, SyntheticConfig(map_shape=(4, 5), seed=3))
    path = tmp_path_factory.mktemp("stack") / "patterns.npy"
    np.save(path, smap.patterns)
    return path


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("keep", ["1", "10"])
def test_index_writes_every_output(stack_file, master_file, tmp_path, keep):
    out = tmp_path / "out"
    code = main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--pc", "0.5", "0.3", "0.6", "--resolution", "10", "--no-refine", "--keep", keep,
                 "--out", str(out)])
    assert code == 0
    for name in ("map.h5", "map.ang", "ipf_x.png", "ipf_y.png", "ipf_z.png", "ipf_key.png",
                 "scores.png", "summary.json", "config.toml", "grains.csv", "grains.parquet",
                 "grains.json", "boundaries.png", "kam.png", "grain_widths.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patterns"] == 20 and summary["refined"] is False
    assert "resolution = 10.0" in (out / "config.toml").read_text()
    from orix import io as orix_io
    for name in ("map.ang", "map.h5"):
        assert orix_io.load(out / name).size == 20


def test_index_with_every_stage_and_its_config_round_trip(stack_file, master_file, tmp_path):
    """Preprocessing flags, refinement with a shared PC and zero solutions end to end; the
    written config.toml, read back with --config, reproduces the run's options."""
    out = tmp_path / "out"
    args = ["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
            "--pc", "0.5", "0.3", "0.6", "--resolution", "10", "--mask", "circular",
            "--gaussian", "0.5", "--average-neighbours", "0.8", "--refine-pc", "shared",
            "--band-contrast-threshold", "12", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refined"] is True
    assert [s["step"] for s in summary["preprocessing"]] == [
        "static_background", "gaussian_filter", "neighbour_averaging"]
    assert summary["zero_solutions"]["threshold"] > 0
    assert (out / "band_contrast.png").is_file() and (out / "pattern_quality.png").is_file()
    written = (out / "config.toml").read_text()
    assert 'mask = "circular"' in written and 'pattern_centre = "shared"' in written
    assert "band_contrast_threshold = 12.0" in written
    again = tmp_path / "again"
    assert main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--pc", "0.5", "0.3", "0.6", "--config", str(out / "config.toml"),
                 "--out", str(again)]) == 0
    assert (again / "config.toml").read_text() == written

    off = tmp_path / "off"
    assert main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--pc", "0.5", "0.3", "0.6", "--resolution", "10", "--no-zero-solutions",
                 "--out", str(off)]) == 0
    assert "zero_solutions" not in json.loads((off / "summary.json").read_text())
    assert main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--pc", "0.5", "0.3", "0.6", "--config", str(off / "config.toml"),
                 "--out", str(tmp_path / "off2")]) == 0
    assert "zero_solutions" not in json.loads((tmp_path / "off2" / "summary.json").read_text())


def test_config_file_and_cli_precedence(stack_file, master_file, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('resolution = 12.0\nkeep = 2\npc = [0.5, 0.3, 0.6]\n')
    out = tmp_path / "out"
    assert main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--config", str(cfg), "--keep", "3", "--out", str(out)]) == 0
    written = (out / "config.toml").read_text()
    assert "resolution = 12.0" in written and "keep = 3" in written


@pytest.mark.parametrize("args, message", [
    (["index", "missing.npy", "--out", "{out}"], "missing.npy does not exist"),
    (["index", "{stack}", "--phase", "unobtainium", "--pc", "0.5", "0.3", "0.6", "--out", "{out}"],
     "unobtainium"),
    (["--quiet", "index", "{stack}", "--out", "{out}"], "no pattern centre given and none found"),
    (["index", "{stack}", "--pc", "0.5", "0.3", "0.6", "--device", "gpu", "--out", "{out}"],
     "no CUDA device"),
])
def test_bad_input_is_one_line_exit_2(args, message, stack_file, tmp_path, capsys):
    args = [a.format(stack=stack_file, out=tmp_path / "o") for a in args]
    assert main(args) == 2
    assert message in _error_line(capsys)


def test_unreadable_and_wrong_rank_files(tmp_path, capsys):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    assert main(["index", str(tmp_path / "junk.h5"), "--out", str(tmp_path / "o")]) == 2
    assert "junk.h5" in _error_line(capsys)
    np.save(tmp_path / "flat.npy", np.zeros((10, 10)))
    assert main(["index", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "shape (10, 10)" in _error_line(capsys)


def test_nan_patterns_exit_2(stack_file, master_file, tmp_path, capsys):
    data = np.load(stack_file).astype(np.float32)
    data[1, 2, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    code = main(["--quiet", "index", str(tmp_path / "nan.npy"), "--master-pattern",
                 str(master_file), "--pc", "0.5", "0.3", "0.6", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "row 1, column 2" in _error_line(capsys)


def test_simulate_writes_a_file_kikuchipy_loads(tmp_path):
    import kikuchipy as kp
    out = tmp_path / "li.h5"
    assert main(["--quiet", "simulate", "--phase", "li", "--npx", "40", "--out", str(out)]) == 0
    mp = kp.load(out, projection="lambert", hemisphere="both")
    assert mp.data.shape[-2:] == (81, 81)


def test_console_script_runs():
    run = subprocess.run([sys.executable, "-m", "dpm.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "index" in run.stdout


def test_info_on_patterns_and_master_pattern(stack_file, master_file, capsys):
    assert main(["info", str(stack_file)]) == 0
    assert "(4, 5) (ny, nx)" in capsys.readouterr().out
    assert main(["info", str(master_file)]) == 0
    out = capsys.readouterr().out
    assert "master pattern" in out and "npx 60" in out and "20.0 keV" in out


def test_simulate_dynamical_with_energy_window(tmp_path):
    from dpm.io.emsoft import read_master_pattern

    out = tmp_path / "li-window.h5"
    assert main(["--quiet", "simulate", "--phase", "li", "--npx", "12", "--method", "dynamical",
                 "--energy-window", "19", "20", "--out", str(out)]) == 0
    mp = read_master_pattern(out)
    assert mp.method == "dynamical" and tuple(mp.params["energy_window_keV"]) == (19.0, 20.0)


@pytest.mark.parametrize("args, message", [
    (["simulate", "--phase", "li", "--kv", "0", "--npx", "12", "--out", "{out}"], "voltage must be positive"),
    (["simulate", "--phase", "li", "--npx", "3", "--out", "{out}"], "npx"),
    (["simulate", "--phase", "li", "--npx", "12", "--method", "kinematical",
      "--energy-window", "19", "20", "--out", "{out}"], "--energy-window needs"),
])
def test_simulate_bad_input(args, message, tmp_path, capsys):
    assert main([a.format(out=tmp_path / "x.h5") for a in args]) == 2
    assert message in _error_line(capsys)


def test_grains_command_on_an_ang_file_matches_the_library(tmp_path, capsys):
    """`dpm grains` on a .ang written by orix: the same grains as dpm.grains on the map."""
    from orix import io as orix_io
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    from dpm.crystal import get_phase
    from dpm.grains import GrainConfig, reconstruct_grains
    from dpm.synthetic import columnar_grains, random_quaternions

    rng = np.random.default_rng(4)
    ids = columnar_grains(SyntheticConfig(map_shape=(12, 30), grain_width=6), rng)
    q = random_quaternions(int(ids.max()) + 1, rng)[ids.ravel()]
    y, x = np.divmod(np.arange(ids.size), 30)
    phase = get_phase("li")
    xmap = CrystalMap(Rotation(q), x=x * 2.0, y=y * 2.0, phase_list=PhaseList(phase),
                      scan_unit="um")
    orix_io.save(str(tmp_path / "map.ang"), xmap)
    assert main(["grains", str(tmp_path / "map.ang"), "--out", str(tmp_path / "g")]) == 0
    rows = (tmp_path / "g" / "grains.csv").read_text().strip().splitlines()
    expected = reconstruct_grains(q, np.ones(ids.size, bool), ids.shape, phase.point_group,
                                  config=GrainConfig(step_size=2.0))
    assert len(rows) - 1 == expected.summary["n_grains"] == len(np.unique(ids))
    text = (tmp_path / "g" / "grains.json").read_text()
    summary = json.loads(text)
    assert summary["mean_width_um"] == pytest.approx(expected.summary["mean_width_um"])
    # Every grain touches the edge of this small map: ASTM E2627 is undefined, written null.
    assert "NaN" not in text and summary["astm_e2627_G"] is None
    for name in ("ipf_x.png", "ipf_y.png", "ipf_z.png", "ipf_key.png", "boundaries.png",
                 "trace_rose.png", "kam.png", "grain_widths.png", "grains.parquet"):
        assert (tmp_path / "g" / name).is_file(), name
    assert "grains in map.ang" in capsys.readouterr().out


def test_grains_on_a_ctf_draws_its_band_contrast(tmp_path):
    """`dpm grains` on an Oxford .ctf writes its BC column as band_contrast.png (0-255 grey)."""
    import matplotlib.image as mpimg
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    from dpm.crystal import get_phase
    from dpm.io.writers import write_ctf
    from dpm.synthetic import columnar_grains, random_quaternions

    rng = np.random.default_rng(5)
    ids = columnar_grains(SyntheticConfig(map_shape=(10, 20), grain_width=6), rng)
    q = random_quaternions(int(ids.max()) + 1, rng)[ids.ravel()]
    bc = rng.integers(0, 256, size=ids.size).astype(np.float64)
    y, x = np.divmod(np.arange(ids.size), 20)
    xmap = CrystalMap(Rotation(q), x=x * 1.0, y=y * 1.0, phase_list=PhaseList(get_phase("li")),
                      prop={"band_contrast": bc}, scan_unit="um")
    write_ctf(xmap, tmp_path / "map.ctf")
    assert main(["--quiet", "grains", str(tmp_path / "map.ctf"), "--out", str(tmp_path / "g")]) == 0
    image = mpimg.imread(tmp_path / "g" / "band_contrast.png")       # 30 image px per map px
    grey = image[15::30, 15::30, 0].ravel()
    np.testing.assert_allclose(grey * 255.0, bc, atol=1.0)
    assert not (tmp_path / "g" / "scores.png").exists()            # .ctf carries no NCC


def test_every_index_option_has_a_config_file_spelling():
    """`--config run.toml` takes every option of `dpm index` (DESIGN: CLI and config agree)."""
    from dpm.cli import _INDEX_OPTIONS, _TABLE_OPTIONS, _config_fields, _parser
    from dpm.pipeline import NEEDS_REFINE

    index_parser = _parser()._subparsers._group_actions[0].choices["index"]
    spelled = set(_INDEX_OPTIONS) | set(_TABLE_OPTIONS) | _config_fields() | set(NEEDS_REFINE)
    missing = [a.dest for a in index_parser._actions
               if a.dest not in ("help", "patterns", "config") and a.dest not in spelled]
    assert missing == []


def test_written_config_reproduces_the_run(stack_file, master_file, tmp_path):
    """The config.toml of a run, given back with --config, repeats it bit for bit."""
    from orix import io as orix_io

    first = tmp_path / "first"
    assert main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--pc", "0.45", "0.32", "0.61", "--resolution", "12", "--keep", "2",
                 "--gaussian", "1", "--out", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["--quiet", "index", str(stack_file), "--config", str(first / "config.toml"),
                 "--out", str(again)]) == 0
    a, b = orix_io.load(first / "map.h5"), orix_io.load(again / "map.h5")
    assert np.array_equal(a.rotations.data, b.rotations.data)
    for name in a.prop:
        assert np.array_equal(a.prop[name], b.prop[name]), name


def test_out_from_the_config_file(stack_file, master_file, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'out = "{tmp_path / "from_file"}"\npc = [0.5, 0.3, 0.6]\nresolution = 12.0\n'
                   f'refine = false\nmaster_pattern = "{master_file}"\n')
    assert main(["--quiet", "index", str(stack_file), "--config", str(cfg)]) == 0
    assert (tmp_path / "from_file" / "map.h5").is_file()
    cfg.write_text('pc = [0.5, 0.3, 0.6]\n')
    assert main(["--quiet", "index", str(stack_file), "--config", str(cfg)]) == 2
    assert "--out DIR" in capsys.readouterr().err


@pytest.mark.parametrize("grid", ["SqrGrid", "HexGrid"])
def test_index_an_edax_file_with_its_own_detector_and_grid(stack_file, master_file, tmp_path,
                                                           grid, capsys):
    """A vendor file gives the PC, tilt and grid: no --pc needed; same map as the .npy with --pc."""
    from orix import io as orix_io

    from vendor_files import hex_rows, write_edax_h5ebsd

    patterns = np.load(stack_file)
    if grid == "HexGrid":     # only the stored pixels hold patterns (TSL layout)
        patterns = np.where(hex_rows(*patterns.shape[:2])[..., None, None], patterns, 0)
    path = tmp_path / "scan.h5"
    write_edax_h5ebsd(path, patterns, pc=(0.5, 0.7, 0.6), grid=grid)   # TSL of Bruker (0.5, 0.3, 0.6)
    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "0.5" in info and "0.3" in info and ("hexagonal" in info) == (grid == "HexGrid")
    common = ["--master-pattern", str(master_file), "--resolution", "10", "--no-refine"]
    assert main(["--quiet", "index", str(path), *common, "--out", str(tmp_path / "h5")]) == 0
    summary = json.loads((tmp_path / "h5" / "summary.json").read_text())
    assert np.allclose(summary["run"]["pc"], (0.5, 0.3, 0.6), atol=1e-6)
    header = (tmp_path / "h5" / "map.ang").read_text().splitlines()
    assert f"# GRID: {grid}" in header
    if grid == "SqrGrid":
        npy_out = tmp_path / "npy"
        assert main(["--quiet", "index", str(stack_file), *common, "--pc", "0.5", "0.3", "0.6",
                     "--out", str(npy_out)]) == 0
        a, b = orix_io.load(tmp_path / "h5" / "map.h5"), orix_io.load(npy_out / "map.h5")
        assert np.array_equal(a.rotations.data, b.rotations.data)


def test_grains_and_simulate_take_a_config_file(tmp_path, capsys):
    """Every option of dpm grains and dpm simulate can come from --config; the CLI overrides it;
    dpm grains writes the resolved options, which repeat the run."""
    mp_cfg = tmp_path / "sim.toml"
    mp_cfg.write_text(f'phase = "na"\nkv = 15.0\nnpx = 20\nmethod = "kinematical"\n'
                      f'out = "{tmp_path / "na.h5"}"\n')
    assert main(["--quiet", "simulate", "--config", str(mp_cfg), "--npx", "24"]) == 0
    from dpm.io.emsoft import read_master_pattern
    mp = read_master_pattern(tmp_path / "na.h5")
    assert mp.npx == 24 and mp.energy == 15.0 and mp.phase.space_group.number == 229

    from orix import io as orix_io
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    from dpm.crystal import get_phase
    from dpm.synthetic import columnar_grains, random_quaternions

    rng = np.random.default_rng(4)
    ids = columnar_grains(SyntheticConfig(map_shape=(12, 30), grain_width=6), rng)
    q = random_quaternions(int(ids.max()) + 1, rng)[ids.ravel()]
    y, x = np.divmod(np.arange(ids.size), 30)
    orix_io.save(str(tmp_path / "film.ang"), CrystalMap(
        Rotation(q), x=x * 2.0, y=y * 2.0, phase_list=PhaseList(get_phase("li")), scan_unit="um"))
    cfg = tmp_path / "grains.toml"
    cfg.write_text(f'high_angle = 12.0\nmin_size = 3\nout = "{tmp_path / "g1"}"\n')
    assert main(["--quiet", "grains", str(tmp_path / "film.ang"), "--config", str(cfg),
                 "--min-size", "2"]) == 0
    written = (tmp_path / "g1" / "config.toml").read_text()
    assert "high_angle = 12.0" in written and "min_size = 2" in written
    assert main(["--quiet", "grains", str(tmp_path / "film.ang"), "--config",
                 str(tmp_path / "g1" / "config.toml"), "--out", str(tmp_path / "g2")]) == 0
    assert (tmp_path / "g1" / "grains.csv").read_text() == (tmp_path / "g2" / "grains.csv").read_text()
    capsys.readouterr()
    cfg.write_text('high_angel = 12.0\n')
    assert main(["--quiet", "grains", str(tmp_path / "film.ang"), "--config", str(cfg),
                 "--out", str(tmp_path / "g3")]) == 2
    assert "high_angel" in capsys.readouterr().err
    assert main(["--quiet", "simulate", "--phase", "li"]) == 2
    assert "--out" in capsys.readouterr().err


def test_search_flags_set_the_search_table():
    """`--search fused --match-precision fp16` reach SearchConfig's method and precision."""
    from dpm.cli import _index_options, _parser
    from dpm.search import SearchConfig

    args = _parser().parse_args(["index", "stack.h5", "--search", "fused",
                                 "--match-precision", "fp16"])
    search = _index_options(args)["search"]
    assert SearchConfig(**search) == SearchConfig(method="fused", precision="fp16")


def test_pc_field_flag_and_its_config_table(stack_file, master_file, tmp_path):
    """--pc-field picks the field model; config.toml holds it and the nested
    [calibration.field] table, which --config reads back; constant calibrates nothing."""
    out = tmp_path / "plane"
    args = ["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
            "--pc", "0.5", "0.3", "0.6", "--resolution", "10"]
    assert main([*args, "--pc-field", "plane", "--out", str(out)]) == 0
    record = json.loads((out / "summary.json").read_text())["pc_field"]
    assert record["model"] == "plane" and record["grid"] == [8, 8]
    written = (out / "config.toml").read_text()
    assert 'pc_field = "plane"' in written and '[calibration.field]\nmodel = "plane"' in written
    assert (out / "pc_field.png").is_file()
    again = tmp_path / "again"
    assert main(["--quiet", "index", str(stack_file), "--master-pattern", str(master_file),
                 "--config", str(out / "config.toml"), "--out", str(again)]) == 0
    assert (again / "config.toml").read_text() == written
    constant = tmp_path / "constant"
    assert main([*args, "--pc-field", "constant", "--out", str(constant)]) == 0
    assert "pc_field" not in json.loads((constant / "summary.json").read_text())
    assert not (constant / "pc_field.png").exists()


def test_without_a_pc_the_pc_is_searched_and_recorded(tmp_path):
    """No --pc and a file without one: the PC is found in the default box about the
    screen centre (the patterns' PC lies 0.02-0.03 off it), written to summary.json and
    config.toml with the [pc_search] table; --pc-search-width sets the box."""
    from dpm.master.shipped import shipped_master_pattern

    master = shipped_master_pattern("li", 20)
    truth = (0.52, 0.47, 0.53)
    smap = synthetic_map(master, Detector(shape=(60, 60), pc=truth),
                         SyntheticConfig(map_shape=(8, 10), seed=5))
    stack = tmp_path / "patterns.npy"
    np.save(stack, smap.patterns)
    out = tmp_path / "out"
    assert main(["--quiet", "index", str(stack), "--resolution", "4", "--no-pseudo-symmetry",
                 "--pc-search-width", "0.04", "--out", str(out)]) == 0
    record = json.loads((out / "summary.json").read_text())["pc_search"]
    assert record["box_centre"] == [0.5, 0.5, 0.5] and record["half_width"] == 0.04
    assert np.abs(np.subtract(record["pc"], truth)).max() < 5e-3, record["pc"]
    written = (out / "config.toml").read_text()
    assert "[pc_search]\ncentre = [0.5, 0.5, 0.5]\nhalf_width = 0.04" in written
    assert f"pc = [{', '.join(repr(v) for v in record['pc'])}]" in written
    # the result store keeps the search: a resumed run takes the same PC from it
    assert json.loads((out / "run.json").read_text())["pc_search"]["pc"] == record["pc"]
    assert main(["--quiet", "index", str(stack), "--resolution", "4", "--no-pseudo-symmetry",
                 "--pc-search-width", "0.04", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["pc_search"] == record
