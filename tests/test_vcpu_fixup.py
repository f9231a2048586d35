"""Finishing the instructions KVM's emulator gives up on (pyvmm.vcpu.fixup_instruction)
and the register dump (format_regs), with a fake vCPU: no /dev/kvm."""

from __future__ import annotations

import errno

import pytest

from pyvmm import kvm
from pyvmm.vcpu import fixup_instruction, format_regs

RIP = 0xFFFFFFFF81000123


class FakeVcpu:
    """get/set regs, sregs and vCPU events, kept as kvm.h structures; records the calls."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.regs = kvm.kvm_regs(rip=RIP, rflags=0x246, rsp=0xFFFFC90000003F00)
        self.sregs = kvm.kvm_sregs(cr0=0x80050033, cr3=0x2A0C000, cr4=0x340EF0, efer=0xD01)
        self.events = kvm.kvm_vcpu_events()
        self.events.flags = kvm.KVM_VCPUEVENT_VALID_SHADOW | kvm.KVM_VCPUEVENT_VALID_NMI_PENDING
        self.events.nmi.masked = 1
        self.calls: list[str] = []

    def get_regs(self) -> kvm.kvm_regs:
        self.calls.append("get_regs")
        return kvm.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs: kvm.kvm_regs) -> None:
        self.calls.append("set_regs")
        self.regs = kvm.kvm_regs.from_buffer_copy(regs)

    def get_sregs(self) -> kvm.kvm_sregs:
        self.calls.append("get_sregs")
        return kvm.kvm_sregs.from_buffer_copy(self.sregs)

    def get_vcpu_events(self) -> kvm.kvm_vcpu_events:
        self.calls.append("get_vcpu_events")
        return kvm.kvm_vcpu_events.from_buffer_copy(self.events)

    def set_vcpu_events(self, events: kvm.kvm_vcpu_events) -> None:
        self.calls.append("set_vcpu_events")
        self.events = kvm.kvm_vcpu_events.from_buffer_copy(events)


def exception(v: FakeVcpu) -> tuple:
    e = v.events.exception
    return (e.injected, e.nr, e.has_error_code, e.pending, e.error_code)


def interrupt(v: FakeVcpu) -> tuple:
    i = v.events.interrupt
    return (i.injected, i.nr, i.soft)


@pytest.mark.parametrize("insn, name, vector", [
    (b"\xcc", "int3", 3),
    (b"\xcc\x90\x90", "int3", 3),          # the emulator passes up to 15 bytes
    (b"\xf1", "int1", 1),
])
def test_int3_int1_inject_the_exception(insn, name, vector):
    v = FakeVcpu()
    assert fixup_instruction(v, insn) == name
    assert v.regs.rip == RIP + 1
    assert exception(v) == (1, vector, 0, 0, 0)      # injected, nr, no error code, not pending
    assert interrupt(v) == (0, 0, 0)
    assert v.events.flags == 0
    assert v.events.nmi.masked == 1                  # the rest of the events state is kept
    assert v.regs.rflags == 0x246
    assert v.calls.count("set_regs") == 1 and v.calls.count("set_vcpu_events") == 1


@pytest.mark.parametrize("vector", [0x80, 0x03, 0x20, 0xFF, 0x00])
def test_int_n_injects_a_soft_interrupt(vector):
    v = FakeVcpu()
    assert fixup_instruction(v, bytes([0xCD, vector])) == f"int {vector:#x}"
    assert v.regs.rip == RIP + 2
    assert interrupt(v) == (1, vector, 1)
    assert exception(v) == (0, 0, 0, 0, 0)
    assert v.events.flags == 0


def test_int_0x80_by_name():
    v = FakeVcpu()
    assert fixup_instruction(v, b"\xcd\x80\x0f\x0b") == "int 0x80"
    assert v.regs.rip == RIP + 2
    assert interrupt(v) == (1, 0x80, 1)


def test_fwait_is_skipped():
    v = FakeVcpu()
    before = bytes(v.events)
    assert fixup_instruction(v, b"\x9b") == "fwait"
    assert v.regs.rip == RIP + 1
    assert bytes(v.events) == before
    assert "set_vcpu_events" not in v.calls


def test_rip_wraps_like_a_u64():
    v = FakeVcpu()
    v.regs.rip = 0xFFFFFFFFFFFFFFFF
    assert fixup_instruction(v, b"\x9b") == "fwait"
    assert v.regs.rip == 0


@pytest.mark.parametrize("insn", [
    b"\x0f\x01\xd0",      # xgetbv
    b"\x0f\x01\xca",      # clac
    b"\xf3\x0f\xb8\xc0",  # popcnt
    b"\x66\xcd\x80",      # a prefix before INT n: not ours to decode
    b"\xcd",              # INT n without its vector byte
    b"\x90",
    b"",
])
def test_unknown_instruction_changes_nothing(insn):
    v = FakeVcpu()
    regs, events = bytes(v.regs), bytes(v.events)
    assert fixup_instruction(v, insn) is None
    assert bytes(v.regs) == regs
    assert bytes(v.events) == events
    assert "set_regs" not in v.calls and "set_vcpu_events" not in v.calls


def test_repeated_int3_advances_each_time():
    v = FakeVcpu()
    for _ in range(3):
        assert fixup_instruction(v, b"\xcc") == "int3"
    assert v.regs.rip == RIP + 3


# --- format_regs ----------------------------------------------------------------------------
def test_format_regs():
    v = FakeVcpu(index=2)
    v.regs.rax = 0x1234
    v.sregs.cs.selector = 0x10
    v.sregs.cs.l = 1
    text = format_regs(v)
    lines = text.splitlines()
    assert lines[0] == "vcpu2 registers:"
    assert f"RIP={RIP:016x}" in text
    assert "RAX=0000000000001234" in text
    assert " R8=0000000000000000" in text
    assert "RFLAGS=0000000000000246" in text
    assert "CR3=0000000002a0c000" in text
    assert "CR0=0000000080050033" in text
    assert "EFER=0000000000000d01" in text
    assert any(line.startswith("  CS: sel=0010") and "l=1" in line for line in lines)
    for reg in ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP", "R15", "RIP", "CR2", "CR4"):
        assert f"{reg}=" in text, reg
    assert "GDT=" in text and "IDT=" in text


def test_format_regs_when_the_vcpu_cannot_answer():
    class Gone(FakeVcpu):
        def get_regs(self):
            raise kvm.KvmError(errno.EBADF, "ioctl 0x8090ae81: Bad file descriptor")

    text = format_regs(Gone(index=1))
    assert text.startswith("vcpu1: registers unavailable (")
    assert "\n" not in text
