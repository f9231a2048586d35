"""The pyvmm-virtiofsd command: options, start-up errors, sandbox, one connection.

The daemon runs as a real child process; pyvmm's vhost-user front-end talks to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pyvmm.vhost_user.frontend import VhostUserFrontend
from pyvmm.virtiofsd import cli
from pyvmm.virtiofsd.sandbox import enter_sandbox

DAEMON = [sys.executable, "-m", "pyvmm.virtiofsd"]


def run_daemon(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(DAEMON + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    ([], "required"),
    (["--socket-path", "S"], "--shared-dir"),
    (["--socket-path", "S", "--shared-dir", "/nonexistent-dir"], "not a directory"),
    (["--socket-path", "/nonexistent-dir/s", "--shared-dir", "/tmp"], "does not exist"),
    (["--socket-path", "S", "--shared-dir", "/tmp", "--cache", "sometimes"], "invalid choice"),
    (["--socket-path", "S", "--shared-dir", "/tmp", "--sandbox", "jail"], "invalid choice"),
    (["--socket-path", "S", "--shared-dir", "/tmp", "--thread-pool-size", "-1"], "0 to 1024"),
    (["--socket-path", "S", "--shared-dir", "/tmp", "--thread-pool-size", "x"], "invalid int"),
    (["--socket-path", "S", "--shared-dir", "/tmp", "--bogus"], "unrecognized"),
    (["--socket-path", "/tmp/" + "x" * 120, "--shared-dir", "/tmp"], "longer than"),
])
def test_bad_options_one_line_exit_2(args, message):
    r = run_daemon(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm-virtiofsd: "), r.stderr
    assert message in lines[0]


def test_defaults():
    args = cli.parse_args(["--socket-path", "s", "--shared-dir", "/tmp"])
    assert (args.cache, args.thread_pool_size, args.readonly) == ("auto", 0, False)
    assert args.sandbox == ("namespace" if os.geteuid() == 0 else "none")


def start(tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    sock = str(tmp_path / "vfs.sock")
    proc = subprocess.Popen(DAEMON + ["--socket-path", sock, "--shared-dir", str(shared), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not cli._is_listening(sock):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no socket"
        time.sleep(0.02)
    return proc, sock


@pytest.mark.parametrize("sandbox", ["none", "chroot", "namespace"])
def test_serves_one_frontend_then_exits(tmp_path, sandbox):
    if sandbox != "none" and os.geteuid() != 0:
        pytest.skip("chroot and namespaces need root")
    proc, sock = start(tmp_path, "--sandbox", sandbox)
    try:
        fe = VhostUserFrontend(sock, timeout=5)
        features = fe.negotiate(min_queues=2)
        assert features & (1 << 32)
        assert not os.path.exists(sock), "the socket file stays after the one connection"
        fe.close()
        assert proc.wait(10) == 0
        assert "front-end gone" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_socket_in_use_and_stale_socket(tmp_path):
    proc, sock = start(tmp_path, "--sandbox", "none")
    try:
        r = run_daemon("--socket-path", sock, "--shared-dir", str(tmp_path))
        assert r.returncode == 1 and "in use" in r.stderr
    finally:
        proc.kill()
        proc.wait()
    # the killed daemon left its socket file, which nobody listens on: it is replaced
    assert os.path.exists(sock)
    proc, sock = start(tmp_path, "--sandbox", "none")
    try:
        fe = VhostUserFrontend(sock, timeout=5)
        fe.negotiate()
        fe.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_not_a_socket(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    r = run_daemon("--socket-path", str(path), "--shared-dir", str(tmp_path))
    assert r.returncode == 1 and "not a socket" in r.stderr


SANDBOX_PROBE = """
import json, os, sys
from pyvmm.virtiofsd.sandbox import enter_sandbox, open_proc_self_fd

def opens(proc_fd, path):
    try:
        os.close(os.open(path, os.O_RDONLY, dir_fd=proc_fd))
    except OSError:
        return False
    return True

host_pids = [1, os.getpid(), int(sys.argv[3])]        # host init, this process, pytest
escapes = [f"../../{pid}/root/etc/hostname" for pid in host_pids]
host_proc = open_proc_self_fd()
before = [opens(host_proc, path) for path in escapes]
os.close(host_proc)
sandbox = enter_sandbox(sys.argv[1], sys.argv[2])
fd = os.open("inside.txt", os.O_PATH)
reopened = os.open(str(fd), os.O_RDONLY, dir_fd=sandbox.proc_self_fd)   # I/O re-open without /proc
print(json.dumps({"root": sandbox.root, "pid": os.getpid(), "listing": sorted(os.listdir("/")),
                  "data": os.read(reopened, 100).decode(),
                  "etc": os.path.exists("/etc/hostname"), "dotdot": sorted(os.listdir("/..")),
                  "escapes before": before,
                  "escapes": [opens(sandbox.proc_self_fd, path) for path in escapes],
                  "own root": opens(sandbox.proc_self_fd, "../../1/root/inside.txt")}))
"""


@pytest.mark.parametrize("mode", ["chroot", "namespace"])
def test_sandbox_confines_to_the_shared_dir(tmp_path, mode):
    """Also through its /proc/self/fd: a new PID namespace with its own procfs, where
    ../../PID/root leads to no host process's root (issue 11.12)."""
    if os.geteuid() != 0:
        pytest.skip("chroot and namespaces need root")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "inside.txt").write_text("inside")
    r = subprocess.run([sys.executable, "-c", SANDBOX_PROBE, mode, str(shared), str(os.getpid())],
                       capture_output=True, text=True, timeout=30, cwd="/",
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    before = got.pop("escapes before")
    assert before[1:] == [True, True]    # the host's procfs leads out (host init: if visible)
    assert got == {"root": "/", "pid": 1, "listing": ["inside.txt"], "data": "inside",
                   "etc": False, "dotdot": ["inside.txt"], "escapes": [False] * 3,
                   "own root": True}
    # the host's mounts are untouched by the namespace
    assert os.path.exists("/etc/hostname") or os.path.exists("/etc/os-release")


def test_sandbox_parent_passes_signals_and_status(tmp_path):
    """The process that forked into the PID namespace waits for the daemon, passes
    SIGTERM on, and exits with the daemon's status."""
    if os.geteuid() != 0:
        pytest.skip("namespaces need root")
    probe = ("import os, signal, sys, time\n"
             "from pyvmm.virtiofsd.sandbox import enter_sandbox\n"
             "enter_sandbox('namespace', sys.argv[1])\n"
             "signal.signal(signal.SIGTERM, lambda *a: os._exit(7))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", probe, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd="/", env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()
        assert proc.wait(10) == 7
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sandbox_none_changes_nothing(tmp_path):
    sandbox = enter_sandbox("none", str(tmp_path))
    assert sandbox.root == os.path.realpath(tmp_path)
    os.close(sandbox.proc_self_fd)
    with pytest.raises(ValueError):
        enter_sandbox("jail", str(tmp_path))
