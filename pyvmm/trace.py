"""Watching the VMM work: the exit trace (``--trace exits``) and exit statistics (``--stats``).

A ``VcpuWatch`` wraps one vCPU thread's exit dispatch.  The thread picks the
wrapped or the plain dispatch once, when it starts (``VcpuThread.watch``), so
a VM that nobody watches runs exactly the plain loop.  Watched, every exit is
counted by reason and by (device, direction), and, when a trace is on and the
filter shows it, written as one line after the device served it::

    vcpu0 #412 IO out 0x3f8/1 41 -> serial
    vcpu0 #413 IO in 0x3fd/1 60 -> serial
    vcpu0 #980 MMIO write 0xfebd4000/4 00000001 -> virtio-VirtioConsole.bar0
    vcpu0 #981 FIXUP int3
    vcpu0 #982 EFAULT rip=0xffffffff81234567 -> #GP

The sequence number counts that vCPU's KVM_RUN returns (EFAULTs included).
IO data is the element(s) written or read, MMIO data the value, both as
little-endian numbers in hex.  ``format_stats`` turns the counters of a run
into the ``--stats`` report (docs/cli.md).
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TextIO

from . import kvm
from .bus import Bus

if TYPE_CHECKING:
    from .kvm import Vcpu

KINDS = ("io", "mmio", "fixup", "efault", "other")
MAX_IO_ELEMENTS = 16          # string I/O: elements shown per trace line
MAX_UNCLAIMED_SHOWN = 8       # per bus, in the statistics
KERNEL_SIDE = ("the kernel's side of the same exits (and those KVM handles itself): "
               "kvm_stat, or perf kvm stat live / perf kvm stat record + report")

# Ranges a filter item may name: port=, addr= and vcpu= limits.
_LIMITS = {"port": 0xFFFF, "addr": (1 << 64) - 1, "vcpu": 1023}


class TraceSpecError(ValueError):
    """A --trace value we cannot use (the CLI prints it as one line, exit 2)."""


@dataclass(frozen=True)
class TraceSpec:
    """``exits[=FILE][,FILTER]...``: where trace lines go and which exits they show.

    FILTER is a kind (io, mmio, fixup, efault, other), port=N[-M], addr=N[-M] or
    vcpu=N[-M].  Without a kind every kind is shown, except that port= alone
    means io and addr= alone means mmio; port= ranges narrow io, addr= ranges
    narrow mmio, vcpu= ranges narrow everything; repeated items add up.
    """

    path: str | None = None                  # None: stderr
    kinds: frozenset[str] = frozenset(KINDS)
    ports: tuple[tuple[int, int], ...] = ()
    addrs: tuple[tuple[int, int], ...] = ()
    vcpus: tuple[tuple[int, int], ...] = ()

    def shows_vcpu(self, index: int) -> bool:
        return not self.vcpus or _within(self.vcpus, index)

    def shows(self, kind: str, address: int = 0) -> bool:
        """Whether a ``kind`` exit at ``address`` is shown (the vCPU is checked once)."""
        if kind not in self.kinds:
            return False
        if kind == "io":
            return not self.ports or _within(self.ports, address)
        if kind == "mmio":
            return not self.addrs or _within(self.addrs, address)
        return True


def _within(ranges: tuple[tuple[int, int], ...], value: int) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


def parse_trace(text: str) -> TraceSpec:
    """Parse a --trace value (see TraceSpec); TraceSpecError says what is wrong."""
    what, _, path = text.partition(",")[0].partition("=")
    if what != "exits":
        raise TraceSpecError(f"--trace {text!r}: expected exits[=FILE][,FILTER]... "
                             "(the only trace is of exits)")
    if "=" in text.partition(",")[0] and not path:
        raise TraceSpecError(f"--trace {text!r}: exits= needs a file name")
    kinds: set[str] = set()
    ranges: dict[str, list[tuple[int, int]]] = {"port": [], "addr": [], "vcpu": []}
    for item in text.split(",")[1:]:
        key, sep, value = item.partition("=")
        if not sep and key in KINDS:
            kinds.add(key)
        elif sep and key in ranges:
            ranges[key].append(_parse_range(key, value))
        else:
            raise TraceSpecError(f"--trace {text!r}: unknown filter {item!r}; use "
                                 f"{', '.join(KINDS)}, port=N[-M], addr=N[-M] or vcpu=N[-M]")
    if ranges["port"]:
        kinds.add("io")
    if ranges["addr"]:
        kinds.add("mmio")
    return TraceSpec(path or None, frozenset(kinds or KINDS), tuple(ranges["port"]),
                     tuple(ranges["addr"]), tuple(ranges["vcpu"]))


def _parse_range(key: str, text: str) -> tuple[int, int]:
    """``N`` or ``N-M``, decimal or 0x-hex, inside the key's limit."""
    try:
        lo, sep, hi = text.partition("-")
        bounds = (int(lo, 0), int(hi, 0) if sep else int(lo, 0))
    except ValueError:
        raise TraceSpecError(f"--trace {key}={text!r}: expected N or N-M "
                             "(decimal or 0x-hex)") from None
    if not 0 <= bounds[0] <= bounds[1] <= _LIMITS[key]:
        raise TraceSpecError(f"--trace {key}={text!r}: expected 0 <= N <= M <= {_LIMITS[key]:#x}")
    return bounds


class TraceOutput:
    """Trace lines from every vCPU thread to one stream, a whole line at a time."""

    def __init__(self, spec: TraceSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        if spec.path is None:
            self._stream: TextIO = sys.stderr
            self._owned = False
        else:
            try:
                self._stream = open(spec.path, "w", encoding="ascii", errors="replace")
            except OSError as e:
                raise TraceSpecError(f"--trace: cannot write {spec.path}: {e.strerror}") from None
            self._owned = True

    def write(self, line: str) -> None:
        with self._lock:
            try:
                self._stream.write(line + "\n")
            except (OSError, ValueError):   # a closed or full output must not stop a vCPU
                pass

    def close(self) -> None:
        with self._lock:
            try:
                if self._owned:
                    self._stream.close()
                else:
                    self._stream.flush()
            except OSError:
                pass


class VcpuWatch:
    """One vCPU's exit counters, and its trace lines when ``trace`` is given.

    ``reasons``: exits by KVM exit reason; ``accesses``: IO and MMIO exits by
    (device, direction); ``seq``: KVM_RUN returns (exits and EFAULTs).
    """

    def __init__(self, vcpu: "Vcpu", pio: Bus, mmio: Bus, trace: TraceOutput | None = None) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.seq = 0
        self.reasons: dict[int, int] = {}
        self.accesses: dict[tuple[str, str], int] = {}
        shown = trace is not None and trace.spec.shows_vcpu(vcpu.index)
        self.trace = trace if shown else None
        self._dispatch: Callable[[kvm.kvm_run], None] = lambda kvm_run: None

    def wrap(self, dispatch: Callable[[kvm.kvm_run], None]) -> Callable[[kvm.kvm_run], None]:
        """``dispatch`` with counting (and tracing) around it (the vCPU thread calls
        this once when it starts)."""
        self._dispatch = dispatch
        return self.serve

    def serve(self, kvm_run: kvm.kvm_run) -> None:
        """Count one exit, let the vCPU serve it, trace it."""
        dispatch = self._dispatch
        self.seq += 1
        reason = kvm_run.exit_reason
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if reason == kvm.KVM_EXIT_IO:
            io = self.vcpu.exit_io
            direction = "out" if io.direction == kvm.KVM_EXIT_IO_OUT else "in"
            self._access(self.pio, "io", io.port, io.size, direction, dispatch, kvm_run)
        elif reason == kvm.KVM_EXIT_MMIO:
            mmio = self.vcpu.exit_mmio
            direction = "write" if mmio.is_write else "read"
            self._access(self.mmio, "mmio", mmio.phys_addr, min(mmio.len, 8), direction, dispatch, kvm_run)
        elif self.trace is None:
            dispatch(kvm_run)
        elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            try:
                dispatch(kvm_run)   # a fix-up writes its own line (``fixup``)
            except BaseException:
                self._line("other", "INTERNAL_ERROR (the VM stops)")
                raise
        else:
            try:
                dispatch(kvm_run)
            finally:
                self._line("other", reason_name(reason))

    def _access(self, bus: Bus, kind: str, addr: int, size: int, direction: str,
                dispatch: Callable[[kvm.kvm_run], None], kvm_run: kvm.kvm_run) -> None:
        device = bus.claimant(addr, size)
        key = (device, direction)
        self.accesses[key] = self.accesses.get(key, 0) + 1
        trace = self.trace
        if trace is None or not trace.spec.shows(kind, addr):
            dispatch(kvm_run)
            return
        try:
            dispatch(kvm_run)
        finally:
            if kind == "io":
                io = self.vcpu.exit_io
                where = f"{addr:#x}/{size}" + (f"x{io.count}" if io.count != 1 else "")
                data = _io_elements(bytes(self.vcpu.io_data()), size)
            else:
                where = f"{addr:#x}/{size}"
                data = self.vcpu.exit_mmio_data[:size].tobytes()[::-1].hex()
            trace.write(f"vcpu{self.vcpu.index} #{self.seq} {kind.upper()} {direction} {where} "
                        f"{data} -> {device}")

    def fixup(self, name: str) -> None:
        """The exit in hand was an instruction the VMM finished for KVM's emulator."""
        self._line("fixup", f"FIXUP {name}")

    def efault(self, rip: int) -> None:
        """KVM_RUN failed with EFAULT (the vCPU injects #GP)."""
        self.seq += 1
        self._line("efault", f"EFAULT rip={rip:#x} -> #GP")

    def _line(self, kind: str, text: str) -> None:
        if self.trace is not None and self.trace.spec.shows(kind):
            self.trace.write(f"vcpu{self.vcpu.index} #{self.seq} {text}")


def reason_name(reason: int) -> str:
    """``IO`` for KVM_EXIT_IO, and so on; the number when KVM has a newer one."""
    return kvm.EXIT_REASON_NAMES.get(reason, str(reason)).removeprefix("KVM_EXIT_")


def _io_elements(data: bytes, size: int) -> str:
    """String I/O elements as little-endian hex numbers, at most MAX_IO_ELEMENTS."""
    count = len(data) // size if size else 0
    shown = [data[i * size:(i + 1) * size][::-1].hex() for i in range(min(count, MAX_IO_ELEMENTS))]
    if count > MAX_IO_ELEMENTS:
        shown.append(f"...(+{count - MAX_IO_ELEMENTS})")
    return " ".join(shown)


@dataclass
class QueueCounters:
    """One virtqueue of a device the VMM serves itself, as the VMM sees it: ``kicks``
    summed from its ioeventfd by ``wakeups`` of the worker; ``interrupts`` raised
    (VirtioDevice.interrupt -> MsixTable.interrupt) and ``suppressed`` ones the
    driver did not want (Virtqueue.should_interrupt)."""

    kicks: int = 0
    wakeups: int = 0
    interrupts: int = 0
    suppressed: int = 0


def seconds_since_process_start() -> float | None:
    """This process's age from /proc (clock-tick resolution), or None."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19])   # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class RunCounters:
    """What ``format_stats`` reports, gathered by the machine after a run."""

    seconds: float                                   # first KVM_RUN to the end
    first_run: float | None                          # process start to the first KVM_RUN
    setup: float                                     # machine set-up to the first KVM_RUN
    watches: list[VcpuWatch]
    fixups: dict[str, int]
    memory_faults: list[int]                         # per vCPU
    buses: list[Bus]
    # (device name, its queues' counters, or None when a vhost-user back-end serves them)
    queues: list[tuple[str, list[QueueCounters] | None]] = field(default_factory=list)


def format_stats(c: RunCounters) -> str:
    """The --stats report: several lines, each starting with ``pyvmm: stats:``."""
    exits = sum(sum(w.reasons.values()) for w in c.watches)
    started = (f"first KVM_RUN {c.first_run:.3f} s after pyvmm started "
               f"({c.setup:.3f} s of it building the machine)" if c.first_run is not None
               else f"first KVM_RUN {c.setup:.3f} s after the machine set-up began")
    out = [f"{exits} exits to pyvmm in {c.seconds:.2f} s "
           f"({exits / c.seconds if c.seconds > 0 else 0:.0f}/s); {started}"]
    reasons: dict[int, int] = {}
    for w in c.watches:
        for r, n in w.reasons.items():
            reasons[r] = reasons.get(r, 0) + n
    out.append("by reason: " + _counts({reason_name(r): n for r, n in reasons.items()}))
    out.append("by vCPU: " + _counts({f"vcpu{w.vcpu.index}": sum(w.reasons.values()) for w in c.watches},
                                      ordered=False))
    accesses: dict[tuple[str, str], int] = {}
    for w in c.watches:
        for k, n in w.accesses.items():
            accesses[k] = accesses.get(k, 0) + n
    out.append("by device and direction: " + _counts({f"{d} {way}": n for (d, way), n in accesses.items()}))
    for bus in c.buses:
        top = sorted(bus.unclaimed.items(), key=lambda kv: (-kv[1], kv[0]))
        more = f", ... ({len(top) - MAX_UNCLAIMED_SHOWN} more addresses)" if len(top) > MAX_UNCLAIMED_SHOWN else ""
        if bus.unclaimed_elsewhere:
            more += f", {bus.unclaimed_elsewhere} accesses to addresses not counted one by one"
        out.append(f"unclaimed {bus.name}: " + (", ".join(
            f"{a:#x} x{n}" for a, n in top[:MAX_UNCLAIMED_SHOWN]) + more if top else "none"))
    out.append("PVM fix-ups (instructions finished for KVM's emulator): " + _counts(c.fixups))
    out.append(f"EFAULTs turned into #GP: {sum(c.memory_faults)}")
    for name, queues in c.queues:
        if queues is None:
            out.append(f"{name}: its queues are served by the vhost-user back-end outside the VMM "
                       "(kicks and interrupts do not pass through pyvmm)")
            continue
        for index, q in enumerate(queues):
            out.append(f"{name} queue {index}: {q.kicks} kicks in {q.wakeups} worker wakeups, "
                       f"{q.interrupts} interrupts ({q.suppressed} suppressed by the driver)")
    out.append(KERNEL_SIDE)
    return "".join(f"pyvmm: stats: {line}\n" for line in out)


def _counts(counts: dict[str, int], ordered: bool = True) -> str:
    """``a 12, b 3`` (largest first unless ``ordered`` is False), or ``none``."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if ordered else counts.items()
    return ", ".join(f"{k} {n}" for k, n in items) or "none"
