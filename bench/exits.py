"""Exit-loop benchmark: how many port-I/O exits per second pyvmm's vCPU loop serves.

A tiny guest (tests/tinyguest.py: one vCPU in long mode at CPL0, no Linux)
writes one byte to port 0x80 ``--exits`` times (default 100,000) and then ends
through the debug-exit port.  Port 0x80 is a device that drops the writes, so
the number is the cost of KVM_RUN plus pyvmm's exit dispatch.  Each mode is run
``--runs`` times, round-robin, each run in a fresh VM:

* ``plain``: nothing watches the VM (the loop every run without --stats/--trace uses);
* ``stats``: exits counted as for ``--stats`` (pyvmm.trace.VcpuWatch);
* ``trace``: counted and traced, every line written to /dev/null (``--trace exits=/dev/null``).

It prints, per mode, the median, min and max exits per second of wall-clock
time, and the median process CPU time (user + system, from getrusage) per
exit, which a busy host disturbs less than the wall clock.  It is a
benchmark: nothing asserts on time.

    python -m bench.exits [--exits 100000] [--runs 5] [--modes plain,stats,trace]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from pyvmm.trace import TraceOutput, TraceSpec  # noqa: E402
from tinyguest import TinyVm, assemble  # noqa: E402

PORT = 0x80
MODES = ("plain", "stats", "trace")


class Sink:
    """A port that drops writes and reads as zeros."""

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


def guest(exits: int) -> bytes:
    return assemble(f""".org 0
        mov ${exits}, %ecx
    1:  out %al, ${PORT:#x}
        dec %ecx
        jnz 1b
        mov $0, %al
        mov $0x501, %dx
        out %al, %dx
    """)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(code: bytes, mode: str) -> tuple[float, float]:
    """Exits per wall-clock second and CPU microseconds per exit of one run in ``mode``."""
    vm = TinyVm(code)
    trace = None
    try:
        vm.pio.register(PORT, 1, Sink(), "sink")
        if mode != "plain":
            trace = TraceOutput(TraceSpec(path=os.devnull)) if mode == "trace" else None
            vm.watch(trace)
        t0, c0 = time.perf_counter(), cpu_seconds()
        if vm.run(timeout=600) != 0:
            raise RuntimeError(f"the guest ended with {vm.status}: {vm.reason}")
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        return vm.thread.exits / wall, cpu / vm.thread.exits * 1e6
    finally:
        if trace is not None:
            trace.close()
        vm.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exits", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    modes = args.modes.split(",")
    code = guest(args.exits)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode in modes:
            rate, us = one_run(code, mode)
            rates[mode].append(rate)
            cpu[mode].append(us)
    base = statistics.median(cpu[modes[0]])
    print(f"{args.exits} port writes per run, {args.runs} runs per mode")
    print(f"{'mode':<8}{'median exits/s':>16}{'min':>10}{'max':>10}{'CPU us/exit':>13}"
          f"{'vs ' + modes[0]:>10}")
    for mode in modes:
        r, us = rates[mode], statistics.median(cpu[mode])
        print(f"{mode:<8}{statistics.median(r):>16,.0f}{min(r):>10,.0f}{max(r):>10,.0f}"
              f"{us:>13.2f}{us - base:>+10.2f}")


if __name__ == "__main__":
    main()
