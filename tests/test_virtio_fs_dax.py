"""The DAX side of virtio-fs: backend requests (legacy FS_MAP/UNMAP/SYNC and the
standard SHMEM_MAP/UNMAP) applied to a DAX window, and the request channel loop."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

import pytest

from pyvmm.devices.virtio.dax_window import DaxShm, DaxWindow, DaxWindows
from pyvmm.devices.virtio.fs import FS_UNMAP_ALL, handle_dax_request
from pyvmm.vhost_user import protocol as vu
from pyvmm.vhost_user.frontend import serve_backend_requests
from test_dax_window import FakeSlots

PAGE = 4096
WINDOW = 2 << 20


@pytest.fixture
def window():
    w = DaxWindow(WINDOW)
    yield w
    w.close()


@pytest.fixture
def datafile(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * (4 * PAGE // 256))
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def backend_msg(request: int, payload, fds=()) -> vu.Message:
    data, fds = vu.encode(request, payload, list(fds), channel=vu.Channel.BACKEND, need_reply=True)
    return vu.decode(data, [os.dup(fd) for fd in fds], channel=vu.Channel.BACKEND)


def fs_msg(entries) -> vu.VhostUserFSBackendMsg:
    body = vu.VhostUserFSBackendMsg()
    for i, (fd_offset, c_offset, length, flags) in enumerate(entries):
        body.fd_offset[i], body.c_offset[i], body.len[i], body.flags[i] = fd_offset, c_offset, length, flags
    return body


def window_bytes(w: DaxWindow, offset: int, size: int) -> bytes:
    return ctypes.string_at(w.host_addr + offset, size)


RW = vu.VHOST_USER_FS_FLAG_MAP_R | vu.VHOST_USER_FS_FLAG_MAP_W


def test_fs_map_places_file_pages_in_the_window(window, datafile):
    msg = backend_msg(vu.VHOST_USER_BACKEND_FS_MAP, fs_msg([(PAGE, 8 * PAGE, 2 * PAGE, RW)]), [datafile])
    try:
        assert handle_dax_request(window, msg) == 0
    finally:
        msg.close_fds()
    assert window_bytes(window, 8 * PAGE, 2 * PAGE) == os.pread(datafile, 2 * PAGE, PAGE)
    ctypes.memmove(window.host_addr + 8 * PAGE, b"DAX!", 4)        # a store through the window
    sync = backend_msg(vu.VHOST_USER_BACKEND_FS_SYNC, fs_msg([(0, 8 * PAGE, PAGE, 0)]))
    assert handle_dax_request(window, sync) == 0
    assert os.pread(datafile, 4, PAGE) == b"DAX!"
    unmap = backend_msg(vu.VHOST_USER_BACKEND_FS_UNMAP, fs_msg([(0, 0, FS_UNMAP_ALL, 0)]))
    assert handle_dax_request(window, unmap) == 0
    assert window.mappings() == []
    assert window_bytes(window, 8 * PAGE, 4) == b"\0" * 4          # back to a hole


@pytest.mark.parametrize("entry, why", [
    ((0, 0, PAGE, 0), "neither read nor write"),
    ((0, WINDOW, PAGE, RW), "past the window"),                     # one page past the end
    ((0, WINDOW - PAGE, 2 * PAGE, RW), "past the window"),         # runs off the end
    ((0, 1, PAGE, RW), "align"),                                    # unaligned
])
def test_fs_map_refuses_bad_entries(window, datafile, entry, why):
    msg = backend_msg(vu.VHOST_USER_BACKEND_FS_MAP, fs_msg([entry]), [datafile])
    try:
        with pytest.raises(ValueError, match=why):
            handle_dax_request(window, msg)
    finally:
        msg.close_fds()
    assert window.mappings() == []


def test_shmem_map_checks_the_region_id(window, datafile):
    good = vu.VhostUserMMap(shmid=0, fd_offset=0, shm_offset=0, len=PAGE, flags=vu.VHOST_USER_FLAG_MAP_RW)
    bad = vu.VhostUserMMap(shmid=1, fd_offset=0, shm_offset=0, len=PAGE, flags=0)
    msg = backend_msg(vu.VHOST_USER_BACKEND_SHMEM_MAP, bad, [datafile])
    with pytest.raises(ValueError, match="region 1"):
        handle_dax_request(window, msg)
    msg.close_fds()
    msg = backend_msg(vu.VHOST_USER_BACKEND_SHMEM_MAP, good, [datafile])
    assert handle_dax_request(window, msg) == 0
    msg.close_fds()
    assert window_bytes(window, 0, PAGE) == os.pread(datafile, PAGE, 0)
    unmap = backend_msg(vu.VHOST_USER_BACKEND_SHMEM_UNMAP,
                        vu.VhostUserMMap(shmid=0, shm_offset=0, len=PAGE))
    assert handle_dax_request(window, unmap) == 0
    assert window.mappings() == []


def test_request_channel_acks_success_and_failure(window, datafile):
    """The loop the VMM runs on SET_BACKEND_REQ_FD's socket: a good FS_MAP is acked 0,
    a bad one gets a negative errno, and the VMM keeps serving."""
    vmm, backend = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t = threading.Thread(target=serve_backend_requests,
                         args=(vmm, lambda m: handle_dax_request(window, m)), daemon=True)
    t.start()
    try:
        for entry, ok in (((0, 0, PAGE, RW), True), ((0, WINDOW, PAGE, RW), False),
                          ((PAGE, PAGE, PAGE, vu.VHOST_USER_FS_FLAG_MAP_R), True)):
            vu.send_message(backend, vu.VHOST_USER_BACKEND_FS_MAP, fs_msg([entry]), [datafile],
                            channel=vu.Channel.BACKEND, need_reply=True)
            ack = vu.recv_message(backend, channel=vu.Channel.BACKEND,
                                  expect_reply_to=vu.VHOST_USER_BACKEND_FS_MAP, timeout=5)
            assert (ack.body == 0) == ok, ack
        # the two good requests: page 0 read-write and page 1 read-only, both from the file
        assert [(m.offset, m.length, m.writable) for m in window.mappings()] == [
            (0, PAGE, True), (PAGE, PAGE, False)]
    finally:
        backend.close()
        t.join(5)
        vmm.close()
    assert not t.is_alive()


# --- SHMEM_MAP/SHMEM_UNMAP name whole mappings; the legacy family keeps its meaning -----------
def shmem(request: int, offset: int, length: int, fd=None, writable=False,
          fd_offset: int = 0) -> vu.Message:
    body = vu.VhostUserMMap(shmid=0, fd_offset=fd_offset, shm_offset=offset, len=length,
                            flags=vu.VHOST_USER_FLAG_MAP_RW if writable else 0)
    return backend_msg(request, body, [fd] if fd is not None else [])


def serve(window, msg, windows=None) -> int:
    try:
        return handle_dax_request(window, msg, windows)
    finally:
        msg.close_fds()


MAP, UNMAP = vu.VHOST_USER_BACKEND_SHMEM_MAP, vu.VHOST_USER_BACKEND_SHMEM_UNMAP


@pytest.mark.parametrize("offset, length, why", [
    (16 * PAGE, PAGE, "is not mapped"),                  # never mapped
    (8 * PAGE, 2 * PAGE, "part of or more than"),        # half of the mapping
    (10 * PAGE, 2 * PAGE, "part of or more than"),       # the other half
    (6 * PAGE, 8 * PAGE, "part of or more than"),        # a superset
    (0, WINDOW, "part of or more than"),                 # the whole window
])
def test_shmem_unmap_must_name_one_whole_mapping(window, datafile, offset, length, why):
    assert serve(window, shmem(MAP, 8 * PAGE, 4 * PAGE, datafile)) == 0
    before = window.entries()
    with pytest.raises(ValueError, match=why):
        serve(window, shmem(UNMAP, offset, length))
    assert window.entries() == before
    assert window_bytes(window, 8 * PAGE, 4 * PAGE) == os.pread(datafile, 4 * PAGE, 0)


def test_shmem_unmap_of_two_mappings_is_refused(window, datafile):
    serve(window, shmem(MAP, 0, PAGE, datafile))
    serve(window, shmem(MAP, PAGE, PAGE, datafile, fd_offset=PAGE))   # continues it: two entries
    assert len(window.entries()) == 2 and len(window.mappings()) == 1
    with pytest.raises(ValueError, match="covers 2 mappings"):
        serve(window, shmem(UNMAP, 0, 2 * PAGE))
    assert serve(window, shmem(UNMAP, PAGE, PAGE)) == 0   # each by its own range
    assert serve(window, shmem(UNMAP, 0, PAGE)) == 0
    assert window.entries() == []


@pytest.mark.parametrize("offset, length", [
    (8 * PAGE, PAGE), (10 * PAGE, 4 * PAGE), (4 * PAGE, 8 * PAGE), (0, WINDOW), (8 * PAGE, 2 * PAGE)])
def test_shmem_map_over_part_of_a_mapping_is_refused(window, datafile, offset, length):
    serve(window, shmem(MAP, 8 * PAGE, 4 * PAGE, datafile))
    before = window.entries()
    with pytest.raises(ValueError, match="overlaps the mapping 0x8000\\+0x4000"):
        serve(window, shmem(MAP, offset, length, datafile, writable=True))
    assert window.entries() == before


def test_shmem_map_of_the_same_range_replaces_it(window, datafile):
    """Linux's read-to-write upgrade: SETUPMAPPING again for the very same range."""
    serve(window, shmem(MAP, 8 * PAGE, 4 * PAGE, datafile))
    assert serve(window, shmem(MAP, 8 * PAGE, 4 * PAGE, datafile, writable=True)) == 0
    [m] = window.entries()
    assert (m.offset, m.length, m.writable) == (8 * PAGE, 4 * PAGE, True)
    assert serve(window, shmem(UNMAP, 8 * PAGE, 4 * PAGE)) == 0
    assert window.entries() == []


def test_the_mapping_table_is_bounded(window, datafile):
    assert window.max_mappings == WINDOW // PAGE          # one entry per page at most
    window.max_mappings = 3                                # a small table for the test
    for i in range(3):
        assert serve(window, shmem(MAP, 4 * i * PAGE, 3 * PAGE, datafile)) == 0
    with pytest.raises(ValueError, match="table is full"):
        serve(window, shmem(MAP, 20 * PAGE, PAGE, datafile))
    with pytest.raises(ValueError, match="table is full"):
        serve(window, backend_msg(vu.VHOST_USER_BACKEND_FS_MAP, fs_msg([(0, 20 * PAGE, PAGE, RW)]),
                                  [datafile]))
    with pytest.raises(ValueError, match="table is full"):   # the split would make a fourth
        serve(window, backend_msg(vu.VHOST_USER_BACKEND_FS_UNMAP, fs_msg([(0, PAGE, PAGE, 0)])))
    assert len(window.entries()) == 3
    assert serve(window, shmem(MAP, 0, 3 * PAGE, datafile, writable=True)) == 0   # a replacement fits


def test_legacy_fs_map_is_all_or_nothing(window, datafile, tmp_path):
    bad_entries = [
        (0, WINDOW, PAGE, RW),                             # past the window
        (0, PAGE, PAGE, 0),                                # neither read nor write
        (1, 2 * PAGE, PAGE, RW),                           # unaligned file offset
    ]
    for bad in bad_entries:
        entries = [(0, 0, PAGE, RW), (PAGE, 4 * PAGE, PAGE, RW), bad, (2 * PAGE, 6 * PAGE, PAGE, RW)]
        msg = backend_msg(vu.VHOST_USER_BACKEND_FS_MAP, fs_msg(entries), [datafile])
        with pytest.raises(ValueError):
            serve(window, msg)
        assert window.entries() == [], bad
        assert window_bytes(window, 0, 8 * PAGE) == bytes(8 * PAGE)
    ro = os.open(tmp_path / "data", os.O_RDONLY)                  # write access, read-only fd
    try:
        msg = backend_msg(vu.VHOST_USER_BACKEND_FS_MAP,
                          fs_msg([(0, 0, PAGE, vu.VHOST_USER_FS_FLAG_MAP_R), (0, PAGE, PAGE, RW)]), [ro])
        with pytest.raises(ValueError, match="read-only"):
            serve(window, msg)
    finally:
        os.close(ro)
    assert window.entries() == []


def test_legacy_fs_unmap_covers_holes_and_parts(window, datafile):
    """FS_UNMAP keeps the legacy meaning (virtiofsd's C implementation and QEMU's
    vhost-user-fs: the range becomes anonymous memory again, whatever it held)."""
    serve(window, backend_msg(vu.VHOST_USER_BACKEND_FS_MAP, fs_msg([(0, 0, 8 * PAGE, RW)]), [datafile]))
    unmap = fs_msg([(0, 2 * PAGE, 2 * PAGE, 0), (0, 7 * PAGE, 4 * PAGE, 0)])   # a part; a part + hole
    assert serve(window, backend_msg(vu.VHOST_USER_BACKEND_FS_UNMAP, unmap)) == 0
    assert [(m.offset, m.length) for m in window.entries()] == [(0, 2 * PAGE), (4 * PAGE, 3 * PAGE)]
    assert window_bytes(window, 2 * PAGE, 4) == b"\0" * 4
    assert serve(window, backend_msg(vu.VHOST_USER_BACKEND_FS_UNMAP, fs_msg([(0, 64 * PAGE, PAGE, 0)]))) == 0


# --- FS_IO reaches every DAX window of the VM -----------------------------------------------------
def fs_io(gpa: int, length: int, fd: int, to_file: bool, file_offset: int = 0) -> vu.Message:
    flags = vu.VHOST_USER_FS_FLAG_MAP_W if to_file else vu.VHOST_USER_FS_FLAG_MAP_R
    return backend_msg(vu.VHOST_USER_BACKEND_FS_IO, fs_msg([(file_offset, gpa, length, flags)]), [fd])


def test_fs_io_is_routed_to_the_window_that_holds_the_address(datafile, tmp_path):
    """Share A has a window, share B none: B's back-end asks FS_IO for a buffer in A's
    window (an O_DIRECT read() on B into a DAX mapping of A's file)."""
    a_win, c_win = DaxWindow(WINDOW), DaxWindow(WINDOW)
    a, c = DaxShm(a_win, FakeSlots()), DaxShm(c_win, FakeSlots())
    windows = DaxWindows()
    for shm, gpa in ((a, 1 << 36), (c, 2 << 36)):
        shm.shm_moved(None, gpa)
        windows.add(shm)
    target = tmp_path / "target"
    target.write_bytes(bytes(4 * PAGE))
    tfd = os.open(target, os.O_RDWR)
    src = tmp_path / "src"
    src.write_bytes(b"from-b's-file" * 1000)
    sfd = os.open(src, os.O_RDWR)
    try:
        a_win.map(0, 4 * PAGE, tfd, 0, True)                    # A's file in A's window
        # on B's channel (no window of its own): file -> A's window, unaligned
        assert serve(None, fs_io((1 << 36) + 100, 5000, sfd, to_file=False), windows) == 5000
        assert os.pread(tfd, 5000, 100) == os.pread(sfd, 5000, 0)
        # and back: A's window -> B's file
        assert serve(None, fs_io((1 << 36) + 100, 300, sfd, to_file=True, file_offset=9000), windows) == 300
        assert os.pread(sfd, 300, 9000) == os.pread(tfd, 300, 100)
        # the other device with a window of its own reaches A's window too
        assert serve(c_win, fs_io((1 << 36) + PAGE, 10, sfd, to_file=False), windows) == 10
        # nowhere, across two windows' gap, or after A's BAR stopped decoding: EFAULT
        for gpa, length in (((3 << 36), 16), ((1 << 36) + WINDOW - 8, 16)):
            with pytest.raises(OSError) as e:
                serve(None, fs_io(gpa, length, sfd, to_file=False), windows)
            assert e.value.errno == errno.EFAULT
        a.shm_moved(1 << 36, None)
        with pytest.raises(OSError):
            serve(None, fs_io((1 << 36) + 100, 16, sfd, to_file=False), windows)
        # a device without a window serves no mapping requests
        with pytest.raises(ValueError, match="no DAX window"):
            serve(None, shmem(MAP, 0, PAGE, tfd))
    finally:
        os.close(tfd)
        os.close(sfd)
        a.close()
        c.close()
