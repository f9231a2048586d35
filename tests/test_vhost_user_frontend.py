"""pyvmm.vhost_user.frontend against a scripted fake back-end (a thread on a Unix socket).

Checks the negotiation sequence message by message, the NEED_REPLY/ack path, every
way a back-end can misbehave (error ack, wrong reply, short payload, silence, hang-up)
and what SET_MEM_TABLE, SET_VRING_* and SET_BACKEND_REQ_FD put on the wire.  One
test talks to Debian's C virtiofsd when it is installed.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Callable

import pytest

from pyvmm.vhost_user import protocol as p
from pyvmm.vhost_user.frontend import (DEFAULT_PROTOCOL_FEATURES, BackendError, BackendGone,
                                       BackendTimeout, BackendUnavailable, FeatureNotNegotiated,
                                       MemoryRegion, RingAddressError, VhostUserFrontend,
                                       guest_memory_regions, serve_backend_requests)
from pyvmm.vhost_user.protocol import Channel, Message, PeerClosed

F_PROTOCOL = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
VERSION_1 = 1 << 32
FEATURES = VERSION_1 | F_PROTOCOL | (1 << 28) | (1 << 29)
ALL_PROTOCOL = (1 << 23) - 1      # every bit up to SHMEM (22)


def bit(n: int) -> int:
    return 1 << n


class FakeBackend:
    """Serves one connection: records every message, answers like a well-behaved back-end
    unless ``handlers[request](backend, msg)`` takes over (return "stop" to hang up)."""

    def __init__(self, path: str, *, features: int = FEATURES, protocol_features: int = ALL_PROTOCOL,
                 queue_num: int = 2, handlers: dict[int, Callable] | None = None) -> None:
        self.path = path
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.handlers = handlers or {}
        self.bases: dict[int, int] = {}
        self.config = bytes(range(40))
        self.messages: list[Message] = []
        self.conn: socket.socket | None = None
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    # what the tests look at
    @property
    def requests(self) -> list[str]:
        return [m.name.removeprefix("VHOST_USER_") for m in self.messages]

    def find(self, request: int) -> list[Message]:
        return [m for m in self.messages if m.request == request]

    def reply(self, msg: Message, payload) -> None:
        p.send_message(self.conn, msg.request, payload, reply=True)

    def _serve(self) -> None:
        try:
            self.conn, _ = self.listener.accept()
            while True:
                try:
                    msg = p.recv_message(self.conn, timeout=10)
                except (PeerClosed, OSError):
                    return
                self.messages.append(msg)
                handler = self.handlers.get(msg.request)
                if handler is not None:
                    if handler(self, msg) == "stop":
                        return
                    continue
                self.default(msg)
        except BaseException as e:   # surfaced by close()
            self.error = e
        finally:
            if self.conn is not None:
                self.conn.close()

    def default(self, msg: Message) -> None:
        r = msg.request
        if r == p.VHOST_USER_GET_FEATURES:
            self.reply(msg, self.features)
        elif r == p.VHOST_USER_GET_PROTOCOL_FEATURES:
            self.reply(msg, self.protocol_features)
        elif r == p.VHOST_USER_GET_QUEUE_NUM:
            self.reply(msg, self.queue_num)
        elif r == p.VHOST_USER_GET_VRING_BASE:
            self.reply(msg, p.VhostVringState(msg.body.index, self.bases.get(msg.body.index, 0)))
        elif r == p.VHOST_USER_GET_CONFIG:
            c = msg.body
            out = p.VhostUserConfig(offset=c.offset, size=c.size, flags=c.flags)
            out.region[:c.size] = list(self.config[c.offset:c.offset + c.size])
            self.reply(msg, out)
        elif r == p.VHOST_USER_GET_SHMEM_CONFIG:
            self.reply(msg, p.VhostUserShMemConfig(1, 0, (1 << 30,) + (0,) * 255))
        elif msg.need_reply:
            self.reply(msg, 0)

    def join(self) -> None:
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(timeout=5)
        for m in self.messages:
            m.close_fds()


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")   # AF_UNIX paths are short
    yield os.path.join(d, "fs.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend_factory(sock_path):
    made: list[FakeBackend] = []

    def make(**kw) -> FakeBackend:
        b = FakeBackend(sock_path, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


@pytest.fixture
def ram():
    """Two memfd-backed RAM regions (like guest RAM below and above the PCI hole)."""
    fds, maps, regions = [], [], []
    for i, (gpa, size) in enumerate([(0, 1 << 20), (1 << 32, 1 << 20)]):
        fd = os.memfd_create(f"ram{i}")
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        m[:4] = bytes([0xA0 + i]) * 4
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        fds.append(fd)
        maps.append(m)
        regions.append(MemoryRegion(gpa, size, addr, 0, fd))
    yield regions
    for fd in fds:
        os.close(fd)
    for m in maps:
        try:
            m.close()
        except BufferError:
            pass


def start(backend_factory, sock_path, **kw) -> tuple[FakeBackend, VhostUserFrontend]:
    timeout = kw.pop("timeout", 2.0)
    b = backend_factory(**kw)
    return b, VhostUserFrontend(sock_path, timeout=timeout)


# --- connecting ----------------------------------------------------------------------------
def test_missing_socket_names_path(sock_path):
    with pytest.raises(BackendUnavailable, match=f"{sock_path} does not exist"):
        VhostUserFrontend(sock_path)


def test_refused_connection_names_path(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)      # bound, never listening: ECONNREFUSED
    try:
        with pytest.raises(BackendUnavailable, match=f"{sock_path}: connection refused"):
            VhostUserFrontend(sock_path)
    finally:
        s.close()


def test_not_a_socket(sock_path):
    open(sock_path, "w").close()
    with pytest.raises(BackendUnavailable, match=sock_path):
        VhostUserFrontend(sock_path)


# --- the whole sequence --------------------------------------------------------------------
def test_negotiation_and_activation_sequence(backend_factory, sock_path, ram):
    b, fe = start(backend_factory, sock_path)
    features = fe.negotiate(min_queues=2)
    assert features == FEATURES
    assert fe.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert fe.queue_num == 2
    fe.set_features(VERSION_1 | bit(29))
    fe.set_mem_table(ram)
    kicks = [os.eventfd(0) for _ in range(2)]
    calls = [os.eventfd(0) for _ in range(2)]
    try:
        for q in range(2):
            fe.setup_vring(q, size=256, desc=0x10000 * (q + 1), avail=0x10000 * (q + 1) + 0x1000,
                           used=(1 << 32) + 0x2000 * q, kick_fd=kicks[q], call_fd=calls[q])
        req_sock = fe.set_backend_req_fd()
        req_sock.close()
        fe.close()
        b.join()
    finally:
        p.close_fds(kicks + calls)
    assert b.requests == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER", "GET_QUEUE_NUM",
        "SET_FEATURES", "SET_MEM_TABLE",
        "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_CALL", "SET_VRING_KICK",
        "SET_VRING_ENABLE",
        "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_CALL", "SET_VRING_KICK",
        "SET_VRING_ENABLE",
        "SET_BACKEND_REQ_FD",
    ]
    # NEED_REPLY on every request without an explicit reply once REPLY_ACK is on -- but not on
    # SET_PROTOCOL_FEATURES itself, nor on the GET_* requests.
    need = {m.name.removeprefix("VHOST_USER_"): m.need_reply for m in b.messages}
    for name, flag in need.items():
        expect = not name.startswith("GET_") and name != "SET_PROTOCOL_FEATURES"
        assert flag == expect, name
    assert all(m.flags & p.VHOST_USER_VERSION_MASK == 1 and not m.is_reply for m in b.messages)
    assert b.find(p.VHOST_USER_SET_PROTOCOL_FEATURES)[0].body == DEFAULT_PROTOCOL_FEATURES
    # bit 30 stays in SET_FEATURES although the guest never sees it
    assert b.find(p.VHOST_USER_SET_FEATURES)[0].body == VERSION_1 | bit(29) | F_PROTOCOL
    # ring addresses are VMM addresses: GPA translated through the memory table
    addrs = b.find(p.VHOST_USER_SET_VRING_ADDR)
    a1 = addrs[1].body
    assert a1.index == 1
    assert a1.desc_user_addr == ram[0].userspace_addr + 0x20000
    assert a1.avail_user_addr == ram[0].userspace_addr + 0x21000
    assert a1.used_user_addr == ram[1].userspace_addr + 0x2000
    nums = [(m.body.index, m.body.num) for m in b.find(p.VHOST_USER_SET_VRING_NUM)]
    assert nums == [(0, 256), (1, 256)]
    enables = [(m.body.index, m.body.num) for m in b.find(p.VHOST_USER_SET_VRING_ENABLE)]
    assert enables == [(0, 1), (1, 1)]
    kick = b.find(p.VHOST_USER_SET_VRING_KICK)[1]
    assert kick.body == 1 and len(kick.fds) == 1
    assert len(b.find(p.VHOST_USER_SET_BACKEND_REQ_FD)[0].fds) == 1


def test_protocol_features_only_the_known_offered_ones(backend_factory, sock_path):
    offered = bit(p.VHOST_USER_PROTOCOL_F_MQ) | bit(p.VHOST_USER_PROTOCOL_F_LOG_SHMFD) | \
        bit(p.VHOST_USER_PROTOCOL_F_HOST_NOTIFIER) | bit(p.VHOST_USER_PROTOCOL_F_SHMEM)
    b, fe = start(backend_factory, sock_path, protocol_features=offered)
    fe.negotiate()
    assert fe.protocol_features == bit(p.VHOST_USER_PROTOCOL_F_MQ) | bit(p.VHOST_USER_PROTOCOL_F_SHMEM)
    assert not fe.reply_ack
    with pytest.raises(FeatureNotNegotiated):
        fe.get_config(0, 4)
    with pytest.raises(FeatureNotNegotiated):
        fe.set_backend_req_fd()
    assert fe.get_shmem_config()[0] == 1 << 30
    fe.close()


def test_without_reply_ack_nothing_waits(backend_factory, sock_path, ram):
    """No REPLY_ACK: no NEED_REPLY, and the frontend does not wait for acks that never come."""
    b, fe = start(backend_factory, sock_path, protocol_features=bit(p.VHOST_USER_PROTOCOL_F_MQ))
    fe.negotiate()
    fe.set_features(VERSION_1)
    fe.set_mem_table(ram)
    fe.set_vring_num(0, 8)
    assert fe.get_vring_base(0) == 0           # a GET_* still gets its reply
    fe.close()
    b.join()
    assert not any(m.need_reply for m in b.messages)


def test_without_protocol_features(backend_factory, sock_path, ram):
    """A back-end without bit 30: no protocol negotiation, rings start enabled."""
    b, fe = start(backend_factory, sock_path, features=VERSION_1)
    fe.negotiate()
    fe.set_features(VERSION_1)
    fe.set_mem_table(ram)
    efd = os.eventfd(0)
    try:
        fe.setup_vring(0, size=8, desc=0x1000, avail=0x2000, used=0x3000, kick_fd=efd, call_fd=None)
        with pytest.raises(FeatureNotNegotiated):
            fe.set_vring_enable(0, True)
        fe.close()
        b.join()
    finally:
        os.close(efd)
    assert b.requests == ["GET_FEATURES", "SET_OWNER", "SET_FEATURES", "SET_MEM_TABLE",
                          "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_CALL",
                          "SET_VRING_KICK"]
    assert b.find(p.VHOST_USER_SET_FEATURES)[0].body == VERSION_1
    call = b.find(p.VHOST_USER_SET_VRING_CALL)[0]
    assert call.body == p.VHOST_USER_VRING_NOFD_MASK and call.fds == []


def test_set_features_refuses_bits_not_offered(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path)
    fe.negotiate()
    with pytest.raises(ValueError, match="does not offer"):
        fe.set_features(VERSION_1 | bit(5))
    fe.close()


def test_too_few_queues(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path, queue_num=1)
    with pytest.raises(BackendError, match="supports 1 queues, the device needs 3"):
        fe.negotiate(min_queues=3)
    fe.close()


# --- memory table and vring fds --------------------------------------------------------------
def test_set_mem_table_fds_and_layout(backend_factory, sock_path, ram):
    b, fe = start(backend_factory, sock_path)
    fe.negotiate()
    regions = [MemoryRegion(0, 0x1000, ram[0].userspace_addr, 0, ram[0].fd),
               MemoryRegion(0x100000, 0x80000, ram[0].userspace_addr + 0x4000, 0x4000, ram[0].fd),
               MemoryRegion(1 << 32, 1 << 20, ram[1].userspace_addr, 0, ram[1].fd)]
    fe.set_mem_table(regions)
    fe.close()
    b.join()
    [msg] = b.find(p.VHOST_USER_SET_MEM_TABLE)
    assert len(msg.payload) == 8 + 3 * 32
    assert msg.body.nregions == 3
    got = [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
           for r in msg.body.region_list()]
    assert got == [r[:4] for r in regions]
    assert len(msg.fds) == 3
    # each fd is the very memfd of its region, in order: the backend sees the guest's bytes
    for fd, r, tag in zip(msg.fds, regions, (0xA0, 0xA0, 0xA1)):
        assert os.fstat(fd).st_ino == os.fstat(r.fd).st_ino
        assert os.pread(fd, 1, 0) == bytes([tag])


def test_mem_table_limits(backend_factory, sock_path, ram):
    b, fe = start(backend_factory, sock_path)
    fe.negotiate()
    with pytest.raises(ValueError):
        fe.set_mem_table([])
    with pytest.raises(ValueError):
        fe.set_mem_table([ram[0]] * 9)
    fe.close()


def test_guest_memory_regions():
    class R:
        def __init__(self, gpa, size, offset):
            self.gpa, self.size, self.offset = gpa, size, offset

    class Mem:
        fd = 7
        host_addr = 0x7F0000000000
        ranges = [R(0, 0xC0000000, 0), R(1 << 32, 0x40000000, 0xC0000000)]
    assert guest_memory_regions(Mem()) == [
        MemoryRegion(0, 0xC0000000, 0x7F0000000000, 0, 7),
        MemoryRegion(1 << 32, 0x40000000, 0x7F00C0000000, 0xC0000000, 7)]


def test_ring_outside_memory_is_refused_before_sending(backend_factory, sock_path, ram):
    b, fe = start(backend_factory, sock_path)
    fe.negotiate()
    fe.set_mem_table(ram)
    fe.set_vring_num(0, 256)
    with pytest.raises(RingAddressError, match="used ring"):
        fe.set_vring_addr(0, 0x1000, 0x2000, (1 << 20) - 100)    # used ring crosses the end
    with pytest.raises(RingAddressError, match="descriptor table"):
        fe.set_vring_addr(0, 0x80000000, 0x2000, 0x3000)
    calls = []
    fe.set_vring_addr(0, 1, 2, 3, translate=lambda gpa, size: calls.append((gpa, size)) or gpa + 100)
    assert calls == [(1, 16 * 256), (2, 6 + 2 * 256), (3, 6 + 8 * 256)]
    with pytest.raises(ValueError, match="SET_VRING_NUM must come before"):
        fe.set_vring_addr(1, 0x1000, 0x2000, 0x3000)
    with pytest.raises(ValueError, match="queues"):
        fe.set_vring_num(2, 8)     # the back-end has 2 queues
    fe.close()
    b.join()
    [addr] = b.find(p.VHOST_USER_SET_VRING_ADDR)
    assert (addr.body.desc_user_addr, addr.body.avail_user_addr, addr.body.used_user_addr) == (101, 102, 103)


def test_kick_and_call_eventfds_work(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path)
    fe.negotiate()
    kick, call, err = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    try:
        fe.set_vring_kick(1, kick)
        fe.set_vring_call(1, call)
        fe.set_vring_err(1, err)
        fe.set_vring_kick(0, None)
        k, c, e = (m.fds[0] for m in b.messages[-4:-1])
        os.eventfd_write(kick, 1)          # the guest kicks (ioeventfd) ...
        assert os.eventfd_read(k) == 1     # ... the back-end sees it
        os.eventfd_write(c, 2)             # the back-end calls ...
        assert os.eventfd_read(call) == 2  # ... the irqfd side sees it
        os.eventfd_write(e, 3)
        assert os.eventfd_read(err) == 3
        assert b.messages[-1].body == p.VHOST_USER_VRING_NOFD_MASK and not b.messages[-1].fds
        assert fe.started_vrings == {0, 1}
    finally:
        fe.close()
        p.close_fds([kick, call, err])


# --- reply checking --------------------------------------------------------------------------
def test_error_ack_is_backend_error_and_connection_survives(backend_factory, sock_path, ram):
    def refuse(b, msg):
        b.reply(msg, (-22) & p.U64_MAX)     # rust-vmm style -EINVAL
    b, fe = start(backend_factory, sock_path, handlers={p.VHOST_USER_SET_MEM_TABLE: refuse})
    fe.negotiate()
    with pytest.raises(BackendError, match=r"refused VHOST_USER_SET_MEM_TABLE \(status -22"):
        fe.set_mem_table(ram)
    assert fe.connected
    assert fe.get_features() == FEATURES
    fe.close()


def test_qemu_style_error_ack(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path,
                  handlers={p.VHOST_USER_SET_VRING_NUM: lambda b, m: b.reply(m, 1)})
    fe.negotiate()
    with pytest.raises(BackendError, match="status 0x1"):
        fe.set_vring_num(0, 8)
    fe.close()


def _wrong_code(b, msg):
    p.send_message(b.conn, p.VHOST_USER_SET_OWNER, 0, reply=True)


def _short(b, msg):
    p.send_bytes(b.conn, bytes(p.VhostUserHeader(msg.request, 5, 4)) + b"\0\0\0\0")


def _not_a_reply(b, msg):
    p.send_message(b.conn, msg.request, 0)


def _fd_in_reply(b, msg):
    fd = os.eventfd(0)
    p.send_bytes(b.conn, p.encode(msg.request, 0, reply=True)[0], [fd])
    os.close(fd)


def _bad_version(b, msg):
    p.send_bytes(b.conn, bytes(p.VhostUserHeader(msg.request, 0x6, 8)) + bytes(8))


@pytest.mark.parametrize("handler,message", [
    (_wrong_code, "expected the reply to VHOST_USER_SET_VRING_BASE, got a reply to VHOST_USER_SET_OWNER"),
    (_short, "payload is 4 bytes, expected 8"),
    (_not_a_reply, "REPLY flag clear"),
    (_fd_in_reply, "file descriptors, expected 0"),
    (_bad_version, "version 2"),
])
def test_bad_reply_closes_connection(backend_factory, sock_path, handler, message):
    b, fe = start(backend_factory, sock_path, handlers={p.VHOST_USER_SET_VRING_BASE: handler})
    fe.negotiate()
    with pytest.raises(BackendError, match=message) as ei:
        fe.set_vring_base(0, 0)
    assert not isinstance(ei.value, BackendGone)
    assert not fe.connected
    with pytest.raises(BackendGone, match="connection is closed"):
        fe.get_features()


def test_wrong_explicit_reply(backend_factory, sock_path):
    """A GET_* answered with the wrong size or another request's reply."""
    b, fe = start(backend_factory, sock_path, handlers={
        p.VHOST_USER_GET_FEATURES: lambda b, m: p.send_bytes(b.conn, bytes(p.VhostUserHeader(1, 5, 4)) + bytes(4))})
    with pytest.raises(BackendError, match="reply to VHOST_USER_GET_FEATURES: a u64 payload is 4") as ei:
        fe.get_features()
    assert not isinstance(ei.value, BackendGone)


def test_get_vring_base_for_other_ring(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path, handlers={
        p.VHOST_USER_GET_VRING_BASE: lambda b, m: b.reply(m, p.VhostVringState(m.body.index + 1, 3))})
    fe.negotiate()
    with pytest.raises(BackendError, match="answered for vring 1"):
        fe.get_vring_base(0)
    fe.close()


def test_timeout(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path, timeout=0.2,
                  handlers={p.VHOST_USER_SET_VRING_NUM: lambda b, m: None})   # never answers
    fe.negotiate()
    t0 = time.monotonic()
    with pytest.raises(BackendTimeout, match=r"did not reply to VHOST_USER_SET_VRING_NUM within 0.2 s"):
        fe.set_vring_num(0, 8)
    assert time.monotonic() - t0 < 2
    assert isinstance(BackendTimeout("x"), BackendError)
    with pytest.raises(BackendGone):
        fe.set_vring_num(0, 8)


def slowly(delay: float) -> Callable:
    """A handler that answers like a well-behaved back-end, after ``delay`` seconds."""
    def handler(b: FakeBackend, msg: Message) -> None:
        time.sleep(delay)
        b.default(msg)
    return handler


def test_deadline_is_one_budget_for_a_whole_sequence(backend_factory, sock_path, ram):
    """Each reply comes well inside the per-message timeout, but the sequence as a
    whole may not take longer than its deadline: it fails part-way."""
    slow = slowly(0.05)
    b, fe = start(backend_factory, sock_path, timeout=5.0,
                  handlers={r: slow for r in (p.VHOST_USER_SET_VRING_NUM, p.VHOST_USER_SET_VRING_ADDR,
                                              p.VHOST_USER_SET_VRING_BASE)})
    fe.negotiate()
    fe.set_features(VERSION_1)
    fe.set_mem_table(ram)
    n = len(b.messages)
    with pytest.raises(BackendTimeout):
        with fe.deadline(0.2):
            for q in range(2):
                for _ in range(10):
                    fe.set_vring_num(q, 8)
                    fe.set_vring_addr(q, 0x1000, 0x2000, 0x3000)
                    fe.set_vring_base(q, 0)
    assert len(b.messages) - n < 60                                 # it stopped part-way
    assert getattr(fe._local, "deadline") is None                   # the budget ended with it


def test_deadline_spent_before_a_request_sends_nothing(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path)
    fe.negotiate()
    n = len(b.messages)
    with fe.deadline(0):
        with pytest.raises(BackendTimeout, match="ran out of time before VHOST_USER_SET_VRING_NUM"):
            fe.set_vring_num(0, 8)
        with fe.deadline(10):                                       # nested: the earlier end holds
            with pytest.raises(BackendTimeout):
                fe.set_vring_num(0, 8)
    assert len(b.messages) == n
    fe.set_vring_num(0, 8)                                          # the connection is in step
    assert b.requests[-1] == "SET_VRING_NUM"
    fe.close()


def test_backend_closes_mid_sequence(backend_factory, sock_path, ram):
    b, fe = start(backend_factory, sock_path, handlers={p.VHOST_USER_SET_MEM_TABLE: lambda b, m: "stop"})
    fe.negotiate()
    fe.set_features(VERSION_1)
    with pytest.raises(BackendGone, match="closed the connection"):
        fe.set_mem_table(ram)
    assert fe.hung_up()
    with pytest.raises(BackendGone):
        fe.set_vring_num(0, 8)


def test_backend_gone_before_send(backend_factory, sock_path):
    """Without REPLY_ACK nothing is awaited: the loss shows on a later send or GET."""
    b, fe = start(backend_factory, sock_path, protocol_features=0,
                  handlers={p.VHOST_USER_SET_OWNER: lambda b, m: "stop"})
    fe.negotiate()
    b.join()
    deadline = time.monotonic() + 2
    while not fe.hung_up() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fe.hung_up()
    with pytest.raises(BackendGone):
        for _ in range(50):            # EPIPE may need a write or two to show
            fe.set_vring_num(0, 8)
        fe.get_features()


def test_close_wakes_a_waiting_call(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path, timeout=10,
                  handlers={p.VHOST_USER_SET_VRING_NUM: lambda b, m: None})
    fe.negotiate()
    errors = []

    def call():
        try:
            fe.set_vring_num(0, 8)
        except BaseException as e:
            errors.append(e)
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    fe.close()
    t.join(timeout=3)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert isinstance(errors[0], BackendGone) and "closed by the VMM" in str(errors[0])


def test_concurrent_requests_get_their_own_replies(backend_factory, sock_path):
    def base(b, msg):
        time.sleep(0.001)
        b.reply(msg, p.VhostVringState(msg.body.index, 100 + msg.body.index))
    b, fe = start(backend_factory, sock_path, queue_num=8, handlers={p.VHOST_USER_GET_VRING_BASE: base})
    fe.negotiate()
    results: dict[int, list[int]] = {i: [] for i in range(8)}

    def worker(i):
        for _ in range(20):
            results[i].append(fe.get_vring_base(i))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == [100 + i] * 20 for i, v in results.items())
    fe.close()


# --- config, reset, back-end channel --------------------------------------------------------
def test_config(backend_factory, sock_path):
    refuse = {"on": False}

    def get_config(b, msg):
        if refuse["on"]:
            b.reply(msg, None)           # "zero length of payload to indicate an error"
        else:
            b.default(msg)
    b, fe = start(backend_factory, sock_path, handlers={p.VHOST_USER_GET_CONFIG: get_config})
    fe.negotiate()
    assert fe.get_config(4, 8) == bytes(range(4, 12))
    fe.set_config(36, b"\x02\0\0\0")
    refuse["on"] = True
    with pytest.raises(BackendError, match="refused GET_CONFIG"):
        fe.get_config(0, 4)
    assert fe.connected
    with pytest.raises(ValueError):
        fe.get_config(250, 8)
    fe.close()
    b.join()
    [s] = b.find(p.VHOST_USER_SET_CONFIG)
    assert (s.body.offset, s.body.size, s.body.flags, s.body.data) == (36, 4, 0, b"\x02\0\0\0")


def test_config_reply_for_other_range(backend_factory, sock_path):
    def get_config(b, msg):
        out = p.VhostUserConfig(offset=0, size=msg.body.size, flags=0)
        b.reply(msg, out)
    b, fe = start(backend_factory, sock_path, handlers={p.VHOST_USER_GET_CONFIG: get_config})
    fe.negotiate()
    with pytest.raises(BackendError, match="answered 0\\+4"):
        fe.get_config(4, 4)
    assert not fe.connected


@pytest.mark.parametrize("reset_device", [True, False])
def test_reset_sequence(backend_factory, sock_path, ram, reset_device):
    pf = DEFAULT_PROTOCOL_FEATURES & ~(0 if reset_device else bit(p.VHOST_USER_PROTOCOL_F_RESET_DEVICE))
    b, fe = start(backend_factory, sock_path, protocol_features=pf)
    b.bases = {0: 17, 1: 4}
    fe.negotiate()
    fe.set_features(VERSION_1)
    fe.set_mem_table(ram)
    efd = os.eventfd(0)
    try:
        for q in range(2):
            fe.setup_vring(q, size=8, desc=0x1000, avail=0x2000, used=0x3000, kick_fd=efd, call_fd=efd)
        n = len(b.messages)
        assert fe.reset_device() == {0: 17, 1: 4}
        assert fe.started_vrings == set()
        tail = b.requests[n:]
        # re-initialisation works on the same connection
        fe.set_features(VERSION_1)
        fe.set_mem_table(ram)
        fe.setup_vring(0, size=8, desc=0x1000, avail=0x2000, used=0x3000, kick_fd=efd, call_fd=efd)
        fe.close()
        b.join()
    finally:
        os.close(efd)
    expect = ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2 + (["RESET_DEVICE"] if reset_device else [])
    assert tail == expect
    disables = [m.body.num for m in b.find(p.VHOST_USER_SET_VRING_ENABLE)]
    assert disables == [1, 1, 0, 0, 1]
    assert "RESET_OWNER" not in b.requests


def test_backend_request_channel(backend_factory, sock_path, tmp_path):
    """The back-end gets a socket; a SHMEM_MAP with an fd comes back on it; the VMM acks."""
    got = {}

    def take_fd(b, msg):
        got["sock"] = socket.socket(fileno=os.dup(msg.fds[0]))
        b.default(msg)
    b, fe = start(backend_factory, sock_path, handlers={p.VHOST_USER_SET_BACKEND_REQ_FD: take_fd})
    fe.negotiate()
    vmm_end = fe.set_backend_req_fd()
    backend_end = got["sock"]
    f = tmp_path / "file"
    f.write_bytes(b"dax!" * 1024)
    fd = os.open(f, os.O_RDONLY)
    try:
        req = p.VhostUserMMap(shmid=0, fd_offset=0, shm_offset=0x200000, len=0x1000,
                              flags=p.VHOST_USER_FLAG_MAP_RW)
        p.send_message(backend_end, p.VHOST_USER_BACKEND_SHMEM_MAP, req, [fd],
                       channel=Channel.BACKEND, need_reply=True)
        msg = p.recv_message(vmm_end, channel=Channel.BACKEND, timeout=2)
        assert msg.name == "VHOST_USER_BACKEND_SHMEM_MAP" and msg.need_reply
        assert (msg.body.shm_offset, msg.body.len, msg.body.flags) == (0x200000, 0x1000, 1)
        assert os.pread(msg.fds[0], 4, 0) == b"dax!"
        msg.close_fds()
        p.send_ack(vmm_end, msg.request, 0, channel=Channel.BACKEND)
        ack = p.recv_message(backend_end, channel=Channel.BACKEND, timeout=2,
                             expect_reply_to=p.VHOST_USER_BACKEND_SHMEM_MAP)
        assert ack.body == 0
    finally:
        os.close(fd)
        vmm_end.close()
        backend_end.close()
        fe.close()


def test_backend_req_fd_failure_closes_both_ends(backend_factory, sock_path):
    b, fe = start(backend_factory, sock_path,
                  handlers={p.VHOST_USER_SET_BACKEND_REQ_FD: lambda b, m: (m.close_fds(), b.reply(m, 1))})
    fe.negotiate()
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(BackendError):
        fe.set_backend_req_fd()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    fe.close()


class ChannelRig:
    """serve_backend_requests in a thread on one end of a socketpair; the test is the back-end."""

    def __init__(self, handle):
        self.vmm, self.backend = socket.socketpair()
        self.seen: list[tuple[str, int]] = []   # (request name, fds handed to the handler)

        def wrapped(msg):
            self.seen.append((msg.name, len(msg.fds)))
            return handle(msg)
        self.result = "running"     # then what serve_backend_requests returned

        def serve():
            self.result = serve_backend_requests(self.vmm, wrapped, label="test")
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def request(self, code, payload, fds=(), need_reply=True):
        p.send_message(self.backend, code, payload, fds, channel=Channel.BACKEND, need_reply=need_reply)
        if need_reply:
            return p.recv_message(self.backend, channel=Channel.BACKEND, timeout=2, expect_reply_to=code).body
        return None

    def close(self):
        self.backend.close()
        self.thread.join(timeout=3)
        assert not self.thread.is_alive()
        self.vmm.close()


def _mmap_req(offset=0, length=0x200000, flags=1):
    return p.VhostUserMMap(shmid=0, fd_offset=0, shm_offset=offset, len=length, flags=flags)


def test_serve_backend_requests(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(bytes(4096))
    fd = os.open(f, os.O_RDONLY)
    kept = []

    def handle(msg):
        if msg.request == p.VHOST_USER_BACKEND_SHMEM_MAP:
            if msg.body.shm_offset == 0x1000:
                raise ValueError("outside the window")
            if msg.body.shm_offset == 0x2000:
                raise PermissionError(errno.EACCES, "read-only file")
            if msg.body.shm_offset == 0x3000:
                raise RuntimeError("bug")
            kept.extend(msg.take_fds())
        return 0
    rig = ChannelRig(handle)
    try:
        before = len(os.listdir("/proc/self/fd"))
        assert rig.request(p.VHOST_USER_BACKEND_SHMEM_MAP, _mmap_req(), [fd]) == 0
        assert rig.request(p.VHOST_USER_BACKEND_SHMEM_MAP, _mmap_req(0x1000), [fd]) == 2**64 - errno.EINVAL
        assert rig.request(p.VHOST_USER_BACKEND_SHMEM_MAP, _mmap_req(0x2000), [fd]) == 2**64 - errno.EACCES
        assert rig.request(p.VHOST_USER_BACKEND_SHMEM_MAP, _mmap_req(0x3000), [fd]) == 2**64 - errno.EIO
        assert rig.request(p.VHOST_USER_BACKEND_SHMEM_UNMAP, _mmap_req(), need_reply=False) is None
        # invalid: SHMEM_MAP without its fd, unknown flags, legacy FS_MAP flags, unsupported code
        p.send_bytes(rig.backend, bytes(p.VhostUserHeader(9, 1 | 8, 40)) + bytes(_mmap_req()))
        assert p.recv_message(rig.backend, channel=Channel.BACKEND, timeout=2).body == 2**64 - errno.EINVAL
        p.send_bytes(rig.backend, bytes(p.VhostUserHeader(9, 1 | 8, 40)) + bytes(_mmap_req(flags=6)), [fd])
        assert p.recv_message(rig.backend, channel=Channel.BACKEND, timeout=2).body == 2**64 - errno.EINVAL
        p.send_bytes(rig.backend, bytes(p.VhostUserHeader(1, 1 | 8, 0)))      # IOTLB_MSG
        assert p.recv_message(rig.backend, channel=Channel.BACKEND, timeout=2).body == 2**64 - errno.EINVAL
        fs = p.VhostUserFSBackendMsg()
        fs.c_offset[0], fs.len[0], fs.flags[0] = 0x200000, 0x200000, p.VHOST_USER_FS_FLAG_MAP_R
        assert rig.request(p.VHOST_USER_BACKEND_FS_MAP, fs, [fd]) == 0
        assert rig.request(p.VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, None) == 0
        # only the fd the handler kept is still open
        assert len(os.listdir("/proc/self/fd")) == before + 1
        assert rig.seen == [("VHOST_USER_BACKEND_SHMEM_MAP", 1)] * 4 + [
            ("VHOST_USER_BACKEND_SHMEM_UNMAP", 0), ("VHOST_USER_BACKEND_FS_MAP", 1),
            ("VHOST_USER_BACKEND_CONFIG_CHANGE_MSG", 0)]
        # a message that breaks the stream ends the loop
        rig.backend.send(bytes(p.VhostUserHeader(9, 1, 1 << 20)))
        rig.thread.join(timeout=3)
        assert not rig.thread.is_alive()
    finally:
        rig.close()
        os.close(fd)
        p.close_fds(kept)


def test_serve_backend_requests_ends_on_close_and_shutdown():
    rig = ChannelRig(lambda msg: 0)
    rig.close()                                   # back-end closes its end
    rig2 = ChannelRig(lambda msg: 0)
    rig2.vmm.shutdown(socket.SHUT_RDWR)           # the VMM stops the loop
    rig2.thread.join(timeout=3)
    assert not rig2.thread.is_alive()
    rig2.close()


# --- a real back-end: Debian's C virtiofsd (QEMU 7.2) ----------------------------------------
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def test_qemu_virtiofsd_interop(sock_path, ram, tmp_path):
    if not os.access(VIRTIOFSD, os.X_OK):
        pytest.skip(f"{VIRTIOFSD} is not installed (Debian qemu-system-common)")
    if os.geteuid() != 0:
        pytest.skip("the C virtiofsd needs root for its chroot sandbox")
    share = tmp_path / "share"
    share.mkdir()
    proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock_path}", "-o", f"source={share}",
                             "-o", "sandbox=chroot"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(sock_path):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "virtiofsd did not create its socket"
            time.sleep(0.02)
        fe = VhostUserFrontend(sock_path)
        features = fe.negotiate(min_queues=2)
        assert features & VERSION_1 and features & F_PROTOCOL
        assert fe.reply_ack and fe.has_protocol_feature(p.VHOST_USER_PROTOCOL_F_BACKEND_REQ)
        fe.set_features(features & (VERSION_1 | bit(28) | bit(29)))
        fe.set_mem_table(ram)
        efds = [os.eventfd(0) for _ in range(4)]
        try:
            for q in range(2):
                fe.setup_vring(q, size=64, desc=0x1000 + q * 0x4000, avail=0x2000 + q * 0x4000,
                               used=0x3000 + q * 0x4000, kick_fd=efds[2 * q], call_fd=efds[2 * q + 1])
            fe.set_backend_req_fd().close()
            assert fe.reset_device() == {0: 0, 1: 0}
            fe.setup_vring(1, size=64, desc=0x5000, avail=0x6000, used=0x7000, kick_fd=efds[0],
                           call_fd=efds[1])
            assert fe.stop_vring(1) == 0
        finally:
            fe.close()
            p.close_fds(efds)
        proc.wait(timeout=5)     # the C virtiofsd serves one connection, then exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_bad_header_is_refused_and_serving_goes_on(tmp_path):
    """Version 0 (or a reserved flag bit) in a request whose size is sane: that request
    gets a failure ack, the channel stays open and the next FS_MAP is served."""
    rig = ChannelRig(lambda msg: 0)
    try:
        for flags in (0 | 8, 2 | 8, 1 | 0x20 | 8):
            p.send_bytes(rig.backend, bytes(p.VhostUserHeader(9, flags, 40)) + bytes(_mmap_req()))
            ack = p.recv_message(rig.backend, channel=Channel.BACKEND, timeout=2,
                                 expect_reply_to=p.VHOST_USER_BACKEND_SHMEM_MAP)
            assert ack.body == 2**64 - errno.EINVAL
        p.send_bytes(rig.backend, bytes(p.VhostUserHeader(10, 0, 40)) + bytes(_mmap_req()))  # no reply asked
        assert rig.request(p.VHOST_USER_BACKEND_SHMEM_UNMAP, _mmap_req()) == 0
        assert rig.seen == [("VHOST_USER_BACKEND_SHMEM_UNMAP", 0)]
        assert rig.thread.is_alive()
    finally:
        rig.close()
    assert rig.result is None          # the back-end closed at a message boundary


@pytest.mark.parametrize("breakage", ["oversized", "short read"])
def test_untrusted_stream_closes_the_channel_at_once(breakage):
    """A size beyond the protocol maximum, or a message cut short: the VMM shuts the
    channel down (a back-end waiting for an ack sees the end at once) and says why."""
    rig = ChannelRig(lambda msg: 0)
    try:
        if breakage == "oversized":
            rig.backend.send(bytes(p.VhostUserHeader(9, 1 | 8, p.MAX_PAYLOAD_SIZE + 1)))
        else:
            rig.backend.send(bytes(p.VhostUserHeader(9, 1 | 8, 40)) + bytes(10))
            rig.backend.shutdown(socket.SHUT_WR)
        rig.thread.join(timeout=3)
        assert not rig.thread.is_alive()
        assert rig.result and ("exceeds" in rig.result or "middle of a message" in rig.result)
        rig.backend.settimeout(2)
        assert rig.backend.recv(16) == b""      # EOF now, not a wait for an ack
    finally:
        rig.close()
