"""pyvmm-virtiofsd's vhost-user back-end side (pyvmm.virtiofsd.vhost), no KVM.

pyvmm's own front-end (``VhostUserFrontend``) drives the back-end over a real
Unix socket, guest RAM is a real memfd (``GuestMemory``) and a small driver
lays out the rings, so the whole path runs: negotiation, memory table, ring
set-up with kick/call eventfds, requests served, DAX map/unmap over the back-end
channel into a real ``DaxWindow``, FS_IO for buffers inside the window, and
every refusal of bad front-end input.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time

import pytest

from pyvmm.devices.virtio.dax_window import DaxShm, DaxWindow, DaxWindows
from pyvmm.devices.virtio.fs import handle_dax_request
from pyvmm.memory import GuestMemory
from pyvmm.vhost_user import protocol as p
from pyvmm.vhost_user.frontend import (BackendError, VhostUserFrontend, guest_memory_regions,
                                       serve_backend_requests)
from pyvmm.virtiofsd.iovec import IoVec
from pyvmm.virtiofsd.vhost import (BACKEND_PROTOCOL_FEATURES, MAX_QUEUES, BackendMemory,
                                   VhostUserFsBackend, _ack_errno)
from test_virtqueue import Driver

RAM = 4 << 20
DATA = 0x100000
MiB = 1 << 20


class EchoServer:
    """Stands in for the FUSE server: copies the request into the reply."""

    def __init__(self) -> None:
        self.dax = None
        self.destroyed = 0
        self.calls: list[tuple[bytes, int]] = []

    def handle(self, request: IoVec, reply: IoVec) -> int:
        data = request.read(0, 16)
        self.calls.append((data, len(reply)))
        if data.startswith(b"READFILE"):          # file -> reply buffers (maybe foreign)
            fd, off = struct.unpack_from("<II", data, 8)
            return reply.read_from_file(fd, off, 0, len(reply))
        if data.startswith(b"RAISE"):
            raise RuntimeError("a bug in the handler")
        if data.startswith(b"HUGE"):              # a used length the reply cannot hold
            return len(reply) + 1
        if data.startswith(b"MAP"):
            fd, off = struct.unpack_from("<II", data, 8)
            self.dax.setup_mapping(fd, 0, off, 2 * MiB, writable=False)
            return reply.write(0, b"mapped")
        return reply.write(0, data)

    def fail(self, request: IoVec, reply: IoVec) -> int:
        return reply.write(0, b"failed")

    def destroy(self) -> None:
        self.destroyed += 1


class Rig:
    """A back-end thread on a socket, a connected front-end, guest RAM."""

    def __init__(self, tmp_path, pool: int = 0, server=None, ram: int = RAM) -> None:
        path = str(tmp_path / "vu.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self.server = EchoServer() if server is None else server
        self.done = threading.Event()

        def run() -> None:
            conn, _ = listener.accept()
            listener.close()
            self.backend = VhostUserFsBackend(conn, self.server, pool)
            try:
                self.backend.serve()
            finally:
                conn.close()
                self.done.set()

        threading.Thread(target=run, daemon=True).start()
        self.fe = VhostUserFrontend(path, timeout=5)
        self.features = self.fe.negotiate(min_queues=2)
        self.mem = GuestMemory(ram)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def start(self, index: int = 1, size: int = 8) -> Driver:
        self.fe.set_features(self.features & ~(1 << 29))
        self.fe.set_mem_table(guest_memory_regions(self.mem))
        d = Driver(self.mem, size=size)
        self.fe.setup_vring(index, size=size, desc=d.desc, avail=d.avail, used=d.used,
                            kick_fd=self.kick, call_fd=self.call, translate=self.fe.translate)
        return d

    def request(self, d: Driver, data: bytes, reply_len: int = 64, reply_at: int | None = None):
        self.mem.write(DATA, data)
        reply_gpa = DATA + 0x1000 if reply_at is None else reply_at
        before = d.used_idx()
        d.add(out=[(DATA, len(data))], in_=[(reply_gpa, reply_len)])
        os.eventfd_write(self.kick, 1)
        self.wait_call()
        assert d.used_idx() == (before + 1) & 0xFFFF
        _, written = d.used_elem(before % d.size)
        return written, reply_gpa

    def wait_call(self, timeout: float = 5.0) -> None:
        r, _, _ = select.select([self.call], [], [], timeout)
        assert r, "the back-end did not signal the call eventfd"
        os.eventfd_read(self.call)

    def close(self) -> None:
        self.fe.close()
        assert self.done.wait(5), "the back-end did not notice the front-end leaving"
        self.mem.close()
        os.close(self.kick)
        os.close(self.call)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_negotiation(rig):
    assert rig.features & (1 << 32) and rig.features & (1 << 30)
    assert rig.fe.protocol_features == BACKEND_PROTOCOL_FEATURES & rig.fe.backend_protocol_features
    assert rig.fe.get_queue_num() == MAX_QUEUES


def test_request_round_trip(rig):
    d = rig.start()
    for i in range(20):   # more than the ring size: the ring wraps
        msg = f"hello {i:02d}".encode().ljust(16, b".")
        written, at = rig.request(d, msg)
        assert written == 16
        assert rig.mem.read(at, 16) == msg


def test_thread_pool(tmp_path):
    r = Rig(tmp_path, pool=4)
    try:
        d = r.start()
        for i in range(10):
            msg = f"pool {i}".encode().ljust(16)
            written, at = r.request(d, msg)
            assert written == 16 and r.mem.read(at, 16) == msg
    finally:
        r.close()


def test_bad_chain_fails_only_that_request(rig):
    d = rig.start()
    head = d._alloc()
    d.write_desc(head, DATA, 16, 0x1, nxt=99)   # NEXT to an index past the table
    d.publish(head)
    os.eventfd_write(rig.kick, 1)
    rig.wait_call()
    assert d.used_elem(0) == (head, 0)
    written, at = rig.request(d, b"after the bad one")
    assert written == 16 and rig.mem.read(at, 5) == b"after"


@pytest.mark.parametrize("pool", [0, 2])
def test_a_failing_request_never_stops_the_ring(tmp_path, pool):
    """A handler that raises or claims more than its reply buffers: that request gets
    the server's failure reply (``fail``), the next one is served (issue 11.4)."""
    r = Rig(tmp_path, pool=pool)
    try:
        d = r.start()
        for bad in (b"RAISE", b"HUGE"):
            written, at = r.request(d, bad.ljust(16))
            assert r.mem.read(at, written) == b"failed"
            written, at = r.request(d, b"still serving".ljust(16))
            assert written == 16 and r.mem.read(at, 13) == b"still serving"
        assert r.backend.vrings[1].running
    finally:
        r.close()


@pytest.mark.parametrize("kind", ["dev-null", "socket", "pipe"])
def test_a_kick_or_call_fd_that_is_not_an_eventfd_is_refused(rig, kind):
    """The spec says eventfd.  A socket as the call fd, whose peer never reads, would
    block the ring's thread in write() once the socket filled up (and the back-end's
    close() would wait for that thread for ever)."""
    d = rig.start()
    keep = []
    if kind == "dev-null":
        bad = os.open("/dev/null", os.O_RDONLY)
    elif kind == "socket":
        a, b = socket.socketpair()
        keep.append(b)
        bad = a.detach()
    else:
        bad, w = os.pipe()
        os.close(w)
    before = set(os.listdir("/proc/self/fd"))
    try:
        for send in (rig.fe.set_vring_call, rig.fe.set_vring_kick):
            with pytest.raises(BackendError):
                send(1, bad)
        written, _ = rig.request(d, b"still serving".ljust(16))   # with its old fds
        assert written == 16
    finally:
        os.close(bad)
        for k in keep:
            k.close()
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_a_call_eventfd_at_its_maximum_does_not_block_the_ring(rig):
    d = rig.start()
    full = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        os.eventfd_write(full, 0xFFFF_FFFF_FFFF_FFFE)   # the next write of 1 would block
        rig.fe.set_vring_call(1, full)
        before = d.used_idx()
        rig.mem.write(DATA, b"first".ljust(16))
        d.add(out=[(DATA, 16)], in_=[(DATA + 0x1000, 64)])
        os.eventfd_write(rig.kick, 1)
        deadline = time.monotonic() + 5
        while d.used_idx() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.used_idx() == before + 1
        rig.fe.set_vring_call(1, rig.call)
        written, _ = rig.request(d, b"still serving".ljust(16))
        assert written == 16
    finally:
        os.close(full)


def test_a_ring_that_refills_itself_can_still_be_stopped(rig):
    """Found by fuzz/virtiofsd_messages.py: with the used ring on top of the avail ring,
    every completion bumps avail idx and publishes another chain, so the ring's thread
    served for ever and never looked at its stop fd; GET_VRING_BASE (and close()) then
    waited for it for ever.  Now it looks between passes of a ring's worth."""
    rig.fe.set_features(rig.features & ~(1 << 29))
    rig.fe.set_mem_table(guest_memory_regions(rig.mem))
    d = Driver(rig.mem, size=8)
    for i in range(8):
        d.write_desc(i, DATA, 16)          # every head a valid one-buffer chain
    d.publish(0)
    rig.fe.setup_vring(1, size=8, desc=d.desc, avail=d.avail, used=d.avail,
                       kick_fd=rig.kick, call_fd=rig.call, translate=rig.fe.translate)
    os.eventfd_write(rig.kick, 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # until it has gone round the ring a dozen times
        if struct.unpack("<H", rig.mem.read(d.avail + 2, 2))[0] > 100:
            break
        time.sleep(0.01)
    rig.fe.get_vring_base(1)   # BackendError when the back-end does not answer within 5 s


def test_a_ring_disabled_after_a_full_pass_waits_again(rig, monkeypatch):
    """After a pass of a ring's worth the ring's thread polls without waiting (to look
    at its stop fd) and goes on; once the ring is disabled it must wait for a kick
    again, not spin on poll(0) until the next kick or stop."""
    zero_polls = []
    real_poll = select.poll

    class CountingPoll:
        def __init__(self):
            self.poller = real_poll()

        def register(self, fd, events):
            self.poller.register(fd, events)

        def poll(self, timeout=None):
            if timeout == 0 and threading.current_thread().name == "vring-1":
                zero_polls.append(timeout)
            return self.poller.poll(timeout)

    monkeypatch.setattr(select, "poll", CountingPoll)
    rig.fe.set_features(rig.features & ~(1 << 29))
    rig.fe.set_mem_table(guest_memory_regions(rig.mem))
    d = Driver(rig.mem, size=8)
    for i in range(8):
        d.write_desc(i, DATA, 16)
    d.publish(0)
    rig.fe.setup_vring(1, size=8, desc=d.desc, avail=d.avail, used=d.avail,   # refills itself
                       kick_fd=rig.kick, call_fd=rig.call, translate=rig.fe.translate)
    os.eventfd_write(rig.kick, 1)
    deadline = time.monotonic() + 5
    while not zero_polls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert zero_polls, "the ring never completed a full pass"
    rig.fe.set_vring_enable(1, False)
    time.sleep(0.1)                      # the pass under way ends
    zero_polls.clear()
    time.sleep(0.3)
    assert len(zero_polls) <= 1, f"{len(zero_polls)} polls without waiting while disabled"
    rig.fe.get_vring_base(1)


def test_read_of_4gib_into_overlapping_descriptors(tmp_path):
    """READ of 0xFFFFFFFF bytes from a 5 GiB file with writable descriptors that
    overlap to more than 4 GiB: the reply is capped at max_pages, the ring lives on."""
    from fuse_fakes import FuseClient, request as fuse_request
    from pyvmm.virtiofsd import fuse_abi as abi
    from pyvmm.virtiofsd.passthrough import Passthrough
    from pyvmm.virtiofsd.server import MAX_PAGES, FuseServer

    share = tmp_path / "share"
    share.mkdir()
    with open(share / "sparse", "wb") as f:
        f.truncate(5 << 30)
    fs = Passthrough(str(share))
    server = FuseServer(fs)
    r = Rig(tmp_path, server=server, ram=16 * MiB)
    try:
        client = FuseClient(server)
        client.init()
        e = client.lookup(b"sparse")
        fh = client.open(e.nodeid).fh
        d = r.start()
        req = fuse_request(abi.FUSE_READ, bytes(abi.fuse_read_in(fh=fh, size=0xFFFFFFFF)),
                           nodeid=e.nodeid, unique=5)
        r.mem.write(DATA, req)
        before = d.used_idx()
        d.add(out=[(DATA, len(req))], in_=[(8 * MiB, 8 * MiB)] * 600, indirect=True)
        os.eventfd_write(r.kick, 1)
        r.wait_call()
        assert d.used_idx() == before + 1
        _, written = d.used_elem(before % d.size)
        header = abi.fuse_out_header.from_buffer_copy(r.mem.read(8 * MiB, 16))
        assert written == header.len == 16 + MAX_PAGES * 4096 and header.unique == 5
        written, at = r.request(d, fuse_request(abi.FUSE_GETATTR, bytes(16), unique=6), 200)
        assert written == 16 + 104
    finally:
        r.close()
        fs.close()


def test_get_vring_base_stops_the_ring(rig):
    d = rig.start()
    rig.request(d, b"one".ljust(16))
    rig.request(d, b"two".ljust(16))
    assert rig.fe.stop_vring(1) == 2
    # restart from where it stopped
    rig.fe.setup_vring(1, size=8, desc=d.desc, avail=d.avail, used=d.used, base=2,
                       kick_fd=rig.kick, call_fd=rig.call, translate=rig.fe.translate)
    written, at = rig.request(d, b"three".ljust(16))
    assert written == 16 and rig.mem.read(at, 5) == b"three"


@pytest.mark.parametrize("request_, payload", [
    (p.VHOST_USER_SET_VRING_NUM, p.VhostVringState(MAX_QUEUES, 8)),   # index out of range
    (p.VHOST_USER_SET_VRING_NUM, p.VhostVringState(1, 3)),            # not a power of two
    (p.VHOST_USER_SET_VRING_NUM, p.VhostVringState(1, 65536)),        # too big
    (p.VHOST_USER_SET_VRING_BASE, p.VhostVringState(1, 1 << 16)),     # more than 16 bits
    (p.VHOST_USER_SET_VRING_ENABLE, p.VhostVringState(200, 1)),
    (p.VHOST_USER_SET_FEATURES, 1 << 40),                             # not offered
    (p.VHOST_USER_SET_VRING_ADDR, p.VhostVringAddr(1, 0, 0, 0, 0, 0)),  # before a table
    (p.VHOST_USER_SET_VRING_ENDIAN, p.VhostVringState(1, 0)),         # not supported
])
def test_bad_vring_requests_are_refused(rig, request_, payload):
    """Raw requests (the front-end object would refuse to send some of them)."""
    with pytest.raises(BackendError):
        rig.fe._call(request_, payload)
    assert rig.fe.get_queue_num() == MAX_QUEUES   # the connection is still fine


def test_backend_channel_that_is_not_a_socket_is_refused_without_a_leak(rig):
    """Found by fuzz/virtiofsd_messages.py: the fd of a refused SET_BACKEND_REQ_FD
    stayed open."""
    before = set(os.listdir("/proc/self/fd"))
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(BackendError):
            rig.fe._call(p.VHOST_USER_SET_BACKEND_REQ_FD, None, [efd])
    finally:
        os.close(efd)
    assert set(os.listdir("/proc/self/fd")) == before
    assert rig.server.dax is None and rig.fe.get_queue_num() == MAX_QUEUES


def test_ring_address_outside_the_memory_table(rig):
    rig.fe.set_mem_table(guest_memory_regions(rig.mem))
    rig.fe.set_vring_num(1, 8)
    with pytest.raises(BackendError):   # user address the table does not cover
        rig.fe.set_vring_addr(1, 0x1000, 0x2000, 0x3000, translate=lambda gpa, size: 0x10)
    assert rig.fe.get_queue_num() == MAX_QUEUES


def test_reset_device_destroys_the_session(rig):
    d = rig.start()
    rig.request(d, b"x".ljust(16))
    rig.fe.reset_device()
    assert rig.server.destroyed >= 1


def test_backend_memory_bounds():
    m = GuestMemory(RAM)
    try:
        table = p.VhostUserMemory(nregions=1)
        table.regions[0] = p.VhostUserMemoryRegion(0x10000, 0x10000, 0x7f0000000000, 0x1000)
        bm = BackendMemory(table, [m.fd])
        m.write(0x1000, b"abc")
        assert bm.read(0x10000, 3) == b"abc"
        assert bm.user_to_gpa(0x7f0000000010) == 0x10010
        for gpa, size in [(0xffff, 2), (0x1fffe, 4), (0x20000, 1), (-1, 1)]:
            with pytest.raises(ValueError):
                bm.read(gpa, size)
        with pytest.raises(ValueError):
            bm.user_to_gpa(0x7f0000010000)
        bm.close()
        table.regions[0] = p.VhostUserMemoryRegion(0, 2 * RAM, 0x7f0000000000, 0)
        with pytest.raises(ValueError):   # region larger than the file behind it
            BackendMemory(table, [m.fd])
    finally:
        m.close()


def test_ack_errno():
    assert _ack_errno((-errno.EINVAL) & ((1 << 64) - 1)) == errno.EINVAL
    assert _ack_errno(1) == errno.EIO
    assert _ack_errno(1 << 40) == errno.EIO


# --- DAX over the back-end channel -----------------------------------------------------
class FakeSlots:
    def add(self, gpa, size, host_addr):
        return 0

    def move(self, slot, gpa):
        pass

    def remove(self, slot):
        pass


@pytest.fixture
def dax_rig(tmp_path):
    r = Rig(tmp_path)
    window = DaxWindow(16 * MiB)
    shm = DaxShm(window, FakeSlots())
    shm.shm_moved(None, 1 << 36)   # the BAR decodes at 64 GiB
    windows = DaxWindows()
    windows.add(shm)
    d = r.start()
    chan = r.fe.set_backend_req_fd()
    t = threading.Thread(target=serve_backend_requests,
                         args=(chan, lambda msg: handle_dax_request(window, msg, windows)), daemon=True)
    t.start()
    f = tmp_path / "file.bin"
    f.write_bytes(bytes(range(256)) * (2 * MiB // 256) + b"tail")
    fd = os.open(f, os.O_RDONLY)
    yield r, d, window, shm, fd
    os.close(fd)
    chan.shutdown(socket.SHUT_RDWR)
    t.join(5)
    chan.close()
    r.close()
    shm.close()


def test_dax_map_through_the_backend_channel(dax_rig):
    r, d, window, shm, fd = dax_rig
    assert r.server.dax is not None and r.server.dax.use_shmem
    written, at = r.request(d, b"MAP\0\0\0\0\0" + struct.pack("<II", fd, 4 * MiB))
    assert r.mem.read(at, written) == b"mapped"
    [m] = window.mappings()
    assert (m.offset, m.length, m.writable) == (4 * MiB, 2 * MiB, False)
    view = (ctypes.c_char * 16).from_address(window.host_addr + 4 * MiB)
    assert bytes(view) == bytes(range(16))
    r.server.dax.remove_mapping([(4 * MiB, 2 * MiB)])
    assert window.mappings() == []


def test_dax_map_refused_by_the_frontend(dax_rig):
    r, d, window, shm, fd = dax_rig
    with pytest.raises(OSError) as e:   # past the end of the 16 MiB window
        r.server.dax.setup_mapping(fd, 0, 16 * MiB, 2 * MiB, writable=False)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):       # writable needs an O_RDWR fd
        r.server.dax.setup_mapping(fd, 0, 0, 2 * MiB, writable=True)
    assert window.mappings() == []


def test_broken_channel_stream_fails_mappings_at_once(dax_rig):
    """The VMM closes a back-end channel whose stream it cannot trust (here: a size
    beyond the protocol maximum): the back-end's next SETUPMAPPING fails at once with
    EIO (the guest gets an error), it does not wait for an ack that never comes."""
    r, _, window, _, fd = dax_rig
    mapper = r.server.dax
    mapper.sock.send(bytes(p.VhostUserHeader(p.VHOST_USER_BACKEND_SHMEM_MAP, 1 | 8,
                                             p.MAX_PAYLOAD_SIZE + 1)))
    mapper.sock.settimeout(5)
    assert mapper.sock.recv(16) == b""           # the VMM shut the channel down
    mapper.sock.settimeout(None)
    with pytest.raises(OSError) as e:
        mapper.setup_mapping(fd, 0, 0, 2 * MiB, writable=False)
    assert e.value.errno == errno.EIO
    assert window.mappings() == []


def test_foreign_buffer_in_the_window_goes_through_fs_io(dax_rig, tmp_path):
    """The guest reads a file into a buffer inside the DAX window (cloud-hypervisor #3869)."""
    r, d, window, shm, fd = dax_rig
    target = tmp_path / "target.bin"
    target.write_bytes(bytes(2 * MiB))
    tfd = os.open(target, os.O_RDWR)
    try:
        r.server.dax.setup_mapping(tfd, 0, 2 * MiB, 2 * MiB, writable=True)
        gpa = (1 << 36) + 2 * MiB + 100       # inside the window, in the target's mapping
        written, _ = r.request(d, b"READFILE" + struct.pack("<II", fd, 10), reply_len=300,
                               reply_at=gpa)
        assert written == 300
        assert os.pread(tfd, 300, 100) == (bytes(range(256)) * 2)[10:310]
        # outside RAM and outside the window: the request fails, the ring goes on
        written, _ = r.request(d, b"READFILE" + struct.pack("<II", fd, 0), reply_len=16,
                               reply_at=1 << 40)
        assert written == 0
        written, at = r.request(d, b"still serving".ljust(16))
        assert written == 16
    finally:
        os.close(tfd)


def test_new_memory_table_while_the_pool_serves(tmp_path, monkeypatch):
    """SET_MEM_TABLE arriving while pooled requests are popped and served (QEMU sends
    one on memory hot-plug): no deadlock between the ring and the message loop."""
    from pyvmm.devices.virtio import queue as qmod
    slow = qmod.Virtqueue.pop

    def slow_pop(self):
        chain = slow(self)
        if chain is not None:
            time.sleep(0.2)   # the drain thread holds its memory slot meanwhile
        return chain

    monkeypatch.setattr(qmod.Virtqueue, "pop", slow_pop)
    r = Rig(tmp_path, pool=2)
    try:
        d = r.start()
        for i in range(3):
            r.mem.write(DATA + i * 64, b"x" * 16)
            d.add(out=[(DATA + i * 64, 16)], in_=[(DATA + 0x1000 + i * 64, 64)])
        os.eventfd_write(r.kick, 1)
        time.sleep(0.1)
        r.fe.set_mem_table(guest_memory_regions(r.mem))   # BackendTimeout if it deadlocks
        deadline = time.monotonic() + 5
        while d.used_idx() != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.used_idx() == 3
    finally:
        r.close()


def test_get_shmem_config_is_answered(rig):
    assert rig.fe.get_shmem_config() == [0] * 256
    assert rig.fe.get_queue_num() == MAX_QUEUES
