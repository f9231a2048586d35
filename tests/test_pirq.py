"""The $PIR table, read back the way Linux's arch/x86/pci/irq.c looks for it."""

import ctypes
import struct

from test_mptable import FakeMemory

from pyvmm.boot import layout
from pyvmm.boot.pirq import PIRQ_ADDR, build_pirq_table, irq_routing_table, write_pirq_table
from pyvmm.pci.root import HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR

BIOS_START, BIOS_END = 0xF0000, 0x100000


def linux_finds(mem: FakeMemory) -> int | None:
    """pirq_find_routing_table + pirq_check_routing_table: 16-byte steps over the BIOS
    area; signature, version 1.0, size a multiple of 16 and at least the header, the
    bytes adding up to 0."""
    for addr in range(BIOS_START, BIOS_END - 32, 16):
        sig, version, size = struct.unpack_from("<4sHH", mem.buf, addr)
        if sig != b"$PIR" or version != 0x0100 or size % 16 or size < 32 or size > BIOS_END - addr:
            continue
        if sum(mem.buf[addr:addr + size]) % 256 == 0:
            return addr
    return None


def test_the_table_is_32_bytes_with_a_zero_checksum_and_no_slots():
    data = build_pirq_table(0x8086, 0x0D57)
    assert len(data) == ctypes.sizeof(irq_routing_table) == 32
    assert sum(data) % 256 == 0
    t = irq_routing_table.from_buffer_copy(data)
    assert (t.signature, t.version, t.size) == (b"$PIR", 0x0100, 32)
    assert (t.rtr_bus, t.rtr_devfn, t.rtr_vendor, t.rtr_device) == (0, 0, 0x8086, 0x0D57)
    assert t.exclusive_irqs == 0 and t.miniport_data == 0 and bytes(t.rfu) == bytes(11)


def test_linux_finds_it_at_its_first_step():
    mem = FakeMemory()
    assert write_pirq_table(mem, HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE) == PIRQ_ADDR
    assert linux_finds(mem) == PIRQ_ADDR == BIOS_START == layout.BIOS_ROM_START


def test_a_corrupted_table_is_not_found():
    mem = FakeMemory()
    write_pirq_table(mem, HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE)
    mem.buf[PIRQ_ADDR + 20] ^= 1
    assert linux_finds(mem) is None
