"""The PCI IRQ routing table ("$PIR"): written so that Linux stops looking for one.

Reference: Microsoft, "PCI IRQ Routing Table Specification", version 1.0
(1999); Linux mirrors it as struct irq_routing_table in
arch/x86/include/asm/pci_x86.h and reads it in arch/x86/pci/irq.c.

Why pyvmm writes one: at PCI set-up (pci_subsys_init -> pcibios_irq_init)
Linux searches the BIOS area 0xF0000-0xFFFFF for a "$PIR" table, 16 bytes at
a time, and, finding none, again byte by byte for the older "$IRT" form.
Natively that takes microseconds; on PVM the guest kernel runs in KVM's
instruction emulator and the two searches took 0.26 s of every boot
(``pyvmm run --profile``).  A table at the very start of the area is found at
the first step.

What it says: the interrupt router is the host bridge, and no slot is routed
through it (zero slot entries).  Linux then routes PCI interrupts with the
I/O APIC entries of the MP table (pyvmm.boot.mptable), as it would without
the table, and our virtio devices use MSI-X anyway.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

from .layout import BIOS_ROM_START, HIGH_MEMORY_START

PIRQ_SIGNATURE = b"$PIR"        # "Signature"
PIRQ_VERSION = 0x0100           # "Version": 1.0
PIRQ_ALIGN = 16                 # the table starts on a 16-byte boundary in 0xF0000-0xFFFFF
PIRQ_ADDR = BIOS_ROM_START      # the first place Linux looks


class GuestMemory(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


class irq_routing_table(ctypes.LittleEndianStructure):
    """The table header ("PCI IRQ Routing Table Specification" 1.0, "Table Format";
    Linux: struct irq_routing_table).  Slot entries (16 bytes each) would follow."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("version", ctypes.c_uint16),
        ("size", ctypes.c_uint16),          # header + slot entries, in bytes
        ("rtr_bus", ctypes.c_uint8),        # the interrupt router's bus
        ("rtr_devfn", ctypes.c_uint8),      # and device/function (device << 3 | function)
        ("exclusive_irqs", ctypes.c_uint16),  # bitmap of IRQs for PCI only
        ("rtr_vendor", ctypes.c_uint16),    # a compatible router's vendor and device id
        ("rtr_device", ctypes.c_uint16),
        ("miniport_data", ctypes.c_uint32),
        ("rfu", ctypes.c_uint8 * 11),       # reserved
        ("checksum", ctypes.c_uint8),       # all bytes of the table add up to 0 mod 256
    ]


assert ctypes.sizeof(irq_routing_table) == 32


def build_pirq_table(router_vendor: int, router_device: int, router_devfn: int = 0) -> bytes:
    """A table with no slot entries whose router is the device at 00:``router_devfn``."""
    table = irq_routing_table(signature=PIRQ_SIGNATURE, version=PIRQ_VERSION,
                              size=ctypes.sizeof(irq_routing_table), rtr_bus=0,
                              rtr_devfn=router_devfn, rtr_vendor=router_vendor,
                              rtr_device=router_device)
    table.checksum = -sum(bytes(table)) & 0xFF
    return bytes(table)


def write_pirq_table(mem: GuestMemory, router_vendor: int, router_device: int) -> int:
    """Write the table at PIRQ_ADDR; returns its address."""
    data = build_pirq_table(router_vendor, router_device)
    assert PIRQ_ADDR % PIRQ_ALIGN == 0 and PIRQ_ADDR + len(data) <= HIGH_MEMORY_START
    mem.write(PIRQ_ADDR, data)
    return PIRQ_ADDR


__all__ = ["PIRQ_ADDR", "build_pirq_table", "irq_routing_table", "write_pirq_table"]
