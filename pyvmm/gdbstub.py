"""A GDB stub: ``pyvmm run --gdb PORT`` (docs/gdb.md).

GDB talks the remote serial protocol (GDB manual, appendix E "GDB Remote
Serial Protocol") over TCP or a Unix socket.  The stub runs in its own
thread; the vCPU threads never touch the socket.  They call the stub's
``GuestDebugger`` when the guest stops for the debugger (``VcpuThread.debugger``):

* a software breakpoint: GDB's ``Z0`` makes the stub write ``int3`` (0xcc)
  over the instruction.  On hardware KVM, KVM_GUESTDBG_USE_SW_BP makes the
  ``int3`` a KVM_EXIT_DEBUG with exception 3; on PVM the ``int3`` at CPL0 ends
  KVM_RUN with an emulation failure instead (docs/pvm.md), which is a
  breakpoint when RIP is one of GDB's, else the guest's own ``int3`` that
  pyvmm finishes as always;
* a hardware breakpoint or watchpoint (``Z1``-``Z4``): DR0-DR3 and DR7 through
  KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_USE_HW_BP, a KVM_EXIT_DEBUG with
  exception 1 and DR6.B0-B3;
* a single step (``s``): KVM_GUESTDBG_SINGLESTEP, a KVM_EXIT_DEBUG with
  exception 1 and DR6.BS.

A stop pauses every vCPU (``VcpuThread.request_pause``, as snapshots do);
GDB then reads and writes registers and memory while nothing runs, which is
what the vCPU ioctls need (KVM_RUN holds the vCPU's lock).  Memory addresses
are guest-virtual: KVM_TRANSLATE through the stopped vCPU's page tables.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from . import kvm
from .memory import PAGE_SIZE, GuestMemoryError

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .vcpu import VcpuThread

log = logging.getLogger(__name__)

# --- packets (GDB manual E.1 "Overview") ------------------------------------------------
PACKET_SIZE = 0x4000        # what qSupported announces: the largest packet we accept
MAX_MEMORY_READ = (PACKET_SIZE - 16) // 2   # an 'm' reply is hex: 2 characters a byte
INTERRUPT = 0x03            # E.8 "Interrupts": Ctrl-C while the target runs
ESCAPE = 0x7D               # '}': the next byte is XORed with 0x20
ESCAPED = frozenset(b"#$}*")


def checksum(payload: bytes) -> int:
    """The sum of the payload bytes modulo 256 (as sent, i.e. escaped)."""
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in ESCAPED:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data of a packet; a trailing lone '}' is dropped."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is not None:
                out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cc`` with the payload escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


@dataclass(frozen=True)
class Event:
    """What ``PacketReader`` found: kind is packet, ack, nack, interrupt or bad (a
    checksum mismatch or an overlong packet: answer with a nack)."""

    kind: str
    payload: bytes = b""


class PacketReader:
    """Incremental parser of what GDB sends: acks, Ctrl-C and ``$...#cc`` packets.

    Bytes between packets other than '+', '-' and 0x03 are ignored.  A packet
    longer than PACKET_SIZE is dropped whole (a "bad" event) without being kept."""

    def __init__(self) -> None:
        self._body: bytearray | None = None   # inside $...: the escaped payload so far
        self._sum: bytearray | None = None    # after '#': checksum digits so far
        self._overlong = False

    def feed(self, data: bytes) -> list[Event]:
        events = []
        for b in data:
            if self._sum is not None:
                self._sum.append(b)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is not None:
                if b == ord("#"):
                    self._sum = bytearray()
                elif len(self._body) < PACKET_SIZE:
                    self._body.append(b)
                else:
                    self._overlong = True
            elif b == ord("$"):
                self._body = bytearray()
            elif b == ord("+"):
                events.append(Event("ack"))
            elif b == ord("-"):
                events.append(Event("nack"))
            elif b == INTERRUPT:
                events.append(Event("interrupt"))
        return events

    def _finish(self) -> Event:
        body, digits, overlong = bytes(self._body), bytes(self._sum), self._overlong
        self._body = self._sum = None
        self._overlong = False
        try:
            ok = int(digits, 16) == checksum(body) and not overlong
        except ValueError:
            ok = False
        return Event("packet", unescape(body)) if ok else Event("bad")


# --- registers: GDB's i386:x86-64 layout (gdb/features/i386/64bit-*.xml) ------------------
GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
# (name, size): 64bit-core (GPRs, rip, eflags, segments, st0-7, x87 control),
# 64bit-sse (xmm0-15, mxcsr), 64bit-segments (fs_base, gs_base)
REGISTERS = ([(n, 8) for n in GPR_ORDER] + [("eflags", 4)] + [(n, 4) for n in SEGMENTS]
             + [(f"st{i}", 10) for i in range(8)] + [(n, 4) for n in FPU_CONTROL]
             + [(f"xmm{i}", 16) for i in range(16)] + [("mxcsr", 4), ("fs_base", 8), ("gs_base", 8)])
REGISTER_INDEX = {name: i for i, (name, _) in enumerate(REGISTERS)}
G_PACKET_SIZE = sum(size for _, size in REGISTERS)
WRITABLE = GPR_ORDER + ("eflags",)   # what G and P change; the rest needs its own ioctl
TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
              b"<target><architecture>i386:x86-64</architecture></target>")


def register_values(regs: kvm.kvm_regs, sregs: kvm.kvm_sregs, fpu: kvm.kvm_fpu) -> list[bytes]:
    """Every register of REGISTERS, little-endian, from KVM's structures."""
    out = [struct.pack("<Q", getattr(regs, n)) for n in GPR_ORDER]
    out.append(struct.pack("<I", regs.rflags & 0xFFFFFFFF))
    out += [struct.pack("<I", getattr(sregs, n).selector) for n in SEGMENTS]
    out += [bytes(fpu.fpr[i])[:10] for i in range(8)]
    # KVM has the abridged tag (1 bit a register, 1 = in use, FXSAVE format); GDB
    # wants the full word (2 bits a register, 3 = empty).
    ftag = sum((0 if fpu.ftwx >> i & 1 else 3) << (2 * i) for i in range(8))
    out += [struct.pack("<I", v & 0xFFFFFFFF) for v in (
        fpu.fcw, fpu.fsw, ftag, 0, fpu.last_ip, 0, fpu.last_dp, fpu.last_opcode)]
    out += [bytes(fpu.xmm[i]) for i in range(16)]
    out.append(struct.pack("<I", fpu.mxcsr))
    out += [struct.pack("<Q", sregs.fs.base), struct.pack("<Q", sregs.gs.base)]
    return out


def set_register(regs: kvm.kvm_regs, name: str, value: bytes) -> bool:
    """Put one of WRITABLE into ``regs``; False for a register the stub does not write."""
    if name not in WRITABLE:
        return False
    if name == "eflags":
        regs.rflags = (regs.rflags & ~0xFFFFFFFF) | struct.unpack("<I", value[:4])[0]
    else:
        setattr(regs, name, struct.unpack("<Q", value[:8])[0])
    return True


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
        self.attached = False

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
                thread.vcpu.set_guest_debug(self.control(index) | kvm.KVM_GUESTDBG_INJECT_BP)
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
            thread.vcpu.set_guest_debug(self.control(index) | kvm.KVM_GUESTDBG_INJECT_DB)

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


def _hex(data: bytes) -> bytes:
    return data.hex().encode()


def _numbers(text: bytes, sep: bytes = b",") -> list[int]:
    """Hex fields of a packet, each below 2**64 (a ValueError otherwise)."""
    values = [int(x, 16) for x in text.split(sep)]
    if any(not 0 <= v < 1 << 64 for v in values):
        raise ValueError(f"number out of range in {text[:40]!r}")
    return values


class GdbStub:
    """One GDB connection at a time on ``address`` (a TCP port on 127.0.0.1, or
    ``unix:PATH``); serves the debugger until the VM ends."""

    def __init__(self, address: str, vcpus: list["VcpuThread"], memory: "GuestMemory",
                 stopping: threading.Event, kill: Callable[[], None],
                 exit_status: Callable[[], int | None] = lambda: None,
                 watchpoints: bool = True) -> None:
        self.stopping = stopping
        # PVM's emulator does not check data breakpoints (docs/gdb.md): there GDB is told
        # that Z2-Z4 are not supported, instead of watchpoints that never fire.
        self.watchpoints = watchpoints
        self._kill = kill
        self._exit_status = exit_status
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.debugger = GuestDebugger(vcpus, memory, self._wake_stub)
        self.listener = listen(address)
        self.address = address
        self.current = 0            # Hg: the vCPU for registers and memory
        self.cont_thread: int | None = None   # Hc: the vCPU to step
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._main, name="gdbstub", daemon=True)

    def start(self) -> None:
        """Park the vCPUs (call before they start) and serve GDB."""
        self.debugger.start_paused()
        self.thread.start()

    def _wake_stub(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    def _main(self) -> None:
        try:
            while not self.stopping.is_set():
                conn = self._accept()
                if conn is None:
                    break
                try:
                    self._serve(conn)
                except OSError as e:
                    log.info("gdb: connection lost: %s", e)
                finally:
                    conn.close()
                    self.conn = None
                if self.debugger.pause_all(self.stopping):
                    self.debugger.detach()
                    log.warning("gdb detached: the guest runs on")
        except Exception:
            log.exception("gdb stub failed")
        finally:
            self.listener.close()
            if self.address.startswith("unix:"):
                try:
                    os.unlink(self.address[5:])
                except OSError:
                    pass

    def _accept(self) -> socket.socket | None:
        log.warning("gdb: waiting for a debugger on %s", self.address)
        while not self.stopping.is_set():
            self.listener.settimeout(0.25)
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            log.warning("gdb: debugger attached")
            if self.debugger.pause_all(self.stopping):
                return conn
            conn.close()
        return None

    def _serve(self, conn: socket.socket) -> None:
        self.conn = conn
        reader = PacketReader()
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, "conn")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = False
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(0.25):
                    if key.data == "wake":
                        os.read(self._wake_r, 4096)
                        if self._running and self.debugger.stop is not None:
                            self._report_stop()
                        continue
                    data = conn.recv(65536)
                    if not data:
                        return
                    for event in reader.feed(data):
                        if not self._event(event):
                            return
            status = self._exit_status()
            conn.sendall(frame(b"W%02x" % ((status or 0) & 0xFF)))
            conn.settimeout(1)
            conn.recv(16)   # GDB's ack, so that it does not write to a closed socket
        finally:
            sel.close()

    def _event(self, event: Event) -> bool:
        """False: the session is over."""
        if event.kind == "interrupt":
            if self._running and self.debugger.stop is None:
                self.debugger.interrupt(self.cont_thread or self.current)
        elif event.kind == "bad":
            self.conn.sendall(b"-")
        elif event.kind == "packet":
            self.conn.sendall(b"+")
            reply = self.handle(event.payload)
            if reply is not None:
                self.conn.sendall(frame(reply))
            if event.payload[:1] in (b"D", b"k"):
                return False
        return True

    def _report_stop(self) -> None:
        if not self.debugger.wait_paused(self.stopping):
            return
        self._running = False
        self.current = self.debugger.stop.thread
        self.conn.sendall(frame(self.stop_reply()))

    def stop_reply(self) -> bytes:
        stop = self.debugger.stop
        return b"T%02xthread:%x;%s" % (stop.signal, stop.thread + 1, stop.why.encode())

    # --- commands ------------------------------------------------------------------------
    def handle(self, packet: bytes) -> bytes | None:
        """The reply to one packet (None: no reply now, e.g. after ``c``)."""
        cmd, args = packet[:1], packet[1:]
        try:
            if cmd == b"q" or cmd == b"Q":
                return self._query(packet)
            if cmd == b"?":
                return self.stop_reply() if self.debugger.stop else b"S05"
            if cmd == b"H":
                return self._set_thread(args)
            if cmd == b"T":
                return b"OK" if 0 <= _numbers(args)[0] - 1 < len(self.debugger.vcpus) else b"E01"
            if cmd in (b"D", b"k"):
                if cmd == b"k":
                    self._kill()
                return b"OK" if cmd == b"D" else None
            if self._running:
                return b"E16"   # EBUSY: GDB waits for the stop reply first
            if cmd == b"g":
                return b"".join(_hex(v) for v in self._values())
            if cmd == b"p":
                n, = _numbers(args)
                return _hex(self._values()[n]) if n < len(REGISTERS) else b"E45"
            if cmd == b"G":
                return self._write_registers(bytes.fromhex(args.decode()))
            if cmd == b"P":
                n, value = args.split(b"=", 1)
                return self._write_register(_numbers(n)[0], bytes.fromhex(value.decode()))
            if cmd == b"m":
                addr, size = _numbers(args)
                return _hex(self.debugger.read(self.current, addr, min(size, MAX_MEMORY_READ)))
            if cmd == b"M":
                where, data = args.split(b":", 1)
                addr, size = _numbers(where)
                data = bytes.fromhex(data.decode())
                if len(data) != size:
                    return b"E22"
                self.debugger.write(self.current, addr, data)
                return b"OK"
            if cmd in (b"Z", b"z"):
                return self._breakpoint(cmd == b"Z", args)
            if cmd in (b"c", b"s", b"C", b"S"):
                return self._resume(cmd, args)
        except GuestMemoryError as e:
            log.debug("gdb: %s: %s", packet[:40], e)
            return b"E14"   # EFAULT
        except (ValueError, kvm.KvmError) as e:
            log.debug("gdb: bad packet %r: %s", packet[:40], e)
            return b"E22"   # EINVAL
        return b""          # not supported

    def _query(self, packet: bytes) -> bytes:
        if packet.startswith(b"qSupported"):
            return (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+" % PACKET_SIZE)
        if packet.startswith(b"qXfer:features:read:target.xml:"):
            offset, length = _numbers(packet.split(b":")[4])
            chunk = TARGET_XML[offset:offset + min(length, PACKET_SIZE - 16)]
            return (b"l" if offset + len(chunk) >= len(TARGET_XML) else b"m") + chunk
        if packet == b"qAttached":
            return b"1"      # GDB's quit detaches instead of killing the VM
        if packet == b"qC":
            return b"QC%x" % (self.current + 1)
        if packet == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in range(len(self.debugger.vcpus)))
        if packet == b"qsThreadInfo":
            return b"l"
        return b""

    def _set_thread(self, args: bytes) -> bytes:
        op, tid = args[:1], (-1 if args[1:] == b"-1" else _numbers(args[1:])[0])
        index = None if tid in (0, -1) else tid - 1   # 0: any thread, -1: all
        if index is not None and not 0 <= index < len(self.debugger.vcpus):
            return b"E01"
        if op == b"g":
            self.current = index if index is not None else self.current
        elif op == b"c":
            self.cont_thread = index
        return b"OK"

    def _values(self) -> list[bytes]:
        vcpu = self.debugger.vcpus[self.current].vcpu
        return register_values(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu())

    def _write_registers(self, data: bytes) -> bytes:
        vcpu = self.debugger.vcpus[self.current].vcpu
        regs = vcpu.get_regs()
        offset = 0
        for name, size in REGISTERS:
            if offset + size > len(data):
                break
            set_register(regs, name, data[offset:offset + size])
            offset += size
        vcpu.set_regs(regs)
        return b"OK"

    def _write_register(self, n: int, value: bytes) -> bytes:
        if n >= len(REGISTERS) or len(value) != REGISTERS[n][1]:
            return b"E22"
        vcpu = self.debugger.vcpus[self.current].vcpu
        regs = vcpu.get_regs()
        if not set_register(regs, REGISTERS[n][0], value):
            return b"E01"
        vcpu.set_regs(regs)
        return b"OK"

    def _breakpoint(self, insert: bool, args: bytes) -> bytes:
        kind, addr, length = _numbers(args.split(b";")[0])
        dbg = self.debugger
        if kind == 0:
            if insert:
                dbg.insert_sw(self.current, addr)
            else:
                dbg.remove_sw(addr)
            return b"OK"
        if kind not in DR7_RW or (kind != 1 and (length not in DR7_LEN or not self.watchpoints)):
            return b""
        bp = HwBreakpoint(kind, addr, length)
        if insert:
            if bp in dbg.hw:
                return b"OK"
            if None not in dbg.hw:
                return b"E28"   # ENOSPC: four debug registers
            dbg.hw[dbg.hw.index(None)] = bp
        elif bp in dbg.hw:
            dbg.hw[dbg.hw.index(bp)] = None
        return b"OK"

    def _resume(self, cmd: bytes, args: bytes) -> None:
        if cmd in (b"C", b"S"):   # C sig[;addr]: the signal means nothing to a VM
            args = args.split(b";", 1)[1] if b";" in args else b""
        step = cmd in (b"s", b"S")
        index = self.cont_thread if self.cont_thread is not None else self.current
        if args:
            vcpu = self.debugger.vcpus[index].vcpu
            regs = vcpu.get_regs()
            regs.rip = _numbers(args)[0]
            vcpu.set_regs(regs)
        self._running = True
        self.debugger.resume(index if step else None)
        return None


def start_for(machine, address: str) -> GdbStub:
    """``pyvmm run --gdb``: a stub on ``machine``, started before its vCPUs; a port or
    path we cannot listen on is a ValueError (bad input)."""
    try:
        stub = GdbStub(address, machine.vcpus, machine.memory, machine.stopping,
                       kill=lambda: machine.request_exit(0, "killed by gdb"),
                       exit_status=lambda: machine.exit_status,
                       watchpoints=not machine.flavour.is_pvm)
    except OSError as e:
        raise ValueError(f"--gdb {address}: cannot listen: {e.strerror}") from None
    stub.start()
    return stub


def listen(address: str) -> socket.socket:
    """A listening socket for ``PORT`` (127.0.0.1) or ``unix:PATH``."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = address[5:]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(path)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(address)))
    sock.listen(1)
    return sock


def parse_address(text: str) -> str:
    """``--gdb PORT`` or ``--gdb unix:PATH``; ValueError with the reason."""
    if text.startswith("unix:"):
        if len(text) <= 5:
            raise ValueError("--gdb unix:PATH needs a path")
        return text
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"--gdb {text!r}: expected a TCP port (1-65535) or unix:PATH")
    return text
