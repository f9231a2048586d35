"""Tiny guests for fast KVM tests: a few assembled instructions, no Linux.

A tiny VM has one vCPU in 64-bit long mode (the Linux boot protocol's entry
state from ``pyvmm.boot.cpu``: identity-mapped 4 GiB), 2 MiB of RAM with the code at CODE_ADDR, and the real
``VcpuThread`` run loop with its buses, so port I/O, MMIO, memory slots and
the instruction fix-ups are exercised exactly as a Linux boot uses them.
On PVM hosts CPL0 code is emulated, but a few hundred instructions take
well under a millisecond.  (Long mode, not 32-bit protected mode: PVM's
emulator cannot run a 32-bit ``iret``; ``iretq`` works.)
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import threading

from pyvmm import kvm
from pyvmm.boot import cpu, layout
from pyvmm.bus import Bus
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.memory import MemorySlots
from pyvmm.trace import TraceOutput, VcpuWatch
from pyvmm.vcpu import KICK_SIGNAL, VcpuThread

CODE_ADDR = 0x10000
KERNEL_STACK = 0x7000   # TSS.RSP0: where exceptions taken from user mode push their frame

# Drop to CPL3 at the label `user` (selectors of allow_user_mode(): data 0x2b, code 0x33).
ENTER_USER_MODE = """
        push $0x2b                   # iretq to CPL3: SS, RSP, RFLAGS, CS, RIP
        push $0x8000
        push $0x2
        push $0x33
        lea user(%rip), %rax
        push %rax
        iretq
"""
IDT_ADDR = 0x3000
RAM_SIZE = 2 << 20


def assemble(source: str) -> bytes:
    """GNU as (binutils, installed with gcc) in 64-bit mode, as flat binary."""
    with tempfile.TemporaryDirectory() as d:
        src, obj, out = (os.path.join(d, n) for n in ("t.s", "t.o", "t.bin"))
        with open(src, "w") as f:
            f.write(".code64\n" + source + "\n")
        subprocess.run(["as", "--64", "-o", obj, src], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", obj, out], check=True, capture_output=True)
        with open(out, "rb") as f:
            return f.read()


class Recorder:
    """A bus device that records writes and answers reads with ``value``."""

    def __init__(self, value: bytes = b"\x00" * 8) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        self.value = value
        self.on_read = None

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        if self.on_read:
            self.on_read(offset, size)
        return self.value[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


class TinyVm:
    """One vCPU, 2 MiB of RAM in a slot at 0, code at CODE_ADDR."""

    def __init__(self, code: bytes) -> None:
        import signal

        signal.signal(KICK_SIGNAL, lambda *_: None)
        self.kvm = kvm.Kvm()
        self.vm = self.kvm.create_vm()
        if self.vm.check_extension(kvm.KVM_CAP_EXIT_ON_EMULATION_FAILURE) > 0:
            self.vm.enable_cap(kvm.KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        from pyvmm.memory import GuestMemory

        self.mem = GuestMemory(RAM_SIZE)
        self.slots = MemorySlots(self.vm, self.kvm.check_extension(kvm.KVM_CAP_NR_MEMSLOTS))
        self.slots.add(0, RAM_SIZE, self.mem.host_addr)
        self.mem.write(CODE_ADDR, code)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.status: int | None = None
        self.reason = ""
        self.done = threading.Event()
        self.pio.register(layout.DEBUG_EXIT_PORT, 1, DebugExit(lambda s: self._exit(s, "debug-exit")),
                          "debug-exit")
        vcpu = self.vm.create_vcpu(0)
        cpu.configure_vcpu(vcpu, cpu.filter_cpuid(self.kvm.supported_cpuid(), 0, 1))
        cpu.set_boot_regs(vcpu, self.mem, "long64", CODE_ADDR)
        self.stopping = threading.Event()
        self.thread = VcpuThread(vcpu, self.pio, self.mmio, self._exit, self.stopping)

    def watch(self, trace: TraceOutput | None = None) -> VcpuWatch:
        """Count (and trace) exits as ``--stats``/``--trace`` do (before ``run``)."""
        self.thread.watch = VcpuWatch(self.thread.vcpu, self.pio, self.mmio, trace)
        return self.thread.watch

    def set_idt(self, handlers: dict[int, int]) -> None:
        """64-bit interrupt gates (SDM vol. 3, 6.14.1) for vector -> handler address."""
        idt = bytearray(256 * 16)
        for vector, addr in handlers.items():
            struct.pack_into("<HHBBHII", idt, vector * 16, addr & 0xFFFF, cpu.SEL_CODE64, 0, 0x8E,
                             (addr >> 16) & 0xFFFF, addr >> 32, 0)
        self.mem.write(IDT_ADDR, bytes(idt))
        sregs = self.thread.vcpu.get_sregs()
        sregs.idt.base = IDT_ADDR
        sregs.idt.limit = len(idt) - 1
        self.thread.vcpu.set_sregs(sregs)

    def allow_user_mode(self) -> None:
        """User data/code segments in the GDT (selectors 0x2b and 0x33), page tables
        that user mode may use (U/S bit), and TSS.RSP0 (the TSS sits at 0)."""
        gdt = cpu.BOOT_GDT + [cpu.gdt_entry(0xC0F3, 0, 0xFFFFF), cpu.gdt_entry(0xA0FB, 0, 0xFFFFF)]
        self.mem.write(layout.GDT_ADDR, b"".join(struct.pack("<Q", e) for e in gdt))
        self.mem.write(4, struct.pack("<Q", KERNEL_STACK))
        user = cpu.PTE_PRESENT | cpu.PTE_WRITE | 4
        self.mem.write(layout.PML4_ADDR, struct.pack("<Q", layout.PDPTE_ADDR | user))
        self.mem.write(layout.PDPTE_ADDR, b"".join(
            struct.pack("<Q", (layout.PDE_ADDR + i * 0x1000) | user) for i in range(4)))
        self.mem.write(layout.PDE_ADDR, b"".join(
            struct.pack("<Q", (i << 21) | user | cpu.PTE_PS) for i in range(2048)))
        sregs = self.thread.vcpu.get_sregs()
        sregs.gdt.limit = len(gdt) * 8 - 1
        self.thread.vcpu.set_sregs(sregs)

    def _exit(self, status: int, reason: str) -> None:
        if self.status is None:
            self.status, self.reason = status, reason
            self.stopping.set()
            self.done.set()

    def run(self, timeout: float = 10.0) -> int:
        self.thread.start()
        if not self.done.wait(timeout):
            self.thread.request_dump()
            raise TimeoutError("tiny guest did not finish")
        if threading.current_thread() is not self.thread.thread:
            self.thread.kick()
        self.thread.thread.join(5)
        return self.status

    def close(self) -> None:
        if not self.thread.thread.is_alive():
            self.thread.vcpu.close()
        self.mem.close()
        self.vm.close()
        self.kvm.close()
