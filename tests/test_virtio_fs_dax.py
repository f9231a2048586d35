"""The DAX side of virtio-fs: backend requests (legacy FS_MAP/UNMAP/SYNC and the
standard SHMEM_MAP/UNMAP) applied to a DAX window, and the request channel loop."""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import pytest

from pyvmm.devices.virtio.dax_window import DaxWindow
from pyvmm.devices.virtio.fs import FS_UNMAP_ALL, handle_dax_request
from pyvmm.vhost_user import protocol as vu
from pyvmm.vhost_user.frontend import serve_backend_requests

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
