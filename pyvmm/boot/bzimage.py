"""Loading a Linux bzImage through the x86 boot protocol, 64-bit entry.

References: Documentation/x86/boot.rst (the setup header, the loader's duties,
"64-bit BOOT PROTOCOL") and Documentation/x86/zero-page.rst (the layout of
``struct boot_params``); the structures mirror
arch/x86/include/uapi/asm/bootparam.h field by field.

A bzImage file is the real-mode setup code (boot sector + setup sectors,
containing the setup header at 0x1f1) followed by the protected-mode kernel.
A BIOS-less loader like ours skips the real-mode code entirely:

1. copy the protected-mode kernel to 1 MiB;
2. build the "zero page" (``struct boot_params``) from zeroes, copy the
   image's setup header into it and fill in what a boot loader must:
   loader type, command line pointer, initrd, the E820 memory map;
3. start the CPU in 64-bit mode at load address + 0x200 with RSI pointing to
   the zero page (the VMM's CPU setup provides the identity page tables and
   the flat GDT the protocol asks for).

Everything read from the image is checked: a truncated or hostile image gives
``KernelFormatError`` (pyvmm.boot.errors) and nothing is written outside
guest RAM.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

from .e820 import E820Entry, PAGE_SIZE, e820_map, low_ram_end
from .errors import KernelFormatError
from .layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    HIGH_MEMORY_START,
    MMIO_HOLE_START,
    ZERO_PAGE_ADDR,
)


class GuestMemory(Protocol):
    size: int

    def write(self, gpa: int, data: bytes) -> None: ...

    def read(self, gpa: int, size: int) -> bytes: ...


class BootConfigError(KernelFormatError):
    """The image is a good bzImage, but not with this much RAM, this initrd or
    this command line.  A KernelFormatError too, which the CLI reports as one
    line, so callers that catch that catch every loader error."""


# --- Constants, named as boot.rst names them --------------------------------

SETUP_HEADER_OFFSET = 0x1F1     # boot.rst "THE REAL-MODE KERNEL HEADER"
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4         # setup_sects == 0 means 4 (boot.rst)
BOOT_FLAG_MAGIC = 0xAA55        # boot_flag at 0x1fe
HDRS_MAGIC = b"HdrS"            # header at 0x202

# loadflags (boot.rst, "loadflags")
LOADED_HIGH = 0x01              # protected-mode code is loaded at 0x100000
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80             # heap_end_ptr is valid

# xloadflags (boot.rst, "xloadflags", protocol 2.12+)
XLF_KERNEL_64 = 1 << 0          # has the 64-bit entry point at +0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4

# The oldest protocol we accept.  2.06 is the first with cmdline_size, and
# 2.10 the first with pref_address and init_size, but the 64-bit entry point
# is only *advertised* from 2.12 (Linux 3.8), through xloadflags; before that
# the bytes at 0x236 mean nothing, so 2.12 is the real minimum here.
MIN_BOOT_PROTOCOL = 0x020C

TYPE_OF_LOADER_UNDEFINED = 0xFF  # "undefined" boot loader id (boot.rst)
HEAP_END_PTR = 0xFE00            # boot.rst's recommended value for a full heap
NORMAL_VGA = 0xFFFF              # vid_mode "normal" (no mode change)
STARTUP_64_OFFSET = 0x200        # 64-bit entry = load address + 0x200

E820_MAX_ENTRIES_ZEROPAGE = 128
EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6
EDD_INFO_SIZE = 82               # sizeof(struct edd_info)

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


# --- struct setup_header and struct boot_params ---------------------------

class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header``; the comments give the zero-page offset."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", c_u8),             # 0x1f1
        ("root_flags", c_u16),             # 0x1f2
        ("syssize", c_u32),                # 0x1f4
        ("ram_size", c_u16),               # 0x1f8
        ("vid_mode", c_u16),               # 0x1fa
        ("root_dev", c_u16),               # 0x1fc
        ("boot_flag", c_u16),              # 0x1fe
        ("jump", c_u16),                   # 0x200
        ("header", c_u32),                 # 0x202
        ("version", c_u16),                # 0x206
        ("realmode_swtch", c_u32),         # 0x208
        ("start_sys_seg", c_u16),          # 0x20c
        ("kernel_version", c_u16),         # 0x20e
        ("type_of_loader", c_u8),          # 0x210
        ("loadflags", c_u8),               # 0x211
        ("setup_move_size", c_u16),        # 0x212
        ("code32_start", c_u32),           # 0x214
        ("ramdisk_image", c_u32),          # 0x218
        ("ramdisk_size", c_u32),           # 0x21c
        ("bootsect_kludge", c_u32),        # 0x220
        ("heap_end_ptr", c_u16),           # 0x224
        ("ext_loader_ver", c_u8),          # 0x226
        ("ext_loader_type", c_u8),         # 0x227
        ("cmd_line_ptr", c_u32),           # 0x228
        ("initrd_addr_max", c_u32),        # 0x22c
        ("kernel_alignment", c_u32),       # 0x230
        ("relocatable_kernel", c_u8),      # 0x234
        ("min_alignment", c_u8),           # 0x235
        ("xloadflags", c_u16),             # 0x236
        ("cmdline_size", c_u32),           # 0x238
        ("hardware_subarch", c_u32),       # 0x23c
        ("hardware_subarch_data", c_u64),  # 0x240
        ("payload_offset", c_u32),         # 0x248
        ("payload_length", c_u32),         # 0x24c
        ("setup_data", c_u64),             # 0x250
        ("pref_address", c_u64),           # 0x258
        ("init_size", c_u32),              # 0x260
        ("handover_offset", c_u32),        # 0x264
        ("kernel_info_offset", c_u32),     # 0x268
    ]


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``, the zero page.  Structures we never fill in
    (screen_info, EDID, EFI, EDD, ...) are opaque byte arrays of their size."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", c_u8 * 0x40),                  # 0x000
        ("apm_bios_info", c_u8 * 0x14),                # 0x040
        ("_pad2", c_u8 * 4),                           # 0x054
        ("tboot_addr", c_u64),                         # 0x058
        ("ist_info", c_u8 * 0x10),                     # 0x060
        ("acpi_rsdp_addr", c_u64),                     # 0x070
        ("_pad3", c_u8 * 8),                           # 0x078
        ("hd0_info", c_u8 * 16),                       # 0x080
        ("hd1_info", c_u8 * 16),                       # 0x090
        ("sys_desc_table", c_u8 * 16),                 # 0x0a0
        ("olpc_ofw_header", c_u8 * 16),                # 0x0b0
        ("ext_ramdisk_image", c_u32),                  # 0x0c0
        ("ext_ramdisk_size", c_u32),                   # 0x0c4
        ("ext_cmd_line_ptr", c_u32),                   # 0x0c8
        ("_pad4", c_u8 * 112),                         # 0x0cc
        ("cc_blob_address", c_u32),                    # 0x13c
        ("edid_info", c_u8 * 0x80),                    # 0x140
        ("efi_info", c_u8 * 0x20),                     # 0x1c0
        ("alt_mem_k", c_u32),                          # 0x1e0
        ("scratch", c_u32),                            # 0x1e4
        ("e820_entries", c_u8),                        # 0x1e8
        ("eddbuf_entries", c_u8),                      # 0x1e9
        ("edd_mbr_sig_buf_entries", c_u8),             # 0x1ea
        ("kbd_status", c_u8),                          # 0x1eb
        ("secure_boot", c_u8),                         # 0x1ec
        ("_pad5", c_u8 * 2),                           # 0x1ed
        ("sentinel", c_u8),                            # 0x1ef
        ("_pad6", c_u8 * 1),                           # 0x1f0
        ("hdr", SetupHeader),                          # 0x1f1
        ("_pad7", c_u8 * (0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", c_u32 * EDD_MBR_SIG_MAX),           # 0x290
        ("e820_table", E820Entry * E820_MAX_ENTRIES_ZEROPAGE),     # 0x2d0
        ("_pad8", c_u8 * 48),                                      # 0xcd0
        ("eddbuf", c_u8 * (EDDMAXNR * EDD_INFO_SIZE)),             # 0xd00
        ("_pad9", c_u8 * 276),                                     # 0xeec
    ]


# Kernel spellings, for readers coming from bootparam.h.
setup_header = SetupHeader
boot_params = BootParams


def _check_layout() -> None:
    """The offsets of zero-page.rst / boot.rst, checked against ctypes."""
    hdr_offsets = {
        "setup_sects": 0x1F1, "boot_flag": 0x1FE, "header": 0x202,
        "version": 0x206, "type_of_loader": 0x210, "loadflags": 0x211,
        "ramdisk_image": 0x218, "ramdisk_size": 0x21C, "heap_end_ptr": 0x224,
        "cmd_line_ptr": 0x228, "initrd_addr_max": 0x22C,
        "kernel_alignment": 0x230, "relocatable_kernel": 0x234,
        "xloadflags": 0x236, "cmdline_size": 0x238, "setup_data": 0x250,
        "pref_address": 0x258, "init_size": 0x260,
        "kernel_info_offset": 0x268,
    }
    for name, offset in hdr_offsets.items():
        assert getattr(SetupHeader, name).offset == offset - SETUP_HEADER_OFFSET, name
    assert ctypes.sizeof(SetupHeader) == 0x26C - SETUP_HEADER_OFFSET

    bp_offsets = {
        "apm_bios_info": 0x040, "tboot_addr": 0x058, "acpi_rsdp_addr": 0x070,
        "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4,
        "ext_cmd_line_ptr": 0x0C8, "cc_blob_address": 0x13C,
        "edid_info": 0x140, "efi_info": 0x1C0, "alt_mem_k": 0x1E0,
        "e820_entries": 0x1E8, "sentinel": 0x1EF, "hdr": 0x1F1,
        "edd_mbr_sig_buffer": 0x290, "e820_table": 0x2D0, "eddbuf": 0xD00,
    }
    for name, offset in bp_offsets.items():
        assert getattr(BootParams, name).offset == offset, name
    assert ctypes.sizeof(BootParams) == 4096


_check_layout()


# --- Parsing ----------------------------------------------------------------

@dataclass(frozen=True)
class BzImage:
    """A validated bzImage: its setup header and its protected-mode kernel."""

    header: SetupHeader   # as boot.rst says to copy it: up to the header's end
    setup_size: int       # bytes of real-mode code before the kernel
    kernel: bytes         # the protected-mode kernel, loaded at 1 MiB

    @property
    def version(self) -> str:
        return _version_str(self.header.version)

    @property
    def runtime_start(self) -> int:
        """Where the kernel runs (decompresses to), per boot.rst "init_size"."""
        return _runtime_start(self.header, HIGH_MEMORY_START)

    @property
    def end(self) -> int:
        """First address above everything the kernel uses before it reads
        the memory map: the loaded image and runtime_start + init_size."""
        return max(HIGH_MEMORY_START + len(self.kernel),
                   self.runtime_start + self.header.init_size)


def _version_str(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def _runtime_start(hdr: SetupHeader, load_address: int) -> int:
    """The kernel runtime start address (boot.rst, "init_size").

    boot.rst gives align_up(load_address, kernel_alignment) for a relocatable
    kernel; the decompressor (compressed/head_64.S) also never goes below
    LOAD_PHYSICAL_ADDR, which is what pref_address holds, so neither do we.
    """
    if hdr.relocatable_kernel:
        return max(_align_up(load_address, hdr.kernel_alignment), hdr.pref_address)
    return hdr.pref_address


def _read_setup_header(image: bytes) -> SetupHeader:
    """Copy the setup header the way boot.rst tells a loader to: from 0x1f1
    to 0x202 + the byte at 0x201 (the jump's target); fields beyond that end
    belong to newer protocols and read as zero."""
    min_len = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)
    if len(image) < min_len:
        raise KernelFormatError(
            f"kernel image is {len(image)} bytes, too short to hold a setup header "
            f"(at least {min_len} bytes are needed)"
        )
    hdr_end = min(0x202 + image[0x201], min_len)
    raw = image[SETUP_HEADER_OFFSET:hdr_end]
    return SetupHeader.from_buffer_copy(raw.ljust(ctypes.sizeof(SetupHeader), b"\0"))


def _check_magic_and_version(hdr: SetupHeader, image: bytes) -> None:
    if hdr.boot_flag != BOOT_FLAG_MAGIC:
        raise KernelFormatError(
            f"not a Linux kernel image: boot flag at 0x1fe is {hdr.boot_flag:#06x}, "
            f"expected {BOOT_FLAG_MAGIC:#06x}"
        )
    if image[0x202:0x206] != HDRS_MAGIC:
        raise KernelFormatError(
            "not a bzImage: no \"HdrS\" setup header magic at 0x202 "
            "(an ELF vmlinux needs the PVH loader instead)"
        )
    if hdr.version < MIN_BOOT_PROTOCOL:
        raise KernelFormatError(
            f"kernel uses boot protocol {_version_str(hdr.version)}, but pyvmm needs "
            f"{_version_str(MIN_BOOT_PROTOCOL)} or later (Linux 3.8+) for the 64-bit entry point"
        )
    last_field = SETUP_HEADER_OFFSET + SetupHeader.handover_offset.offset
    if 0x202 + image[0x201] < last_field + 4:
        raise KernelFormatError(
            f"setup header ends at {0x202 + image[0x201]:#x}, before the fields "
            f"boot protocol {_version_str(hdr.version)} defines"
        )


def _check_capabilities(hdr: SetupHeader) -> None:
    if not hdr.loadflags & LOADED_HIGH:
        raise KernelFormatError(
            "kernel image is a zImage (LOADED_HIGH clear in loadflags); only bzImages "
            "loaded at 1 MiB are supported"
        )
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise KernelFormatError(
            "kernel has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags); "
            "is it a 32-bit kernel?"
        )
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment
        if align == 0 or align & (align - 1):
            raise KernelFormatError(
                f"relocatable kernel has an invalid kernel_alignment {align:#x} "
                "(must be a power of two)"
            )
    elif hdr.pref_address < HIGH_MEMORY_START:
        raise KernelFormatError(
            f"non-relocatable kernel wants to run at {hdr.pref_address:#x}, below 1 MiB"
        )


def _split_setup(hdr: SetupHeader, image: bytes) -> tuple[int, bytes]:
    setup_size = ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE
    if len(image) <= setup_size:
        raise KernelFormatError(
            f"kernel image is truncated: {len(image)} bytes, but its real-mode setup "
            f"alone takes {setup_size} bytes"
        )
    kernel = image[setup_size:]
    # syssize counts 16-byte paragraphs; a signed kernel may carry more bytes
    # (the signature) after them, never fewer.
    if len(kernel) < hdr.syssize * 16:
        raise KernelFormatError(
            f"kernel image is truncated: its header announces {hdr.syssize * 16} bytes "
            f"of protected-mode kernel, but only {len(kernel)} follow the setup code"
        )
    return setup_size, kernel


def parse_bzimage(image: bytes) -> BzImage:
    """Validate a bzImage and split it into setup header and kernel."""
    image = bytes(image)
    hdr = _read_setup_header(image)
    _check_magic_and_version(hdr, image)
    _check_capabilities(hdr)
    setup_size, kernel = _split_setup(hdr, image)
    bz = BzImage(header=hdr, setup_size=setup_size, kernel=kernel)
    if bz.end > MMIO_HOLE_START:
        raise KernelFormatError(
            f"kernel needs memory up to {bz.end:#x} (runtime start {bz.runtime_start:#x} "
            f"+ init_size {hdr.init_size:#x}), beyond the {MMIO_HOLE_START >> 30} GiB "
            "of low RAM any guest has"
        )
    return bz


# --- Placing things in guest RAM ------------------------------------------

@dataclass(frozen=True)
class BootEntry:
    """The CPU state a loader asks for: where to start and what RSI holds."""

    rip: int
    rsi: int
    mode: str   # "long64": 64-bit mode, identity-mapped, flat GDT, IF=0


def check_cmdline(cmdline: bytes, hdr: SetupHeader) -> bytes:
    """Return the command line NUL-terminated, or raise BootConfigError."""
    if b"\0" in cmdline:
        raise BootConfigError("kernel command line contains a NUL byte")
    # cmdline_size excludes the NUL; CMDLINE_MAX (our buffer) includes it.
    limit = min(hdr.cmdline_size, CMDLINE_MAX - 1)
    if len(cmdline) > limit:
        raise BootConfigError(
            f"kernel command line is {len(cmdline)} bytes, longer than the limit of "
            f"{limit} (kernel cmdline_size {hdr.cmdline_size}, pyvmm buffer {CMDLINE_MAX - 1})"
        )
    return cmdline + b"\0"


def place_initrd(bz: BzImage, initrd_size: int, ram_size: int) -> int:
    """Guest-physical address for an initrd of ``initrd_size`` bytes.

    boot.rst: as high as possible, page aligned, ending at or below
    initrd_addr_max + 1 (the last byte the initrd may occupy is
    initrd_addr_max), in low RAM, and clear of the kernel's footprint.
    """
    top = min(bz.header.initrd_addr_max + 1, low_ram_end(ram_size), MMIO_HOLE_START)
    addr = _align_down(top - initrd_size, PAGE_SIZE)
    floor = _align_up(bz.end, PAGE_SIZE)
    if addr < floor:
        raise BootConfigError(
            f"initrd of {initrd_size} bytes does not fit between the kernel's end "
            f"{floor:#x} and {top:#x}; give the guest more --memory"
        )
    return addr


def build_zero_page(bz: BzImage, ram_size: int, initrd_addr: int = 0,
                    initrd_size: int = 0) -> BootParams:
    """The zero page: zeroes, the image's setup header, and the loader's
    fields (boot.rst "Details of header fields", "write" entries)."""
    params = BootParams()
    params.hdr = bz.header
    hdr = params.hdr
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags |= CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.vid_mode = NORMAL_VGA
    hdr.cmd_line_ptr = CMDLINE_ADDR
    hdr.setup_data = 0                  # we pass no struct setup_data list
    hdr.ramdisk_image = initrd_addr & 0xFFFFFFFF
    hdr.ramdisk_size = initrd_size & 0xFFFFFFFF
    params.ext_ramdisk_image = initrd_addr >> 32
    params.ext_ramdisk_size = initrd_size >> 32
    params.ext_cmd_line_ptr = CMDLINE_ADDR >> 32

    table = e820_map(ram_size)
    for entry, (addr, size, kind) in zip(params.e820_table, table):
        entry.addr, entry.size, entry.type = addr, size, kind
    params.e820_entries = len(table)
    return params


def _write(mem: GuestMemory, gpa: int, data: bytes, ram_end: int) -> None:
    """Write into low RAM; placement was checked already, this is the guard."""
    if gpa < 0 or gpa + len(data) > ram_end:
        raise BootConfigError(f"{len(data)} bytes at {gpa:#x} would fall outside guest RAM")
    mem.write(gpa, data)


def load_bzimage(mem: GuestMemory, image: bytes, cmdline: bytes,
                 initrd: bytes | None, ram_size: int, initrd_ram: int | None = None) -> BootEntry:
    """Load a bzImage, its command line and initrd; build the zero page.

    The initrd ends below ``initrd_ram`` (default: all of ``ram_size``).
    Nothing is written unless everything fits.  Raises KernelFormatError
    for a bad image and its subclass BootConfigError when the RAM size,
    the initrd or the command line do not fit.
    """
    bz = parse_bzimage(image)
    ram_end = low_ram_end(ram_size)
    if bz.end > ram_end:
        raise BootConfigError(
            f"kernel needs memory up to {bz.end:#x} but guest RAM below the MMIO hole "
            f"ends at {ram_end:#x}; give the guest more --memory"
        )
    cmdline_z = check_cmdline(cmdline, bz.header)
    initrd = initrd or b""
    initrd_addr = place_initrd(bz, len(initrd), min(ram_size, initrd_ram or ram_size)) if initrd else 0
    params = build_zero_page(bz, ram_size, initrd_addr, len(initrd))

    _write(mem, HIGH_MEMORY_START, bz.kernel, ram_end)
    _write(mem, CMDLINE_ADDR, cmdline_z, ram_end)
    if initrd:
        _write(mem, initrd_addr, initrd, ram_end)
    _write(mem, ZERO_PAGE_ADDR, bytes(params), ram_end)
    return BootEntry(rip=HIGH_MEMORY_START + STARTUP_64_OFFSET, rsi=ZERO_PAGE_ADDR,
                     mode="long64")
