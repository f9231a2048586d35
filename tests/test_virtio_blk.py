"""virtio-blk device model: requests against a temporary raw image, no KVM.

Chains are built by hand in a real ``GuestMemory`` and handed to the device
through a fake queue; one test at the end goes through a real split
``Virtqueue`` laid out in guest RAM.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import pytest

from pyvmm.devices.virtio import blk as blkmod
from pyvmm.devices.virtio.blk import (
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VirtioBlock)
from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.queue import Buffer, ChainError, DescriptorChain, VirtqueueError
from pyvmm.memory import GuestMemory
from virtio_fakes import FakeQueue

MEM_SIZE = 4 << 20
OUTSIDE = MEM_SIZE + 0x1000          # a guest-physical address that is not RAM
IMAGE_SECTORS = 128                  # 64 KiB image
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD) \
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES)


# --- test doubles ------------------------------------------------------------------------------


class Guest:
    """Guest RAM with a bump allocator for request buffers."""

    def __init__(self) -> None:
        self.mem = GuestMemory(MEM_SIZE)
        self.next = 0x10000

    def buf(self, data: bytes | int) -> Buffer:
        """A buffer holding ``data``, or ``data`` bytes of 0xEE when an int."""
        content = bytes([0xEE]) * data if isinstance(data, int) else bytes(data)
        gpa = self.next
        self.next += (len(content) + 0xFFF) & ~0xFFF or 0x1000
        assert self.next < MEM_SIZE
        self.mem.write(gpa, content)
        return Buffer(gpa, len(content))

    def read(self, buf: Buffer) -> bytes:
        return self.mem.read(buf.gpa, buf.length)


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.mem.close()   # fails if the device leaked a view of guest RAM


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SECTORS * 512))
    return path


class Harness:
    def __init__(self, dev: VirtioBlock, guest: Guest, features: int = FEATURES) -> None:
        self.dev, self.guest, self.q = dev, guest, FakeQueue()
        self.notified: list[int] = []
        self.resets = 0
        dev.needs_reset = self._needs_reset
        dev.activate(guest.mem, [self.q], self.notified.append, features)
        self.head = 0

    def _needs_reset(self) -> None:
        self.resets += 1

    def submit(self, readable: list[Buffer], writable: list[Buffer]) -> int:
        """Queue one chain, process the queue; the chain's (head, written) must be the last used."""
        head = self.head
        self.head += 1
        self.q.add(DescriptorChain(head, readable, writable))
        self.dev.process_queue(0)
        assert self.q.used[-1][0] == head
        return self.q.used[-1][1]

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0) -> tuple[int, bytes, int]:
        """A request with header, data and status in separate buffers: (status, data in, written)."""
        g = self.guest
        readable = [g.buf(header(rtype, sector))] + ([g.buf(out)] if out else [])
        data = [g.buf(in_len)] if in_len else []
        status = g.buf(b"\xAA")
        written = self.submit(readable, data + [status])
        return g.read(status)[0], (g.read(data[0]) if data else b""), written


@pytest.fixture
def dev(image):
    d = VirtioBlock(str(image))
    yield d
    d.close()


@pytest.fixture
def h(dev, guest):
    return Harness(dev, guest)


# --- construction, features, configuration space ----------------------------------------------
def test_capacity_features_and_config(dev, image):
    assert dev.device_id == 2 and dev.num_queues == 1
    assert dev.capacity == IMAGE_SECTORS
    f = dev.device_features()
    for bit in (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
                VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> bit & 1
    assert not f >> VIRTIO_BLK_F_RO & 1
    cfg = dev.config_bytes()
    assert len(cfg) == 60
    assert struct.unpack_from("<Q", cfg, 0)[0] == IMAGE_SECTORS      # capacity
    assert struct.unpack_from("<I", cfg, 12)[0] == dev.queue_max_size - 2   # seg_max
    assert struct.unpack_from("<I", cfg, 20)[0] == 512               # blk_size
    assert cfg[32] == 0 and cfg[33] == 0                             # writeback, unused0
    max_discard, discard_seg, align, max_wz, wz_seg = struct.unpack_from("<5I", cfg, 36)
    assert max_discard > 0 and discard_seg > 0 and align > 0 and max_wz > 0 and wz_seg > 0
    assert cfg[56] == 1 and cfg[57:60] == b"\0\0\0"                  # write_zeroes_may_unmap, unused1
    assert dev.config_read(0, 8) == struct.pack("<Q", IMAGE_SECTORS)
    assert dev.config_read(20, 4) == struct.pack("<I", 512)
    assert dev.config_read(60, 4) == b"\0" * 4                       # secure erase: not offered


def test_readonly_features_and_config(image):
    d = VirtioBlock(str(image), readonly=True)
    try:
        f = d.device_features()
        assert f >> VIRTIO_BLK_F_RO & 1
        assert not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
        assert fcntl.fcntl(d.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert struct.unpack_from("<5I", d.config_bytes(), 36) == (0, 0, 0, 0, 0)
    finally:
        d.close()


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "No such file"),
    (lambda p: p.write_bytes(b"x" * 1000), "multiple of 512"),
    (lambda p: p.mkdir(), "disk image"),
])
def test_bad_images_raise_value_error(tmp_path, make, words):
    p = tmp_path / "img"
    make(p)
    with pytest.raises(ValueError, match=words):
        VirtioBlock(str(p))


def test_unreadable_image(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    p = tmp_path / "img"
    p.write_bytes(bytes(512))
    p.chmod(0)
    with pytest.raises(ValueError, match="Permission denied"):
        VirtioBlock(str(p))


def test_image_in_use_by_a_writer(image):
    a = VirtioBlock(str(image))
    try:
        with pytest.raises(ValueError, match="in use"):
            VirtioBlock(str(image))
        with pytest.raises(ValueError, match="in use"):
            VirtioBlock(str(image), readonly=True)
    finally:
        a.close()
    VirtioBlock(str(image)).close()   # free again after close
    r1, r2 = VirtioBlock(str(image), readonly=True), VirtioBlock(str(image), readonly=True)
    r1.close()
    r2.close()


def test_empty_image_is_a_zero_capacity_disk(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    d = VirtioBlock(str(p))
    assert d.capacity == 0
    d.close()
    d.close()   # idempotent


# --- reads and writes --------------------------------------------------------------------------
def test_write_then_read_round_trip(h, image):
    data = os.urandom(1024)
    status, _, written = h.request(VIRTIO_BLK_T_OUT, sector=4, out=data)
    assert (status, written) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[4 * 512:6 * 512] == data
    status, got, written = h.request(VIRTIO_BLK_T_IN, sector=4, in_len=1024)
    assert (status, got, written) == (VIRTIO_BLK_S_OK, data, 1025)
    assert h.notified and set(h.notified) == {0}


def test_read_matches_image(h, image):
    content = image.read_bytes()
    status, got, _ = h.request(VIRTIO_BLK_T_IN, sector=IMAGE_SECTORS - 2, in_len=1024)
    assert status == VIRTIO_BLK_S_OK and got == content[-1024:]


def test_any_framing(h, guest, image):
    """Header and data share buffers, data straddles buffers, status shares the last one."""
    data = os.urandom(1536)
    blob = header(VIRTIO_BLK_T_OUT, 10) + data
    readable = [guest.buf(blob[:5]), guest.buf(blob[5:700]), guest.buf(blob[700:])]
    status = guest.buf(1)
    assert h.submit(readable, [status]) == 1
    assert guest.read(status) == b"\0"
    assert image.read_bytes()[10 * 512:13 * 512] == data

    readable = [guest.buf(header(VIRTIO_BLK_T_IN, 10))]
    writable = [guest.buf(100), guest.buf(1000), guest.buf(437)]   # 1536 data + 1 status
    assert h.submit(readable, writable) == 1537
    got = b"".join(guest.read(b) for b in writable)
    assert got[:1536] == data and got[1536] == VIRTIO_BLK_S_OK


def test_many_segments(h, guest, image):
    """More pieces than one preadv takes at once is not this test; many small ones are."""
    data = os.urandom(4096)
    readable = [guest.buf(header(VIRTIO_BLK_T_OUT, 0))] + [guest.buf(data[i:i + 16]) for i in range(0, 4096, 16)]
    status = guest.buf(1)
    h.submit(readable, [status])
    assert guest.read(status) == b"\0"
    assert image.read_bytes()[:4096] == data


def test_beyond_capacity_is_ioerr_and_writes_nothing(h, image):
    before = image.read_bytes()
    for sector in (IMAGE_SECTORS - 1, IMAGE_SECTORS, 2**64 - 1):
        status, _, written = h.request(VIRTIO_BLK_T_OUT, sector=sector, out=os.urandom(1024))
        assert (status, written) == (VIRTIO_BLK_S_IOERR, 1)
        status, _, written = h.request(VIRTIO_BLK_T_IN, sector=sector, in_len=1024)
        assert (status, written) == (VIRTIO_BLK_S_IOERR, 0)
    assert image.read_bytes() == before
    status, _, _ = h.request(VIRTIO_BLK_T_IN, sector=IMAGE_SECTORS - 2, in_len=1024)
    assert status == VIRTIO_BLK_S_OK


def test_write_through_without_negotiated_flush(dev, guest, monkeypatch):
    synced = []
    monkeypatch.setattr(blkmod.os, "fdatasync", lambda fd: synced.append(fd))
    h = Harness(dev, guest, features=1 << VIRTIO_F_VERSION_1)
    assert h.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_OK
    assert synced == [dev.fd]
    h2 = Harness(dev, guest)   # FLUSH negotiated: the driver flushes when it wants
    synced.clear()
    assert h2.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_OK
    assert synced == []


# --- read-only ---------------------------------------------------------------------------------
def test_readonly_refuses_writes(image, guest):
    os.utime(image, (1_000_000_000, 1_000_000_000))
    before, mtime = image.read_bytes(), os.stat(image).st_mtime_ns
    d = VirtioBlock(str(image), readonly=True)
    try:
        h = Harness(d, guest, features=(1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_RO))
        assert h.request(VIRTIO_BLK_T_OUT, 0, out=bytes(1024))[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_DISCARD, out=segment(0, 8))[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 8))[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 8, 1))[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        status, got, _ = h.request(VIRTIO_BLK_T_IN, 0, in_len=1024)
        assert status == VIRTIO_BLK_S_OK and got == before[:1024]
    finally:
        d.close()
    assert image.read_bytes() == before
    assert os.stat(image).st_mtime_ns == mtime


# --- flush, get id, unsupported ----------------------------------------------------------------
def test_flush(h, dev, monkeypatch):
    synced = []
    monkeypatch.setattr(blkmod.os, "fsync", lambda fd: synced.append(fd))
    status, _, written = h.request(VIRTIO_BLK_T_FLUSH)
    assert (status, written) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [dev.fd]


def test_flush_error_is_ioerr(h, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "disk on fire")
    monkeypatch.setattr(blkmod.os, "fsync", fail)
    assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR
    monkeypatch.undo()
    assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


def test_get_id(h):
    status, got, written = h.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == VIRTIO_BLK_S_OK and written == 21
    assert got == b"pyvmm-disk.img".ljust(20, b"\0")
    status, got, written = h.request(VIRTIO_BLK_T_GET_ID, in_len=512)   # a bigger buffer: 20 bytes
    assert status == VIRTIO_BLK_S_OK and written == 20
    assert got[:20] == b"pyvmm-disk.img".ljust(20, b"\0") and got[20:] == b"\xee" * 492


def test_get_id_long_name_and_short_buffer(tmp_path, guest):
    p = tmp_path / ("a-very-long-image-name-\u00e9.img")
    p.write_bytes(bytes(512))
    d = VirtioBlock(str(p))
    try:
        h = Harness(d, guest)
        status, got, written = h.request(VIRTIO_BLK_T_GET_ID, in_len=20)
        assert status == VIRTIO_BLK_S_OK and got == b"pyvmm-a-very-long-im" and written == 21
        status, got, written = h.request(VIRTIO_BLK_T_GET_ID, in_len=4)
        assert status == VIRTIO_BLK_S_OK and got == b"pyvm" and written == 5
        assert h.request(VIRTIO_BLK_T_GET_ID)[0] == VIRTIO_BLK_S_IOERR   # no room for the id
    finally:
        d.close()
    d = VirtioBlock(str(p), serial="s\u00e9rial")
    try:
        assert Harness(d, guest).request(VIRTIO_BLK_T_GET_ID, in_len=20)[1] == b"s_rial".ljust(20, b"\0")
    finally:
        d.close()


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 15, 0xFFFFFFFF])
def test_unsupported_types(h, rtype):
    status, _, written = h.request(rtype, in_len=512)
    assert status == VIRTIO_BLK_S_UNSUPP and written == 0   # the 512 data bytes before the status: not written
    status, _, written = h.request(rtype)
    assert status == VIRTIO_BLK_S_UNSUPP and written == 1


# --- discard and write zeroes ------------------------------------------------------------------
@pytest.mark.parametrize("rtype, flags", [
    (VIRTIO_BLK_T_DISCARD, 0),
    (VIRTIO_BLK_T_WRITE_ZEROES, 0),
    (VIRTIO_BLK_T_WRITE_ZEROES, 1),
])
@pytest.mark.parametrize("fallocate_works", [True, False])
def test_discard_and_write_zeroes_zero_the_range(h, image, monkeypatch, rtype, flags, fallocate_works):
    if not fallocate_works:
        def refuse(fd, mode, offset, length):
            raise OSError(errno.EOPNOTSUPP, "not here")
        monkeypatch.setattr(blkmod, "fallocate", refuse)
    before = image.read_bytes()
    status, _, written = h.request(rtype, out=segment(3, 5, flags) + segment(20, 1, flags))
    assert (status, written) == (VIRTIO_BLK_S_OK, 1)
    after = image.read_bytes()
    assert len(after) == len(before)
    expected = bytearray(before)
    expected[3 * 512:8 * 512] = bytes(5 * 512)
    expected[20 * 512:21 * 512] = bytes(512)
    assert after == bytes(expected)


def test_discard_write_zeroes_errors(h, image):
    before = image.read_bytes()
    # the unmap flag on a discard, and unknown flags: UNSUPP (5.2.6.2)
    assert h.request(VIRTIO_BLK_T_DISCARD, out=segment(0, 8, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert h.request(VIRTIO_BLK_T_DISCARD, out=segment(0, 8, 2))[0] == VIRTIO_BLK_S_UNSUPP
    assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 8, 0x80000001))[0] == VIRTIO_BLK_S_UNSUPP
    # a later segment beyond the capacity fails the request before any segment is applied
    bad = segment(0, 8) + segment(IMAGE_SECTORS - 1, 2)
    assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=bad)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_DISCARD, out=segment(2**64 - 1, 2))[0] == VIRTIO_BLK_S_IOERR
    # malformed segment lists
    assert h.request(VIRTIO_BLK_T_DISCARD)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_DISCARD, out=segment(0, 8)[:12])[0] == VIRTIO_BLK_S_IOERR
    too_many = segment(0, 1) * (blkmod.MAX_DISCARD_SEG + 1)
    assert h.request(VIRTIO_BLK_T_DISCARD, out=too_many)[0] == VIRTIO_BLK_S_IOERR
    huge = segment(0, blkmod.MAX_WRITE_ZEROES_SECTORS + 1)
    assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, out=huge)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_oversized_segment_list_is_refused_before_it_is_copied(h, guest, image, monkeypatch, rtype):
    """The descriptors of one chain may all point at the same guest pages: a segment
    list longer than max_*_seg segments is refused by its length, nothing copied."""
    before = image.read_bytes()
    page = guest.buf(segment(0, 1) * 4096)                  # 64 KiB of segments
    copied = []
    real_read = guest.mem.read
    monkeypatch.setattr(guest.mem, "read", lambda gpa, n: copied.append(n) or real_read(gpa, n))
    readable = [guest.buf(header(rtype))] + [page] * 64      # "4 MiB" of segments
    status = guest.buf(b"\xAA")
    h.submit(readable, [status])
    assert sum(copied) <= blkmod.REQ_HEADER_SIZE
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


# --- malformed requests fail alone --------------------------------------------------------------
def test_malformed_requests_fail_only_themselves(h, guest, image):
    before = image.read_bytes()
    ok = lambda: h.request(VIRTIO_BLK_T_IN, 1, in_len=512)[0] == VIRTIO_BLK_S_OK  # noqa: E731

    # header too short
    status = guest.buf(1)
    assert h.submit([guest.buf(header(VIRTIO_BLK_T_IN)[:8])], [guest.buf(512), status]) == 0
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    assert ok()
    # no header at all
    status = guest.buf(1)
    h.submit([], [status])
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    # no status byte: nothing to report with, completed with 0 bytes, and not executed
    assert h.submit([guest.buf(header(VIRTIO_BLK_T_OUT, 0)), guest.buf(512)], []) == 0
    assert h.submit([guest.buf(header(VIRTIO_BLK_T_OUT, 0) + bytes(512))], []) == 0
    assert ok()
    # data lengths that are not whole sectors
    assert h.request(VIRTIO_BLK_T_IN, 0, in_len=100)[0] == VIRTIO_BLK_S_IOERR
    assert h.request(VIRTIO_BLK_T_OUT, 0, out=bytes(513))[0] == VIRTIO_BLK_S_IOERR
    assert ok()
    # data buffers outside guest RAM
    status = guest.buf(1)
    assert h.submit([guest.buf(header(VIRTIO_BLK_T_IN, 0))], [Buffer(OUTSIDE, 512), status]) == 0
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    status = guest.buf(1)
    h.submit([guest.buf(header(VIRTIO_BLK_T_OUT, 0)), Buffer(OUTSIDE, 512)], [status])
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    status = guest.buf(1)
    h.submit([Buffer(OUTSIDE, 16)], [status])
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    # a buffer straddling the end of RAM
    status = guest.buf(1)
    h.submit([guest.buf(header(VIRTIO_BLK_T_IN, 0))], [Buffer(MEM_SIZE - 256, 512), status])
    assert guest.read(status)[0] == VIRTIO_BLK_S_IOERR
    # the status byte outside guest RAM: the write is not done
    assert h.submit([guest.buf(header(VIRTIO_BLK_T_OUT, 0)), guest.buf(512)], [Buffer(OUTSIDE, 1)]) == 0
    assert ok()
    assert image.read_bytes() == before
    assert h.resets == 0


def test_chain_error_and_ring_error(h, guest):
    h.q.add(ChainError(7, "loop"))
    h.dev.process_queue(0)
    assert h.q.used == [(7, 0)] and h.notified == [0]
    # a broken ring: NEEDS_RESET, and the queue is left alone until reset
    h.q.add(VirtqueueError("avail idx jumped"))
    h.dev.process_queue(0)
    assert h.resets == 1 and h.notified == [0]
    h.q.add(DescriptorChain(1, [guest.buf(header(VIRTIO_BLK_T_FLUSH))], [guest.buf(1)]))
    h.dev.process_queue(0)
    assert h.q.used == [(7, 0)]
    h.dev.reset()
    h.dev.activate(guest.mem, [h.q], h.notified.append, FEATURES)
    h.dev.process_queue(0)
    assert h.q.used == [(7, 0), (1, 1)]


def test_push_failure_is_a_ring_error(h, guest):
    def broken_push(head, written):
        raise VirtqueueError("used ring unwritable")
    h.q.push = broken_push
    h.q.add(DescriptorChain(0, [guest.buf(header(VIRTIO_BLK_T_FLUSH))], [guest.buf(1)]))
    h.dev.process_queue(0)
    assert h.resets == 1


def test_notify_once_per_batch_and_not_when_idle(h, guest):
    h.dev.process_queue(0)
    assert h.notified == []
    for i in range(3):
        h.q.add(DescriptorChain(i, [guest.buf(header(VIRTIO_BLK_T_FLUSH))], [guest.buf(1)]))
    h.dev.process_queue(0)
    assert [u[0] for u in h.q.used] == [0, 1, 2] and h.notified == [0]


def test_not_activated_or_other_queue(dev):
    dev.process_queue(0)   # no queues yet: nothing happens
    dev.process_queue(5)


def test_unexpected_error_still_completes(h, monkeypatch):
    monkeypatch.setattr(VirtioBlock, "_check_range", lambda *a: 1 / 0)
    status, _, written = h.request(VIRTIO_BLK_T_IN, 0, in_len=512)
    assert (status, written) == (VIRTIO_BLK_S_IOERR, 0)
    status, _, written = h.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))
    assert (status, written) == (VIRTIO_BLK_S_IOERR, 1)


def test_closed_image(h, dev):
    dev.close()
    assert h.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_IOERR


# --- through a real split virtqueue ---------------------------------------------------------------
def test_through_real_virtqueue(dev, guest, image):
    from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue
    mem = guest.mem
    q = Virtqueue(mem, 8)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = 8, 0x1000, 0x2000, 0x3000
    q.check()
    q.ready = True
    notified = []
    dev.activate(mem, [q], notified.append, FEATURES)

    hdr, data, status = guest.buf(header(VIRTIO_BLK_T_IN, 2)), guest.buf(1024), guest.buf(1)
    descs = [(hdr, VIRTQ_DESC_F_NEXT, 1), (data, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
             (status, VIRTQ_DESC_F_WRITE, 0)]
    for i, (b, flags, nxt) in enumerate(descs):
        mem.write(0x1000 + 16 * i, struct.pack("<QIHH", b.gpa, b.length, flags, nxt))
    mem.write(0x2000, struct.pack("<HHH", 0, 1, 0))   # flags, idx = 1, ring[0] = head 0
    dev.process_queue(0)

    assert guest.read(status) == b"\0"
    assert guest.read(data) == image.read_bytes()[1024:2048]
    used_idx, = struct.unpack("<H", mem.read(0x3002, 2))
    used_id, used_len = struct.unpack("<II", mem.read(0x3004, 8))
    assert (used_idx, used_id, used_len) == (1, 0, 1025)
    assert notified == [0]
