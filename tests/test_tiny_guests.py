"""Fast KVM tests with tiny assembled guests (no Linux): exits, slots, fix-ups."""

from __future__ import annotations

import struct

import pytest

from pyvmm import kvm

from pyvmm.trace import TraceOutput, parse_trace
from tinyguest import CODE_ADDR, ENTER_USER_MODE, Recorder, TinyVm, assemble

pytestmark = pytest.mark.kvm

EXIT = "mov $0x501, %dx\n out %al, %dx\n"   # debug-exit with status AL
MMIO_BASE = 0xD0000000


@pytest.fixture
def tiny(kvm_host):
    made = []

    def make(source: str) -> TinyVm:
        vm = TinyVm(assemble(f".org 0\n{source}"))
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()


def test_port_io_out_and_in(tiny):
    vm = tiny(f"""
        mov $0x42, %al
        out %al, $0x80          # byte OUT
        mov $0x1234, %ax
        out %ax, $0x82          # word OUT
        in $0x84, %eax          # dword IN from the recorder
        out %eax, $0x80
        mov $7, %al
        {EXIT}
    """)
    dev = Recorder(value=bytes.fromhex("efbeadde"))
    vm.pio.register(0x80, 8, dev)
    assert vm.run() == 7
    assert dev.writes == [(0, b"\x42"), (2, b"\x34\x12"), (0, bytes.fromhex("efbeadde"))]
    assert dev.reads == [(4, 4)]


def test_string_port_io(tiny):
    vm = tiny(f"""
        lea data(%rip), %rsi
        mov $3, %ecx
        mov $0x80, %dx
        rep outsb               # one exit, count 3
        mov $0, %al
        {EXIT}
    data: .byte 1, 2, 3
    """)
    dev = Recorder()
    vm.pio.register(0x80, 1, dev)
    assert vm.run() == 0
    assert dev.writes == [(0, b"\x01"), (0, b"\x02"), (0, b"\x03")]


def test_mmio_read_and_write(tiny):
    vm = tiny(f"""
        mov ${MMIO_BASE:#x}, %ebx
        movl $0x12345678, (%rbx)
        mov 8(%rbx), %eax
        out %eax, $0x80
        movb $0x99, 3(%rbx)
        mov $3, %al
        {EXIT}
    """)
    dev = Recorder(value=bytes.fromhex("0df0adba"))
    vm.mmio.register(MMIO_BASE, 0x1000, dev)
    port = Recorder()
    vm.pio.register(0x80, 4, port)
    assert vm.run() == 3
    assert dev.writes == [(0, struct.pack("<I", 0x12345678)), (3, b"\x99")]
    assert dev.reads == [(8, 4)]
    assert port.writes == [(0, bytes.fromhex("0df0adba"))]


def test_unclaimed_accesses_are_harmless(tiny):
    vm = tiny(f"""
        in $0x90, %al           # nobody there: reads all ones
        out %al, $0x80
        mov ${MMIO_BASE:#x}, %ebx
        mov (%rbx), %eax
        out %eax, $0x80
        movl $1, (%rbx)         # dropped
        mov $0, %al
        {EXIT}
    """)
    port = Recorder()
    vm.pio.register(0x80, 4, port)
    assert vm.run() == 0
    assert port.writes == [(0, b"\xff"), (0, b"\xff\xff\xff\xff")]
    assert vm.pio.unclaimed[0x90] == 1 and vm.mmio.unclaimed[MMIO_BASE] == 2


def test_memory_slot_added_and_removed_at_run_time(tiny):
    """The guest reads one address three times: MMIO hole, a new slot, hole again."""
    addr = 0x400000  # above the 2 MiB of RAM
    vm = tiny(f"""
        mov ${addr:#x}, %ebx
        mov (%rbx), %eax
        out %eax, $0x80         # 1: no slot: an MMIO exit, unclaimed -> ff
        in $0x84, %al           # the VMM adds a slot here
        mov (%rbx), %eax
        out %eax, $0x80         # 2: the slot's bytes
        in $0x85, %al           # the VMM removes it here
        mov (%rbx), %eax
        out %eax, $0x80         # 3: MMIO again
        mov $0, %al
        {EXIT}
    """)
    import mmap
    import ctypes

    page = mmap.mmap(-1, 0x1000)
    page[:4] = b"SLOT"
    host = ctypes.addressof(ctypes.c_char.from_buffer(page))
    added = {}

    def on_read(offset, size):
        if offset == 0:
            added["slot"] = vm.slots.add(addr, 0x1000, host)
        else:
            vm.slots.remove(added["slot"])

    ctl = Recorder()
    ctl.on_read = on_read
    out = Recorder()
    vm.pio.register(0x80, 4, out)
    vm.pio.register(0x84, 2, ctl)
    assert vm.run() == 0
    assert [w for _, w in out.writes] == [b"\xff" * 4, b"SLOT", b"\xff" * 4]


def test_debug_exit_status(tiny):
    vm = tiny(f"mov $0xAB, %al\n{EXIT}")
    assert vm.run() == 0xAB
    assert vm.reason == "debug-exit"


def test_int3_int_n_and_fwait_are_finished(tiny, kvm_host, tmp_path):
    """int3 and INT n at CPL0 run their IDT handlers and return; fwait is skipped.

    On PVM hosts these end KVM_RUN with an emulation failure and pyvmm
    finishes them; on hardware KVM they run natively and the test still
    checks the guest-visible result.
    """
    vm = tiny(f"""
        int3
        out %al, $0x81          # after the #BP handler returned
        int $0x40
        out %al, $0x82
        fwait
        out %al, $0x83
        mov $0, %al
        {EXIT}
    .org 0x100                       # bp_handler
        out %al, $0x80
        iretq
    .org 0x110                       # int40_handler
        out %al, $0x84
        iretq
    """)
    vm.set_idt({3: CODE_ADDR + 0x100, 0x40: CODE_ADDR + 0x110})
    dev = Recorder()
    vm.pio.register(0x80, 5, dev)
    trace = TraceOutput(parse_trace(f"exits={tmp_path / 'trace'},fixup"))
    vm.watch(trace)
    assert vm.run() == 0, vm.reason
    trace.close()
    assert [off for off, _ in dev.writes] == [0, 1, 4, 2, 3]
    if kvm_host == "pvm":
        assert vm.thread.fixups == {"int3": 1, "int 0x40": 1, "fwait": 1}
        assert [line.split(" ", 2)[2] for line in (tmp_path / "trace").read_text().splitlines()] == \
            ["FIXUP int3", "FIXUP int 0x40", "FIXUP fwait"]


def test_unknown_emulation_failure_stops_with_registers(tiny, kvm_host):
    if kvm_host != "pvm":
        pytest.skip("only the PVM flavour fails to emulate xgetbv at CPL0")
    vm = tiny("xor %ecx, %ecx\n xgetbv\n mov $0, %al\n" + EXIT)
    assert vm.run() == 1
    assert "could not emulate the instruction 0f 01 d0" in vm.reason
    assert "RIP=" in vm.reason


def test_efault_from_a_readonly_window_becomes_gp(tiny, kvm_host, tmp_path):
    """A user-mode store into a read-only hole of a DAX window: KVM_RUN fails with
    EFAULT (measured on PVM); pyvmm injects #GP(0), the guest's handler runs, and
    the VM goes on."""
    from pyvmm.devices.virtio.dax_window import DaxWindow

    window_gpa, report = 0xC0000000, 0xD0000000
    vm = tiny(f"""{ENTER_USER_MODE}
    user:
        mov ${window_gpa:#x}, %ebx
        mov (%rbx), %eax             # a hole reads as zeros
        mov ${report:#x}, %ecx
        mov %eax, (%rcx)
        movl $1, (%rbx)              # a store into the read-only hole: EFAULT -> #GP
    1:  jmp 1b
    .org 0x100                       # gp_handler
        mov (%rsp), %rax             # the error code
        mov ${report:#x}, %ecx
        mov %eax, 4(%rcx)
        movl $0, 8(%rcx)             # done
    2:  jmp 2b
    """)
    window = DaxWindow(2 << 20)
    try:
        vm.allow_user_mode()
        vm.set_idt({13: CODE_ADDR + 0x100})
        vm.slots.add(window_gpa, window.size, window.host_addr)
        out = Recorder()
        vm.mmio.register(report, 8, out)

        class Done:
            def read(self, offset, size):
                return b"\0" * size

            def write(self, offset, data):
                vm._exit(0, "done")

        vm.mmio.register(report + 8, 4, Done())
        trace = TraceOutput(parse_trace(f"exits={tmp_path / 'trace'},efault"))
        vm.watch(trace)
        assert vm.run() == 0, vm.reason
        trace.close()
        lines = (tmp_path / "trace").read_text().splitlines()
        assert len(lines) == vm.thread.memory_faults and all(" EFAULT rip=0x" in x for x in lines)
        assert out.writes == [(0, b"\0" * 4), (4, b"\0" * 4)]   # zeros, then #GP error code 0
        print(f"KVM flavour {kvm_host}: {vm.thread.memory_faults} EFAULT(s) turned into #GP")
        assert vm.thread.memory_faults >= 1
    finally:
        window.close()



# --- the exit trace and statistics (--trace exits, --stats: pyvmm.trace) ------------------------
TRACED_GUEST = f"""
        mov $0x41, %al
        out %al, $0x80          # 1: IO out
        in $0x81, %al           # 2: IO in (the port answers 5a)
        mov ${MMIO_BASE:#x}, %ebx
        movl $0x12345678, (%rbx)   # 3: MMIO write
        mov $7, %al
        {EXIT}                  # 4: the debug-exit write
"""
TRACED_LINES = [
    "vcpu0 #1 IO out 0x80/1 41 -> port",
    "vcpu0 #2 IO in 0x81/1 5a -> port",
    f"vcpu0 #3 MMIO write {MMIO_BASE:#x}/4 12345678 -> mem",
    "vcpu0 #4 IO out 0x501/1 07 -> debug-exit",
]


def traced(tiny, tmp_path, spec: str):
    """Run TRACED_GUEST with ``--trace exits=FILE,spec``: (its trace lines, the VM, its watch)."""
    path = tmp_path / "trace.log"
    vm = tiny(TRACED_GUEST)
    vm.pio.register(0x80, 2, Recorder(value=b"\x5a"), "port")
    vm.mmio.register(MMIO_BASE, 0x1000, Recorder(), "mem")
    out = TraceOutput(parse_trace(f"exits={path}{spec}"))
    watch = vm.watch(out)
    assert vm.run() == 7, vm.reason
    out.close()
    return path.read_text().splitlines(), vm, watch


def test_trace_is_each_exit_in_order(tiny, tmp_path):
    lines, _, _ = traced(tiny, tmp_path, "")
    assert lines == TRACED_LINES


@pytest.mark.parametrize("spec, shown", [
    (",io", [0, 1, 3]),
    (",port=0x80-0x81", [0, 1]),
    (",port=0x501", [3]),
    (",mmio", [2]),
    (",addr=0xd0000000-0xd0000fff", [2]),
    (",addr=0xd0001000", []),
    (",mmio,port=0x81", [1, 2]),
    (",vcpu=0", [0, 1, 2, 3]),
    (",vcpu=1", []),
    (",fixup,efault", []),
])
def test_trace_filters(tiny, tmp_path, spec, shown):
    lines, _, _ = traced(tiny, tmp_path, spec)
    assert lines == [TRACED_LINES[i] for i in shown]


def test_stats_count_every_exit(tiny, tmp_path):
    """--stats totals equal the exits the vCPU thread counted, by reason and by device."""
    from pyvmm.trace import RunCounters, format_stats

    _, vm, watch = traced(tiny, tmp_path, ",vcpu=1")   # counted, not traced
    assert vm.thread.exits == 4 == sum(watch.reasons.values()) == watch.seq
    assert watch.reasons == {kvm.KVM_EXIT_IO: 3, kvm.KVM_EXIT_MMIO: 1}
    assert watch.accesses == {("port", "out"): 1, ("port", "in"): 1, ("mem", "write"): 1,
                              ("debug-exit", "out"): 1}
    report = format_stats(RunCounters(seconds=1.0, first_run=None, setup=0.0, watches=[watch],
                                      fixups=vm.thread.fixups, memory_faults=[vm.thread.memory_faults],
                                      buses=[vm.pio, vm.mmio]))
    assert "pyvmm: stats: 4 exits to pyvmm" in report
    assert "by reason: IO 3, MMIO 1\n" in report
    assert "by device and direction: debug-exit out 1, mem write 1, port in 1, port out 1\n" in report
