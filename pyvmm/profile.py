"""Sampling the guest (``--profile[=FILE]``): where does the guest's time go?

A sampler thread (VMM side) kicks every vCPU thread ``PROFILE_HZ`` times a
second.  The kicked thread comes back from KVM_RUN with KVM_EXIT_INTR and
takes a sample (``VcpuSamples.take``): whether the vCPU was started and
running (KVM_GET_MP_STATE: a halted vCPU is idle), its RIP (KVM_GET_REGS),
whether it ran in user mode (CPL 3, from CS in KVM_GET_SREGS) and, in kernel
mode, the words on top of its stack that point into the kernel image.

When the VM ends, ``format_profile`` names the functions with the symbol
table of the kernel that booted (an ELF ``vmlinux``; a bzImage has none, so
its addresses are shown as they are).  Of the stack words it keeps those
just after a call to the function found so far (``call_chain``): a guess at
the callers, like Linux's own UNWINDER_GUESS for kernels without frame
pointers.  The report has two tables::

    guest profile: 12944 samples at 1000 Hz (vcpu0 12944): kernel 100.0%, user 0.0%

    self: where the vCPUs were
     samples      %  function
         822    6.4  memmap_init_range
    ...
    total: in the function or what it called (callers guessed from the stack)
     samples      %  function
        1531   11.8  memmap_init_range
        1263    9.8  sysvec_apic_timer_interrupt
    ...

On PVM every instruction of guest kernel code runs in KVM's emulator, so a
function's share of the samples is its share of the time (docs/pvm.md).
A sample is one more KVM_RUN return and two or three ioctls: ~20-50 us of
VMM time each.
"""

from __future__ import annotations

import bisect
import logging
import struct
import threading
from typing import TYPE_CHECKING, Iterable, Iterator, TextIO

from . import kvm
from .memory import PAGE_SIZE, GuestMemoryError

if TYPE_CHECKING:
    from .kvm import Vcpu
    from .memory import GuestMemory
    from .vcpu import VcpuThread

log = logging.getLogger(__name__)

PROFILE_HZ = 1000
MAX_DISTINCT = 1 << 15           # per vCPU: (RIP, stack) keys kept; the table stays bounded
# What a vCPU was doing (the second part of a sample's key)
KERNEL, USER, HALTED, NOT_STARTED = range(4)
NOT_STARTED_STATES = (kvm.KVM_MP_STATE_UNINITIALIZED, kvm.KVM_MP_STATE_INIT_RECEIVED,
                      kvm.KVM_MP_STATE_SIPI_RECEIVED)   # an AP before Linux starts it
OTHER = (-1, KERNEL, b"")        # where samples go once the table is full
KERNEL_TEXT = 0xFFFFFFFF80000000    # __START_KERNEL_map: the kernel image lives above
STACK_SCAN = 512                 # bytes of the kernel stack read per sample
MAX_CALLERS = 24                 # candidate return addresses kept per sample
TOP_FUNCTIONS = 40
INDIRECT = -1                    # call_before: an indirect call (its target is unknown)
MODE_NAMES = {USER: "[user mode]", HALTED: "[halted: idle]", NOT_STARTED: "[not started yet]"}


class VcpuSamples:
    """One vCPU's samples: (RIP, mode, candidate return addresses) -> count."""

    def __init__(self, memory: "GuestMemory | None" = None) -> None:
        self.memory = memory
        self.counts: dict[tuple[int, int, bytes], int] = {}
        self.total = 0
        self.lost = 0        # samples whose ioctls failed

    def take(self, vcpu: "Vcpu") -> None:
        """Sample ``vcpu`` (its own thread, out of KVM_RUN); a failing ioctl loses
        the sample, never the vCPU."""
        try:
            mp_state = vcpu.get_mp_state()
            if mp_state in NOT_STARTED_STATES:
                self.add(0, NOT_STARTED)
                return
            regs = vcpu.get_regs()
            if mp_state == kvm.KVM_MP_STATE_HALTED:
                self.add(regs.rip, HALTED)
            elif vcpu.get_sregs().cs.selector & 3 == 3:     # CPL: the low bits of CS
                self.add(regs.rip, USER)
            else:
                callers = self._stack_words(vcpu, regs.rsp) if self.memory is not None else ()
                self.add(regs.rip, KERNEL, callers)
        except OSError:
            self.lost += 1

    def add(self, rip: int, mode: int = 0, callers: tuple[int, ...] = ()) -> None:
        """Count a sample; its stack words are kept packed (8 bytes each), and once
        the table is full a new stack is dropped but its RIP still counts."""
        key = (rip, mode, struct.pack(f"<{len(callers)}Q", *callers))
        counts = self.counts
        if key not in counts and len(counts) >= MAX_DISTINCT:
            key = (rip, mode, b"")
            if key not in counts:
                key = OTHER
        counts[key] = counts.get(key, 0) + 1
        self.total += 1

    def samples(self) -> "Iterator[tuple[int, int, tuple[int, ...], int]]":
        """(RIP, mode, stack words, count) for each key."""
        for (rip, mode, packed), n in self.counts.items():
            yield rip, mode, struct.unpack(f"<{len(packed) // 8}Q", packed), n

    def _stack_words(self, vcpu: "Vcpu", rsp: int) -> tuple[int, ...]:
        """The words from RSP to the end of its page (at most STACK_SCAN bytes) that
        point into the kernel image."""
        n = min(STACK_SCAN, PAGE_SIZE - rsp % PAGE_SIZE) // 8 * 8
        try:   # RSP is the guest's: it may point anywhere, or nowhere
            t = vcpu.translate(rsp)
            if not t.valid or n == 0:
                return ()
            data = self.memory.read(t.physical_address, n)
        except (GuestMemoryError, OSError):
            return ()
        words = struct.unpack(f"<{n // 8}Q", data)
        return tuple(w for w in words if w >= KERNEL_TEXT)[:MAX_CALLERS]


class GuestSampler:
    """Asks each vCPU thread for a sample ``hz`` times a second until stopped."""

    def __init__(self, threads: "list[VcpuThread]", memory: "GuestMemory | None",
                 hz: int = PROFILE_HZ) -> None:
        self.threads = threads
        self.hz = hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="profile", daemon=True)
        for t in threads:
            t.samples = VcpuSamples(memory)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        interval = 1.0 / self.hz
        while not self._stop.wait(interval):
            for t in self.threads:
                t.request_sample()


class KernelSymbols:
    """Function symbols and code of a kernel image: ``symbol_at(rip)``, ``code_before(addr)``."""

    def __init__(self, symbols: Iterable[tuple[int, int, str]],
                 code: Iterable[tuple[int, bytes]] = ()) -> None:
        ordered = sorted(s for s in symbols if s[0])
        self._starts = [s[0] for s in ordered]
        self._symbols = ordered
        self._code = sorted(code)          # (address, bytes) of the executable sections
        self._code_starts = [c[0] for c in self._code]

    @classmethod
    def from_elf(cls, path: str) -> "KernelSymbols":
        """The STT_FUNC symbols and executable sections of an ELF file (none for a
        bzImage or a stripped image).  The code comes from the file, not from the
        guest: the kernel frees its init code once it has booted."""
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    return cls([])
                f.seek(0)
                from elftools.common.exceptions import ELFError
                from elftools.elf.constants import SH_FLAGS
                from elftools.elf.elffile import ELFFile   # pyvmm's ELF reader (pyvmm.boot.pvh)

                try:
                    elf = ELFFile(f)
                    table = elf.get_section_by_name(".symtab")
                    if table is None:
                        return cls([])
                    symbols = [(s["st_value"], s["st_size"], s.name) for s in table.iter_symbols()
                               if s["st_info"]["type"] == "STT_FUNC"]
                    code = [(sec["sh_addr"], sec.data()) for sec in elf.iter_sections()
                            if sec["sh_type"] == "SHT_PROGBITS"
                            and sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR]
                    return cls(symbols, code)
                except ELFError as e:
                    log.warning("profile: cannot read the symbols of %s: %s", path, e)
                    return cls([])
        except OSError as e:
            log.warning("profile: cannot read %s: %s", path, e.strerror)
            return cls([])

    def __len__(self) -> int:
        return len(self._symbols)

    def symbol_at(self, rip: int) -> tuple[int, str] | None:
        """(start, name) of the function containing ``rip``; a symbol of size 0
        (assembly) reaches to the next one."""
        i = bisect.bisect_right(self._starts, rip) - 1
        if i < 0:
            return None
        start, size, name = self._symbols[i]
        if size and rip >= start + size:
            return None
        return start, name

    def code_before(self, addr: int, size: int = 8) -> bytes | None:
        """Up to ``size`` bytes of code just before ``addr`` (None: not in the image's code)."""
        i = bisect.bisect_right(self._code_starts, addr - 1) - 1
        if i < 0:
            return None
        start, data = self._code[i]
        if not start < addr <= start + len(data):
            return None
        return data[max(0, addr - start - size):addr - start]


def call_before(code: bytes, addr: int) -> int | None:
    """The call instruction that ends ``code`` (the bytes just before ``addr``), if any
    (Intel SDM vol. 2, CALL): its target for E8 rel32; INDIRECT for FF /2 through a
    register, [reg], [reg+disp8], [reg+disp32] or [rip+disp32]; None: no call."""
    if len(code) >= 5 and code[-5] == 0xE8:
        return (addr + int.from_bytes(code[-4:], "little", signed=True)) & ((1 << 64) - 1)
    for size in (2, 3, 4, 6, 7):
        if len(code) < size or code[-size] != 0xFF:
            continue
        modrm = code[-size + 1]
        if (modrm >> 3) & 7 != 2:
            continue
        mod, rm = modrm >> 6, modrm & 7
        # the length this ModRM gives (no prefixes): opcode, ModRM, SIB, displacement
        length = 2 + (rm == 4 and mod != 3) + {0: 4 if rm == 5 else 0, 1: 1, 2: 4, 3: 0}[mod]
        if length == size:
            return INDIRECT
    return None


def call_chain(rip: int, candidates: tuple[int, ...], symbols: KernelSymbols) -> list[str]:
    """The functions a kernel sample was in, innermost first: RIP's, then that of
    each candidate return address whose call went to the function found so far
    (a direct call must target its start; an indirect one cannot be checked).
    A tail call breaks the chain: the callers above it are not found."""
    current = symbols.symbol_at(rip)
    if current is None:
        return []
    chain = [current[1]]
    for addr in candidates:
        code = symbols.code_before(addr)
        target = call_before(code, addr) if code else None
        if target is None or (target != INDIRECT and target != current[0]):
            continue
        caller = symbols.symbol_at(addr)
        if caller is not None:
            current = caller
            chain.append(caller[1])
    return chain


def format_profile(samples: "list[VcpuSamples]", symbols: KernelSymbols, hz: int,
                   top: int = TOP_FUNCTIONS) -> str:
    """The report: the kernel/user split, then the ``top`` functions by their own
    samples (self), and by the samples they or their callees took (total)."""
    total = sum(s.total for s in samples)
    per_vcpu = ", ".join(f"vcpu{i} {s.total}" for i, s in enumerate(samples))
    if total == 0:
        return f"guest profile: no samples ({per_vcpu})\n"
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    modes = [0] * 4
    for s in samples:
        for rip, mode, callers, n in s.samples():
            modes[mode] += n
            if (rip, mode) == OTHER[:2]:
                names = ["[not kept: the table of samples was full]"]
            elif mode != KERNEL:
                names = [MODE_NAMES[mode]]
            else:
                names = call_chain(rip, callers, symbols) or [f"[kernel {rip:#x}]"]
            own[names[0]] = own.get(names[0], 0) + n
            for name in set(names):
                inclusive[name] = inclusive.get(name, 0) + n
    lost = sum(s.lost for s in samples)
    shares = ", ".join(f"{label} {100 * modes[mode] / total:.1f}%"
                       for mode, label in ((KERNEL, "kernel"), (USER, "user"), (HALTED, "halted"),
                                           (NOT_STARTED, "not started"))
                       if modes[mode] or mode in (KERNEL, USER))
    lost_note = f" ({lost} lost: the vCPU's state could not be read)" if lost else ""
    lines = [f"guest profile: {total} samples at {hz} Hz ({per_vcpu}): {shares}{lost_note}", "",
             "self: where the vCPUs were", f"{'samples':>8} {'%':>6}  function"]
    lines += _top(own, total, top)
    if inclusive != own:
        lines += ["", "total: in the function or what it called (callers guessed from the stack)",
                  f"{'samples':>8} {'%':>6}  function"]
        lines += _top(inclusive, total, top)
    if not len(symbols):
        lines.append("(no kernel symbols: the kernel is not an ELF vmlinux with a symbol table)")
    return "\n".join(lines) + "\n"


def _top(counts: dict[str, int], total: int, top: int) -> list[str]:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"{n:8d} {100 * n / total:6.1f}  {name}" for name, n in ordered[:top]]
    if len(ordered) > top:
        lines.append(f"{'':8} {'':6}  ({len(ordered) - top} more functions)")
    return lines


def write_profile(report: str, path: str | None, stderr: TextIO) -> None:
    """The report to ``path`` (None: ``stderr``); a file we cannot write is a warning."""
    if path is None:
        stderr.write(report)
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(report)
    except OSError as e:
        log.warning("profile: cannot write %s: %s", path, e.strerror)


__all__ = ["PROFILE_HZ", "GuestSampler", "KernelSymbols", "VcpuSamples", "call_before",
           "call_chain", "format_profile", "write_profile"]
