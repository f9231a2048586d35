"""Tiny guests paused, saved and restored with pyvmm.snapshot.kvm_state.

``Machine`` runs a tiny guest (tests/tinyguest.py) with its own KVM_RUN loop in
the calling thread, so that a test can stop it at an exact point: after the
Nth port or MMIO access it serves, or by a signal while the guest waits in
``hlt``.  ``save`` writes RAM and the KVM state of a paused machine to a
directory; run as a script, this module restores such a directory in a fresh
process, runs the guest to its end and writes what it saw to result.json.

Guests (all start in 64-bit long mode at CPL0, where PVM emulates them):

* ``compute-kernel``: a long mixing loop over general registers, XMM registers
  (moved with movdqu, the SSE instructions the PVM emulator runs) and a
  2 KiB table; every 64 rounds it writes a progress word to port 0x80 and
  reads port 0x82 (the value the VMM answers is folded into the result).
* ``compute-user``: the same loop at CPL3, where PVM runs the guest natively,
  with real SSE arithmetic (paddq, pxor, pshufd, movq) and a non-default
  MXCSR; progress goes out as MMIO writes because PVM forces IOPL 0 in user mode.
* ``timer-periodic`` / ``timer-deadline``: the local APIC timer (periodic, or
  TSC-deadline re-armed through MSR 0x6e0) wakes a ``sti; hlt`` loop; each
  tick is counted by the interrupt handler and reported on port 0x80 until
  TIMER_TICKS ticks.
* ``devices``: programs the in-kernel PIT (channels 0 and 2), both 8259 PICs
  (ICWs, masks, ELCR) and an IOAPIC redirection entry (its VM has a PIT).
* ``kvmclock``: enables kvmclock (MSR_KVM_SYSTEM_TIME_NEW) and reports the
  flags byte of its pvclock page PVCLOCK_REPORTS times.

The restoring side calls ``kvm_state.mark_paused`` (KVM_KVMCLOCK_CTRL) after the
restore, as a VMM resuming a paused guest would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyvmm import kvm  # noqa: E402
from pyvmm.boot import layout  # noqa: E402
from pyvmm.snapshot import kvm_state  # noqa: E402
from pyvmm.vcpu import KICK_SIGNAL, format_regs  # noqa: E402
from tinyguest import CODE_ADDR, ENTER_USER_MODE, RAM_SIZE, TinyVm, assemble  # noqa: E402

log = logging.getLogger(__name__)

PROGRESS_PORT = 0x80
QUESTION_PORT = 0x82
REPORT_MMIO = 0xD0000000      # compute-user: progress word
DONE_MMIO = 0xD0000008        # compute-user: the end
ROUNDS = 64 * 64              # compute guests: 64 progress reports
TIMER_VECTOR = 0x40
TIMER_PERIOD_NS = 2_000_000   # the LAPIC timer ticks at 1 GHz in KVM (APIC bus cycle 1 ns)
TIMER_TICKS = 10
DATA = 0x1000                 # offset of the data area from CODE_ADDR
RESULT = CODE_ADDR + DATA + 0x100   # 96 bytes of results, then the 2 KiB table
RESULT_SIZE = 96 + 2048
TICKS = RESULT + RESULT_SIZE        # the timer guests' tick counter
HANDLER = 0x400               # offset of the timer interrupt handler

_SEEDS = """
    .org {data}
seed:    .quad 0x0123456789abcdef, 0xfedcba9876543210, 0x0f1e2d3c4b5a6978, 0x8796a5b4c3d2e1f0
         .quad 0x1122334455667788, 0x99aabbccddeeff00
scratch: .quad 0, 0
mxcsr:   .long 0x7fa0             # round toward zero, precision exception masked and set
    .org {data} + 0x100
result:  .fill 96, 1, 0
table:   .fill 2048, 1, 0
ticks:   .long 0
"""

_ENABLE_SSE = """
        mov %cr4, %rax
        or $0x600, %rax              # CR4.OSFXSR | OSXMMEXCPT: SSE instructions allowed
        mov %rax, %cr4
"""

_MIX_SETUP = """
        movdqu seed(%rip), %xmm1
        movdqu seed+16(%rip), %xmm2
        movdqu seed+32(%rip), %xmm3
        mov ${rounds}, %ecx
        mov $0x243f6a8885a308d3, %rax
        mov $0x13198a2e03707344, %rbx
        mov $0x9e3779b97f4a7c15, %r8
        xor %r9, %r9
        lea table(%rip), %rsi
"""

_MIX_ROUND = """
        imul %r8, %rax
        add %rcx, %rax
        rol $13, %rax
        xor %rax, %rbx
        add %rbx, %r9
        mov %ecx, %edi
        and $255, %edi
        xor %rax, (%rsi,%rdi,8)
"""

_MIX_STORE = """
        mov %rax, result(%rip)
        mov %rbx, result+8(%rip)
        mov %r9, result+16(%rip)
        movdqu %xmm1, result+32(%rip)
        movdqu %xmm2, result+48(%rip)
        movdqu %xmm3, result+64(%rip)
"""

COMPUTE_KERNEL = _ENABLE_SSE + _MIX_SETUP + """
loop:""" + _MIX_ROUND + """
        mov %rax, scratch(%rip)
        mov %rbx, scratch+8(%rip)
        movdqu %xmm2, %xmm3          # xmm3 <- xmm2 <- xmm1 <- (rax, rbx)
        movdqu %xmm1, %xmm2
        movdqu scratch(%rip), %xmm1
        test $63, %ecx
        jnz 1f
        out %eax, ${progress}        # progress: the low half of rax
        mov %rax, %r10
        in ${question}, %eax         # the VMM's answer goes into the result
        add %rax, %r9
        mov %r10, %rax
1:      dec %ecx
        jnz loop
""" + _MIX_STORE + """
        mov $0, %al
        mov ${exit_port}, %dx
        out %al, %dx
"""

COMPUTE_USER = _ENABLE_SSE + ENTER_USER_MODE + """
user:
        ldmxcsr mxcsr(%rip)          # a non-default MXCSR, read back at the end""" + _MIX_SETUP + """
        mov ${report}, %r11d
loop:""" + _MIX_ROUND + """
        movq %rax, %xmm4
        paddq %xmm4, %xmm1
        pxor %xmm1, %xmm2
        pshufd $0x4e, %xmm2, %xmm5
        paddq %xmm5, %xmm3
        test $63, %ecx
        jnz 1f
        mov %eax, (%r11)             # progress: an MMIO write
1:      dec %ecx
        jnz loop
""" + _MIX_STORE + """
        stmxcsr result+80(%rip)
        movl $0, 8(%r11)             # done
2:      jmp 2b
"""

_TIMER_START = """
        mov $0xfee00000, %ebx        # the local APIC
        movl $0x1ff, 0xf0(%rbx)      # SVR: APIC on, spurious vector 0xff
        movl $0xb, 0x3e0(%rbx)       # TDCR: divide by 1
"""

_TIMER_WAIT = """
        sti
        hlt                          # the timer interrupt wakes us
        cli
        mov ticks(%rip), %eax
        out %eax, ${progress}
        cmp ${ticks}, %eax
        jb loop
        mov $0, %al
        mov ${exit_port}, %dx
        out %al, %dx
    .org {handler}
        incl ticks(%rip)
        movl $0, 0xb0(%rbx)          # EOI
        iretq
"""

TIMER_PERIODIC = _TIMER_START + """
        movl $0x{lvtt_periodic:x}, 0x320(%rbx)   # LVTT: periodic
        movl ${period}, 0x380(%rbx)  # TMICT
loop:""" + _TIMER_WAIT

TIMER_DEADLINE = _TIMER_START + """
        movl $0x{lvtt_deadline:x}, 0x320(%rbx)   # LVTT: TSC-deadline mode
loop:
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        add ${delta}, %rax
        mov %rax, %rdx
        shr $32, %rdx
        mov $0x6e0, %ecx             # IA32_TSC_DEADLINE
        wrmsr
""" + _TIMER_WAIT

KVMCLOCK = """
        mov $0x4b564d01, %ecx        # MSR_KVM_SYSTEM_TIME_NEW: pvclock page, enabled
        mov ${pvclock_enable}, %eax
        xor %edx, %edx
        wrmsr
        mov ${reports}, %r12d
1:      movzbl {pvclock_flags}, %eax # pvclock_vcpu_time_info.flags
        out %eax, ${progress}
        dec %r12d
        jnz 1b
        mov $0, %al
        mov ${exit_port}, %dx
        out %al, %dx
"""

DEVICES = """
        mov $0x34, %al               # PIT channel 0: lobyte/hibyte, mode 2
        out %al, $0x43
        mov $0x9c, %al               # count 11932 (100 Hz)
        out %al, $0x40
        mov $0x2e, %al
        out %al, $0x40
        mov $0xb6, %al               # PIT channel 2: lobyte/hibyte, mode 3
        out %al, $0x43
        mov $0x11, %al               # 8259 init: ICW1, vector base, cascade, 8086 mode
        out %al, $0x20
        out %al, $0xa0
        mov $0x20, %al
        out %al, $0x21
        mov $0x28, %al
        out %al, $0xa1
        mov $0x04, %al
        out %al, $0x21
        mov $0x02, %al
        out %al, $0xa1
        mov $0x01, %al
        out %al, $0x21
        out %al, $0xa1
        mov $0xfa, %al               # masks (OCW1)
        out %al, $0x21
        mov $0xbf, %al
        out %al, $0xa1
        mov $0x0c, %al               # ELCR: IRQ 10 and 11 level-triggered
        mov $0x4d1, %dx
        out %al, %dx
        mov $0xfec00000, %ebx        # IOAPIC pin 4: vector 0x31, level, masked, to APIC 3
        movl $0x18, (%rbx)
        movl $0x18031, 0x10(%rbx)
        movl $0x19, (%rbx)
        movl $0x03000000, 0x10(%rbx)
        out %al, ${progress}         # pause here
        mov $0, %al
        mov ${exit_port}, %dx
        out %al, %dx
"""

KINDS = {"compute-kernel": COMPUTE_KERNEL, "compute-user": COMPUTE_USER,
         "timer-periodic": TIMER_PERIODIC, "timer-deadline": TIMER_DEADLINE, "kvmclock": KVMCLOCK,
         "devices": DEVICES}
PVCLOCK = 0x18000             # kvmclock guest: its pvclock_vcpu_time_info (32 bytes)
PVCLOCK_REPORTS = 20


def guest_code(kind: str, tsc_khz: int = 0) -> bytes:
    source = ".org 0\n" + KINDS[kind] + _SEEDS
    values = dict(data=DATA, rounds=ROUNDS, progress=PROGRESS_PORT, question=QUESTION_PORT,
                  exit_port=layout.DEBUG_EXIT_PORT, report=REPORT_MMIO, ticks=TIMER_TICKS,
                  handler=HANDLER, period=TIMER_PERIOD_NS, delta=tsc_khz * TIMER_PERIOD_NS // 10**6,
                  lvtt_periodic=(1 << 17) | TIMER_VECTOR, lvtt_deadline=(2 << 17) | TIMER_VECTOR,
                  pvclock_enable=PVCLOCK | 1, pvclock_flags=PVCLOCK + 29, reports=PVCLOCK_REPORTS)
    return assemble(_fill(source, values))


def _fill(source: str, values: dict[str, int]) -> str:
    for name, value in values.items():
        source = source.replace("{" + name + "}", str(value)).replace(
            "{" + name + ":x}", f"{value:x}")
    return source


class Machine:
    """A tiny VM whose vCPU runs in the caller's thread, one KVM_RUN at a time."""

    def __init__(self, kind: str, code: bytes | None = None) -> None:
        self.kind = kind
        self.tiny = TinyVm(code if code is not None else guest_code(kind, _host_tsc_khz()))
        self.vcpu = self.tiny.thread.vcpu
        self.events: list[list] = []      # ["out", value] / ["in", n] / ["mmio", value]
        self.counts: dict[str, int] = {}  # events of each kind since boot: the "device state"
        self.times: list[float] = []      # monotonic time of each event
        self.status: int | None = None
        if kind.startswith("timer"):
            self.tiny.set_idt({TIMER_VECTOR: CODE_ADDR + HANDLER})
        if kind == "compute-user":
            self.tiny.allow_user_mode()
        if kind == "devices":
            self.tiny.vm.create_pit2(kvm.KVM_PIT_SPEAKER_DUMMY)

    def run(self, pause_after: tuple[str, int] | None = None, timeout: float = 20.0,
            kick_after: float | None = None) -> str:
        """Run until the guest ends ("exit"), until the ``pause_after`` = (kind, n)
        event has been served ("paused"), or until a kick ("interrupted"):
        ``kick_after`` seconds after that event (or after the start, without
        one), or at ``timeout``."""
        main = threading.get_ident()
        timers = [threading.Timer(timeout, self._kick, (main,))]
        if kick_after is not None and pause_after is None:
            timers.append(threading.Timer(kick_after, self._kick, (main,)))
        for t in timers:
            t.start()
        try:
            while True:
                self.vcpu.run()
                outcome = self._dispatch(pause_after)
                if outcome == "paused" and kick_after is not None:
                    pause_after = None
                    timers.append(threading.Timer(kick_after, self._kick, (main,)))
                    timers[-1].start()
                    continue
                if outcome is not None:
                    return outcome
        finally:
            for t in timers:
                t.cancel()
            self.vcpu.kvm_run.immediate_exit = 0

    def pause_halted(self, after_out: int, attempts: int = 50) -> None:
        """Run past the ``after_out``-th port write, then stop the vCPU while it
        sleeps in ``hlt`` (KVM_MP_STATE_HALTED), kicking it again if a kick
        landed while it was busy (a loaded host)."""
        outcome = self.run(pause_after=("out", after_out), kick_after=0.0005)
        for _ in range(attempts):
            if outcome != "interrupted":
                raise RuntimeError(f"{self.kind}: {outcome} before it could be paused in hlt")
            if self.vcpu.get_mp_state() == kvm.KVM_MP_STATE_HALTED:
                return
            outcome = self.run(kick_after=0.0005)
        raise RuntimeError(f"{self.kind}: never caught in hlt")

    def _kick(self, thread_id: int) -> None:
        self.vcpu.kvm_run.immediate_exit = 1
        signal.pthread_kill(thread_id, KICK_SIGNAL)

    def _dispatch(self, pause_after: tuple[str, int] | None) -> str | None:
        kvm_run = self.vcpu.kvm_run
        reason = kvm_run.exit_reason
        if reason == kvm.KVM_EXIT_INTR:
            return "interrupted"
        if reason == kvm.KVM_EXIT_IO:
            event = self._pio(kvm_run.exit.io)
        elif reason == kvm.KVM_EXIT_MMIO:
            event = self._mmio(kvm_run.exit.mmio)
        else:
            name = kvm.EXIT_REASON_NAMES.get(reason, str(reason))
            raise RuntimeError(f"{self.kind}: unexpected {name}\n{format_regs(self.vcpu)}")
        if self.status is not None:
            return "exit"
        if event is not None:
            self.events.append(event)
            self.times.append(time.monotonic())
            if pause_after and event[0] == pause_after[0] and self.counts[event[0]] == pause_after[1]:
                return "paused"
        return None

    def _count(self, what: str) -> int:
        self.counts[what] = self.counts.get(what, 0) + 1
        return self.counts[what]

    def _pio(self, io: kvm.kvm_run_io) -> list | None:
        data = self.vcpu.io_data()
        if io.direction == kvm.KVM_EXIT_IO_OUT:
            value = int.from_bytes(bytes(data), "little")
            if io.port == layout.DEBUG_EXIT_PORT:
                self.status = value & 0xFF
                return None
            self._count("out")
            return ["out", value]
        n = self._count("in")
        answer = (0x1000 + n) & ((1 << (8 * len(data))) - 1)
        data[:] = answer.to_bytes(len(data), "little")
        return ["in", n]

    def _mmio(self, mmio: kvm.kvm_run_mmio) -> list | None:
        value = int.from_bytes(bytes(mmio.data[:mmio.len]), "little")
        if not mmio.is_write:
            mmio.data[:8] = b"\xff" * 8
            return ["mmio-read", mmio.phys_addr]
        if mmio.phys_addr == DONE_MMIO:
            self.status = value & 0xFF
            return None
        self._count("mmio")
        return ["mmio", value]

    def result(self) -> dict:
        regs = self.vcpu.get_regs()
        return {"status": self.status, "events": self.events,
                "memory": self.tiny.mem.read(RESULT, RESULT_SIZE).hex(),
                "ticks": int.from_bytes(self.tiny.mem.read(TICKS, 4), "little"),
                "pvclock": self.tiny.mem.read(PVCLOCK, 32).hex(),
                "rip": regs.rip}

    def close(self) -> None:
        self.vcpu.close()
        self.tiny.mem.close()
        self.tiny.vm.close()
        self.tiny.kvm.close()


def _host_tsc_khz() -> int:
    """The guest TSC rate KVM gives a new vCPU (for the TSC-deadline guest)."""
    k = kvm.Kvm()
    try:
        vm = k.create_vm()
        try:
            vm.create_irqchip()
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()
    finally:
        k.close()


# --- save and restore --------------------------------------------------------------------
def save(machine: Machine, directory: Path, msrs: list[int]) -> dict[str, float]:
    """RAM, vCPU and VM state of a paused machine into ``directory``; timings in ms."""
    t0 = time.perf_counter()
    kvm_state.complete_pending_io(machine.vcpu)
    t1 = time.perf_counter()
    vcpu_state = kvm_state.save_vcpu(machine.vcpu, msrs)
    t2 = time.perf_counter()
    vm_state = kvm_state.save_vm(machine.tiny.vm)
    t3 = time.perf_counter()
    (directory / "ram.bin").write_bytes(machine.tiny.mem.read(0, RAM_SIZE))
    (directory / "vcpu.json").write_text(json.dumps(vcpu_state.to_json(), indent=1))
    (directory / "vm.json").write_text(json.dumps(vm_state.to_json(), indent=1))
    (directory / "meta.json").write_text(json.dumps({"kind": machine.kind, "counts": machine.counts}))
    t4 = time.perf_counter()
    return {"complete_io_ms": (t1 - t0) * 1e3, "save_vcpu_ms": (t2 - t1) * 1e3,
            "save_vm_ms": (t3 - t2) * 1e3, "write_files_ms": (t4 - t3) * 1e3}


def restore(directory: Path) -> tuple[Machine, dict[str, float]]:
    """A new machine from ``save``'s directory, ready to run; timings in ms."""
    t0 = time.perf_counter()
    meta = json.loads((directory / "meta.json").read_text())
    vcpu_state = kvm_state.VcpuState.from_json(json.loads((directory / "vcpu.json").read_text()))
    vm_state = kvm_state.VmState.from_json(json.loads((directory / "vm.json").read_text()))
    t1 = time.perf_counter()
    machine = Machine(meta["kind"], code=b"\xf4")   # the code comes back with the RAM
    machine.counts = dict(meta["counts"])
    t2 = time.perf_counter()
    machine.tiny.mem.write(0, (directory / "ram.bin").read_bytes())
    t3 = time.perf_counter()
    kvm_state.restore_vcpu(machine.vcpu, vcpu_state)
    t4 = time.perf_counter()
    kvm_state.restore_vm(machine.tiny.vm, vm_state)
    t5 = time.perf_counter()
    paused_flag = kvm_state.mark_paused(machine.vcpu)
    return machine, {"parse_ms": (t1 - t0) * 1e3, "new_vm_ms": (t2 - t1) * 1e3,
                     "ram_ms": (t3 - t2) * 1e3, "restore_vcpu_ms": (t4 - t3) * 1e3,
                     "restore_vm_ms": (t5 - t4) * 1e3, "kvmclock_ctrl": paused_flag}


def main(argv: list[str]) -> int:
    """Child process: restore ``argv[0]``, run to the end, write result.json there."""
    logging.basicConfig(level=logging.INFO)
    started = time.perf_counter()
    directory = Path(argv[0])
    machine, timings = restore(directory)
    restored = time.perf_counter()
    saved_again = kvm_state.save_vcpu(machine.vcpu, _msr_list(directory)).to_json()
    outcome = machine.run(timeout=20.0)
    result = machine.result()
    result.update(outcome=outcome, timings=timings, restore_total_ms=(restored - started) * 1e3,
                  resaved=saved_again, times=machine.times,
                  first_event_after_ms=((machine.times[0] - restored) * 1e3 if machine.times else None))
    (directory / "result.json").write_text(json.dumps(result))
    log.info("restored in %.1f ms (%s), then %s after %d events", result["restore_total_ms"],
             ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if isinstance(v, float)),
             outcome, len(machine.events))
    machine.close()
    return 0


def _msr_list(directory: Path) -> list[int]:
    return [int(i, 16) for i in json.loads((directory / "vcpu.json").read_text())["msrs"]]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
