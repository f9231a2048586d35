"""The leak checks of `make soak` (bench/soak.py) and the /proc reading under them
(pyvmm.testing.process), without a guest."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from hypothesis import given, strategies as st

from bench.soak import (Baseline, children_of, fd_count, growth_problems, outlived,
                        proc_status, series)
from pyvmm.testing import VmmProcess
from pyvmm.testing.process import parent_and_session, session_processes

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@given(comm=st.text(st.characters(blacklist_characters="\0\n"), max_size=16),
       ppid=st.integers(0, 1 << 22), sid=st.integers(0, 1 << 22))
def test_stat_line_with_any_command_name(comm, ppid, sid):
    line = f"1234 ({comm}) S {ppid} 77 {sid} 0 -1 4194304 100 0 0 0\n"
    assert parent_and_session(line) == (ppid, sid)


def test_session_and_children_of_a_process():
    child = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        deadline = time.monotonic() + 30     # until the fork has exec'ed (a busy host is slow)
        while session_processes(child.pid) != {child.pid: " ".join(SLEEPER)} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session_processes(child.pid) == {child.pid: " ".join(SLEEPER)}
        assert child.pid in children_of(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert session_processes(child.pid) == {}
    assert child.pid not in children_of(os.getpid())


def test_started_processes_and_what_outlives_the_vmm():
    vmm = VmmProcess(["sh", "-c", f"{shlex.join(SLEEPER)} >/dev/null 2>&1 & echo started; read x"])
    try:
        vmm.wait_for("started", 30)
        assert vmm.wait_until(lambda: list(vmm.started_processes().values()) == [" ".join(SLEEPER)],
                              30)   # the background job's fork has exec'ed
        started = vmm.started_processes()
        vmm.send("go\n")                       # the leader exits, its child stays
        assert vmm.wait_exit(30) == 0
        left = outlived(vmm, grace=0.2)
        assert len(left) == 1 and f"pid {next(iter(started))}" in left[0]
        deadline = time.monotonic() + 10       # outlived() killed it
        while vmm.started_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vmm.started_processes() == {}
    finally:
        vmm.stop()


def test_stop_closes_the_pipes():
    """A harness that runs VMMs one after the other keeps no fd of the ones it stopped."""
    before = fd_count()
    for _ in range(3):
        vmm = VmmProcess(["sh", "-c", "echo out; echo err >&2"], stdin=False)
        assert vmm.wait_exit(30) == 0
        vmm.stop()
        assert (vmm.text, vmm.stderr) == ("out\n", "err\n")   # still readable
    assert fd_count() == before


def test_proc_status_fields():
    mine = proc_status(os.getpid())
    assert mine["RssAnon"] > 0 and mine["Threads"] >= 1
    assert set(mine) == {"RssAnon", "RssFile", "RssShmem", "Threads"}
    child = subprocess.Popen(["true"])
    child.wait()
    assert proc_status(child.pid) == {}


def test_baseline_reports_each_leak_once(tmp_path):
    baseline = Baseline.now()
    assert baseline.leaks(tmp_path) == []
    (tmp_path / "pyvmm-share-x").mkdir()
    (tmp_path / "sock").write_text("")
    fd = os.open(os.devnull, os.O_RDONLY)
    child = subprocess.Popen(SLEEPER)
    try:
        leaks = baseline.leaks(tmp_path)
        assert "left in TMPDIR: pyvmm-share-x" in leaks and "left in TMPDIR: sock" in leaks
        assert f"child process {child.pid} of the harness" in leaks
        assert any(leak.startswith("harness fds") for leak in leaks)
        assert os.listdir(tmp_path) == []       # removed once reported
    finally:
        child.kill()
        child.wait()
    assert baseline.leaks(tmp_path) == []       # the fd is the new baseline
    os.close(fd)


def test_growth_is_a_trend_not_noise():
    flat = [{"RssAnon": 50_000 + (i % 3) * 3000, "fds": 40 + i % 2} for i in range(20)]
    assert growth_problems("boot", flat, rss_kib=8192) == []
    rising = [{"RssAnon": 50_000 + i * 1000, "fds": 40 + i} for i in range(20)]
    problems = growth_problems("boot", rising, rss_kib=8192)
    assert len(problems) == 2 and "RssAnon grew" in problems[0] and "fds grew" in problems[1]
    s = series([5, 1, 9, 3])
    assert (s.first, s.last, s.min, s.max, s.drift, s.growth) == (5, 3, 1, 9, 8, -2)
    assert series([]) is None


def test_the_serving_backend_is_the_sandboxed_child():
    """pyvmm-virtiofsd in a sandbox is two processes (the parent waits, the child in
    the new PID namespace serves): the kill runs must kill the one that serves."""
    from bench.soak import serving_backend

    backend = "python -m pyvmm.virtiofsd --socket-path x"
    table = {10: (1, 10), 11: (10, 10), 12: (11, 10)}
    assert serving_backend({11: backend, 12: backend}, table) == 12
    assert serving_backend({11: backend}, table) == 11
    assert serving_backend({11: "sleep 1"}, table) is None
    assert serving_backend({11: backend, 13: backend}, {**table, 13: (10, 10)}) is None
