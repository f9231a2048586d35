"""pyvmm-virtiofsd with real guests: pyvmm with a DAX window, and QEMU as the front-end.

1. pyvmm + pyvmm-virtiofsd, ``dax=on,cache_size=16M``, the share mounted with
   ``-o dax``: /proc/mounts shows dax; a host file reads back byte-exact and a
   guest file reaches the host; a 32 MiB file (twice the window) has the right
   checksum through read() and through mmap, and the guest page cache does not
   grow by its size; a guest mmap sees a host write to the same file (the
   window maps the host's page cache page) and the host sees a guest store
   after msync; write(2) from a DAX mapping (a FUSE WRITE whose buffer lies in
   the window) copies the right bytes; 200 files created, renamed, half
   deleted match the host; escapes through symlinks and ``..`` fail; after
   an unbind/bind of the PCI function (device reset, new initialisation) the
   share mounts again and reads right through DAX.
2. QEMU from Debian (``vhost-user-fs-pci``, no DAX, TCG) boots the same guest on
   pyvmm-virtiofsd: the guest reads and writes files.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pyvmm.shares import Backend, ShareConfig, start_backend
from pyvmm.testing import VmmProcess
from test_virtio_boot import pattern_tool

pytestmark = pytest.mark.boot

MiB = 1 << 20
WINDOW = 16 * MiB


def start_pyvmm_virtiofsd(shared: str, log_path: str, *extra: str) -> Backend:
    """pyvmm's own way of starting a back-end (``--share``), with a debug log for the test."""
    with open(log_path, "wb") as log:
        try:
            return start_backend(ShareConfig(shared, "share"), "debug", stderr=log, extra=extra)
        except ValueError as e:
            pytest.fail(f"{e}:\n" + open(log_path).read()[-3000:])


def _sum(tool: str, path) -> str:
    return subprocess.run([tool, "sum", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()


def _backend_log(path: str) -> str:
    try:
        return open(path, errors="replace").read()[-4000:]
    except OSError:
        return ""


def test_dax_share_with_pyvmm_virtiofsd(guest_image, tmp_path):
    tool = pattern_tool()
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run([tool, "write", str(shared / "host.bin"), str(2 * MiB), "4"], check=True)
    subprocess.run([tool, "write", str(shared / "big.bin"), str(2 * WINDOW), "9"], check=True)
    (shared / "watch.txt").write_bytes(b"A" * 16 + b"\n" + bytes(4079))
    (shared / "store.txt").write_bytes(b"." * 4096)
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-do-not-leak\n")
    os.symlink(str(secret), shared / "abs-link")
    os.symlink("..", shared / "up-link")
    host_sum, big_sum = _sum(tool, shared / "host.bin"), _sum(tool, shared / "big.bin")

    log = str(tmp_path / "virtiofsd.log")
    backend = start_pyvmm_virtiofsd(str(shared), log)
    sock = backend.socket_path
    g = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs", guest_image["initramfs"],
                     "--fs", f"tag=share,socket={sock},dax=on,cache_size=16M",
                     "--append", "pyvmm.share=share pyvmm.dax=1")
    try:
        g.wait_for("pyvmm-guest: ready", 240)
        # a guest mapping sees a host write to the same file
        g.send("cd /mnt/share && daxtool watch watch.txt 16\n")
        g.wait_for("before: " + "A" * 16, 60)
        with open(shared / "watch.txt", "r+b") as f:
            f.write(b"B" * 16)
        g.send("\n")
        g.wait_for("after: " + "B" * 16, 60)

        g.send("sh /pyvmm-tests/dax-checks.sh\n")
        g.wait_for_regex(r"dax-checks: done\r?\n", 600)
        out = g.text.replace("\r", "")
        print(out)
        mount_line = next(l for l in out.splitlines() if l.startswith("mount: "))
        assert "virtiofs" in mount_line and "dax" in mount_line, mount_line
        assert f"host-sum: {host_sum}" in out                               # host -> guest
        assert "guest-write: ok" in out
        assert subprocess.run([tool, "check", str(shared / "guest.bin"), str(MiB), "5"]).returncode == 0
        assert big_sum.endswith(f" {2 * WINDOW}")                           # "hash bytes"
        assert f"big-read: {big_sum}\n" in out                              # read() via DAX
        assert f"big-mmap: {big_sum} " in out                               # mmap via DAX
        growth = int(out.split("cache-growth-kb: ")[1].split()[0])
        assert growth < 4096, f"the guest page cache grew by {growth} kB reading 32 MiB via DAX"
        assert "stored 17" in out
        assert (shared / "store.txt").read_bytes()[100:117] == b"guest-stored-this"
        assert "copied 2097152" in out and f"copy-sum: {host_sum}" in out  # buffer in the window
        assert "moved-count: 100 tree-count: 0" in out
        assert sorted(os.listdir(shared / "moved")) == sorted(f"f{i}" for i in range(100, 200))
        assert os.listdir(shared / "tree") == []
        assert (shared / "moved" / "f150").read_text() == "file 150\n"
        assert "host-secret" not in out
        for what in ("escape-abs", "escape-up", "escape-dotdot", "escape-guest-link"):
            line = next(l for l in out.splitlines() if l.startswith(what + ":"))
            assert "No such file" in line, line
        assert os.readlink(shared / "guest-link") == "../../../secret.txt"

        # device reset and a second driver initialisation, DAX included
        g.send("sh /pyvmm-tests/fs-reinit.sh\n")
        g.wait_for_regex(r"fs-reinit: done\r?\n", 300)
        out = g.text.replace("\r", "")
        for step in ("unbound", "bound", "mounted"):
            assert f"reinit: {step}" in out, out[-2000:]
        assert f"reinit-sum: {host_sum}" in out
        assert f"reinit-mmap: {big_sum} " in out
        g.send("reboot -f\n")
        assert g.wait_exit(60) == 0
        assert backend.proc.wait(20) == 0, "pyvmm-virtiofsd did not exit after its front-end"
    except BaseException:
        print("pyvmm-virtiofsd log:\n" + _backend_log(log))
        raise
    finally:
        g.kill()
        backend.stop()


QEMU = shutil.which("qemu-system-x86_64")


def test_qemu_frontend_on_pyvmm_virtiofsd(guest_image, tmp_path):
    """QEMU's vhost-user-fs-pci (no DAX) against pyvmm-virtiofsd, under TCG.

    QEMU with KVM cannot boot this kernel on PVM hosts (int3 self-test), so the
    interop check runs QEMU's JIT: the subject is the vhost-user conversation.
    """
    if QEMU is None:
        pytest.fail("qemu-system-x86_64 is missing: `make setup-test` installs qemu-system-x86")
    from bench.boot import GuestConfig, qemu_argv
    from pyvmm.cmdline import default_cmdline
    from pyvmm.platform import detect_flavour

    tool = pattern_tool()
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run([tool, "write", str(shared / "host.bin"), str(MiB), "3"], check=True)
    host_sum = _sum(tool, shared / "host.bin")
    (shared / "run.sh").write_text(
        "cd /mnt/share || exit 1\n"
        "echo \"qemu-host-sum: $(pattern sum host.bin)\"\n"
        "pattern write guest.bin 524288 6 && echo qemu-guest-write: ok\n"
        "mkdir d && echo hi >d/a && mv d/a d/b && ls d\n")
    log = str(tmp_path / "virtiofsd.log")
    backend = start_pyvmm_virtiofsd(str(shared), log, "--thread-pool-size", "2")
    sock = backend.socket_path
    append = "pyvmm.share=share pyvmm.run=/mnt/share/run.sh"
    guest = GuestConfig(guest_image["kernel"], guest_image["initramfs"], "256M", 1,
                        f"{default_cmdline(detect_flavour())} {append}", append)
    argv = qemu_argv(QEMU, "tcg", "q35", "max", guest) + [
        "-chardev", f"socket,id=char0,path={sock}",
        "-device", "vhost-user-fs-pci,chardev=char0,tag=share",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
        out = proc.stdout.decode(errors="replace").replace("\r", "")
        assert f"qemu-host-sum: {host_sum}" in out, out[-3000:] + proc.stderr.decode()[-2000:]
        assert "qemu-guest-write: ok" in out
        assert "pyvmm-guest: exit 0" in out
        assert proc.returncode == 1     # isa-debug-exit: (0 << 1) | 1
        assert subprocess.run([tool, "check", str(shared / "guest.bin"), "524288", "6"]).returncode == 0
        assert os.listdir(shared / "d") == ["b"]
        assert backend.proc.wait(20) == 0
    except BaseException:
        print("pyvmm-virtiofsd log:\n" + _backend_log(log))
        raise
    finally:
        backend.stop()
