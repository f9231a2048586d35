"""The ELF vmlinux / PVH loader (pyvmm.boot.pvh).

Synthetic kernels are ELF64 files built byte by byte here (ELF header,
program headers, a PT_NOTE with the "Xen" PHYS32_ENTRY note, PT_LOADs), so
each test states exactly what the loader sees.  The real guest kernel is
checked too when `make guest` has built it.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

from pyvmm.boot import layout
from pyvmm.boot.e820 import e820_map
from pyvmm.boot.errors import KernelFormatError
from pyvmm.boot.layout import GiB, MiB
from pyvmm.boot.loader import kernel_mem_limit, load_kernel
from pyvmm.boot.pvh import (
    MEMMAP_ADDR,
    MODLIST_ADDR,
    PVH_START_INFO_VERSION,
    XEN_ELFNOTE_PHYS32_ENTRY,
    XEN_HVM_START_MAGIC_VALUE,
    ElfKernel,
    elf_kernel_layout,
    hvm_memmap_table_entry,
    hvm_modlist_entry,
    hvm_start_info,
    is_elf,
    load_pvh,
    kernel_from_layout,
    parse_elf_kernel,
    parse_elf_kernel_apart,
    place_initrd,
)
from boot_fakes import FakeMemory

REPO = Path(__file__).resolve().parent.parent
REAL_VMLINUX = REPO / "guest" / "build" / "vmlinux"
PAGE = 4096

# --- a hand-made ELF64 ----------------------------------------------------------------
PT_LOAD, PT_NOTE = 1, 4
ET_EXEC, ET_DYN = 2, 3
EM_X86_64, EM_AARCH64 = 62, 183
EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")   # 64 bytes
PHDR64 = struct.Struct("<IIQQQQQQ")           # 56 bytes
assert EHDR64.size == 64 and PHDR64.size == 56

ENTRY32 = 0x1000200
SEG0 = (0x1000000, bytes(range(256)) * 4, 0x1000)        # text: 1 KiB of file data, 4 KiB in memory
SEG1 = (0x1200000, b"\xaa\x55" * 64, 0x3000)              # data + .bss


def xen_note(desc: bytes, n_type: int = XEN_ELFNOTE_PHYS32_ENTRY, name: bytes = b"Xen") -> bytes:
    """One ELF note: namesz, descsz, type, name (NUL, padded to 4), desc (padded to 4)."""
    name_z = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name_z), len(desc), n_type) + pad(name_z) + pad(desc)


def build_elf(*, notes: list[bytes] | None = None, segments=(SEG0, SEG1), e_type: int = ET_EXEC,
              e_machine: int = EM_X86_64, filesz_override: int | None = None) -> bytes:
    """ELF64 little-endian: header, program headers, note data, then segment data.

    ``segments`` are (paddr, file bytes, memsz); ``notes=None`` means the usual
    PHYS32_ENTRY note for ENTRY32; ``notes=[]`` means no PT_NOTE at all.
    """
    if notes is None:
        notes = [xen_note(struct.pack("<I", ENTRY32))]
    note_blob = b"".join(notes)
    phnum = len(segments) + (1 if notes else 0)
    offset = EHDR64.size + phnum * PHDR64.size
    phdrs, body = [], b""
    if notes:
        phdrs.append(PHDR64.pack(PT_NOTE, 4, offset, 0, 0, len(note_blob), len(note_blob), 4))
        body += note_blob
        offset += len(note_blob)
    for paddr, data, memsz in segments:
        filesz = len(data) if filesz_override is None else filesz_override
        phdrs.append(PHDR64.pack(PT_LOAD, 5, offset, paddr | 0xFFFFFFFF80000000, paddr,
                                 filesz, memsz, 0x200000))
        body += data
        offset += len(data)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)   # ELFCLASS64, LSB, EV_CURRENT, SysV
    ehdr = EHDR64.pack(ident, e_type, e_machine, 1, 0xFFFFFFFF81000000, EHDR64.size, 0, 0,
                       EHDR64.size, PHDR64.size, phnum, 64, 0, 0)
    return ehdr + b"".join(phdrs) + body


def build_elf32() -> bytes:
    """A valid ELFCLASS32 i386 executable header with no program headers."""
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)
    return struct.pack("<16sHHIIIIIHHHHHH", ident, ET_EXEC, 3, 1, 0x100000, 0, 0, 0,
                       52, 32, 0, 40, 0, 0)


def start_info(mem: FakeMemory) -> hvm_start_info:
    return hvm_start_info.from_buffer_copy(mem.read(layout.PVH_START_INFO_ADDR, 56))


# --- struct layout (xen/include/public/arch-x86/hvm/start_info.h) ------------------------
def test_hvm_start_info_layout():
    assert ctypes.sizeof(hvm_start_info) == 56
    offsets = {name: getattr(hvm_start_info, name).offset for name, _ in hvm_start_info._fields_}
    assert offsets == {"magic": 0, "version": 4, "flags": 8, "nr_modules": 12,
                       "modlist_paddr": 16, "cmdline_paddr": 24, "rsdp_paddr": 32,
                       "memmap_paddr": 40, "memmap_entries": 48, "reserved": 52}


def test_hvm_modlist_entry_layout():
    assert ctypes.sizeof(hvm_modlist_entry) == 32
    assert [(n, getattr(hvm_modlist_entry, n).offset) for n, _ in hvm_modlist_entry._fields_] == [
        ("paddr", 0), ("size", 8), ("cmdline_paddr", 16), ("reserved", 24)]


def test_hvm_memmap_table_entry_layout():
    assert ctypes.sizeof(hvm_memmap_table_entry) == 24
    assert [(n, getattr(hvm_memmap_table_entry, n).offset) for n, _ in hvm_memmap_table_entry._fields_] == [
        ("addr", 0), ("size", 8), ("type", 16), ("reserved", 20)]


def test_start_info_bytes_are_little_endian():
    info = hvm_start_info(magic=XEN_HVM_START_MAGIC_VALUE, version=1, cmdline_paddr=0x20000)
    raw = bytes(info)
    assert raw[0:4] == b"\x78\xc5\x6e\x33"
    assert raw[4:8] == b"\x01\0\0\0"
    assert raw[24:32] == (0x20000).to_bytes(8, "little")


def test_constants():
    assert XEN_ELFNOTE_PHYS32_ENTRY == 18
    assert XEN_HVM_START_MAGIC_VALUE == 0x336EC578
    assert PVH_START_INFO_VERSION == 1
    # modlist and memmap share the start info page and do not overlap it or each other
    assert layout.PVH_START_INFO_ADDR + 56 <= MODLIST_ADDR
    assert MODLIST_ADDR + 32 <= MEMMAP_ADDR < layout.PVH_START_INFO_ADDR + PAGE


# --- parse_elf_kernel: the real guest kernel ----------------------------------------------
def test_parse_real_vmlinux():
    if not REAL_VMLINUX.exists():
        pytest.skip(f"{REAL_VMLINUX} is missing: run `make guest`")
    kernel = parse_elf_kernel(REAL_VMLINUX.read_bytes())
    start = min(paddr for paddr, _, _ in kernel.segments)
    assert start >= layout.HIGH_MEMORY_START
    assert start <= kernel.entry32 < kernel.end
    # the entry lies inside one of the segments' file data (it is code)
    assert any(paddr <= kernel.entry32 < paddr + len(data) for paddr, _, data in kernel.segments)
    for paddr, memsz, data in kernel.segments:
        assert len(data) <= memsz
    assert kernel.end < 3 * GiB


# --- parse_elf_kernel: synthetic kernels ---------------------------------------------------
def test_parse_minimal_elf():
    image = build_elf()
    assert is_elf(image)
    kernel = parse_elf_kernel(image)
    assert kernel.entry32 == ENTRY32
    assert kernel.segments == [(0x1000000, 0x1000, SEG0[1]), (0x1200000, 0x3000, SEG1[1])]
    assert kernel.end == 0x1200000 + 0x3000


def test_parse_one_segment():
    kernel = parse_elf_kernel(build_elf(segments=[SEG0]))
    assert kernel.entry32 == ENTRY32
    assert kernel.segments == [(0x1000000, 0x1000, SEG0[1])]
    assert kernel.end == 0x1001000


def test_parse_skips_other_notes():
    notes = [xen_note(b"\x01\x02\x03\x04" * 5, n_type=3, name=b"GNU"),       # a build id
             xen_note(struct.pack("<Q", 0xFFFFFFFF81000000), n_type=1),      # XEN_ELFNOTE_ENTRY
             xen_note(struct.pack("<I", 0x1000040))]
    assert parse_elf_kernel(build_elf(notes=notes)).entry32 == 0x1000040


def test_parse_entry_uses_the_low_four_bytes_of_a_longer_desc():
    note = xen_note(struct.pack("<Q", 0xDEAD_0000_0100_0080))
    assert parse_elf_kernel(build_elf(notes=[note])).entry32 == 0x01000080


def test_is_elf():
    assert is_elf(b"\x7fELF\x02")
    assert not is_elf(b"MZ\x90\x00")
    assert not is_elf(b"")


@pytest.mark.parametrize("image, words", [
    (build_elf32(), "not an x86-64 image"),
    (build_elf(e_machine=EM_AARCH64), "not an x86-64 image"),
    (build_elf(e_type=ET_DYN), "ET_EXEC"),
    (build_elf(notes=[]), "no PVH entry note"),
    (build_elf(notes=[xen_note(b"\x00\x01")]), "truncated"),
    (build_elf(notes=[xen_note(b"")]), "truncated"),
    (build_elf(notes=[xen_note(struct.pack("<I", ENTRY32), name=b"Linux")]), "no PVH entry note"),
    (build_elf(notes=[xen_note(struct.pack("<I", ENTRY32), n_type=17)]), "no PVH entry note"),
    (build_elf(segments=[(0x1000000, bytes(16), 8)]), "p_filesz > p_memsz"),
    (build_elf(segments=[]), "no PT_LOAD"),
    (b"\x7fELF" + bytes(60), "malformed"),
    (b"\x7fELF\x02\x01\x01", "malformed"),
    (b"definitely not an ELF file" * 4, "malformed"),
    (b"", "malformed"),
], ids=["elf32", "aarch64", "et_dyn", "no_note", "desc_2_bytes", "desc_empty", "note_owner_linux",
        "note_type_17", "filesz_gt_memsz", "no_pt_load", "zero_header", "short_header", "not_elf",
        "empty"])
def test_parse_errors(image, words):
    with pytest.raises(KernelFormatError) as exc:
        parse_elf_kernel(image)
    message = str(exc.value)
    assert words in message
    assert "\n" not in message


def test_parse_truncated_note_at_end_of_file():
    # The note segment is last in the file and the file ends inside its desc.
    image = build_elf(notes=[xen_note(struct.pack("<I", ENTRY32))], segments=[])[:-2]
    with pytest.raises(KernelFormatError):
        parse_elf_kernel(image)


def test_parse_rejects_segment_data_cut_by_end_of_file():
    image = build_elf(segments=[SEG0])
    cut = image[:-100]                  # the last 100 bytes of SEG0's code are missing
    with pytest.raises(KernelFormatError):
        parse_elf_kernel(cut)


def test_parse_rejects_filesz_beyond_end_of_file():
    image = build_elf(segments=[(0x1000000, bytes(64), 0x1000)], filesz_override=0x800)
    with pytest.raises(KernelFormatError):
        parse_elf_kernel(image)


# --- hypothesis: garbage never escapes as anything but KernelFormatError -------------------
# derandomize: the same examples every run, so a failure here is a regression, never luck.
VALID = build_elf()
NOTE_OFFSET = EHDR64.size + 3 * PHDR64.size       # where build_elf() puts the note


def _parse_or_format_error(image: bytes) -> None:
    try:
        kernel = parse_elf_kernel(image)
    except KernelFormatError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(kernel, ElfKernel)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_kernel_format_error(image):
    _parse_or_format_error(image)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=256))
def test_random_bytes_after_elf_magic_only_raise_kernel_format_error(tail):
    _parse_or_format_error(b"\x7fELF" + tail)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
@example(patches=[(191, 128)])   # a segment size pyelftools cannot even slice with (OverflowError)
def test_corrupted_images_only_raise_kernel_format_error(patches):
    image = bytearray(VALID)
    for pos, value in patches:
        image[pos] = value
    _parse_or_format_error(bytes(image))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, NOTE_OFFSET - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_headers_only_raise_kernel_format_error(patches):
    image = bytearray(VALID)
    for pos, value in patches:
        image[pos] = value
    _parse_or_format_error(bytes(image))


def test_every_truncation_only_raises_kernel_format_error():
    for n in range(len(VALID) + 1):
        _parse_or_format_error(VALID[:n])


def test_note_name_without_nul_raises_kernel_format_error():
    bad = struct.pack("<III", 4, 4, 1) + b"ABCD" + b"\0\0\0\0"   # n_namesz 4, name "ABCD", no NUL
    with pytest.raises(KernelFormatError):
        parse_elf_kernel(build_elf(notes=[bad, xen_note(struct.pack("<I", ENTRY32))]))


def test_note_with_empty_name_is_skipped():
    empty = struct.pack("<III", 0, 4, 1) + b"\0\0\0\0"          # owner "", 4 bytes of desc
    assert parse_elf_kernel(build_elf(notes=[empty, xen_note(struct.pack("<I", ENTRY32))])).entry32 == ENTRY32


def test_truncations_outside_segment_data():
    # Cuts anywhere up to the end of the note: never accepted, never a foreign exception.
    for n in range(NOTE_OFFSET + 20):
        with pytest.raises(KernelFormatError):
            parse_elf_kernel(VALID[:n])


# --- load_pvh ---------------------------------------------------------------------------
RAM = 64 * MiB
KERNEL = parse_elf_kernel(VALID)


def test_load_writes_segments_and_zeroes_bss():
    mem = FakeMemory(RAM)
    mem.write(0x1200000, b"\xee" * 0x3000)       # stale bytes where .bss goes
    boot = load_pvh(mem, KERNEL, b"console=ttyS0", None, RAM)
    assert boot.entry32 == ENTRY32
    assert boot.start_info == layout.PVH_START_INFO_ADDR
    assert boot.initrd is None
    assert mem.read(0x1000000, 0x400) == SEG0[1]
    assert mem.read(0x1200000, 128) == SEG1[1]
    assert mem.read(0x1200000 + 128, 0x3000 - 128) == bytes(0x3000 - 128)


def test_load_start_info_without_initrd():
    mem = FakeMemory(RAM)
    load_pvh(mem, KERNEL, b"console=ttyS0 quiet", None, RAM)
    info = start_info(mem)
    assert info.magic == 0x336EC578
    assert info.version == 1
    assert info.flags == 0
    assert info.nr_modules == 0
    assert info.modlist_paddr == 0
    assert info.cmdline_paddr == layout.CMDLINE_ADDR == 0x20000
    assert info.rsdp_paddr == 0
    assert info.memmap_paddr == MEMMAP_ADDR
    assert info.reserved == 0


def test_load_cmdline_is_nul_terminated():
    mem = FakeMemory(RAM)
    mem.write(layout.CMDLINE_ADDR, b"\xff" * 64)
    cmdline = b"console=ttyS0 pyvmm.share=fs"
    load_pvh(mem, KERNEL, cmdline, None, RAM)
    assert mem.read(layout.CMDLINE_ADDR, len(cmdline) + 1) == cmdline + b"\0"


def test_load_empty_cmdline():
    mem = FakeMemory(RAM)
    mem.write(layout.CMDLINE_ADDR, b"\xff")
    load_pvh(mem, KERNEL, b"", None, RAM)
    assert mem.read(layout.CMDLINE_ADDR, 1) == b"\0"


def test_load_longest_cmdline_fits():
    mem = FakeMemory(RAM)
    cmdline = b"x" * (layout.CMDLINE_MAX - 1)
    load_pvh(mem, KERNEL, cmdline, None, RAM)
    assert mem.read(layout.CMDLINE_ADDR, layout.CMDLINE_MAX) == cmdline + b"\0"


def test_load_too_long_cmdline():
    with pytest.raises(KernelFormatError, match="command line is longer than 4095 bytes"):
        load_pvh(FakeMemory(RAM), KERNEL, b"x" * layout.CMDLINE_MAX, None, RAM)


@pytest.mark.parametrize("ram", [64 * MiB, 256 * MiB, 3 * GiB, 4 * GiB, 5 * GiB + 4096])
def test_load_memmap_equals_e820(ram):
    mem = FakeMemory(ram)
    load_pvh(mem, KERNEL, b"", None, ram)
    info = start_info(mem)
    expected = e820_map(ram)
    assert info.memmap_entries == len(expected)
    raw = mem.read(MEMMAP_ADDR, 24 * len(expected))
    table = [hvm_memmap_table_entry.from_buffer_copy(raw, 24 * i) for i in range(len(expected))]
    assert [(e.addr, e.size, e.type) for e in table] == expected
    assert all(e.reserved == 0 for e in table)


@pytest.mark.parametrize("ram, size", [
    (64 * MiB, 5000),
    (64 * MiB, 4096),
    (64 * MiB, 1),
    (256 * MiB, 3 * MiB + 123),
    (3 * GiB, 1 * MiB),
    (4 * GiB, 7 * PAGE + 1),          # RAM above the hole: the initramfs stays below 3 GiB
    (6 * GiB, 2 * MiB),
])
def test_load_initrd_placement(ram, size):
    mem = FakeMemory(ram)
    initrd = (bytes(range(1, 256)) * (size // 255 + 1))[:size]
    boot = load_pvh(mem, KERNEL, b"", initrd, ram)
    low_end = min(ram, 3 * GiB)
    addr = (low_end - size) & ~0xFFF
    assert boot.initrd == (addr, size)
    assert addr % PAGE == 0
    assert addr >= KERNEL.end
    assert addr + size <= low_end
    assert low_end - (addr + size) < PAGE           # as high as it goes
    assert mem.read(addr, size) == initrd

    info = start_info(mem)
    assert info.nr_modules == 1
    assert info.modlist_paddr == MODLIST_ADDR
    entry = hvm_modlist_entry.from_buffer_copy(mem.read(MODLIST_ADDR, 32))
    assert (entry.paddr, entry.size, entry.cmdline_paddr, entry.reserved) == (addr, size, 0, 0)


def test_load_initrd_exactly_fills_ram_above_kernel():
    ram = 32 * MiB
    room = ram - KERNEL.end                 # KERNEL.end is page aligned
    assert room % PAGE == 0
    boot = load_pvh(FakeMemory(ram), KERNEL, b"", b"\1" * room, ram)
    assert boot.initrd == (KERNEL.end, room)


def test_load_initrd_too_big():
    ram = 32 * MiB
    room = ram - KERNEL.end
    with pytest.raises(KernelFormatError, match="does not fit in 32 MiB of low RAM above the kernel"):
        load_pvh(FakeMemory(ram), KERNEL, b"", b"\1" * (room + 1), ram)


def test_load_initrd_larger_than_ram():
    with pytest.raises(KernelFormatError, match="initramfs"):
        load_pvh(FakeMemory(RAM), KERNEL, b"", b"\1" * (RAM + PAGE), RAM)


def test_place_initrd():
    assert place_initrd(5000, 0x1400000, 64 * MiB) == 64 * MiB - 2 * PAGE
    assert place_initrd(PAGE, 0x1400000, 8 * GiB) == 3 * GiB - PAGE
    with pytest.raises(KernelFormatError):
        place_initrd(64 * MiB, 0x1400000, 64 * MiB)


def test_load_empty_initrd_adds_no_module():
    mem = FakeMemory(RAM)
    boot = load_pvh(mem, KERNEL, b"", b"", RAM)
    assert boot.initrd is None
    assert start_info(mem).nr_modules == 0


@pytest.mark.parametrize("paddr, memsz, ram", [
    (64 * MiB - 0x800, 0x1000, 64 * MiB),        # ends past the end of RAM
    (64 * MiB, 0x1000, 64 * MiB),                # starts at the end of RAM
    (3 * GiB - 0x1000, 0x2000, 4 * GiB),         # runs into the MMIO hole
    (4 * GiB, 0x1000, 8 * GiB),                  # above the hole (not where a PVH kernel goes)
    (0x80000, 0x1000, 64 * MiB),                 # below 1 MiB: the boot structures live there
    (0x0, 0x1000, 64 * MiB),
])
def test_load_segment_outside_ram(paddr, memsz, ram):
    kernel = ElfKernel(ENTRY32, [(0x1000000, 0x1000, b"\x90" * 16), (paddr, memsz, b"\x90" * 16)])
    with pytest.raises(KernelFormatError, match="does not fit"):
        load_pvh(FakeMemory(ram), kernel, b"", None, ram)


def test_load_segment_up_to_the_last_byte_of_ram():
    kernel = ElfKernel(ENTRY32, [(RAM - 0x1000, 0x1000, b"\x90" * 0x1000)])
    mem = FakeMemory(RAM)
    load_pvh(mem, kernel, b"", None, RAM)
    assert mem.read(RAM - 0x1000, 0x1000) == b"\x90" * 0x1000


def test_load_real_vmlinux():
    if not REAL_VMLINUX.exists():
        pytest.skip(f"{REAL_VMLINUX} is missing: run `make guest`")
    kernel = parse_elf_kernel(REAL_VMLINUX.read_bytes())
    ram = 256 * MiB
    mem = FakeMemory(ram)
    boot = load_pvh(mem, kernel, b"console=ttyS0", b"070701" + bytes(100), ram)
    assert boot.entry32 == kernel.entry32
    paddr, _, data = kernel.segments[0]
    assert mem.read(paddr, 64) == data[:64]
    assert boot.initrd[0] >= kernel.end
    assert start_info(mem).magic == XEN_HVM_START_MAGIC_VALUE


# --- mem= on the command line: the initramfs goes below the kernel's limit -----------------

@pytest.mark.parametrize("cmdline, limit", [
    (b"console=ttyS0", None),
    (b"mem=256M", 256 * MiB),
    (b"quiet mem=256m panic=-1", 256 * MiB),
    (b"mem=1G mem=512M", 512 * MiB),          # every mem= drops more: the smallest counts
    (b"mem=512M mem=1G", 512 * MiB),
    (b"mem=0x10000000", 256 * MiB),
    (b"mem=020M", 16 * MiB),                  # memparse reads a leading 0 as octal
    (b"mem=262144k", 256 * MiB),
    (b"mem=1T", 1 << 40),
    (b"mem=268435456", 256 * MiB),
    (b"mem=256Mfoo", 256 * MiB),              # memparse stops after the suffix
    (b"mem=nopentium", None),
    (b"mem=0", None),
    (b"mem=", None),
    (b"xmem=64M memmap=64M", None),
])
def test_kernel_mem_limit(cmdline, limit):
    assert kernel_mem_limit(cmdline) == limit


@given(st.binary(max_size=200))
def test_kernel_mem_limit_reads_any_bytes(cmdline):
    limit = kernel_mem_limit(cmdline)
    assert limit is None or limit > 0


def test_load_kernel_puts_the_initramfs_below_a_mem_limit():
    """The kernel copies an initramfs above its ``mem=`` limit down, in the emulator on PVM."""
    ram, initrd = 1 * GiB, b"\1" * (3 * PAGE)
    for cmdline, top in [(b"console=ttyS0", ram), (b"mem=256M", 256 * MiB), (b"mem=2G", ram)]:
        mem = FakeMemory(ram)
        load_kernel(mem, VALID, cmdline, initrd, ram)
        entry = hvm_modlist_entry.from_buffer_copy(mem.read(MODLIST_ADDR, 32))
        assert entry.paddr == top - len(initrd)
        assert mem.read(entry.paddr, len(initrd)) == initrd
        assert len(e820_map(ram)) == start_info(mem).memmap_entries   # the map keeps all the RAM


# --- parse_elf_kernel_apart: pyelftools in a child Python ---------------------------------

def test_parse_apart_equals_parse_in_process():
    images = [VALID, build_elf(segments=(SEG0,))]
    if REAL_VMLINUX.exists():   # (skipped above when missing)
        images.append(REAL_VMLINUX.read_bytes())
    for image in images:
        here, apart = parse_elf_kernel(image), parse_elf_kernel_apart(image)
        assert apart.entry32 == here.entry32
        assert [(p, m, bytes(d)) for p, m, d in apart.segments] == \
               [(p, m, bytes(d)) for p, m, d in here.segments]


@pytest.mark.parametrize("image", [build_elf(notes=[]), build_elf(e_type=ET_DYN), VALID[:100],
                                   build_elf32()])
def test_parse_apart_reports_what_parse_in_process_reports(image):
    with pytest.raises(KernelFormatError) as here:
        parse_elf_kernel(image)
    with pytest.raises(KernelFormatError) as apart:
        parse_elf_kernel_apart(image)
    assert str(apart.value) == str(here.value)


def test_parse_apart_when_the_child_fails(monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")
    with pytest.raises(KernelFormatError, match=r"reader failed \(status 1\)"):
        parse_elf_kernel_apart(VALID)
    monkeypatch.setattr("sys.executable", "/no/such/python")
    with pytest.raises(KernelFormatError, match="cannot start the ELF header reader"):
        parse_elf_kernel_apart(VALID)


def test_a_segment_past_the_end_of_the_image_is_refused():
    entry32, segments = elf_kernel_layout(VALID)
    paddr, memsz, offset, filesz = segments[0]
    with pytest.raises(KernelFormatError, match="truncated"):
        kernel_from_layout(VALID, (entry32, [(paddr, memsz, len(VALID) - 1, filesz)]))
    with pytest.raises(KernelFormatError, match="p_filesz > p_memsz"):
        kernel_from_layout(VALID, (entry32, [(paddr, filesz - 1, offset, filesz)]))
