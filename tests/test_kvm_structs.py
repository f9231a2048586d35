"""pyvmm.kvm against the kernel's own linux/kvm.h.

Two independent checks:
1. hard-coded encoded ioctl numbers (and _IOC computed by hand), no tools needed;
2. a tiny C program, generated here and compiled with gcc against
   <linux/kvm.h>, prints every KVM_* constant pyvmm defines and the size and
   offset of every field of every structure pyvmm mirrors; the tests compare
   them one by one.  Without gcc or the header those tests FAIL (the image is
   supposed to have both: gcc and linux-libc-dev).
No /dev/kvm needed.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import cheader

from pyvmm import kvm

KVM_H = "/usr/include/linux/kvm.h"

# --- 1. known encodings -----------------------------------------------------------------
KNOWN_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    # snapshot/restore state (pyvmm.snapshot.kvm_state)
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_SET_TSC_KHZ": 0xAEA2,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_KVMCLOCK_CTRL": 0xAEAD,
    "KVM_GET_XSAVE2": 0x9000AECF,
    # the GDB stub (pyvmm.gdbstub)
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
}


@pytest.mark.parametrize("name, value", sorted(KNOWN_IOCTLS.items()))
def test_known_ioctl_number(name, value):
    assert getattr(kvm, name) == value, f"{name} = {getattr(kvm, name):#x}, kvm.h says {value:#x}"


def _ioc_by_hand(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: nr bits 0-7, type bits 8-15, size bits 16-29, dir bits 30-31
    assert 0 <= nr < 256 and 0 <= size < (1 << 14) and 0 <= direction < 4
    return (direction << 30) | (size << 16) | (0xAE << 8) | nr


@pytest.mark.parametrize("name, direction, nr, size", [
    ("KVM_RUN", 0, 0x80, 0),
    ("KVM_CREATE_VM", 0, 0x01, 0),
    ("KVM_SET_USER_MEMORY_REGION", 1, 0x46, 32),
    ("KVM_GET_REGS", 2, 0x81, 144),
    ("KVM_GET_SUPPORTED_CPUID", 3, 0x05, 8),
    ("KVM_SET_CPUID2", 1, 0x90, 8),
    ("KVM_IRQFD", 1, 0x76, 32),
    ("KVM_IOEVENTFD", 1, 0x79, 64),
    ("KVM_SET_GSI_ROUTING", 1, 0x6A, 8),
    ("KVM_GET_VCPU_EVENTS", 2, 0x9F, 64),
    ("KVM_SET_VCPU_EVENTS", 1, 0xA0, 64),
    ("KVM_ENABLE_CAP", 1, 0xA3, 104),
    ("KVM_GET_SREGS", 2, 0x83, 312),
    ("KVM_GET_XSAVE", 2, 0xA4, 4096),
    ("KVM_SET_XSAVE", 1, 0xA5, 4096),
    ("KVM_GET_XSAVE2", 2, 0xCF, 4096),
    ("KVM_GET_XCRS", 2, 0xA6, 392),
    ("KVM_GET_DEBUGREGS", 2, 0xA1, 128),
    ("KVM_GET_IRQCHIP", 3, 0x62, 520),
    ("KVM_SET_IRQCHIP", 2, 0x63, 520),      # _IOR in kvm.h although it writes
    ("KVM_GET_PIT2", 2, 0x9F, 112),
    ("KVM_SET_CLOCK", 1, 0x7B, 48),
    ("KVM_SET_TSC_KHZ", 0, 0xA2, 0),
    ("KVM_KVMCLOCK_CTRL", 0, 0xAD, 0),
    ("KVM_TRANSLATE", 3, 0x85, 24),
    ("KVM_SET_GUEST_DEBUG", 1, 0x9B, 72),
])
def test_ioctl_number_computed_by_hand(name, direction, nr, size):
    assert getattr(kvm, name) == _ioc_by_hand(direction, nr, size) == KNOWN_IOCTLS[name]


def test_known_struct_sizes_and_offsets():
    sizes = {kvm.kvm_run: 2352, kvm.kvm_regs: 144, kvm.kvm_sregs: 312, kvm.kvm_segment: 24,
             kvm.kvm_fpu: 416, kvm.kvm_vcpu_events: 64, kvm.kvm_cpuid_entry2: 40,
             kvm.kvm_userspace_memory_region: 32, kvm.kvm_ioeventfd: 64, kvm.kvm_irqfd: 32,
             kvm.kvm_irq_routing_entry: 48, kvm.kvm_enable_cap: 104, kvm.kvm_lapic_state: 1024,
             kvm.kvm_xsave: 4096, kvm.kvm_xcr: 16, kvm.kvm_xcrs: 392, kvm.kvm_debugregs: 128,
             kvm.kvm_pic_state: 16, kvm.kvm_ioapic_state: 216, kvm.kvm_irqchip: 520,
             kvm.kvm_pit_channel_state: 24, kvm.kvm_pit_state2: 112, kvm.kvm_clock_data: 48}
    assert {t: ctypes.sizeof(t) for t in sizes} == sizes
    assert kvm.kvm_run.exit_reason.offset == 8
    assert kvm.kvm_run.exit.offset == 32
    assert kvm.kvm_run.exit.offset + kvm.kvm_run_io.data_offset.offset == 40
    assert kvm.kvm_run.s.offset == 304
    assert kvm.kvm_sregs.efer.offset == 264
    assert kvm.kvm_sregs.interrupt_bitmap.offset == 280
    assert kvm.kvm_vcpu_events.exception_has_payload.offset == 55
    assert kvm.kvm_vcpu_events.exception_payload.offset == 56
    assert kvm.kvm_vcpu_events.sipi_vector.offset == 16
    assert kvm.kvm_vcpu_events.flags.offset == 20
    assert kvm.kvm_xcrs.xcrs.offset == 8 and kvm.kvm_xcrs.padding.offset == 264
    assert kvm.kvm_debugregs.dr7.offset == 40 and kvm.kvm_debugregs.flags.offset == 48
    assert kvm.kvm_irqchip.chip.offset == 8
    assert kvm.kvm_ioapic_state.redirtbl.offset == 24
    assert kvm.kvm_pit_channel_state.count_load_time.offset == 16
    assert kvm.kvm_pit_state2.flags.offset == 72
    assert kvm.kvm_clock_data.realtime.offset == 16 and kvm.kvm_clock_data.host_tsc.offset == 24


# --- 2. against the C header -----------------------------------------------------------
# pyvmm class -> the C struct it mirrors
C_STRUCTS = [
    "kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs",
    "kvm_fpu", "kvm_msr_entry", "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2",
    "kvm_lapic_state", "kvm_pit_config", "kvm_irq_level", "kvm_irqfd", "kvm_ioeventfd",
    "kvm_irq_routing_irqchip", "kvm_irq_routing_msi", "kvm_irq_routing_entry",
    "kvm_irq_routing", "kvm_msi", "kvm_enable_cap", "kvm_mp_state", "kvm_vcpu_events",
    "kvm_run",
    "kvm_xsave", "kvm_xcr", "kvm_xcrs", "kvm_debugregs", "kvm_pic_state", "kvm_ioapic_state",
    "kvm_irqchip", "kvm_pit_channel_state", "kvm_pit_state2", "kvm_clock_data",
    "kvm_guest_debug", "kvm_guest_debug_arch", "kvm_translation", "kvm_debug_exit_arch",
]
# pyvmm field path -> C member designator, where they differ (None: skip the node itself
# but compare its members, which C reaches through an anonymous union)
C_NAMES = {
    ("kvm_run", "exit"): None,
    ("kvm_vcpu_events", "triple_fault_pending"): "triple_fault.pending",
}


def _shadowed(cls) -> set[str]:
    """Fields hidden by a member of an ``_anonymous_`` field with the same name (ctypes
    then resolves ``cls.name`` to the inner member): kvm_irq_routing_entry.pad vs u.pad."""
    fields = dict((n, t) for n, t, *_ in cls._fields_)
    inner = {n for a in getattr(cls, "_anonymous_", ()) for n, *_ in fields[a]._fields_}
    return inner & (set(fields) - set(getattr(cls, "_anonymous_", ())))


def _fields(cls, prefix: str = "", base: int = 0):
    """(python path, offset from the outer struct, size) of every field, recursively."""
    hidden = _shadowed(cls)
    for name, ftype, *_ in cls._fields_:
        if name in hidden:
            continue
        f = getattr(cls, name)
        path = prefix + name
        yield path, base + f.offset, f.size
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield from _fields(ftype, path + ".", base + f.offset)


def _c_path(struct_name: str, path: str) -> str | None:
    parts = path.split(".")
    out = []
    for i in range(len(parts)):
        key = (struct_name, ".".join(parts[:i + 1]))
        if key in C_NAMES:
            mapped = C_NAMES[key]
            if mapped is None:
                if i == len(parts) - 1:
                    return None
                continue
            out = mapped.split(".")
        else:
            out.append(parts[i])
    return ".".join(out)


def _field_cases():
    for struct_name in C_STRUCTS:
        for path, offset, size in _fields(getattr(kvm, struct_name)):
            c = _c_path(struct_name, path)
            if c is not None:
                yield struct_name, path, c, offset, size


FIELD_CASES = list(_field_cases())
CONSTANTS = sorted(n for n, v in vars(kvm).items()
                   if (n.startswith("KVM_") or n == "KVMIO") and isinstance(v, int) and n.isupper())


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for s in C_STRUCTS:
        lines.append(f'  printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
    for s, path, c, _, _ in FIELD_CASES:
        lines.append(f'  printf("offsetof {s} {path} %zu\\n", offsetof(struct {s}, {c}));')
        lines.append(f'  printf("fieldsize {s} {path} %zu\\n", sizeof(((struct {s} *)0)->{c}));')
    for name in CONSTANTS:
        lines += [f"#ifdef {name}",
                  f'  printf("const {name} %llu\\n", (unsigned long long)({name}));',
                  "#endif"]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> dict[str, int]:
    """What the C compiler says about <linux/kvm.h>: {"sizeof kvm_run": 2352, ...}."""
    return cheader.probe(tmp_path_factory.mktemp("kvm_h"), KVM_H, _c_program())


@pytest.mark.parametrize("name", C_STRUCTS)
def test_struct_size_matches_header(header, name):
    assert ctypes.sizeof(getattr(kvm, name)) == header[f"sizeof {name}"]


@pytest.mark.parametrize("struct_name, path, c_path, offset, size", FIELD_CASES,
                         ids=[f"{s}.{p}" for s, p, *_ in FIELD_CASES])
def test_field_matches_header(header, struct_name, path, c_path, offset, size):
    assert offset == header[f"offsetof {struct_name} {path}"], f"offsetof({struct_name}, {c_path})"
    assert size == header[f"fieldsize {struct_name} {path}"], f"sizeof({struct_name}.{c_path})"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_header(header, name):
    key = f"const {name}"
    if key not in header:
        pytest.skip(f"{name} is not defined in this system's {KVM_H}")
    assert getattr(kvm, name) == header[key], f"{name} = {getattr(kvm, name):#x}, kvm.h {header[key]:#x}"


def test_header_checks_cover_what_the_brief_names(header):
    # the handful the rest of pyvmm leans on hardest, spelled out
    assert header["offsetof kvm_run exit.io.data_offset"] == 40
    assert header["offsetof kvm_run exit_reason"] == 8
    assert header["offsetof kvm_sregs efer"] == 264
    assert header["offsetof kvm_vcpu_events exception_payload"] == 56
    assert header["const KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    assert header["const KVM_ENABLE_CAP"] == 0x4068AEA3
    assert header["sizeof kvm_irqchip"] == 520 and header["offsetof kvm_irqchip chip.ioapic.redirtbl"] == 32
    assert header["offsetof kvm_pit_state2 flags"] == 72
    assert header["const KVM_GET_XSAVE2"] == 0x9000AECF
    assert {"KVM_GET_XSAVE", "KVM_GET_XCRS", "KVM_GET_DEBUGREGS", "KVM_GET_IRQCHIP", "KVM_GET_PIT2",
            "KVM_GET_CLOCK", "KVM_GET_TSC_KHZ", "KVM_KVMCLOCK_CTRL", "KVM_CAP_XSAVE2",
            "KVM_MAX_XCRS", "KVM_IOAPIC_NUM_PINS", "KVM_CLOCK_TSC_STABLE"} <= set(CONSTANTS)
    assert {"KVM_RUN", "KVM_IRQFD", "KVM_SET_VCPU_EVENTS", "KVM_CAP_IRQFD",
            "KVM_EXIT_INTERNAL_ERROR"} <= set(CONSTANTS)
    assert len(FIELD_CASES) > 150


# --- exit reason names ------------------------------------------------------------------
def test_exit_reason_names():
    names = kvm.EXIT_REASON_NAMES
    assert names[0] == "KVM_EXIT_UNKNOWN"         # not KVM_EXIT_IO_IN, which is also 0
    assert names[1] == "KVM_EXIT_EXCEPTION"       # not KVM_EXIT_IO_OUT
    assert names[2] == "KVM_EXIT_IO"
    assert names[8] == "KVM_EXIT_SHUTDOWN"
    assert names[17] == "KVM_EXIT_INTERNAL_ERROR"
    assert names[24] == "KVM_EXIT_SYSTEM_EVENT"


# --- variable-length buffers --------------------------------------------------------------
@pytest.mark.parametrize("header_type, entry_type, count, entries_offset, size", [
    (kvm.kvm_cpuid2, kvm.kvm_cpuid_entry2, 3, 8, 8 + 3 * 40),
    (kvm.kvm_msrs, kvm.kvm_msr_entry, 5, 8, 8 + 5 * 16),
    (kvm.kvm_irq_routing, kvm.kvm_irq_routing_entry, 2, 8, 8 + 2 * 48),
    (kvm.kvm_cpuid2, kvm.kvm_cpuid_entry2, 0, 8, 8),
    (kvm.kvm_cpuid2, kvm.kvm_cpuid_entry2, 256, 8, 8 + 256 * 40),
    (kvm.kvm_msr_list, ctypes.c_uint32, 40, 4, 4 + 40 * 4),   # __u32 indices[0] after nmsrs
])
def test_variable_buffer_layout(header_type, entry_type, count, entries_offset, size):
    t = kvm.variable_buffer(header_type, entry_type, count)
    assert ctypes.sizeof(t) == size
    assert t.hdr.offset == 0
    assert t.entries.offset == entries_offset == ctypes.sizeof(header_type)
    assert t.__name__ == f"{header_type.__name__}_{count}"
    assert len(t().entries) == count


def test_variable_buffer_bytes():
    buf = kvm.variable_buffer(kvm.kvm_cpuid2, kvm.kvm_cpuid_entry2, 2)()
    buf.hdr.nent = 2
    buf.entries[1].function = 0x40000001
    buf.entries[1].eax = 0xAABBCCDD
    raw = bytes(buf)
    assert raw[0:4] == b"\x02\0\0\0"
    assert raw[8 + 40:8 + 44] == (0x40000001).to_bytes(4, "little")
    assert raw[8 + 40 + 12:8 + 40 + 16] == (0xAABBCCDD).to_bytes(4, "little")


# --- Kvm() and ioctl() without /dev/kvm ---------------------------------------------------
def test_kvm_missing_path(tmp_path):
    path = tmp_path / "no-kvm-here"
    with pytest.raises(kvm.KvmUnavailable) as exc:
        kvm.Kvm(str(path))
    message = str(exc.value)
    assert message.startswith(f"{path} does not exist: this host has no KVM")
    assert "kvm_intel" in message and "\n" not in message


def test_kvm_path_is_a_directory(tmp_path):
    with pytest.raises(kvm.KvmUnavailable, match=f"cannot open {tmp_path}: Is a directory"):
        kvm.Kvm(str(tmp_path))


def test_kvm_path_not_accessible(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can open a mode-000 file")
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    path.chmod(0)
    with pytest.raises(kvm.KvmUnavailable, match="not accessible to this user"):
        kvm.Kvm(str(path))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_kvm_path_that_is_not_kvm():
    before = _open_fds()
    with pytest.raises(kvm.KvmUnavailable, match="/dev/null"):
        kvm.Kvm("/dev/null")
    assert _open_fds() == before


def test_ioctl_on_a_bad_fd_raises_kvm_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(kvm.KvmError) as exc:
        kvm.ioctl(r, kvm.KVM_GET_API_VERSION)
    assert exc.value.errno == errno.EBADF
    assert "ioctl 0xae00" in str(exc.value)
    assert isinstance(exc.value, OSError)


def test_ioctl_on_a_non_kvm_fd_raises_enotty():
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(kvm.KvmError) as exc:
            kvm.ioctl(fd, kvm.KVM_GET_REGS, kvm.kvm_regs())
        assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
