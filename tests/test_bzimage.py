"""The bzImage loader against synthetic images built from boot.rst offsets."""

import glob
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm.boot.bzimage import (
    BootConfigError,
    KernelFormatError,
    load_bzimage,
    parse_bzimage,
    place_initrd,
)
from pyvmm.boot.e820 import e820_map
from pyvmm.boot.layout import CMDLINE_ADDR, GiB, MiB, ZERO_PAGE_ADDR
from boot_fakes import FakeMemory

RAM = 64 * MiB
PAGE = 4096


# Header fields at their zero-page offsets (Documentation/x86/boot.rst).
HEADER_FIELDS = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "4s"),
    "version": (0x206, "H"),
    "loadflags": (0x211, "B"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}

DEFAULTS = dict(
    setup_sects=4,
    boot_flag=0xAA55,
    jump=0xEB | (0x6A << 8),       # jmp short to 0x26c: the 2.15 header end
    header=b"HdrS",
    version=0x020F,
    loadflags=0x01,                # LOADED_HIGH
    initrd_addr_max=0x7FFFFFFF,
    kernel_alignment=0x200000,
    relocatable_kernel=1,
    xloadflags=0x1,                # XLF_KERNEL_64
    cmdline_size=2047,
    pref_address=0x1000000,
    init_size=0x800000,
)


def make_image(kernel_size: int = 8192, **fields) -> bytes:
    values = {**DEFAULTS, "syssize": kernel_size // 16, **fields}
    setup = bytearray((values["setup_sects"] or 4) * 512 + 512)
    for name, (offset, fmt) in HEADER_FIELDS.items():
        struct.pack_into("<" + fmt, setup, offset, values[name])
    kernel = bytes(i & 0xFF for i in range(kernel_size))
    return bytes(setup) + kernel


def zero_page(mem: FakeMemory) -> bytes:
    return mem.read(ZERO_PAGE_ADDR, 4096)


def u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


# --- parsing --------------------------------------------------------------

def test_parse_splits_setup_and_kernel():
    bz = parse_bzimage(make_image(kernel_size=5000, setup_sects=7))
    assert bz.setup_size == 8 * 512
    assert len(bz.kernel) == 5000
    assert bz.version == "2.15"
    assert bz.kernel[:3] == b"\0\1\2"


def test_bytes_after_the_kernel_are_allowed():
    """A signed kernel carries its signature after syssize * 16 bytes."""
    bz = parse_bzimage(make_image(kernel_size=4096) + b"signature")
    assert len(bz.kernel) == 4096 + len(b"signature")


def test_setup_sects_zero_means_four():
    assert parse_bzimage(make_image(setup_sects=0)).setup_size == 5 * 512


def test_runtime_start_and_end():
    bz = parse_bzimage(make_image(pref_address=0x1000000, init_size=0x800000))
    assert bz.runtime_start == 0x1000000
    assert bz.end == 0x1800000
    # relocatable, no preference: 1 MiB aligned up to kernel_alignment
    bz = parse_bzimage(make_image(pref_address=0, kernel_alignment=0x200000))
    assert bz.runtime_start == 0x200000


@pytest.mark.parametrize(
    "image, message",
    [
        (b"", "too short"),
        (make_image()[:0x250], "too short"),
        (make_image(boot_flag=0x1234), "boot flag"),
        (make_image(header=b"HdrX"), "HdrS"),
        (make_image(version=0x0206), "boot protocol 2.06"),
        (make_image(version=0x020B), "2.12 or later"),
        (make_image(jump=0xEB | (0x50 << 8)), "setup header ends"),
        (make_image(loadflags=0), "zImage"),
        (make_image(xloadflags=0), "64-bit entry"),
        (make_image(kernel_alignment=0x300000), "kernel_alignment"),
        (make_image(relocatable_kernel=0, pref_address=0x8000), "below 1 MiB"),
        (make_image()[:5 * 512], "truncated"),
        (make_image()[:-1], "truncated"),
        (make_image(syssize=0x10000000), "truncated"),
        (make_image(setup_sects=200, kernel_size=0), "truncated"),
        (make_image(init_size=0xFFFFFFFF), "beyond the 3 GiB"),
        (make_image(relocatable_kernel=0, pref_address=1 << 60), "beyond the 3 GiB"),
    ],
)
def test_validation_failures(image, message):
    with pytest.raises(KernelFormatError, match=message) as info:
        parse_bzimage(image)
    assert type(info.value) is KernelFormatError      # the image, not the config
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


# --- loading --------------------------------------------------------------

def test_load_writes_kernel_cmdline_and_zero_page():
    mem = FakeMemory(RAM)
    image = make_image(kernel_size=3000)
    entry = load_bzimage(mem, image, b"console=ttyS0 quiet", None, RAM)
    assert (entry.rip, entry.rsi, entry.mode) == (0x100200, ZERO_PAGE_ADDR, "long64")
    assert mem.read(0x100000, 3000) == parse_bzimage(image).kernel
    assert mem.read(CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"

    zp = zero_page(mem)
    # The setup header is the image's, except for the fields a loader writes.
    expected = bytearray(image[0x1F1:0x26C])
    for offset, fmt, value in [(0x1FA, "H", 0xFFFF), (0x210, "B", 0xFF), (0x211, "B", 0x81),
                               (0x224, "H", 0xFE00), (0x228, "I", CMDLINE_ADDR)]:
        struct.pack_into("<" + fmt, expected, offset - 0x1F1, value)
    assert zp[0x1F1:0x26C] == expected
    assert zp[:0x1E8] == bytes(0x1E8)              # nothing else before e820_entries
    assert zp[0x210] == 0xFF                       # type_of_loader
    assert zp[0x211] == 0x81                       # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<H", zp, 0x224)[0] == 0xFE00   # heap_end_ptr
    assert struct.unpack_from("<H", zp, 0x1FA)[0] == 0xFFFF   # vid_mode
    assert u32(zp, 0x228) == CMDLINE_ADDR          # cmd_line_ptr
    assert u32(zp, 0x218) == 0 and u32(zp, 0x21C) == 0   # no initrd
    assert zp[0x1EF] == 0                          # sentinel


def test_zero_page_e820_table():
    mem = FakeMemory(RAM)
    load_bzimage(mem, make_image(), b"", None, RAM)
    zp = zero_page(mem)
    table = e820_map(RAM)
    assert zp[0x1E8] == len(table)                 # e820_entries
    for i, expected in enumerate(table):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == expected
    assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * len(table)) == (0, 0, 0)


def test_initrd_placed_high_and_page_aligned():
    mem = FakeMemory(RAM)
    initrd = b"\x07" * 10000
    load_bzimage(mem, make_image(), b"", initrd, RAM)
    zp = zero_page(mem)
    addr, size = u32(zp, 0x218), u32(zp, 0x21C)
    assert size == len(initrd)
    assert addr % PAGE == 0
    assert addr + size <= RAM and addr + size > RAM - PAGE
    assert mem.read(addr, size) == initrd
    assert u32(zp, 0xC0) == 0 and u32(zp, 0xC4) == 0   # ext_ramdisk_*


def test_initrd_below_a_mem_limit():
    mem = FakeMemory(RAM)
    initrd = b"\x07" * 10000
    load_bzimage(mem, make_image(), b"mem=32M", initrd, RAM, initrd_ram=32 * MiB)
    addr = u32(zero_page(mem), 0x218)
    assert 32 * MiB - PAGE < addr + len(initrd) <= 32 * MiB
    assert mem.read(addr, len(initrd)) == initrd


def test_initrd_respects_initrd_addr_max():
    bz = parse_bzimage(make_image(initrd_addr_max=0x01FFFFFF))
    addr = place_initrd(bz, 5000, RAM)
    assert addr + 5000 <= 0x02000000
    assert addr == (0x02000000 - 5000) // PAGE * PAGE


def test_initrd_stays_below_the_mmio_hole():
    bz = parse_bzimage(make_image(initrd_addr_max=0xFFFFFFFF))
    addr = place_initrd(bz, 1 * MiB, 8 * GiB)
    assert addr + 1 * MiB <= 3 * GiB
    assert addr == 3 * GiB - 1 * MiB


def test_initrd_stays_above_the_kernel():
    bz = parse_bzimage(make_image(pref_address=0x1000000, init_size=0x2000000))
    with pytest.raises(BootConfigError, match="initrd"):
        place_initrd(bz, RAM - 0x3000000 + PAGE, RAM)
    addr = place_initrd(bz, RAM - 0x3000000, RAM)
    assert addr == 0x3000000 == bz.end


def test_initrd_too_big_is_a_config_error():
    with pytest.raises(BootConfigError, match="initrd") as info:
        load_bzimage(FakeMemory(RAM), make_image(), b"", b"x" * RAM, RAM)
    assert isinstance(info.value, KernelFormatError)   # what the CLI catches


def test_kernel_larger_than_ram():
    with pytest.raises(BootConfigError, match="more --memory"):
        load_bzimage(FakeMemory(16 * MiB), make_image(init_size=0x1000000), b"", None, 16 * MiB)


def test_cmdline_limits():
    mem = FakeMemory(RAM)
    image = make_image(cmdline_size=10)
    load_bzimage(mem, image, b"x" * 10, None, RAM)
    assert mem.read(CMDLINE_ADDR, 11) == b"x" * 10 + b"\0"
    with pytest.raises(BootConfigError, match="command line"):
        load_bzimage(mem, image, b"x" * 11, None, RAM)
    with pytest.raises(BootConfigError, match="command line"):
        load_bzimage(mem, make_image(cmdline_size=0xFFFFFFFF), b"x" * 4096, None, RAM)
    with pytest.raises(BootConfigError, match="NUL"):
        load_bzimage(mem, image, b"a\0b", None, RAM)


def test_nothing_written_when_something_does_not_fit():
    mem = FakeMemory(RAM)
    with pytest.raises(BootConfigError):
        load_bzimage(mem, make_image(), b"", b"x" * RAM, RAM)
    assert mem.pages == {}


def test_short_header_reads_newer_fields_as_zero():
    # A 2.12 header ends at 0x268: kernel_info_offset must not come from
    # the setup code that follows it.
    image = bytearray(make_image(jump=0xEB | (0x66 << 8), version=0x020C))
    image[0x268:0x26C] = b"\xde\xad\xbe\xef"
    bz = parse_bzimage(bytes(image))
    assert bz.header.kernel_info_offset == 0


# --- hostile images -------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_kernel_format_error(data):
    with pytest.raises(KernelFormatError):
        parse_bzimage(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(make_image()) - 1))
def test_truncations_only_raise_kernel_format_error(length):
    with pytest.raises(KernelFormatError):
        parse_bzimage(make_image()[:length])


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.integers(0x1F1, 0x26B), st.integers(0, 255), max_size=12),
    st.integers(0, 8192),
    st.binary(max_size=3 * PAGE),
)
def test_mutated_headers_never_escape_ram(patches, kernel_size, initrd):
    image = bytearray(make_image(kernel_size=kernel_size))
    for offset, value in patches.items():
        image[offset] = value
    mem = FakeMemory(RAM)
    try:
        entry = load_bzimage(mem, bytes(image), b"console=ttyS0", initrd, RAM)
    except KernelFormatError:
        return
    assert entry.rip == 0x100200
    zp = zero_page(mem)
    if initrd:
        bz = parse_bzimage(bytes(image))
        assert u32(zp, 0x218) >= bz.end


@settings(max_examples=200, deadline=None)
@given(
    pref_address=st.integers(0, 2**64 - 1),
    init_size=st.integers(0, 2**32 - 1),
    kernel_alignment=st.sampled_from([0, 1, 0x1000, 0x200000, 0x1000000, 1 << 31, 0x300000]),
    relocatable_kernel=st.integers(0, 1),
    initrd_addr_max=st.integers(0, 2**32 - 1),
    setup_sects=st.integers(0, 255),
)
def test_hostile_header_values(**fields):
    mem = FakeMemory(RAM)
    try:
        load_bzimage(mem, make_image(**fields), b"", b"initrd", RAM)
    except KernelFormatError:
        pass


# --- a real kernel, when the host has one ---------------------------------

def _real_bzimages() -> list[str]:
    candidates = [os.environ.get("PYVMM_TEST_BZIMAGE", "")]
    candidates += glob.glob("/boot/vmlinuz-*")
    candidates += glob.glob(os.path.join(os.path.dirname(__file__), "..", "guest", "build", "bzImage*"))
    return [p for p in candidates if p and os.path.isfile(p) and os.access(p, os.R_OK)]


@pytest.mark.skipif(not _real_bzimages(), reason="no readable bzImage on this host "
                    "(/boot/vmlinuz-*, guest/build/bzImage or $PYVMM_TEST_BZIMAGE)")
def test_real_bzimage_parses_and_loads():
    path = _real_bzimages()[0]
    with open(path, "rb") as f:
        image = f.read()
    bz = parse_bzimage(image)
    assert bz.header.relocatable_kernel or bz.runtime_start >= 0x100000
    ram = 512 * MiB
    mem = FakeMemory(ram)
    load_bzimage(mem, image, b"console=ttyS0", b"\0" * 512, ram)
    assert u32(zero_page(mem), 0x228) == CMDLINE_ADDR
