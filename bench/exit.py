"""Exit-cost benchmark: pyvmm's exit dispatch against a bare C KVM_RUN loop, same guest.

The guest is a few instructions in 64-bit long mode at CPL0 (the tiny-guest VM of
the KVM tests, tests/tinyguest.py: one vCPU, 2 MiB of RAM, an in-kernel irqchip,
the boot CPU state pyvmm gives a Linux kernel).  It runs three loops of N
iterations, each ended by a write to the mark port:

* **loop**: ``nop; dec; jnz`` -- no exit: what the guest's own loop costs (on a
  PVM host CPL0 code runs in KVM's instruction emulator, so this is not free);
* **pio**: ``out %al, %dx; dec; jnz`` -- N port-I/O writes to a scratch device;
* **mmio**: ``mov %eax, (%rbx); dec; jnz`` -- N MMIO writes to a scratch device
  at an address with no memory slot.

pyvmm runs it with its real run loop (``pyvmm.vcpu.VcpuThread``: KVM_RUN, exit
dispatch, ``pyvmm.bus.Bus`` lookup, the device's ``write``) on a vCPU thread, as a
booted guest's exits go.  The C side (bench/exitloop.c, built with ``gcc -O2`` into
a temporary directory at every run) loads the same guest, byte for byte: pyvmm builds
it once and writes its RAM image, ``kvm_sregs``, ``kvm_regs`` and ``kvm_cpuid2``
to files.  Both sides read the clock right after KVM_RUN returns a mark exit
(``time.perf_counter_ns`` / ``clock_gettime(CLOCK_MONOTONIC)``) and count the
exits of each phase; a phase whose counts are not exactly N is an error.
``--watch stats,trace`` adds pyvmm sides whose exits are counted as ``--stats``
counts them, or also traced as ``--trace exits`` does (to /dev/null): what
watching the VMM costs per exit.

The sides alternate (C, pyvmm, then pyvmm, C, ...) for ``--rounds`` rounds; for
each phase the median and min of ns per iteration are reported, the exit rates
(exits/s), the ratio pyvmm exits/s / C exits/s, and the "net" cost per exit (the
phase minus the loop phase).  Results also go to JSON (``--json``, default
bench/results/exit-<date>.json).  This is a benchmark: nothing asserts on time.

    python -m bench.exit [--n 20000] [--rounds 5] [--watch stats,trace]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.boot import REPO, RESULTS_DIR, host_facts, stats, write_json
from pyvmm import kvm
from pyvmm.boot import layout
from pyvmm.platform import detect_flavour
from pyvmm.trace import TraceOutput, TraceSpec

if str(REPO / "tests") not in sys.path:  # the tiny-guest VM of the KVM tests
    sys.path.insert(0, str(REPO / "tests"))
from tinyguest import RAM_SIZE, TinyVm, assemble

log = logging.getLogger(__name__)

C_SOURCE = REPO / "bench" / "exitloop.c"
MARK_PORT = 0x90           # a write ends a phase
SCRATCH_PORT = 0x80        # the port-I/O phase's device
MMIO_ADDR = 0xD0000000     # the MMIO phase's device (no memory slot there)
END_PORT = layout.DEBUG_EXIT_PORT
PHASES = ("loop", "pio", "mmio")

GUEST_SOURCE = """
.org 0
        mov ${mark}, %dx
        out %al, %dx            # mark: the loop phase starts
        mov ${n}, %ecx
1:      nop                     # stands where the exiting instruction stands below
        dec %ecx
        jnz 1b
        out %al, %dx            # mark: loop ends, pio starts
        mov ${n}, %ecx
        mov ${scratch}, %dx
2:      out %al, %dx            # a port-I/O exit
        dec %ecx
        jnz 2b
        mov ${mark}, %dx
        out %al, %dx            # mark: pio ends, mmio starts
        mov ${n}, %ecx
        mov ${mmio}, %ebx
3:      mov %eax, (%rbx)        # an MMIO exit
        dec %ecx
        jnz 3b
        out %al, %dx            # mark: mmio ends
        mov $0, %al
        mov ${end}, %dx
        out %al, %dx            # debug-exit, status 0
"""


def guest_code(n: int) -> bytes:
    return assemble(GUEST_SOURCE.format(n=n, mark=MARK_PORT, scratch=SCRATCH_PORT,
                                        mmio=MMIO_ADDR, end=END_PORT))


@dataclass
class Phase:
    name: str
    ns: int      # wall clock from the mark that starts it to the mark that ends it
    cpu_ns: int  # the vCPU thread's CPU time (guest time included) in between
    pio: int     # exits of each kind in between
    mmio: int
    other: int


class ScratchDevice:
    """A bus device that counts the guest's writes and reads as zeros."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1


class PhaseClock:
    """The mark port: each write records the time (wall, and the vCPU thread's CPU
    time) and the exit counts so far."""

    def __init__(self, vm: TinyVm, pio: ScratchDevice, mmio: ScratchDevice) -> None:
        self.vm, self.pio, self.mmio = vm, pio, mmio
        self.marks: list[tuple[int, int, int, int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.marks.append((time.perf_counter_ns(), time.thread_time_ns(), self.vm.thread.exits,
                           self.pio.writes, self.mmio.writes))

    def phases(self) -> list[Phase]:
        out = []
        for name, (t0, c0, e0, p0, m0), (t1, c1, e1, p1, m1) in zip(PHASES, self.marks, self.marks[1:]):
            pio, mmio = p1 - p0, m1 - m0
            out.append(Phase(name, t1 - t0, c1 - c0, pio, mmio, other=e1 - e0 - pio - mmio - 1))  # - the mark
        return out


def make_vm(n: int) -> TinyVm:
    """The bench guest in a TinyVm, not started."""
    return TinyVm(guest_code(n))


# pyvmm's sides: the plain loop, and the loop watched as for --stats or --trace exits.
WATCH_MODES = {"pyvmm": None, "pyvmm-stats": "stats", "pyvmm-trace": "trace"}


def run_pyvmm(n: int, timeout: float, watch: str | None = None) -> list[Phase]:
    """One run of the guest through pyvmm's VcpuThread and buses; ``watch`` "stats"
    counts the exits as ``--stats`` does, "trace" also writes ``--trace exits`` lines
    (to /dev/null)."""
    vm = make_vm(n)
    trace = None
    try:
        if watch is not None:
            trace = TraceOutput(TraceSpec(path=os.devnull)) if watch == "trace" else None
            vm.watch(trace)
        pio, mmio = ScratchDevice(), ScratchDevice()
        clock = PhaseClock(vm, pio, mmio)
        vm.pio.register(SCRATCH_PORT, 1, pio)
        vm.pio.register(MARK_PORT, 1, clock)
        vm.mmio.register(MMIO_ADDR, 0x1000, mmio)
        status = vm.run(timeout)
        if status != 0:
            raise RuntimeError(f"pyvmm: the guest ended with {status} ({vm.reason})")
        return clock.phases()
    finally:
        if trace is not None:
            trace.close()
        vm.close()


def save_guest(n: int, directory: Path) -> None:
    """The guest as the C side loads it: RAM image and vCPU state as raw kvm.h structs."""
    vm = make_vm(n)
    try:
        vcpu = vm.thread.vcpu
        entries = vcpu.get_cpuid2()
        cpuid = kvm.variable_buffer(kvm.kvm_cpuid2, kvm.kvm_cpuid_entry2, len(entries))()
        cpuid.hdr.nent = len(entries)
        for i, e in enumerate(entries):
            cpuid.entries[i] = e
        files = {"mem.bin": vm.mem.read(0, RAM_SIZE), "sregs.bin": bytes(vcpu.get_sregs()),
                 "regs.bin": bytes(vcpu.get_regs()), "cpuid.bin": bytes(cpuid)}
        for name, data in files.items():
            (directory / name).write_bytes(data)
    finally:
        vm.close()


def build_c(directory: Path) -> Path:
    exe = directory / "exitloop"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(C_SOURCE)], check=True)
    return exe


PHASE_RE = re.compile(r"phase (\d+) ns=(\d+) cpu_ns=(\d+) pio=(\d+) mmio=(\d+) other=(\d+)")


def run_c(exe: Path, directory: Path, timeout: float) -> list[Phase]:
    """One run of the saved guest in the C program."""
    p = subprocess.run([str(exe), str(directory), str(MARK_PORT), str(END_PORT), str(layout.KVM_TSS_ADDR)],
                       capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"exitloop failed ({p.returncode}): {p.stderr.strip()}")
    out = []
    for m in PHASE_RE.finditer(p.stdout):
        i, ns, cpu_ns, pio, mmio, other = map(int, m.groups())
        out.append(Phase(PHASES[i], ns, cpu_ns, pio, mmio, other))
    return out


def check_counts(side: str, phases: list[Phase], n: int) -> None:
    """Each phase made exactly the exits its loop makes (KVM_EXIT_INTR and the like aside)."""
    want = {"loop": (0, 0), "pio": (n, 0), "mmio": (0, n)}
    got = {p.name: (p.pio, p.mmio) for p in phases}
    if got != want:
        raise RuntimeError(f"{side}: exit counts {got}, expected {want}")


# --- report ------------------------------------------------------------------------------
CLOCKS = {"ns": "wall clock", "cpu_ns": "vCPU thread CPU time"}
ROWS = ("loop", "pio", "mmio", "pio_net", "mmio_net")


def summarize(runs: dict[str, list[list[Phase]]], n: int) -> dict:
    """side -> clock -> row -> ns per iteration (Stats); a *_net row is the phase minus
    the loop phase of the same run: the exit alone."""
    out: dict = {}
    for side, rounds in runs.items():
        out[side] = {}
        for clock in CLOCKS:
            per_run = [{p.name: getattr(p, clock) / n for p in r} for r in rounds]
            rows = {name: stats([x[name] for x in per_run]) for name in PHASES}
            for name in ("pio", "mmio"):
                rows[f"{name}_net"] = stats([x[name] - x["loop"] for x in per_run])
            out[side][clock] = rows
    return out


def ratios(summary: dict) -> dict:
    """pyvmm exits/s / C exits/s = C ns per exit / pyvmm ns per exit, of the medians."""
    out: dict = {}
    for clock in CLOCKS:
        c = summary["c"][clock]
        out[clock] = {side: {k: c[k].median / py[clock][k].median for k in ROWS[1:] if py[clock][k].median > 0}
                      for side, py in summary.items() if side != "c"}
    return out


def table(summary: dict, ratio: dict) -> str:
    """One row per phase and side: median and min ns per iteration on both clocks."""
    rows = ["row       side         wall median     min   cpu median     min   exits/s (cpu median)",
            "--------  -----------  ------------  ------  -----------  ------  --------------------"]
    for name in ROWS:
        for side in summary:
            w, c = summary[side]["ns"][name], summary[side]["cpu_ns"][name]
            rate = f"{1e9 / c.median:20,.0f}" if name != "loop" and c.median > 0 else ""
            rows.append(f"{name:<8}  {side:<11}  {w.median:12,.0f}  {w.min:6,.0f}  {c.median:11,.0f}  "
                        f"{c.min:6,.0f}  {rate}")
    rows.append("")
    for clock, label in CLOCKS.items():
        for side, r in ratio[clock].items():
            rows.append(f"{side} exits/s / C exits/s ({label}): " +
                        ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.exit", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="iterations of each loop (default 20000)")
    p.add_argument("--rounds", type=int, default=5, help="runs of each side, alternating (default 5)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default 300)")
    p.add_argument("--watch", default="", help="also run pyvmm watched: comma-separated from stats,trace "
                   "(the exits counted as for --stats, or traced to /dev/null as for --trace exits)")
    p.add_argument("--json", type=Path, help="where to write the results (default bench/results/exit-<date>.json)")
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        p.error("--n and --rounds must be at least 1")
    args.sides = ["c", "pyvmm"] + [f"pyvmm-{w}" for w in filter(None, args.watch.split(","))]
    if bad := [s for s in args.sides if s != "c" and s not in WATCH_MODES]:
        p.error(f"--watch: unknown {', '.join(bad)}; known: stats, trace")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flavour = detect_flavour()
    runs: dict[str, list[list[Phase]]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="pyvmm-exitbench-") as tmp:
        work = Path(tmp)
        exe = build_c(work)
        save_guest(args.n, work)
        for r in range(args.rounds):
            for side in (args.sides if r % 2 == 0 else args.sides[::-1]):
                phases = (run_c(exe, work, args.timeout) if side == "c"
                          else run_pyvmm(args.n, args.timeout, WATCH_MODES[side]))
                check_counts(side, phases, args.n)
                runs[side].append(phases)
                log.info("round %d %-11s %s", r + 1, side, "  ".join(
                    f"{p.name} {p.ns / args.n:,.0f} ns (cpu {p.cpu_ns / args.n:,.0f})" for p in phases))
    summary = summarize(runs, args.n)
    ratio = ratios(summary)
    print(f"{flavour.summary}\nN = {args.n}, {args.rounds} rounds, ns per loop iteration "
          "(*_net: minus the loop phase, i.e. the exit alone)\n")
    print(table(summary, ratio))
    path = args.json or RESULTS_DIR / f"exit-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    write_json(path, {"bench": "exit", "n": args.n, "rounds": args.rounds, "host": host_facts(flavour),
                      "runs": {side: [[vars(p) for p in r] for r in rounds] for side, rounds in runs.items()},
                      "ns_per_iteration": summary, "ratio_pyvmm_over_c_exits_per_s": ratio})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
