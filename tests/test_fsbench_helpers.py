"""The guest helpers bench/fs.py relies on, built for the host: rwbench, mmapread's
second pass, mmapwrite and metabench write and read the documented `pattern`
bytes and leave what they say.  Correctness only: no assertion on speed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_guest_image import GUEST, need, py_fnv64w, py_pattern


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> Path:
    gcc = need("gcc", "gcc libc6-dev")
    out = tmp_path_factory.mktemp("fsbench-helpers")
    for name in ("pattern", "rwbench", "mmapread", "mmapwrite", "metabench"):
        subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out / name),
                        str(GUEST / "helpers" / f"{name}.c")], check=True)
    return out


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


def words(out: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in out.split())


SIZE = 3 * 1024 * 1024 + 8   # several 1 MiB chunks and a short last one


def test_rwbench_read_hashes_like_pattern_sum(helpers, tmp_path):
    f = tmp_path / "f"
    assert run(helpers / "pattern", "write", f, SIZE, 7).returncode == 0
    out = run(helpers / "rwbench", "read", f)
    assert out.returncode == 0, out.stderr
    w = words(out.stdout)
    assert w["hash"] == f"{py_fnv64w(py_pattern(SIZE, 7)):016x}" and w["bytes"] == str(SIZE)
    float(w["seconds"]), float(w["mbps"])


def test_rwbench_write_overwrites_in_place(helpers, tmp_path):
    f = tmp_path / "f"
    assert run(helpers / "pattern", "write", f, SIZE + 100, 1).returncode == 0
    out = run(helpers / "rwbench", "write", f, SIZE, 8)
    assert out.returncode == 0, out.stderr
    assert words(out.stdout)["bytes"] == str(SIZE)
    data = f.read_bytes()
    assert data[:SIZE] == py_pattern(SIZE, 8)                     # overwritten
    assert data[SIZE:] == py_pattern(SIZE + 100, 1)[SIZE:]        # never truncated
    assert run(helpers / "rwbench", "write", tmp_path / "new", "1K", 3).returncode == 0
    assert (tmp_path / "new").read_bytes() == py_pattern(1024, 3)


def test_mmapwrite_needs_a_preallocated_file(helpers, tmp_path):
    f = tmp_path / "f"
    assert run(helpers / "pattern", "write", f, SIZE, 2).returncode == 0
    out = run(helpers / "mmapwrite", f, SIZE, 9)
    assert out.returncode == 0, out.stderr
    assert words(out.stdout)["bytes"] == str(SIZE)
    assert run(helpers / "pattern", "check", f, SIZE, 9).returncode == 0
    short = run(helpers / "mmapwrite", f, SIZE + 1, 9)
    assert short.returncode == 1 and "smaller than SIZE" in short.stderr
    assert run(helpers / "mmapwrite", tmp_path / "missing", 1, 9).returncode == 1
    assert run(helpers / "mmapwrite", f, 0, 9).returncode == 2


def test_mmapread_second_pass(helpers, tmp_path):
    f = tmp_path / "f"
    assert run(helpers / "pattern", "write", f, SIZE, 5).returncode == 0
    one, two = run(helpers / "mmapread", f), run(helpers / "mmapread", f, 2)
    assert one.returncode == 0 and two.returncode == 0
    a, b = one.stdout.split(), two.stdout.split()
    assert len(a) == 4 and len(b) == 6 and a[:2] == b[:2] and b[3] == b[5] == "MB/s"
    assert a[0] == f"{py_fnv64w(py_pattern(SIZE, 5)):016x}"
    assert run(helpers / "mmapread", f, 3).returncode == 2


def test_metabench_leaves_the_directory_empty(helpers, tmp_path):
    d = tmp_path / "meta"
    d.mkdir()
    out = run(helpers / "metabench", d, 50)
    assert out.returncode == 0, out.stderr
    w = words(out.stdout)
    assert w["files"] == "50" and float(w["ops_per_s"]) > 0
    assert list(d.iterdir()) == []
    (d / "f3").write_text("in the way")        # O_EXCL: an existing name is an error
    clash = run(helpers / "metabench", d, 5)
    assert clash.returncode == 1 and "create" in clash.stderr
    assert run(helpers / "metabench", d, 0).returncode == 2
