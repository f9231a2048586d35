"""The E820 map and the RAM-backing -> guest-physical mapping."""

import ctypes

import pytest
from hypothesis import given, strategies as st

from pyvmm.boot.e820 import (
    E820_TYPE_RAM,
    E820_TYPE_RESERVED,
    MIN_RAM_SIZE,
    PAGE_SIZE,
    E820Entry,
    e820_map,
    ram_ranges,
)
from pyvmm.boot.layout import GiB, MiB

LOW_RESERVED = [
    (0x9FC00, 0x400, E820_TYPE_RESERVED),       # EBDA: the MP table
    (0xF0000, 0x10000, E820_TYPE_RESERVED),     # BIOS area
]


def test_e820_entry_matches_boot_e820_entry():
    assert ctypes.sizeof(E820Entry) == 20
    assert (E820Entry.addr.offset, E820Entry.size.offset, E820Entry.type.offset) == (0, 8, 16)
    entry = E820Entry(addr=0x100000, size=0x2000, type=E820_TYPE_RAM)
    assert bytes(entry) == (0x100000).to_bytes(8, "little") + (0x2000).to_bytes(8, "little") + b"\1\0\0\0"


def test_small_ram():
    assert e820_map(128 * MiB) == [
        (0, 0x9FC00, E820_TYPE_RAM),
        *LOW_RESERVED,
        (0x100000, 128 * MiB - 0x100000, E820_TYPE_RAM),
    ]
    assert ram_ranges(128 * MiB) == [(0, 128 * MiB, 0)]


def test_exactly_3_gib_has_no_high_part():
    table = e820_map(3 * GiB)
    assert table[-1] == (0x100000, 3 * GiB - 0x100000, E820_TYPE_RAM)
    assert len(table) == 4
    assert ram_ranges(3 * GiB) == [(0, 3 * GiB, 0)]


def test_ram_above_3_gib_moves_to_4_gib():
    table = e820_map(5 * GiB)
    assert table[-2] == (0x100000, 3 * GiB - 0x100000, E820_TYPE_RAM)
    assert table[-1] == (4 * GiB, 2 * GiB, E820_TYPE_RAM)
    assert ram_ranges(5 * GiB) == [(0, 3 * GiB, 0), (4 * GiB, 2 * GiB, 3 * GiB)]


@pytest.mark.parametrize("bad", [0, MIN_RAM_SIZE - PAGE_SIZE, 64 * MiB + 1])
def test_bad_sizes_rejected(bad):
    with pytest.raises(ValueError):
        e820_map(bad)
    with pytest.raises(ValueError):
        ram_ranges(bad)


ram_sizes = st.integers(MIN_RAM_SIZE // PAGE_SIZE, 64 * GiB // PAGE_SIZE).map(lambda n: n * PAGE_SIZE)


@given(ram_sizes)
def test_ranges_sorted_disjoint_and_outside_the_mmio_hole(ram_size):
    table = e820_map(ram_size)
    for (a, a_size, _), (b, _, _) in zip(table, table[1:]):
        assert a + a_size <= b
    for addr, size, kind in table:
        assert size > 0
        assert addr + size <= 3 * GiB or addr >= 4 * GiB


@given(ram_sizes)
def test_ram_ranges_cover_the_backing_exactly(ram_size):
    ranges = ram_ranges(ram_size)
    assert sum(size for _, size, _ in ranges) == ram_size
    offset = 0
    for gpa, size, backing_offset in ranges:
        assert backing_offset == offset
        assert gpa % PAGE_SIZE == 0 and size % PAGE_SIZE == 0
        offset += size


@given(ram_sizes)
def test_e820_ram_is_backed(ram_size):
    """Every E820 RAM range lies inside a RAM range of the backing, and the
    only backed bytes not reported as RAM are below 1 MiB."""
    ranges = ram_ranges(ram_size)
    ram = [(a, s) for a, s, kind in e820_map(ram_size) if kind == E820_TYPE_RAM]
    for addr, size in ram:
        assert any(gpa <= addr and addr + size <= gpa + rsize for gpa, rsize, _ in ranges)
    unreported = ram_size - sum(size for _, size in ram)
    assert unreported == 0x100000 - 0x9FC00
