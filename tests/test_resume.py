"""Chunked, resumable runs: kill -9 then --resume, a full disk, bounded memory, Dask.

The oracle of each test is an uninterrupted single-process run of the same
command: resumed, cluster and small-budget runs must give its results.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from orix import io as orix_io

from dpm.cli import main
from dpm.detector import Detector
from dpm.io.emsoft import write_master_pattern
from dpm.master import simulate_master_pattern
from dpm.pipeline import IndexConfig, index, prepare_stack
from dpm.synthetic import SyntheticConfig, synthetic_map

DETECTOR = Detector(shape=(25, 25), pc=(0.5, 0.3, 0.6))


@pytest.fixture(scope="module")
def master():
    return simulate_master_pattern("li", kv=20, npx=60, method="kinematical")


@pytest.fixture(scope="module")
def master_file(master, tmp_path_factory):
    path = tmp_path_factory.mktemp("mp") / "li.h5"
    write_master_pattern(master, path)
    return path


@pytest.fixture(scope="module")
def smap(master):
    return synthetic_map(master, DETECTOR, SyntheticConfig(map_shape=(12, 20), grain_width=5,
                                                           pore_fraction=0.05, counts=2000,
                                                           seed=4))


@pytest.fixture(scope="module")
def stack_file(smap, tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "patterns.npy"
    np.save(path, smap.patterns)
    return path


def _args(stack_file, master_file, out, *extra):
    return ["index", str(stack_file), "--master-pattern", str(master_file), "--pc", "0.5",
            "0.3", "0.6", "--resolution", "10", "--keep", "3", "--chunk-size", "2",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(stack_file, master_file, tmp_path_factory):
    """The oracle: the same run, never interrupted (120 chunks of 2 patterns)."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(["--quiet", *_args(stack_file, master_file, out)]) == 0
    return out


def _assert_same_results(a, b):
    ma, mb = orix_io.load(a / "map.h5"), orix_io.load(b / "map.h5")
    assert np.array_equal(ma.rotations.data, mb.rotations.data)
    assert np.array_equal(ma.phase_id, mb.phase_id)
    assert set(ma.prop) == set(mb.prop)
    for name in ma.prop:
        assert np.array_equal(np.asarray(ma.prop[name]), np.asarray(mb.prop[name])), name
    assert (a / "map.ang").read_bytes() == (b / "map.ang").read_bytes()
    ja, jb = (json.loads((d / "grains.json").read_text()) for d in (a, b))
    assert ja == jb


def test_kill_9_then_resume_equals_an_uninterrupted_run(stack_file, master_file, uninterrupted,
                                                        tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dpm.cli", "--quiet", *_args(stack_file, master_file, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = out / "chunks"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if chunks.is_dir() and len(list(chunks.glob("0*.npz"))) >= 5:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "run.json").read_text())
    done = len(list(chunks.glob("0*.npz")))
    assert manifest["state"] == "running" and 5 <= done < len(manifest["blocks"]) == 120
    assert not (out / "map.h5").exists()
    # Without --resume the interrupted run is not overwritten.
    assert main(["--quiet", *_args(stack_file, master_file, out)]) == 2
    assert len(list(chunks.glob("0*.npz"))) == done
    assert main(["--quiet", *_args(stack_file, master_file, out, "--resume")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunks"]["read_from_store"] == done
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
    _assert_same_results(out, uninterrupted)


def test_full_disk_keeps_the_chunks_written_and_resumes(stack_file, master_file, uninterrupted,
                                                        tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    calls = {"n": 0}
    savez = np.savez

    def full_after_seven(file, **arrays):
        calls["n"] += 1
        if calls["n"] > 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", full_after_seven)
    assert main(["--quiet", *_args(stack_file, master_file, out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "000007.npz" in err[0]
    assert sorted(p.name for p in (out / "chunks").iterdir() if p.suffix == ".npz") == \
        [f"{k:06d}.npz" for k in range(7)]
    assert not list((out / "chunks").glob(".tmp-*"))
    monkeypatch.setattr(np, "savez", savez)
    assert main(["--quiet", *_args(stack_file, master_file, out, "--resume")]) == 0
    _assert_same_results(out, uninterrupted)


@pytest.mark.parametrize("change, message", [
    (["--resolution", "12"], "config differs"),
    (["--keep", "2"], "config differs"),
])
def test_resume_refuses_another_config(stack_file, master_file, uninterrupted, tmp_path,
                                       change, message, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", *_args(stack_file, master_file, out, "--no-refine")]) == 0
    assert main(["--quiet", *_args(stack_file, master_file, out, "--no-refine", "--resume",
                                   *change)]) == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_another_input(smap, stack_file, master_file, tmp_path, capsys):
    out = tmp_path / "out"
    other = tmp_path / "patterns.npy"
    np.save(other, smap.patterns[::-1].copy())
    assert main(["--quiet", *_args(stack_file, master_file, out, "--no-refine")]) == 0
    assert main(["--quiet", *_args(other, master_file, out, "--no-refine", "--resume")]) == 2
    err = capsys.readouterr().err
    assert "input differs" in err and "fingerprint" in err
    # --overwrite starts afresh on the other input.
    assert main(["--quiet", *_args(other, master_file, out, "--no-refine", "--overwrite")]) == 0


def test_resume_without_a_run(stack_file, master_file, tmp_path, capsys):
    assert main(["--quiet", *_args(stack_file, master_file, tmp_path / "new", "--resume")]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


def test_unwritable_output_folder_exit_3(stack_file, master_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["--quiet", *_args(stack_file, master_file, blocker / "out")]) == 3
    err = capsys.readouterr().err
    assert "output folder" in err and "Not a directory" in err
    assert blocker.read_text() == "not a folder"


def test_pattern_rows_equal_the_whole_stack(smap, master):
    """The rows the map stages re-read equal those of the whole stack in memory."""
    from dpm.chunks import PatternRows
    from dpm.io.readers import as_pattern_stack
    from dpm.pipeline import _context
    from dpm.preprocess import map_blocks

    config = IndexConfig(preprocess=IndexConfig().preprocess.__class__(gaussian_sigma=1.0,
                                                                     neighbour_sigma=1.0))
    stack = as_pattern_stack(smap.patterns)
    whole, _ = prepare_stack(stack, DETECTOR, mask=None, config=config, background=None, xp=np)
    context = _context(stack, DETECTOR, None, config, None, np, budget=1 << 20, master=master,
                       rotations=None)
    rows = PatternRows(context, list(map_blocks(12, 20, 7)), budget=3 * 7 * 625 * 4)
    pick = np.array([239, 0, 5, 5, 100, 61, 62, 200])
    assert np.allclose(rows[pick], whole[pick], atol=1e-6)
    assert rows._bytes <= rows.budget


def test_small_budget_gives_the_same_map(smap, master):
    """A budget that forces many chunks and the on-disk dictionary gives the same orientations."""
    base = IndexConfig(resolution=10, keep=3)
    big = index(smap.patterns, detector=DETECTOR, master_pattern=master, config=base)
    small = index(smap.patterns, detector=DETECTOR, master_pattern=master,
                  config=IndexConfig(resolution=10, keep=3, memory_budget=4 << 20))
    assert small.details["chunks"]["count"] > big.details["chunks"]["count"] == 1
    assert np.array_equal(big.xmap.prop["topk_indices"], small.xmap.prop["topk_indices"])
    assert np.allclose(big.xmap.rotations.data, small.xmap.rotations.data, atol=1e-5)
    assert np.array_equal(big.xmap.phase_id, small.xmap.phase_id)


def test_dictionary_from_the_disk_cache_equals_the_projected_one(master, tmp_path):
    from dpm.chunks import DictionaryFile, project_dictionary
    from dpm.dictionary import Dictionary
    from dpm.sampling import sample_orientations

    q = sample_orientations(master.phase, 10).data.astype(np.float32)
    dictionary = Dictionary(master, DETECTOR, q)
    cached = DictionaryFile.cached(dictionary, master)
    assert cached.path.parent.name == "dictionaries" and len(cached) == len(q)
    whole = project_dictionary(dictionary, np)
    assert np.array_equal(cached.chunk(3, 40, np), whole[3:40])
    assert DictionaryFile.cached(dictionary, master).path == cached.path   # read, not rebuilt


def test_local_cluster_equals_the_single_process_run(stack_file, master_file, uninterrupted,
                                                     tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        out = tmp_path / "out"
        assert main(["--quiet", *_args(stack_file, master_file, out, "--scheduler",
                                       cluster.scheduler_address)]) == 0
    _assert_same_results(out, uninterrupted)


def _bad_inputs(folder, smap):
    """Pattern files that must be refused: (path, words the one-line error must hold)."""
    import h5py

    from vendor_files import write_bruker_h5ebsd, write_edax_h5ebsd

    patterns = smap.patterns
    truncated = folder / "truncated.h5"
    write_edax_h5ebsd(truncated, patterns, pc=(0.5, 0.7, 0.6))
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    rank = folder / "rank.h5"
    with h5py.File(rank, "w") as f:
        f["patterns"] = patterns[0, 0]                 # one 2-D pattern, not a stack
    pc = folder / "pc.h5"
    write_bruker_h5ebsd(pc, patterns, pc=(1.7, 0.3, 0.6))
    return [(truncated, ["truncated.h5"]), (rank, ["rank.h5", "patterns"]),
            (pc, ["pc.h5", "1.7"])]


def test_bad_input_ends_with_one_line_and_exit_2_losing_nothing(smap, master_file, uninterrupted,
                                                                tmp_path, capsys):
    """A truncated HDF5 file, a dataset of the wrong rank and a PC outside [0, 1] in the file:
    exit 2, one line naming the problem, and the results already in the folder untouched."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for path, words in _bad_inputs(tmp_path, smap):
        capsys.readouterr()
        code = main(["index", str(path), "--master-pattern", str(master_file), "--resolution",
                     "10", "--out", str(out), "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (path.name, err)
        assert all(w in err[0] for w in words), err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_gpu_glue_of_the_chunked_run_on_the_cupy_stand_in(smap, master, gpu_standin, tmp_path):
    """The chunked run on the GPU path (CuPy stand-in: shim-compiled kernels): many chunks, the
    on-disk dictionary moved to the device chunk by chunk, refinement, zero solutions and
    pseudo-symmetry re-reading rows through PatternRows, a resumed store; same map as NumPy."""
    from dpm.store import ResultStore

    config = dict(resolution=10, keep=3, memory_budget=4 << 20)
    cpu = index(smap.patterns, detector=DETECTOR, master_pattern=master,
                config=IndexConfig(device="cpu", **config))
    out = tmp_path / "out"
    gpu = index(smap.patterns, detector=DETECTOR, master_pattern=master,
                config=IndexConfig(device="gpu", **config), out=out)
    assert gpu.details["chunks"]["count"] > 1
    store = ResultStore(out, __import__("json").loads((out / "run.json").read_text()))
    assert store.manifest["device"] == "gpu" and len(store.completed()) == len(store.blocks)
    for k in store.completed()[::2]:                  # lose half the chunks, resume
        store.chunk_path(k).unlink()
    resumed = index(smap.patterns, detector=DETECTOR, master_pattern=master,
                    config=IndexConfig(device="gpu", **config), out=out, resume=True)
    for name in gpu.xmap.prop:
        assert np.array_equal(gpu.xmap.prop[name], resumed.xmap.prop[name]), name
    assert np.array_equal(cpu.xmap.prop["topk_indices"], gpu.xmap.prop["topk_indices"])
    assert np.array_equal(cpu.xmap.phase_id, gpu.xmap.phase_id)
    indexed = cpu.xmap.phase_id >= 0
    dots = np.abs(np.sum(cpu.xmap.rotations.data * gpu.xmap.rotations.data, axis=1))[indexed]
    angles = np.degrees(2 * np.arccos(np.clip(dots, 0, 1)))
    # float32 kernel sums on the device against numba's on noisy patterns: the optimum
    # moves by a few thousandths of a degree, far below the refinement's accuracy
    assert np.median(angles) < 0.005 and angles.max() < 0.05, (np.median(angles), angles.max())
