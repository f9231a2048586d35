"""--profile (pyvmm.profile): call decoding, symbols, call chains and the report by hand;
the sampler on a tiny guest spinning at CPL0 and at CPL3."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time

import pytest
from tinyguest import CODE_ADDR, ENTER_USER_MODE, TinyVm, assemble

from pyvmm import profile
from pyvmm.profile import (HALTED, INDIRECT, KERNEL, NOT_STARTED, USER, GuestSampler, KernelSymbols,
                           VcpuSamples, call_before, call_chain, format_profile, write_profile)


# --- call_before: the call instruction just before a return address ------------------
@pytest.mark.parametrize("code, target", [
    (bytes.fromhex("e8 fb 0f 00 00"), 0x2000),            # call rel32 (to 0x1005 + 0xffb)
    (bytes.fromhex("90 e8 f6 ff ff ff"), 0xFFC),          # call rel32 backwards (0x1006 - 10)
    (bytes.fromhex("ff d0"), INDIRECT),                   # call *%rax
    (bytes.fromhex("41 ff d3"), INDIRECT),                # call *%r11 (REX.B: ends the same)
    (bytes.fromhex("ff 14 24"), INDIRECT),                # call *(%rsp): SIB
    (bytes.fromhex("ff 50 08"), INDIRECT),                # call *0x8(%rax): disp8
    (bytes.fromhex("ff 90 00 01 00 00"), INDIRECT),       # call *0x100(%rax): disp32
    (bytes.fromhex("ff 15 10 00 00 00"), INDIRECT),       # call *0x10(%rip)
    (bytes.fromhex("ff 54 24 08"), INDIRECT),             # call *0x8(%rsp): SIB + disp8
])
def test_call_before_finds_calls(code, target):
    assert call_before(code, 0x1000 + len(code)) == target


@pytest.mark.parametrize("code", [
    bytes.fromhex("48 89 c7"),                            # mov %rax,%rdi
    bytes.fromhex("ff e0"),                               # jmp *%rax (FF /4)
    bytes.fromhex("ff 50"),                               # FF /2 needing a disp8 it lacks
    bytes.fromhex("ff 15 10 00"),                         # rip-relative cut short
    b"",
])
def test_call_before_rejects_other_bytes(code):
    assert call_before(code, 0x1000) is None


def test_call_before_wraps_a_rel32_to_64_bits():
    top = (1 << 64) - 0x10
    assert call_before(bytes.fromhex("e8 00 01 00 00"), top) == 0xF0


# --- KernelSymbols ----------------------------------------------------------------------
TEXT = 0xFFFFFFFF81000000


def symbols_with_code() -> KernelSymbols:
    """a() calls b() directly at a+0x10; b() calls c() through %rax at b+0x20."""
    code = bytearray(b"\x90" * 0x3000)
    a, b = 0x0000, 0x1000
    rel = (TEXT + 0x2000) - (TEXT + a + 0x45)
    code[a + 0x10:a + 0x15] = b"\xe8" + struct.pack("<i", (TEXT + b) - (TEXT + a + 0x15))
    code[b + 0x20:b + 0x22] = b"\xff\xd0"
    code[a + 0x40:a + 0x45] = b"\xe8" + struct.pack("<i", rel)   # a -> c, not seen below
    syms = [(TEXT + a, 0x100, "a"), (TEXT + b, 0x100, "b"), (TEXT + 0x2000, 0x100, "c"),
            (TEXT + 0x2800, 0, "asm_entry")]
    return KernelSymbols(syms, [(TEXT, bytes(code))])


def test_symbol_at_uses_sizes_and_size_zero_reaches_the_next():
    s = symbols_with_code()
    assert s.symbol_at(TEXT + 0x1010) == (TEXT + 0x1000, "b")
    assert s.symbol_at(TEXT + 0x1100) is None            # past b's size
    assert s.symbol_at(TEXT + 0x2FFF) == (TEXT + 0x2800, "asm_entry")   # size 0: up to the next one
    assert s.symbol_at(TEXT - 1) is None
    assert len(s) == 4


def test_code_before_stays_in_the_section():
    s = symbols_with_code()
    assert s.code_before(TEXT + 0x15) == bytes(code_of(s)[0x0D:0x15])
    assert s.code_before(TEXT + 3) == bytes(code_of(s)[:3])
    assert s.code_before(TEXT) is None
    assert s.code_before(TEXT + 0x3001) is None


def code_of(s: KernelSymbols) -> bytes:
    return s._code[0][1]


def test_call_chain_follows_calls_to_the_function_found_so_far():
    s = symbols_with_code()
    ret_in_a, ret_in_b = TEXT + 0x15, TEXT + 0x1022
    stale = TEXT + 0x45          # a real call site in a, but of c: not b's caller
    junk = TEXT + 0x2810         # no call before it
    chain = call_chain(TEXT + 0x2004, (junk, ret_in_b, stale, ret_in_a), s)
    assert chain == ["c", "b", "a"]
    assert call_chain(TEXT + 0x2004, (stale,), s) == ["c", "a"]   # a direct call to c: a
    assert call_chain(0x1234, (ret_in_a,), s) == []               # RIP outside every symbol


# --- VcpuSamples and the report ---------------------------------------------------------
def test_samples_table_is_bounded_and_a_full_one_still_counts_known_rips(monkeypatch):
    monkeypatch.setattr(profile, "MAX_DISTINCT", 3)
    s = VcpuSamples()
    for rip in range(10):
        s.add(TEXT + rip)
    assert s.total == 10 and len(s.counts) == 4
    assert s.counts[profile.OTHER] == 7
    s.add(TEXT + 1, KERNEL, (TEXT + 0x15,))       # a new stack, a known RIP: the RIP counts
    assert s.counts[(TEXT + 1, KERNEL, b"")] == 2 and len(s.counts) == 4
    assert "[not kept: the table of samples was full]" in format_profile([s], KernelSymbols([]), 1000)


def test_report_self_total_user_and_shares():
    s = symbols_with_code()
    v0, v1 = VcpuSamples(), VcpuSamples()
    for _ in range(6):
        v0.add(TEXT + 0x2004, KERNEL, (TEXT + 0x1022, TEXT + 0x15))  # c <- b <- a
    for _ in range(2):
        v1.add(TEXT + 0x1004)                                        # b
    for _ in range(2):
        v1.add(0x401000, USER)
    report = format_profile([v0, v1], s, 1000)
    first, *rest = report.splitlines()
    assert first == ("guest profile: 10 samples at 1000 Hz (vcpu0 6, vcpu1 4): "
                     "kernel 80.0%, user 20.0%")
    own = rest[rest.index("self: where the vCPUs were") + 2:]
    assert own[:3] == ["       6   60.0  c", "       2   20.0  [user mode]", "       2   20.0  b"]
    total = rest[rest.index("total: in the function or what it called (callers guessed "
                            "from the stack)") + 2:]
    assert total[:3] == ["       8   80.0  b", "       6   60.0  a", "       6   60.0  c"]


def test_report_counts_halted_and_not_started_vcpus_apart():
    v0, v1 = VcpuSamples(), VcpuSamples()
    v0.add(TEXT, KERNEL)
    v0.add(TEXT + 1, HALTED)
    v1.add(0, NOT_STARTED)
    v1.add(0, NOT_STARTED)
    report = format_profile([v0, v1], KernelSymbols([]), 1000)
    assert report.startswith("guest profile: 4 samples at 1000 Hz (vcpu0 2, vcpu1 2): kernel 25.0%, "
                             "user 0.0%, halted 25.0%, not started 50.0%\n")
    assert "       2   50.0  [not started yet]" in report and "[halted: idle]" in report


def test_report_without_symbols_or_samples():
    v = VcpuSamples()
    v.add(TEXT + 0x10)
    report = format_profile([v], KernelSymbols([]), 500)
    assert f"[kernel {TEXT + 0x10:#x}]" in report
    assert "no kernel symbols" in report
    assert "total:" not in report        # nothing to add up without callers
    assert format_profile([VcpuSamples()], KernelSymbols([]), 500) == \
        "guest profile: no samples (vcpu0 0)\n"


def test_report_keeps_the_top_functions():
    v = VcpuSamples()
    syms = KernelSymbols([(TEXT + i * 0x10, 0x10, f"f{i}") for i in range(5)])
    for i in range(5):
        for _ in range(i + 1):
            v.add(TEXT + i * 0x10)
    lines = format_profile([v], syms, 1000, top=2).splitlines()
    assert lines[4:7] == ["       5   33.3  f4", "       4   26.7  f3", " " * 17 + "(3 more functions)"]


def test_write_profile_to_a_file_or_stderr(tmp_path, capsys, caplog):
    import sys

    write_profile("report\n", str(tmp_path / "p.txt"), sys.stderr)
    assert (tmp_path / "p.txt").read_text() == "report\n"
    write_profile("report\n", None, sys.stderr)
    assert capsys.readouterr().err == "report\n"
    write_profile("report\n", str(tmp_path / "no" / "p.txt"), sys.stderr)   # a warning only
    assert "cannot write" in caplog.text


# --- KernelSymbols.from_elf on a real linked ELF ----------------------------------------
@pytest.fixture
def small_elf(tmp_path):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed (it builds the guest kernel too)")
    src = tmp_path / "k.c"
    src.write_text("__attribute__((noinline)) int inner(int x) { return x * 3 + 1; }\n"
                   "int outer(int x) { return inner(x) + 1; }\n"
                   "void _start(void) { for (;;) outer(1); }\n")
    out = tmp_path / "k.elf"
    subprocess.run(["gcc", "-O1", "-fno-pie", "-no-pie", "-nostdlib", "-static", "-o", str(out),
                    str(src)], check=True, capture_output=True)
    return out


def test_from_elf_reads_functions_and_code(small_elf):
    syms = KernelSymbols.from_elf(str(small_elf))
    names = {name for _, _, name in syms._symbols}
    assert {"inner", "outer", "_start"} <= names
    inner = next(start for start, _, name in syms._symbols if name == "inner")
    outer = next((start, size) for start, size, name in syms._symbols if name == "outer")
    # outer's call of inner: a return address in outer after E8 targeting inner
    calls = [a for a in range(outer[0] + 1, outer[0] + outer[1] + 1)
             if call_before(syms.code_before(a) or b"", a) == inner]
    assert len(calls) == 1
    assert call_chain(inner + 1, (calls[0],), syms) == ["inner", "outer"]


def test_from_elf_on_other_files(tmp_path, caplog):
    (tmp_path / "bz").write_bytes(b"MZ" + bytes(100))
    assert len(KernelSymbols.from_elf(str(tmp_path / "bz"))) == 0
    (tmp_path / "bad.elf").write_bytes(b"\x7fELF" + bytes(10))
    assert len(KernelSymbols.from_elf(str(tmp_path / "bad.elf"))) == 0
    assert len(KernelSymbols.from_elf(str(tmp_path / "missing"))) == 0
    assert "cannot read" in caplog.text


# --- the sampler on tiny guests (real KVM) -----------------------------------------------
SPIN_SECONDS = 0.3


def spin_and_sample(vm: TinyVm) -> VcpuSamples:
    sampler = GuestSampler([vm.thread], vm.mem, hz=500)
    sampler.start()
    vm.thread.start()
    try:
        time.sleep(SPIN_SECONDS)
    finally:
        sampler.stop()
        vm._exit(0, "test over")
        vm.thread.kick()
        vm.thread.thread.join(5)
    assert not vm.thread.thread.is_alive()
    return vm.thread.samples


@pytest.mark.kvm
def test_sampler_finds_a_kernel_mode_spin(kvm_host):
    vm = TinyVm(assemble(".org 0\n nop\nspin: jmp spin\n"))
    try:
        samples = spin_and_sample(vm)
    finally:
        vm.close()
    assert samples.total > 0
    rips = {rip for rip, _, _, _ in samples.samples()}
    modes = {mode for _, mode, _, _ in samples.samples()}
    assert rips <= {CODE_ADDR, CODE_ADDR + 1}, [hex(r) for r in rips]   # the nop, or the spin
    assert modes == {KERNEL}
    report = format_profile([samples], KernelSymbols([]), 500)
    assert f"[kernel {CODE_ADDR + 1:#x}]" in report and "kernel 100.0%" in report


@pytest.mark.kvm
def test_sampler_tells_user_mode(kvm_host):
    vm = TinyVm(assemble(f".org 0\n{ENTER_USER_MODE}\nuser: jmp user\n"))
    vm.allow_user_mode()
    try:
        samples = spin_and_sample(vm)
    finally:
        vm.close()
    user_samples = sum(n for _, mode, _, n in samples.samples() if mode == USER)
    assert user_samples > 0
    assert all(callers == () for _, mode, callers, _ in samples.samples() if mode == USER)
    assert "[user mode]" in format_profile([samples], KernelSymbols([]), 500)


@pytest.mark.kvm
def test_sampler_tells_a_halted_vcpu(kvm_host):
    vm = TinyVm(assemble(".org 0\n cli\n hlt\n jmp .\n"))   # no interrupt will wake it
    try:
        samples = spin_and_sample(vm)
    finally:
        vm.close()
    assert samples.total > 0
    halted = sum(n for _, mode, _, n in samples.samples() if mode == HALTED)
    assert halted > 0 and halted >= samples.total - 2, samples.counts   # a sample may beat the hlt


class FakeVcpu:
    """KVM_GET_MP_STATE, KVM_GET_REGS, KVM_GET_SREGS and KVM_TRANSLATE, as a sample uses them."""

    def __init__(self, rip: int, rsp: int, cpl: int = 0, gpa: int | None = 0x1000,
                 mp_state: int = 0, translate_error: bool = False) -> None:
        from pyvmm import kvm

        self.regs = kvm.kvm_regs(rip=rip, rsp=rsp)
        self.sregs = kvm.kvm_sregs()
        self.sregs.cs.selector = 0x10 | cpl
        self.gpa, self.mp_state, self.translate_error = gpa, mp_state, translate_error

    def get_mp_state(self):
        return self.mp_state

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def translate(self, addr):
        from pyvmm import kvm

        if self.translate_error:
            raise kvm.KvmError(22, "KVM_TRANSLATE: Invalid argument")
        t = kvm.kvm_translation(linear_address=addr)
        if self.gpa is not None:
            t.valid, t.physical_address = 1, self.gpa + addr % 4096
        return t


def test_a_kernel_sample_keeps_the_stack_words_that_point_into_the_kernel_image():
    from pyvmm.memory import GuestMemory

    mem = GuestMemory(2 << 20)
    try:
        words = [0x1234, TEXT + 0x15, 0xFFFF888000001000, TEXT + 0x1022, 0]
        mem.write(0x1000 + 0xFF0, struct.pack("<2Q", TEXT + 1, TEXT + 2))    # the page's last 16 bytes
        mem.write(0x1000 + 0x100, struct.pack(f"<{len(words)}Q", *words))
        s = VcpuSamples(mem)
        s.take(FakeVcpu(TEXT + 0x2004, rsp=0x7000_0100))
        s.take(FakeVcpu(TEXT + 0x2004, rsp=0x7000_0FF0))                        # stops at the page end
        s.take(FakeVcpu(TEXT, rsp=0x7000_0100, gpa=0x7FFFF000))                 # outside guest RAM
        s.take(FakeVcpu(TEXT, rsp=0x7000_0100, gpa=None))                       # not mapped
        s.take(FakeVcpu(TEXT, rsp=0x7000_0100, translate_error=True))
        s.take(FakeVcpu(0x401000, rsp=0x7000_0100, cpl=3))                      # user mode: no stack
        s.take(FakeVcpu(0xFFF0, rsp=0, mp_state=1))                             # not started
    finally:
        mem.close()
    assert sorted(s.samples()) == sorted([(TEXT + 0x2004, KERNEL, (TEXT + 0x15, TEXT + 0x1022), 1),
                                          (TEXT + 0x2004, KERNEL, (TEXT + 1, TEXT + 2), 1),
                                          (TEXT, KERNEL, (), 3), (0x401000, USER, (), 1),
                                          (0, NOT_STARTED, (), 1)])
    failing = FakeVcpu(TEXT, rsp=0)
    failing.get_regs = lambda: (_ for _ in ()).throw(OSError(9, "Bad file descriptor"))
    s.take(failing)                                                             # lost, not raised
    assert s.lost == 1 and "(1 lost: the vCPU's state could not be read)" in \
        format_profile([s], KernelSymbols([]), 1000).splitlines()[0]
