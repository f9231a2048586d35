"""The E820 memory map and how guest RAM is laid out around the MMIO hole.

On a PC the firmware answers INT 15h, AX=E820h with a list of (address,
length, type) ranges; a direct-booting VMM hands the same list to Linux in
the zero page (``boot_params.e820_table``, see Documentation/x86/zero-page.rst)
or in the PVH start info.  The entry layout is the kernel's
``struct boot_e820_entry`` (arch/x86/include/uapi/asm/bootparam.h) and the type
numbers are those of ``enum e820_type`` (arch/x86/include/asm/e820/types.h).

pyvmm backs all guest RAM with one contiguous host buffer of ``ram_size``
bytes.  Guest-physical space has a hole for 32-bit MMIO at [3 GiB, 4 GiB), so
RAM beyond 3 GiB is shifted up to start at 4 GiB.  ``ram_ranges`` states that
mapping once; the memory slots and the E820 map are both derived from it.
"""

from __future__ import annotations

import ctypes

from .layout import (
    BASE_MEMORY_END,
    BIOS_ROM_START,
    EBDA_START,
    HIGH_MEMORY_START,
    MMIO_HOLE_END,
    MMIO_HOLE_START,
)

# enum e820_type, arch/x86/include/asm/e820/types.h
E820_TYPE_RAM = 1
E820_TYPE_RESERVED = 2
E820_TYPE_ACPI = 3
E820_TYPE_NVS = 4
E820_TYPE_UNUSABLE = 5
E820_TYPE_PMEM = 7
E820_TYPE_PRAM = 12
E820_TYPE_SOFT_RESERVED = 0xEFFFFFFF

PAGE_SIZE = 4096

# The smallest guest we describe: the low 640 KiB plus at least one page of
# RAM above 1 MiB (a kernel needs far more, the loader checks that).
MIN_RAM_SIZE = HIGH_MEMORY_START + PAGE_SIZE


class E820Entry(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry``: one range of the firmware memory map."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


assert ctypes.sizeof(E820Entry) == 20

# Kernel spelling, for readers coming from bootparam.h.
boot_e820_entry = E820Entry


def _check_ram_size(ram_size: int) -> None:
    if ram_size < MIN_RAM_SIZE or ram_size % PAGE_SIZE:
        raise ValueError(
            f"guest RAM size {ram_size:#x} must be a multiple of {PAGE_SIZE} "
            f"bytes and at least {MIN_RAM_SIZE:#x}"
        )


def ram_ranges(ram_size: int) -> list[tuple[int, int, int]]:
    """Where the RAM backing appears in guest-physical space.

    Returns ``(gpa, size, offset_in_backing)`` triples: the first
    ``min(ram_size, 3 GiB)`` bytes of the backing at guest-physical 0, and any
    remainder at 4 GiB, continuing at backing offset 3 GiB.  One memory slot
    per triple.
    """
    _check_ram_size(ram_size)
    low = min(ram_size, MMIO_HOLE_START)
    ranges = [(0, low, 0)]
    if ram_size > MMIO_HOLE_START:
        ranges.append((MMIO_HOLE_END, ram_size - MMIO_HOLE_START, MMIO_HOLE_START))
    return ranges


def low_ram_end(ram_size: int) -> int:
    """First guest-physical address above the RAM below the MMIO hole."""
    return ram_ranges(ram_size)[0][1]


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """The E820 map of a guest with ``ram_size`` bytes of RAM.

    Returns ``(addr, size, type)`` triples in ascending address order.  The
    last KiB of base memory (the EBDA, where the MP table lives) and the BIOS
    area below 1 MiB are reserved; [640 KiB, 960 KiB) (VGA and option ROMs on
    a PC) is left out of the map, so Linux treats it as neither RAM nor usable.
    """
    ranges = ram_ranges(ram_size)
    _, low_size, _ = ranges[0]
    table = [
        (0, EBDA_START, E820_TYPE_RAM),
        (EBDA_START, BASE_MEMORY_END - EBDA_START, E820_TYPE_RESERVED),
        (BIOS_ROM_START, HIGH_MEMORY_START - BIOS_ROM_START, E820_TYPE_RESERVED),
        (HIGH_MEMORY_START, low_size - HIGH_MEMORY_START, E820_TYPE_RAM),
    ]
    for gpa, size, _ in ranges[1:]:
        table.append((gpa, size, E820_TYPE_RAM))
    return table
