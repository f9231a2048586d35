"""The PCI root complex (pyvmm.pci.root): config mechanism #1, host bridge, BAR allocation and mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm.bus import Bus
from pyvmm.pci import config as cfg
from pyvmm.pci.config import BarInfo, PciConfigSpace
from pyvmm.pci.device import BarRegion, PciDevice
from pyvmm.pci.root import (HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR, PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA,
                            PCI_CONFIG_IO_LEN, AddressWindow, PciRoot)

GiB = 1 << 30
W32 = (3 * GiB, 0xFEC00000)              # as pyvmm.vm.pci_windows lays them out for a small guest
W64 = (4 * GiB, 4 * GiB + 64 * GiB)
BAR0_SIZE = 0x1000                       # 32-bit
BAR2_SIZE = 0x4000                       # 64-bit prefetchable
BAR0 = cfg.PCI_BASE_ADDRESS_0
BAR2_LO, BAR2_HI = cfg.PCI_BASE_ADDRESS_0 + 8, cfg.PCI_BASE_ADDRESS_0 + 12


class FakeDevice(PciDevice):
    """One 32-bit BAR (0) and one 64-bit BAR (2); records what the root does to it."""

    def __init__(self, bar0: int = BAR0_SIZE, bar2: int = BAR2_SIZE, mmio: bool = True) -> None:
        conf = PciConfigSpace(0x1234, 0x5678, 0xFF0000, revision=3)
        conf.add_bar(BarInfo(0, bar0))
        conf.add_bar(BarInfo(2, bar2, is64=True, prefetchable=True))
        super().__init__(conf)
        self.mmio = mmio
        self.reads: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, bytes]] = []
        self.moves: list[tuple[int, int | None, int | None]] = []
        self.closed = False

    def bar_read(self, bar, offset, size):
        self.reads.append((bar, offset, size))
        return bytes([0x40 + bar]) * size

    def bar_write(self, bar, offset, data):
        self.writes.append((bar, offset, bytes(data)))

    def bar_moved(self, bar, old, new):
        self.moves.append((bar, old, new))

    def bar_is_mmio(self, bar):
        return self.mmio

    def close(self):
        self.closed = True


class Machine:
    """The root on a port-I/O bus, as pyvmm.vm wires it, plus conf1 helpers."""

    def __init__(self) -> None:
        self.mmio = Bus("mmio")
        self.pio = Bus("pio")
        self.root = PciRoot(self.mmio, W32, W64)
        self.pio.register(PCI_CONFIG_ADDRESS, PCI_CONFIG_IO_LEN, self.root)

    @staticmethod
    def address(slot: int, reg: int, bus: int = 0, function: int = 0, enable: bool = True) -> int:
        return (enable << 31) | (bus << 16) | (slot << 11) | (function << 8) | (reg & 0xFC)

    def select(self, slot: int, reg: int, **kw) -> None:
        self.pio.write(PCI_CONFIG_ADDRESS, self.address(slot, reg, **kw).to_bytes(4, "little"))

    def cfg_read(self, slot: int, reg: int, size: int = 4, **kw) -> int:
        self.select(slot, reg, **kw)
        return int.from_bytes(self.pio.read(PCI_CONFIG_DATA + (reg & 3), size), "little")

    def cfg_write(self, slot: int, reg: int, value: int, size: int = 4, **kw) -> None:
        self.select(slot, reg, **kw)
        self.pio.write(PCI_CONFIG_DATA + (reg & 3), value.to_bytes(size, "little"))


@pytest.fixture
def m():
    return Machine()


@pytest.fixture
def dev_m(m):
    dev = FakeDevice()
    slot = m.root.add(dev)
    m.dev, m.slot = dev, slot
    return m


# --- configuration mechanism #1 -----------------------------------------------------------------
def test_address_register_dword_read_write(m):
    assert m.pio.read(0xCF8, 4) == b"\0\0\0\0"
    m.pio.write(0xCF8, (0x80000000).to_bytes(4, "little"))     # Linux's pci_check_type1 probe
    assert int.from_bytes(m.pio.read(0xCF8, 4), "little") == 0x80000000
    m.pio.write(0xCF8, (0x8001_2A3C).to_bytes(4, "little"))
    assert int.from_bytes(m.pio.read(0xCF8, 4), "little") == 0x8001_2A3C


@pytest.mark.parametrize("port, size", [(0xCF8, 1), (0xCF8, 2), (0xCF9, 1), (0xCFA, 2), (0xCFB, 1)])
def test_non_dword_address_register_accesses(m, port, size):
    m.pio.write(0xCF8, (0x80000800).to_bytes(4, "little"))
    assert m.pio.read(port, size) == b"\xff" * size
    m.pio.write(port, b"\x01" * size)                            # e.g. outb(0x01, 0xCFB): ignored
    assert int.from_bytes(m.pio.read(0xCF8, 4), "little") == 0x80000800


def test_host_bridge_at_00_00_0(m):
    assert m.cfg_read(0, 0x00, 2) == HOST_BRIDGE_VENDOR == 0x8086
    assert m.cfg_read(0, 0x02, 2) == HOST_BRIDGE_DEVICE
    assert m.cfg_read(0, 0x00) == (HOST_BRIDGE_DEVICE << 16) | HOST_BRIDGE_VENDOR
    assert m.cfg_read(0, 0x0A, 2) == 0x0600                      # what pci_sanity_check looks for
    assert m.cfg_read(0, 0x08) >> 8 == 0x060000
    assert m.cfg_read(0, 0x0E, 1) == 0                           # single function, type 0
    assert m.root.devices[0].config.bars == {}


@pytest.mark.parametrize("kw", [
    dict(enable=False),
    dict(bus=1),
    dict(bus=0xFF),
    dict(function=1),
    dict(function=7),
])
def test_inaccessible_functions_read_all_ones(m, kw):
    assert m.cfg_read(0, 0x00, 4, **kw) == 0xFFFFFFFF
    assert m.cfg_read(0, 0x02, 2, **kw) == 0xFFFF
    assert m.cfg_read(0, 0x0B, 1, **kw) == 0xFF
    m.cfg_write(0, 0x3C, 0x55, 1, **kw)                          # writes go nowhere
    assert m.cfg_read(0, 0x3C, 1) == 0


@pytest.mark.parametrize("slot", [1, 5, 31])
def test_empty_slot_reads_all_ones(m, slot):
    assert m.cfg_read(slot, 0x00) == 0xFFFFFFFF
    m.cfg_write(slot, 0x04, 0xFFFF, 2)                           # no exception


def test_byte_and_word_accesses_reach_register_plus_n(m):
    vendor_device = m.cfg_read(0, 0x00)
    m.select(0, 0x00)
    for n in range(4):
        assert m.pio.read(PCI_CONFIG_DATA + n, 1)[0] == (vendor_device >> (8 * n)) & 0xFF
    assert int.from_bytes(m.pio.read(0xCFE, 2), "little") == HOST_BRIDGE_DEVICE
    assert int.from_bytes(m.pio.read(0xCFD, 2), "little") == (vendor_device >> 8) & 0xFFFF
    # writes at 0xCFC+n land on register+n: cache line size (0x0C) and latency timer (0x0D)
    m.select(0, 0x0C)
    m.pio.write(0xCFD, b"\x40")
    m.pio.write(0xCFC, b"\x10")
    assert m.cfg_read(0, 0x0C, 2) == 0x4010
    m.select(0, 0x3C)                                            # interrupt line/pin, word at 0xCFC
    m.pio.write(0xCFC, b"\x0B\x01")
    assert m.cfg_read(0, 0x3C, 2) == 0x000B                      # pin is read-only


def test_address_register_low_bits_do_not_offset_the_register(m):
    m.pio.write(0xCF8, (m.address(0, 0) | 0x3).to_bytes(4, "little"))
    assert int.from_bytes(m.pio.read(0xCFC, 4), "little") == m.root.devices[0].config.get(0, 4)


def test_config_reads_through_the_port_bus_never_raise(m):
    # straddling 0xCFF / 0xCFB is not a device access (Bus.find refuses it)
    assert m.pio.read(0xCFE, 4) == b"\xff" * 4
    for reg in range(0, 0x100, 4):
        m.select(0, reg)
        for port in range(0xCF8, 0xD00):
            for size in (1, 2, 4):
                assert len(m.pio.read(port, size)) == size


# --- adding devices -----------------------------------------------------------------------------
def test_add_allocates_naturally_aligned_bars_in_the_windows(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    assert slot == 1
    a0, a2 = dev.config.bar_address(0), dev.config.bar_address(2)
    assert W32[0] <= a0 and a0 + BAR0_SIZE <= W32[1] and a0 % BAR0_SIZE == 0
    assert W64[0] <= a2 and a2 + BAR2_SIZE <= W64[1] and a2 % BAR2_SIZE == 0
    cmd = m.cfg_read(slot, cfg.PCI_COMMAND, 2)
    assert cmd & cfg.PCI_COMMAND_MEMORY and cmd & cfg.PCI_COMMAND_MASTER
    # the guest sees the same addresses through conf1
    assert m.cfg_read(slot, BAR0) == a0
    assert m.cfg_read(slot, BAR2_LO) == (a2 & 0xFFFFFFFF) | 0xC
    assert m.cfg_read(slot, BAR2_HI) == a2 >> 32
    assert m.cfg_read(slot, 0) == 0x5678_1234
    assert m.root.bar_address(slot, 0) == a0
    assert m.root.bar_address(slot, 2) == a2
    assert sorted(dev.moves) == [(0, None, a0), (2, None, a2)]


def test_bars_on_the_mmio_bus_reach_the_device(dev_m):
    m, dev = dev_m, dev_m.dev
    a0, a2 = dev.config.bar_address(0), dev.config.bar_address(2)
    region, offset = m.mmio.find(a0 + 0x10, 4)
    assert isinstance(region, BarRegion) and region.device is dev and region.bar == 0 and offset == 0x10
    assert m.mmio.find(a0 + BAR0_SIZE - 1) is not None
    assert m.mmio.find(a0 + BAR0_SIZE - 2, 4) is None           # runs past the BAR
    assert m.mmio.read(a0 + 0x10, 4) == b"\x40" * 4
    assert m.mmio.read(a2 + 0x3FFC, 4) == b"\x42" * 4
    m.mmio.write(a0 + 0xFFF, b"\x99")
    m.mmio.write(a2, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert dev.reads == [(0, 0x10, 4), (2, 0x3FFC, 4)]
    assert dev.writes == [(0, 0xFFF, b"\x99"), (2, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08")]


def test_two_devices_get_disjoint_bars(m):
    d1, d2 = FakeDevice(), FakeDevice(bar0=0x100000, bar2=0x100000)
    s1, s2 = m.root.add(d1), m.root.add(d2)
    assert (s1, s2) == (1, 2)
    ranges = sorted([(d.config.bar_address(i), d.config.bars[i].size) for d in (d1, d2) for i in (0, 2)])
    for (a, sa), (b, _) in zip(ranges, ranges[1:]):
        assert a + sa <= b
    for d in (d1, d2):
        for i in (0, 2):
            assert d.config.bar_address(i) % d.config.bars[i].size == 0
            assert m.mmio.find(d.config.bar_address(i))[0].device is d


def test_add_slot_choice_and_errors(m):
    assert m.root.add(FakeDevice(), slot=7) == 7
    with pytest.raises(ValueError):
        m.root.add(FakeDevice(), slot=7)                         # taken
    with pytest.raises(ValueError):
        m.root.add(FakeDevice(), slot=0)                         # the host bridge
    with pytest.raises(ValueError):
        m.root.add(FakeDevice(), slot=32)
    assert m.root.add(FakeDevice()) == 1                         # lowest free slot
    for _ in range(29):
        m.root.add(PciDevice(PciConfigSpace(1, 2, 0)))
    assert len(m.root.devices) == 32
    with pytest.raises(ValueError):
        m.root.add(PciDevice(PciConfigSpace(1, 2, 0)))


def test_device_without_bars_has_decode_off(m):
    slot = m.root.add(PciDevice(PciConfigSpace(1, 2, 0)))
    assert m.cfg_read(slot, cfg.PCI_COMMAND, 2) == 0


def test_io_bars_are_refused(m):
    conf = PciConfigSpace(1, 2, 0)
    conf.add_bar(BarInfo(0, 0x20, io=True))
    with pytest.raises(ValueError):
        m.root.add(PciDevice(conf))


def test_window_exhaustion(m):
    with pytest.raises(ValueError):
        m.root.add(FakeDevice(bar0=2 * GiB))


def test_address_window_allocator():
    w = AddressWindow(0x1000, 0x10000)
    assert w.allocate(0x10) == 0x1000
    assert w.allocate(0x4000) == 0x4000                          # aligned up
    assert w.allocate(0x10) == 0x8000
    with pytest.raises(ValueError):
        w.allocate(0x8000)                                       # aligned to 0x10000: past the end
    assert w.allocate(0x4000) == 0xC000                          # a failure consumes nothing
    w2 = AddressWindow(0x1000, 0x4000)
    assert w2.allocate(0x2000) == 0x2000
    with pytest.raises(ValueError):
        w2.allocate(0x10)                                        # full
    assert w2.contains(0x1000, 0x3000) and w2.contains(0x3FF0, 0x10)
    assert not w2.contains(0x3000, 0x2000) and not w2.contains(0, 0x10) and not w2.contains(0xFF0, 0x20)


def test_close_closes_devices(dev_m):
    dev_m.root.close()
    assert dev_m.dev.closed


# --- the guest reprograms BARs ---------------------------------------------------------------------
def linux_size_bars(m: Machine, slot: int) -> dict[int, int]:
    """__pci_read_base's sequence: decode off, per BAR save / write ~0 / read / restore, decode back."""
    cmd = m.cfg_read(slot, cfg.PCI_COMMAND, 2)
    m.cfg_write(slot, cfg.PCI_COMMAND, cmd & ~cfg.PCI_COMMAND_MEMORY, 2)
    sizes, reg = {}, BAR0
    while reg < BAR0 + 24:
        orig = m.cfg_read(slot, reg)
        m.cfg_write(slot, reg, 0xFFFFFFFF)
        sz = m.cfg_read(slot, reg)
        m.cfg_write(slot, reg, orig)
        if orig & 0x4:                                           # 64-bit: the upper dword too
            orig_hi = m.cfg_read(slot, reg + 4)
            m.cfg_write(slot, reg + 4, 0xFFFFFFFF)
            sz_hi = m.cfg_read(slot, reg + 4)
            m.cfg_write(slot, reg + 4, orig_hi)
            mask = (sz_hi << 32) | (sz & ~0xF)
            sizes[(reg - BAR0) // 4] = (~mask + 1) & (2**64 - 1)
            reg += 8
            continue
        if sz:
            sizes[(reg - BAR0) // 4] = (~(sz & ~0xF) + 1) & 0xFFFFFFFF
        reg += 4
    m.cfg_write(slot, cfg.PCI_COMMAND, cmd, 2)
    return sizes


def test_guest_sizing_sequence_restores_the_mapping(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a0, a2 = m.root.bar_address(slot, 0), m.root.bar_address(slot, 2)
    dev.moves.clear()
    assert linux_size_bars(m, slot) == {0: BAR0_SIZE, 2: BAR2_SIZE}
    assert m.root.bar_address(slot, 0) == a0 and m.root.bar_address(slot, 2) == a2
    assert dev.config.bar_address(0) == a0 and dev.config.bar_address(2) == a2
    assert m.mmio.find(a0)[0].device is dev and m.mmio.find(a2)[0].device is dev
    # decode off unmapped both, decode on mapped both back; nothing in between
    assert sorted(dev.moves[:2]) == [(0, a0, None), (2, a2, None)]
    assert sorted(dev.moves[2:]) == [(0, None, a0), (2, None, a2)]
    assert len(dev.moves) == 4


def test_decode_off_unmaps_and_on_maps(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a0, a2 = m.root.bar_address(slot, 0), m.root.bar_address(slot, 2)
    dev.moves.clear()
    m.cfg_write(slot, cfg.PCI_COMMAND, cfg.PCI_COMMAND_MASTER, 2)
    assert m.mmio.find(a0) is None and m.mmio.find(a2) is None
    assert m.root.bar_address(slot, 0) is None and m.root.bar_address(slot, 2) is None
    assert m.mmio.read(a0, 4) == b"\xff" * 4
    assert not dev.reads
    # BAR writes while decode is off: no bus traffic, no callbacks
    m.cfg_write(slot, BAR0, 0xFFFFFFFF)
    m.cfg_write(slot, BAR0, a0)
    assert sorted(dev.moves) == [(0, a0, None), (2, a2, None)]
    m.cfg_write(slot, cfg.PCI_COMMAND, cfg.PCI_COMMAND_MASTER | cfg.PCI_COMMAND_MEMORY, 2)
    assert m.mmio.find(a0)[0].device is dev and m.mmio.find(a2)[0].device is dev
    assert sorted(dev.moves[2:]) == [(0, None, a0), (2, None, a2)]
    # a command write that leaves decode on changes nothing
    m.cfg_write(slot, cfg.PCI_COMMAND, cfg.PCI_COMMAND_MEMORY, 2)
    assert len(dev.moves) == 4


def test_sizing_with_decode_on_decodes_nowhere_mid_way(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a0 = m.root.bar_address(slot, 0)
    dev.moves.clear()
    m.cfg_write(slot, BAR0, 0xFFFFFFFF)                          # 0xFFFFF000: above the 32-bit window
    assert m.root.bar_address(slot, 0) is None
    assert m.mmio.find(0xFFFFF000) is None and m.mmio.find(a0) is None
    m.cfg_write(slot, BAR0, a0)
    assert m.root.bar_address(slot, 0) == a0
    assert dev.moves == [(0, a0, None), (0, None, a0)]


def test_guest_moves_a_32bit_bar(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a0 = m.root.bar_address(slot, 0)
    new = 0xE000_0000
    dev.moves.clear()
    m.cfg_write(slot, BAR0, new)
    assert m.root.bar_address(slot, 0) == new
    assert m.mmio.find(a0) is None
    region, off = m.mmio.find(new + 8)
    assert region.device is dev and region.bar == 0 and off == 8
    assert dev.moves == [(0, a0, new)]
    m.mmio.read(new + 0x20, 2)
    assert dev.reads[-1] == (0, 0x20, 2)


def test_guest_moves_a_64bit_bar_dword_by_dword(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a2 = m.root.bar_address(slot, 2)
    new = a2 + 5 * GiB + 0x10000
    assert W64[0] <= new < W64[1]
    dev.moves.clear()
    m.cfg_write(slot, BAR2_LO, (new & 0xFFFFFFFF) | 0xC)
    m.cfg_write(slot, BAR2_HI, new >> 32)
    assert m.root.bar_address(slot, 2) == new
    assert m.mmio.find(a2) is None and m.mmio.find(new)[0].device is dev
    assert dev.moves[0][1] == a2 and dev.moves[-1][2] == new
    for (_, _, to), (_, frm, _) in zip(dev.moves, dev.moves[1:]):
        assert to == frm                                         # a consistent sequence of moves


def test_64bit_bar_may_be_placed_in_the_32bit_window(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    m.cfg_write(slot, BAR2_HI, 0)
    m.cfg_write(slot, BAR2_LO, 0xD000_0000)
    assert m.root.bar_address(slot, 2) == 0xD000_0000
    assert m.mmio.find(0xD000_0000)[0].device is dev


@pytest.mark.parametrize("address", [
    0x8000_0000,                  # guest RAM
    0x0,
    0xFEC0_0000,                  # IOAPIC, just past the window
    0xFEBF_F000,                  # the window's last page: fits
    0xBFFF_F000,                  # just below the window
])
def test_32bit_bar_window_bounds(dev_m, address):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a0 = m.root.bar_address(slot, 0)
    dev.moves.clear()
    m.cfg_write(slot, BAR0, address)
    inside = W32[0] <= address and address + BAR0_SIZE <= W32[1]
    assert m.root.bar_address(slot, 0) == (address if inside else None)
    assert m.mmio.find(a0) is None
    assert (m.mmio.find(address) is not None) == inside
    assert dev.moves == [(0, a0, address if inside else None)]


def test_32bit_bar_cannot_go_to_the_64bit_window(dev_m):
    # a 32-bit BAR cannot even hold such an address; the low dword alone is outside W32
    m, slot = dev_m, dev_m.slot
    m.cfg_write(slot, BAR0, 0x1000)
    assert m.root.bar_address(slot, 0) is None


def test_64bit_bar_outside_the_windows_is_unmapped(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a2 = m.root.bar_address(slot, 2)
    m.cfg_write(slot, BAR2_HI, (W64[1] >> 32) + 1)
    assert m.root.bar_address(slot, 2) is None
    assert m.mmio.find(a2) is None
    assert dev.moves[-1] == (2, a2, None)
    m.cfg_write(slot, BAR2_HI, a2 >> 32)                          # and back
    assert m.root.bar_address(slot, 2) == a2
    assert dev.moves[-1] == (2, None, a2)


def test_overlapping_bars_second_registration_refused(m):
    d1, d2 = FakeDevice(), FakeDevice()
    s1, s2 = m.root.add(d1), m.root.add(d2)
    a1, a2 = m.root.bar_address(s1, 0), m.root.bar_address(s2, 0)
    d2.moves.clear()
    m.cfg_write(s2, BAR0, a1)                                     # no exception
    assert m.mmio.find(a1)[0].device is d1                        # the first one keeps it
    assert m.root.bar_address(s1, 0) == a1
    assert m.root.bar_address(s2, 0) is None
    assert m.mmio.find(a2) is None
    assert d2.moves == [(0, a2, None)]
    m.mmio.write(a1, b"\x01")
    assert d1.writes == [(0, 0, b"\x01")] and d2.writes == []
    # moving it away again maps it
    m.cfg_write(s2, BAR0, a2)
    assert m.root.bar_address(s2, 0) == a2
    assert m.mmio.find(a2)[0].device is d2
    assert d2.moves[-1] == (0, None, a2)


def test_refused_bar_gets_no_spurious_bar_moved(m):
    d1, d2 = FakeDevice(), FakeDevice()
    s1, s2 = m.root.add(d1), m.root.add(d2)
    m.cfg_write(s2, BAR0, m.root.bar_address(s1, 0))
    d2.moves.clear()
    m.cfg_write(s2, cfg.PCI_COMMAND, cfg.PCI_COMMAND_MEMORY | cfg.PCI_COMMAND_MASTER, 2)  # same value
    m.cfg_write(s2, cfg.PCI_INTERRUPT_LINE, 5, 1)
    assert d2.moves == []


def test_overlap_with_a_64bit_bar_mid_move(m):
    d1, d2 = FakeDevice(), FakeDevice()
    s1, s2 = m.root.add(d1), m.root.add(d2)
    b1, b2 = m.root.bar_address(s1, 2), m.root.bar_address(s2, 2)
    assert b1 >> 32 == b2 >> 32
    # move d2's BAR2 to b1 + 8 GiB, low dword first: midway it sits on top of d1's BAR
    target = b1 + 8 * GiB
    m.cfg_write(s2, BAR2_LO, (target & 0xFFFFFFFF) | 0xC)
    assert m.root.bar_address(s2, 2) is None
    m.cfg_write(s2, BAR2_HI, target >> 32)
    assert m.root.bar_address(s2, 2) == target
    assert m.mmio.find(b1)[0].device is d1 and m.mmio.find(target)[0].device is d2
    assert d2.moves[-1] == (2, None, target)


def test_non_mmio_bars_get_callbacks_but_no_bus_registration(m):
    dev = FakeDevice(mmio=False)
    slot = m.root.add(dev)
    a0, a2 = dev.config.bar_address(0), dev.config.bar_address(2)
    assert m.mmio.find(a0) is None and m.mmio.find(a2) is None
    assert m.root.bar_address(slot, 0) == a0
    assert sorted(dev.moves) == [(0, None, a0), (2, None, a2)]
    m.cfg_write(slot, BAR0, 0xE000_0000)
    assert dev.moves[-1] == (0, a0, 0xE000_0000)
    assert m.mmio.find(0xE000_0000) is None
    m.cfg_write(slot, cfg.PCI_COMMAND, 0, 2)
    assert m.root.bar_address(slot, 0) is None


def test_writes_outside_the_bars_and_command_do_not_remap(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    dev.moves.clear()
    for reg, value, size in [(0x0C, 0x10, 1), (0x3C, 0x0B, 1), (0x2C, 0, 4), (0x00, 0, 4)]:
        m.cfg_write(slot, reg, value, size)
    assert dev.moves == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x04, 0x06, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x3C]),
                          st.sampled_from([0, 1, 2, 3]), st.sampled_from([1, 2, 4]),
                          st.one_of(st.just(0xFFFFFFFF), st.just(0), st.integers(0, 2**32 - 1),
                                    st.sampled_from([0xC000_0000, 0xE000_0000, 0xD000_000C, 0x1, 0x2]))),
                max_size=30))
def test_random_config_writes_keep_bus_and_bookkeeping_consistent(ops):
    m = Machine()
    d1, d2 = FakeDevice(), FakeDevice()
    s1, s2 = m.root.add(d1), m.root.add(d2)
    for i, (reg, port, size, value) in enumerate(ops):
        slot = (s1, s2)[i % 2]
        if port + size > 4:
            port = 0
        m.select(slot, reg)
        m.pio.write(PCI_CONFIG_DATA + port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    for slot, dev in ((s1, d1), (s2, d2)):
        decode = dev.config.get(cfg.PCI_COMMAND, 2) & cfg.PCI_COMMAND_MEMORY
        for index, bar in dev.config.bars.items():
            mapped = m.root.bar_address(slot, index)
            # the callbacks tell the device exactly where the BAR decodes
            last = next((new for b, _, new in reversed(dev.moves) if b == index), None)
            assert last == mapped
            if mapped is None:
                continue
            assert decode
            assert mapped == dev.config.bar_address(index)
            hit = m.mmio.find(mapped, bar.size)
            assert hit is not None and hit[0].device is dev and hit[0].bar == index and hit[1] == 0


def test_64bit_bar_mid_sizing_with_decode_on_decodes_nowhere(dev_m):
    m, dev, slot = dev_m, dev_m.dev, dev_m.slot
    a2 = m.root.bar_address(slot, 2)
    m.cfg_write(slot, BAR2_LO, 0xFFFFFFFF)                        # __pci_read_base order: low dword first
    assert m.root.bar_address(slot, 2) is None
    assert m.mmio.find((a2 & ~0xFFFFFFFF) | 0xFFFFC000) is None
