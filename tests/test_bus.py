"""Port-I/O and MMIO buses (pyvmm.bus): address range -> device."""

from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import given, settings, strategies as st

import pyvmm.bus as bus_module
from pyvmm.bus import UNCLAIMED_ADDRESSES_MAX, Bus, BusError


class Dev:
    """Records accesses; reads return ``size`` bytes of ``fill`` unless told otherwise."""

    def __init__(self, name: str, fill: int = 0x11, reply: bytes | None = None) -> None:
        self.name = name
        self.fill = fill
        self.reply = reply
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.reply if self.reply is not None else bytes([self.fill]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))

    def __repr__(self) -> str:
        return f"Dev({self.name})"


@pytest.fixture
def pio():
    b = Bus("pio")
    b.serial = Dev("serial")
    b.register(0x3F8, 8, b.serial)
    return b


# --- register / find ---------------------------------------------------------------
def test_find_at_range_edges(pio):
    dev = pio.serial
    assert pio.find(0x3F8) == (dev, 0)              # base
    assert pio.find(0x3FF) == (dev, 7)              # base + len - 1
    assert pio.find(0x400) is None                  # base + len
    assert pio.find(0x3F7) is None                  # base - 1
    assert pio.find(0) is None
    assert pio.find(0x3F8, 8) == (dev, 0)           # the whole range at once
    assert pio.find(0x3FC, 4) == (dev, 4)


def test_find_on_empty_bus():
    b = Bus("mmio")
    assert b.find(0) is None
    assert b.find(0xFEE00000, 4) is None


def test_adjacent_ranges(pio):
    below, above = Dev("below"), Dev("above")
    pio.register(0x3F0, 8, below)                   # ends exactly at 0x3f8
    pio.register(0x400, 1, above)                   # starts exactly at 0x400
    assert pio.find(0x3F7) == (below, 7)
    assert pio.find(0x3F8) == (pio.serial, 0)
    assert pio.find(0x3FF) == (pio.serial, 7)
    assert pio.find(0x400) == (above, 0)
    assert pio.find(0x401) is None


@pytest.mark.parametrize("base, length", [
    (0x3F8, 8),        # exact duplicate
    (0x3F8, 1),        # same base, shorter
    (0x3F0, 9),        # overlaps the first byte from below
    (0x3FF, 4),        # overlaps the last byte from above
    (0x3FA, 2),        # inside
    (0x300, 0x200),    # covers it
])
def test_overlap_refused(pio, base, length):
    with pytest.raises(BusError, match="overlaps"):
        pio.register(base, length, Dev("intruder"))
    for addr in range(0x2F0, 0x510):               # the intruder got no address at all
        hit = pio.find(addr)
        assert hit is None or hit[0] is pio.serial


@pytest.mark.parametrize("base, length", [(0x100, 0), (0x100, -1), (0x100, -8), (-1, 4), (-8, 8)])
def test_bad_ranges_refused(base, length):
    b = Bus("pio")
    with pytest.raises(BusError, match="bad range"):
        b.register(base, length, Dev("x"))
    assert b.find(0x100) is None


def test_unregister(pio):
    assert pio.unregister(0x3F8) is pio.serial
    assert pio.find(0x3F8) is None
    pio.register(0x3F8, 8, Dev("again"))            # the range is free again
    assert pio.find(0x3FF)[0].name == "again"


def test_unregister_unknown_base(pio):
    with pytest.raises(BusError, match="nothing registered at 0x3f9"):
        pio.unregister(0x3F9)                      # inside a range is not its base
    with pytest.raises(BusError):
        pio.unregister(0x1000)
    assert pio.find(0x3F9) == (pio.serial, 1)


def test_unregister_middle_keeps_neighbours():
    b = Bus("mmio")
    devs = [Dev(str(i)) for i in range(3)]
    for i, d in enumerate(devs):
        b.register(0x1000 * (i + 1), 0x100, d)
    b.unregister(0x2000)
    assert b.find(0x1000) == (devs[0], 0)
    assert b.find(0x2000) is None
    assert b.find(0x30FF) == (devs[2], 0xFF)


# --- read / write -------------------------------------------------------------------
def test_read_and_write_reach_the_device_with_offsets(pio):
    assert pio.read(0x3FD, 1) == b"\x11"
    pio.write(0x3F8, b"A")
    pio.write(0x3FC, b"\x01\x02")
    assert pio.serial.reads == [(5, 1)]
    assert pio.serial.writes == [(0, b"A"), (4, b"\x01\x02")]
    assert pio.unclaimed == {}


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unclaimed_read_is_all_ones_of_the_size(size):
    b = Bus("pio")
    assert b.read(0x80, size) == b"\xff" * size
    assert b.unclaimed == {0x80: 1}


def test_unclaimed_accesses_are_counted_per_address():
    b = Bus("pio")
    for _ in range(5):
        b.read(0x80, 1)
    b.write(0x80, b"\x00")
    b.write(0x61, b"\x00\x00")
    assert b.unclaimed == {0x80: 6, 0x61: 1}


def test_unclaimed_addresses_are_bounded():
    """A guest probing a million addresses must not grow the table: the first
    UNCLAIMED_ADDRESSES_MAX are counted one by one, every access in the total."""
    b = Bus("mmio")
    n = UNCLAIMED_ADDRESSES_MAX * 4
    for addr in range(n):
        b.read(addr, 1)
    b.read(0, 1)
    assert len(b.unclaimed) == UNCLAIMED_ADDRESSES_MAX
    assert b.unclaimed[0] == 2 and n - 1 not in b.unclaimed
    assert b.unclaimed_total == n + 1


def test_unclaimed_write_is_dropped(pio):
    pio.write(0x2F8, b"x")
    assert pio.serial.writes == []
    assert pio.unclaimed == {0x2F8: 1}


@pytest.mark.parametrize("addr, size", [(0x3FE, 4), (0x3FF, 2), (0x3F6, 4), (0x3F7, 2), (0x3F4, 16)])
def test_access_straddling_a_device_edge_is_unclaimed(pio, addr, size):
    assert pio.find(addr, size) is None
    assert pio.read(addr, size) == b"\xff" * size
    pio.write(addr, bytes(size))
    assert pio.serial.reads == [] and pio.serial.writes == []
    assert pio.unclaimed == {addr: 2}


def test_access_straddling_two_adjacent_devices_is_unclaimed(pio):
    left = Dev("left")
    pio.register(0x3F0, 8, left)
    assert pio.read(0x3F6, 4) == b"\xff" * 4
    assert left.reads == [] and pio.serial.reads == []


def test_short_device_reply_is_padded_with_ones():
    b = Bus("mmio")
    b.register(0x1000, 0x100, Dev("short", reply=b"\x12"))
    assert b.read(0x1000, 4) == b"\x12\xff\xff\xff"


def test_long_device_reply_is_truncated():
    b = Bus("mmio")
    b.register(0x1000, 0x100, Dev("long", reply=b"\x01\x02\x03\x04\x05\x06"))
    assert b.read(0x1004, 2) == b"\x01\x02"


def test_empty_or_bytearray_device_reply():
    b = Bus("mmio")
    b.register(0x1000, 0x10, Dev("empty", reply=b""))
    b.register(0x2000, 0x10, Dev("bytearray", reply=bytearray(b"\x07\x08")))
    assert b.read(0x1000, 2) == b"\xff\xff"
    data = b.read(0x2000, 2)
    assert data == b"\x07\x08"
    assert isinstance(data, (bytes, bytearray))


def test_large_addresses():
    b = Bus("mmio")
    d = Dev("high")
    b.register(0xFFFF_FFFF_F000, 0x1000, d)
    assert b.find(0xFFFF_FFFF_FFFF) == (d, 0xFFF)
    assert b.find(0xFFFF_FFFF_FFFF, 2) is None


# --- against a brute-force model ---------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 200), st.integers(-2, 40)), max_size=20),
       probes=st.lists(st.tuples(st.integers(0, 260), st.sampled_from([1, 2, 4, 8])), max_size=40),
       removals=st.lists(st.integers(0, 19), max_size=5))
def test_bus_agrees_with_brute_force(ranges, probes, removals):
    b = Bus("model")
    model: dict[int, tuple[int, Dev]] = {}       # base -> (length, device)
    for n, (base, length) in enumerate(ranges):
        dev = Dev(str(n))
        overlaps = any(base < mb + ml and mb < base + length for mb, (ml, _) in model.items())
        if length <= 0 or overlaps:
            with pytest.raises(BusError):
                b.register(base, length, dev)
        else:
            b.register(base, length, dev)
            model[base] = (length, dev)
    for k in removals:
        bases = sorted(model)
        if k < len(bases):
            assert b.unregister(bases[k]) is model.pop(bases[k])[1]

    for addr, size in probes:
        expected = None
        for mb, (ml, dev) in model.items():
            if mb <= addr and addr + size <= mb + ml:
                expected = (dev, addr - mb)
        assert b.find(addr, size) == expected
        if expected is None:
            assert b.read(addr, size) == b"\xff" * size
        else:
            assert b.read(addr, size) == b"\x11" * size


# --- concurrency -------------------------------------------------------------------------
def _lookups_during(b: Bus, action, probes):
    """Run ``action``; before each bytecode it executes in bus.py, let another thread
    run the lookups ``probes`` to completion, as a vCPU thread could when the GIL
    switches there.  A lookup that blocks (on a lock) is given 0.2 s, and no new one
    starts while it is outstanding.  Returns what the lookups saw."""
    seen: list = []
    threads: list[threading.Thread] = []

    def lookups():
        try:
            seen.append(tuple(b.find(addr) for addr in probes))
        except Exception as e:   # noqa: BLE001 - what a vCPU thread would have hit
            seen.append(e)

    def local(frame, event, arg):
        if event == "opcode" and not any(t.is_alive() for t in threads):
            t = threading.Thread(target=lookups)
            threads.append(t)
            t.start()
            t.join(0.2)
        return local

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != bus_module.__file__:
            return None
        frame.f_trace_opcodes = True
        return local

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(previous)
    for t in threads:
        t.join()
    assert len(threads) > 3, "the tracer did not see bus.py run"
    return seen


def test_find_during_register_sees_old_or_new_state():
    b = Bus("mmio")
    a, new = Dev("a"), Dev("new")
    b.register(0x10, 0x10, a)
    seen = _lookups_during(b, lambda: b.register(0x0, 0x10, new), probes=(0x5, 0x10))
    for result in seen:
        assert result in ((None, (a, 0)), ((new, 5), (a, 0))), result


def test_find_during_unregister_sees_old_or_new_state():
    b = Bus("mmio")
    gone, a = Dev("gone"), Dev("a")
    b.register(0x0, 0x10, gone)
    b.register(0x10, 0x10, a)
    seen = _lookups_during(b, lambda: b.unregister(0x0), probes=(0x5, 0x10))
    for result in seen:
        assert result in (((gone, 5), (a, 0)), (None, (a, 0))), result
