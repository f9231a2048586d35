"""virtio-fs over vhost-user with Debian's virtiofsd (/usr/lib/qemu/virtiofsd).

One interactive boot: the guest reads a file the host wrote and checks its
hash, writes one the host checks, creates, renames and deletes files that the
host then lists; then the backend is killed: pyvmm stays up, logs it and
answers the share's requests with ENOTCONN itself, so the guest sees errors
instead of hanging, and `reboot -f` (which syncs) ends the VM cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pyvmm.testing import VmmProcess
from test_virtio_boot import pattern_tool

# strerror(ENOTCONN) as the guest's busybox prints it: musl's words (our own busybox),
# or glibc's (Debian's busybox-static, the fallback of guest/build-initramfs.sh).
ENOTCONN_TEXT = r"Socket not connected|Transport endpoint is not connected"

pytestmark = pytest.mark.boot

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
MiB = 1 << 20


def start_virtiofsd(socket_path: str, shared: str) -> subprocess.Popen:
    if not os.path.exists(VIRTIOFSD):
        pytest.fail(f"{VIRTIOFSD} is missing: `make setup-test` installs qemu-system-common")
    proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={shared}",
                             "-o", "cache=auto", "-o", "sandbox=chroot"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"virtiofsd did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    return proc


def test_virtiofs_with_debian_virtiofsd(guest_image, tmp_path):
    tool = pattern_tool()
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run([tool, "write", str(shared / "host.bin"), str(2 * MiB), "4"], check=True)
    host_sum = subprocess.run([tool, "sum", str(shared / "host.bin")], check=True,
                              capture_output=True, text=True).stdout.strip()
    sock = str(tmp_path / "vfs.sock")
    backend = start_virtiofsd(sock, str(shared))
    g = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs", guest_image["initramfs"],
                     "--fs", f"tag=share,socket={sock}", "--append", "pyvmm.share=share")
    try:
        g.wait_for("pyvmm-guest: ready", 240)
        g.send("sh /pyvmm-tests/fs-checks.sh\n")
        g.wait_for_regex(r"fs-checks: done\r?\n", 120)
        out = g.text
        assert f"host-sum: {host_sum}" in out                      # host -> guest, byte-exact
        assert "guest-write: ok" in out
        assert subprocess.run([tool, "check", str(shared / "guest.bin"), str(MiB), "5"]).returncode == 0
        expected = sorted(["renamed"] + [f"f{i}" for i in range(2, 20)])
        assert sorted(os.listdir(shared / "tree")) == expected     # guest -> host
        assert "listing: " + " ".join(sorted(expected, key=lambda n: n)) in out.replace("\r", "")
        assert (shared / "tree" / "renamed").read_text() == "file 0\n"

        backend.send_signal(signal.SIGKILL)                         # the backend dies mid-run
        backend.wait(10)
        deadline = time.monotonic() + 10
        while b"went away" not in g.errors.data and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"went away" in g.errors.data, "pyvmm did not notice the backend's death"
        assert g.proc.poll() is None, "pyvmm died with its backend"
        g.send("echo still-alive-$((40+2)); cat /mnt/share/tree/f2\n")
        g.wait_for("still-alive-42", 60)
        # pyvmm now answers the share's requests itself, with ENOTCONN
        g.wait_for_regex(ENOTCONN_TEXT, 60)
        g.send("reboot -f\n")   # syncs first: must not hang on the dead share
        assert g.wait_exit(60) == 0
    finally:
        g.kill()
        if backend.poll() is None:
            backend.kill()
