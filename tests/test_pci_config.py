"""PCI configuration space of one function (pyvmm.pci.config): header, masks, BARs, capabilities."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm.pci import config as cfg
from pyvmm.pci.config import BarInfo, PciConfigSpace

GiB = 1 << 30


def make(**kw) -> PciConfigSpace:
    args = dict(vendor_id=0x1AF4, device_id=0x1042, class_code=0x010000, revision=1,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
    args.update(kw)
    return PciConfigSpace(**args)


def rd(conf: PciConfigSpace, offset: int, size: int) -> int:
    data = conf.read(offset, size)
    assert len(data) == size
    return int.from_bytes(data, "little")


def wr(conf: PciConfigSpace, offset: int, value: int, size: int) -> None:
    conf.write(offset, value.to_bytes(size, "little"))


# --- header ------------------------------------------------------------------------------
def test_header_fields_at_their_offsets():
    conf = make(class_code=0x0C0330, revision=0x5A)
    assert rd(conf, 0x00, 2) == 0x1AF4
    assert rd(conf, 0x02, 2) == 0x1042
    assert rd(conf, 0x00, 4) == 0x1042_1AF4
    assert rd(conf, 0x08, 1) == 0x5A               # revision
    assert rd(conf, 0x09, 1) == 0x30               # prog-if
    assert rd(conf, 0x0A, 1) == 0x03               # subclass
    assert rd(conf, 0x0B, 1) == 0x0C               # base class
    assert rd(conf, 0x08, 4) == 0x0C0330_5A        # revision | class << 8, as Linux reads it
    assert rd(conf, 0x0A, 2) == 0x0C03
    assert rd(conf, 0x0E, 1) == cfg.PCI_HEADER_TYPE_NORMAL
    assert rd(conf, 0x2C, 2) == 0x1AF4
    assert rd(conf, 0x2E, 2) == 0x1100
    assert rd(conf, 0x2C, 4) == 0x1100_1AF4
    # nothing else set: command, status, BARs, capabilities pointer, interrupt pin
    assert rd(conf, 0x04, 4) == 0
    assert all(rd(conf, 0x10 + 4 * i, 4) == 0 for i in range(6))
    assert rd(conf, 0x34, 1) == 0
    assert rd(conf, 0x3D, 1) == 0


def test_header_type_argument():
    assert rd(make(header_type=0x80), 0x0E, 1) == 0x80


def test_command_register_takes_writable_bits_only():
    conf = make()
    wr(conf, cfg.PCI_COMMAND, 0xFFFF, 2)
    assert rd(conf, cfg.PCI_COMMAND, 2) == cfg.COMMAND_WRITABLE == 0x0547
    wr(conf, cfg.PCI_COMMAND, 0, 2)
    assert rd(conf, cfg.PCI_COMMAND, 2) == 0
    wr(conf, cfg.PCI_COMMAND, cfg.PCI_COMMAND_MEMORY | cfg.PCI_COMMAND_MASTER | 0x8, 2)  # 0x8: special cycles, RO
    assert rd(conf, cfg.PCI_COMMAND, 2) == cfg.PCI_COMMAND_MEMORY | cfg.PCI_COMMAND_MASTER
    # a byte write to the high byte leaves the low byte alone
    wr(conf, cfg.PCI_COMMAND + 1, 0xFF, 1)
    assert rd(conf, cfg.PCI_COMMAND, 2) == 0x0500 | cfg.PCI_COMMAND_MEMORY | cfg.PCI_COMMAND_MASTER


def test_command_and_status_in_one_dword_write():
    conf = make()
    conf.add_capability(0x09, b"\0\0")
    conf.set(cfg.PCI_STATUS, cfg.PCI_STATUS_CAP_LIST | 0x8000 | 0x2000, 2)  # device-side error bits
    # Linux writes command as a word, but a dword write must apply both masks
    wr(conf, cfg.PCI_COMMAND, 0x8000_0006, 4)
    assert rd(conf, cfg.PCI_COMMAND, 2) == 0x6
    assert rd(conf, cfg.PCI_STATUS, 2) == cfg.PCI_STATUS_CAP_LIST | 0x2000


def test_status_w1c_bits_clear_on_one_and_cap_list_is_read_only():
    conf = make()
    conf.add_capability(0x09, b"\0\0")
    errors = cfg.PCI_STATUS_W1C
    conf.set(cfg.PCI_STATUS, errors | cfg.PCI_STATUS_CAP_LIST, 2)
    wr(conf, cfg.PCI_STATUS, 0, 2)                                # writing 0 changes nothing
    assert rd(conf, cfg.PCI_STATUS, 2) == errors | cfg.PCI_STATUS_CAP_LIST
    wr(conf, cfg.PCI_STATUS, 0x8000, 2)                           # clears just that bit
    assert rd(conf, cfg.PCI_STATUS, 2) == (errors & ~0x8000) | cfg.PCI_STATUS_CAP_LIST
    wr(conf, cfg.PCI_STATUS, 0xFFFF, 2)                           # clears all errors, CAP_LIST stays
    assert rd(conf, cfg.PCI_STATUS, 2) == cfg.PCI_STATUS_CAP_LIST
    conf.set(cfg.PCI_STATUS, cfg.PCI_STATUS_CAP_LIST, 2)
    wr(conf, cfg.PCI_STATUS, 0xFFFF, 2)                           # ones never set a W1C bit
    assert rd(conf, cfg.PCI_STATUS, 2) == cfg.PCI_STATUS_CAP_LIST


@pytest.mark.parametrize("offset, size", [
    (0x00, 4), (0x00, 2), (0x02, 2), (0x08, 4), (0x09, 1), (0x0A, 2), (0x0E, 1),
    (0x2C, 4), (0x2E, 2), (0x34, 1), (0x3D, 1), (0x30, 4), (0x28, 4)])
def test_read_only_fields_ignore_writes(offset, size):
    conf = make()
    conf.add_capability(0x09, b"\1\2")
    before = bytes(conf.data)
    wr(conf, offset, (1 << (8 * size)) - 1, size)
    wr(conf, offset, 0, size)
    assert bytes(conf.data) == before


def test_writable_misc_registers():
    conf = make()
    for off in (cfg.PCI_CACHE_LINE_SIZE, cfg.PCI_LATENCY_TIMER, cfg.PCI_INTERRUPT_LINE):
        wr(conf, off, 0xA5, 1)
        assert rd(conf, off, 1) == 0xA5
    wr(conf, cfg.PCI_INTERRUPT_PIN, 0x1, 1)
    assert rd(conf, cfg.PCI_INTERRUPT_PIN, 1) == 0


# --- BARs ----------------------------------------------------------------------------------
def test_bar_flags():
    assert BarInfo(0, 0x1000).flags == 0
    assert BarInfo(0, 0x1000, is64=True).flags == 0x4
    assert BarInfo(0, 0x1000, is64=True, prefetchable=True).flags == 0xC
    assert BarInfo(0, 0x1000, prefetchable=True).flags == 0x8
    assert BarInfo(0, 0x100, io=True).flags == 0x1


def test_sizing_32bit_memory_bar():
    conf = make()
    conf.add_bar(BarInfo(0, 0x8000))
    off = cfg.PCI_BASE_ADDRESS_0
    assert rd(conf, off, 4) == 0                              # type 00, not prefetchable, address 0
    wr(conf, off, 0xFFFFFFFF, 4)
    assert rd(conf, off, 4) == 0xFFFF8000                     # ~(size-1) | flags
    size = (~(rd(conf, off, 4) & ~0xF) + 1) & 0xFFFFFFFF      # what a driver computes
    assert size == 0x8000
    wr(conf, off, 0xC0008000, 4)
    assert rd(conf, off, 4) == 0xC0008000
    assert conf.bar_address(0) == 0xC0008000
    wr(conf, off, 0xC0001234, 4)                              # bits below the size are not writable
    assert conf.bar_address(0) == 0xC0000000


def test_sizing_64bit_prefetchable_bar():
    conf = make()
    conf.add_bar(BarInfo(2, 0x4000, is64=True, prefetchable=True))
    lo, hi = cfg.PCI_BASE_ADDRESS_0 + 8, cfg.PCI_BASE_ADDRESS_0 + 12
    assert rd(conf, lo, 4) == 0xC
    wr(conf, lo, 0xFFFFFFFF, 4)
    wr(conf, hi, 0xFFFFFFFF, 4)
    assert rd(conf, lo, 4) == 0xFFFFC00C
    assert rd(conf, hi, 4) == 0xFFFFFFFF                      # < 4 GiB: all upper bits are address
    sz64 = (rd(conf, hi, 4) << 32) | (rd(conf, lo, 4) & ~0xF)
    assert ((~sz64 + 1) & (2**64 - 1)) == 0x4000
    conf.set_bar_address(2, 0x0000_0012_3456_C000)
    assert rd(conf, lo, 4) == 0x3456C00C
    assert rd(conf, hi, 4) == 0x12
    assert conf.bar_address(2) == 0x12_3456_C000


def test_sizing_64bit_bar_larger_than_4gib():
    conf = make()
    conf.add_bar(BarInfo(0, 8 * GiB, is64=True, prefetchable=True))
    lo, hi = cfg.PCI_BASE_ADDRESS_0, cfg.PCI_BASE_ADDRESS_0 + 4
    wr(conf, lo, 0xFFFFFFFF, 4)
    wr(conf, hi, 0xFFFFFFFF, 4)
    assert rd(conf, lo, 4) == 0x0000000C                      # no address bits in the low dword
    assert rd(conf, hi, 4) == 0xFFFFFFFE                      # 8 GiB -> bit 33 up
    sz64 = (rd(conf, hi, 4) << 32) | (rd(conf, lo, 4) & ~0xF)
    assert ((~sz64 + 1) & (2**64 - 1)) == 8 * GiB
    wr(conf, hi, 0x3, 4)
    assert conf.bar_address(0) == 2 << 32                     # bit 32 is below the size


def test_io_bar_sizing():
    conf = make()
    conf.add_bar(BarInfo(1, 0x20, io=True))
    off = cfg.PCI_BASE_ADDRESS_0 + 4
    assert rd(conf, off, 4) == 0x1
    wr(conf, off, 0xFFFFFFFF, 4)
    assert rd(conf, off, 4) == 0xFFFFFFE1
    conf.set_bar_address(1, 0xC040)
    assert conf.bar_address(1) == 0xC040


@pytest.mark.parametrize("bar, address", [
    (BarInfo(0, 0x1000), 0xFEBF_F000),
    (BarInfo(5, 0x10), 0x10),
    (BarInfo(1, 0x100000, is64=True), 0x0000_00FF_FFF0_0000),
    (BarInfo(4, 4 * GiB, is64=True, prefetchable=True), 0x0000_7FFF_0000_0000),
])
def test_set_bar_address_round_trip(bar, address):
    conf = make()
    conf.add_bar(bar)
    conf.set_bar_address(bar.index, address)
    assert conf.bar_address(bar.index) == address
    # flags survive and the guest sees the same address
    low = rd(conf, cfg.PCI_BASE_ADDRESS_0 + 4 * bar.index, 4)
    assert low & 0xF == bar.flags
    if bar.is64:
        assert rd(conf, cfg.PCI_BASE_ADDRESS_0 + 4 * bar.index + 4, 4) == address >> 32


def test_bar_for_offset():
    conf = make()
    conf.add_bar(BarInfo(0, 0x1000))
    conf.add_bar(BarInfo(2, 0x4000, is64=True))
    base = cfg.PCI_BASE_ADDRESS_0
    assert conf.bar_for_offset(base) == 0
    assert conf.bar_for_offset(base + 3) == 0
    assert conf.bar_for_offset(base + 4) is None                 # BAR1 unused
    assert conf.bar_for_offset(base + 8) == 2
    assert conf.bar_for_offset(base + 12) == 2                   # upper dword of BAR2
    assert conf.bar_for_offset(base + 15) == 2
    assert conf.bar_for_offset(base + 16) is None
    assert conf.bar_for_offset(base + 20) is None
    assert conf.bar_for_offset(base - 1) is None
    assert conf.bar_for_offset(base + 24) is None                # expansion ROM is not a BAR
    assert conf.bar_for_offset(0) is None


@pytest.mark.parametrize("bar", [
    BarInfo(0, 0x3000),                   # not a power of two
    BarInfo(0, 0x1001),
    BarInfo(0, 0),
    BarInfo(0, 8),                        # memory BARs are at least 16 bytes
    BarInfo(0, 2, io=True),               # I/O BARs at least 4
    BarInfo(6, 0x1000),                   # only six BARs
    BarInfo(-1, 0x1000),
    BarInfo(5, 0x1000, is64=True),        # a 64-bit BAR needs two slots
])
def test_add_bar_rejects(bar):
    conf = make()
    with pytest.raises(ValueError):
        conf.add_bar(bar)
    assert conf.bars == {}
    assert all(b == 0 for b in conf.writable[0x10:0x28])


def test_add_bar_rejects_index_taken_and_upper_half():
    conf = make()
    conf.add_bar(BarInfo(0, 0x1000))
    conf.add_bar(BarInfo(2, 0x1000, is64=True))
    with pytest.raises(ValueError):
        conf.add_bar(BarInfo(0, 0x2000))                          # taken
    with pytest.raises(ValueError):
        conf.add_bar(BarInfo(3, 0x1000))                          # upper half of BAR2
    with pytest.raises(ValueError):
        conf.add_bar(BarInfo(3, 0x1000, is64=True))
    conf.add_bar(BarInfo(4, 0x1000, is64=True))                   # 4+5: fine
    assert sorted(conf.bars) == [0, 2, 4]


def test_add_64bit_bar_over_existing_next_bar_is_rejected():
    conf = make()
    conf.add_bar(BarInfo(1, 0x1000))
    with pytest.raises(ValueError):
        conf.add_bar(BarInfo(0, 0x1000, is64=True))              # would use BAR1 as its upper dword


def test_bar_writes_through_partial_accesses():
    conf = make()
    conf.add_bar(BarInfo(0, 0x1000))
    off = cfg.PCI_BASE_ADDRESS_0
    wr(conf, off + 3, 0xC1, 1)
    wr(conf, off + 1, 0xFF, 1)                                   # bits 8-11 are below the size
    assert conf.bar_address(0) == 0xC100_0000 | 0xF000
    wr(conf, off, 0xFFFF, 2)
    assert rd(conf, off, 4) == 0xC100F000


# --- capabilities ---------------------------------------------------------------------------------
def test_capability_chain():
    conf = make()
    assert conf.capabilities() == []
    assert not rd(conf, cfg.PCI_STATUS, 2) & cfg.PCI_STATUS_CAP_LIST
    a = conf.add_capability(0x09, bytes(range(14)))          # 16 bytes
    b = conf.add_capability(0x11, b"\xAA" * 9)               # 11 bytes -> next is rounded up
    c = conf.add_capability(0x05, b"\x01")                   # 3 bytes
    assert (a, b, c) == (0x40, 0x50, 0x5C)
    assert all(off % 4 == 0 for off in (a, b, c))
    assert rd(conf, cfg.PCI_STATUS, 2) & cfg.PCI_STATUS_CAP_LIST
    assert rd(conf, cfg.PCI_CAPABILITY_LIST, 1) == a
    assert conf.capabilities() == [(0x09, a), (0x11, b), (0x05, c)]
    # walk it as a driver would, through guest reads
    seen, ptr = [], rd(conf, cfg.PCI_CAPABILITY_LIST, 1)
    while ptr:
        seen.append((rd(conf, ptr, 1), ptr))
        ptr = rd(conf, ptr + 1, 1)
    assert seen == conf.capabilities()
    assert bytes(conf.read(a + 2, 4)) == bytes(range(4))
    assert rd(conf, c + 2, 1) == 1


def test_capability_writable_mask_is_honoured():
    conf = make()
    off = conf.add_capability(0x11, b"\x00\x00\x12\x34", writable=b"\x00\xC0")
    wr(conf, off, 0xFFFFFFFF, 4)                               # id/next read-only, control 0xC000
    assert rd(conf, off, 1) == 0x11
    assert rd(conf, off + 1, 1) == 0
    assert rd(conf, off + 2, 2) == 0xC000
    wr(conf, off + 4, 0, 2)                                    # body without a mask: read-only
    assert rd(conf, off + 4, 2) == 0x3412
    wr(conf, off + 2, 0, 2)
    assert rd(conf, off + 2, 2) == 0


def test_capabilities_do_not_fit():
    conf = make()
    conf.add_capability(0x09, bytes(0xB0))                    # 0x40 .. 0xF2 -> next at 0xF4
    with pytest.raises(ValueError):
        conf.add_capability(0x09, bytes(12))                  # 0xF4 + 14 > 0x100
    last = conf.add_capability(0x05, bytes(10))               # 0xF4 + 12 == 0x100 fits exactly
    assert last == 0xF4
    assert conf.capabilities() == [(0x09, 0x40), (0x05, 0xF4)]


def test_capabilities_survive_a_looped_chain():
    conf = make()
    a = conf.add_capability(0x09, b"\0\0")
    b = conf.add_capability(0x10, b"\0\0")
    conf.data[b + 1] = a                                      # the guest cannot do this; a bug could
    assert conf.capabilities() == [(0x09, a), (0x10, b)]
    conf.data[a + 1] = a                                      # self loop
    assert conf.capabilities() == [(0x09, a)]
    conf.data[cfg.PCI_CAPABILITY_LIST] = 0xFF                 # unaligned, low bits ignored
    conf.data[0xFC], conf.data[0xFD] = 0x42, 0xFF
    assert conf.capabilities() == [(0x42, 0xFC)]


def test_capability_pointers_are_read_only():
    conf = make()
    a = conf.add_capability(0x09, b"\0\0")
    conf.add_capability(0x10, b"\0\0")
    before = conf.capabilities()
    wr(conf, cfg.PCI_CAPABILITY_LIST, 0x80, 1)
    wr(conf, a, 0xFFFF, 2)
    assert conf.capabilities() == before


# --- access sizes and bounds ------------------------------------------------------------------------
def populated() -> PciConfigSpace:
    conf = make()
    conf.add_bar(BarInfo(0, 0x1000))
    conf.add_bar(BarInfo(2, 0x4000, is64=True, prefetchable=True))
    conf.add_capability(0x09, bytes(range(1, 15)))
    conf.add_capability(0x11, b"\x07\x00\x00\x40\x00\x00\x00\x50\x00\x00", writable=b"\x00\xC0")
    for i in range(0x100):
        if not conf.writable[i] and not conf.w1c[i] and conf.data[i] == 0 and i >= 0x80:
            conf.data[i] = i  # make every byte distinguishable
    return conf


@pytest.mark.parametrize("size", [1, 2, 4])
def test_reads_at_every_offset(size):
    conf = populated()
    for off in range(cfg.CONFIG_SPACE_SIZE):
        data = conf.read(off, size)
        if off + size <= cfg.CONFIG_SPACE_SIZE:
            assert data == bytes(conf.data[off:off + size]), off
        else:
            assert data == b"\xff" * size, off


@pytest.mark.parametrize("size", [1, 2, 4])
def test_writes_at_every_offset_follow_the_masks(size):
    conf = populated()
    for value in (0xFF, 0x00, 0xA5):
        for off in range(cfg.CONFIG_SPACE_SIZE):
            before = bytes(conf.data)
            conf.write(off, bytes([value]) * size)
            for i in range(size):
                pos = off + i
                if pos >= cfg.CONFIG_SPACE_SIZE:
                    continue
                w, c, old = conf.writable[pos], conf.w1c[pos], before[pos]
                assert conf.data[pos] == ((old & ~w) | (value & w)) & ~(value & c) & 0xFF, (off, i)
            untouched = [p for p in range(cfg.CONFIG_SPACE_SIZE) if not off <= p < off + size]
            assert all(conf.data[p] == before[p] for p in untouched)


@pytest.mark.parametrize("offset, size", [
    (256, 1), (255, 2), (254, 4), (253, 4), (0x1000, 4), (-1, 1), (-4, 4), (0, 3), (0, 8), (0, 0)])
def test_out_of_range_reads_are_all_ones(offset, size):
    assert make().read(offset, size) == b"\xff" * size


def test_out_of_range_writes_are_dropped():
    conf = populated()
    before = bytes(conf.data)
    conf.write(256, b"\x00" * 4)
    conf.write(-4, b"\x00" * 4)
    conf.write(0x1000, b"\xff")
    assert bytes(conf.data) == before
    conf.write(0xFE, b"\x00\x00\x00\x00")                     # straddles the end: only in-range bytes
    assert bytes(conf.data) == before                         # (those are read-only here)
    conf.write(0x3B, b"\x00\x77")                              # straddles into INTERRUPT_LINE
    assert conf.data[0x3C] == 0x77


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-8, 300), st.sampled_from([0, 1, 2, 3, 4, 8]),
                          st.binary(min_size=0, max_size=8), st.booleans()), max_size=40))
def test_random_accesses_never_raise_and_keep_read_only_bytes(ops):
    conf = populated()
    before = bytes(conf.data)
    for offset, size, data, is_write in ops:
        if is_write:
            conf.write(offset, data)
        else:
            got = conf.read(offset, size)
            assert len(got) == size
    # bytes that are neither writable nor W1C never change
    for pos in range(cfg.CONFIG_SPACE_SIZE):
        if not conf.writable[pos] and not conf.w1c[pos]:
            assert conf.data[pos] == before[pos], pos
        if conf.w1c[pos]:
            assert conf.data[pos] & ~before[pos] == 0             # W1C bits only ever clear
    assert conf.capabilities() == [(0x09, 0x40), (0x11, 0x50)]
    assert conf.read(0, 4) == struct.pack("<HH", 0x1AF4, 0x1042)
