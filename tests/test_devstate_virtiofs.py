"""virtio-fs snapshot and restore with the real back-end: two pyvmm-virtiofsd processes.

The guest (``virtio_guest.PciGuest``) sends FUSE INIT on a request queue served
by daemon 1; the device is quiesced (GET_VRING_BASE) and saved; the VM goes on
(resume: the same daemon serves the next request from where it stopped).  Then
a new device is built against daemon 2 on a new socket, restored from the
saved state and the saved RAM, and resumed: daemon 2 receives the ring at its
saved base (SET_VRING_BASE) and serves the next request in the next slots.
"""

from __future__ import annotations

import json
from ctypes import sizeof
from pathlib import Path


from pyvmm.devices.virtio.fs import VirtioFs
from pyvmm.shares import Backend, ShareConfig, start_backend
from pyvmm.virtiofsd import fuse_abi as abi
from virtio_guest import PciGuest, copy_ram

REPO = Path(__file__).resolve().parent.parent
REQUEST_QUEUE = 1
OUT_HEADER = sizeof(abi.fuse_out_header)
INIT_REPLY = OUT_HEADER + sizeof(abi.fuse_init_out)


def start_daemon(tmp_path: Path, name: str) -> tuple[Backend, Path]:
    """pyvmm-virtiofsd started as ``--share`` starts it, its debug log in a file."""
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as f:
        backend = start_backend(ShareConfig(str(shared), name), "debug", stderr=f,
                                extra=("--sandbox", "none"))
    return backend, log


def stop_daemon(backend: Backend, log: Path) -> str:
    """The daemon exits once its front-end is gone; returns its log."""
    backend.stop()
    return log.read_text(errors="replace")


def fuse_init(g: PciGuest, unique: int) -> tuple[int, int]:
    """Post FUSE_INIT with ``unique`` on the request queue; (head, reply gpa)."""
    init = abi.fuse_init_in(major=7, minor=31, max_readahead=1 << 17)
    header = abi.fuse_in_header(len=sizeof(abi.fuse_in_header) + sizeof(init),
                                opcode=abi.FUSE_INIT, unique=unique, nodeid=0)
    return g.post(REQUEST_QUEUE, out=bytes(header) + bytes(init), in_len=4096)


def served(g: PciGuest, head: int, reply_gpa: int, unique: int, used_idx: int) -> None:
    """The request ``head`` came back as used element ``used_idx - 1`` with a
    successful INIT reply for ``unique``, and the guest was interrupted."""
    g.wait_used(REQUEST_QUEUE, used_idx)
    g.wait_call(REQUEST_QUEUE)
    d = g.rings[REQUEST_QUEUE]
    assert d.used_elem((used_idx - 1) % d.size) == (head, INIT_REPLY)
    out = abi.fuse_out_header.from_buffer_copy(g.mem.read(reply_gpa, OUT_HEADER))
    assert (out.len, out.error, out.unique) == (INIT_REPLY, 0, unique)


def test_virtiofs_restore_against_a_new_backend(tmp_path):
    first, log1_path = start_daemon(tmp_path, "first")
    second = None
    a = b = None
    try:
        a = PciGuest(VirtioFs("share", first.socket_path, queue_size=16))
        a.init_driver([0, REQUEST_QUEUE])
        head, reply = fuse_init(a, unique=0x101)
        served(a, head, reply, 0x101, used_idx=1)

        a.pci.quiesce()                              # GET_VRING_BASE on both rings
        state = json.loads(json.dumps(a.root.save_state()))
        fs_state = state["slots"][1]["state"]["device"]
        assert fs_state["ring_bases"] == [0, 1]
        ram = copy_ram(a.mem)                        # what the snapshot's RAM file holds
        driver = a.driver_snapshot()

        a.pci.resume()                               # snapshot and continue: same daemon
        head, reply = fuse_init(a, unique=0x102)
        served(a, head, reply, 0x102, used_idx=2)
        a.close()
        a = None
        log1 = stop_daemon(first, log1_path)
        assert "vring 1 stopped at 1" in log1

        second, log2_path = start_daemon(tmp_path, "second")
        b = PciGuest(VirtioFs("share", second.socket_path, queue_size=16), mem=ram)
        b.root.restore_state(state)
        b.adopt(driver)
        b.root.resume()                              # SET_VRING_BASE 1 on the new daemon
        head, reply = fuse_init(b, unique=0x201)     # a new session: INIT is the first request
        assert head == 2                             # new descriptors: not the INIT served before
        served(b, head, reply, 0x201, used_idx=2)
        b.close()
        b = None
        log2 = stop_daemon(second, log2_path)
        assert "vring 1: serving (size 16, base 1)" in log2
    finally:
        for g in (a, b):
            if g is not None:
                g.close()
        for backend in (first, second):
            if backend is not None:
                backend.stop()
