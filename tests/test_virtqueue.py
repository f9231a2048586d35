"""Split virtqueue, device side: pyvmm.devices.virtio.queue (virtio v1.2, 2.7).

No KVM: a real GuestMemory (a 4 MiB memfd) plays guest RAM and a small
driver-side helper lays out the rings the way a guest driver would.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.queue import (
    CHAIN_READ_MAX,
    INDIRECT_MIN_CAP,
    VIRTIO_MSI_NO_VECTOR,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Buffer,
    ChainError,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from pyvmm.memory import GuestMemory, GuestMemoryError

RAM = 4 << 20
DESC, AVAIL, USED = 0x10000, 0x20000, 0x30000
INDIRECT = 0x40000          # indirect tables
DATA = 0x100000             # data buffers


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory(RAM)
    yield m
    m.close()


class Driver:
    """The driver side of a split ring: lays it out and adds chains."""

    def __init__(self, mem, size=8, event_idx=False, max_size=256,
                 desc=DESC, avail=AVAIL, used=USED, start_idx=0):
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = desc, avail, used
        mem.write(desc, bytes(desc_table_size(size)))
        mem.write(avail, bytes(avail_ring_size(size)))
        mem.write(used, bytes(used_ring_size(size)))
        self.avail_idx = start_idx
        self.set_avail_idx(start_idx)
        self.next_free = 0
        self.next_indirect = INDIRECT
        q = Virtqueue(mem, max_size)
        q.size, q.desc_addr, q.driver_addr, q.device_addr = size, desc, avail, used
        q.event_idx = event_idx
        q.check()
        q.ready = True
        q.last_avail_idx = start_idx
        self.q = q

    # raw ring access
    def write_desc(self, i, addr, length, flags=0, nxt=0, table=None):
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def set_avail_idx(self, idx):
        self.mem.write(self.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def set_avail_flags(self, flags):
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, idx):
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", idx & 0xFFFF))

    def publish(self, head):
        """Put ``head`` into the next avail slot and bump avail idx."""
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def used_flags(self):
        return struct.unpack("<H", self.mem.read(self.used, 2))[0]

    def used_elem(self, slot):
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))

    def avail_event(self):
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    # chains
    def add(self, out=(), in_=(), indirect=False, publish=True):
        """Add a chain of (gpa, len) buffers: ``out`` device-readable, ``in_`` writable."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_]
        if indirect:
            table = self.next_indirect
            self.next_indirect += 16 * len(bufs)
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), i + 1, table=table)
            head = self._alloc()
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            idxs = [self._alloc() for _ in bufs]
            for k, (i, (a, n, f)) in enumerate(zip(idxs, bufs)):
                last = k == len(bufs) - 1
                self.write_desc(i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else idxs[k + 1])
            head = idxs[0]
        if publish:
            self.publish(head)
        return head

    def _alloc(self):
        i = self.next_free % self.size
        self.next_free += 1
        return i


# --- layouts -----------------------------------------------------------------------------

def test_area_sizes():
    assert desc_table_size(256) == 4096
    assert avail_ring_size(256) == 6 + 512
    assert used_ring_size(256) == 6 + 2048


def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(4, 7, 2)            # 4 in [2, 7)
    assert not vring_need_event(7, 7, 2)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
    assert not vring_need_event(5, 5, 5)        # nothing new


# --- pop / push --------------------------------------------------------------------------

def test_pop_direct_chain(mem):
    d = Driver(mem)
    mem.write(DATA, b"hello ")
    mem.write(DATA + 0x1000, b"world")
    head = d.add(out=[(DATA, 6), (DATA + 0x1000, 5)], in_=[(DATA + 0x2000, 3), (DATA + 0x3000, 100)])
    assert d.q.has_pending()
    c = d.q.pop()
    assert c.head == head
    assert c.readable == [Buffer(DATA, 6), Buffer(DATA + 0x1000, 5)]
    assert c.writable == [Buffer(DATA + 0x2000, 3), Buffer(DATA + 0x3000, 100)]
    assert c.readable_len() == 11 and c.writable_len() == 103
    assert c.read(mem, 0, 11) == b"hello world"
    assert c.read(mem, 4, 4) == b"o wo"
    assert c.read(mem, 10, 5) == b"d"
    assert c.read(mem, 11, 5) == b""
    assert c.read(mem, 9, 100) == b"ld"          # short at the end
    assert c.write(mem, b"abcdef") == 6
    assert mem.read(DATA + 0x2000, 3) == b"abc" and mem.read(DATA + 0x3000, 3) == b"def"
    assert c.write(mem, b"XY", offset=2) == 2
    assert mem.read(DATA + 0x2000, 3) == b"abX" and mem.read(DATA + 0x3000, 1) == b"Y"
    assert not d.q.has_pending()
    assert d.q.pop() is None


def test_pop_indirect_chain(mem):
    d = Driver(mem)
    head = d.add(out=[(DATA, 16)], in_=[(DATA + 0x100, 32), (DATA + 0x200, 1)], indirect=True)
    c = d.q.pop()
    assert c.head == head
    assert c.readable == [Buffer(DATA, 16)]
    assert c.writable == [Buffer(DATA + 0x100, 32), Buffer(DATA + 0x200, 1)]


def test_direct_descriptors_before_indirect(mem):
    """2.7.5.3.2: zero or more normal descriptors, then one indirect; its WRITE flag is ignored."""
    d = Driver(mem)
    d.write_desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)
    d.write_desc(0, DATA + 8, 8, VIRTQ_DESC_F_NEXT, 1, table=INDIRECT)
    d.write_desc(1, DATA + 16, 8, VIRTQ_DESC_F_WRITE, 0, table=INDIRECT)
    d.publish(0)
    c = d.q.pop()
    assert c.readable == [Buffer(DATA, 8), Buffer(DATA + 8, 8)]
    assert c.writable == [Buffer(DATA + 16, 8)]


def test_zero_length_buffers_skipped(mem):
    d = Driver(mem)
    d.write_desc(0, 0xFFFF_FFFF_FFFF_FFFF, 0, VIRTQ_DESC_F_NEXT, 1)   # wild address, no bytes
    d.write_desc(1, DATA, 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    d.write_desc(2, RAM + 0x1000, 0, 0)                               # readable after writable, but empty
    d.publish(0)
    c = d.q.pop()
    assert c.readable == [] and c.writable == [Buffer(DATA, 4)]


def test_longest_chains(mem):
    d = Driver(mem, size=16)
    head = d.add(out=[(DATA + i, 1) for i in range(16)])
    assert len(d.q.pop().readable) == 16 and head == 0
    d2 = Driver(mem, size=4)
    d2.add(in_=[(DATA + i, 1) for i in range(INDIRECT_MIN_CAP)], indirect=True)
    assert len(d2.q.pop().writable) == INDIRECT_MIN_CAP


def test_push_and_used_ring(mem):
    d = Driver(mem, size=4)
    heads = [d.add(in_=[(DATA + 0x100 * i, 0x100)]) for i in range(3)]
    chains = [d.q.pop() for _ in range(3)]
    assert [c.head for c in chains] == heads
    d.q.push(chains[1].head, 7)
    assert d.used_idx() == 1 and d.used_elem(0) == (heads[1], 7)
    d.q.push(chains[0].head, 0)
    d.q.push(chains[2].head, 0x100)
    assert d.used_idx() == 3 and d.q.used_idx == 3
    assert [d.used_elem(i) for i in range(3)] == [(heads[1], 7), (heads[0], 0), (heads[2], 0x100)]
    # the used ring wraps at size: used idx 3, 4, 5 go to slots 3, 0, 1
    for n in (10, 11, 12):
        d.add(in_=[(DATA, 0x100)])
        d.q.push(d.q.pop().head, n)
    assert d.used_idx() == 6
    assert [d.used_elem(i)[1] for i in (3, 0, 1, 2)] == [10, 11, 12, 0x100]
    with pytest.raises(ValueError):
        d.q.push(4, 0)
    with pytest.raises(ValueError):
        d.q.push(0, 1 << 32)


def test_avail_index_wraparound(mem):
    d = Driver(mem, size=4, start_idx=0xFFFE)
    for rnd in range(3):   # 0xfffe .. 0xffff, 0, 1, ...
        heads = [d.add(out=[(DATA + rnd, 1 + k)]) for k in range(3)]
        got = [d.q.pop() for _ in range(3)]
        assert [c.head for c in got] == heads
        assert [c.readable[0].length for c in got] == [1, 2, 3]
        assert d.q.pop() is None
        for c in got:
            d.q.push(c.head, 0)
    assert d.q.last_avail_idx == (0xFFFE + 9) & 0xFFFF


def test_used_index_wraparound(mem):
    d = Driver(mem, size=2)
    for _ in range(0x10003):
        d.q.push(1, 5)
    assert d.used_idx() == 3 and d.q.used_idx == 3
    assert d.used_elem(0) == (1, 5)


# --- notifications -------------------------------------------------------------------------

def test_should_notify_without_event_idx(mem):
    d = Driver(mem)
    q = d.q
    assert not q.should_interrupt()          # nothing pushed yet
    d.add(in_=[(DATA, 1)])
    q.push(q.pop().head, 1)
    assert q.should_interrupt()
    assert not q.should_interrupt()          # already answered for that push
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    d.add(in_=[(DATA, 1)])
    q.push(q.pop().head, 1)
    assert not q.should_interrupt()
    d.set_avail_flags(0)
    q.push(0, 0)
    q.push(1, 0)
    assert q.should_interrupt()


def test_should_notify_event_idx(mem):
    d = Driver(mem, size=8, event_idx=True)
    q = d.q
    d.set_used_event(0)
    q.push(0, 0)                          # used idx 0 -> 1 crosses used_event 0
    assert q.should_interrupt()
    d.set_used_event(4)                   # "interrupt me once entry 4 is used" (idx 5)
    q.push(0, 0); q.push(0, 0)            # 1 -> 3
    assert not q.should_interrupt()
    q.push(0, 0)                          # 3 -> 4
    assert not q.should_interrupt()
    q.push(0, 0); q.push(0, 0); q.push(0, 0)   # 4 -> 7: several pushes crossing 4 between checks
    assert q.should_interrupt()
    q.push(0, 0)                          # 7 -> 8, event 4 long past
    assert not q.should_interrupt()
    assert not q.should_interrupt()          # nothing new
    # NO_INTERRUPT is ignored with EVENT_IDX
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    d.set_used_event(8)
    q.push(0, 0)
    assert q.should_interrupt()


def test_should_notify_event_idx_across_wrap(mem):
    d = Driver(mem, size=2, event_idx=True)
    q = d.q
    d.set_used_event(0xFFFE)
    for _ in range(0xFFFD):
        q.push(0, 0)
    assert not q.should_interrupt()          # used idx 0xfffd, event 0xfffe not reached
    q.push(0, 0); q.push(0, 0); q.push(0, 0)   # 0xfffd -> 0 crosses 0xfffe
    assert q.used_idx == 0
    assert q.should_interrupt()
    d.set_used_event(0)
    q.push(0, 0)                          # 0 -> 1
    assert q.should_interrupt()


def test_set_notification_without_event_idx(mem):
    d = Driver(mem)
    d.q.set_kicks_enabled(False)
    assert d.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    d.q.set_kicks_enabled(True)
    assert d.used_flags() == 0


def test_set_notification_event_idx(mem):
    d = Driver(mem, event_idx=True)
    q = d.q
    d.add(in_=[(DATA, 1)])
    d.add(in_=[(DATA, 1)])
    q.set_kicks_enabled(True)
    assert d.avail_event() == 2 and d.used_flags() == 0
    q.set_kicks_enabled(False)
    d.add(in_=[(DATA, 1)])
    assert q.pop() and q.pop() and q.pop()
    assert q.pop() is None
    assert d.avail_event() == 2            # disabled: pop publishes nothing
    q.set_kicks_enabled(True)
    assert d.avail_event() == 3
    d.add(in_=[(DATA, 1)])
    assert q.pop().head is not None
    assert q.pop() is None                 # empty ring: avail_event = 4 published
    assert d.avail_event() == 4
    assert d.used_flags() == 0


def test_pop_on_empty_ring_without_event_idx_writes_nothing(mem):
    d = Driver(mem)
    mem.write(d.used + 4 + 8 * d.size, b"\x34\x12")
    assert d.q.pop() is None
    assert d.avail_event() == 0x1234


# --- life cycle ----------------------------------------------------------------------------

def test_not_ready(mem):
    d = Driver(mem)
    d.add(in_=[(DATA, 1)])
    d.q.ready = False
    assert d.q.pop() is None
    assert not d.q.has_pending()
    d.q.push(0, 1)                          # dropped
    assert d.used_idx() == 0
    assert not d.q.should_interrupt()


def test_reset(mem):
    d = Driver(mem, event_idx=True)
    q = d.q
    d.add(in_=[(DATA, 1)])
    q.push(q.pop().head, 1)
    q.msix_vector = 3
    q.set_kicks_enabled(False)
    q.reset()
    assert (q.size, q.desc_addr, q.driver_addr, q.device_addr) == (256, 0, 0, 0)
    assert (q.ready, q.event_idx, q.msix_vector) == (False, False, VIRTIO_MSI_NO_VECTOR)
    assert q.last_avail_idx == 0 and q.used_idx == 0
    assert q.pop() is None


@pytest.mark.parametrize("max_size", [0, -1, 32769])
def test_bad_max_size(mem, max_size):
    with pytest.raises(ValueError):
        Virtqueue(mem, max_size)


# --- check() -------------------------------------------------------------------------------

def _queue(mem, size=8, desc=DESC, avail=AVAIL, used=USED, max_size=256):
    q = Virtqueue(mem, max_size)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = size, desc, avail, used
    return q


@pytest.mark.parametrize("size", [1, 3, 7, 100, 256])
def test_check_accepts_any_size(mem, size):
    _queue(mem, size).check()


@pytest.mark.parametrize("kw", [
    dict(size=0), dict(size=257), dict(size=-1),
    dict(desc=DESC + 8), dict(avail=AVAIL + 1), dict(used=USED + 2),
    dict(desc=RAM - 16 * 8 + 16),                 # last descriptor beyond RAM
    dict(avail=RAM - avail_ring_size(8) + 2),     # used_event beyond RAM
    dict(used=RAM - used_ring_size(8) + 4),       # avail_event beyond RAM
    dict(desc=3 << 30), dict(used=1 << 63), dict(desc=(1 << 64) - 16), dict(avail=-2),
])
def test_check_rejects(mem, kw):
    with pytest.raises(VirtqueueError):
        _queue(mem, **kw).check()


def test_check_edges_of_ram(mem):
    _queue(mem, desc=RAM - 16 * 8, avail=RAM - avail_ring_size(8) - 2,
           used=RAM - used_ring_size(8) - 2).check()


# --- malformed rings and chains ------------------------------------------------------------

def test_avail_idx_too_far_ahead(mem):
    d = Driver(mem, size=4)
    d.set_avail_idx(5)
    with pytest.raises(VirtqueueError):
        d.q.pop()
    d.set_avail_idx(0xFFFF)                 # "behind" by one = 65535 ahead
    with pytest.raises(VirtqueueError):
        d.q.pop()
    d.set_avail_idx(4)                      # exactly size is fine
    d.write_desc(0, DATA, 1)
    assert d.q.pop().head == 0


def test_head_out_of_range(mem):
    d = Driver(mem, size=4)
    d.publish(4)
    with pytest.raises(VirtqueueError):
        d.q.pop()


def _chain_error(d, head=0):
    with pytest.raises(ChainError) as ei:
        d.q.pop()
    assert ei.value.head == head
    return ei.value


def test_next_out_of_range_and_recovery(mem):
    d = Driver(mem, size=4)
    d.write_desc(2, DATA, 1, VIRTQ_DESC_F_NEXT, 4)
    d.publish(2)
    d.write_desc(3, DATA, 9)
    d.publish(3)
    err = _chain_error(d, head=2)
    d.q.push(err.head, 0)                   # the chain was consumed: complete it, go on
    assert d.used_elem(0) == (2, 0)
    assert d.q.pop().readable == [Buffer(DATA, 9)]


@pytest.mark.parametrize("links", [[(0, 0)], [(0, 1), (1, 0)], [(0, 1), (1, 2), (2, 3), (3, 1)]])
def test_loops(mem, links):
    d = Driver(mem, size=4)
    for i, n in links:
        d.write_desc(i, DATA, 1, VIRTQ_DESC_F_NEXT, n)
    d.publish(0)
    _chain_error(d)


def test_readable_after_writable(mem):
    d = Driver(mem)
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, DATA, 4, 0)
    d.publish(0)
    _chain_error(d)
    d.write_desc(0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT)
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1, table=INDIRECT)
    d.write_desc(1, DATA, 4, 0, table=INDIRECT)
    d.publish(0)
    _chain_error(d)


@pytest.mark.parametrize("addr,length", [
    (RAM, 1), (RAM - 4, 8), (3 << 30, 16), (0xFFFF_FFFF_FFFF_FFF0, 0x100),
    (0xFFFF_FFFF_FFFF_FFFF, 1), (0, 0xFFFF_FFFF),
])
@pytest.mark.parametrize("flags", [0, VIRTQ_DESC_F_WRITE])
def test_buffer_outside_ram(mem, addr, length, flags):
    d = Driver(mem)
    d.write_desc(0, addr, length, flags)
    d.publish(0)
    _chain_error(d)


def test_buffer_at_end_of_ram(mem):
    d = Driver(mem)
    d.write_desc(0, RAM - 8, 8, VIRTQ_DESC_F_WRITE)
    d.publish(0)
    assert d.q.pop().writable == [Buffer(RAM - 8, 8)]


@pytest.mark.parametrize("addr,length,flags", [
    (INDIRECT, 0, VIRTQ_DESC_F_INDIRECT),                          # empty table
    (INDIRECT, 24, VIRTQ_DESC_F_INDIRECT),                         # not a multiple of 16
    (INDIRECT, 17, VIRTQ_DESC_F_INDIRECT),
    (RAM - 16, 32, VIRTQ_DESC_F_INDIRECT),                         # beyond RAM
    (0xFFFF_FFFF_FFFF_FFF0, 32, VIRTQ_DESC_F_INDIRECT),            # wraps
    (INDIRECT, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT),     # with F_NEXT
    (INDIRECT, 16 * (INDIRECT_MIN_CAP + 1), VIRTQ_DESC_F_INDIRECT),  # too long
])
def test_bad_indirect_descriptor(mem, addr, length, flags):
    d = Driver(mem)
    d.write_desc(0, DATA, 1, 0, 0, table=INDIRECT)
    d.write_desc(0, addr, length, flags, 1)
    d.write_desc(1, DATA, 1)
    d.publish(0)
    _chain_error(d)


def test_indirect_table_cap_follows_queue_size(mem):
    d = Driver(mem, size=2048, max_size=4096)
    n = 2048
    for i in range(n):
        d.write_desc(i, DATA, 1, VIRTQ_DESC_F_NEXT if i < n - 1 else 0, i + 1, table=INDIRECT)
    d.write_desc(0, INDIRECT, 16 * n, VIRTQ_DESC_F_INDIRECT)
    d.publish(0)
    assert len(d.q.pop().readable) == n


@pytest.mark.parametrize("table", [
    # nested indirect
    [(DATA, 1, VIRTQ_DESC_F_NEXT, 1), (INDIRECT + 0x800, 16, VIRTQ_DESC_F_INDIRECT, 0)],
    # next beyond the table (table has 2 entries)
    [(DATA, 1, VIRTQ_DESC_F_NEXT, 2), (DATA, 1, 0, 0)],
    # loops inside the table
    [(DATA, 1, VIRTQ_DESC_F_NEXT, 0), (DATA, 1, 0, 0)],
    [(DATA, 1, VIRTQ_DESC_F_NEXT, 1), (DATA, 1, VIRTQ_DESC_F_NEXT, 0)],
    # a buffer outside RAM
    [(DATA, 1, VIRTQ_DESC_F_NEXT, 1), (RAM - 1, 2, VIRTQ_DESC_F_WRITE, 0)],
])
def test_bad_indirect_table(mem, table):
    d = Driver(mem)
    mem.write(INDIRECT + 0x800, struct.pack("<QIHH", DATA, 1, 0, 0))
    for i, (a, n, f, nx) in enumerate(table):
        d.write_desc(i, a, n, f, nx, table=INDIRECT)
    d.write_desc(5, INDIRECT, 16 * len(table), VIRTQ_DESC_F_INDIRECT)
    d.publish(5)
    _chain_error(d, head=5)


def test_loop_detection_is_bounded(mem):
    """A loop over the whole table is noticed after at most size descriptor reads."""
    d = Driver(mem, size=256)
    for i in range(256):
        d.write_desc(i, DATA, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 256)
    d.publish(0)
    counting = CountingMemory(mem)
    d.q.mem = counting
    _chain_error(d)
    assert counting.desc_reads <= 256 + 1


def test_ring_areas_moved_outside_ram_after_check(mem):
    """The ring is read through translate() every time: a bad address is VirtqueueError."""
    d = Driver(mem)
    d.add(in_=[(DATA, 1)])
    d.q.driver_addr = RAM
    with pytest.raises(VirtqueueError):
        d.q.pop()
    with pytest.raises(VirtqueueError):
        d.q.has_pending()
    d.q.driver_addr = AVAIL
    d.q.desc_addr = RAM
    with pytest.raises(VirtqueueError):
        d.q.pop()
    d.q.device_addr = RAM
    with pytest.raises(VirtqueueError):
        d.q.push(0, 0)
    d.q.size = 0
    with pytest.raises(VirtqueueError):
        d.q.pop()


def test_chain_error_carries_head():
    e = ChainError(7, "bad")
    assert e.head == 7 and "bad" in str(e)


# --- hypothesis: garbage rings never escape ------------------------------------------------

class CountingMemory:
    """GuestMemory proxy counting the 16-byte (descriptor) reads."""

    def __init__(self, mem):
        self.mem = mem
        self.desc_reads = 0

    def translate(self, gpa, size):
        return self.mem.translate(gpa, size)

    def read(self, gpa, size):
        if size == 16:
            self.desc_reads += 1
        return self.mem.read(gpa, size)

    def write(self, gpa, data):
        self.mem.write(gpa, data)

    def view(self, gpa, size):
        return self.mem.view(gpa, size)


FUZZ_TABLE = 0x8000      # where some descriptors point as indirect tables
FUZZ_TABLE_MAX = 24      # entries written there

_addr = st.one_of(
    st.integers(0, RAM - 1), st.integers(0, RAM - 1),
    st.sampled_from([0, FUZZ_TABLE, FUZZ_TABLE + 16, RAM - 16, RAM - 1, RAM, 3 << 30,
                     (1 << 64) - 1, (1 << 64) - 16, DESC]),
    st.integers(0, (1 << 64) - 1),
)
_len = st.one_of(st.integers(0, 64), st.integers(0, 64),
                 st.sampled_from([16, 32, 16 * FUZZ_TABLE_MAX, 0x1000, (1 << 32) - 1, (1 << 32) - 16]))
_plain_flags = st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE])
_flags = st.one_of(_plain_flags, _plain_flags, _plain_flags, st.integers(0, 7), st.integers(0, 0xFFFF))


def _descs(n, next_max, indirect=False):
    desc = st.tuples(_addr, _len, _flags, st.integers(0, next_max))
    if indirect:   # sometimes a well-formed pointer to the fuzzed indirect table
        desc = st.one_of(desc, desc, st.tuples(
            st.just(FUZZ_TABLE), st.integers(1, FUZZ_TABLE_MAX).map(lambda k: 16 * k),
            st.sampled_from([VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE]),
            st.integers(0, next_max)))
    return st.lists(desc, min_size=n, max_size=n)


@st.composite
def fuzz_rings(draw):
    size = draw(st.integers(1, 12))
    table = draw(_descs(size, size + 1, indirect=True))
    indirect = draw(st.one_of(
        _descs(FUZZ_TABLE_MAX, FUZZ_TABLE_MAX + 1).map(
            lambda ds: b"".join(struct.pack("<QIHH", *d) for d in ds)),
        st.binary(min_size=16 * FUZZ_TABLE_MAX, max_size=16 * FUZZ_TABLE_MAX),
    ))
    last_avail = draw(st.integers(0, 0xFFFF))
    ahead = draw(st.one_of(st.integers(0, size), st.integers(0, size), st.integers(0, 0xFFFF)))
    ring = draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, size - 1),
                                   st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                         min_size=size, max_size=size))
    event_idx = draw(st.booleans())
    return size, table, indirect, last_avail, ahead, ring, event_idx


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_rings())
def test_fuzz_pop_never_escapes(mem, rings):
    size, table, indirect, last_avail, ahead, ring, event_idx = rings
    for i, d in enumerate(table):
        mem.write(DESC + 16 * i, struct.pack("<QIHH", *d))
    mem.write(FUZZ_TABLE, indirect)
    mem.write(AVAIL, struct.pack(f"<HH{size}HH", 0, (last_avail + ahead) & 0xFFFF, *ring, 0))
    mem.write(USED, bytes(used_ring_size(size)))
    counting = CountingMemory(mem)
    q = Virtqueue(counting, 16)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = size, DESC, AVAIL, USED
    q.event_idx = event_idx
    q.check()
    q.ready = True
    q.last_avail_idx = last_avail
    # one pop walks at most the main table plus the longest indirect table it names
    longest_indirect = max(n // 16 for _, n, _, _ in table)
    bound = size + longest_indirect

    for _ in range(size + 2):
        counting.desc_reads = 0
        try:
            chain = q.pop()
        except ChainError as e:
            assert 0 <= e.head < size
            q.push(e.head, 0)
            continue
        except VirtqueueError:
            break
        finally:
            assert counting.desc_reads <= bound
        if chain is None:
            break
        assert 0 <= chain.head < size
        for buf in chain.readable + chain.writable:
            assert buf.length > 0
            mem.translate(buf.gpa, buf.length)   # inside RAM, or GuestMemoryError fails the test
        q.push(chain.head, min(chain.writable_len(), 0xFFFF_FFFF))
        assert q.should_interrupt() in (True, False)


# --- hypothesis: DescriptorChain.read/write against a flat model ---------------------------

@st.composite
def chains_and_ops(draw):
    lengths = draw(st.lists(st.integers(1, 40), max_size=6))
    bufs, addr = [], DATA
    for n in lengths:
        addr += draw(st.integers(0, 8))
        bufs.append(Buffer(addr, n))
        addr += n
    total = sum(lengths)
    offset = draw(st.integers(0, total + 5))
    size = draw(st.integers(0, total + 5))
    data = draw(st.binary(max_size=total + 5))
    return bufs, offset, size, data


@settings(max_examples=200, deadline=None)
@given(chains_and_ops())
def test_chain_read_write_model(mem, case):
    bufs, offset, size, data = case
    mem.write(DATA, bytes(range(256)) * 2)
    flat = b"".join(mem.read(b.gpa, b.length) for b in bufs)
    chain = DescriptorChain(head=0, readable=bufs, writable=bufs)
    want = flat[offset:offset + size]
    assert chain.read(mem, offset, size) == want

    guard_end = bufs[-1].gpa + bufs[-1].length if bufs else DATA
    mem.write(guard_end, b"\xEE" * 16)
    n = chain.write(mem, data, offset)
    expect_n = min(len(data), max(0, len(flat) - offset))
    assert n == expect_n
    new_flat = flat[:offset] + data[:expect_n] + flat[offset + expect_n:]
    assert b"".join(mem.read(b.gpa, b.length) for b in bufs) == new_flat[:len(flat)]
    assert mem.read(guard_end, 16) == b"\xEE" * 16


def test_chain_read_is_capped(mem):
    """No whole-chain copies: a chain's length may stand for many times guest RAM."""
    c = DescriptorChain(head=0, readable=[Buffer(DATA, 4096)] * 64, writable=[])
    assert len(c.read(mem, 0, CHAIN_READ_MAX)) == CHAIN_READ_MAX
    with pytest.raises(ValueError):
        c.read(mem, 0, CHAIN_READ_MAX + 1)


def test_chain_read_write_negative_offsets(mem):
    c = DescriptorChain(head=0, readable=[Buffer(DATA, 4)], writable=[Buffer(DATA, 4)])
    with pytest.raises(ValueError):
        c.read(mem, -1, 1)
    with pytest.raises(ValueError):
        c.read(mem, 0, -1)
    with pytest.raises(ValueError):
        c.write(mem, b"x", -1)


def test_guest_memory_error_is_value_error():
    assert issubclass(GuestMemoryError, ValueError)


def test_resume_from_ring_takes_over_after_the_last_used_element(mem):
    """A backend served the ring, completed 2 of 3 chains, then died: a fresh device
    side resumes at the used idx, takes the uncompleted third chain and the new one."""
    d = Driver(mem, size=4)
    heads = [d.add(in_=[(DATA + 0x100 * i, 0x100)]) for i in range(3)]
    q = Virtqueue(mem, 256)            # the backend's own view of the same ring
    q.size, q.desc_addr, q.driver_addr, q.device_addr = 4, d.desc, d.avail, d.used
    q.ready = True
    for _ in range(3):
        q.pop()
    q.push(heads[0], 1)
    q.push(heads[1], 1)                # the third was taken but never completed
    d.add(in_=[(DATA + 0x400, 0x100)])
    successor = Virtqueue(mem, 256)
    successor.size, successor.desc_addr, successor.driver_addr, successor.device_addr = 4, d.desc, d.avail, d.used
    successor.ready = True
    assert successor.resume_from_ring() == 2
    taken = [successor.pop().head, successor.pop().head]
    assert taken[0] == heads[2] and successor.pop() is None
    successor.push(taken[0], 16)
    assert d.used_idx() == 3 and d.used_elem(2) == (heads[2], 16)
