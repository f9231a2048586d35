"""pyvmm.virtiofsd.fuse_abi against the kernel's own <linux/fuse.h>.

A tiny C program, generated here and compiled with gcc against <linux/fuse.h>,
prints the size of every structure fuse_abi mirrors, the offset and size of
every field, and the value of every constant fuse_abi takes from the header;
the tests compare them one by one.  Without gcc or the header those tests FAIL
(the image is supposed to have both: gcc and linux-libc-dev).  Hard-coded
values from docs/vhost-user-dax.md (4.4, 5.2-5.4) are checked too, without any tool.
"""

from __future__ import annotations

import ctypes

import pytest

import cheader

from pyvmm.virtiofsd import fuse_abi as abi

FUSE_H = "/usr/include/linux/fuse.h"

C_STRUCTS = sorted(n for n, v in vars(abi).items()
                   if isinstance(v, type) and issubclass(v, ctypes.Structure)
                   and n.startswith("fuse_"))
# Constants that are ours, not the header's (the header has its own, different, value
# or no such name at all).
NOT_FROM_HEADER = {"SUPPORTED_MINOR_VERSION", "OPCODE_NAMES"}
CONSTANTS = sorted(n for n, v in vars(abi).items()
                   if n.isupper() and isinstance(v, int) and n not in NOT_FROM_HEADER
                   and n.startswith(("FUSE_", "FATTR_", "FOPEN_")))


def _fields(cls, prefix: str = "", base: int = 0):
    """(field path, offset from the outer struct, size) of every field, recursively."""
    for name, ftype, *_ in cls._fields_:
        f = getattr(cls, name)
        path = prefix + name
        yield path, base + f.offset, f.size
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            yield from _fields(ftype, path + ".", base + f.offset)


FIELD_CASES = [(s, path, offset, size) for s in C_STRUCTS
               for path, offset, size in _fields(getattr(abi, s))]
ALIGN_CASES = [0, 1, 7, 8, 9, 24, 25, 255, 279]


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             "#ifndef PAGE_SIZE", "#define PAGE_SIZE 4096", "#endif",
             "#include <linux/fuse.h>", "int main(void) {"]
    for s in C_STRUCTS:
        lines.append(f'  printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
    for s, path, _, _ in FIELD_CASES:
        lines.append(f'  printf("offsetof {s} {path} %zu\\n", offsetof(struct {s}, {path}));')
        lines.append(f'  printf("fieldsize {s} {path} %zu\\n", sizeof(((struct {s} *)0)->{path}));')
    for name in CONSTANTS:   # no #ifdef: opcodes are enum members, and a missing name must fail
        lines.append(f'  printf("const {name} %llu\\n", (unsigned long long)({name}));')
    for x in ALIGN_CASES:
        lines.append(f'  printf("align {x} %llu\\n", (unsigned long long)FUSE_REC_ALIGN({x}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> dict[str, int]:
    """What the C compiler says about <linux/fuse.h>: {"sizeof fuse_attr": 88, ...}."""
    return cheader.probe(tmp_path_factory.mktemp("fuse_h"), FUSE_H, _c_program())


@pytest.mark.parametrize("name", C_STRUCTS)
def test_struct_size_matches_header(header, name):
    assert ctypes.sizeof(getattr(abi, name)) == header[f"sizeof {name}"]


@pytest.mark.parametrize("struct_name, path, offset, size", FIELD_CASES,
                         ids=[f"{s}.{p}" for s, p, *_ in FIELD_CASES])
def test_field_matches_header(header, struct_name, path, offset, size):
    assert offset == header[f"offsetof {struct_name} {path}"], f"offsetof({struct_name}, {path})"
    assert size == header[f"fieldsize {struct_name} {path}"], f"sizeof({struct_name}.{path})"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_header(header, name):
    value = header[f"const {name}"]
    if value >= 1 << 63:
        # "(1 << 31)" is a negative int in C (FUSE_INIT_RESERVED); as a bit of the u32
        # flags word it is 0x80000000
        value &= 0xFFFFFFFF
    assert getattr(abi, name) == value, f"{name} = {getattr(abi, name):#x}, fuse.h {value:#x}"


@pytest.mark.parametrize("x", ALIGN_CASES)
def test_rec_align_matches_header(header, x):
    assert abi.FUSE_REC_ALIGN(x) == abi.FUSE_DIRENT_ALIGN(x) == header[f"align {x}"]


def test_header_checks_cover_what_the_server_uses(header):
    wanted = {"fuse_in_header", "fuse_out_header", "fuse_init_in", "fuse_init_out", "fuse_attr",
              "fuse_entry_out", "fuse_attr_out", "fuse_getattr_in", "fuse_setattr_in",
              "fuse_open_in", "fuse_open_out", "fuse_create_in", "fuse_read_in",
              "fuse_write_in", "fuse_write_out", "fuse_release_in", "fuse_flush_in",
              "fuse_fsync_in", "fuse_mknod_in", "fuse_mkdir_in", "fuse_rename_in",
              "fuse_rename2_in", "fuse_link_in", "fuse_setxattr_in", "fuse_getxattr_in",
              "fuse_getxattr_out", "fuse_access_in", "fuse_kstatfs", "fuse_statfs_out",
              "fuse_forget_in", "fuse_batch_forget_in", "fuse_forget_one",
              "fuse_fallocate_in", "fuse_lseek_in", "fuse_lseek_out",
              "fuse_copy_file_range_in", "fuse_setupmapping_in", "fuse_removemapping_in",
              "fuse_removemapping_one", "fuse_dirent", "fuse_direntplus", "fuse_syncfs_in"}
    assert wanted <= set(C_STRUCTS)
    assert {"FUSE_SETUPMAPPING", "FUSE_REMOVEMAPPING", "FUSE_MAP_ALIGNMENT",
            "FUSE_REMOVEMAPPING_MAX_ENTRY", "FATTR_KILL_SUIDGID", "FOPEN_KEEP_CACHE",
            "FUSE_NAME_OFFSET_DIRENTPLUS", "FUSE_HAS_INODE_DAX"} <= set(CONSTANTS)
    assert len(FIELD_CASES) >= 250
    assert header["sizeof fuse_removemapping_in"] == 4
    assert header["const FUSE_REMOVEMAPPING_MAX_ENTRY"] == 256


# --- docs/vhost-user-dax.md's numbers, no compiler needed ----------------------------------------
def test_sizes_from_the_protocol_reference():
    sizes = {abi.fuse_in_header: 40, abi.fuse_out_header: 16, abi.fuse_init_in: 64,
             abi.fuse_init_out: 64, abi.fuse_attr: 88, abi.fuse_entry_out: 128,
             abi.fuse_attr_out: 104, abi.fuse_setattr_in: 88, abi.fuse_read_in: 40,
             abi.fuse_write_in: 40, abi.fuse_kstatfs: 80, abi.fuse_setupmapping_in: 40,
             abi.fuse_removemapping_in: 4, abi.fuse_removemapping_one: 16,
             abi.fuse_copy_file_range_in: 56, abi.fuse_direntplus: 152, abi.fuse_dirent: 24,
             abi.fuse_fallocate_in: 32, abi.fuse_lseek_in: 24, abi.fuse_release_in: 24}
    assert {t: ctypes.sizeof(t) for t in sizes} == sizes
    assert abi.fuse_init_out.max_pages.offset == 28
    assert abi.fuse_init_out.map_alignment.offset == 30
    assert abi.fuse_init_out.flags2.offset == 32
    assert abi.fuse_setupmapping_in.moffset.offset == 32
    assert abi.FUSE_SETUPMAPPING_FLAG_WRITE == 1 and abi.FUSE_SETUPMAPPING_FLAG_READ == 2
    assert (abi.FUSE_SETUPMAPPING, abi.FUSE_REMOVEMAPPING, abi.FUSE_SYNCFS) == (48, 49, 50)


def test_structures_are_little_endian():
    raw = bytes(abi.fuse_out_header(len=16, error=-2, unique=0x0102030405060708))
    assert raw == b"\x10\0\0\0" + b"\xfe\xff\xff\xff" + bytes(range(8, 0, -1))
    assert all(issubclass(getattr(abi, s), ctypes.LittleEndianStructure) for s in C_STRUCTS)


def test_opcode_names():
    assert abi.OPCODE_NAMES[abi.FUSE_SETUPMAPPING] == "FUSE_SETUPMAPPING"
    assert abi.OPCODE_NAMES[1] == "FUSE_LOOKUP"
    assert len(abi.OPCODE_NAMES) == 49   # 1..51 without 7 and 19
