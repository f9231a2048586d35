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
import json
import subprocess
import sys
from ctypes import c_uint32, c_uint64, sizeof
from dataclasses import dataclass
from pathlib import Path

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
    entry32: int                                          # physical PVH entry point
    segments: list[tuple[int, int, bytes | memoryview]]   # (paddr, memsz, file bytes)

    @property
    def end(self) -> int:
        return max(paddr + memsz for paddr, memsz, _ in self.segments)


# An ELF kernel's layout: the PVH entry and each PT_LOAD's (paddr, memsz, offset, filesz).
ElfLayout = tuple[int, list[tuple[int, int, int, int]]]

PARSER_TIMEOUT = 60   # seconds for the child that reads a kernel's ELF headers


def is_elf(image: bytes) -> bool:
    return image[:4] == b"\x7fELF"


def elf_kernel_layout(image: bytes) -> ElfLayout:
    """Read a vmlinux's headers with pyelftools; KernelFormatError if unusable."""
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile

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
                segments.append((seg["p_paddr"], seg["p_memsz"], seg["p_offset"], seg["p_filesz"]))
    except (ELFError, ConstructError, ValueError, KeyError, OverflowError) as e:
        if isinstance(e, KernelFormatError):
            raise
        raise KernelFormatError(f"the ELF kernel is malformed: {e}") from None
    if entry32 is None:
        raise KernelFormatError("the ELF kernel has no PVH entry note "
                                "(XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y")
    if not segments:
        raise KernelFormatError("the ELF kernel has no PT_LOAD segment")
    return entry32, segments


def kernel_from_layout(image: bytes, elf_layout: ElfLayout) -> ElfKernel:
    """The segments' bytes, as views of ``image``, once each one is checked against it."""
    entry32, segments = elf_layout
    view = memoryview(image)
    loaded = []
    for paddr, memsz, offset, filesz in segments:
        if filesz > memsz:
            raise KernelFormatError("an ELF segment has p_filesz > p_memsz")
        if offset + filesz > len(image):
            raise KernelFormatError("the ELF kernel is truncated: a segment's data "
                                    "runs past the end of the file")
        loaded.append((paddr, memsz, view[offset:offset + filesz]))
    return ElfKernel(entry32, loaded)


def parse_elf_kernel(image: bytes) -> ElfKernel:
    """Check a vmlinux and find its PVH entry, in this process; KernelFormatError if unusable."""
    return kernel_from_layout(image, elf_kernel_layout(image))


def parse_elf_kernel_apart(image: bytes, timeout: float = PARSER_TIMEOUT) -> ElfKernel:
    """``parse_elf_kernel`` with pyelftools run in a child Python (``python -I``).

    The VMM then never imports pyelftools: its modules (and the pdb they pull in)
    would hold ~2.4 MiB of the VMM's memory for the VM's whole life, to read a few
    headers once.  The child gets the image on stdin and answers one JSON line.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from pyvmm.boot.pvh import layout_child_main; layout_child_main()")
    try:
        child = subprocess.run([sys.executable, "-I", "-c", code, package_root], input=image,
                               capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise KernelFormatError(f"reading the ELF kernel took longer than {timeout} s") from None
    except OSError as e:   # no usable sys.executable (an embedded Python)
        raise KernelFormatError(f"cannot start the ELF header reader {sys.executable!r}: "
                                f"{e.strerror}") from None
    if child.returncode != 0:
        tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise KernelFormatError(f"the ELF header reader failed (status {child.returncode}): {tail[0]}")
    try:
        answer = json.loads(child.stdout)
        error = answer.get("error")
        if error is None:
            paddr_memsz_offset_filesz = [tuple(int(v) for v in s) for s in answer["segments"]]
            if any(len(s) != 4 for s in paddr_memsz_offset_filesz):
                raise ValueError("a segment is not (paddr, memsz, offset, filesz)")
            elf_layout = (int(answer["entry32"]), paddr_memsz_offset_filesz)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KernelFormatError(f"the ELF header reader answered nonsense: {e}") from None
    if error is not None:
        raise KernelFormatError(str(error))
    return kernel_from_layout(image, elf_layout)


def layout_child_main() -> None:
    """The child of ``parse_elf_kernel_apart``: an image on stdin, one JSON line out."""
    try:
        entry32, segments = elf_kernel_layout(sys.stdin.buffer.read())
        answer: dict = {"entry32": entry32, "segments": segments}
    except KernelFormatError as e:
        answer = {"error": str(e)}
    sys.stdout.write(json.dumps(answer) + "\n")


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
