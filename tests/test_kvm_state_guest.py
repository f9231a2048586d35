"""Save a running tiny guest's KVM state and resume it in a new process.

The guests and the save/restore steps are in tests/kvmstate_guests.py.  A
guest is paused at an exact point, its pending I/O completed, RAM and KVM
state saved to a directory; a child process (a fresh interpreter, a fresh VM)
restores it and runs it to the end, and the test compares what the guest
computed and reported with an uninterrupted run.

What these measured on the PVM host (kvm_pvm, 6.18) is noted at each test.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm import kvm
from pyvmm.snapshot import kvm_state

import kvmstate_guests as guests

pytestmark = pytest.mark.kvm
log = logging.getLogger(__name__)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
APIC_SVR, APIC_LVTT, APIC_TMICT, APIC_TMCCT, APIC_TDCR = 0xF0, 0x320, 0x380, 0x390, 0x3E0


@pytest.fixture(scope="module")
def msrs(kvm_host) -> list[int]:
    k = kvm.Kvm()
    try:
        return kvm_state.msr_indices(k)
    finally:
        k.close()


@pytest.fixture
def machines(kvm_host):
    made = []

    def make(kind: str, code: bytes | None = None) -> guests.Machine:
        m = guests.Machine(kind, code)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def uninterrupted(make, kind: str) -> dict:
    m = make(kind)
    assert m.run() == "exit"
    return m.result()


def restore_in_new_process(directory: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(TESTS / "kvmstate_guests.py"), str(directory)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"child failed:\n{proc.stderr[-4000:]}"
    result = json.loads((directory / "result.json").read_text())
    result["child_wall_ms"] = (time.perf_counter() - started) * 1e3
    return result


def lapic_reg(lapic_hex: str, offset: int) -> int:
    return int.from_bytes(bytes.fromhex(lapic_hex)[offset:offset + 4], "little")


def json_diff(a, b, path: str = "") -> list[str]:
    """Paths (and for blobs, byte offsets) where two to_json() dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(a.keys() | b.keys())
        return [d for k in keys for d in json_diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_diff(x, y, f"{path}[{i}]")]
    if isinstance(a, str) and isinstance(b, str) and len(a) == len(b) > 64:
        return [f"{path}@{i // 2:#x}" for i in range(0, len(a), 2) if a[i:i + 2] != b[i:i + 2]]
    return [] if a == b else [path]


# --- complete_pending_io -------------------------------------------------------------------
def test_complete_pending_io_finishes_in_and_out(machines, kvm_host):
    """After KVM_EXIT_IO the instruction is finished by the next KVM_RUN; with
    immediate_exit that KVM_RUN runs no further guest instruction.

    Measured on PVM (CPL0 code is emulated): at the exit of an ``out`` RIP is
    already past it (the emulator wrote it back), and completion leaves it there;
    at the exit of an ``in`` RIP is still at the ``in`` and AL is unchanged,
    completion stores the data into AL and moves RIP past it.  (On VMX/SVM the
    fast ``out`` path also moves RIP only on completion.)
    """
    code = guests.assemble(""".org 0
        mov $0x1234, %eax
        out %al, $0x80                   # at 5
        in $0x82, %al                    # at 7
        out %al, $0x80                   # at 9
        mov $0, %al
        mov $0x501, %dx
        out %al, %dx
    """)
    m = machines("compute-kernel", code)
    assert m.run(pause_after=("out", 1)) == "paused"
    rip_at_out_exit = m.vcpu.get_regs().rip - guests.CODE_ADDR
    assert kvm_state.complete_pending_io(m.vcpu) == 0
    assert m.vcpu.get_regs().rip - guests.CODE_ADDR == 7
    assert m.run(pause_after=("in", 1)) == "paused"
    regs = m.vcpu.get_regs()
    rip_at_in_exit, al_at_in_exit = regs.rip - guests.CODE_ADDR, regs.rax & 0xFF
    kvm_state.complete_pending_io(m.vcpu)
    regs = m.vcpu.get_regs()
    assert (regs.rip - guests.CODE_ADDR, regs.rax) == (9, 0x1201)   # the VMM answered 0x1001
    log.info("KVM flavour %s: RIP at the exit of out %#x, of in %#x (AL %#x)",
             kvm_host, rip_at_out_exit, rip_at_in_exit, al_at_in_exit)
    if kvm_host == "pvm":
        assert (rip_at_out_exit, rip_at_in_exit, al_at_in_exit) == (7, 7, 0x34)
    # and the guest goes on from there
    assert m.run() == "exit" and m.status == 0
    assert m.events == [["out", 0x34], ["in", 1], ["out", 0x01]]


# --- the state round trip, ioctl by ioctl --------------------------------------------------
# Fields that legitimately differ when a saved state is restored into a fresh vCPU and
# read back at once: time moves on.  Anything else differing is a lossy ioctl.
TIME_FIELDS = {".msrs.0x10",                    # MSR_IA32_TSC (see the PVM note below)
               ".lapic.regs@0x390", ".lapic.regs@0x391", ".lapic.regs@0x392", ".lapic.regs@0x393"}


@pytest.mark.parametrize("kind, pause_after", [
    ("compute-kernel", ("out", 20)),
    ("compute-kernel", ("in", 20)),
    ("compute-user", ("mmio", 20)),
    ("timer-periodic", ("out", 3)),
    ("timer-deadline", None),                    # halted, TSC deadline armed
], ids=["kernel-out", "kernel-in", "user-mmio", "timer-periodic", "timer-deadline-halted"])
def test_every_ioctl_round_trips(machines, msrs, kvm_host, kind, pause_after):
    """save -> restore into a fresh VM -> save: the same state, apart from time.

    Measured on PVM: every GET/SET pair is accepted and gives back what was set,
    except MSR_IA32_TSC: KVM_SET_MSRS takes it (returns 1) but the guest TSC stays
    the host's TSC, so after a restore the guest sees the host's TSC, not the saved
    one.  The LAPIC current count (TMCCT) counts down between the save and the
    second read (KVM re-arms the timer from it); kvmclock moves on too.
    """
    m = machines(kind)
    if pause_after:
        assert m.run(pause_after=pause_after) == "paused"
    else:
        m.pause_halted(after_out=3)
    kvm_state.complete_pending_io(m.vcpu)
    saved, saved_vm = kvm_state.save_vcpu(m.vcpu, msrs), kvm_state.save_vm(m.tiny.vm)
    fresh = machines(kind, code=b"\xf4")
    fresh.tiny.mem.write(0, m.tiny.mem.read(0, guests.RAM_SIZE))
    kvm_state.restore_vcpu(fresh.vcpu, kvm_state.VcpuState.from_json(saved.to_json()))
    kvm_state.restore_vm(fresh.tiny.vm, kvm_state.VmState.from_json(saved_vm.to_json()))
    again, again_vm = kvm_state.save_vcpu(fresh.vcpu, msrs), kvm_state.save_vm(fresh.tiny.vm)

    diffs = set(json_diff(saved.to_json(), again.to_json()))
    assert diffs <= TIME_FIELDS, f"lost in the round trip: {sorted(diffs - TIME_FIELDS)}"
    vm_diffs = set(json_diff(saved_vm.to_json(), again_vm.to_json()))
    assert vm_diffs <= {".clock.clock", ".clock.realtime", ".clock.host_tsc", ".clock.flags"}
    # kvmclock goes on from the saved value: it differs by the time between the reads
    assert 0 <= again_vm.clock.clock - saved_vm.clock.clock < 5_000_000_000
    tsc_before, tsc_after = saved.msrs[kvm_state.MSR_IA32_TSC], again.msrs[kvm_state.MSR_IA32_TSC]
    log.info("%s: TSC saved %#x, read back after restore %#x; LAPIC/clock diffs %s",
             kind, tsc_before, tsc_after, sorted(diffs | vm_diffs))
    if kind == "timer-deadline":
        assert saved.mp_state == again.mp_state == kvm.KVM_MP_STATE_HALTED
        assert saved.msrs[kvm_state.MSR_IA32_TSC_DEADLINE] != 0
    # and the restored guest runs to its end
    assert fresh.run() == "exit" and fresh.status == 0


def test_guest_tsc_follows_the_host_on_pvm(machines, kvm_host):
    """The finding behind TIME_FIELDS, on its own: KVM_SET_MSRS(MSR_IA32_TSC)."""
    m = machines("compute-kernel", code=b"\xf4")
    accepted = m.vcpu.set_msrs({kvm_state.MSR_IA32_TSC: 0x1000})
    read_back = m.vcpu.get_msrs([kvm_state.MSR_IA32_TSC])[kvm_state.MSR_IA32_TSC]
    assert accepted == 1
    log.info("KVM flavour %s: TSC set to 0x1000, reads %#x", kvm_host, read_back)
    if kvm_host == "pvm":
        assert read_back > 1 << 32            # the host's TSC, many seconds of cycles
    else:
        assert read_back < 1 << 40


def test_tsc_deadline_needs_the_lapic_first(machines, kvm_host):
    """Why restore_vcpu sets the LAPIC before the MSRs: with the LAPIC timer not in
    TSC-deadline mode, KVM drops a write of MSR_IA32_TSC_DEADLINE (measured here)."""
    m = machines("timer-deadline")
    m.pause_halted(after_out=2)
    kvm_state.complete_pending_io(m.vcpu)
    deadline = m.vcpu.get_msrs([kvm_state.MSR_IA32_TSC_DEADLINE])[kvm_state.MSR_IA32_TSC_DEADLINE]
    assert deadline != 0
    fresh = machines("timer-deadline", code=b"\xf4")
    fresh.vcpu.set_msrs({kvm_state.MSR_IA32_TSC_DEADLINE: deadline})   # LAPIC still in reset state
    dropped = fresh.vcpu.get_msrs([kvm_state.MSR_IA32_TSC_DEADLINE])[kvm_state.MSR_IA32_TSC_DEADLINE]
    fresh.vcpu.set_lapic(m.vcpu.get_lapic())
    fresh.vcpu.set_msrs({kvm_state.MSR_IA32_TSC_DEADLINE: deadline})
    kept = fresh.vcpu.get_msrs([kvm_state.MSR_IA32_TSC_DEADLINE])[kvm_state.MSR_IA32_TSC_DEADLINE]
    assert (dropped, kept) == (0, deadline)


# --- pause here, finish in a new process ---------------------------------------------------
@pytest.mark.parametrize("kind, pause_after", [
    ("compute-kernel", ("out", 20)),
    ("compute-kernel", ("in", 20)),
    ("compute-user", ("mmio", 20)),
], ids=["kernel-after-out", "kernel-after-in", "user-after-mmio"])
def test_paused_guest_finishes_in_a_new_process(machines, msrs, tmp_path, kind, pause_after):
    """The restored guest reports and computes exactly what an uninterrupted run does:
    the progress reports after the snapshot continue the ones before it (none lost,
    none repeated), and the registers (general and XMM), the table in RAM and the
    answers to its port reads end up the same."""
    reference = uninterrupted(machines, kind)
    m = machines(kind)
    assert m.run(pause_after=pause_after) == "paused"
    timings = guests.save(m, tmp_path, msrs)
    before = list(m.events)
    assert 0 < len(before) < len(reference["events"])
    result = restore_in_new_process(tmp_path)
    assert result["outcome"] == "exit" and result["status"] == 0
    assert before + result["events"] == reference["events"]
    assert result["memory"] == reference["memory"]
    if kind == "compute-user":   # the guest's own MXCSR came back (stmxcsr at the end)
        assert int.from_bytes(bytes.fromhex(result["memory"])[80:84], "little") == 0x7FA0
    log.info("%s: save %s, restore %s, child %.0f ms", kind,
             {k: round(v, 2) for k, v in timings.items()},
             {k: round(v, 2) for k, v in result["timings"].items()}, result["child_wall_ms"])


@pytest.mark.parametrize("kind", ["timer-periodic", "timer-deadline"])
@pytest.mark.parametrize("pause", ["after-out", "halted"])
def test_lapic_timer_survives_a_new_process(machines, msrs, tmp_path, kind, pause):
    """A guest that sleeps in ``sti; hlt`` until the LAPIC timer fires (periodic,
    or TSC-deadline re-armed through the MSR) gets its ticks again after a restore
    in a new process: the same timer set-up, and (halted) the same MP state and
    the armed deadline, without which it would sleep forever."""
    m = machines(kind)
    if pause == "halted":
        m.pause_halted(after_out=3)
    else:
        assert m.run(pause_after=("out", 3)) == "paused"
    guests.save(m, tmp_path, msrs)
    saved = json.loads((tmp_path / "vcpu.json").read_text())
    if pause == "halted":
        assert saved["mp_state"] == "HALTED"
    result = restore_in_new_process(tmp_path)
    assert result["outcome"] == "exit" and result["status"] == 0, result
    assert result["ticks"] >= guests.TIMER_TICKS
    # the tick counts reported go on from where they were (a busy host may merge two ticks)
    reported = [value for _, value in m.events + result["events"]]
    assert reported[0] == 1 and reported[-1] >= guests.TIMER_TICKS, reported
    assert reported == sorted(set(reported)), reported
    resaved = result["resaved"]
    for reg in (APIC_SVR, APIC_LVTT, APIC_TMICT, APIC_TDCR):
        assert lapic_reg(resaved["lapic"]["regs"], reg) == lapic_reg(saved["lapic"]["regs"], reg), hex(reg)
    assert resaved["mp_state"] == saved["mp_state"]
    if kind == "timer-deadline" and pause == "halted":
        assert resaved["msrs"]["0x6e0"] == saved["msrs"]["0x6e0"] != "0x0"
    # ticks come at the programmed period again after the restore
    gaps = sorted((b - a) * 1e3 for a, b in zip(result["times"], result["times"][1:]))
    assert gaps and 1.0 < gaps[len(gaps) // 2] < 20.0, gaps
    log.info("%s/%s: first tick %.2f ms after the restore, then every %s ms", kind, pause,
             result["first_event_after_ms"], [round(g, 2) for g in gaps])


def _pvclock(hex_page: str) -> tuple[int, int]:
    """(system_time, flags) of a pvclock_vcpu_time_info (Documentation/virt/kvm/x86/msr.rst)."""
    page = bytes.fromhex(hex_page)
    return int.from_bytes(page[16:24], "little"), page[29]


PVCLOCK_TSC_STABLE_BIT, PVCLOCK_GUEST_STOPPED = 1 << 0, 1 << 1


def test_kvmclock_goes_on_from_the_saved_time(machines, msrs, tmp_path):
    """A guest with kvmclock enabled, restored a second after it was saved: its
    kvmclock continues from the saved value (KVM_SET_CLOCK without
    KVM_CLOCK_REALTIME), not a second later, and KVM_KVMCLOCK_CTRL (mark_paused)
    raises PVCLOCK_GUEST_STOPPED in the guest's pvclock page.  Both measured on PVM."""
    m = machines("kvmclock")
    assert m.run(pause_after=("out", 5)) == "paused"
    assert all(value & PVCLOCK_GUEST_STOPPED == 0 for _, value in m.events)
    guests.save(m, tmp_path, msrs)
    saved_clock = int(json.loads((tmp_path / "vm.json").read_text())["clock"]["clock"], 16)
    time.sleep(1.0)
    result = restore_in_new_process(tmp_path)
    assert result["outcome"] == "exit" and result["status"] == 0
    assert result["timings"]["kvmclock_ctrl"] is True
    assert len(m.events) + len(result["events"]) == guests.PVCLOCK_REPORTS
    assert any(value & PVCLOCK_GUEST_STOPPED for _, value in result["events"]), result["events"]
    system_time, _ = _pvclock(result["pvclock"])
    assert 0 <= system_time - saved_clock < 500_000_000, (saved_clock, system_time)
    log.info("kvmclock: saved %.3f ms, guest pvclock after the restore %.3f ms (1 s of wall time later)",
             saved_clock / 1e6, system_time / 1e6)


def test_mark_paused_needs_kvmclock(machines):
    """KVM_KVMCLOCK_CTRL is refused (EINVAL) until the guest enables kvmclock."""
    m = machines("compute-kernel", code=b"\xf4")
    assert kvm_state.mark_paused(m.vcpu) is False
    assert m.vcpu.set_msrs({0x4B564D01: guests.PVCLOCK | 1}) == 1
    assert kvm_state.mark_paused(m.vcpu) is True


def test_vm_devices_round_trip(machines):
    """PIT, PICs and IOAPIC as a guest programmed them: save_vm -> restore_vm into a
    fresh VM -> save_vm gives them back, apart from kvmclock and the PIT channels'
    count_load_time (host time at which KVM_SET_PIT2 reloaded the counts)."""
    m = machines("devices")
    assert m.run(pause_after=("out", 1)) == "paused"
    kvm_state.complete_pending_io(m.vcpu)
    saved = kvm_state.save_vm(m.tiny.vm)
    ch0 = saved.pit2.channels[0]
    assert (ch0.count, ch0.mode, ch0.rw_mode, saved.pit2.channels[2].mode) == (11932, 2, 3, 3)
    assert (saved.pic_master.imr, saved.pic_master.irq_base, saved.pic_slave.imr,
            saved.pic_slave.irq_base, saved.pic_slave.elcr) == (0xFA, 0x20, 0xBF, 0x28, 0x0C)
    assert saved.ioapic.redirtbl[4].bits == 0x0300000000018031
    fresh = machines("devices", code=b"\xf4")
    kvm_state.restore_vm(fresh.tiny.vm, kvm_state.VmState.from_json(saved.to_json()))
    diffs = set(json_diff(saved.to_json(), kvm_state.save_vm(fresh.tiny.vm).to_json()))
    allowed = {".clock.clock", ".clock.realtime", ".clock.host_tsc", ".clock.flags"} | {
        f".pit2.channels[{i}].count_load_time" for i in range(3)}
    assert diffs <= allowed, sorted(diffs - allowed)


def test_fpu_ioctl_loses_mxcsr_xsave_keeps_it(machines, msrs, kvm_host):
    """Why restore_vcpu sets XSAVE after FPU: a user-mode guest sets MXCSR to 0x7fa0.
    Measured on PVM: KVM_GET_FPU reports mxcsr 0 (so a restore from the FPU state
    alone gives the guest the default 0x1f80), the XSAVE area has 0x7fa0, and the
    full restore gives the guest its own MXCSR back."""
    code = guests.assemble(".org 0\n" + guests._ENABLE_SSE + guests.ENTER_USER_MODE + """
    user:
        mov $0xd0000000, %r11d
        ldmxcsr mx(%rip)
        movl $1, (%r11)              # paused here
        stmxcsr mx(%rip)
        mov mx(%rip), %eax
        mov %eax, (%r11)             # report MXCSR
        movl $0, 8(%r11)
    2:  jmp 2b
    .org 0x800
    mx: .long 0x7fa0
    """)

    def resumed_mxcsr(drop_xsave: bool) -> tuple[int, int]:
        m = machines("compute-user", code)
        assert m.run(pause_after=("mmio", 1)) == "paused"
        kvm_state.complete_pending_io(m.vcpu)
        state = kvm_state.save_vcpu(m.vcpu, msrs)
        xsave_mxcsr = int.from_bytes(state.xsave[24:28], "little")
        if drop_xsave:
            state.xsave = None
        fresh = machines("compute-user", code=b"\xf4")
        fresh.tiny.mem.write(0, m.tiny.mem.read(0, guests.RAM_SIZE))
        kvm_state.restore_vcpu(fresh.vcpu, state)
        fresh.counts = dict(m.counts)
        assert fresh.run() == "exit"
        return state.fpu.mxcsr, xsave_mxcsr, fresh.events[-1][1]

    fpu_mxcsr, xsave_mxcsr, seen = resumed_mxcsr(drop_xsave=False)
    assert (xsave_mxcsr, seen) == (0x7FA0, 0x7FA0)
    _, _, seen_without_xsave = resumed_mxcsr(drop_xsave=True)
    log.info("KVM flavour %s: KVM_GET_FPU mxcsr %#x; guest MXCSR after an FPU-only restore %#x",
             kvm_host, fpu_mxcsr, seen_without_xsave)
    if kvm_host == "pvm":
        assert (fpu_mxcsr, seen_without_xsave) == (0, 0x1F80)


def test_xsave2_gives_the_same_area(machines):
    """KVM_GET_XSAVE2 with KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes (4096 on this host,
    so save_vcpu uses KVM_GET_XSAVE) returns what KVM_GET_XSAVE does."""
    m = machines("compute-user")
    assert m.run(pause_after=("mmio", 3)) == "paused"
    kvm_state.complete_pending_io(m.vcpu)
    size = m.tiny.vm.xsave_size()
    assert size >= kvm.XSAVE_LEGACY_SIZE
    assert m.vcpu.get_xsave2(size)[:kvm.XSAVE_LEGACY_SIZE] == bytes(m.vcpu.get_xsave())


def test_tsc_rate_without_tsc_scaling(machines):
    """KVM_SET_TSC_KHZ where KVM_CAP_TSC_CONTROL is 0 (as on this PVM host): the
    vCPU's own rate is accepted, a lower one is refused with EINVAL, a higher one
    is accepted (KVM then emulates it by catching the TSC up)."""
    m = machines("compute-kernel", code=b"\xf4")
    if m.tiny.vm.check_extension(kvm.KVM_CAP_TSC_CONTROL) > 0:
        pytest.skip("this host can scale the TSC")
    khz = m.vcpu.get_tsc_khz()
    m.vcpu.set_tsc_khz(khz)
    with pytest.raises(kvm.KvmError) as refused:
        m.vcpu.set_tsc_khz(khz * 99 // 100)
    assert refused.value.errno == errno.EINVAL
    m.vcpu.set_tsc_khz(khz * 101 // 100)
    assert m.vcpu.get_tsc_khz() == khz * 101 // 100
