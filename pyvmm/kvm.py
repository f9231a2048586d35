"""A thin ctypes mirror of linux/kvm.h (x86-64).

Struct, field, ioctl and capability names are the kernel's, so that a reader
can grep Documentation/virt/kvm/api.rst for any of them.  Every structure has
its size checked against the kernel ABI at import time.

Three objects wrap the three kinds of KVM file descriptors:
``Kvm`` (/dev/kvm, system ioctls), ``Vm`` (a VM fd) and ``Vcpu`` (a vCPU fd
with its mmap'ed ``kvm_run``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64, sizeof

KVM_API_VERSION = 12
KVMIO = 0xAE

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOR(nr: int, struct: type | int) -> int:
    return _IOC(_IOC_READ, nr, struct if isinstance(struct, int) else sizeof(struct))


def _IOW(nr: int, struct: type | int) -> int:
    return _IOC(_IOC_WRITE, nr, struct if isinstance(struct, int) else sizeof(struct))


def _IOWR(nr: int, struct: type | int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, struct if isinstance(struct, int) else sizeof(struct))


def _check_size(struct: type, size: int) -> None:
    if sizeof(struct) != size:
        raise AssertionError(f"{struct.__name__} is {sizeof(struct)} bytes, kvm.h says {size}")


# --- structures (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) -----------
class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
                ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
                ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
                ("unusable", c_uint8), ("padding", c_uint8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
                ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
                ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(ctypes.Structure):
    _fields_ = [("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16),
                ("ftwx", c_uint8), ("pad1", c_uint8), ("last_opcode", c_uint16),
                ("last_ip", c_uint64), ("last_dp", c_uint64),
                ("xmm", (c_uint8 * 16) * 16), ("mxcsr", c_uint32), ("pad2", c_uint32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow it (see ``variable_buffer``)."""
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
                ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
                ("padding", c_uint32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic, as spelled in kvm.h


class kvm_cpuid2(ctypes.Structure):
    """Header only; the entries follow it (see ``variable_buffer``)."""
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]  # char regs[] in kvm.h


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]  # irq is a union with status


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32),
                ("resamplefd", c_uint32), ("pad", c_uint8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32),
                ("fd", c_int32), ("flags", c_uint32), ("pad", c_uint8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("devid", c_uint32)]


class _kvm_irq_routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("gsi", c_uint32), ("type", c_uint32), ("flags", c_uint32),
                ("pad", c_uint32), ("u", _kvm_irq_routing_u)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irq_routing(ctypes.Structure):
    """Header only; the entries follow it (see ``variable_buffer``)."""
    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


class kvm_msi(ctypes.Structure):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("flags", c_uint32), ("devid", c_uint32), ("pad", c_uint8 * 12)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", c_uint8 * 64)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1


class _kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8),
                ("pending", c_uint8), ("error_code", c_uint32)]


class _kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("exception", _kvm_vcpu_events_exception),
                ("interrupt", _kvm_vcpu_events_interrupt),
                ("nmi", _kvm_vcpu_events_nmi),
                ("sipi_vector", c_uint32), ("flags", c_uint32),
                ("smi", _kvm_vcpu_events_smi),
                ("triple_fault_pending", c_uint8), ("reserved", c_uint8 * 26),
                ("exception_has_payload", c_uint8), ("exception_payload", c_uint64)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

# api.rst 4.38/4.39 KVM_GET/SET_MP_STATE
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


# api.rst 4.42/4.43 KVM_GET/SET_XSAVE, 4.134 KVM_GET_XSAVE2: the XSAVE area in the
# standard (non-compacted) format; ``extra`` is a flexible array member in kvm.h,
# so a larger area (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes) is a plain byte buffer.
class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", c_uint32 * 1024)]


XSAVE_LEGACY_SIZE = 4096  # sizeof(struct kvm_xsave), the least KVM_CAP_XSAVE2 reports


# api.rst 4.44/4.45 KVM_GET/SET_XCRS
KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", c_uint64 * 16)]


# api.rst 4.33/4.34 KVM_GET/SET_DEBUGREGS
class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


# api.rst 4.87 KVM_SET_GUEST_DEBUG (asm/kvm.h struct kvm_guest_debug_arch: DR0-DR7)
class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


# api.rst 4.15 KVM_TRANSLATE: a guest-virtual address through the vCPU's page tables
class kvm_translation(ctypes.Structure):
    _fields_ = [("linear_address", c_uint64), ("physical_address", c_uint64),
                ("valid", c_uint8), ("writeable", c_uint8), ("usermode", c_uint8),
                ("pad", c_uint8 * 5)]


# api.rst 4.26/4.27 KVM_GET/SET_IRQCHIP (asm/kvm.h)
class kvm_pic_state(ctypes.Structure):
    _fields_ = [(n, c_uint8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24


class _kvm_ioapic_redirtbl(ctypes.Union):
    """One redirection table entry; kvm.h also names its bit fields (``fields``),
    which ctypes cannot give C's exact layout for, so only ``bits`` is mirrored."""
    _fields_ = [("bits", c_uint64)]


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [("base_address", c_uint64), ("ioregsel", c_uint32), ("id", c_uint32),
                ("irr", c_uint32), ("pad", c_uint32),
                ("redirtbl", _kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS)]


class _kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _kvm_irqchip_chip)]


KVM_NR_IRQCHIPS = 3


# api.rst 4.72/4.73 KVM_GET/SET_PIT2
class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [("count", c_uint32), ("latched_count", c_uint16), ("count_latched", c_uint8),
                ("status_latched", c_uint8), ("status", c_uint8), ("read_state", c_uint8),
                ("write_state", c_uint8), ("write_latch", c_uint8), ("rw_mode", c_uint8),
                ("mode", c_uint8), ("bcd", c_uint8), ("gate", c_uint8),
                ("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32),
                ("reserved", c_uint32 * 9)]


KVM_PIT_FLAGS_HPET_LEGACY = 0x1
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x2


# api.rst 4.29/4.30 KVM_GET/SET_CLOCK
class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


# kvm_run and the parts of its exit union we use -------------------------
class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16),
                ("count", c_uint32), ("data_offset", c_uint64)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class kvm_debug_exit_arch(ctypes.Structure):
    """KVM_EXIT_DEBUG (api.rst 5 "The kvm_run structure"; asm/kvm.h): the exception vector
    (1 #DB, 3 #BP), the guest RIP and, for #DB, DR6/DR7."""
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64),
                ("dr6", c_uint64), ("dr7", c_uint64)]


class kvm_run_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_emulation_failure(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("flags", c_uint64),
                ("insn_size", c_uint8), ("insn_bytes", c_uint8 * 15)]


KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("hw", c_uint64), ("io", kvm_run_io), ("mmio", kvm_run_mmio),
                ("fail_entry", kvm_run_fail_entry), ("debug", kvm_run_debug),
                ("internal", kvm_run_internal),
                ("emulation_failure", kvm_run_emulation_failure),
                ("system_event", kvm_run_system_event), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    _fields_ = [("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8),
                ("padding1", c_uint8 * 6), ("exit_reason", c_uint32),
                ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
                ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64),
                ("exit", _kvm_run_exit),
                ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64),
                ("s", ctypes.c_char * 2048)]


# Exit reasons (kvm.h KVM_EXIT_*)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
EXIT_REASON_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_EXIT_")
                     and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}

for _s, _n in ((kvm_userspace_memory_region, 32), (kvm_regs, 144), (kvm_segment, 24),
               (kvm_dtable, 16), (kvm_sregs, 312), (kvm_fpu, 416), (kvm_msr_entry, 16),
               (kvm_msrs, 8), (kvm_cpuid_entry2, 40), (kvm_cpuid2, 8),
               (kvm_lapic_state, 1024), (kvm_pit_config, 64), (kvm_irq_level, 8),
               (kvm_irqfd, 32), (kvm_ioeventfd, 64), (kvm_irq_routing_entry, 48),
               (kvm_irq_routing, 8), (kvm_msi, 32), (kvm_enable_cap, 104),
               (kvm_vcpu_events, 64), (kvm_xsave, 4096), (kvm_xcr, 16), (kvm_xcrs, 392),
               (kvm_debugregs, 128), (kvm_pic_state, 16), (kvm_ioapic_state, 216),
               (kvm_irqchip, 520), (kvm_pit_channel_state, 24), (kvm_pit_state2, 112),
               (kvm_clock_data, 48), (kvm_run_io, 16), (kvm_run_mmio, 24),
               (kvm_guest_debug_arch, 64), (kvm_guest_debug, 72), (kvm_translation, 24),
               (kvm_debug_exit_arch, 32),
               (kvm_run_emulation_failure, 32), (_kvm_run_exit, 256), (kvm_run, 2352)):
    _check_size(_s, _n)
assert kvm_run.exit.offset == 32 and kvm_run.s.offset == 304

# --- ioctls -----------------------------------------------------------------
# system ioctls
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, kvm_cpuid2)
# VM ioctls
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, 8)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(0x62, kvm_irqchip)      # api.rst 4.26
KVM_SET_IRQCHIP = _IOR(0x63, kvm_irqchip)       # api.rst 4.27 (sic: _IOR in kvm.h)
KVM_SET_GSI_ROUTING = _IOW(0x6A, kvm_irq_routing)
KVM_IRQFD = _IOW(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(0x7B, kvm_clock_data)      # api.rst 4.30
KVM_GET_CLOCK = _IOR(0x7C, kvm_clock_data)      # api.rst 4.29
KVM_GET_PIT2 = _IOR(0x9F, kvm_pit_state2)       # api.rst 4.72
KVM_SET_PIT2 = _IOW(0xA0, kvm_pit_state2)       # api.rst 4.73
KVM_ENABLE_CAP = _IOW(0xA3, kvm_enable_cap)
KVM_SIGNAL_MSI = _IOW(0xA5, kvm_msi)
# vCPU ioctls
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, kvm_regs)
KVM_TRANSLATE = _IOWR(0x85, kvm_translation)    # api.rst 4.15
KVM_SET_REGS = _IOW(0x82, kvm_regs)
KVM_GET_SREGS = _IOR(0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, kvm_msrs)
KVM_GET_FPU = _IOR(0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(0x91, kvm_cpuid2)        # the counterpart of api.rst 4.20's SET
KVM_GET_MP_STATE = _IOR(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(0x99, kvm_mp_state)
KVM_SET_GUEST_DEBUG = _IOW(0x9B, kvm_guest_debug)  # api.rst 4.87
KVM_GET_VCPU_EVENTS = _IOR(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(0xA1, kvm_debugregs)   # api.rst 4.33
KVM_SET_DEBUGREGS = _IOW(0xA2, kvm_debugregs)   # api.rst 4.34
KVM_SET_TSC_KHZ = _IO(0xA2)                     # api.rst 4.55 (same nr as SET_DEBUGREGS, no size)
KVM_GET_TSC_KHZ = _IO(0xA3)                     # api.rst 4.56
KVM_GET_XSAVE = _IOR(0xA4, kvm_xsave)           # api.rst 4.42
KVM_SET_XSAVE = _IOW(0xA5, kvm_xsave)           # api.rst 4.43
KVM_GET_XCRS = _IOR(0xA6, kvm_xcrs)             # api.rst 4.44
KVM_SET_XCRS = _IOW(0xA7, kvm_xcrs)             # api.rst 4.45
KVM_KVMCLOCK_CTRL = _IO(0xAD)                   # api.rst 4.70
KVM_GET_XSAVE2 = _IOR(0xCF, kvm_xsave)          # api.rst 4.134

# Capabilities (kvm.h KVM_CAP_*)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_SET_GUEST_DEBUG2 = 195   # api.rst 4.87: the KVM_GUESTDBG_* flags supported
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_XSAVE2 = 208

# What pyvmm cannot work without; checked once when the VM is created.
REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": KVM_CAP_IRQCHIP, "KVM_CAP_USER_MEMORY": KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR, "KVM_CAP_EXT_CPUID": KVM_CAP_EXT_CPUID,
    "KVM_CAP_MP_STATE": KVM_CAP_MP_STATE, "KVM_CAP_IRQ_ROUTING": KVM_CAP_IRQ_ROUTING,
    "KVM_CAP_IRQFD": KVM_CAP_IRQFD, "KVM_CAP_PIT2": KVM_CAP_PIT2,
    "KVM_CAP_IOEVENTFD": KVM_CAP_IOEVENTFD, "KVM_CAP_VCPU_EVENTS": KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_SIGNAL_MSI": KVM_CAP_SIGNAL_MSI,
    "KVM_CAP_IOEVENTFD_ANY_LENGTH": KVM_CAP_IOEVENTFD_ANY_LENGTH,
}


# --- the ioctl call ----------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
# KVM_RUN (every exit) calls its own ioctl object without argtypes: ctypes converts int, int,
# None itself, sparing argtypes' from_param objects per call (~0.25 us).  Default restype: int.
_libc_ioctl_run = _libc["ioctl"]


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed."""


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """ioctl(2) through ctypes: releases the GIL (KVM_RUN blocks), raises KvmError.

    ``arg`` is an int (passed by value), a ctypes object (passed by reference)
    or None.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.pointer(arg), ctypes.c_void_p)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return ret


def variable_buffer(header_type: type, entry_type: type, count: int) -> type:
    """A ctypes struct type: a kvm.h header followed by ``count`` entries."""
    return type(f"{header_type.__name__}_{count}", (ctypes.Structure,),
                {"_fields_": [("hdr", header_type), ("entries", entry_type * count)]})


# --- objects -------------------------------------------------------------------
class KvmUnavailable(Exception):
    """/dev/kvm is missing, not accessible, or too old: one clear sentence."""


class Kvm:
    """/dev/kvm: system ioctls."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: this host has no KVM "
                                 "(load kvm_intel/kvm_amd/kvm_pvm, or enable nested virtualisation)")
        except PermissionError:
            raise KvmUnavailable(f"{path} is not accessible to this user "
                                 "(run as root or join the 'kvm' group)")
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}")
        try:
            version = ioctl(self.fd, KVM_GET_API_VERSION)
        except KvmError as e:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device: {e.strerror}") from None
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version}, pyvmm needs {KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def require(self, caps: dict[str, int]) -> None:
        missing = [name for name, cap in caps.items() if self.check_extension(cap) <= 0]
        if missing:
            raise KvmUnavailable("this KVM lacks " + ", ".join(missing))

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        for count in (64, 128, 256, 512):
            buf = variable_buffer(kvm_cpuid2, kvm_cpuid_entry2, count)()
            buf.hdr.nent = count
            try:
                ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG:
                    continue
                raise
            return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.hdr.nent)]
        raise KvmError(errno.E2BIG, "KVM_GET_SUPPORTED_CPUID: too many entries")

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (api.rst 4.3): the MSRs KVM saves and restores for a
        vCPU (some may still fail on a given host: see pyvmm.snapshot.kvm_state)."""
        count = 64
        while True:
            buf = variable_buffer(kvm_msr_list, c_uint32, count)()
            buf.hdr.nmsrs = count
            try:
                ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as e:
                # E2BIG: KVM wrote the count it needs into nmsrs
                if e.errno != errno.E2BIG or buf.hdr.nmsrs <= count:
                    raise
                count = buf.hdr.nmsrs
                continue
            return list(buf.entries[:buf.hdr.nmsrs])

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, KVM_CREATE_VM, 0))

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """A VM file descriptor: memory slots, irqchip, PIT, irqfd/ioeventfd."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        req = kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            req.args[i] = a
        ioctl(self.fd, KVM_ENABLE_CAP, req)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """Create, move or (with memory_size 0) delete memory slot ``slot``."""
        region = kvm_userspace_memory_region(slot=slot, flags=flags,
                                             guest_phys_addr=guest_phys_addr,
                                             memory_size=memory_size,
                                             userspace_addr=userspace_addr)
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, KVM_CREATE_PIT2, kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: bool) -> None:
        ioctl(self.fd, KVM_IRQ_LINE, kvm_irq_level(irq=irq, level=int(level)))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        req = kvm_irqfd(fd=fd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        ioctl(self.fd, KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        req = kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self.fd, KVM_IOEVENTFD, req)

    def set_gsi_routing(self, entries: list[kvm_irq_routing_entry]) -> None:
        buf = variable_buffer(kvm_irq_routing, kvm_irq_routing_entry, len(entries))()
        buf.hdr.nr = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, KVM_SET_GSI_ROUTING, buf)

    def signal_msi(self, address: int, data: int) -> int:
        req = kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, KVM_SIGNAL_MSI, req)

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        """KVM_GET_IRQCHIP (api.rst 4.26) of KVM_IRQCHIP_PIC_MASTER/_SLAVE/_IOAPIC."""
        chip = kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP (api.rst 4.27); ``chip.chip_id`` says which one."""
        ioctl(self.fd, KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        state = kvm_pit_state2()
        ioctl(self.fd, KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: kvm_pit_state2) -> None:
        ioctl(self.fd, KVM_SET_PIT2, state)

    def get_clock(self) -> kvm_clock_data:
        data = kvm_clock_data()
        ioctl(self.fd, KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: kvm_clock_data) -> None:
        ioctl(self.fd, KVM_SET_CLOCK, data)

    def xsave_size(self) -> int:
        """Bytes KVM_GET_XSAVE2/KVM_SET_XSAVE transfer on this VM (api.rst 4.134):
        KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2), or 4096 where that is not supported."""
        return max(self.check_extension(KVM_CAP_XSAVE2), XSAVE_LEGACY_SIZE)

    def create_vcpu(self, index: int) -> "Vcpu":
        return Vcpu(self, index, ioctl(self.fd, KVM_CREATE_VCPU, index))

    def close(self) -> None:
        os.close(self.fd)


class Vcpu:
    """A vCPU file descriptor and its shared ``kvm_run`` page (``kvm_run``, a ctypes view).

    ``run()`` is the KVM_RUN ioctl; ``kvm_run`` is the struct it fills in (api.rst 5)."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size()
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = kvm_run.from_buffer(self._map)
        # The exit payloads the run loop reads at every exit, as views made once
        # (each ``kvm_run.exit.io`` builds two new ctypes objects) over the same mapping.
        self.exit_io = self.kvm_run.exit.io
        self.exit_mmio = self.kvm_run.exit.mmio
        self._run_bytes = memoryview(self._map)
        # kvm_run.mmio.data (8 bytes) as a memoryview: its slices are cheaper than the
        # ctypes array's, and a slice never reaches past the 8 bytes whatever mmio.len says.
        start = kvm_run.exit.offset + kvm_run_mmio.data.offset
        self.exit_mmio_data = self._run_bytes[start:start + kvm_run_mmio.data.size]

    def run(self) -> None:
        """KVM_RUN; EINTR (a kick from another thread) is returned as KVM_EXIT_INTR."""
        ret = _libc_ioctl_run(self.fd, KVM_RUN, None)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                self.kvm_run.exit_reason = KVM_EXIT_INTR
                return
            raise KvmError(err, f"KVM_RUN: {os.strerror(err)}")

    def io_data(self) -> memoryview:
        """The kvm_run bytes of a KVM_EXIT_IO (size * count bytes at data_offset), writable:
        an IN's value goes there."""
        io = self.exit_io
        return self.io_bytes(io.data_offset, io.size * io.count)

    def io_bytes(self, offset: int, length: int) -> memoryview:
        """``length`` bytes of the kvm_run mapping at ``offset``: ``io_data`` for a caller
        that has read data_offset, size and count already (the run loop, once per exit)."""
        data = self._run_bytes[offset:offset + length]
        if len(data) != length:
            raise KvmError(errno.EINVAL, "KVM_EXIT_IO data outside kvm_run")
        return data

    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        ioctl(self.fd, KVM_GET_REGS, r)
        return r

    def set_regs(self, r: kvm_regs) -> None:
        ioctl(self.fd, KVM_SET_REGS, r)

    def translate(self, linear_address: int) -> kvm_translation:
        """KVM_TRANSLATE (api.rst 4.15): a guest-virtual address through this vCPU's
        current page tables (``valid`` 0: not mapped)."""
        t = kvm_translation(linear_address=linear_address)
        ioctl(self.fd, KVM_TRANSLATE, t)
        return t

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG (api.rst 4.87): KVM_GUESTDBG_* flags and, with
        KVM_GUESTDBG_USE_HW_BP, DR0-DR3 and DR7 in ``debugreg`` (8 entries: DR0-DR7)."""
        req = kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg or []):
            req.arch.debugreg[i] = value
        ioctl(self.fd, KVM_SET_GUEST_DEBUG, req)

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        ioctl(self.fd, KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: kvm_sregs) -> None:
        ioctl(self.fd, KVM_SET_SREGS, s)

    def get_fpu(self) -> kvm_fpu:
        f = kvm_fpu()
        ioctl(self.fd, KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: kvm_fpu) -> None:
        ioctl(self.fd, KVM_SET_FPU, f)

    def set_cpuid2(self, entries: list[kvm_cpuid_entry2]) -> None:
        buf = variable_buffer(kvm_cpuid2, kvm_cpuid_entry2, len(entries))()
        buf.hdr.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, KVM_SET_CPUID2, buf)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        buf = variable_buffer(kvm_msrs, kvm_msr_entry, len(msrs))()
        buf.hdr.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return ioctl(self.fd, KVM_SET_MSRS, buf)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = variable_buffer(kvm_msrs, kvm_msr_entry, len(indices))()
        buf.hdr.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = ioctl(self.fd, KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def get_lapic(self) -> kvm_lapic_state:
        s = kvm_lapic_state()
        ioctl(self.fd, KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, s: kvm_lapic_state) -> None:
        ioctl(self.fd, KVM_SET_LAPIC, s)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        e = kvm_vcpu_events()
        ioctl(self.fd, KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, e: kvm_vcpu_events) -> None:
        ioctl(self.fd, KVM_SET_VCPU_EVENTS, e)

    def get_mp_state(self) -> int:
        s = kvm_mp_state()
        ioctl(self.fd, KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, KVM_SET_MP_STATE, kvm_mp_state(mp_state=mp_state))

    def get_cpuid2(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        """KVM_GET_CPUID2: the CPUID entries this vCPU was given with KVM_SET_CPUID2."""
        buf = variable_buffer(kvm_cpuid2, kvm_cpuid_entry2, max_entries)()
        buf.hdr.nent = max_entries
        ioctl(self.fd, KVM_GET_CPUID2, buf)
        return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.hdr.nent)]

    def get_xsave(self) -> kvm_xsave:
        """KVM_GET_XSAVE (api.rst 4.42): the first 4096 bytes of the XSAVE area."""
        x = kvm_xsave()
        ioctl(self.fd, KVM_GET_XSAVE, x)
        return x

    def get_xsave2(self, size: int) -> bytes:
        """KVM_GET_XSAVE2 (api.rst 4.134): ``size`` = ``Vm.xsave_size()`` bytes."""
        buf = (c_uint8 * size)()
        ioctl(self.fd, KVM_GET_XSAVE2, buf)
        return bytes(buf)

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE (api.rst 4.43).  KVM reads as many bytes as
        KVM_CAP_XSAVE2 reports (at least 4096): a shorter area is zero-padded."""
        size = max(len(area), self.vm.xsave_size())
        buf = (c_uint8 * size).from_buffer_copy(area.ljust(size, b"\0"))
        ioctl(self.fd, KVM_SET_XSAVE, buf)

    def get_xcrs(self) -> kvm_xcrs:
        x = kvm_xcrs()
        ioctl(self.fd, KVM_GET_XCRS, x)
        return x

    def set_xcrs(self, x: kvm_xcrs) -> None:
        ioctl(self.fd, KVM_SET_XCRS, x)

    def get_debugregs(self) -> kvm_debugregs:
        d = kvm_debugregs()
        ioctl(self.fd, KVM_GET_DEBUGREGS, d)
        return d

    def set_debugregs(self, d: kvm_debugregs) -> None:
        ioctl(self.fd, KVM_SET_DEBUGREGS, d)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ (api.rst 4.56): the guest TSC frequency (the ioctl's return value)."""
        return ioctl(self.fd, KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (api.rst 4.55): the argument is the value itself."""
        ioctl(self.fd, KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL (api.rst 4.70): tell the guest (pvclock flag) that the host
        paused this vCPU; EINVAL when the guest has not enabled kvmclock."""
        ioctl(self.fd, KVM_KVMCLOCK_CTRL)

    def close(self) -> None:
        del self.exit_io, self.exit_mmio, self.kvm_run
        self.exit_mmio_data.release()
        self._run_bytes.release()
        self._map.close()
        os.close(self.fd)
