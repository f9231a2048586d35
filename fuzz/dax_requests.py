"""Fuzz target: the VMM's handling of a back-end's DAX requests, with a real
``DaxWindow`` (pyvmm/devices/virtio/dax_window.py) behind the public entry point
``pyvmm.devices.virtio.fs.handle_dax_request``.

Each input is a sequence of back-end channel messages (FS_MAP, FS_UNMAP,
FS_SYNC, FS_IO, SHMEM_MAP, SHMEM_UNMAP, or anything else), each with a file
descriptor of the input's choosing (a 1 MiB file opened read-only or
read-write, a write-only one, a memfd, an eventfd), decoded as the VMM decodes
the channel and handled the way ``serve_backend_requests`` does: ValueError
and OSError become failure acks.  Anything else is a crash, and every mapping
must stay inside the window.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing  # noqa: E402

if __name__ == "__main__":
    fuzzing.run(__file__)   # before pyvmm is imported: see fuzzing.run

from fuzzing import Input, checked, pack  # noqa: E402

from pyvmm.devices.virtio.dax_window import DaxShm, DaxWindow, DaxWindows  # noqa: E402
from pyvmm.devices.virtio.fs import handle_dax_request  # noqa: E402
from pyvmm.vhost_user import protocol as p  # noqa: E402
from test_dax_window import FakeSlots  # noqa: E402

WINDOW = 4 << 20
BAR = 1 << 36           # where the guest put the window (FS_IO addresses are guest-physical)
FILE_SIZE = 1 << 20
MAX_MESSAGES = 16

_files: list[int] = []


def _file_fds() -> list[int]:
    """Descriptors kept for the whole run; each message gets a dup of one."""
    if not _files:
        fd, path = tempfile.mkstemp(prefix="pyvmm-fuzz-dax-")
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, b"file data", 0)
        _files.append(fd)                                # read-write
        _files.append(os.open(path, os.O_RDONLY))
        _files.append(os.open(path, os.O_WRONLY))
        os.unlink(path)
        memfd = os.memfd_create("fuzz-dax", os.MFD_CLOEXEC)
        os.ftruncate(memfd, FILE_SIZE)
        _files.append(memfd)
        _files.append(os.eventfd(0, os.EFD_CLOEXEC))
    return _files


def fuzz_one(data: bytes) -> None:
    with checked():
        window = DaxWindow(WINDOW)
        shm = DaxShm(window, FakeSlots())
        shm.shm_moved(None, BAR)
        windows = DaxWindows()
        windows.add(shm)
        try:
            _run(Input(data), window, windows)
        finally:
            windows.remove(shm)
            shm.shm_moved(BAR, None)
            window.close()


def _run(inp: Input, window: DaxWindow, windows: DaxWindows) -> None:
    files = _file_fds()
    for _ in range(MAX_MESSAGES):
        if not len(inp):
            return
        raw = inp.blob(512)
        choice = inp.u8()
        fds = [os.dup(files[choice % len(files)])] if choice < 0x80 else []
        try:
            msg = p.decode(raw, fds, channel=p.Channel.BACKEND)
        except p.ProtocolError:
            continue
        try:
            handle_dax_request(window, msg, windows)
        except (ValueError, OSError):
            pass
        finally:
            msg.close_fds()
        for m in window.mappings():
            assert 0 <= m.offset and m.offset + m.length <= window.size, m


def _message(request: int, payload: bytes, fd: int = 0) -> bytes:
    raw = pack("III", request, p.VHOST_USER_VERSION | p.VHOST_USER_NEED_REPLY_MASK,
               len(payload)) + payload
    return pack("H", len(raw)) + raw + bytes([fd])


def _fs(entries: list[tuple[int, int, int, int]]) -> bytes:
    entries = entries + [(0, 0, 0, 0)] * (p.VHOST_USER_FS_BACKEND_ENTRIES - len(entries))
    return b"".join(pack("Q", e[k]) for k in range(4) for e in entries)


def seeds() -> list[bytes]:
    r, w = p.VHOST_USER_FS_FLAG_MAP_R, p.VHOST_USER_FS_FLAG_MAP_W
    shmem_map = pack("QQQQQ", 0, 0, 0x1000, 0x2000, p.VHOST_USER_FLAG_MAP_RW)
    return [
        _message(p.VHOST_USER_BACKEND_FS_MAP, _fs([(0, 0, 0x10000, r | w)]))
        + _message(p.VHOST_USER_BACKEND_FS_SYNC, _fs([(0, 0, 0x1000, 0)]), 0x80)
        + _message(p.VHOST_USER_BACKEND_FS_IO, _fs([(0, BAR + 0x100, 64, r)]), 1)
        + _message(p.VHOST_USER_BACKEND_FS_UNMAP, _fs([(0, 0, 0x10000, 0)]), 0x80),
        _message(p.VHOST_USER_BACKEND_SHMEM_MAP, shmem_map, 0)
        + _message(p.VHOST_USER_BACKEND_SHMEM_UNMAP, pack("QQQQQ", 0, 0, 0x1000, 0x1000, 0), 0x80),
        _message(p.VHOST_USER_BACKEND_FS_MAP, _fs([(0, 0x3000, 0x1000, r)]), 3)
        + _message(p.VHOST_USER_BACKEND_FS_UNMAP, _fs([(0, 0, (1 << 64) - 1, 0)]), 0x80),
    ]

