"""ELF vmlinux loading through the PVH entry point.

A Linux vmlinux built with CONFIG_PVH carries an ELF note of owner "Xen" and
type XEN_ELFNOTE_PHYS32_ENTRY: the physical address of a 32-bit entry that
needs no firmware and no decompressor.  The loader copies the PT_LOAD segments
to their physical addresses and writes a ``struct hvm_start_info``
(xen/include/public/arch-x86/hvm/start_info.h) with the command line, the
initramfs as module 0 and the memory map.  The boot CPU then starts in 32-bit
protected mode, paging off, with EBX holding the start info's address.

On PVM hosts this is the only sensible way in: a bzImage spends minutes in
its decompressor, which runs in KVM's instruction emulator there.
"""

from __future__ import annotations

import ctypes
import io
from ctypes import c_uint32, c_uint64, sizeof
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

from . import layout
from .e820 import e820_map
from .errors import KernelFormatError

XEN_ELFNOTE_PHYS32_ENTRY = 18          # xen/include/public/elfnote.h
XEN_HVM_START_MAGIC_VALUE = 0x336EC578  # start_info.h
PVH_START_INFO_VERSION = 1             # version 1 adds memmap_paddr/memmap_entries


class hvm_start_info(ctypes.LittleEndianStructure):
    _fields_ = [("magic", c_uint32), ("version", c_uint32), ("flags", c_uint32),
                ("nr_modules", c_uint32), ("modlist_paddr", c_uint64),
                ("cmdline_paddr", c_uint64), ("rsdp_paddr", c_uint64),
                ("memmap_paddr", c_uint64), ("memmap_entries", c_uint32),
                ("reserved", c_uint32)]


class hvm_modlist_entry(ctypes.LittleEndianStructure):
    _fields_ = [("paddr", c_uint64), ("size", c_uint64), ("cmdline_paddr", c_uint64),
                ("reserved", c_uint64)]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32),
                ("reserved", c_uint32)]


assert sizeof(hvm_start_info) == 56
assert sizeof(hvm_modlist_entry) == 32
assert sizeof(hvm_memmap_table_entry) == 24

# Where the pieces of the start info go, inside the page at PVH_START_INFO_ADDR.
MODLIST_ADDR = layout.PVH_START_INFO_ADDR + 0x40
MEMMAP_ADDR = layout.PVH_START_INFO_ADDR + 0x80
MEMMAP_MAX_ENTRIES = (0x1000 - 0x80) // sizeof(hvm_memmap_table_entry)


@dataclass(frozen=True)
class ElfKernel:
    entry32: int                            # physical PVH entry point
    segments: list[tuple[int, int, bytes]]  # (paddr, memsz, file bytes)

    @property
    def end(self) -> int:
        return max(paddr + memsz for paddr, memsz, _ in self.segments)


def is_elf(image: bytes) -> bool:
    return image[:4] == b"\x7fELF"


def parse_elf_kernel(image: bytes) -> ElfKernel:
    """Check a vmlinux and find its PVH entry; KernelFormatError if unusable."""
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise KernelFormatError("the ELF kernel is not an x86-64 image")
        if elf["e_type"] != "ET_EXEC":
            raise KernelFormatError("the ELF kernel is not an executable (ET_EXEC) image")
        entry32 = None
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        desc = note["n_descdata"]
                        if isinstance(desc, str):
                            desc = desc.encode("latin-1")
                        if len(desc) < 4:
                            raise KernelFormatError("the PVH entry note is truncated")
                        entry32 = int.from_bytes(desc[:4], "little")
            elif seg["p_type"] == "PT_LOAD":
                if seg["p_filesz"] > seg["p_memsz"]:
                    raise KernelFormatError("an ELF segment has p_filesz > p_memsz")
                data = seg.data()
                if len(data) != seg["p_filesz"]:
                    raise KernelFormatError("the ELF kernel is truncated: a segment's data "
                                            "runs past the end of the file")
                segments.append((seg["p_paddr"], seg["p_memsz"], data))
    except (ELFError, ConstructError, ValueError, KeyError, OverflowError) as e:
        if isinstance(e, KernelFormatError):
            raise
        raise KernelFormatError(f"the ELF kernel is malformed: {e}") from None
    if entry32 is None:
        raise KernelFormatError("the ELF kernel has no PVH entry note "
                                "(XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y")
    if not segments:
        raise KernelFormatError("the ELF kernel has no PT_LOAD segment")
    return ElfKernel(entry32, segments)


@dataclass(frozen=True)
class PvhBoot:
    entry32: int
    start_info: int
    initrd: tuple[int, int] | None   # (gpa, size)


def place_initrd(initrd_size: int, kernel_end: int, ram_size: int) -> int:
    """Highest page-aligned address for the initramfs in low RAM, above the kernel."""
    low_end = min(ram_size, layout.MMIO_HOLE_START)
    addr = (low_end - initrd_size) & ~0xFFF
    if addr < kernel_end:
        raise KernelFormatError(f"the initramfs ({initrd_size} bytes) does not fit in "
                                f"{low_end >> 20} MiB of low RAM above the kernel; add --memory")
    return addr


def load_pvh(mem, kernel: ElfKernel, cmdline: bytes, initrd: bytes | None,
             ram_size: int, initrd_ram: int | None = None) -> PvhBoot:
    """Copy the kernel, command line, initramfs and start info into guest RAM.

    The initramfs ends below ``initrd_ram`` (default: all of ``ram_size``).
    """
    for paddr, memsz, data in kernel.segments:
        if paddr < layout.HIGH_MEMORY_START or paddr + memsz > min(ram_size, layout.MMIO_HOLE_START):
            raise KernelFormatError(f"an ELF segment at {paddr:#x}+{memsz:#x} does not fit "
                                    f"in {ram_size >> 20} MiB of guest RAM")
        mem.write(paddr, data)
        if memsz > len(data):  # .bss: guest RAM starts zeroed, but say it
            mem.write(paddr + len(data), bytes(memsz - len(data)))
    if len(cmdline) + 1 > layout.CMDLINE_MAX:
        raise KernelFormatError(f"the command line is longer than {layout.CMDLINE_MAX - 1} bytes")
    mem.write(layout.CMDLINE_ADDR, cmdline + b"\0")

    info = hvm_start_info(magic=XEN_HVM_START_MAGIC_VALUE, version=PVH_START_INFO_VERSION,
                          cmdline_paddr=layout.CMDLINE_ADDR)
    placed = None
    if initrd:
        addr = place_initrd(len(initrd), kernel.end, min(ram_size, initrd_ram or ram_size))
        mem.write(addr, initrd)
        mem.write(MODLIST_ADDR, bytes(hvm_modlist_entry(paddr=addr, size=len(initrd))))
        info.nr_modules = 1
        info.modlist_paddr = MODLIST_ADDR
        placed = (addr, len(initrd))
    entries = e820_map(ram_size)
    if len(entries) > MEMMAP_MAX_ENTRIES:
        raise AssertionError("memory map does not fit the start info page")
    table = b"".join(bytes(hvm_memmap_table_entry(addr=a, size=s, type=t)) for a, s, t in entries)
    mem.write(MEMMAP_ADDR, table)
    info.memmap_paddr = MEMMAP_ADDR
    info.memmap_entries = len(entries)
    mem.write(layout.PVH_START_INFO_ADDR, bytes(info))
    return PvhBoot(kernel.entry32, layout.PVH_START_INFO_ADDR, placed)
