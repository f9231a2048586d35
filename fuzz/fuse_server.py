"""Fuzz target: the FUSE server of pyvmm-virtiofsd against a temporary directory
(``FuseServer.handle`` in pyvmm/virtiofsd/server.py over ``Passthrough``).

Each input is a session on a fresh share (a file, a directory, a symlink that
points out of it at a sentinel directory): a sequence of requests whose opcode,
node id (1 or one the server handed out), file handle, argument structure,
names, header length, caller ids and reply room come from the input.  The
properties are those of tests/test_fuse_malformed.py, at a fuzzer's pace:
``handle`` returns a used length that fits the reply and matches the out
header; errors are a bare header with a small negative errno; FORGET gets no
reply; the sentinel outside the share never changes; no descriptor leaks once
the session is destroyed; no bug is logged.  SYNCFS, FALLOCATE and
COPY_FILE_RANGE are left out (random sizes would sync the disk or reserve
gigabytes), as in that test.
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import sys
import tempfile
from ctypes import sizeof

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing  # noqa: E402

if __name__ == "__main__":
    fuzzing.run(__file__)   # before pyvmm is imported: see fuzzing.run

from fuzzing import Input, checked, pack  # noqa: E402

from fuse_fakes import FakeDax, in_header  # noqa: E402
from pyvmm.virtiofsd import fuse_abi as abi  # noqa: E402
from pyvmm.virtiofsd.iovec import IoVec  # noqa: E402
from pyvmm.virtiofsd.passthrough import Passthrough  # noqa: E402
from pyvmm.virtiofsd.server import FuseServer  # noqa: E402
from test_fuse_malformed import ARG_STRUCTS, EXCLUDED, NAME_OPS  # noqa: E402

OPCODES = sorted((set(ARG_STRUCTS) | set(NAME_OPS)) - EXCLUDED)
NAMES = (b"file", b"dir", b"escape", b"new", b"..", b".", b"", b"/", b"../outside", b"dir/inner")
REPLY_SIZES = (0, 8, 16, 24, 100, 144, 4096, 70000)
IDS = (0, 1000, 0xFFFFFFFF)
MAX_REQUESTS = 24
ENTRY_OPS = {abi.FUSE_LOOKUP, abi.FUSE_MKDIR, abi.FUSE_MKNOD, abi.FUSE_SYMLINK, abi.FUSE_LINK,
             abi.FUSE_CREATE}
OUT = sizeof(abi.fuse_out_header)

_base: str | None = None


def _base_dir() -> str:
    """Shares live on tmpfs when there is one: an ext4 rmdir costs milliseconds."""
    global _base
    if _base is None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _base = tempfile.mkdtemp(prefix="pyvmm-fuzz-fuse-", dir=shm)
        atexit.register(shutil.rmtree, _base, True)
    return _base


def _make_share() -> tuple[str, str]:
    base = tempfile.mkdtemp(dir=_base_dir())
    share, outside = os.path.join(base, "share"), os.path.join(base, "outside")
    os.mkdir(share)
    os.mkdir(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"do not touch")
    with open(os.path.join(share, "file"), "wb") as f:
        f.write(b"0123456789" * 10)
    os.mkdir(os.path.join(share, "dir"))
    os.symlink("../outside", os.path.join(share, "escape"))
    return share, outside


def _outside_state(outside: str) -> list:
    return sorted((n, os.lstat(os.path.join(outside, n)).st_mode,
                   open(os.path.join(outside, n), "rb").read()) for n in os.listdir(outside))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fuzz_one(data: bytes) -> None:
    with checked():
        share, outside = _make_share()
        try:
            before_fds, before_outside = _open_fds(), _outside_state(outside)
            fs = Passthrough(share)
            server = FuseServer(fs, dax=FakeDax())
            try:
                _run(Input(data), server)
            finally:
                server.destroy()
                fs.close()
            assert _outside_state(outside) == before_outside, "a file outside the share changed"
            assert _open_fds() == before_fds, "descriptors leaked"
        finally:
            shutil.rmtree(os.path.dirname(share), ignore_errors=True)


def _request(inp: Input, nodeids: list[int], fhs: list[int]) -> tuple[int, bytes]:
    """opcode; the argument structure; a control byte (bit 0: put a known fh in,
    bit 1: cut the structure short, bit 2: a random header length, bits 3-4: how
    many names, bit 7: the last name lacks its NUL); the names (an index into
    NAMES, or 0xFF and a blob); trailing data; node id, unique, uid, gid."""
    opcode = inp.pick(OPCODES)
    cls = ARG_STRUCTS.get(opcode)
    args = bytearray(inp.take(sizeof(cls))) if cls is not None else bytearray()
    ctl = inp.u8()
    if ctl & 1 and len(args) >= 8 and opcode not in (abi.FUSE_INIT, abi.FUSE_LINK):
        struct.pack_into("<Q", args, 0, inp.pick(fhs))     # fh is the first field
    if ctl & 2:
        del args[inp.u16() % (len(args) + 1):]
    count = (ctl >> 3) % 3
    for i in range(count):
        which = inp.u8()
        args += NAMES[which % len(NAMES)] if which != 0xFF else inp.blob(24)
        if not (ctl & 0x80 and i == count - 1):
            args += b"\0"
    args += inp.blob(64)
    length = inp.u32() if ctl & 4 else IN_LEN + len(args)
    header = in_header(opcode, length, nodeid=inp.pick(nodeids), unique=inp.u64(),
                       uid=inp.pick(IDS), gid=inp.pick(IDS))
    return opcode, header + bytes(args)


IN_LEN = sizeof(abi.fuse_in_header)


def _run(inp: Input, server: FuseServer) -> None:
    nodeids, fhs = [1, 0, 424242], [0]
    for _ in range(MAX_REQUESTS):
        if not len(inp):
            return
        opcode, raw = _request(inp, nodeids, fhs)
        unique = struct.unpack_from("<Q", raw, 8)[0]
        room = inp.pick(REPLY_SIZES)
        reply = bytearray(room)
        used = server.handle(IoVec.of(raw), IoVec([memoryview(reply)]))
        assert 0 <= used <= room, (used, room)
        if opcode in (abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET):
            assert used == 0
            continue
        if used == 0:
            continue
        header = abi.fuse_out_header.from_buffer_copy(reply)
        assert header.len == used and header.unique == unique
        assert -4095 <= header.error <= 0 and (header.error == 0 or used == OUT)
        payload = bytes(reply[OUT:used])
        if header.error == 0 and opcode in ENTRY_OPS and len(payload) >= 8:
            nodeids.append(struct.unpack_from("<Q", payload)[0])
        if header.error == 0 and opcode in (abi.FUSE_OPEN, abi.FUSE_OPENDIR) and len(payload) >= 8:
            fhs.append(struct.unpack_from("<Q", payload)[0])
        if header.error == 0 and opcode == abi.FUSE_CREATE and len(payload) >= 136:
            fhs.append(struct.unpack_from("<Q", payload, 128)[0])


def _req(opcode: int, args: bytes, node: int = 0, names: bytes = b"", data: bytes = b"",
         room: int = 6) -> bytes:
    """Seed helper: one request as ``_request`` reads it (``names``: NAMES indexes)."""
    return (bytes([OPCODES.index(opcode)]) + args + bytes([len(names) << 3]) + names
            + pack("H", len(data)) + data + bytes([node]) + pack("Q", 7) + b"\0\0" + bytes([room]))


def seeds() -> list[bytes]:
    init = bytes(abi.fuse_init_in(major=7, minor=31, max_readahead=1 << 17,
                                  flags=abi.FUSE_MAX_PAGES | abi.FUSE_DO_READDIRPLUS))
    open_in = bytes(abi.fuse_open_in(flags=os.O_RDWR))
    session = (_req(abi.FUSE_INIT, init) + _req(abi.FUSE_LOOKUP, b"", names=b"\0")
               + _req(abi.FUSE_OPEN, open_in, node=3)
               + _req(abi.FUSE_READ, bytes(abi.fuse_read_in(fh=1, size=4096)), node=3)
               + _req(abi.FUSE_OPENDIR, bytes(abi.fuse_open_in()))
               + _req(abi.FUSE_READDIRPLUS, bytes(abi.fuse_read_in(fh=2, size=4096))))
    create = bytes(abi.fuse_create_in(flags=os.O_RDWR | os.O_CREAT, mode=0o100644))
    write = bytes(abi.fuse_write_in(fh=1, size=4))
    mkdir = bytes(abi.fuse_mkdir_in(mode=0o755))
    return [session,
            _req(abi.FUSE_INIT, init) + _req(abi.FUSE_CREATE, create, names=b"\3")
            + _req(abi.FUSE_WRITE, write, node=3, data=b"abcd")
            + _req(abi.FUSE_GETATTR, bytes(16), node=3)
            + _req(abi.FUSE_MKDIR, mkdir, names=b"\xff\3\0sub") + _req(abi.FUSE_LOOKUP, b"", names=b"\2")
            + _req(abi.FUSE_LOOKUP, b"", node=4, names=b"\4")]

