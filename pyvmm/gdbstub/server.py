"""The GDB stub's server: a socket, one debugger at a time, its packets.

``GdbStub`` has its own thread; the vCPU threads never wait on the socket.  A
stop reported by a vCPU thread (``GuestDebugger``) wakes the stub through a
pipe; the stub waits until every vCPU is parked and sends the stop reply.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading
from typing import TYPE_CHECKING, Callable

from .. import kvm
from ..memory import GuestMemoryError
from .debugger import DR7_LEN, DR7_RW, GuestDebugger, HwBreakpoint
from .packets import PACKET_SIZE, Event, PacketReader, frame
from .registers import REGISTERS, TARGET_XML, register_values, set_register

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import VcpuThread

log = logging.getLogger(__name__)

MAX_MEMORY_READ = (PACKET_SIZE - 16) // 2   # an 'm' reply is hex: 2 characters a byte


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
        self.listener = listen(address)
        # vCPU threads wake the stub's select() through this pair; a socket object, not a
        # raw fd, so that a late wake after close() fails instead of hitting a reused fd
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.debugger = GuestDebugger(vcpus, memory, self._wake_stub)
        self.address = address
        self.current = 0            # Hg: the vCPU for registers and memory
        self.cont_thread: int | None = None   # Hc: the vCPU to step
        self.conn: socket.socket | None = None
        self._running = False       # after c or s, until the stop reply
        self.thread = threading.Thread(target=self._main, name="gdbstub", daemon=True)

    def start(self) -> None:
        """Park the vCPUs (call before they start) and serve GDB."""
        self.debugger.start_paused()
        self.thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """After the VM has stopped: let the stub's thread end (it removes its Unix socket)."""
        self.thread.join(timeout)

    def _wake_stub(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:   # full (a wake is pending anyway), or the stub has ended
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
            self._wake_r.close()
            self._wake_w.close()
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
                        self._wake_r.recv(4096)
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
            self._last_ack()
        finally:
            sel.close()

    def _last_ack(self) -> None:
        """Before hanging up after a reply: GDB's ack, so that it does not write to a
        closed socket."""
        self.conn.settimeout(1)
        self.conn.recv(16)

    def _event(self, event: Event) -> bool:
        """False: the session is over."""
        if event.kind == "interrupt":
            if self._running and self.debugger.stop is None:
                self.debugger.interrupt(self.current if self.cont_thread is None else self.cont_thread)
        elif event.kind == "bad":
            self.conn.sendall(b"-")
        elif event.kind == "packet":
            self.conn.sendall(b"+")
            reply = self.handle(event.payload)
            if reply is not None:
                self.conn.sendall(frame(reply))
            if event.payload[:1] == b"D":
                self._last_ack()
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
                self._resume(cmd, args)
                return None
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
    """A listening socket for ``PORT`` (127.0.0.1) or ``unix:PATH`` (a stale socket
    at PATH is replaced; any other file there is an error)."""
    unix = address.startswith("unix:")
    sock = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if unix:
            path = address[5:]
            if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
            sock.bind(path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(address)))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
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

