"""Fuzz target: pyvmm-virtiofsd's handling of front-end messages
(``VhostUserFsBackend`` in pyvmm/virtiofsd/vhost.py, after the protocol decoder).

Each input is a session: a sequence of messages, each with a few descriptors of
a kind the input chooses (eventfds, a memfd for memory tables, a socket for the
back-end channel), decoded as the back-end would and dispatched, mixed with the
guest's side: writes of "guest RAM" (the memfd) and kicks of every eventfd.
Vrings really start (threads waiting on their kick eventfds), serve the chains
the input laid out, and stop when the session ends.  The back-end must refuse bad requests with an error
ack, never raise, never log a bug and never leak a descriptor.
"""

from __future__ import annotations

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing  # noqa: E402

if __name__ == "__main__":
    fuzzing.run(__file__)   # before pyvmm is imported: see fuzzing.run

from fuzzing import Input, checked, pack  # noqa: E402

from pyvmm.vhost_user import protocol as p  # noqa: E402
from pyvmm.virtiofsd.iovec import IoVec  # noqa: E402
from pyvmm.virtiofsd.vhost import VhostUserFsBackend  # noqa: E402

RAM = 1 << 20
GUEST_AREA = 64 << 10    # what the guest side of an input writes (zeroed per input)
RING_GRACE = 0.001       # seconds a kick gives the ring threads
MAX_MESSAGES = 32


class StubServer:
    """The FUSE server's place (fuse_server.py fuzzes the real one)."""

    dax = None

    def handle(self, request: IoVec, reply: IoVec) -> int:
        return 0

    def fail(self, request: IoVec, reply: IoVec) -> int:
        return 0

    def destroy(self) -> None:
        pass


_ram: int | None = None


def _ram_fd() -> int:
    global _ram   # one memfd for the run, dup'ed into each message that wants one
    if _ram is None:
        _ram = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(_ram, RAM)
    return _ram


def _fds(inp: Input, keep: list[socket.socket], eventfds: list[int]) -> list[int]:
    fds = []
    for _ in range(inp.u8() % 3):
        kind = inp.u8() % 3
        if kind == 0:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            eventfds.append(os.dup(fds[-1]))      # to kick the ring it may become
        elif kind == 1:
            fds.append(os.dup(_ram_fd()))
        else:
            a, b = socket.socketpair()
            keep.append(b)
            fds.append(a.detach())
    return fds


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fuzz_one(data: bytes) -> None:
    with checked():
        _ram_fd()
        before = _open_fds()
        _run(Input(data))
        after = _open_fds()
        assert after <= before, f"{after - before} descriptors leaked"


def _guest(inp: Input, eventfds: list[int], backend: VhostUserFsBackend) -> None:
    """The guest's side: write some RAM (rings, descriptors), kick every eventfd, and
    give running rings a moment to look (so that their coverage counts)."""
    os.pwrite(_ram_fd(), inp.blob(256), inp.u16() * 4 % GUEST_AREA)
    for fd in eventfds:
        os.eventfd_write(fd, 1)
    if any(vr.running for vr in backend.vrings):
        time.sleep(RING_GRACE)


def _run(inp: Input) -> None:
    ours, frontend = socket.socketpair()
    frontend.setblocking(False)
    keep: list[socket.socket] = []
    eventfds: list[int] = []
    os.pwrite(_ram_fd(), bytes(GUEST_AREA), 0)
    backend = VhostUserFsBackend(ours, StubServer())
    try:
        for _ in range(MAX_MESSAGES):
            if not len(inp):
                break
            if inp.u8() % 4 == 0:
                _guest(inp, eventfds, backend)
                continue
            raw, fds = inp.blob(512), _fds(inp, keep, eventfds)
            try:
                msg = p.decode(raw, fds, channel=p.Channel.FRONTEND)
            except p.ProtocolError:
                continue
            if not backend._dispatch(msg):
                break
            try:
                while frontend.recv(4096):   # the acks and replies
                    pass
            except BlockingIOError:
                pass
    finally:
        backend.close()
        for s in [ours, frontend, *keep]:
            s.close()
        for fd in eventfds:
            os.close(fd)


def _message(request: int, payload: bytes = b"", fds: bytes = b"\0", need_reply: bool = True) -> bytes:
    flags = p.VHOST_USER_VERSION | (p.VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    raw = pack("III", request, flags, len(payload)) + payload
    return b"\1" + pack("H", len(raw)) + raw + fds


def _guest_write(offset: int, data: bytes) -> bytes:
    return b"\0" + pack("H", len(data)) + data + pack("H", offset // 4)


def seeds() -> list[bytes]:
    """A front-end setting up queue 1 of 8 entries at 0x1000/0x2000/0x3000 of a 1 MiB
    region, enabling it, stopping it; the back-end channel; a reset."""
    proto = ((1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1 << p.VHOST_USER_PROTOCOL_F_BACKEND_REQ)
             | (1 << p.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD))
    base = 0x7F00_0000_0000
    setup = (_message(p.VHOST_USER_GET_FEATURES)
             + _message(p.VHOST_USER_SET_FEATURES, pack("Q", (1 << 32) | (1 << 30)))
             + _message(p.VHOST_USER_SET_PROTOCOL_FEATURES, pack("Q", proto))
             + _message(p.VHOST_USER_SET_MEM_TABLE, pack("II", 1, 0) + pack("QQQQ", 0, RAM, base, 0),
                        bytes([1, 1]))
             + _message(p.VHOST_USER_SET_VRING_NUM, pack("II", 1, 8))
             + _message(p.VHOST_USER_SET_VRING_ADDR,
                        pack("IIQQQQ", 1, 0, base + 0x1000, base + 0x3000, base + 0x2000, 0))
             + _message(p.VHOST_USER_SET_VRING_CALL, pack("Q", 1), bytes([1, 0]))
             + _message(p.VHOST_USER_SET_VRING_KICK, pack("Q", 1), bytes([1, 0]))
             + _message(p.VHOST_USER_SET_VRING_ENABLE, pack("II", 1, 1)))
    # a chain at head 0: 16 readable bytes at 0x8000, 64 writable at 0x9000; avail idx 1
    chain = (_guest_write(0x1000, pack("QIHH", 0x8000, 16, 1, 1) + pack("QIHH", 0x9000, 64, 2, 0))
             + _guest_write(0x2000, pack("HHH", 0, 1, 0)))
    return [
        setup + chain + _message(p.VHOST_USER_GET_VRING_BASE, pack("II", 1, 0)),
        setup + _message(p.VHOST_USER_SET_BACKEND_REQ_FD, b"", bytes([1, 2]))
        + _message(p.VHOST_USER_RESET_DEVICE),
        _message(p.VHOST_USER_SET_BACKEND_REQ_FD, b"", bytes([1, 0])),
        _message(p.VHOST_USER_GET_SHMEM_CONFIG) + _message(p.VHOST_USER_GET_QUEUE_NUM),
    ]

