"""Split virtqueues, the device side (virtio v1.2, 2.7 "Split Virtqueues").

A split virtqueue is three areas of guest RAM that the driver allocates and
hands to the device through the transport:

* the descriptor table (``desc_addr``, 16-byte aligned): ``size`` entries of
  ``struct virtq_desc`` {addr u64, len u32, flags u16, next u16};
* the driver area, or available ring (``driver_addr``, 2-byte aligned):
  flags u16, idx u16, ring[size] u16, used_event u16;
* the device area, or used ring (``device_addr``, 4-byte aligned):
  flags u16, idx u16, ring[size] of ``struct virtq_used_elem`` {id u32,
  len u32}, avail_event u16.

All fields are little-endian (virtio 1.x).  The driver puts the head index of
a descriptor chain into the available ring and bumps ``avail->idx``; the device
pops it (``Virtqueue.pop``), does the I/O, and returns it through the used ring
(``Virtqueue.push``), then asks ``Virtqueue.should_interrupt`` whether the driver
wants an interrupt for it.

Everything in these areas is written by the guest and is untrusted.  Every
index is range-checked, every chain is walked with a bound on its length, and
every buffer must lie wholly inside guest RAM (``GuestMemory.translate``)
before a device sees it.  Two kinds of failure are told apart:

* ``ChainError``: one chain is bad (a ``next`` out of range, a loop, a buffer
  outside RAM, ...).  The chain has been consumed from the available ring; the
  device completes it with ``push(err.head, 0)`` (plus an error status where
  the device protocol has one) and carries on with the next chain.
* ``VirtqueueError``: the ring itself is broken (``avail->idx`` moved by more
  than the queue size, a head index out of range, ring areas outside RAM).
  The device sets DEVICE_NEEDS_RESET and stops using the queue.

Indirect descriptors (``VIRTQ_DESC_F_INDIRECT``, 2.7.5.3) are accepted whether
or not VIRTIO_F_INDIRECT_DESC was negotiated: the transport always offers the
feature (``TRANSPORT_FEATURES``), a driver that did not accept it will not use
it, and walking a table is no less safe than walking the main one.  As the
spec requires of a device, zero or more ordinary descriptors may precede the
single indirect one, and the WRITE flag of the descriptor that points at the
table is ignored.

Memory ordering.  The host is x86-64, which keeps stores in order with other
stores and loads with other loads; ``push`` writes the used element before
the used index, ``pop`` reads the available index before the ring entry and
the descriptors.  Only a store followed by a load of another location needs a
fence: ``should_interrupt`` (used idx, then used_event / avail flags), ``pop``
and ``set_kicks_enabled`` (avail_event, then avail idx).  ``_full_barrier``
provides it with a lock round trip, which is a LOCK-prefixed instruction and
so a full fence on x86.  The 2-byte index fields are copied with one
``memcpy`` of 2 bytes, a single aligned 16-bit access.

A ``Virtqueue`` is not thread-safe: the transport configures it while the
queue is not ready, afterwards only the device's worker thread uses it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import NamedTuple

from ...memory import GuestMemoryError
from ...snapshot.fields import boolean, expect_keys, hex_int, integer, uint

log = logging.getLogger(__name__)

# Descriptor flags (2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# Available ring flags (2.7.6)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

# Used ring flags (2.7.8)
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# The largest Queue Size of a split virtqueue (2.7: "Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768

# Alignment of the three areas (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# An indirect table may hold up to max(queue size, this) descriptors.  The spec
# says a chain should not be longer than the queue size; drivers size their
# requests by it, and this leaves room for a small queue with big requests.
INDIRECT_MIN_CAP = 1024

# The most ``DescriptorChain.read`` copies at once: the request headers and small
# payloads devices parse (a virtio-blk discard list is 512 bytes at most).
CHAIN_READ_MAX = 64 * 1024

_U16 = 0x10000


class VirtqDesc(ctypes.LittleEndianStructure):
    """``struct virtq_desc``: one entry of a descriptor table."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("next", ctypes.c_uint16),
    ]


class VirtqRingHeader(ctypes.LittleEndianStructure):
    """The ``flags, idx`` pair that starts both the avail and the used ring."""

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("idx", ctypes.c_uint16),
    ]


class VirtqUsedElem(ctypes.LittleEndianStructure):
    """``struct virtq_used_elem``: one entry of the used ring."""

    _fields_ = [
        ("id", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


class Le16(ctypes.LittleEndianStructure):
    """One little-endian u16: an avail ring entry, used_event, avail_event."""

    _fields_ = [("value", ctypes.c_uint16)]


assert ctypes.sizeof(VirtqDesc) == 16
assert ctypes.sizeof(VirtqRingHeader) == 4
assert ctypes.sizeof(VirtqUsedElem) == 8
assert ctypes.sizeof(Le16) == 2

# Spec spelling, for readers coming from 2.7.
virtq_desc = VirtqDesc
virtq_used_elem = VirtqUsedElem

DESC_SIZE = ctypes.sizeof(VirtqDesc)
USED_ELEM_SIZE = ctypes.sizeof(VirtqUsedElem)
RING_HEADER_SIZE = ctypes.sizeof(VirtqRingHeader)


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table of a queue of ``size`` entries."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring, including the trailing used_event."""
    return RING_HEADER_SIZE + 2 * size + 2


def used_ring_size(size: int) -> int:
    """Bytes of the used ring, including the trailing avail_event."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * size + 2


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.10: has the index moved from ``old_idx`` to ``new_idx`` past ``event_idx``?

    True when ``event_idx`` is in [old_idx, new_idx) modulo 2**16.
    """
    return (new_idx - event_idx - 1) % _U16 < (new_idx - old_idx) % _U16


_barrier_lock = threading.Lock()


def _full_barrier() -> None:
    """A full memory fence (store->load ordering); see the module docstring."""
    _barrier_lock.acquire()
    _barrier_lock.release()


class VirtqueueState(NamedTuple):
    """A queue's saved state, checked (``Virtqueue.parse_state``)."""

    size: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    ready: bool
    event_idx: bool
    msix_vector: int
    last_avail_idx: int
    used_idx: int
    signalled_used: int
    pushed_since_check: int
    kicks_enabled: bool


_ADDRESS_FIELDS = ("desc_addr", "driver_addr", "device_addr")
_INDEX_FIELDS = ("last_avail_idx", "used_idx", "signalled_used")


class VirtqueueError(Exception):
    """The ring is broken: set DEVICE_NEEDS_RESET and stop using the queue."""


class ChainError(Exception):
    """One descriptor chain is bad; complete it with ``push(head, 0)`` and go on."""

    def __init__(self, head: int, message: str = "bad descriptor chain") -> None:
        super().__init__(f"descriptor chain {head}: {message}")
        self.head = head


class Buffer(NamedTuple):
    """One guest buffer of a chain: ``length`` (> 0) bytes at guest-physical ``gpa``."""

    gpa: int
    length: int


def buffer_pieces(buffers: list[Buffer], offset: int, size: int) -> list[tuple[int, int]]:
    """The (gpa, length) pieces of bytes [offset, offset+size) of ``buffers`` taken as
    one stream, one piece per buffer: a device copies (or maps) piece by piece, never
    the whole chain at once.  Fewer bytes when the buffers end first."""
    out = []
    for buf in buffers:
        if size <= 0:
            break
        if offset >= buf.length:
            offset -= buf.length
            continue
        n = min(buf.length - offset, size)
        out.append((buf.gpa + offset, n))
        size -= n
        offset = 0
    return out


class DescriptorChain:
    """A popped chain: its head index and its buffers, split by direction.

    Buffers returned by ``Virtqueue.pop`` are non-empty and lie wholly inside
    guest RAM; the driver-to-device ones come first (1.x ordering rule).
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[Buffer], writable: list[Buffer]) -> None:
        self.head = head
        self.readable = readable   # device-readable buffers in chain order
        self.writable = writable   # device-writable buffers in chain order

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"

    def readable_len(self) -> int:
        return sum(b.length for b in self.readable)

    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)

    def read(self, mem, offset: int, size: int) -> bytes:
        """Gather ``size`` bytes (at most ``CHAIN_READ_MAX``) from ``offset`` on.

        The readable buffers count as one byte stream.  Like a file read, the
        result is shorter than ``size`` when the buffers end first (empty when
        ``offset`` is at or beyond ``readable_len()``).  There is no "read it
        all": the descriptors of a chain may all point at the same guest pages,
        so its length stands for up to (256 + 1024) times guest RAM.  A device
        that consumes a long stream walks ``buffer_pieces`` instead.
        """
        if offset < 0 or not 0 <= size <= CHAIN_READ_MAX:
            raise ValueError(f"bad chain read offset {offset} size {size} (at most {CHAIN_READ_MAX})")
        return b"".join(mem.read(gpa, n) for gpa, n in buffer_pieces(self.readable, offset, size))

    def write(self, mem, data: bytes, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers from byte ``offset`` on.

        Returns the number of bytes written: ``len(data)``, or fewer when the
        writable buffers end first; nothing is ever written beyond them.
        """
        if offset < 0:
            raise ValueError(f"bad chain write offset {offset}")
        src = memoryview(data).cast("B")
        done = 0
        skip = offset
        for buf in self.writable:
            if done >= len(src):
                break
            if skip >= buf.length:
                skip -= buf.length
                continue
            n = min(buf.length - skip, len(src) - done)
            mem.write(buf.gpa + skip, src[done:done + n])
            done += n
            skip = 0
        return done


class Virtqueue:
    """The device side of one split virtqueue in guest memory ``mem``.

    The transport sets ``size``, ``desc_addr``, ``driver_addr``,
    ``device_addr``, ``event_idx`` and ``msix_vector`` while the driver sets the
    queue up, calls ``check()`` when the driver enables it and then sets
    ``ready``.  The device then uses ``pop``/``push``/``should_interrupt``.

    The typical device loop::

        while (chain := q.pop()) is not None:   # ChainError / VirtqueueError, see above
            written = handle(chain)
            q.push(chain.head, written)
        if q.should_interrupt():
            interrupt()

    With EVENT_IDX a ``pop`` that finds the ring empty publishes avail_event
    (unless notifications were disabled with ``set_kicks_enabled(False)``) and
    looks once more, so the loop above never misses a kick.
    """

    def __init__(self, mem, max_size: int = 256, foreign_buffers: bool = False) -> None:
        """``foreign_buffers``: let data buffers lie outside ``mem`` (they still must not
        wrap around); the device resolves them itself.  A vhost-user back-end needs this
        for buffers in a DAX window, which its memory table does not cover.  Rings and
        indirect tables must be in ``mem`` either way."""
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"virtqueue max size {max_size} not in 1..{MAX_QUEUE_SIZE}")
        self.mem = mem
        self.max_size = max_size
        self.foreign_buffers = foreign_buffers
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state (the device's worker must not be using the queue)."""
        self.size = self.max_size
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.ready = False
        self.event_idx = False
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.last_avail_idx = 0
        self._used_idx = 0            # next used idx to publish (mod 2**16)
        self._signalled_used = 0      # used idx at the last should_interrupt()
        self._pushed_since_check = 0
        self._kicks_enabled = True   # set_kicks_enabled() state

    def resume_from_ring(self) -> int:
        """Take over a ring another device-side implementation (a vhost-user backend
        that died) was serving: continue after the last used element it published.
        Chains it took but never completed are taken again.  Returns that index."""
        idx = int.from_bytes(self.mem.read(self.device_addr + 2, 2), "little")
        self.last_avail_idx = self._used_idx = self._signalled_used = idx
        self._pushed_since_check = 0
        return idx

    @property
    def used_idx(self) -> int:
        """The used index the device has published (mod 2**16)."""
        return self._used_idx

    # --- snapshot ------------------------------------------------------------------------
    def save_state(self) -> dict:
        """Layout, flags, and where the device is in the ring: the next avail index
        to pop, the used index it published, and its interrupt bookkeeping (the used
        index at the last ``should_interrupt`` and the pushes since).  Only while the
        worker that uses the queue is stopped."""
        return {
            "size": self.size,
            "desc_addr": hex(self.desc_addr),
            "driver_addr": hex(self.driver_addr),
            "device_addr": hex(self.device_addr),
            "ready": self.ready,
            "event_idx": self.event_idx,
            "msix_vector": self.msix_vector,
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self._used_idx,
            "signalled_used": self._signalled_used,
            "pushed_since_check": min(self._pushed_since_check, _U16),   # >= 2**16: "many"
            "kicks_enabled": self._kicks_enabled,
        }

    def parse_state(self, state: object, path: str) -> VirtqueueState:
        """Check a saved queue against this one (its maximum size, guest RAM);
        ValueError naming the field.  Nothing changes yet."""
        expect_keys(state, VirtqueueState._fields, path)
        values = {name: hex_int(state[name], f"{path}.{name}", 8) for name in _ADDRESS_FIELDS}
        values.update({name: uint(state[name], f"{path}.{name}", _U16 - 1) for name in _INDEX_FIELDS})
        values.update({name: boolean(state[name], f"{path}.{name}")
                       for name in ("ready", "event_idx", "kicks_enabled")})
        values["size"] = integer(state["size"], f"{path}.size", 1, self.max_size)
        values["msix_vector"] = uint(state["msix_vector"], f"{path}.msix_vector", VIRTIO_MSI_NO_VECTOR)
        values["pushed_since_check"] = uint(state["pushed_since_check"], f"{path}.pushed_since_check", _U16)
        parsed = VirtqueueState(**values)
        if parsed.ready:
            try:
                self._check_areas(parsed.size, parsed.desc_addr, parsed.driver_addr, parsed.device_addr)
            except VirtqueueError as e:
                raise ValueError(f"{path}: {e}") from None
        elif parsed.last_avail_idx or parsed.used_idx or parsed.signalled_used or parsed.pushed_since_check:
            raise ValueError(f"{path}: ring indexes of a queue that is not ready (always 0 there)")
        in_flight = (parsed.last_avail_idx - parsed.used_idx) % _U16
        if in_flight > parsed.size:
            raise ValueError(f"{path}: {in_flight} chains popped and not used, queue size {parsed.size}")
        if (parsed.used_idx - parsed.signalled_used) % _U16 != parsed.pushed_since_check % _U16:
            raise ValueError(f"{path}.pushed_since_check: {parsed.pushed_since_check} pushes do not lead "
                             f"from signalled_used {parsed.signalled_used} to used_idx {parsed.used_idx}")
        return parsed

    def apply_state(self, parsed: VirtqueueState) -> None:
        """Load a checked state (the worker that uses the queue must be stopped)."""
        self.size, self.ready, self.event_idx = parsed.size, parsed.ready, parsed.event_idx
        self.desc_addr, self.driver_addr, self.device_addr = (
            parsed.desc_addr, parsed.driver_addr, parsed.device_addr)
        self.msix_vector = parsed.msix_vector
        self.last_avail_idx = parsed.last_avail_idx
        self._used_idx = parsed.used_idx
        self._signalled_used = parsed.signalled_used
        self._pushed_since_check = parsed.pushed_since_check
        self._kicks_enabled = parsed.kicks_enabled

    def restore_state(self, state: dict, path: str = "queue") -> None:
        self.apply_state(self.parse_state(state, path))

    # --- set-up ------------------------------------------------------------------------
    def check(self) -> None:
        """Validate size, alignment and that the three areas lie in guest RAM.

        The areas always include the trailing used_event / avail_event
        fields (as every driver lays them out), so that EVENT_IDX may be
        decided after the queue was enabled.
        """
        self._check_areas(self.size, self.desc_addr, self.driver_addr, self.device_addr)

    def _check_areas(self, size: int, desc: int, driver: int, device: int) -> None:
        if not isinstance(size, int) or not 1 <= size <= self.max_size:
            raise VirtqueueError(f"queue size {size} not in 1..{self.max_size}")
        for name, addr, align, length in (
            ("descriptor table", desc, DESC_ALIGN, desc_table_size(size)),
            ("available ring", driver, AVAIL_ALIGN, avail_ring_size(size)),
            ("used ring", device, USED_ALIGN, used_ring_size(size)),
        ):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if addr < 0 or addr + length > 1 << 64:
                raise VirtqueueError(f"{name} at {addr:#x}+{length:#x} overflows")
            try:
                self.mem.translate(addr, length)
            except GuestMemoryError as e:
                raise VirtqueueError(f"{name} at {addr:#x}+{length:#x} is not in guest RAM") from e

    def _active_size(self) -> int:
        size = self.size
        if not 1 <= size <= self.max_size:
            raise VirtqueueError(f"queue size {size} not in 1..{self.max_size}")
        return size

    # --- guest memory accessors (GuestMemoryError is left to the callers) --------------
    def _load16(self, gpa: int) -> int:
        return Le16.from_buffer_copy(self.mem.read(gpa, 2)).value

    def _store16(self, gpa: int, value: int) -> None:
        self.mem.write(gpa, bytes(Le16(value & 0xFFFF)))

    def _avail_flags(self) -> int:
        return self._load16(self.driver_addr)

    def _avail_idx(self) -> int:
        return self._load16(self.driver_addr + 2)

    def _used_event_addr(self, size: int) -> int:
        return self.driver_addr + RING_HEADER_SIZE + 2 * size

    def _avail_event_addr(self, size: int) -> int:
        return self.device_addr + RING_HEADER_SIZE + USED_ELEM_SIZE * size

    # --- the available ring ------------------------------------------------------------
    def has_pending(self) -> bool:
        """Whether the driver has made chains available that were not popped yet."""
        if not self.ready:
            return False
        self._active_size()
        try:
            return self._avail_idx() != self.last_avail_idx
        except GuestMemoryError as e:
            raise VirtqueueError(f"available ring unreadable: {e}") from e

    def _num_available(self, avail_idx: int, size: int) -> int:
        n = (avail_idx - self.last_avail_idx) % _U16
        if n > size:
            raise VirtqueueError(
                f"avail idx {avail_idx} is {n} ahead of last seen {self.last_avail_idx}, "
                f"queue size {size}")
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when there is none (or not ready).

        Raises ChainError for a bad chain (it is consumed: complete it with
        ``push(err.head, 0)``) and VirtqueueError for a broken ring.
        """
        if not self.ready:
            return None
        size = self._active_size()
        try:
            avail_idx = self._avail_idx()          # read once per pop
            if self._num_available(avail_idx, size) == 0:
                if not (self.event_idx and self._kicks_enabled):
                    return None
                # Ask for a kick when the driver adds the next chain, then look
                # once more: the driver may have added one before it saw this.
                self._store16(self._avail_event_addr(size), avail_idx)
                _full_barrier()
                avail_idx = self._avail_idx()
                if self._num_available(avail_idx, size) == 0:
                    return None
            head = self._load16(self.driver_addr + RING_HEADER_SIZE
                                + 2 * (self.last_avail_idx % size))
        except GuestMemoryError as e:
            raise VirtqueueError(f"available ring unreadable: {e}") from e
        if head >= size:
            raise VirtqueueError(f"available ring slot {self.last_avail_idx % size} "
                                 f"holds head {head}, queue size {size}")
        self.last_avail_idx = (self.last_avail_idx + 1) % _U16
        return self._walk(head, size)

    def _read_desc(self, table: int, index: int) -> VirtqDesc:
        return VirtqDesc.from_buffer_copy(self.mem.read(table + DESC_SIZE * index, DESC_SIZE))

    def _walk(self, head: int, size: int) -> DescriptorChain:
        """Follow the chain starting at ``head`` (< size) and collect its buffers."""
        chain = DescriptorChain(head=head, readable=[], writable=[])
        table, entries = self.desc_addr, size   # current table and its length
        indirect = False
        index = head
        walked_here = 0                          # descriptors walked in the current table
        walked_total = 0
        total_cap = size + max(size, INDIRECT_MIN_CAP)
        while True:
            if index >= entries:
                raise ChainError(head, f"descriptor index {index} out of range 0..{entries - 1}"
                                       + (" (indirect table)" if indirect else ""))
            walked_here += 1
            walked_total += 1
            if walked_here > entries or walked_total > total_cap:
                raise ChainError(head, "chain longer than its table (loop?)")
            try:
                desc = self._read_desc(table, index)
            except GuestMemoryError as e:
                if indirect:  # cannot happen: the whole table was checked
                    raise ChainError(head, f"indirect table unreadable: {e}") from e
                raise VirtqueueError(f"descriptor table unreadable: {e}") from e

            if desc.flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError(head, "nested indirect descriptor")
                if desc.flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with F_NEXT")
                if desc.len == 0 or desc.len % DESC_SIZE:
                    raise ChainError(head, f"indirect table length {desc.len} is not a "
                                           f"non-zero multiple of {DESC_SIZE}")
                n = desc.len // DESC_SIZE
                if n > max(size, INDIRECT_MIN_CAP):
                    raise ChainError(head, f"indirect table of {n} descriptors is too long")
                self._check_in_ram(head, desc.addr, desc.len, "indirect table")
                # The WRITE flag of this descriptor is ignored (2.7.5.3.2).
                table, entries, index = desc.addr, n, 0
                indirect = True
                walked_here = 0
                continue

            if desc.len:
                if self.foreign_buffers:
                    self._check_no_wrap(head, desc.addr, desc.len, "buffer")
                else:
                    self._check_in_ram(head, desc.addr, desc.len, "buffer")
                buf = Buffer(desc.addr, desc.len)
                if desc.flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.append(buf)
                elif chain.writable:
                    raise ChainError(head, "device-readable buffer after a device-writable one")
                else:
                    chain.readable.append(buf)
            if not desc.flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = desc.next

    @staticmethod
    def _check_no_wrap(head: int, addr: int, length: int, what: str) -> None:
        if addr + length > 1 << 64:
            raise ChainError(head, f"{what} {addr:#x}+{length:#x} wraps around")

    def _check_in_ram(self, head: int, addr: int, length: int, what: str) -> None:
        self._check_no_wrap(head, addr, length, what)
        try:
            self.mem.translate(addr, length)
        except GuestMemoryError as e:
            raise ChainError(head, f"{what} {addr:#x}+{length:#x} is not in guest RAM") from e

    # --- the used ring -----------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written.

        Writes the used element, then publishes the new used index.  A push
        into a queue that is not ready (reset while a request was in flight)
        is dropped.
        """
        if not self.ready:
            log.debug("push(%d) on a queue that is not ready: dropped", head)
            return
        size = self._active_size()
        if not 0 <= head < size:
            raise ValueError(f"push of head {head}, queue size {size}")
        if not 0 <= written < 1 << 32:
            raise ValueError(f"push of {written} bytes written")
        slot = self._used_idx % size
        elem = VirtqUsedElem(head, written)
        new_idx = (self._used_idx + 1) % _U16
        try:
            self.mem.write(self.device_addr + RING_HEADER_SIZE + USED_ELEM_SIZE * slot, bytes(elem))
            # x86 keeps these two stores in order: the element is visible first.
            self._store16(self.device_addr + 2, new_idx)
        except GuestMemoryError as e:
            raise VirtqueueError(f"used ring unwritable: {e}") from e
        self._used_idx = new_idx
        self._pushed_since_check += 1

    def should_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the pushes since the last call.

        False when nothing was pushed since the last call.  With EVENT_IDX:
        whether the used index crossed used_event since the last call;
        otherwise: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        if not self.ready:
            return False
        size = self._active_size()
        old, new = self._signalled_used, self._used_idx
        pushed = self._pushed_since_check
        self._signalled_used = new
        self._pushed_since_check = 0
        if pushed == 0:
            return False
        _full_barrier()   # our used idx store before the driver's fields are read
        try:
            if self.event_idx:
                if pushed >= _U16:   # the 16-bit window cannot tell: be safe
                    return True
                return vring_need_event(self._load16(self._used_event_addr(size)), new, old)
            return not self._avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as e:
            raise VirtqueueError(f"available ring unreadable: {e}") from e

    def set_kicks_enabled(self, enable: bool) -> None:
        """Ask the driver to kick (enable) or not to kick (disable) on new chains.

        With EVENT_IDX, enabling writes avail_event = the current avail idx
        (kick me on the next chain) and disabling writes nothing: the driver
        then kicks only when its index passes the stale avail_event again,
        and ``pop`` stops publishing avail_event.  Without EVENT_IDX the
        VIRTQ_USED_F_NO_NOTIFY flag is cleared or set.  Either way this is a
        hint; after enabling, check ``has_pending()`` (or ``pop()``) again.
        """
        self._kicks_enabled = bool(enable)
        if not self.ready:
            return
        size = self._active_size()
        try:
            if self.event_idx:
                if enable:
                    self._store16(self._avail_event_addr(size), self._avail_idx())
            else:
                self._store16(self.device_addr, 0 if enable else VIRTQ_USED_F_NO_NOTIFY)
        except GuestMemoryError as e:
            raise VirtqueueError(f"used ring unwritable: {e}") from e
        _full_barrier()   # the store above before the caller re-reads avail idx
