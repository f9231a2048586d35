"""FUSE buffers in another share's DAX window (cloud-hypervisor #3869, the full case).

One boot with three shares: ``a`` mounted with DAX (pyvmm-virtiofsd), ``b``
without (pyvmm-virtiofsd) and ``c`` without (Debian's C virtiofsd from QEMU
7.2).  A guest program maps a file of ``a`` and uses that mapping as the
buffer of a read()/write() on a file of ``b`` or ``c``.  Buffered I/O copies
through the guest's page cache; O_DIRECT hands the mapping's pages, which are
``a``'s window pages, to the FUSE request on the other share's queue, so that
back-end sees guest-physical addresses its memory table does not cover.

* pyvmm-virtiofsd asks the VMM with FS_IO, which any back-end of the VM may
  send for any DAX window (the VMM routes it by address): every case works,
  aligned and unaligned, both directions, and a readv/writev whose iovec mixes
  guest RAM and the mapping.
* Debian's virtiofsd has no FS_IO (it never uses the back-end channel) and its
  libvhost-user treats a descriptor outside the memory table as fatal: it logs
  "invalid address for buffers" and exits.  Buffered I/O works; pyvmm takes
  the share's rings over and answers ENOTCONN, the O_DIRECT read() among them
  (its data buffers lie in the window, its FUSE headers in RAM), and the VM
  keeps running.
"""

from __future__ import annotations

import random
import re

import pytest

from pyvmm.testing import Guest, Share
from test_virtiofs_boot import ENOTCONN_TEXT, start_virtiofsd

pytestmark = pytest.mark.boot

KiB = 1024
MAP_SIZE = 128 * KiB
RAM_PART = 4096          # daxtool io readv/writev: guest RAM first, then the mapping


def test_fuse_buffers_in_another_shares_dax_window(guest_image, tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    for d in (a, b, c):
        d.mkdir()
    rnd = random.Random(3869)
    src = rnd.randbytes(96 * KiB)                 # read into the mapping from b or c
    mapped = rnd.randbytes(MAP_SIZE)              # written from the mapping to b or c
    for d in (b, c):
        (d / "src.bin").write_bytes(src)
    (a / "w.bin").write_bytes(mapped)
    # (name, op, mode, share, skip, length): each read case maps a file of its own
    cases = [
        ("rd-aligned", "read", "direct", "b", 0, 64 * KiB),
        ("rd-unaligned", "read", "direct", "b", 100, 40000),
        ("wr-aligned", "write", "direct", "b", 0, 64 * KiB),
        ("wr-unaligned", "write", "direct", "b", 100, 40000),
        ("rv-mixed", "readv", "direct", "b", 200, 8 * KiB),
        ("wv-mixed", "writev", "direct", "b", 300, 8 * KiB),
        ("rd-buffered", "read", "buffered", "b", 100, 40000),
        ("wr-buffered", "write", "buffered", "b", 100, 40000),
        ("c-rd-buffered", "read", "buffered", "c", 100, 40000),
        ("c-wr-buffered", "write", "buffered", "c", 100, 40000),
        ("c-rd-direct", "read", "direct", "c", 0, 64 * KiB),   # last: Debian's back-end exits
    ]
    for name, op, *_ in cases:
        if op.startswith("read"):
            (a / f"{name}.bin").write_bytes(bytes(MAP_SIZE))

    sock = str(tmp_path / "c.sock")
    debian = start_virtiofsd(sock, str(c))
    results = {}
    try:
        with Guest(shares={"a": Share(str(a), dax=True, cache_size="16M"), "b": Share(str(b))},
                   args=["--fs", f"tag=c,socket={sock}"], append=["pyvmm.share=c"]) as g:
            mounts = g.run("grep virtiofs /proc/mounts", check=True).stdout
            assert "/mnt/a virtiofs" in mounts and "dax" in mounts.split("/mnt/a ")[1].splitlines()[0]
            for name, op, mode, share, skip, length in cases:
                mapfile = f"/mnt/a/{name}.bin" if op.startswith("read") else "/mnt/a/w.bin"
                target = "src.bin" if op.startswith("read") else f"{name}.bin"
                r = g.run(f"daxtool io {op} {mode} {mapfile} {skip} /mnt/{share}/{target} {length}")
                results[name] = (r.returncode, r.stdout.strip(), r.stderr.strip())
            alive = g.run("echo alive; cat /mnt/b/src.bin | wc -c; cat /mnt/c/src.bin", timeout=60)
            stderr = g.vmm.stderr
    finally:
        if debian.poll() is None:
            debian.kill()
        debian.wait(10)
        debian_log = debian.stderr.read().decode(errors="replace")
    print("\n".join(f"{k}: {v}" for k, v in results.items()))

    def moved(name):
        status, out, err = results[name]
        assert status == 0, (name, out, err)
        return int(out.rsplit(":", 1)[1])

    def window_file(name):   # what the guest's mapping shows, read on the host
        return (a / f"{name}.bin").read_bytes()

    # share b (pyvmm-virtiofsd): everything works, the bytes are right
    for name, _, _, share, skip, length in cases:
        if share != "b":
            continue
        if name.startswith("rd"):
            assert moved(name) == length and window_file(name)[skip:skip + length] == src[:length], name
        elif name.startswith("wr"):
            assert moved(name) == length and (b / f"{name}.bin").read_bytes() == mapped[skip:skip + length], name
    assert moved("rv-mixed") == RAM_PART + 8 * KiB
    assert window_file("rv-mixed")[200:200 + 8 * KiB] == src[RAM_PART:RAM_PART + 8 * KiB]
    assert moved("wv-mixed") == RAM_PART + 8 * KiB
    assert (b / "wv-mixed.bin").read_bytes() == b"R" * RAM_PART + mapped[300:300 + 8 * KiB]

    # share c (Debian's virtiofsd): buffered I/O works, O_DIRECT into another window does not
    assert moved("c-rd-buffered") == 40000 and window_file("c-rd-buffered")[100:40100] == src[:40000]
    assert moved("c-wr-buffered") == 40000 and (c / "c-wr-buffered.bin").read_bytes() == mapped[100:40100]
    status, out, _ = results["c-rd-direct"]          # read() fails: no data, no false success
    assert status != 0 and out.startswith("io read direct: error"), out
    assert window_file("c-rd-direct") == bytes(MAP_SIZE)
    assert "invalid address for buffers" in debian_log, debian_log[-2000:]
    assert "went away" in stderr                  # pyvmm noticed, and the VM went on:
    assert alive.stdout.startswith("alive\n") and f"{len(src)}\n" in alive.stdout
    assert re.search(ENOTCONN_TEXT, alive.stderr), alive.stderr
