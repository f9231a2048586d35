"""MP tables: how a guest without ACPI learns about its CPUs and interrupts.

Reference: Intel MultiProcessor Specification, version 1.4 (1997), chapter 4
"MP Configuration Table"; the field names follow Linux's
arch/x86/include/asm/mpspec_def.h, whose parser (arch/x86/kernel/mpparse.c,
CONFIG_X86_MPPARSE) reads what we write here.

Two structures go into the last KiB of base memory (the EBDA, reserved in the
E820 map), where Linux's smp_scan_config() looks for them:

* the MP floating pointer structure, 16 bytes, signature "_MP_", 16-byte
  aligned, pointing to
* the MP configuration table: a 44-byte header ("PCMP") followed by entries
  describing the processors, buses, the I/O APIC and the interrupt wiring.

Both carry a checksum byte chosen so that all their bytes add up to 0 mod 256.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

from .layout import BASE_MEMORY_END, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR


class GuestMemory(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


# --- Constants (MPS 1.4 section numbers in the comments) -------------------

MPF_SIGNATURE = b"_MP_"         # 4.1, floating pointer signature
MPC_SIGNATURE = b"PCMP"         # 4.2, configuration table signature
MPC_SPEC_1_4 = 4                # 4.1/4.2, SPEC_REV: 1 = 1.1, 4 = 1.4
MPC_OEM = b"PYVMM   "           # 4.2, OEM ID, 8 bytes space-padded
MPC_PRODUCT_ID = b"PYVMM KVM   "  # 4.2, PRODUCT ID, 12 bytes space-padded

# 4.3, entry types (Table 4-3)
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3                   # I/O interrupt assignment
MP_LINTSRC = 4                  # local interrupt assignment

# 4.3.1, processor entry CPU FLAGS
CPU_ENABLED = 0x01              # EN
CPU_BOOTPROCESSOR = 0x02        # BP
CPU_SIGNATURE = 0x600           # family 6, model 0, stepping 0
CPU_FEATURE_FPU = 1 << 0        # CPUID.1:EDX bits, as the spec asks
CPU_FEATURE_APIC = 1 << 9
CPU_FEATURE_FLAGS = CPU_FEATURE_FPU | CPU_FEATURE_APIC   # 0x201

# 4.3.2, bus type strings (Table 4-8), 6 bytes space-padded
BUSTYPE_PCI = b"PCI   "
BUSTYPE_ISA = b"ISA   "
PCI_BUS_ID = 0
ISA_BUS_ID = 1

# 4.3.3, I/O APIC entry
MPC_APIC_USABLE = 0x01          # EN
IOAPIC_VERSION = 0x11           # 82093AA-compatible, as KVM's in-kernel IOAPIC

# 4.3.4, interrupt types (Table 4-11)
mp_INT = 0                      # vectored interrupt, vector from the APIC
mp_NMI = 1
mp_SMI = 2
mp_ExtINT = 3                   # vector from an external 8259A
MP_IRQ_FLAGS_CONFORMING = 0     # polarity and trigger "conform to the bus"
MP_APIC_ALL = 0xFF              # 4.3.5, destination: every local APIC

ISA_IRQS = 16

# Which I/O APIC input the 8254 timer (ISA IRQ 0) reaches.  A real PC wires it
# to INTIN2 (INTIN0 carries the 8259A), but KVM's default GSI routing, set up
# by KVM_CREATE_IRQCHIP (arch/x86/kvm/irq_comm.c, default_routing), sends GSI
# n to I/O APIC pin n, and the in-kernel PIT raises GSI 0.  The table must say
# what the routing does: a Linux guest on KVM sets no_timer_check and never
# probes for a miswired timer.  A VMM that installs QEMU-style routing
# (GSI 0 -> pin 2, KVM_SET_GSI_ROUTING) passes irq0_pin=2.
ISA_IRQ0_IOAPIC_PIN = 0

# The VMM allows up to 8 vCPUs; the table format would fit more (see the
# assertion at the end of this module).
MAX_CPUS = 8


# --- Structures ------------------------------------------------------------

class MpFloatingPointer(ctypes.LittleEndianStructure):
    """4.1, Table 4-1 (Linux: struct mpf_intel)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("physptr", ctypes.c_uint32),       # address of the configuration table
        ("length", ctypes.c_uint8),         # in 16-byte units: 1
        ("specification", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("feature1", ctypes.c_uint8),       # 0: a configuration table is present
        ("feature2", ctypes.c_uint8),       # bit 7 IMCRP: 0, virtual wire mode
        ("feature3", ctypes.c_uint8),
        ("feature4", ctypes.c_uint8),
        ("feature5", ctypes.c_uint8),
    ]


class MpConfigTableHeader(ctypes.LittleEndianStructure):
    """4.2, Table 4-2 (Linux: struct mpc_table)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint16),        # base table: header + entries
        ("spec", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem", ctypes.c_char * 8),
        ("productid", ctypes.c_char * 12),
        ("oemptr", ctypes.c_uint32),
        ("oemsize", ctypes.c_uint16),
        ("oemcount", ctypes.c_uint16),      # number of entries
        ("lapic", ctypes.c_uint32),         # local APIC address
        ("exttbl_len", ctypes.c_uint16),
        ("exttbl_checksum", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
    ]


class MpProcessorEntry(ctypes.LittleEndianStructure):
    """4.3.1, Table 4-4 (Linux: struct mpc_cpu)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("cpuflag", ctypes.c_uint8),
        ("cpufeature", ctypes.c_uint32),    # CPU signature
        ("featureflag", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 2),
    ]


class MpBusEntry(ctypes.LittleEndianStructure):
    """4.3.2, Table 4-7 (Linux: struct mpc_bus)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("busid", ctypes.c_uint8),
        ("bustype", ctypes.c_char * 6),
    ]


class MpIoApicEntry(ctypes.LittleEndianStructure):
    """4.3.3, Table 4-9 (Linux: struct mpc_ioapic)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("apicaddr", ctypes.c_uint32),
    ]


class MpIoInterruptEntry(ctypes.LittleEndianStructure):
    """4.3.4, Table 4-10 (Linux: struct mpc_intsrc)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbus", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("dstapic", ctypes.c_uint8),        # I/O APIC id
        ("dstirq", ctypes.c_uint8),         # I/O APIC input pin (INTINn)
    ]


class MpLocalInterruptEntry(ctypes.LittleEndianStructure):
    """4.3.5, Table 4-12 (Linux: struct mpc_lintsrc)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbusid", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("destapic", ctypes.c_uint8),       # local APIC id, 0xff = all
        ("destapiclint", ctypes.c_uint8),   # LINTIN0 or LINTIN1
    ]


assert ctypes.sizeof(MpFloatingPointer) == 16
assert ctypes.sizeof(MpConfigTableHeader) == 44
assert ctypes.sizeof(MpProcessorEntry) == 20
for _entry in (MpBusEntry, MpIoApicEntry, MpIoInterruptEntry, MpLocalInterruptEntry):
    assert ctypes.sizeof(_entry) == 8, _entry


# --- Building the table ----------------------------------------------------

def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _processor_entries(num_cpus: int, apic_version: int) -> list[ctypes.Structure]:
    return [
        MpProcessorEntry(
            type=MP_PROCESSOR,
            apicid=cpu,
            apicver=apic_version,
            cpuflag=CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0),
            cpufeature=CPU_SIGNATURE,
            featureflag=CPU_FEATURE_FLAGS,
        )
        for cpu in range(num_cpus)
    ]


def _bus_entries() -> list[ctypes.Structure]:
    return [
        MpBusEntry(type=MP_BUS, busid=PCI_BUS_ID, bustype=BUSTYPE_PCI),
        MpBusEntry(type=MP_BUS, busid=ISA_BUS_ID, bustype=BUSTYPE_ISA),
    ]


def _io_interrupt_entries(ioapic_id: int, irq0_pin: int) -> list[ctypes.Structure]:
    """ISA IRQ n -> I/O APIC pin n, except IRQ 0 -> ``irq0_pin``; an IRQ
    whose pin IRQ 0 took (IRQ 2, the 8259A cascade, on a PC) is left out."""
    entries = []
    for irq in range(ISA_IRQS):
        pin = irq0_pin if irq == 0 else irq
        if irq != 0 and pin == irq0_pin:
            continue
        entries.append(MpIoInterruptEntry(
            type=MP_INTSRC, irqtype=mp_INT, irqflag=MP_IRQ_FLAGS_CONFORMING,
            srcbus=ISA_BUS_ID, srcbusirq=irq, dstapic=ioapic_id, dstirq=pin,
        ))
    return entries


def _local_interrupt_entries() -> list[ctypes.Structure]:
    """LINT0 takes the 8259A (ExtINT), LINT1 the NMI, on every local APIC."""
    return [
        MpLocalInterruptEntry(
            type=MP_LINTSRC, irqtype=irqtype, irqflag=MP_IRQ_FLAGS_CONFORMING,
            srcbusid=ISA_BUS_ID, srcbusirq=0, destapic=MP_APIC_ALL, destapiclint=lint,
        )
        for lint, irqtype in ((0, mp_ExtINT), (1, mp_NMI))
    ]


def build_mptable(num_cpus: int, apic_version: int = 0x14, base: int = MPTABLE_ADDR,
                  *, irq0_pin: int = ISA_IRQ0_IOAPIC_PIN) -> bytes:
    """The floating pointer at ``base`` followed by the configuration table."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"number of CPUs must be between 1 and {MAX_CPUS}, not {num_cpus}")
    if not 0 <= apic_version <= 0xFF:
        raise ValueError(f"local APIC version {apic_version:#x} does not fit in a byte")
    if not 0 <= irq0_pin < ISA_IRQS:
        raise ValueError(f"I/O APIC pin {irq0_pin} for IRQ 0 is not an ISA pin (0..15)")
    ioapic_id = num_cpus   # APIC ids 0..num_cpus-1 belong to the CPUs
    entries = (
        _processor_entries(num_cpus, apic_version)
        + _bus_entries()
        + [MpIoApicEntry(type=MP_IOAPIC, apicid=ioapic_id, apicver=IOAPIC_VERSION,
                         flags=MPC_APIC_USABLE, apicaddr=IOAPIC_ADDR)]
        + _io_interrupt_entries(ioapic_id, irq0_pin)
        + _local_interrupt_entries()
    )
    body = b"".join(bytes(e) for e in entries)

    header = MpConfigTableHeader(
        signature=MPC_SIGNATURE, spec=MPC_SPEC_1_4, oem=MPC_OEM,
        productid=MPC_PRODUCT_ID, oemcount=len(entries), lapic=LAPIC_ADDR,
        length=ctypes.sizeof(MpConfigTableHeader) + len(body),
    )
    header.checksum = checksum(bytes(header) + body)
    table = bytes(header) + body

    mpf = MpFloatingPointer(
        signature=MPF_SIGNATURE, specification=MPC_SPEC_1_4, length=1,
        physptr=base + ctypes.sizeof(MpFloatingPointer),
    )
    mpf.checksum = checksum(bytes(mpf))
    return bytes(mpf) + table


def write_mptable(mem: GuestMemory, num_cpus: int, apic_version: int = 0x14,
                  *, irq0_pin: int = ISA_IRQ0_IOAPIC_PIN) -> None:
    """Write the MP tables for ``num_cpus`` CPUs at MPTABLE_ADDR (the EBDA).

    ``irq0_pin`` must match the VMM's GSI routing (see ISA_IRQ0_IOAPIC_PIN).
    """
    data = build_mptable(num_cpus, apic_version, MPTABLE_ADDR, irq0_pin=irq0_pin)
    if MPTABLE_ADDR + len(data) > BASE_MEMORY_END:
        raise ValueError(f"MP table of {len(data)} bytes does not fit in the EBDA")
    mem.write(MPTABLE_ADDR, data)


def _table_size(num_cpus: int) -> int:
    fixed = len(build_mptable(1)) - ctypes.sizeof(MpProcessorEntry)
    return fixed + num_cpus * ctypes.sizeof(MpProcessorEntry)


# The EBDA KiB holds the table for MAX_CPUS with room to spare (39 would fit).
assert MPTABLE_ADDR % 16 == 0
assert MPTABLE_ADDR + _table_size(MAX_CPUS) <= BASE_MEMORY_END
