"""Boot-time CPU state (pyvmm.boot.cpu): GDT, segments, control registers,
identity page tables, CPUID filtering and the LAPIC's LINT pins.

No /dev/kvm: the kvm.h structures are plain ctypes objects here.
"""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm import kvm
from pyvmm.boot import layout
from pyvmm.boot.cpu import (
    APIC_LVT0,
    APIC_LVT1,
    BOOT_GDT,
    CPUID_1_ECX_CX16,
    CPUID_1_ECX_HYPERVISOR,
    CPUID_1_ECX_POPCNT,
    CPUID_1_ECX_XSAVE,
    CPUID_1_EDX_HTT,
    CPUID_7_EBX_SMAP,
    CPUID_7_EDX_ARCH_CAPABILITIES,
    CPUID_FILTER,
    KVM_FEATURES_HIDDEN,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_TSS,
    boot_sregs,
    filter_cpuid,
    gdt_entry,
    segment_from_gdt,
    set_lint,
    write_gdt,
    write_identity_page_tables,
)

MASK32 = 0xFFFFFFFF


class FakeMemory:
    """The first MiB of guest RAM as a bytearray."""

    def __init__(self, size: int = 0x100000) -> None:
        self.buf = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= len(self.buf), f"write outside RAM at {gpa:#x}"
        self.buf[gpa:gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        assert 0 <= gpa and gpa + size <= len(self.buf), f"read outside RAM at {gpa:#x}"
        return bytes(self.buf[gpa:gpa + size])

    def u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]


def seg_fields(seg: kvm.kvm_segment) -> dict:
    return {name: getattr(seg, name) for name, _ in kvm.kvm_segment._fields_}


# --- GDT --------------------------------------------------------------------------------
def test_boot_gdt_descriptors_are_the_classic_values():
    assert BOOT_GDT == [
        0,
        0x00CF9B000000FFFF,   # code32: base 0, limit 4 GiB, G, D/B, P, S, exec/read, accessed
        0x00AF9B000000FFFF,   # code64: G, L, P, S, exec/read, accessed
        0x00CF93000000FFFF,   # data: G, D/B, P, S, read/write, accessed
        0x00008B0000000067,   # TSS (busy), 104 bytes
    ]
    assert (SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS) == (0x08, 0x10, 0x18, 0x20)


def test_gdt_entry_bit_positions():
    # base 0x12345678, limit 0xABCDE, access 0x9A, flags nibble 0xC
    assert gdt_entry(0xC09A, 0x12345678, 0xABCDE) == 0x12CA9A345678BCDE


COMMON = dict(base=0, present=1, dpl=0, avl=0, unusable=0, padding=0)


@pytest.mark.parametrize("selector, expected", [
    (SEL_CODE32, dict(COMMON, selector=0x08, limit=0xFFFFFFFF, type=0xB, db=1, s=1, l=0, g=1)),
    (SEL_CODE64, dict(COMMON, selector=0x10, limit=0xFFFFFFFF, type=0xB, db=0, s=1, l=1, g=1)),
    (SEL_DATA, dict(COMMON, selector=0x18, limit=0xFFFFFFFF, type=0x3, db=1, s=1, l=0, g=1)),
    (SEL_TSS, dict(COMMON, selector=0x20, limit=0x67, type=0xB, db=0, s=0, l=0, g=0)),
], ids=["code32", "code64", "data", "tss"])
def test_segment_from_each_boot_gdt_entry(selector, expected):
    seg = segment_from_gdt(BOOT_GDT[selector // 8], selector)
    assert seg_fields(seg) == expected


@settings(max_examples=300, deadline=None)
@given(base=st.integers(0, MASK32), limit=st.integers(0, 0xFFFFF), access=st.integers(0, 0xFF),
       flags=st.integers(0, 0xF))
def test_gdt_entry_segment_round_trip(base, limit, access, flags):
    entry = gdt_entry((flags << 12) | access, base, limit)
    assert entry < 1 << 64
    seg = segment_from_gdt(entry, 0x28)
    g = flags >> 3
    assert seg.base == base
    assert seg.limit == ((limit << 12) | 0xFFF if g else limit)
    assert (seg.g, seg.db, seg.l, seg.avl) == (g, (flags >> 2) & 1, (flags >> 1) & 1, flags & 1)
    assert (seg.present, seg.dpl, seg.s, seg.type) == (access >> 7, (access >> 5) & 3,
                                                      (access >> 4) & 1, access & 0xF)
    assert seg.selector == 0x28
    # and back: the descriptor is determined by what the segment says
    rebuilt = gdt_entry((seg.g << 15) | (seg.db << 14) | (seg.l << 13) | (seg.avl << 12)
                        | (seg.present << 7) | (seg.dpl << 5) | (seg.s << 4) | seg.type,
                        seg.base, limit)
    assert rebuilt == entry


def test_write_gdt():
    mem = FakeMemory()
    write_gdt(mem)
    raw = mem.read(layout.GDT_ADDR, 8 * len(BOOT_GDT))
    assert list(struct.unpack(f"<{len(BOOT_GDT)}Q", raw)) == BOOT_GDT
    assert mem.read(layout.GDT_ADDR + 8 * len(BOOT_GDT), 8) == bytes(8)


# --- segment and control registers -------------------------------------------------------
def test_boot_sregs_protected32():
    s = kvm.kvm_sregs()
    s.apic_base = 0xFEE00900
    out = boot_sregs(s, "protected32")
    assert out is s
    assert seg_fields(s.cs) == seg_fields(segment_from_gdt(BOOT_GDT[1], 0x08))
    assert (s.cs.selector, s.cs.db, s.cs.l) == (0x08, 1, 0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        assert (seg.selector, seg.type, seg.db, seg.s, seg.limit) == (0x18, 3, 1, 1, 0xFFFFFFFF), name
    assert (s.tr.selector, s.tr.type, s.tr.s, s.tr.limit, s.tr.present) == (0x20, 0xB, 0, 0x67, 1)
    assert (s.gdt.base, s.gdt.limit) == (0x500, 39)
    assert (s.idt.base, s.idt.limit) == (0, 0)
    assert s.cr0 == 0x31                  # PE | ET | NE
    assert s.cr0 & (1 << 31) == 0         # no paging
    assert s.cr4 == 0
    assert s.efer == 0
    assert s.apic_base == 0xFEE00900      # left alone


def test_boot_sregs_long64():
    s = boot_sregs(kvm.kvm_sregs(), "long64", cr3=0x9000)
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.g) == (0x10, 1, 0, 0xB, 1)
    assert all(getattr(s, n).selector == 0x18 for n in ("ds", "es", "fs", "gs", "ss"))
    assert s.tr.selector == 0x20
    assert s.cr0 == 0x80000031            # PG | NE | ET | PE
    assert s.cr3 == 0x9000
    assert s.cr4 == 0x20                  # PAE
    assert s.efer == 0x500                # LMA | LME
    assert (s.gdt.base, s.gdt.limit) == (layout.GDT_ADDR, 8 * len(BOOT_GDT) - 1)


def test_boot_sregs_protected32_after_long64_clears_long_mode():
    s = boot_sregs(boot_sregs(kvm.kvm_sregs(), "long64", cr3=0x9000), "protected32")
    assert (s.cr0, s.cr4, s.efer, s.cs.l, s.cs.db) == (0x31, 0, 0, 0, 1)


@pytest.mark.parametrize("mode", ["real16", "long", "", "LONG64"])
def test_boot_sregs_unknown_mode(mode):
    with pytest.raises(ValueError, match="unknown entry mode"):
        boot_sregs(kvm.kvm_sregs(), mode)


# --- identity page tables ---------------------------------------------------------------
ADDR_MASK = 0x000FFFFFFFFFF000


def translate(mem: FakeMemory, cr3: int, va: int) -> int | None:
    """A 4-level walk as the MMU does it; None where the walk hits a non-present entry."""
    pml4e = mem.u64((cr3 & ADDR_MASK) + 8 * ((va >> 39) & 0x1FF))
    if not pml4e & 1:
        return None
    assert pml4e & 2, "PML4E not writable"
    pdpte = mem.u64((pml4e & ADDR_MASK) + 8 * ((va >> 30) & 0x1FF))
    if not pdpte & 1:
        return None
    assert pdpte & 2 and not pdpte & 0x80, "PDPTE must point to a page directory"
    pde = mem.u64((pdpte & ADDR_MASK) + 8 * ((va >> 21) & 0x1FF))
    if not pde & 1:
        return None
    assert pde & 2 and pde & 0x80, "PDE must map a writable 2 MiB page"
    return (pde & 0x000FFFFFFFE00000) | (va & 0x1FFFFF)


@pytest.mark.parametrize("va", [0, 0xFFF, 0x100000, 0x1FFFFF, 0x200000, 0x1000000 + 0x4A0,
                                0x7FFFFFFF, 0x80000000, 0xC0000000, 0xFEE00000, 0xFFFFFFFF])
def test_identity_map_translates_to_itself(va):
    mem = FakeMemory()
    cr3 = write_identity_page_tables(mem)
    assert cr3 == layout.PML4_ADDR
    assert translate(mem, cr3, va) == va


@pytest.mark.parametrize("va", [0x100000000, 0x7FFFFFFFFF, 0x8000000000, 0xFFFFFFFFFFFF])
def test_identity_map_stops_at_4_gib(va):
    mem = FakeMemory()
    cr3 = write_identity_page_tables(mem)
    assert translate(mem, cr3, va) is None


def test_identity_map_entries():
    mem = FakeMemory()
    write_identity_page_tables(mem)
    assert mem.u64(layout.PML4_ADDR) == layout.PDPTE_ADDR | 3
    assert mem.read(layout.PML4_ADDR + 8, 0x1000 - 8) == bytes(0x1000 - 8)
    assert [mem.u64(layout.PDPTE_ADDR + 8 * i) for i in range(5)] == [
        0xB003, 0xC003, 0xD003, 0xE003, 0]
    pdes = struct.unpack("<2048Q", mem.read(layout.PDE_ADDR, 4 * 0x1000))
    assert all(pde == (i << 21) | 0x83 for i, pde in enumerate(pdes))


def test_page_tables_overlap_no_other_boot_structure():
    tables = (layout.PML4_ADDR, layout.PDE_ADDR + 4 * 0x1000)
    others = {
        "gdt": (layout.GDT_ADDR, layout.GDT_ADDR + 8 * len(BOOT_GDT)),
        "pvh start info": (layout.PVH_START_INFO_ADDR, layout.PVH_START_INFO_ADDR + 0x1000),
        "zero page": (layout.ZERO_PAGE_ADDR, layout.ZERO_PAGE_ADDR + 0x1000),
        "stack top": (layout.BOOT_STACK_ADDR - 16, layout.BOOT_STACK_ADDR),
        "cmdline": (layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + layout.CMDLINE_MAX),
        "mptable": (layout.MPTABLE_ADDR, layout.BASE_MEMORY_END),
        "$PIR table": (layout.BIOS_ROM_START, layout.BIOS_ROM_START + 32),
    }
    for name, (lo, hi) in others.items():
        assert hi <= tables[0] or lo >= tables[1], name


# --- CPUID ------------------------------------------------------------------------------
def leaf(function, index=0, eax=0, ebx=0, ecx=0, edx=0, flags=0) -> kvm.kvm_cpuid_entry2:
    return kvm.kvm_cpuid_entry2(function=function, index=index, flags=flags,
                                eax=eax, ebx=ebx, ecx=ecx, edx=edx)


SIGNIFICANT = kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def supported() -> list[kvm.kvm_cpuid_entry2]:
    """A KVM_GET_SUPPORTED_CPUID answer with every feature bit set."""
    return [
        leaf(0, eax=0xD, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        leaf(1, eax=0x000A0671, ebx=0xFFFFFF12, ecx=MASK32, edx=MASK32),
        leaf(4, 0, eax=0xFC004121, ebx=0x01C0003F, ecx=0x3F, flags=SIGNIFICANT),
        leaf(4, 1, eax=0xFC004122, ebx=0x01C0003F, ecx=0x3F, flags=SIGNIFICANT),
        leaf(7, 0, eax=1, ebx=MASK32, ecx=MASK32, edx=MASK32, flags=SIGNIFICANT),
        leaf(7, 1, eax=MASK32, ebx=MASK32, ecx=MASK32, edx=MASK32, flags=SIGNIFICANT),
        leaf(0xB, 0, eax=1, ebx=2, ecx=0x100, edx=0x55, flags=SIGNIFICANT),
        leaf(0xB, 1, eax=7, ebx=64, ecx=0x201, edx=0x55, flags=SIGNIFICANT),
        leaf(0xB, 2, eax=0, ebx=0, ecx=2, edx=0x55, flags=SIGNIFICANT),
        leaf(0xD, 0, eax=0x2E7, ebx=0x988, ecx=0xA88, flags=SIGNIFICANT),
        leaf(0xD, 1, eax=0xF, flags=SIGNIFICANT),
        leaf(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        leaf(0x40000001, eax=0x01007EFB),
        leaf(0x80000000, eax=0x80000008),
        leaf(0x80000001, ecx=MASK32, edx=MASK32),
    ]


def find(entries, function, index=0) -> kvm.kvm_cpuid_entry2:
    hits = [e for e in entries if e.function == function and e.index == index]
    assert len(hits) == 1, f"leaf {function:#x}.{index}: {len(hits)} entries"
    return hits[0]


def test_filter_cpuid_keeps_order_and_drops_leaf_0xd():
    out = filter_cpuid(supported(), 0, 1)
    expected = [(e.function, e.index) for e in supported() if e.function != 0xD]
    assert [(e.function, e.index) for e in out] == expected


@pytest.mark.parametrize("index, n", [(0, 1), (0, 2), (1, 2), (3, 4), (7, 8)])
def test_leaf1_apic_id_and_logical_count(index, n):
    e = find(filter_cpuid(supported(), index, n), 1)
    assert e.ebx == (index << 24) | (n << 16) | (8 << 8) | 0x12
    assert e.ebx >> 24 == index
    assert (e.ebx >> 16) & 0xFF == n
    assert e.eax == 0x000A0671


def test_leaf1_hypervisor_bit_is_set_even_if_kvm_did_not_say():
    entries = [leaf(1, ecx=0, edx=0)]
    assert find(filter_cpuid(entries, 0, 1), 1).ecx == CPUID_1_ECX_HYPERVISOR


def test_leaf1_htt_only_with_more_than_one_cpu():
    assert find(filter_cpuid([leaf(1, edx=MASK32)], 0, 1), 1).edx == MASK32 & ~CPUID_1_EDX_HTT
    assert find(filter_cpuid([leaf(1, edx=0)], 0, 2), 1).edx == CPUID_1_EDX_HTT
    assert find(filter_cpuid([leaf(1, edx=0)], 0, 1), 1).edx == 0


def test_every_filtered_bit_is_cleared_and_no_other():
    out = filter_cpuid(supported(), 0, 2)
    for (function, reg), bits in CPUID_FILTER.items():
        e = find(out, function, 0)
        assert getattr(e, reg) & bits == 0, f"{function:#x}.{reg}"
    assert find(out, 1).ecx == MASK32 & ~CPUID_FILTER[(1, "ecx")]      # HYPERVISOR stays set
    assert find(out, 1).edx == MASK32                                   # nothing filtered in EDX
    e7 = find(out, 7, 0)
    assert (e7.eax, e7.ebx, e7.ecx, e7.edx) == (1, MASK32 & ~CPUID_FILTER[(7, "ebx")],
                                               MASK32 & ~CPUID_FILTER[(7, "ecx")],
                                               MASK32 & ~CPUID_FILTER[(7, "edx")])
    ext = find(out, 0x80000001)
    assert (ext.ecx, ext.edx) == (MASK32 & ~CPUID_FILTER[(0x80000001, "ecx")], MASK32)


def test_filter_covers_what_design_md_names():
    assert CPUID_FILTER[(1, "ecx")] & CPUID_1_ECX_XSAVE
    assert CPUID_FILTER[(1, "ecx")] & CPUID_1_ECX_CX16
    assert CPUID_FILTER[(1, "ecx")] & CPUID_1_ECX_POPCNT
    assert CPUID_FILTER[(7, "ebx")] & CPUID_7_EBX_SMAP
    assert CPUID_FILTER[(7, "edx")] & CPUID_7_EDX_ARCH_CAPABILITIES
    assert not CPUID_FILTER[(1, "ecx")] & CPUID_1_ECX_HYPERVISOR


def test_leaf7_subleaf1_untouched():
    src = find(supported(), 7, 1)
    out = find(filter_cpuid(supported(), 1, 4), 7, 1)
    assert bytes(out) == bytes(src)


def test_untouched_leaves_are_byte_identical():
    out = filter_cpuid(supported(), 1, 2)
    for function in (0, 0x40000000, 0x80000000):
        assert bytes(find(out, function)) == bytes(find(supported(), function))


@pytest.mark.parametrize("index, n, core_shift", [(0, 1, 0), (1, 2, 1), (2, 3, 2), (3, 4, 2), (5, 8, 3)])
def test_leaf_0xb_topology(index, n, core_shift):
    out = filter_cpuid(supported(), index, n)
    smt, core, invalid = find(out, 0xB, 0), find(out, 0xB, 1), find(out, 0xB, 2)
    assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (0, 1, 0x100, index)          # level 0: SMT, 1 thread
    assert (core.eax, core.ebx, core.ecx, core.edx) == (core_shift, n, 0x201, index)  # level 1: core
    assert (invalid.eax, invalid.ebx, invalid.ecx, invalid.edx) == (0, 0, 2, index)   # type 0: end
    assert smt.flags == core.flags == SIGNIFICANT


def test_leaf_4_cores_per_package():
    out = filter_cpuid(supported(), 0, 4)
    assert find(out, 4, 0).eax == (0xFC004121 & 0x03FFFFFF) | (3 << 26)
    assert find(out, 4, 1).eax == (0xFC004122 & 0x03FFFFFF) | (3 << 26)
    assert find(out, 4, 0).ebx == 0x01C0003F


def test_kvm_pv_features_hidden():
    out = find(filter_cpuid(supported(), 0, 2), 0x40000001)
    assert KVM_FEATURES_HIDDEN == (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13)
    assert out.eax == 0x0100547B             # 0x01007efb without PV_UNHALT/TLB_FLUSH/SEND_IPI/SCHED_YIELD
    all_on = find(filter_cpuid([leaf(0x40000001, eax=MASK32)], 0, 1), 0x40000001)
    assert all_on.eax == MASK32 & ~KVM_FEATURES_HIDDEN


def test_input_list_not_mutated_and_output_is_a_copy():
    src = supported()
    before = [bytes(e) for e in src]
    out = filter_cpuid(src, 3, 4)
    assert [bytes(e) for e in src] == before
    assert len(src) == 15
    assert all(o is not s for o in out for s in src)
    find(out, 1).ebx = 0                    # the copies share no memory with the input
    assert bytes(find(src, 1)) == before[1]


def test_each_vcpu_gets_its_own_apic_id():
    src = supported()
    ids = [find(filter_cpuid(src, i, 8), 1).ebx >> 24 for i in range(8)]
    assert ids == list(range(8))
    x2 = [find(filter_cpuid(src, i, 8), 0xB, 1).edx for i in range(8)]
    assert x2 == list(range(8))


def test_empty_supported_list():
    assert filter_cpuid([], 0, 1) == []


def test_leaf_0x1f_gets_the_guest_topology_or_is_dropped():
    src = [leaf(0, eax=0x1F),
           leaf(0x1F, 0, eax=1, ebx=2, ecx=0x100, edx=0x2A, flags=SIGNIFICANT),
           leaf(0x1F, 1, eax=6, ebx=32, ecx=0x201, edx=0x2A, flags=SIGNIFICANT),
           leaf(0x1F, 2, eax=0, ebx=0, ecx=2, edx=0x2A, flags=SIGNIFICANT)]
    for index in range(4):
        out = [e for e in filter_cpuid(src, index, 4) if e.function == 0x1F]
        for e in out:
            assert e.edx == index                         # x2APIC id of this vCPU
        if out:
            smt, core = find(out, 0x1F, 0), find(out, 0x1F, 1)
            assert (smt.ebx, smt.ecx & 0xFF00) == (1, 0x100)
            assert (core.ebx, core.ecx & 0xFF00) == (4, 0x200)


# --- LAPIC LINT0/LINT1 ------------------------------------------------------------------
def lapic_with(values: dict[int, int]) -> kvm.kvm_lapic_state:
    state = kvm.kvm_lapic_state()
    for i in range(kvm.KVM_APIC_REG_SIZE):
        state.regs[i] = (i * 13) & 0xFF                # recognisable bytes everywhere
    for reg, value in values.items():
        struct.pack_into("<I", state.regs, reg, value)
    return state


def reg32(state: kvm.kvm_lapic_state, reg: int) -> int:
    return struct.unpack_from("<I", bytes(state.regs), reg)[0]


def test_set_lint_delivery_modes():
    state = lapic_with({APIC_LVT0: 0x00010000, APIC_LVT1: 0x00010000})   # masked, fixed mode
    out = set_lint(state)
    assert out is state
    assert reg32(state, 0x350) == 0x00010700           # LVT0: ExtINT (7), mask kept
    assert reg32(state, 0x360) == 0x00010400           # LVT1: NMI (4), mask kept


def test_set_lint_keeps_other_bits():
    # mask (bit 16), level/polarity bits (15, 13), SMI mode (2 / 5), vector 0xff
    state = lapic_with({APIC_LVT0: 0x0001A2FF, APIC_LVT1: 0x0001A5FF})
    before = bytes(state.regs)
    set_lint(state)
    assert reg32(state, APIC_LVT0) == 0x0001A7FF
    assert reg32(state, APIC_LVT1) == 0x0001A4FF
    after = bytes(state.regs)
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert all(APIC_LVT0 <= i < APIC_LVT0 + 4 or APIC_LVT1 <= i < APIC_LVT1 + 4 for i in changed)


def test_set_lint_replaces_any_previous_mode():
    for mode in range(8):
        state = lapic_with({APIC_LVT0: (mode << 8) | 0x31, APIC_LVT1: (mode << 8) | 0x32})
        set_lint(state)
        assert reg32(state, APIC_LVT0) == 0x731
        assert reg32(state, APIC_LVT1) == 0x432
    assert ctypes.sizeof(state) == 0x400
