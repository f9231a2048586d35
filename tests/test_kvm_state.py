"""pyvmm.snapshot.kvm_state without /dev/kvm: the JSON form of the saved state, how
from_json refuses bad input, and the order of the save and restore ioctls (fakes)."""

from __future__ import annotations

import ctypes
import errno
import json
import random

import pytest

from pyvmm import kvm
from pyvmm.snapshot import kvm_state
from pyvmm.snapshot.kvm_state import VcpuState, VmState


def filled(cls: type, seed: int):
    """A structure whose bytes are random (padding included: JSON leaves it out)."""
    rng = random.Random(seed)
    return cls.from_buffer_copy(bytes(rng.getrandbits(8) for _ in range(ctypes.sizeof(cls))))


def sample_vcpu_state(seed: int = 1) -> VcpuState:
    cpuid = [filled(kvm.kvm_cpuid_entry2, seed + i) for i in range(3)]
    return VcpuState(
        regs=filled(kvm.kvm_regs, seed), sregs=filled(kvm.kvm_sregs, seed + 1),
        fpu=filled(kvm.kvm_fpu, seed + 2), xsave=bytes(range(256)) * 16,
        xcrs={0: 0x7}, debugregs=filled(kvm.kvm_debugregs, seed + 3),
        lapic=filled(kvm.kvm_lapic_state, seed + 4),
        msrs={0x10: 0x123456789A, 0xC0000082: 0xFFFFFFFF81000000, 0x6E0: 0},
        mp_state=kvm.KVM_MP_STATE_HALTED, vcpu_events=filled(kvm.kvm_vcpu_events, seed + 5),
        tsc_khz=2596138, cpuid=cpuid)


def sample_vm_state(seed: int = 1) -> VmState:
    return VmState(pic_master=filled(kvm.kvm_pic_state, seed),
                   pic_slave=filled(kvm.kvm_pic_state, seed + 1),
                   ioapic=filled(kvm.kvm_ioapic_state, seed + 2), pit2=filled(kvm.kvm_pit_state2, seed + 3),
                   clock=filled(kvm.kvm_clock_data, seed + 4))


def through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


# --- round trips ---------------------------------------------------------------------------
def test_vcpu_state_json_round_trip():
    state = sample_vcpu_state()
    data = through_json(state.to_json())
    back = VcpuState.from_json(data)
    assert back.to_json() == data
    assert bytes(back.regs) == bytes(state.regs)                  # no padding in these
    assert bytes(back.lapic) == bytes(state.lapic)
    assert back.xsave == state.xsave and back.msrs == state.msrs and back.xcrs == state.xcrs
    assert back.mp_state == kvm.KVM_MP_STATE_HALTED and back.tsc_khz == 2596138
    assert [bytes(e)[:24] for e in back.cpuid] == [bytes(e)[:24] for e in state.cpuid]


def test_vm_state_json_round_trip():
    state = sample_vm_state()
    data = through_json(state.to_json())
    back = VmState.from_json(data)
    assert back.to_json() == data
    assert bytes(back.pic_master) == bytes(state.pic_master)
    assert bytes(back.ioapic)[:16] == bytes(state.ioapic)[:16]
    assert bytes(back.ioapic)[24:] == bytes(state.ioapic)[24:]    # 20..24 is pad
    assert back.clock.clock == state.clock.clock
    loads = [c.count_load_time for c in state.pit2.channels]
    assert [c.count_load_time for c in back.pit2.channels] == loads


def test_optional_parts_may_be_null():
    state = sample_vcpu_state()
    state.xsave = state.xcrs = state.debugregs = state.tsc_khz = None
    back = VcpuState.from_json(through_json(state.to_json()))
    assert (back.xsave, back.xcrs, back.debugregs, back.tsc_khz) == (None, None, None, None)
    vm = sample_vm_state()
    vm.pit2 = None
    assert VmState.from_json(through_json(vm.to_json())).pit2 is None


def test_json_is_readable():
    state = sample_vcpu_state()
    state.regs.rip = 0x10096
    state.sregs.cs.selector = 0x10
    data = state.to_json()
    assert data["regs"]["rip"] == "0x10096"
    assert set(data["sregs"]["cs"]) == {"base", "limit", "selector", "type", "present", "dpl",
                                        "db", "s", "l", "g", "avl", "unusable"}
    assert data["sregs"]["cs"]["selector"] == "0x10"
    assert data["msrs"]["0xc0000082"] == "0xffffffff81000000"
    assert data["mp_state"] == "HALTED"
    assert len(data["lapic"]["regs"]) == 2 * kvm.KVM_APIC_REG_SIZE
    assert data["xsave"]["bytes"] == 4096 and len(data["xsave"]["area"]) == 8192
    assert len(data["fpu"]["xmm"]) == 16 and len(data["fpu"]["xmm"][0]) == 32
    assert "padding" not in data["sregs"]["cs"] and "reserved" not in data["vcpu_events"]
    vm = sample_vm_state().to_json()
    assert len(vm["ioapic"]["redirtbl"]) == kvm.KVM_IOAPIC_NUM_PINS
    assert all(v.startswith("0x") for v in vm["ioapic"]["redirtbl"])
    assert set(vm["clock"]) == {"clock", "flags", "realtime", "host_tsc"}
    assert set(vm["pit2"]) == {"channels", "flags"}


# --- refusals ------------------------------------------------------------------------------
def _drop(path):
    def edit(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        del d[last]
    return edit


def _set(path, value):
    def edit(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value
    return edit


VCPU_BAD = [
    ("missing rip", _drop(["regs", "rip"]), r"vcpu\.regs: missing rip"),
    ("missing lapic", _drop(["lapic"]), r"vcpu: missing lapic"),
    ("missing segment field", _drop(["sregs", "cs", "selector"]), r"vcpu\.sregs\.cs: missing selector"),
    ("missing event field", _drop(["vcpu_events", "nmi", "masked"]),
     r"vcpu\.vcpu_events\.nmi: missing masked"),
    ("unknown key", _set(["regs", "rip2"], "0x0"), r"vcpu\.regs: unknown rip2"),
    ("rip as a number", _set(["regs", "rip"], 65536), r"vcpu\.regs\.rip: expected a hex string"),
    ("rip without 0x", _set(["regs", "rip"], "10096"), r"vcpu\.regs\.rip: expected a hex string"),
    ("rip not hex", _set(["regs", "rip"], "0xzz"), r"vcpu\.regs\.rip: expected a hex string"),
    ("rip too wide", _set(["regs", "rip"], "0x1" + "0" * 16),
     r"vcpu\.regs\.rip: .* does not fit in 8 byte"),
    ("negative rip", _set(["regs", "rip"], "-0x1"), r"vcpu\.regs\.rip: -0x1 does not fit"),
    ("selector too wide", _set(["sregs", "cs", "selector"], "0x10000"),
     r"vcpu\.sregs\.cs\.selector: .* 2 byte"),
    ("regs a list", _set(["regs"], []), r"vcpu\.regs: expected an object, got list"),
    ("segment null", _set(["sregs", "cs"], None), r"vcpu\.sregs\.cs: expected an object"),
    ("short interrupt bitmap", lambda d: d["sregs"]["interrupt_bitmap"].pop(),
     r"vcpu\.sregs\.interrupt_bitmap: expected a list of 4 items"),
    ("short lapic", _set(["lapic", "regs"], "00" * 1023),
     r"vcpu\.lapic\.regs: expected 1024 bytes, got 1023"),
    ("long lapic", _set(["lapic", "regs"], "00" * 1025),
     r"vcpu\.lapic\.regs: expected 1024 bytes, got 1025"),
    ("odd lapic", _set(["lapic", "regs"], "0" * 2047),
     r"vcpu\.lapic\.regs: expected a string of hex bytes"),
    ("lapic not hex", _set(["lapic", "regs"], "zz" * 1024),
     r"vcpu\.lapic\.regs: expected a string of hex bytes"),
    ("short xmm", lambda d: d["fpu"]["xmm"].__setitem__(3, "00" * 15),
     r"vcpu\.fpu\.xmm\[3\]: expected 16 bytes"),
    ("fpr count", lambda d: d["fpu"]["fpr"].pop(), r"vcpu\.fpu\.fpr: expected a list of 8 items"),
    ("xsave size mismatch", _set(["xsave", "bytes"], 8192),
     r"vcpu\.xsave\.area: expected 8192 bytes, got 4096"),
    ("xsave too small", _set(["xsave"], {"bytes": 64, "area": "00" * 64}),
     r"vcpu\.xsave\.bytes: expected a multiple of 4"),
    ("xsave size a string", _set(["xsave", "bytes"], "4096"), r"vcpu\.xsave\.bytes"),
    ("xsave missing area", _drop(["xsave", "area"]), r"vcpu\.xsave: missing area"),
    ("msr index decimal", _set(["msrs", "16"], "0x0"), r"vcpu\.msrs key '16': expected a hex string"),
    ("msr index too wide", _set(["msrs", "0x100000000"], "0x0"), r"vcpu\.msrs key .* 4 byte"),
    ("msr value a number", _set(["msrs", "0x10"], 5), r"vcpu\.msrs\['0x10'\]: expected a hex string"),
    ("msrs a list", _set(["msrs"], [1, 2]), r"vcpu\.msrs: expected an object"),
    ("xcrs too many", _set(["xcrs"], {hex(i): "0x1" for i in range(17)}),
     r"vcpu\.xcrs: expected an object of at most 16"),
    ("mp_state unknown", _set(["mp_state"], "SLEEPY"), r"vcpu\.mp_state: expected one of RUNNABLE"),
    ("mp_state a number", _set(["mp_state"], 3), r"vcpu\.mp_state: expected one of"),
    ("tsc_khz a bool", _set(["tsc_khz"], True), r"vcpu\.tsc_khz: expected a positive 32-bit integer"),
    ("tsc_khz negative", _set(["tsc_khz"], -1), r"vcpu\.tsc_khz"),
    ("tsc_khz a string", _set(["tsc_khz"], "2596138"), r"vcpu\.tsc_khz"),
    ("cpuid not a list", _set(["cpuid"], {}), r"vcpu\.cpuid: expected a list"),
    ("cpuid too long", lambda d: d.__setitem__("cpuid", d["cpuid"] * 100),
     r"vcpu\.cpuid: expected a list of at most 256"),
    ("cpuid entry field", _drop(["cpuid", 1, "eax"]), r"vcpu\.cpuid\[1\]: missing eax"),
    ("debugregs short", lambda d: d["debugregs"]["db"].pop(), r"vcpu\.debugregs\.db: expected a list of 4"),
    ("version", _set(["version"], 2), r"vcpu\.version: expected 1, got int 2"),
    ("version a bool", _set(["version"], True), r"vcpu\.version: expected 1"),
]


@pytest.mark.parametrize("what, edit, message", VCPU_BAD, ids=[c[0] for c in VCPU_BAD])
def test_vcpu_from_json_refuses(what, edit, message):
    data = through_json(sample_vcpu_state().to_json())
    edit(data)
    with pytest.raises(ValueError, match=message):
        VcpuState.from_json(data)


VM_BAD = [
    ("missing clock", _drop(["clock"]), r"vm: missing clock"),
    ("missing pic field", _drop(["pic_master", "imr"]), r"vm\.pic_master: missing imr"),
    ("pic byte too wide", _set(["pic_slave", "imr"], "0x100"),
     r"vm\.pic_slave\.imr: 0x100 does not fit in 1 byte"),
    ("redirtbl short", lambda d: d["ioapic"]["redirtbl"].pop(),
     r"vm\.ioapic\.redirtbl: expected a list of 24"),
    ("redirtbl entry", lambda d: d["ioapic"]["redirtbl"].__setitem__(5, {"bits": "0x0"}),
     r"vm\.ioapic\.redirtbl\[5\]: expected a hex string"),
    ("pit channels", lambda d: d["pit2"]["channels"].pop(), r"vm\.pit2\.channels: expected a list of 3"),
    ("pit signed range", _set(["pit2", "channels", 0, "count_load_time"], "0x8000000000000000"),
     r"count_load_time: .* does not fit"),
    ("clock a string", _set(["clock"], "0x5"), r"vm\.clock: expected an object, got str"),
    ("unknown", _set(["hpet"], {}), r"vm: unknown hpet"),
]


@pytest.mark.parametrize("what, edit, message", VM_BAD, ids=[c[0] for c in VM_BAD])
def test_vm_from_json_refuses(what, edit, message):
    data = through_json(sample_vm_state().to_json())
    edit(data)
    with pytest.raises(ValueError, match=message):
        VmState.from_json(data)


@pytest.mark.parametrize("data", [None, [], "vcpu", 5])
def test_from_json_refuses_a_non_object(data):
    with pytest.raises(ValueError, match="expected an object"):
        VcpuState.from_json(data)
    with pytest.raises(ValueError, match="expected an object"):
        VmState.from_json(data)


def test_negative_pit_time_is_accepted():
    data = through_json(sample_vm_state().to_json())
    data["pit2"]["channels"][2]["count_load_time"] = "-0x10"
    assert VmState.from_json(data).pit2.channels[2].count_load_time == -16


# --- ioctl order, with fakes -----------------------------------------------------------------
class FakeVm:
    def __init__(self, caps: dict[int, int] | None = None) -> None:
        self.caps = caps if caps is not None else {
            kvm.KVM_CAP_XSAVE: 1, kvm.KVM_CAP_XCRS: 1, kvm.KVM_CAP_DEBUGREGS: 1,
            kvm.KVM_CAP_GET_TSC_KHZ: 1, kvm.KVM_CAP_XSAVE2: 4096}
        self.calls: list[str] = []
        self.clock_set = None

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def xsave_size(self) -> int:
        return max(self.caps.get(kvm.KVM_CAP_XSAVE2, 0), 4096)

    def get_irqchip(self, chip_id: int) -> kvm.kvm_irqchip:
        self.calls.append(f"get_irqchip {chip_id}")
        chip = kvm.kvm_irqchip(chip_id=chip_id)
        chip.chip.pic.imr = 0xF0 + chip_id
        chip.chip.ioapic.id = 0x77 if chip_id == kvm.KVM_IRQCHIP_IOAPIC else chip.chip.ioapic.id
        return chip

    def set_irqchip(self, chip: kvm.kvm_irqchip) -> None:
        self.calls.append(f"set_irqchip {chip.chip_id}")

    def get_pit2(self) -> kvm.kvm_pit_state2:
        self.calls.append("get_pit2")
        if "nopit" in self.caps:
            raise kvm.KvmError(errno.ENXIO, "no PIT")
        return kvm.kvm_pit_state2(flags=1)

    def set_pit2(self, state: kvm.kvm_pit_state2) -> None:
        self.calls.append("set_pit2")

    def get_clock(self) -> kvm.kvm_clock_data:
        self.calls.append("get_clock")
        return kvm.kvm_clock_data(clock=123456, flags=kvm.KVM_CLOCK_TSC_STABLE | kvm.KVM_CLOCK_REALTIME,
                                  realtime=99)

    def set_clock(self, data: kvm.kvm_clock_data) -> None:
        self.calls.append("set_clock")
        self.clock_set = kvm.kvm_clock_data.from_buffer_copy(data)


class FakeVcpu:
    """Records every ioctl wrapper called, in order."""

    def __init__(self, vm: FakeVm | None = None, tsc_khz: int = 2596138) -> None:
        self.vm = vm or FakeVm()
        self.index = 0
        self.calls: list[str] = []
        self.msr_writes: list[list[int]] = []
        self.tsc_khz = tsc_khz
        self.kvm_run = kvm.kvm_run()
        self.run_script: list[int] = []
        self.immediate_exit_seen: list[int] = []

    def __getattr__(self, name: str):
        if name.startswith(("get_", "set_")):
            def call(*args):
                self.calls.append(name)
                return self._answer(name, args)
            return call
        raise AttributeError(name)

    def _answer(self, name: str, args: tuple):
        answers = {"get_regs": kvm.kvm_regs(rip=0x1234), "get_sregs": kvm.kvm_sregs(),
                   "get_fpu": kvm.kvm_fpu(), "get_xsave": kvm.kvm_xsave(),
                   "get_xcrs": kvm.kvm_xcrs(nr_xcrs=1), "get_debugregs": kvm.kvm_debugregs(),
                   "get_lapic": kvm.kvm_lapic_state(), "get_mp_state": 0,
                   "get_vcpu_events": kvm.kvm_vcpu_events(), "get_tsc_khz": self.tsc_khz,
                   "get_cpuid2": [kvm.kvm_cpuid_entry2(function=1)]}
        if name == "get_msrs":
            return {i: i * 2 for i in args[0]}
        if name == "set_msrs":
            self.msr_writes.append(list(args[0]))
            return len(args[0])
        return answers.get(name)

    def run(self) -> None:
        self.calls.append("run")
        self.immediate_exit_seen.append(self.kvm_run.immediate_exit)
        self.kvm_run.exit_reason = self.run_script.pop(0) if self.run_script else kvm.KVM_EXIT_INTR


def test_save_order_mp_state_first_events_last():
    vcpu = FakeVcpu()
    state = kvm_state.save_vcpu(vcpu, [0x10, 0x6E0, 0x174])
    assert vcpu.calls[0] == "get_mp_state"
    assert vcpu.calls[-1] == "get_vcpu_events"
    assert vcpu.calls.index("get_lapic") < vcpu.calls.index("get_msrs")
    assert state.msrs == {0x10: 0x20, 0x6E0: 0xDC0, 0x174: 0x2E8}
    assert state.xsave == bytes(4096) and state.xcrs == {0: 0} and state.tsc_khz == 2596138


def test_save_uses_xsave2_for_a_large_area():
    vcpu = FakeVcpu(FakeVm({kvm.KVM_CAP_XSAVE: 1, kvm.KVM_CAP_XSAVE2: 8192}))
    vcpu.get_xsave2 = lambda size: b"\x01" * size
    state = kvm_state.save_vcpu(vcpu, [])
    assert state.xsave == b"\x01" * 8192
    assert "get_xsave" not in vcpu.calls


def test_save_without_optional_capabilities():
    vcpu = FakeVcpu(FakeVm({}))
    state = kvm_state.save_vcpu(vcpu, [])
    assert (state.xsave, state.xcrs, state.debugregs, state.tsc_khz) == (None, None, None, None)
    assert not {"get_xsave", "get_xcrs", "get_debugregs", "get_tsc_khz"} & set(vcpu.calls)


def test_save_refuses_an_msr_kvm_does_not_read():
    vcpu = FakeVcpu()
    vcpu.get_msrs = lambda indices: {i: 0 for i in indices[:1]}
    with pytest.raises(kvm.KvmError, match="read 1 of 2 MSRs, refused 0x6e0"):
        kvm_state.save_vcpu(vcpu, [0x10, 0x6E0])


def test_restore_order():
    state = sample_vcpu_state()
    vcpu = FakeVcpu(tsc_khz=state.tsc_khz)
    kvm_state.restore_vcpu(vcpu, state)
    sets = [c for c in vcpu.calls if c.startswith("set_")]
    assert sets == ["set_cpuid2", "set_sregs", "set_regs", "set_fpu", "set_xsave", "set_xcrs",
                    "set_debugregs", "set_lapic", "set_msrs", "set_mp_state", "set_vcpu_events"]
    # MSR_IA32_TSC and then MSR_IA32_TSC_DEADLINE come last, whatever the saved order
    assert vcpu.msr_writes == [[0xC0000082, 0x10, 0x6E0]]


def test_restore_sets_the_tsc_rate_only_when_it_differs():
    state = sample_vcpu_state()
    vcpu = FakeVcpu(tsc_khz=state.tsc_khz + 1000)
    kvm_state.restore_vcpu(vcpu, state)
    assert vcpu.calls.index("set_tsc_khz") < vcpu.calls.index("set_sregs")
    same = FakeVcpu(tsc_khz=state.tsc_khz)
    kvm_state.restore_vcpu(same, state)
    assert "set_tsc_khz" not in same.calls


def test_restore_reports_the_msr_kvm_refused():
    vcpu = FakeVcpu()
    vcpu.set_msrs = lambda msrs: 1
    state = sample_vcpu_state()
    with pytest.raises(kvm.KvmError, match="KVM_SET_MSRS refused MSR 0x10 = 0x123456789a"):
        kvm_state.restore_vcpu(vcpu, state)


def test_save_vm_and_restore_vm_order():
    vm = FakeVm()
    state = kvm_state.save_vm(vm)
    assert state.pic_master.imr == 0xF0 and state.pic_slave.imr == 0xF1 and state.ioapic.id == 0x77
    assert state.pit2.flags == 1 and state.clock.clock == 123456
    target = FakeVm()
    kvm_state.restore_vm(target, state)
    assert target.calls == ["set_irqchip 0", "set_irqchip 1", "set_irqchip 2", "set_pit2", "set_clock"]
    assert target.clock_set.clock == 123456 and target.clock_set.flags == 0


def test_save_vm_without_a_pit():
    vm = FakeVm({"nopit": 1})
    state = kvm_state.save_vm(vm)
    assert state.pit2 is None
    target = FakeVm()
    kvm_state.restore_vm(target, state)
    assert "set_pit2" not in target.calls


def test_complete_pending_io_sets_immediate_exit_once():
    vcpu = FakeVcpu()
    assert kvm_state.complete_pending_io(vcpu) == 0
    assert vcpu.immediate_exit_seen == [1]
    assert vcpu.kvm_run.immediate_exit == 0


def test_complete_pending_io_serves_further_exits():
    vcpu = FakeVcpu()
    vcpu.run_script = [kvm.KVM_EXIT_IO, kvm.KVM_EXIT_IO]
    served = []
    assert kvm_state.complete_pending_io(vcpu, served.append) == 2
    assert len(served) == 2 and vcpu.immediate_exit_seen == [1, 1, 1]
    vcpu.run_script = [kvm.KVM_EXIT_MMIO]
    with pytest.raises(RuntimeError, match="finishing pending I/O ended in KVM_EXIT_MMIO"):
        kvm_state.complete_pending_io(vcpu)
    assert vcpu.kvm_run.immediate_exit == 0


def test_mark_paused_is_false_without_kvmclock():
    class Vcpu:
        def __init__(self, err):
            self.err = err

        def kvmclock_ctrl(self):
            if self.err:
                raise kvm.KvmError(self.err, "x")

    assert kvm_state.mark_paused(Vcpu(None)) is True
    assert kvm_state.mark_paused(Vcpu(errno.EINVAL)) is False
    with pytest.raises(kvm.KvmError):
        kvm_state.mark_paused(Vcpu(errno.EBADF))



def test_restore_explains_a_refused_tsc_rate():
    state = sample_vcpu_state()
    vcpu = FakeVcpu(tsc_khz=state.tsc_khz + 1000)

    def refuse(khz):
        raise kvm.KvmError(errno.EINVAL, "Invalid argument")

    vcpu.set_tsc_khz = refuse
    with pytest.raises(kvm.KvmError, match="KVM_SET_TSC_KHZ 2596138 refused .*runs at 2597138 kHz"):
        kvm_state.restore_vcpu(vcpu, state)
