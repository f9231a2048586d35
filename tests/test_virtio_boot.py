"""Boot test of the PCI bus and the in-VMM virtio devices (one boot, many checks).

The guest enumerates pyvmm's PCI bus, binds its stock virtio-pci drivers, and:
reads an 8 MiB pattern the host wrote to a virtio-blk disk and writes another
one that the host then checks; fails to write a readonly=on disk whose image
stays byte-identical; reads /dev/hwrng, also after its driver was unbound
(device reset) and bound again; and exchanges a line each way over
hvc0 with a test holding the virtio-console socket.
"""

from __future__ import annotations

import hashlib
import re
import os
import socket
import subprocess
import time

import pytest

from pyvmm.testing import VmmProcess
from pyvmm.cli import default_guest_dir

pytestmark = pytest.mark.boot

MiB = 1 << 20


def pattern_tool() -> str:
    path = default_guest_dir() / "initramfs.root" / "bin" / "pattern"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make guest`")
    return str(path)


def connect(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_until(sock: socket.socket, needle: bytes, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while needle not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_pci_virtio_blk_rng_console(guest_image, tmp_path):
    tool = pattern_tool()
    vda, vdb = tmp_path / "vda.img", tmp_path / "vdb.img"
    subprocess.run([tool, "write", str(vda), str(8 * MiB), "1"], check=True)
    vdb.write_bytes(os.urandom(MiB))
    vdb_before = hashlib.sha256(vdb.read_bytes()).hexdigest()
    vdb_mtime = vdb.stat().st_mtime_ns
    sock_path = str(tmp_path / "hvc0.sock")

    g = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs", guest_image["initramfs"],
                     "--disk", f"path={vda}", "--disk", f"path={vdb},readonly=on", "--rng",
                     "--console", f"socket={sock_path}",
                     "--append", "pyvmm.run=/pyvmm-tests/virtio-checks.sh")
    try:
        hvc = connect(sock_path, 30)
        got = read_until(hvc, b"hvc-ready", 240)
        assert b"hvc-ready" in got, g.text[-3000:]
        hvc.sendall(b"host-to-guest\n")
        status = g.wait_exit(240)
        hvc.close()
    finally:
        g.kill()
    out = g.text
    assert status == 0, out[-3000:]
    devices = [line.split()[1:] for line in out.splitlines() if line.startswith("pci-dev ")]
    ids = sorted((v, d) for _, v, d, _ in devices)
    assert ("0x8086", "0x0d57") in ids, devices          # host bridge
    assert ids.count(("0x1af4", "0x1042")) == 2, devices  # two virtio-blk
    assert ("0x1af4", "0x1044") in ids, devices           # virtio-rng
    assert ("0x1af4", "0x1043") in ids, devices           # virtio-console
    assert "vda-check: ok" in out                         # host -> guest through virtio-blk
    assert "vda-write: ok" in out
    assert subprocess.run([tool, "check", str(vda), str(8 * MiB), "2"]).returncode == 0  # guest -> host
    assert "vdb-write: refused" in out
    assert hashlib.sha256(vdb.read_bytes()).hexdigest() == vdb_before
    assert vdb.stat().st_mtime_ns == vdb_mtime
    assert "rng: virtio_rng.0 4096" in out
    assert re.search(r"rng-rebound: virtio_rng\.\d+ 4096", out), "reset + re-init of virtio-rng failed"
    assert "hvc-got: host-to-guest" in out
