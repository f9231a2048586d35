"""The GDB stub (pyvmm.gdbstub): packet framing, and a scripted GDB client on a tiny guest.

The client speaks the remote serial protocol the way GDB does (acks, then one
packet and its reply at a time) over a Unix socket; the guest is a tiny
long-mode guest (tests/tinyguest.py) run by the real VcpuThread loop.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import given, strategies as st

from pyvmm import kvm
from pyvmm.gdbstub import debugger, packets, registers, server
from pyvmm.gdbstub.packets import Event, PacketReader, checksum, frame
from pyvmm.memory import GuestMemoryError

# --- framing (no KVM) --------------------------------------------------------------------


@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=20))
def test_framed_packets_parse_back_in_any_chunking(payload, cuts):
    wire = b"+" + frame(payload) + b"-" + frame(b"g")
    reader, events, pos = PacketReader(), [], 0
    for cut in cuts + [len(wire)]:
        events += reader.feed(wire[pos:pos + cut])
        pos += cut
    events += reader.feed(wire[pos:])
    assert events == [Event("ack"), Event("packet", payload), Event("nack"), Event("packet", b"g")]


@given(st.binary(max_size=200))
def test_framed_body_has_no_bare_special_bytes(payload):
    wire = frame(payload)
    body = wire[1:-3]
    assert b"#" not in body and b"$" not in body
    assert wire[-3:-2] == b"#" and int(wire[-2:], 16) == checksum(body)
    assert packets.unescape(body) == payload


@given(st.binary(min_size=1, max_size=100), st.integers(1, 255))
def test_a_wrong_checksum_is_a_bad_packet(payload, delta):
    wire = bytearray(frame(payload))
    good = int(wire[-2:], 16)
    wire[-2:] = b"%02x" % ((good + delta) & 0xFF)
    assert PacketReader().feed(bytes(wire)) == [Event("bad")]


@given(st.binary(max_size=100))
def test_garbage_checksum_digits_and_noise_never_raise(noise):
    PacketReader().feed(noise)
    reader = PacketReader()
    assert reader.feed(b"$m0,4#zz" + frame(b"?")) == [Event("bad"), Event("packet", b"?")]


def test_known_packets():
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"qSupported") == b"$qSupported#37"
    assert frame(b"a#b") == b"$a}\x03b#" + b"%02x" % checksum(b"a}\x03b")
    assert PacketReader().feed(b"\x03") == [Event("interrupt")]
    assert PacketReader().feed(b"$X0,2:}\x03}]#") == []   # incomplete: no checksum yet


def test_an_overlong_packet_is_dropped_and_the_next_one_parses():
    reader = PacketReader()
    big = b"M0," + b"0" * (packets.PACKET_SIZE * 3)
    events = reader.feed(b"$" + big + b"#%02x" % checksum(big) + frame(b"g"))
    assert events == [Event("bad"), Event("packet", b"g")]
    assert len(reader._body or b"") == 0


def test_debugreg_encodes_dr7():
    bps = [debugger.HwBreakpoint(1, 0x1000, 1), None, debugger.HwBreakpoint(2, 0x2000, 4), None]
    regs = debugger.debugreg(bps)
    assert regs[0] == 0x1000 and regs[2] == 0x2000
    # L0; L2, R/W2 = 01 (write) at bits 24-25, LEN2 = 11 (4 bytes) at bits 26-27
    assert regs[7] == 0b1 | 0b10000 | (0b01 << 24) | (0b11 << 26)


def test_register_layout_is_gdbs_amd64():
    assert registers.REGISTERS[16] == ("rip", 8) and registers.REGISTERS[17] == ("eflags", 4)
    assert registers.REGISTER_INDEX["xmm0"] == 40 and registers.REGISTER_INDEX["mxcsr"] == 56
    assert registers.G_PACKET_SIZE == 17 * 8 + 7 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 16


@pytest.mark.parametrize("text, ok", [("1234", True), ("unix:/tmp/x", True), ("0", False),
                                      ("70000", False), ("abc", False), ("unix:", False)])
def test_parse_address(text, ok):
    if ok:
        assert server.parse_address(text) == text
    else:
        with pytest.raises(ValueError):
            server.parse_address(text)


def test_an_address_we_cannot_listen_on_is_bad_input(tmp_path):
    from pyvmm.platform import Flavour

    class Machine:
        vcpus, memory, stopping = [], None, threading.Event()
        flavour = Flavour("pvm", "kvm_pvm", "")

    with pytest.raises(ValueError, match="--gdb unix:.*: cannot listen: No such file or directory"):
        server.start_for(Machine(), f"unix:{tmp_path}/no-such-dir/gdb.sock")


def test_a_unix_path_that_is_not_a_socket_is_kept(tmp_path):
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(OSError):
        server.listen(f"unix:{path}")
    assert path.read_text() == "data"
    stale = tmp_path / "stale.sock"
    server.listen(f"unix:{stale}").close()
    server.listen(f"unix:{stale}").close()   # a socket left behind is replaced


def test_the_unix_socket_is_gone_when_the_vm_has_stopped(tmp_path):
    path = tmp_path / "gdb.sock"
    stopping = threading.Event()
    stub = server.GdbStub(f"unix:{path}", [], FakeMemory(), stopping, kill=lambda: None)
    stub.start()
    assert path.exists()
    stopping.set()
    stub.close()
    assert not path.exists() and not stub.thread.is_alive()


# --- any packet from GDB: a reply or an error, never an exception (fakes, no KVM) --------


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.regs = kvm.kvm_regs(rip=0x1000, rflags=2)
        self.debug: list[tuple[int, list[int] | None]] = []

    def get_regs(self):
        return kvm.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs) -> None:
        self.regs = kvm.kvm_regs.from_buffer_copy(regs)

    def get_sregs(self):
        return kvm.kvm_sregs()

    def get_fpu(self):
        return kvm.kvm_fpu()

    def translate(self, addr: int):
        return kvm.kvm_translation(linear_address=addr, physical_address=addr, valid=addr < 0x10000)

    def set_guest_debug(self, control: int, debugreg=None) -> None:
        self.debug.append((control, debugreg))


class FakeThread:
    def __init__(self, index: int) -> None:
        self.vcpu = FakeVcpu(index)
        self.pause_requested, self.paused = threading.Event(), threading.Event()
        self.paused.set()
        self.thread = threading.current_thread()

    def request_pause(self) -> None:
        self.pause_requested.set()

    def resume(self) -> None:
        self.pause_requested.clear()


class FakeMemory:
    def __init__(self) -> None:
        self.ram = bytearray(range(256)) * 256

    def read(self, gpa: int, size: int) -> bytes:
        if gpa + size > len(self.ram):
            raise GuestMemoryError("not RAM")
        return bytes(self.ram[gpa:gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa + len(data) > len(self.ram):
            raise GuestMemoryError("not RAM")
        self.ram[gpa:gpa + len(data)] = data


@pytest.fixture(scope="module")
def fake_stub(tmp_path_factory):
    path = tmp_path_factory.mktemp("gdb") / "s"
    stub = server.GdbStub(f"unix:{path}", [FakeThread(0), FakeThread(1)], FakeMemory(),
                           threading.Event(), kill=lambda: None)
    yield stub
    for sock in (stub.listener, stub._wake_r, stub._wake_w):
        sock.close()


COMMANDS = [b"m", b"M", b"g", b"G", b"p", b"P", b"Z0,", b"z0,", b"Z1,", b"Z2,", b"z2,", b"Hg",
            b"Hc", b"T", b"c", b"s", b"C", b"S", b"?", b"qC", b"qfThreadInfo", b"qSupported",
            b"qXfer:features:read:target.xml:", b"vCont?", b"X"]


@given(st.one_of(st.binary(max_size=80),
                 st.builds(bytes.__add__, st.sampled_from(COMMANDS),
                           st.text("0123456789abcdefABx,;:=-", max_size=60).map(str.encode))))
def test_any_packet_gets_a_reply_not_an_exception(fake_stub, packet):
    fake_stub._running = False
    fake_stub.debugger.stop = debugger.Stop(0, debugger.SIGTRAP)
    reply = fake_stub.handle(packet)
    assert reply is None or isinstance(reply, bytes)
    if reply is None:
        assert packet[:1] in (b"c", b"s", b"C", b"S", b"k")
    assert len(fake_stub.debugger.sw) <= debugger.MAX_SW_BREAKPOINTS
    assert sum(bp is not None for bp in fake_stub.debugger.hw) <= debugger.NUM_HW_BREAKPOINTS
    assert 0 <= fake_stub.current < 2


def test_software_breakpoints_on_fake_memory(fake_stub):
    fake_stub._running = False
    mem = fake_stub.debugger.memory
    orig = mem.read(0x123, 1)
    assert fake_stub.handle(b"Z0,123,1") == b"OK" and mem.read(0x123, 1) == b"\xcc"
    assert fake_stub.handle(b"m122,3") == mem.read(0x122, 3).replace(b"\xcc", orig).hex().encode()
    assert fake_stub.handle(b"M123,1:55") == b"OK" and mem.read(0x123, 1) == b"\xcc"
    assert fake_stub.handle(b"z0,123,1") == b"OK" and mem.read(0x123, 1) == b"\x55"
    assert fake_stub.handle(b"Z0,20000,1") == b"E14"        # not mapped
    assert fake_stub.handle(b"m1%s,1" % (b"0" * 16)) == b"E22"   # above 2**64


def test_debug_exits_as_hardware_kvm_reports_them():
    """The KVM_EXIT_DEBUG paths that PVM never takes (it reports int3 as an emulation
    failure): GDB's int3, the guest's own int3 and #DB, a watchpoint, a step."""
    threads = [FakeThread(0), FakeThread(1)]
    stops = []
    dbg = debugger.GuestDebugger(threads, FakeMemory(), lambda: stops.append(dbg.stop))
    dbg.insert_sw(0, 0x100)
    dbg.hw[1] = debugger.HwBreakpoint(2, 0x2000, 4)
    dbg.resume()
    assert not any(t.pause_requested.is_set() for t in threads)

    own = kvm.kvm_debug_exit_arch(exception=3, pc=0x200)      # the guest's own int3
    dbg.debug_exit(threads[1], own)
    control, regs = threads[1].vcpu.debug[-1]
    assert control & kvm.KVM_GUESTDBG_INJECT_BP and regs[1] == 0x2000 and regs[7] & 0b1100
    assert dbg.stop is None and stops == []

    dbg.debug_exit(threads[1], kvm.kvm_debug_exit_arch(exception=1, dr6=0xFFFF0FF2))  # DR1 hit
    assert stops == [debugger.Stop(1, debugger.SIGTRAP, "watch:2000;")]
    assert all(t.pause_requested.is_set() for t in threads)
    dbg.debug_exit(threads[0], kvm.kvm_debug_exit_arch(exception=3, pc=0x100))  # seen again later
    assert len(stops) == 1

    dbg.resume(step=0)
    assert threads[0].vcpu.debug[-1][0] & kvm.KVM_GUESTDBG_SINGLESTEP
    assert not threads[1].vcpu.debug[-1][0] & kvm.KVM_GUESTDBG_SINGLESTEP
    assert threads[1].pause_requested.is_set() and not threads[0].pause_requested.is_set()
    dbg.debug_exit(threads[0], kvm.kvm_debug_exit_arch(exception=1, dr6=0xFFFF4FF0))  # BS
    assert stops[-1] == debugger.Stop(0, debugger.SIGTRAP)

    dbg.resume()
    dbg.debug_exit(threads[0], kvm.kvm_debug_exit_arch(exception=3, pc=0x100))  # GDB's int3
    assert stops[-1] == debugger.Stop(0, debugger.SIGTRAP, "swbreak:;")
    dbg.resume()
    dbg.debug_exit(threads[0], kvm.kvm_debug_exit_arch(exception=1, dr6=0xFFFF4FF0))  # not stepping
    assert threads[0].vcpu.debug[-1][0] & kvm.KVM_GUESTDBG_INJECT_DB and dbg.stop is None


# --- a scripted client on a tiny guest ------------------------------------------------------


class Client:
    """GDB's side: one packet, its ack, its reply."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.reader = PacketReader()
        self.pending: list[Event] = []

    def _next(self) -> Event:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def send(self, payload: bytes, reply: bool = True) -> bytes | None:
        self.sock.sendall(frame(payload))
        assert self._next() == Event("ack")
        return self.reply() if reply else None

    def reply(self) -> bytes:
        event = self._next()
        assert event.kind == "packet", event
        if not event.payload.startswith(b"W"):   # after W (the VM ended) the stub hangs up
            self.sock.sendall(b"+")
        return event.payload

    def regs(self) -> dict[str, int]:
        raw = bytes.fromhex(self.send(b"g").decode())
        out, offset = {}, 0
        for name, size in registers.REGISTERS:
            out[name] = int.from_bytes(raw[offset:offset + size], "little")
            offset += size
        assert offset == len(raw)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def debugged(kvm_host, tmp_path):
    """make(source) -> (TinyVm, Client): the guest waits for the client before it runs."""
    from tinyguest import TinyVm, assemble

    made = []

    def make(source: str):
        vm = TinyVm(assemble(f".org 0\n{source}"))
        path = str(tmp_path / "gdb.sock")
        stub = server.GdbStub(f"unix:{path}", [vm.thread], vm.mem, vm.stopping,
                               kill=lambda: vm._exit(9, "killed by gdb"),
                               exit_status=lambda: vm.status, watchpoints=kvm_host != "pvm")
        stub.start()
        vm.thread.start()
        client = Client(path)
        made.append((vm, client, stub))
        return vm, client

    yield make
    for vm, client, stub in made:
        client.close()
        vm._exit(0, "test over")
        vm.thread.kick()
        vm.thread.thread.join(5)
        stub.thread.join(5)
        vm.close()


EXIT = "mov $0x501, %dx\n out %al, %dx\n"


@pytest.mark.kvm
def test_registers_memory_breakpoints_step_and_continue(debugged, kvm_host):
    from tinyguest import CODE_ADDR

    vm, gdb = debugged(f"""
        mov $1, %eax                 # +0
        mov $2, %ebx                 # +5
        mov $3, %ecx                 # +10: software breakpoint
        mov $4, %esi                 # +15: step lands here
        mov $5, %edi                 # +20: hardware breakpoint
        movl $0x11223344, data(%rip) # +25: watchpoint (write)
        mov $0x2a, %al
        {EXIT}
    .org 0x100
    data: .long 0
    """)
    assert b"PacketSize=" in gdb.send(b"qSupported:multiprocess+;swbreak+;hwbreak+")
    assert gdb.send(b"qXfer:features:read:target.xml:0,fff").startswith(b"l<?xml")
    assert gdb.send(b"?") == b"T05thread:1;"
    assert gdb.send(b"qfThreadInfo") == b"m1"
    assert gdb.send(b"Hg1") == b"OK"
    r = gdb.regs()
    assert r["rip"] == CODE_ADDR and r["cs"] == 0x10 and r["eflags"] & 2
    assert gdb.send(b"p10") == struct.pack("<Q", CODE_ADDR).hex().encode()
    code = vm.mem.read(CODE_ADDR, 30)
    assert gdb.send(b"m%x,1e" % CODE_ADDR) == code.hex().encode()
    assert gdb.send(b"mffff800000000000,4") == b"E14"    # not mapped

    bp = CODE_ADDR + 10
    assert gdb.send(b"Z0,%x,1" % bp) == b"OK"
    assert vm.mem.read(bp, 1) == b"\xcc"
    assert gdb.send(b"m%x,1" % bp) == code[10:11].hex().encode()   # GDB sees the original
    assert gdb.send(b"c", reply=False) is None
    assert gdb.reply() == b"T05thread:1;swbreak:;"
    r = gdb.regs()
    assert (r["rip"], r["rax"], r["rbx"]) == (bp, 1, 2)
    assert gdb.send(b"z0,%x,1" % bp) == b"OK"
    assert vm.mem.read(bp, 1) == code[10:11]

    assert gdb.send(b"s", reply=False) is None
    assert gdb.reply() == b"T05thread:1;"
    r = gdb.regs()
    assert (r["rip"], r["rcx"]) == (bp + 5, 3)

    assert gdb.send(b"Z1,%x,1" % (CODE_ADDR + 20)) == b"OK"
    assert gdb.send(b"c", reply=False) is None
    assert gdb.reply() == b"T05thread:1;hwbreak:;"
    assert gdb.regs()["rip"] == CODE_ADDR + 20
    assert gdb.send(b"z1,%x,1" % (CODE_ADDR + 20)) == b"OK"

    data = CODE_ADDR + 0x100
    assert gdb.send(b"M%x,4:78563412" % data) == b"OK"
    assert vm.mem.read(data, 4) == bytes.fromhex("78563412")
    if kvm_host == "pvm":
        # PVM's emulator does not check data breakpoints at CPL0 (docs/gdb.md): the stub
        # says it has no watchpoints; GDB can still single-step and compare
        assert gdb.send(b"Z2,%x,4" % data) == b""
        assert gdb.send(b"c", reply=False) is None
        assert gdb.reply() == b"W2a"
    else:
        assert gdb.send(b"Z2,%x,4" % data) == b"OK"
        assert gdb.send(b"c", reply=False) is None
        assert gdb.reply() == b"T05thread:1;watch:%x;" % data
        assert gdb.send(b"m%x,4" % data) == b"44332211"
        assert gdb.send(b"z2,%x,4" % data) == b"OK"
        assert gdb.send(b"c", reply=False) is None
        assert gdb.reply() == b"W2a"
    assert vm.status == 0x2A


@pytest.mark.kvm
def test_register_writes_and_ctrl_c(debugged):
    from tinyguest import CODE_ADDR

    vm, gdb = debugged(f"""
        mov %ebx, %eax
        out %al, $0x80               # "I am in the loop"
    1:  cmp $0, %ecx
        je 1b                        # spins until the debugger sets RCX
        {EXIT}
    """)
    spinning = threading.Event()

    class Port:
        def read(self, offset, size):
            return b"\0" * size

        def write(self, offset, data):
            spinning.set()

    vm.pio.register(0x80, 1, Port())
    assert gdb.send(b"P1=0700000000000000") == b"OK"      # GDB's register 1 is rbx
    assert gdb.regs()["rbx"] == 7
    assert gdb.send(b"c", reply=False) is None
    assert spinning.wait(10)
    gdb.sock.sendall(b"\x03")
    assert gdb.reply() == b"T02thread:1;"
    r = gdb.regs()
    assert r["rax"] == 7 and CODE_ADDR < r["rip"] < CODE_ADDR + 10
    assert gdb.send(b"P2=0100000000000000") == b"OK"      # rcx = 1: the loop ends
    assert gdb.send(b"c", reply=False) is None
    assert gdb.reply() == b"W07"


@pytest.mark.kvm
def test_detach_lets_the_guest_run_and_restores_breakpoints(debugged):
    from tinyguest import CODE_ADDR

    vm, gdb = debugged(f"""
        nop
        mov $3, %al
        {EXIT}
    """)
    assert gdb.send(b"Z0,%x,1" % (CODE_ADDR + 1)) == b"OK"
    assert gdb.send(b"D") == b"OK"
    assert vm.done.wait(10)
    assert vm.status == 3 and vm.mem.read(CODE_ADDR + 1, 1) != b"\xcc"


@pytest.mark.kvm
def test_bad_packets_get_errors_not_crashes(debugged):
    _, gdb = debugged("1: jmp 1b\n")
    for bad in (b"mzz,1", b"m1", b"Z0,", b"P99=00", b"Pzz", b"Hgzz", b"Z9,0,1", b"Z2,0,3",
                b"M0,2:00", b"T99", b"G00"):
        reply = gdb.send(bad)
        assert reply == b"" or reply.startswith(b"E") or reply == b"OK", (bad, reply)
    assert gdb.send(b"vMustReplyEmpty") == b""
    gdb.sock.sendall(b"$g#00")
    assert gdb._next() == Event("nack")
    assert gdb.send(b"?") == b"T05thread:1;"


@pytest.mark.kvm
def test_data_breakpoints_through_kvm(kvm_host):
    """The measured fact behind the stub's watchpoints: a write watchpoint in DR0/DR7
    (KVM_GUESTDBG_USE_HW_BP) ends KVM_RUN with KVM_EXIT_DEBUG on hardware KVM, but is
    never checked by PVM's emulator at CPL0, where the guest runs to its end."""
    from tinyguest import CODE_ADDR, TinyVm, assemble

    vm = TinyVm(assemble(f".org 0\n movl $1, data(%rip)\n mov $0x2a, %al\n{EXIT}\n.org 0x100\ndata: .long 0\n"))
    expect_debug_exit_unless_pvm(kvm_host, vm, debugger.HwBreakpoint(2, CODE_ADDR + 0x100, 4), 0x2A)


def expect_debug_exit_unless_pvm(kvm_host: str, vm, bp, pvm_status: int, flags: int = 0) -> None:
    """Run ``vm`` with ``bp`` in DR0 through KVM_SET_GUEST_DEBUG and no debugger behind it:
    hardware KVM must end KVM_RUN with KVM_EXIT_DEBUG (the VM stops with status 1),
    PVM lets the guest run to ``pvm_status``."""
    try:
        regs = debugger.debugreg([bp, None, None, None])
        vm.thread.vcpu.set_guest_debug(kvm.KVM_GUESTDBG_ENABLE | kvm.KVM_GUESTDBG_USE_HW_BP | flags, regs)
        status = vm.run()
        if kvm_host == "pvm":
            assert status == pvm_status, vm.reason
        else:
            assert status == 1 and "KVM_EXIT_DEBUG" in vm.reason
    finally:
        vm.close()


@pytest.mark.kvm
def test_user_mode_and_the_debugger(kvm_host):
    """Guest user mode (CPL3) with a hardware breakpoint on its second instruction and
    KVM_GUESTDBG_USE_SW_BP: on hardware KVM the breakpoint ends KVM_RUN; on PVM, where
    user mode runs natively, it never fires and the user-mode int3 goes straight to
    the guest's #BP handler (docs/gdb.md "What works where")."""
    from tinyguest import CODE_ADDR, ENTER_USER_MODE, TinyVm, assemble

    vm = TinyVm(assemble(f""".org 0
        {ENTER_USER_MODE}
    user:
        mov $1, %eax
        mov $2, %ebx                 # the hardware breakpoint
        int3
    1:  jmp 1b
    .org 0x200                       # the #BP handler, at CPL0
        mov $0xbb, %al
        {EXIT}
    """))
    vm.allow_user_mode()
    vm.set_idt({3: CODE_ADDR + 0x200})
    second = CODE_ADDR + len(assemble(f".org 0\n{ENTER_USER_MODE}\nuser:\n")) + 5
    expect_debug_exit_unless_pvm(kvm_host, vm, debugger.HwBreakpoint(1, second, 1), 0xBB,
                                 kvm.KVM_GUESTDBG_USE_SW_BP)
