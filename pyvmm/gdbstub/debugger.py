"""The debugger's side of the vCPUs: breakpoints, stops, pause and resume.

The vCPU threads call ``GuestDebugger.debug_exit`` and
``GuestDebugger.emulation_failure`` through ``VcpuThread.debugger``:

* a software breakpoint: GDB's ``Z0`` makes the stub write ``int3`` (0xcc)
  over the instruction.  On hardware KVM, KVM_GUESTDBG_USE_SW_BP makes the
  ``int3`` a KVM_EXIT_DEBUG with exception 3; on PVM the ``int3`` at CPL0 ends
  KVM_RUN with an emulation failure instead (docs/pvm.md "Instructions at
  CPL0"), which is a breakpoint when RIP is one of GDB's, else the guest's own
  ``int3`` that pyvmm finishes as always;
* a hardware breakpoint or watchpoint (``Z1``-``Z4``): DR0-DR3 and DR7 through
  KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_USE_HW_BP, a KVM_EXIT_DEBUG with
  exception 1 and DR6.B0-B3;
* a single step (``s``): KVM_GUESTDBG_SINGLESTEP, a KVM_EXIT_DEBUG with
  exception 1 and DR6.BS.

A stop pauses every vCPU (``VcpuThread.request_pause``, as snapshots do);
the stub then reads and writes registers and memory while nothing runs, which
is what the vCPU ioctls need (KVM_RUN holds the vCPU's lock).  Memory
addresses are guest-virtual: KVM_TRANSLATE through the stopped vCPU's page
tables.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import kvm
from ..memory import PAGE_SIZE, GuestMemoryError

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import VcpuThread

# --- x86 debug registers (SDM vol. 3, 17.2 "Debug Registers") ---------------------------
DR6_BS = 1 << 14            # single step
DR6_B_MASK = 0xF            # B0-B3: which of DR0-DR3 matched
DR7_RW = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}   # Z type -> R/W bits: exec, write, read(/write), access
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
NUM_HW_BREAKPOINTS = 4
MAX_SW_BREAKPOINTS = 1024
BP_VECTOR = 3
DB_VECTOR = 1
SIGINT = 2                  # GDB signal numbers (gdb/signals.def)
SIGTRAP = 5


@dataclass
class HwBreakpoint:
    kind: int       # Z packet type: 1 exec, 2 write, 3 read, 4 access
    addr: int
    length: int


def debugreg(hw: list[HwBreakpoint | None]) -> list[int]:
    """DR0-DR7 for KVM_SET_GUEST_DEBUG: one slot of DR0-DR3 per breakpoint, enabled
    with its L bit in DR7 and its R/W and LEN fields."""
    regs = [0] * 8
    dr7 = 0
    for i, bp in enumerate(hw):
        if bp is None:
            continue
        regs[i] = bp.addr
        length = 0 if bp.kind == 1 else DR7_LEN[bp.length]
        dr7 |= (1 << (2 * i)) | (DR7_RW[bp.kind] << (16 + 4 * i)) | (length << (18 + 4 * i))
    regs[7] = dr7
    return regs


@dataclass
class Stop:
    thread: int            # vCPU index
    signal: int
    why: str = ""          # stop reply extras: "swbreak:;", "hwbreak:;", "watch:ADDR;"


class GuestDebugger:
    """The debugger's side of the vCPUs: breakpoints, stops, pause and resume.

    The vCPU threads call ``debug_exit`` and ``emulation_failure`` (through
    ``VcpuThread.debugger``); everything else runs in the stub's thread, and
    touches a vCPU only while every vCPU is paused."""

    def __init__(self, vcpus: list["VcpuThread"], memory: "GuestMemory",
                 wake: Callable[[], None]) -> None:
        self.vcpus = vcpus
        self.memory = memory
        self._wake = wake
        self._lock = threading.Lock()
        self.stop: Stop | None = Stop(0, SIGTRAP)   # the guest waits for GDB before it starts
        self.sw: dict[int, tuple[int, bytes]] = {}   # virtual address -> (physical, original byte)
        self.hw: list[HwBreakpoint | None] = [None] * NUM_HW_BREAKPOINTS
        self.stepping: int | None = None
        self.singlestep_flags = kvm.KVM_GUESTDBG_SINGLESTEP

    def start_paused(self) -> None:
        """Before the vCPU threads start: they park at once, until GDB says ``c``."""
        for t in self.vcpus:
            t.debugger = self
            t.pause_requested.set()
        if self.vcpus:
            vm = self.vcpus[0].vcpu.vm
            if vm.check_extension(kvm.KVM_CAP_SET_GUEST_DEBUG2) & kvm.KVM_GUESTDBG_BLOCKIRQ:
                # a step runs the next instruction, not the interrupt handler KVM would inject
                self.singlestep_flags |= kvm.KVM_GUESTDBG_BLOCKIRQ

    # --- called by the vCPU threads ----------------------------------------------------
    def debug_exit(self, thread: "VcpuThread", arch: kvm.kvm_debug_exit_arch) -> None:
        """KVM_EXIT_DEBUG: a breakpoint, a watchpoint or a step (else the guest's own
        #BP/#DB, handed back to the guest)."""
        index = thread.vcpu.index
        if arch.exception == BP_VECTOR:
            if arch.pc in self.sw:
                self._stopped(thread, Stop(index, SIGTRAP, "swbreak:;"))
            else:
                self._reinject(thread, kvm.KVM_GUESTDBG_INJECT_BP)
            return
        if arch.dr6 & DR6_B_MASK:
            slot = (arch.dr6 & DR6_B_MASK).bit_length() - 1
            bp = self.hw[slot]
            why = "hwbreak:;" if bp is None or bp.kind == 1 else \
                f"{('', '', 'watch', 'rwatch', 'awatch')[bp.kind]}:{bp.addr:x};"
            self._stopped(thread, Stop(index, SIGTRAP, why))
        elif arch.dr6 & DR6_BS and self.stepping == index:
            self._stopped(thread, Stop(index, SIGTRAP))
        else:
            self._reinject(thread, kvm.KVM_GUESTDBG_INJECT_DB)

    def _reinject(self, thread: "VcpuThread", flag: int) -> None:
        """The guest's own #BP or #DB (hardware KVM): KVM queues it for the guest
        (api.rst 4.87), the debugger's settings unchanged."""
        thread.vcpu.set_guest_debug(self.control(thread.vcpu.index) | flag, debugreg(self.hw))

    def emulation_failure(self, thread: "VcpuThread", insn: bytes) -> bool:
        """PVM: an ``int3`` at one of GDB's breakpoints is a stop (True); anything
        else is for pyvmm's fix-ups (False)."""
        if insn[:1] != b"\xcc":
            return False
        rip = thread.vcpu.get_regs().rip
        if rip not in self.sw:
            return False
        self._stopped(thread, Stop(thread.vcpu.index, SIGTRAP, "swbreak:;"))
        return True

    def _stopped(self, thread: "VcpuThread | None", stop: Stop) -> None:
        with self._lock:
            if thread is not None:
                thread.pause_requested.set()   # parks after this exit (no kick: it is us)
            if self.stop is not None:
                return   # already stopping for another reason: this one is seen again on resume
            self.stop = stop
            self.stepping = None
            for t in self.vcpus:
                if t is not thread:
                    t.request_pause()
        self._wake()

    # --- called by the stub's thread ---------------------------------------------------
    def interrupt(self, thread: int) -> None:
        """Ctrl-C: stop everything, reported as SIGINT."""
        self._stopped(None, Stop(thread, SIGINT))

    def pause_all(self, stopping: threading.Event) -> bool:
        """Stop the guest if it runs (GDB attaches, or went away) and wait for it."""
        if self.stop is None:
            self._stopped(None, Stop(0, SIGTRAP))
        return self.wait_paused(stopping)

    def wait_paused(self, stopping: threading.Event) -> bool:
        """Wait until every vCPU thread is parked (False: the VM ended first)."""
        while not stopping.is_set():
            if all(t.paused.is_set() or not t.thread.is_alive() for t in self.vcpus):
                return True
            time.sleep(0.002)
        return False

    def control(self, index: int) -> int:
        flags = kvm.KVM_GUESTDBG_ENABLE | kvm.KVM_GUESTDBG_USE_SW_BP
        if any(self.hw):
            flags |= kvm.KVM_GUESTDBG_USE_HW_BP
        if self.stepping == index:
            flags |= self.singlestep_flags
        return flags

    def resume(self, step: int | None = None) -> None:
        """``c`` (step None: every vCPU) or ``s`` (only vCPU ``step`` runs, one instruction)."""
        self.stepping = step
        regs = debugreg(self.hw)
        for t in self.vcpus:
            t.vcpu.set_guest_debug(self.control(t.vcpu.index), regs)
        with self._lock:
            self.stop = None
            for t in self.vcpus:
                if step is None or t.vcpu.index == step:
                    t.resume()

    def detach(self) -> None:
        """GDB went: breakpoints out, debugging off, every vCPU runs."""
        for addr in list(self.sw):
            self.remove_sw(addr)
        self.hw = [None] * NUM_HW_BREAKPOINTS
        for t in self.vcpus:
            t.vcpu.set_guest_debug(0)
        with self._lock:
            self.stepping = None
            self.stop = None
            for t in self.vcpus:
                t.resume()

    # --- memory by guest-virtual address --------------------------------------------------
    def _physical(self, index: int, addr: int, size: int) -> list[tuple[int, int]]:
        """(guest-physical address, length) pieces of [addr, addr+size), page by page."""
        pieces = []
        vcpu = self.vcpus[index].vcpu
        while size > 0:
            chunk = min(size, PAGE_SIZE - addr % PAGE_SIZE)
            t = vcpu.translate(addr)
            if not t.valid:
                raise GuestMemoryError(f"guest-virtual address {addr:#x} is not mapped")
            pieces.append((t.physical_address, chunk))
            addr, size = addr + chunk, size - chunk
        return pieces

    def read(self, index: int, addr: int, size: int) -> bytes:
        """Guest memory as GDB should see it: GDB's own int3 bytes show the original."""
        data = bytearray()
        for gpa, n in self._physical(index, addr, size):
            data += self.memory.read(gpa, n)
        for bp, (_, orig) in self.sw.items():
            if addr <= bp < addr + size:
                data[bp - addr] = orig[0]
        return bytes(data)

    def write(self, index: int, addr: int, data: bytes) -> None:
        pieces = self._physical(index, addr, len(data))
        buf = bytearray(data)
        for bp, (gpa, _) in list(self.sw.items()):
            if addr <= bp < addr + len(data):   # keep our int3; remember the new byte
                self.sw[bp] = (gpa, bytes(buf[bp - addr:bp - addr + 1]))
                buf[bp - addr] = 0xCC
        offset = 0
        for gpa, n in pieces:
            self.memory.write(gpa, bytes(buf[offset:offset + n]))
            offset += n

    def insert_sw(self, index: int, addr: int) -> None:
        if addr in self.sw:
            return
        if len(self.sw) >= MAX_SW_BREAKPOINTS:
            raise GuestMemoryError("too many software breakpoints")
        (gpa, _), = self._physical(index, addr, 1)
        self.sw[addr] = (gpa, self.memory.read(gpa, 1))
        self.memory.write(gpa, b"\xcc")

    def remove_sw(self, addr: int) -> None:
        entry = self.sw.pop(addr, None)
        if entry is not None:
            self.memory.write(entry[0], entry[1])


