"""Boot-time x86 CPU state: GDT, identity page tables, segment registers,
CPUID, MSRs, FPU and local APIC.

What a firmware would leave behind, set directly through KVM before the first
KVM_RUN.  Two entry modes:

* ``protected32`` (PVH): flat 32-bit code/data segments, paging off.
* ``long64`` (Linux boot protocol 64-bit entry): paging on with an identity
  map of the first 4 GiB, __BOOT_CS = 0x10 and __BOOT_DS = 0x18
  (Documentation/x86/boot.rst, "64-bit Boot Protocol").
"""

from __future__ import annotations

import ctypes
import logging
import struct

from .. import kvm
from . import layout

log = logging.getLogger(__name__)

# --- GDT (Intel SDM vol. 3, 3.4.5 "Segment Descriptors") ---------------------
# Selectors: the 64-bit boot protocol wants code at 0x10 and data at 0x18.
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10
SEL_DATA = 0x18
SEL_TSS = 0x20


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from 16 bits of flags (access byte + G/DB/L/AVL)."""
    return (((base & 0xFF000000) << (56 - 24)) | ((flags & 0x0000F0FF) << 40)
            | ((limit & 0x000F0000) << (48 - 16)) | ((base & 0x00FFFFFF) << 16)
            | (limit & 0x0000FFFF))


# flags: G=0x8000, DB=0x4000, L=0x2000; access: P=0x80, S=0x10, type in low nibble
BOOT_GDT = [
    0,                                   # null
    gdt_entry(0xC09B, 0, 0xFFFFF),       # 0x08 code32: G, DB, P, S, exec/read, accessed
    gdt_entry(0xA09B, 0, 0xFFFFF),       # 0x10 code64: G, L, P, S, exec/read, accessed
    gdt_entry(0xC093, 0, 0xFFFFF),       # 0x18 data: G, DB, P, S, read/write, accessed
    gdt_entry(0x008B, 0, 0x67),          # 0x20 TSS (busy): P, type 0xb
]


def segment_from_gdt(entry: int, selector: int) -> kvm.kvm_segment:
    """The hidden part of a segment register, as loading ``selector`` would fill it."""
    base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000)
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    return kvm.kvm_segment(
        base=base, limit=(limit << 12) | 0xFFF if g else limit, selector=selector,
        type=(entry >> 40) & 0xF, present=(entry >> 47) & 1, dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1, s=(entry >> 44) & 1, l=(entry >> 53) & 1, g=g,
        avl=(entry >> 52) & 1)


def write_gdt(mem) -> None:
    mem.write(layout.GDT_ADDR, b"".join(struct.pack("<Q", e) for e in BOOT_GDT))


# --- identity page tables (SDM vol. 3, 4.5 "4-Level Paging") ----------------
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7  # 2 MiB page in a PDE
IDENTITY_MAP_GIB = 4


def write_identity_page_tables(mem) -> int:
    """Map the first 4 GiB 1:1 with 2 MiB pages; returns CR3."""
    mem.write(layout.PML4_ADDR, struct.pack("<Q", layout.PDPTE_ADDR | PTE_PRESENT | PTE_WRITE))
    pdpt = b"".join(struct.pack("<Q", (layout.PDE_ADDR + i * 0x1000) | PTE_PRESENT | PTE_WRITE)
                    for i in range(IDENTITY_MAP_GIB))
    mem.write(layout.PDPTE_ADDR, pdpt)
    pd = b"".join(struct.pack("<Q", (i << 21) | PTE_PRESENT | PTE_WRITE | PTE_PS)
                  for i in range(512 * IDENTITY_MAP_GIB))
    mem.write(layout.PDE_ADDR, pd)
    return layout.PML4_ADDR


# --- control registers ----------------------------------------------------------
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


def boot_sregs(sregs: kvm.kvm_sregs, mode: str, cr3: int = 0) -> kvm.kvm_sregs:
    """Fill the segment and control registers for ``mode`` (protected32 or long64)."""
    code = segment_from_gdt(BOOT_GDT[SEL_CODE64 // 8], SEL_CODE64) if mode == "long64" \
        else segment_from_gdt(BOOT_GDT[SEL_CODE32 // 8], SEL_CODE32)
    data = segment_from_gdt(BOOT_GDT[SEL_DATA // 8], SEL_DATA)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt(BOOT_GDT[SEL_TSS // 8], SEL_TSS)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(BOOT_GDT) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE
    sregs.cr4 = 0
    sregs.efer = 0
    if mode == "long64":
        sregs.cr3 = cr3
        sregs.cr4 = X86_CR4_PAE
        sregs.cr0 |= X86_CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
    elif mode != "protected32":
        raise ValueError(f"unknown entry mode {mode}")
    return sregs


# --- CPUID (SDM vol. 2A, CPUID) -------------------------------------------------
# Features KVM may advertise that the PVM flavour's instruction emulator cannot
# run at CPL0 (docs/pvm.md "CPUID"), and what depends on them.  On hardware
# KVM hiding them costs little; on PVM the guest mostly sees the host's CPUID
# anyway, so the default command line hides them too (see pyvmm.cmdline).
CPUID_1_ECX_MONITOR = 1 << 3
CPUID_1_ECX_FMA = 1 << 12
CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_PDCM = 1 << 15
CPUID_1_ECX_POPCNT = 1 << 23
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_AVX = 1 << 28
CPUID_1_ECX_F16C = 1 << 29
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
CPUID_7_EBX_AVX2 = 1 << 5
CPUID_7_EBX_ERMS = 1 << 9
CPUID_7_EBX_INVPCID = 1 << 10
CPUID_7_EBX_AVX512 = (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31)
CPUID_7_EBX_SMAP = 1 << 20
CPUID_7_EBX_CLWB = 1 << 24
CPUID_7_ECX_AVX512 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14)
CPUID_7_ECX_PKU = 1 << 3
CPUID_7_ECX_OSPKE = 1 << 4
CPUID_7_ECX_WAITPKG = 1 << 5
CPUID_7_ECX_RDPID = 1 << 22
CPUID_7_EDX_FSRM = 1 << 4
CPUID_7_EDX_MD_CLEAR = 1 << 10
CPUID_7_EDX_ARCH_CAPABILITIES = 1 << 29
CPUID_80000001_ECX_MWAITX = 1 << 29

CPUID_FILTER = {
    # (leaf, register): bits to clear
    (1, "ecx"): (CPUID_1_ECX_MONITOR | CPUID_1_ECX_CX16 | CPUID_1_ECX_POPCNT | CPUID_1_ECX_XSAVE
                 | CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX | CPUID_1_ECX_FMA | CPUID_1_ECX_F16C
                 | CPUID_1_ECX_PDCM),
    (7, "ebx"): (CPUID_7_EBX_AVX2 | CPUID_7_EBX_ERMS | CPUID_7_EBX_INVPCID | CPUID_7_EBX_AVX512
                 | CPUID_7_EBX_SMAP | CPUID_7_EBX_CLWB),
    (7, "ecx"): (CPUID_7_ECX_AVX512 | CPUID_7_ECX_PKU | CPUID_7_ECX_OSPKE | CPUID_7_ECX_WAITPKG
                 | CPUID_7_ECX_RDPID),
    (7, "edx"): CPUID_7_EDX_FSRM | CPUID_7_EDX_MD_CLEAR | CPUID_7_EDX_ARCH_CAPABILITIES,
    (0x80000001, "ecx"): CPUID_80000001_ECX_MWAITX,
}
CPUID_DROP_LEAVES = {0xD}  # XSAVE state enumeration: meaningless without XSAVE
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
# KVM paravirtual features (Documentation/virt/kvm/x86/cpuid.rst) whose
# hypercalls wedged a 2-vCPU boot on PVM: PV spinlock unhalt/kick, PV TLB flush,
# PV send-IPI, PV sched yield.  The guest falls back to plain IPIs and spinning.
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_TLB_FLUSH = 1 << 9
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_FEATURES_HIDDEN = (KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_TLB_FLUSH | KVM_FEATURE_PV_SEND_IPI
                       | KVM_FEATURE_PV_SCHED_YIELD)


def filter_cpuid(supported: list[kvm.kvm_cpuid_entry2], vcpu_index: int,
                 num_cpus: int) -> list[kvm.kvm_cpuid_entry2]:
    """Per-vCPU CPUID: KVM's supported set, minus what the host cannot run,
    with this vCPU's APIC id and the topology of ``num_cpus`` single-thread cores."""
    out = []
    for src in supported:
        if src.function in CPUID_DROP_LEAVES:
            continue
        e = kvm.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function in (1, 7, 0x80000001) and (e.function != 7 or e.index == 0):
            for (leaf, reg), bits in CPUID_FILTER.items():
                if leaf == e.function:
                    setattr(e, reg, getattr(e, reg) & ~bits)
        if e.function == 1:
            # EBX[31:24] initial APIC id, [23:16] logical processors per package,
            # [15:8] CLFLUSH line size in 8-byte units.
            e.ebx = (vcpu_index << 24) | (num_cpus << 16) | (8 << 8) | (e.ebx & 0xFF)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.edx = (e.edx | CPUID_1_EDX_HTT) if num_cpus > 1 else (e.edx & ~CPUID_1_EDX_HTT)
        elif e.function in (0xB, 0x1F):
            # Extended topology (0x1F is its V2, preferred by Linux when present):
            # level 0 = SMT (1 thread), level 1 = core (num_cpus).
            e.edx = vcpu_index
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | 0
            elif e.index == 1:
                e.eax, e.ebx, e.ecx = (num_cpus - 1).bit_length(), num_cpus, (2 << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif e.function == KVM_CPUID_FEATURES:
            e.eax &= ~KVM_FEATURES_HIDDEN
        elif e.function == 4:
            # Deterministic cache parameters: EAX[31:26] = cores per package - 1.
            e.eax = (e.eax & 0x03FFFFFF) | ((num_cpus - 1) << 26)
        out.append(e)
    return out


# --- MSRs (SDM vol. 4) ----------------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRRdefType = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_DEF_TYPE_E = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
    MSR_MTRRdefType: MTRR_DEF_TYPE_E | MTRR_TYPE_WRBACK,
}

# --- local APIC (SDM vol. 3, 10.5.1 "Local Vector Table") -----------------------
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def set_lint(lapic: kvm.kvm_lapic_state) -> kvm.kvm_lapic_state:
    """LINT0 = ExtINT (the 8259 PIC), LINT1 = NMI, as a PC firmware leaves them."""
    raw = bytearray(lapic.regs)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", raw, reg)[0]
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", raw, reg, value)
    ctypes.memmove(ctypes.addressof(lapic.regs), bytes(raw), len(raw))
    return lapic


def configure_vcpu(vcpu: kvm.Vcpu, cpuid: list[kvm.kvm_cpuid_entry2]) -> None:
    """State every vCPU needs (the boot CPU additionally gets ``set_boot_regs``)."""
    vcpu.set_cpuid2(cpuid)
    n = vcpu.set_msrs(BOOT_MSRS)
    if n != len(BOOT_MSRS):
        log.debug("vcpu%d: KVM took %d of %d boot MSRs", vcpu.index, n, len(BOOT_MSRS))
    fpu = kvm.kvm_fpu()
    fpu.fcw = 0x37F      # x87 default control word (FNINIT)
    fpu.mxcsr = 0x1F80   # SSE default: all exceptions masked
    vcpu.set_fpu(fpu)
    vcpu.set_lapic(set_lint(vcpu.get_lapic()))


def set_boot_regs(vcpu: kvm.Vcpu, mem, mode: str, rip: int, rbx: int = 0, rsi: int = 0) -> None:
    """Registers of the boot CPU at the kernel's entry point."""
    write_gdt(mem)
    cr3 = write_identity_page_tables(mem) if mode == "long64" else 0
    vcpu.set_sregs(boot_sregs(vcpu.get_sregs(), mode, cr3))
    regs = kvm.kvm_regs(rip=rip, rbx=rbx, rsi=rsi, rsp=layout.BOOT_STACK_ADDR,
                        rbp=layout.BOOT_STACK_ADDR, rflags=0x2)
    vcpu.set_regs(regs)
