"""Output files are complete or absent, and a failed write says which file and why.

Oracles: the bytes a test wrote before (a failed rewrite must leave them),
the folder's listing (no temporary file left), and the operating system
itself: a full disk is made real by running the writers in a subprocess
whose file-size limit (``RLIMIT_FSIZE``) makes every write past a few
kilobytes fail with ``EFBIG``, as a full disk fails with ``ENOSPC``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpm.io.writers import OutputError, atomic_write, prepare_output_dir, write_ang, write_ctf

# orix warns about the Euler angles 4π that mark unindexed .ang points
pytestmark = pytest.mark.filterwarnings("ignore:Angles are quite high")

LIMIT = 4096

#: The files of the full-disk test, each written by :func:`write_file`.
FILES = ("map.ang", "map.ctf", "map.h5", "li.h5")


def make(seed: int, ny: int = 12, nx: int = 12):
    """A map (as a CrystalMap and as the parts of an IndexResult) and a master pattern.

    With the default size every file of FILES is larger than LIMIT bytes.
    """
    from types import SimpleNamespace

    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    from dpm.crystal import get_phase
    from dpm.master import MasterPattern

    rng = np.random.default_rng(seed)
    n = ny * nx
    y, x = np.divmod(np.arange(n), nx)
    props = {"scores": rng.uniform(0, 1, n).astype(np.float32),
             "band_contrast": rng.uniform(0, 255, n).astype(np.float32),
             "readable": np.ones(n, dtype=bool),
             "topk_scores": rng.uniform(0, 1, (n, 4)).astype(np.float32)}
    xmap = CrystalMap(Rotation.random(n), x=x * 0.5, y=y * 0.5,
                      phase_list=PhaseList(get_phase("li")), prop=props, scan_unit="um")
    config = SimpleNamespace(grid="square", to_dict=lambda: {"grid": "square"})
    result = SimpleNamespace(xmap=xmap, config=config, scores=props["scores"].reshape(ny, nx),
                             band_contrast=props["band_contrast"].reshape(ny, nx), details={},
                             summary=lambda: {"patterns": n},
                             run_config=lambda: {"phase": "li", "grid": "square"})
    hemispheres = rng.uniform(0, 1, (2, 61, 61)).astype(np.float32)
    mp = MasterPattern(hemispheres[0], hemispheres[1], phase=get_phase("li"), energy=20.0,
                       method="kinematical", params={"npx": 30})
    return xmap, result, mp


def write_file(name: str, out: Path, made) -> None:
    """Write file ``name`` of FILES into ``out`` with dpm's writer of it."""
    from dpm.io.emsoft import write_master_pattern
    from dpm.io.writers import write_index_outputs

    xmap, result, mp = made
    if name == "map.ang":
        write_ang(xmap, out / name)
    elif name == "map.ctf":
        write_ctf(xmap, out / name)
    elif name == "map.h5":
        write_index_outputs(result, out)  # map.h5 is its first file
    else:
        write_master_pattern(mp, out / name)


#: Run in a subprocess: rewrite every file of FILES with another map under a
#: file-size limit, and print the OutputError message of each (None: no error).
FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_io_writers import FILES, LIMIT, make, write_file
from dpm.io.writers import OutputError

out = Path(sys.argv[1])
made = make(2)  # another map: a rewrite would change every file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
errors = {}
for name in FILES:
    try:
        write_file(name, out, made)
        errors[name] = None
    except OutputError as e:
        errors[name] = str(e)
print(json.dumps(errors))
"""


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class TestFullDisk:
    def test_failed_writes_name_the_file_and_keep_the_old_one(self, tmp_path):
        """Rewrites that hit the size limit: OutputError naming the file, old bytes, no temp file."""
        made = make(1)
        for name in FILES:
            write_file(name, tmp_path, made)
        before = _contents(tmp_path)
        assert all(len(before[name]) > LIMIT for name in FILES)
        run = subprocess.run([sys.executable, "-B", "-c", FULL_DISK, str(tmp_path),
                              str(Path(__file__).parent)], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        errors = json.loads(run.stdout.strip().splitlines()[-1])
        assert set(errors) == set(FILES)
        for name, message in errors.items():
            assert message is not None, f"{name} was written past the file-size limit"
            assert str(tmp_path / name) in message and "File too large" in message, message
        assert _contents(tmp_path) == before  # old files intact, no .tmp-* left beside them

    def test_no_space_left_on_device(self, tmp_path, monkeypatch):
        """ENOSPC when the data reach the disk (fsync), as on a full disk with delayed allocation."""
        path = write_ang(_small_map(0), tmp_path / "map.ang")
        old = path.read_bytes()

        def full_disk(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full_disk)
        with pytest.raises(OutputError, match=re.escape(f"cannot write {tmp_path / 'map.ctf'} (No space left on device)")):
            write_ctf(_small_map(1), tmp_path / "map.ctf")
        with pytest.raises(OutputError, match="No space left on device"):
            write_ang(_small_map(1), path)
        assert path.read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["map.ang"]


def _small_map(seed: int):
    return make(seed, 3, 4)[0]


class TestAtomicWrite:
    def test_writes_and_replaces(self, tmp_path):
        path = tmp_path / "a.txt"
        assert atomic_write(path, lambda p: p.write_text("first")) == path
        atomic_write(path, lambda p: p.write_text("second"))
        assert path.read_text() == "second"
        assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]

    def test_writer_sees_a_temporary_file_with_the_same_suffix(self, tmp_path):
        seen = []
        atomic_write(tmp_path / "map.h5", lambda p: (seen.append(p), p.write_bytes(b"x")))
        assert seen[0] != tmp_path / "map.h5" and seen[0].parent == tmp_path
        assert seen[0].suffix == ".h5" and not seen[0].exists()

    def test_exception_in_writer_keeps_the_old_file(self, tmp_path):
        path = tmp_path / "a.txt"
        path.write_text("old")

        def half_then_fail(p: Path) -> None:
            p.write_text("half")
            raise ValueError("simulation broke")

        with pytest.raises(ValueError, match="simulation broke"):
            atomic_write(path, half_then_fail)
        assert path.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]

    def test_os_error_names_the_file(self, tmp_path):
        path = tmp_path / "b.txt"

        def refuse(p: Path) -> None:
            p.write_text("part")
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))

        with pytest.raises(OutputError, match=re.escape(f"cannot write {path} (Permission denied)")):
            atomic_write(path, refuse)
        assert list(tmp_path.iterdir()) == []


class TestPrepareOutputDir:
    def test_creates_nested_folders(self, tmp_path):
        out = prepare_output_dir(tmp_path / "a" / "b")
        assert out.is_dir() and list(out.iterdir()) == []

    def test_existing_file(self, tmp_path):
        path = tmp_path / "results"
        path.write_text("a file")
        with pytest.raises(OutputError, match=re.escape(f"output folder {path} is an existing file")):
            prepare_output_dir(path)
        assert path.read_text() == "a file"

    def test_path_under_a_file(self, tmp_path):
        (tmp_path / "results").write_text("a file")
        out = tmp_path / "results" / "run1"
        with pytest.raises(OutputError, match=re.escape(f"output folder {out} cannot be created (Not a directory)")):
            prepare_output_dir(out)

    @pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                        reason="root writes into a folder of mode 0o500")
    def test_read_only_folder(self, tmp_path):
        out = tmp_path / "locked"
        out.mkdir()
        out.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            with pytest.raises(OutputError, match=re.escape(f"output folder {out} is not writable (Permission denied)")):
                prepare_output_dir(out)
        finally:
            out.chmod(stat.S_IRWXU)

    def test_folder_no_one_may_write(self):
        """sysfs refuses new files even to root."""
        out = Path("/sys/kernel")
        if not out.is_dir():
            pytest.skip("no /sys/kernel (not Linux)")
        with pytest.raises(OutputError, match=r"output folder /sys/kernel is not writable"):
            prepare_output_dir(out)
