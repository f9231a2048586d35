"""The vCPU run loop: one thread per vCPU, KVM_RUN and exit dispatch.

Each thread calls KVM_RUN (which releases the GIL: it is a ctypes call) and,
when KVM hands an exit back to user space, dispatches it:

* KVM_EXIT_IO / KVM_EXIT_MMIO -> the port-I/O or MMIO bus;
* KVM_EXIT_INTERNAL_ERROR with an emulation failure -> ``fixup_instruction`` finishes the
  few instructions the PVM flavour's emulator cannot (int3, int1, INT n, fwait)
  or the VM stops with the instruction bytes and registers;
* KVM_EXIT_SHUTDOWN (triple fault) -> register dump, the guest died (exit 101);
* KVM_EXIT_FAIL_ENTRY -> register dump, exit 1;
* KVM_EXIT_SYSTEM_EVENT -> guest shutdown/reset: ``on_guest_end`` (the machine
  decides: 0, or "died" when the guest was asked to run a program first);
* KVM_EXIT_INTR -> another thread kicked us (stop, or a register-dump request);
* KVM_EXIT_DEBUG -> a breakpoint or step of the GDB stub (``debugger``,
  pyvmm.gdbstub), which also sees emulation failures first: on PVM an
  ``int3`` at one of GDB's breakpoints comes back as one;
* KVM_RUN failing with EFAULT -> the guest touched guest-physical memory whose
  host mapping cannot serve the access (e.g. a store into a read-only part of a
  DAX window).  The guest gets a #GP(0), as a bus error on real hardware would
  be delivered, and the VM goes on; the same fault repeating without progress
  stops the VM with a register dump.

With --stats or --trace (or an info log) a ``pyvmm.trace.VcpuWatch`` counts and
traces the exits around ``_dispatch``; the thread picks the watched or the
plain dispatch once, when it starts.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from typing import TYPE_CHECKING, Callable

from . import kvm
from .bus import Bus
from .status import ExitStatus

if TYPE_CHECKING:
    from .gdbstub.debugger import GuestDebugger
    from .kvm import Vcpu
    from .profile import VcpuSamples
    from .trace import VcpuWatch

log = logging.getLogger(__name__)

# The signal that kicks a vCPU thread out of KVM_RUN (EINTR).  Python installs
# its handler without SA_RESTART, so the ioctl returns instead of restarting.
KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a do-nothing handler (main thread only; Machine.run does it
    itself when it runs in the main thread)."""
    signal.signal(KICK_SIGNAL, lambda *_: None)

# Instruction bytes the VMM knows how to finish (PVM: docs/pvm.md).
OPCODE_INT3 = 0xCC
OPCODE_INT1 = 0xF1   # ICEBP
OPCODE_INT_N = 0xCD
OPCODE_FWAIT = 0x9B
BP_VECTOR = 3        # #BP
DB_VECTOR = 1        # #DB
GP_VECTOR = 13       # #GP
MAX_FAULT_REPEATS = 64  # EFAULTs in a row at one RIP before the VM is stopped


class VmExit(Exception):
    """Raised inside a vCPU thread to end the VM with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class GuestEnded(Exception):
    """Raised inside a vCPU thread when the guest powers off, resets or halts for good."""


def format_regs(vcpu: "Vcpu") -> str:
    """A register dump for logs and error reports."""
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except OSError as e:
        return f"vcpu{vcpu.index}: registers unavailable ({e})"
    g = [f"{n.upper():>3}={getattr(r, n):016x}" for n, _ in kvm.kvm_regs._fields_]
    lines = [f"vcpu{vcpu.index} registers:"]
    lines += ["  " + " ".join(g[i:i + 4]) for i in range(0, len(g), 4)]
    lines.append(f"  CR0={s.cr0:016x} CR2={s.cr2:016x} CR3={s.cr3:016x} CR4={s.cr4:016x}")
    lines.append(f"  EFER={s.efer:016x} APIC_BASE={s.apic_base:016x}")
    for name in ("cs", "ds", "ss", "tr"):
        seg = getattr(s, name)
        lines.append(f"  {name.upper()}: sel={seg.selector:04x} base={seg.base:016x} "
                     f"limit={seg.limit:08x} type={seg.type:x} dpl={seg.dpl} l={seg.l} db={seg.db}")
    lines.append(f"  GDT={s.gdt.base:016x}/{s.gdt.limit:x} IDT={s.idt.base:016x}/{s.idt.limit:x}")
    return "\n".join(lines)


def fixup_instruction(vcpu: "Vcpu", insn: bytes) -> str | None:
    """Finish an instruction KVM's emulator gave up on; its name, or None.

    int3/int1: advance RIP past it and inject the exception (#BP/#DB) as
    injected, so the guest's handler sees the trap frame a real CPU would
    push.  INT n: advance by 2 and inject a software interrupt.  fwait: a no-op
    without pending x87 exceptions, so skip it.
    """
    if not insn:
        return None
    op = insn[0]
    if op == OPCODE_FWAIT:
        _advance_rip(vcpu, 1)
        return "fwait"
    if op in (OPCODE_INT3, OPCODE_INT1):
        _advance_rip(vcpu, 1)
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = BP_VECTOR if op == OPCODE_INT3 else DB_VECTOR
        events.exception.has_error_code = 0
        events.exception.pending = 0
        events.flags = 0
        vcpu.set_vcpu_events(events)
        return "int3" if op == OPCODE_INT3 else "int1"
    if op == OPCODE_INT_N and len(insn) >= 2:
        _advance_rip(vcpu, 2)
        events = vcpu.get_vcpu_events()
        events.interrupt.injected = 1
        events.interrupt.nr = insn[1]
        events.interrupt.soft = 1
        events.flags = 0
        vcpu.set_vcpu_events(events)
        return f"int {insn[1]:#x}"
    return None


def _advance_rip(vcpu: "Vcpu", n: int) -> None:
    regs = vcpu.get_regs()
    regs.rip += n
    vcpu.set_regs(regs)


class VcpuThread:
    """Runs one vCPU until the VM stops."""

    def __init__(self, vcpu: "Vcpu", pio: Bus, mmio: Bus,
                 on_exit: Callable[[int, str], None], stopping: threading.Event,
                 on_guest_end: Callable[[str], None] | None = None,
                 watch: "VcpuWatch | None" = None) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.on_exit = on_exit
        # A guest that ends by itself (power-off, reset, halt): exit 0 unless the
        # machine says otherwise (see Machine.guest_ended).
        self.on_guest_end = on_guest_end or (lambda reason: on_exit(ExitStatus.OK, reason))
        self.stopping = stopping
        self.dump_requested = threading.Event()
        # Pausing (snapshots): request_pause() -> the thread finishes the exit in hand and
        # any pending I/O, sets `paused`, and waits until resume() or the VM stops.
        self.pause_requested = threading.Event()
        self.paused = threading.Event()
        self.fixups: dict[str, int] = {}
        # --gdb: debug exits, and breakpoint int3s on PVM (pyvmm.gdbstub.debugger)
        self.debugger: GuestDebugger | None = None
        self.exits = 0
        self.memory_faults = 0
        # --stats/--trace (pyvmm.trace): counts and traces exits; None: the plain loop.
        self.watch = watch
        # --profile (pyvmm.profile): RIP samples, taken when a sampler's kick lands.
        self.samples: VcpuSamples | None = None
        self.sample_requested = threading.Event()
        self._fault_rip: int | None = None
        self._fault_repeats = 0
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return soon: immediate_exit for the next entry, a signal for now."""
        self.vcpu.kvm_run.immediate_exit = 1
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def request_dump(self) -> None:
        self.dump_requested.set()
        self.kick()

    def request_sample(self) -> None:
        """--profile: count the guest's RIP once the kick brings the thread out of KVM_RUN."""
        self.sample_requested.set()
        self.kick()

    def request_pause(self) -> None:
        """Ask the thread to park out of KVM_RUN with its vCPU state complete (see ``paused``)."""
        self.pause_requested.set()
        self.kick()

    def resume(self) -> None:
        self.pause_requested.clear()

    def _park(self) -> None:
        """Paused: KVM finishes the instruction whose I/O we served (api.rst: the next
        KVM_RUN completes it; immediate_exit makes that run return at once), then wait."""
        from .snapshot.kvm_state import complete_pending_io

        complete_pending_io(self.vcpu, handle_exit=self._dispatch)
        self.vcpu.kvm_run.immediate_exit = 0
        self.paused.set()
        while self.pause_requested.is_set() and not self.stopping.is_set():
            self.stopping.wait(0.05)
        self.paused.clear()

    def _main(self) -> None:
        try:
            self._loop()
        except VmExit as e:
            self.on_exit(e.status, e.reason)
        except GuestEnded as e:
            self.on_guest_end(str(e))
        except Exception as e:  # a VMM bug must still stop the VM cleanly
            log.exception("vcpu%d: unexpected error", self.vcpu.index)
            self.on_exit(1, f"vcpu{self.vcpu.index}: internal error: {e}")

    def _loop(self) -> None:
        kvm_run = self.vcpu.kvm_run
        # Chosen once: an unwatched VM pays nothing per exit for --stats/--trace.
        dispatch = self._dispatch if self.watch is None else self.watch.wrap(self._dispatch)
        while not self.stopping.is_set():
            if self.pause_requested.is_set():
                self._park()
                continue
            try:
                self.vcpu.run()
            except kvm.KvmError as e:
                if e.errno != errno.EFAULT:
                    raise
                self._memory_fault()
                continue
            self._fault_rip = None
            self.exits += 1
            dispatch(kvm_run)

    def _dispatch(self, kvm_run: kvm.kvm_run) -> None:
        """Serve one exit of KVM_RUN."""
        reason = kvm_run.exit_reason
        if reason == kvm.KVM_EXIT_IO:
            self._io(self.vcpu.exit_io)
        elif reason == kvm.KVM_EXIT_MMIO:
            self._mmio(self.vcpu.exit_mmio)
        elif reason == kvm.KVM_EXIT_INTR:
            kvm_run.immediate_exit = 0
            if self.samples is not None and self.sample_requested.is_set():
                self.sample_requested.clear()
                self.samples.take(self.vcpu)
            if self.dump_requested.is_set():
                self.dump_requested.clear()
                log.warning("%s", format_regs(self.vcpu))
        elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            self._internal_error(kvm_run)
        elif reason == kvm.KVM_EXIT_DEBUG and self.debugger is not None:
            self.debugger.debug_exit(self, kvm_run.exit.debug.arch)
        elif reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            self._system_event(kvm_run.exit.system_event)
        elif reason == kvm.KVM_EXIT_SHUTDOWN:
            raise VmExit(ExitStatus.GUEST_DIED, f"vcpu{self.vcpu.index}: the guest triple-faulted "
                         f"(KVM_EXIT_SHUTDOWN)\n{format_regs(self.vcpu)}")
        elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
            fe = kvm_run.exit.fail_entry
            self._fail(f"KVM_EXIT_FAIL_ENTRY: hardware entry failure reason "
                       f"{fe.hardware_entry_failure_reason:#x} on cpu {fe.cpu}")
        elif reason == kvm.KVM_EXIT_HLT:
            # Only without an in-kernel LAPIC; ours has one, so a HLT exit
            # means every interrupt source is gone: treat it as power-off.
            raise GuestEnded(f"vcpu{self.vcpu.index} halted")
        else:
            name = kvm.EXIT_REASON_NAMES.get(reason, str(reason))
            self._fail(f"unexpected exit {name}")

    def _memory_fault(self) -> None:
        """KVM_RUN said EFAULT: inject #GP(0) unless the guest keeps faulting in place."""
        rip = self.vcpu.get_regs().rip
        self._fault_repeats = self._fault_repeats + 1 if rip == self._fault_rip else 1
        self._fault_rip = rip
        self.memory_faults += 1
        if self.watch is not None:
            self.watch.efault(rip)
        if self._fault_repeats > MAX_FAULT_REPEATS:
            self._fail(f"KVM_RUN keeps failing with EFAULT at RIP {rip:#x}: guest memory "
                       "that the host mapping cannot serve")
        if self.memory_faults <= 3:
            log.warning("vcpu%d: guest memory access at RIP %#x failed on the host side "
                        "(EFAULT): #GP injected", self.vcpu.index, rip)
        events = self.vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = GP_VECTOR
        events.exception.has_error_code = 1
        events.exception.error_code = 0
        events.exception.pending = 0
        events.flags = 0
        self.vcpu.set_vcpu_events(events)

    def _io(self, io: kvm.kvm_run_io) -> None:
        # The data lives inside the kvm_run page (at io.data_offset).  For an IN we write
        # the value there, and the guest's register or buffer receives it during the
        # next KVM_RUN, which completes the instruction (api.rst 5, KVM_EXIT_IO).
        # Each field of the exit is read once: every read of a ctypes field costs.
        size, count, port = io.size, io.count, io.port
        data = self.vcpu.io_bytes(io.data_offset, size * count)
        out = io.direction == kvm.KVM_EXIT_IO_OUT
        if count == 1:   # a plain in/out: the common case, kept short
            if out:
                self.pio.write(port, data.tobytes())
            else:
                data[:] = self.pio.read(port, size)
            return
        # count > 1 is a string instruction (rep insb/outsb ...): count elements of
        # size bytes each, packed one after the other, all at the same port.
        for i in range(count):
            chunk = slice(i * size, (i + 1) * size)
            if out:
                self.pio.write(port, data[chunk].tobytes())
            else:
                data[chunk] = self.pio.read(port, size)

    def _mmio(self, mmio: kvm.kvm_run_mmio) -> None:
        # As for port I/O: a read's value goes into kvm_run.mmio.data, and the guest's
        # load completes with it on the next KVM_RUN (api.rst 5, KVM_EXIT_MMIO).
        data = self.vcpu.exit_mmio_data[:mmio.len]   # at most its 8 bytes: a slice stops there
        if mmio.is_write:
            self.mmio.write(mmio.phys_addr, data.tobytes())
        else:
            data[:] = self.mmio.read(mmio.phys_addr, len(data))

    def _internal_error(self, kvm_run: kvm.kvm_run) -> None:
        ef = kvm_run.exit.emulation_failure
        if ef.suberror == kvm.KVM_INTERNAL_ERROR_EMULATION:
            insn = b""
            if ef.ndata >= 3 and ef.flags & kvm.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                insn = bytes(ef.insn_bytes[:min(ef.insn_size, 15)])
            if self.debugger is not None and self.debugger.emulation_failure(self, insn):
                return
            name = fixup_instruction(self.vcpu, insn)
            if name is not None:
                self.fixups[name] = self.fixups.get(name, 0) + 1
                if self.watch is not None:
                    self.watch.fixup(name)
                log.debug("vcpu%d: finished %s for the emulator", self.vcpu.index, name)
                return
            self._fail(f"KVM could not emulate the instruction {insn.hex(' ') or '(bytes unknown)'}")
        internal = kvm_run.exit.internal
        data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
        self._fail(f"KVM_EXIT_INTERNAL_ERROR suberror {internal.suberror} data [{data}]")

    def _system_event(self, ev: kvm.kvm_run_system_event) -> None:
        if ev.type in (kvm.KVM_SYSTEM_EVENT_SHUTDOWN, kvm.KVM_SYSTEM_EVENT_RESET):
            raise GuestEnded("guest " + ("shut down" if ev.type == kvm.KVM_SYSTEM_EVENT_SHUTDOWN else "reset"))
        self._fail(f"KVM_EXIT_SYSTEM_EVENT type {ev.type}")

    def _fail(self, what: str) -> None:
        raise VmExit(1, f"vcpu{self.vcpu.index}: {what}\n{format_regs(self.vcpu)}")
