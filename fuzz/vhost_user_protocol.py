"""Fuzz target: vhost-user message decoding, both sides (pyvmm/vhost_user/protocol.py).

The first byte chooses the channel (front-end requests the back-end decodes,
back-end requests the VMM decodes) and whether the message must be the reply
to a given request (how either side reads an answer), the second how many file
descriptors arrived with it; the rest is the message.  ``ProtocolError`` is
the documented refusal.  Invariants: a refused message's descriptors are
closed, an accepted one owns exactly the ones that came, and an accepted
message encodes back to the same bytes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing  # noqa: E402

if __name__ == "__main__":
    fuzzing.run(__file__)   # before pyvmm is imported: see fuzzing.run

from fuzzing import Input, checked, pack  # noqa: E402

from pyvmm.vhost_user import protocol as p  # noqa: E402


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def fuzz_one(data: bytes) -> None:
    with checked():
        _run(Input(data))


def _run(inp: Input) -> None:
    mode = inp.u8()
    channel = p.Channel.BACKEND if mode & 1 else p.Channel.FRONTEND
    expect = (mode >> 2) if mode & 2 else None
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(inp.u8() % 10)]
    try:
        msg = p.decode(inp.rest(), fds, channel=channel, expect_reply_to=expect)
    except p.ProtocolError:
        leaked = [fd for fd in fds if _is_open(fd)]
        assert not leaked, f"a refused message left fds {leaked} open"
        return
    try:
        assert msg.fds == fds
        repr(msg), msg.name
        if msg.body is not None:
            assert p.payload_bytes(msg.body) == msg.payload, "the body does not encode back"
    finally:
        msg.close_fds()


def _message(request: int, payload: bytes, flags: int = p.VHOST_USER_VERSION) -> bytes:
    return pack("III", request, flags, len(payload)) + payload


def seeds() -> list[bytes]:
    v1, reply = p.VHOST_USER_VERSION, p.VHOST_USER_VERSION | p.VHOST_USER_REPLY_MASK
    region = pack("QQQQ", 0, 1 << 20, 0x7F00_0000_0000, 0)
    return [
        bytes([0, 0]) + _message(p.VHOST_USER_GET_FEATURES, b""),
        bytes([0, 0]) + _message(p.VHOST_USER_SET_FEATURES, pack("Q", 1 << 32)),
        bytes([0, 1]) + _message(p.VHOST_USER_SET_MEM_TABLE, pack("II", 1, 0) + region),
        bytes([0, 1]) + _message(p.VHOST_USER_SET_VRING_KICK, pack("Q", 1)),
        bytes([0, 0]) + _message(p.VHOST_USER_SET_VRING_ADDR, pack("IIQQQQ", 1, 0, 0, 0, 0, 0)),
        bytes([0, 0]) + _message(p.VHOST_USER_GET_CONFIG, pack("III", 0, 8, 0) + bytes(8)),
        bytes([1, 1]) + _message(p.VHOST_USER_BACKEND_SHMEM_MAP, pack("QQQQQ", 0, 0, 0, 4096, 1)),
        bytes([1, 1]) + _message(p.VHOST_USER_BACKEND_FS_MAP, pack("Q", 0) * 32),
        bytes([2 | (p.VHOST_USER_GET_FEATURES << 2), 0])
        + _message(p.VHOST_USER_GET_FEATURES, pack("Q", 7), reply),
        bytes([3 | (p.VHOST_USER_BACKEND_SHMEM_MAP << 2), 0])
        + _message(p.VHOST_USER_BACKEND_SHMEM_MAP, pack("Q", 0), reply),
        bytes([0, 0]) + _message(p.VHOST_USER_SET_VRING_NUM, pack("II", 0, 8), v1 | 8),
    ]

