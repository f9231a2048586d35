"""Snapshot and restore with the default guest (one boot for all of it).

The snapshot is taken once (a guest with a DAX share, stopped at /init's
snapshot point, which goes on with --snapshot-and-continue and runs a command).
Then:

1. two restores at once, each with a share of its own: commands run, a file is
   read through DAX and written back, the wall clock is the host's and the two
   guests' /dev/urandom differ; ``pyvmm restore --exec`` gives the command's
   output and status; the snapshot directory is never changed;
2. every bad snapshot (missing, truncated, corrupt, foreign, RAM file of the
   wrong size or contents) is refused with one line and exit 2, and the
   directory is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm.snapshot import image
from pyvmm.testing import Guest, Share, VmmProcess

pytestmark = pytest.mark.boot

MiB = 1 << 20


def tree_fingerprint(path: Path) -> dict[str, tuple]:
    """Every file under ``path`` with its size, mtime and a hash of its data extents."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.stat()
        h = hashlib.sha256()
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(4 * MiB):
                    if chunk.count(0) != len(chunk):
                        h.update(chunk)
        out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, h.hexdigest())
    return out


@pytest.fixture(scope="module")
def snapshot(guest_image, tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    share = root / "boot-share"
    share.mkdir()
    (share / "seen.txt").write_text("the snapshot run's share\n")
    path = root / "snapshot"
    # --snapshot-and-continue: the same guest goes on after writing the snapshot
    # (its quiesced virtio-fs rings restart) and runs --exec.
    # 512M: on PVM /init adds the RAM beyond 256M before the snapshot point (test_restore_exec)
    g = VmmProcess.pyvmm_run("--memory", "512M", "--share", f"{share},tag=data,dax=on,cache_size=32M",
                             "--snapshot", str(path), "--snapshot-and-continue",
                             "--exec", "echo continued; cat /mnt/data/seen.txt", stdin=False)
    try:
        status = g.wait_exit(300)
    finally:
        g.stop()
    assert status == 0, g.report("the snapshot run failed")
    assert g.text == "continued\nthe snapshot run's share\n", g.report("after the snapshot")
    assert (path / image.STATE_FILE).exists() and "snapshot written to" in g.stderr
    return path


def one_restore(snapshot: Path, share: Path, results: dict, key: str) -> None:
    t0 = time.monotonic()
    with Guest.restore(snapshot, shares={"data": Share(share, dax=True)}) as g:
        ready = time.monotonic() - t0
        before = time.time()
        clock = g.run("date +%s")
        after = time.time()
        r = g.run("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
                  "mmapread /mnt/data/in.bin; cat /mnt/data/in.txt; "
                  "echo written-after-restore > /mnt/data/out.txt; grep -c 'dax=always' /proc/mounts")
        results[key] = (ready, (before, int(clock.stdout), after), r)


def test_two_restores_at_once(snapshot, tmp_path):
    unchanged = tree_fingerprint(snapshot)
    from test_virtio_boot import pattern_tool

    tool = pattern_tool()
    shares = {}
    for key in ("a", "b"):
        d = tmp_path / f"share-{key}"
        d.mkdir()
        (d / "in.txt").write_text(f"restore {key}\n")
        subprocess.run([tool, "write", str(d / "in.bin"), str(4 * MiB), "3"], check=True)
        shares[key] = d
    host_sum = subprocess.run([tool, "sum", str(shares["a"] / "in.bin")], check=True,
                              capture_output=True, text=True).stdout.split()[0]
    results: dict = {}
    errors: list = []

    def worker(key: str) -> None:
        try:
            one_restore(snapshot, shares[key], results, key)
        except BaseException as e:   # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if errors:
        raise errors[0]
    randoms = set()
    for key, (ready, (host_before, guest_time, host_after), r) in results.items():
        print(f"restore {key}: ready after {ready:.2f} s")
        assert r.returncode == 0, r
        # the wall clock is the host's (date's whole seconds, within a second)
        assert host_before - 1 <= guest_time <= host_after + 1, \
            f"guest clock {guest_time} vs host {host_before:.1f}-{host_after:.1f}"
        lines = r.stdout.splitlines()
        randoms.add(lines[0])
        assert lines[1].split()[0] == host_sum, "DAX mmap read of the host file after a restore"
        assert lines[2] == f"restore {key}" and lines[3] == "1"
        assert (shares[key] / "out.txt").read_text() == "written-after-restore\n"
    assert len(randoms) == 2, "two restores of one snapshot produced the same random bytes"
    assert tree_fingerprint(snapshot) == unchanged, "a restore changed the snapshot"


def test_restore_exec(snapshot, tmp_path):
    share = tmp_path / "exec-share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\n")
    t0 = time.monotonic()
    g = VmmProcess.pyvmm_run(str(snapshot), "--share", f"{share},tag=data", "--exec",
                             "cat /mnt/data/hello.txt; grep MemTotal /proc/meminfo; exit 9",
                             command="restore", stdin=False)
    try:
        status = g.wait_exit(120)
    finally:
        g.stop()
    print(f"pyvmm restore --exec: {time.monotonic() - t0:.2f} s to exit")
    assert status == 9, g.report("restore --exec")
    hello, memtotal = g.text.splitlines()
    assert hello == "hello from the host"
    assert int(memtotal.split()[1]) > 480 << 10, "a restored 512M guest has all its RAM at once"


def restore_status(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", "restore", str(path), "--exec", "true",
                           *extra], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def copy_snapshot(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy2(src / image.STATE_FILE, dst / image.STATE_FILE)
    os.link(src / image.MEMORY_FILE, dst / image.MEMORY_FILE)   # never written by a restore
    return dst


def edit_state(path: Path, change) -> None:
    state = json.loads((path / image.STATE_FILE).read_text())
    change(state)
    (path / image.STATE_FILE).write_text(json.dumps(state))


BAD = {
    "missing": lambda p: shutil.rmtree(p),
    "no-state": lambda p: (p / image.STATE_FILE).unlink(),
    "truncated-state": lambda p: (p / image.STATE_FILE).write_bytes(
        (p / image.STATE_FILE).read_bytes()[:1000]),
    "garbage-state": lambda p: (p / image.STATE_FILE).write_bytes(os.urandom(4000)),
    "other-format-version": lambda p: edit_state(p, lambda s: s.update(version=99)),
    "other-pyvmm": lambda p: edit_state(p, lambda s: s.update(pyvmm_version="0.0.1")),
    "other-flavour": lambda p: edit_state(p, lambda s: s["host"].update(flavour="hardware" if
                                                                         s["host"]["flavour"] == "pvm" else "pvm")),
    "cpu-features": lambda p: edit_state(p, lambda s: [e.update(ecx="0xffffffff") for v in s["kvm"]["vcpus"]
                                                      for e in v["cpuid"] if e["function"] == "0x1"]),
    "bad-register": lambda p: edit_state(p, lambda s: s["kvm"]["vcpus"][0]["regs"].update(rip="zz")),
    "bad-device": lambda p: edit_state(p, lambda s: s["devices"].update(serial={"lcr": "x"})),
    "memory-size": lambda p: edit_state(p, lambda s: s["memory"].update(size=s["memory"]["size"] * 2)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_snapshots_are_refused(snapshot, tmp_path, case):
    bad = copy_snapshot(snapshot, tmp_path / "bad")
    BAD[case](bad)
    before = tree_fingerprint(bad) if bad.exists() else None
    p = restore_status(bad, "--share", f"{tmp_path},tag=data")
    assert p.returncode == 2, (case, p.returncode, p.stderr[-3000:])
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("pyvmm: "), p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    if before is not None:
        assert tree_fingerprint(bad) == before, "a refused restore changed the directory"


def test_memory_file_problems_are_refused(snapshot, tmp_path):
    for case in ("truncated", "changed"):
        bad = tmp_path / case
        bad.mkdir()
        shutil.copy2(snapshot / image.STATE_FILE, bad / image.STATE_FILE)
        subprocess.run(["cp", "--sparse=always", str(snapshot / image.MEMORY_FILE),
                        str(bad / image.MEMORY_FILE)], check=True)
        with open(bad / image.MEMORY_FILE, "r+b") as f:
            if case == "truncated":
                f.truncate(os.path.getsize(bad / image.MEMORY_FILE) - 4096)
            else:
                f.seek(0)
                f.write(os.urandom(4096))
        before = tree_fingerprint(bad)
        p = restore_status(bad, "--share", f"{tmp_path},tag=data")
        assert p.returncode == 2 and "memory.bin" in p.stderr, (case, p.stderr[-2000:])
        assert tree_fingerprint(bad) == before


def test_restore_needs_the_snapshots_shares(snapshot, tmp_path):
    cases = [((), "give it a back-end"),
             (("--share", f"{tmp_path},tag=data", "--share", f"{tmp_path},tag=other"),
              "no virtio-fs device")]
    for extra, words in cases:
        p = restore_status(snapshot, *extra)
        assert p.returncode == 2 and words in p.stderr, p.stderr
