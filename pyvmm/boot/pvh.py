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
from collections.abc import Iterator
from ctypes import c_uint16, c_uint32, c_uint64, sizeof
from dataclasses import dataclass
from typing import TypeVar

from . import layout
from .e820 import e820_map
from .errors import KernelFormatError

# ELF (System V gABI, "ELF-64 Object File Format"; linux/elf.h)
EI_NIDENT = 16
EI_CLASS = 4
EI_DATA = 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4

XEN_ELFNOTE_PHYS32_ENTRY = 18          # xen/include/public/elfnote.h
XEN_HVM_START_MAGIC_VALUE = 0x336EC578  # start_info.h
PVH_START_INFO_VERSION = 1             # version 1 adds memmap_paddr/memmap_entries


class Elf64_Ehdr(ctypes.LittleEndianStructure):
    _fields_ = [("e_ident", ctypes.c_uint8 * EI_NIDENT), ("e_type", c_uint16), ("e_machine", c_uint16),
                ("e_version", c_uint32), ("e_entry", c_uint64), ("e_phoff", c_uint64),
                ("e_shoff", c_uint64), ("e_flags", c_uint32), ("e_ehsize", c_uint16),
                ("e_phentsize", c_uint16), ("e_phnum", c_uint16), ("e_shentsize", c_uint16),
                ("e_shnum", c_uint16), ("e_shstrndx", c_uint16)]


class Elf64_Phdr(ctypes.LittleEndianStructure):
    _fields_ = [("p_type", c_uint32), ("p_flags", c_uint32), ("p_offset", c_uint64),
                ("p_vaddr", c_uint64), ("p_paddr", c_uint64), ("p_filesz", c_uint64),
                ("p_memsz", c_uint64), ("p_align", c_uint64)]


class Elf64_Nhdr(ctypes.LittleEndianStructure):
    _fields_ = [("n_namesz", c_uint32), ("n_descsz", c_uint32), ("n_type", c_uint32)]


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


assert sizeof(Elf64_Ehdr) == 64
assert sizeof(Elf64_Phdr) == 56
assert sizeof(Elf64_Nhdr) == 12
assert sizeof(hvm_start_info) == 56
assert sizeof(hvm_modlist_entry) == 32
assert sizeof(hvm_memmap_table_entry) == 24

_S = TypeVar("_S", bound=ctypes.Structure)

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
    ehdr = _elf_header(image)
    if ehdr.e_phnum and ehdr.e_phentsize != sizeof(Elf64_Phdr):
        raise _malformed(f"e_phentsize {ehdr.e_phentsize}, expected {sizeof(Elf64_Phdr)}")
    entry32 = None
    segments = []
    for i in range(ehdr.e_phnum):
        phdr = _read(Elf64_Phdr, image, ehdr.e_phoff + i * sizeof(Elf64_Phdr), "a program header")
        if phdr.p_type == PT_NOTE:
            if phdr.p_offset + phdr.p_filesz > len(image):
                raise _malformed("a PT_NOTE segment runs past the end of the file")
            for owner, n_type, desc in _notes(image, phdr.p_offset, phdr.p_offset + phdr.p_filesz):
                if owner == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                    if len(desc) < 4:
                        raise KernelFormatError("the PVH entry note is truncated")
                    entry32 = int.from_bytes(desc[:4], "little")
        elif phdr.p_type == PT_LOAD:
            if phdr.p_filesz > phdr.p_memsz:
                raise KernelFormatError("an ELF segment has p_filesz > p_memsz")
            if phdr.p_offset + phdr.p_filesz > len(image):
                raise KernelFormatError("the ELF kernel is truncated: a segment's data "
                                        "runs past the end of the file")
            segments.append((phdr.p_paddr, phdr.p_memsz,
                             image[phdr.p_offset:phdr.p_offset + phdr.p_filesz]))
    if entry32 is None:
        raise KernelFormatError("the ELF kernel has no PVH entry note "
                                "(XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y")
    if not segments:
        raise KernelFormatError("the ELF kernel has no PT_LOAD segment")
    return ElfKernel(entry32, segments)


def _malformed(why: str) -> KernelFormatError:
    return KernelFormatError(f"the ELF kernel is malformed: {why}")


def _read(struct_type: type[_S], image: bytes, offset: int, what: str) -> _S:
    if offset + sizeof(struct_type) > len(image):
        raise _malformed(f"{what} runs past the end of the file")
    return struct_type.from_buffer_copy(image, offset)


def _elf_header(image: bytes) -> Elf64_Ehdr:
    """The ELF header of a little-endian x86-64 executable."""
    if not is_elf(image) or len(image) < EI_NIDENT:
        raise _malformed("no complete ELF identification")
    if image[EI_CLASS] not in (ELFCLASS32, ELFCLASS64) or image[EI_DATA] not in (ELFDATA2LSB, ELFDATA2MSB):
        raise _malformed(f"EI_CLASS {image[EI_CLASS]}, EI_DATA {image[EI_DATA]}")
    if image[EI_CLASS] != ELFCLASS64 or image[EI_DATA] != ELFDATA2LSB:
        raise KernelFormatError("the ELF kernel is not an x86-64 image")
    ehdr = _read(Elf64_Ehdr, image, 0, "the ELF header")
    if ehdr.e_machine != EM_X86_64:
        raise KernelFormatError("the ELF kernel is not an x86-64 image")
    if ehdr.e_type != ET_EXEC:
        raise KernelFormatError("the ELF kernel is not an executable (ET_EXEC) image")
    return ehdr


def _notes(image: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, bytes]]:
    """(owner, n_type, desc) of each note in ``image[start:end]``: name and desc are
    each padded to 4 bytes; the owner's name ends with a NUL counted in n_namesz."""
    pos = start
    while pos < end:
        if pos + sizeof(Elf64_Nhdr) > end:
            raise _malformed("a note header runs past the end of its segment")
        nhdr = Elf64_Nhdr.from_buffer_copy(image, pos)
        name_at = pos + sizeof(Elf64_Nhdr)
        desc_at = name_at + _align4(nhdr.n_namesz)
        if desc_at + nhdr.n_descsz > end:
            raise _malformed("a note runs past the end of its segment")
        name = image[name_at:name_at + nhdr.n_namesz]
        if name and name[-1] != 0:
            raise _malformed("a note's name does not end with a NUL")
        yield name.partition(b"\0")[0], nhdr.n_type, image[desc_at:desc_at + nhdr.n_descsz]
        pos = desc_at + _align4(nhdr.n_descsz)


def _align4(n: int) -> int:
    return (n + 3) & ~3


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
             ram_size: int) -> PvhBoot:
    """Copy the kernel, command line, initramfs and start info into guest RAM."""
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
        addr = place_initrd(len(initrd), kernel.end, ram_size)
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
