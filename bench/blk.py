"""Block-device benchmark: guest virtio-blk throughput in pyvmm against QEMU, same guest.

What is measured, inside the guest, by guest/helpers/blkbench.c run from
``pyvmm.run=/pyvmm-tests/blkbench.sh`` on the one virtio-blk disk (/dev/vda):

* **seq write**: O_DIRECT writes of [0, SIZE) in 1 MiB requests (MB/s, 10^6 bytes);
* **seq read**: O_DIRECT reads of the same range in 1 MiB requests (MB/s);
* **4K randread**: O_DIRECT 4 KiB reads at pseudo-random 4 KiB-aligned offsets
  in [0, SIZE) (a fixed splitmix64 sequence, the same for every VMM), for
  ``--rand-secs`` seconds or ``--rand-count`` requests, whichever comes first
  (IOPS).

Each number is timed by the guest (CLOCK_MONOTONIC around the I/O loop only),
so boot time is not in it.  No fsync is timed: a flush would measure the
host's disk, not the VMM.

The disk is a fresh sparse raw image of SIZE + 1 MiB (default 64 MiB + 1 MiB)
in a new temporary directory for every run of every setup; it is deleted
afterwards.  Host I/O is buffered on both sides: pyvmm serves requests with
preadv/pwritev on the image file through the host page cache, so QEMU gets
``cache=writeback,aio=threads`` (its default cache mode, with its thread-pool
AIO), not ``cache=none`` (O_DIRECT on the host), which would compare a
different host I/O path.

Setups (every one boots the same kernel, initramfs, memory, vCPUs and kernel
command line: pyvmm's default for this host's KVM flavour plus the appended
words):

* ``pyvmm``: ``pyvmm run --disk path=IMG --append ...``;
* ``qemu-q35``: QEMU ``-accel kvm -M q35 -cpu host,-cx16,-arch-capabilities``
  with ``-device virtio-blk-pci``.  Not microvm: its PCIe host (``pcie=on``)
  is an ECAM-only GPEX that Linux finds through ACPI, and the default guest
  kernel has no ACPI (measured: "PCI: Fatal: No config space access function
  found", no /dev/vda); pyvmm's disk is virtio-blk-pci too, so q35 with
  virtio-blk-pci is the like-for-like transport;
* ``qemu-q35-tcg``: the same with ``-accel tcg -cpu max``: QEMU's JIT runs the
  guest, no KVM at all.  A reference row, not a like-for-like peer.

On a PVM host (kvm_pvm) QEMU/KVM cannot boot the default kernel: QEMU pauses
the VM at the guest kernel's int3 self-test (a KVM emulation failure at CPL0,
which pyvmm finishes itself).  That row then records the failure, its reason
and the last console lines, as bench/boot.py does; the TCG row still runs.

Setups run round-robin (pyvmm, qemu-q35, qemu-q35-tcg, pyvmm, ...); a setup
that fails a run is not run again.  Every run has a deadline after which the
VMM's process group is killed, and QEMU's "KVM internal error" ends a run at
once.  Results are printed as a table (medians over the runs, and each
setup's ratio to pyvmm) and written as JSON (``--json``, default
bench/results/blk-<date>.json).  A benchmark, not a test: nothing asserts on
speed.

    python -m bench.blk [--runs 1] [--timeout 300] [--setups pyvmm,qemu-q35,qemu-q35-tcg]
                        [--size 64M] [--rand-secs 3] [--rand-count 100000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench.boot import (QEMU_FATAL_RE, RESULTS_DIR, GuestConfig, add_guest_args, boot_failure,
                        host_facts, qemu_argv, run_watched, setup_names, stats, write_json)
from pyvmm.cli import UsageError, default_guest_dir, parse_size
from pyvmm.cmdline import default_cmdline
from pyvmm.platform import detect_flavour

MiB = 1 << 20
GUEST_SCRIPT = "/pyvmm-tests/blkbench.sh"
REQUEST_SIZE = MiB           # sequential requests (blkbench.sh's default bs)
RAND_BS = 4096               # blkbench.sh's random-read size

SEQ_RE = re.compile(rb"blkbench (seqwrite|seqread) bytes=(\d+) seconds=([0-9.]+)")
RAND_RE = re.compile(rb"blkbench randread bs=(\d+) ios=(\d+) seconds=([0-9.]+)")
BLKBENCH_LINE_RE = re.compile(rb"^blkbench .*$", re.M)

Q35 = "q35"
DEFAULT_SETUPS = ("pyvmm", "qemu-q35", "qemu-q35-tcg")
TCG_NOTE = "TCG = QEMU's software emulation (no KVM): a reference, not a like-for-like peer"
QEMU_DRIVE = "format=raw,if=none,id=d0,cache=writeback,aio=threads"


# --- setups -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    name: str
    argv: Callable[[str], list[str]]   # the command line for an image path
    expected_status: int
    fatal_stderr: re.Pattern[bytes] | None = None
    note: str = ""


def pyvmm_setup(guest: GuestConfig) -> Setup:
    def argv(image: str) -> list[str]:
        return [sys.executable, "-m", "pyvmm", "run",
                "--kernel", guest.kernel, "--initramfs", guest.initramfs,
                "--cpus", str(guest.cpus), "--memory", guest.memory,
                "--disk", f"path={image}", "--append", guest.append]
    return Setup("pyvmm", argv, expected_status=0)


def qemu_setup(name: str, qemu: str, cpu: str, guest: GuestConfig) -> Setup:
    tcg = name.endswith("-tcg")
    base = qemu_argv(qemu, "tcg" if tcg else "kvm", Q35, "max" if tcg else cpu, guest)

    def argv(image: str) -> list[str]:
        # QEMU's -drive splits options on ',': double any comma in the path.
        return base + ["-drive", f"file={image.replace(',', ',,')},{QEMU_DRIVE}",
                       "-device", "virtio-blk-pci,drive=d0"]
    # isa-debug-exit: QEMU exits with (status << 1) | 1; the guest's status is 0.
    return Setup(name, argv, expected_status=1, fatal_stderr=QEMU_FATAL_RE,
                 note=TCG_NOTE if tcg else "")


def build_setups(names: list[str], guest: GuestConfig, qemu: str, cpu: str) -> list[Setup]:
    return [pyvmm_setup(guest) if n == "pyvmm" else qemu_setup(n, qemu, cpu, guest) for n in names]


# --- one run ------------------------------------------------------------------------------
@dataclass
class RunResult:
    setup: str
    run: int
    argv: list[str] = field(default_factory=list)
    seqwrite_mbps: float | None = None
    seqread_mbps: float | None = None
    randread_iops: float | None = None
    randread_ios: int | None = None
    blkbench_lines: list[str] = field(default_factory=list)
    ready_s: float | None = None         # process start -> `pyvmm-guest: ready`
    exit_s: float | None = None          # process start -> exit (None: killed by us)
    status: int | None = None
    killed: bool = False
    fatal_s: float | None = None
    load_1min: float | None = None
    failure: str | None = None
    console_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None


def make_image(directory: str, size: int) -> str:
    """A sparse raw image of size + 1 MiB: the benchmark's range and a little more."""
    path = os.path.join(directory, "disk.img")
    with open(path, "wb") as f:
        f.truncate(size + MiB)
    return path


def run_once(setup: Setup, index: int, timeout: float, size: int, kernel: str) -> RunResult:
    """Boot once on a fresh image; the VMM and its process group never outlive this."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-blk-") as tmp:
        image = make_image(tmp, size)
        argv = setup.argv(image)
        load = os.getloadavg()[0]
        stderr_patterns = {"fatal": setup.fatal_stderr} if setup.fatal_stderr is not None else {}
        try:
            t0, proc, vmm, out, err, ended_by = run_watched(argv, setup, timeout, stderr_patterns)
        except OSError as e:
            return RunResult(setup=setup.name, run=index, argv=argv, load_1min=load,
                             failure=f"cannot start {argv[0]}: {e.strerror}")
    r = RunResult(setup=setup.name, run=index, argv=argv, status=proc.returncode, load_1min=load,
                  killed=ended_by is not None, console_tail=out.tail(), stderr_tail=err.tail())
    if (t := out.time_of("ready")) is not None:
        r.ready_s = t - t0
    if ended_by is None and vmm.exited_at is not None:
        r.exit_s = vmm.exited_at - t0
    if (t := err.time_of("fatal")) is not None:
        r.fatal_s = t - t0
    parse_console(bytes(out.data), r)
    r.failure = failure_reason(setup, r, ended_by, bytes(err.data), timeout, kernel)
    return r


def parse_console(console: bytes, r: RunResult) -> None:
    """Fill in the numbers from blkbench's lines (guest/helpers/blkbench.c)."""
    console = console.replace(b"\r", b"")
    r.blkbench_lines = [m.group(0).decode(errors="replace") for m in BLKBENCH_LINE_RE.finditer(console)]
    for m in SEQ_RE.finditer(console):
        nbytes, secs = int(m.group(2)), float(m.group(3))
        mbps = nbytes / secs / 1e6 if secs > 0 else None
        if m.group(1) == b"seqwrite":
            r.seqwrite_mbps = mbps
        else:
            r.seqread_mbps = mbps
    if m := RAND_RE.search(console):
        ios, secs = int(m.group(2)), float(m.group(3))
        r.randread_ios = ios
        r.randread_iops = ios / secs if secs > 0 else None


def failure_reason(setup: Setup, r: RunResult, ended_by: str | None, stderr: bytes,
                   timeout: float, kernel: str) -> str | None:
    if why := boot_failure(r, ended_by, stderr, timeout, kernel):
        return why
    missing = [name for name, v in (("seqwrite", r.seqwrite_mbps), ("seqread", r.seqread_mbps),
                                    ("randread", r.randread_iops)) if v is None]
    if missing:
        return f"no blkbench result for {', '.join(missing)} (exit status {r.status})"
    if r.status != setup.expected_status:
        return f"exit status {r.status}, expected {setup.expected_status}"
    return None


def run_all(setups: list[Setup], runs: int, timeout: float, size: int,
            kernel: str) -> dict[str, list[RunResult]]:
    """Round-robin over the setups; a setup that failed once is not run again."""
    results: dict[str, list[RunResult]] = {s.name: [] for s in setups}
    for index in range(1, runs + 1):
        for setup in setups:
            done = results[setup.name]
            if any(not r.ok for r in done):
                continue
            print(f"[{setup.name} run {index}/{runs}] ...", end=" ", flush=True)
            r = run_once(setup, index, timeout, size, kernel)
            done.append(r)
            print(progress_line(r), flush=True)
    return results


def progress_line(r: RunResult) -> str:
    def f(x: float | None, unit: str) -> str:
        return f"{x:.1f} {unit}" if x is not None else "-"
    status = "killed" if r.killed else f"status {r.status}"
    line = (f"write {f(r.seqwrite_mbps, 'MB/s')}, read {f(r.seqread_mbps, 'MB/s')}, "
            f"randread {f(r.randread_iops, 'IOPS')}; exit {f(r.exit_s, 's')}, {status} "
            f"(load {r.load_1min:.1f})")
    return line + (f"  FAILED: {r.failure}" if r.failure else "")


# --- report -------------------------------------------------------------------------------
METRICS = ("seqwrite_mbps", "seqread_mbps", "randread_iops")


def summarize(setup: Setup, results: list[RunResult]) -> dict:
    ok = [r for r in results if r.ok]
    failures = [r for r in results if not r.ok]
    summary = {"setup": setup.name, "note": setup.note, "runs": len(results), "ok": len(ok)}
    for metric in METRICS:
        summary[metric] = stats([getattr(r, metric) for r in ok])
    summary.update({
        "failure": failures[0].failure if failures else None,
        "failure_console_tail": failures[0].console_tail if failures else [],
        "failure_stderr_tail": failures[0].stderr_tail if failures else [],
    })
    return summary


def ratio(s: dict, base: dict | None, metric: str) -> float | None:
    a, b = s[metric], base[metric] if base else None
    return a.median / b.median if a and b and b.median else None


def table(summaries: list[dict]) -> str:
    base = next((s for s in summaries if s["setup"] == "pyvmm" and s["ok"]), None)
    header = (f"{'setup':<14} {'runs':>5}  {'seq write MB/s':>14}  {'seq read MB/s':>13}  "
              f"{'4K randread IOPS':>16}  ratio vs pyvmm (write, read, IOPS)")
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(table_row(s, base))
    return "\n".join(lines)


def table_row(s: dict, base: dict | None) -> str:
    def cell(metric: str, width: int) -> str:
        st = s[metric]
        return f"{st.median:>{width}.1f}" if st else f"{'-':>{width}}"

    if not s["ok"]:
        ratios = "-"
    elif s is base:
        ratios = "1 (baseline)"
    elif base is None:
        ratios = "- (no pyvmm result)"
    else:
        ratios = ", ".join(f"{x:.3g}x" if x is not None else "-" for x in
                           (ratio(s, base, m) for m in METRICS))
    row = (f"{s['setup']:<14} {s['ok']:>2}/{s['runs']:<2}  {cell('seqwrite_mbps', 14)}  "
           f"{cell('seqread_mbps', 13)}  {cell('randread_iops', 16)}  {ratios}")
    if s["note"]:
        row += f"\n{'':<14}   ({s['note']})"
    if s["failure"]:
        row += f"\n{'':<14}   FAILED: {s['failure']}"
        row += "".join(f"\n{'':<14}   | {line}" for line in s["failure_console_tail"][-5:])
    return row


def default_json_path() -> Path:
    return RESULTS_DIR / f"blk-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"


# --- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.blk", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="boots per setup (default 1)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per boot before it is killed (default 300)")
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                   help=f"comma-separated, from {', '.join(DEFAULT_SETUPS)} (default: all)")
    p.add_argument("--size", default="64M", help="bytes written and read, a multiple of 1M (default 64M)")
    p.add_argument("--rand-secs", type=float, default=3.0,
                   help="random-read duration limit in seconds (default 3)")
    p.add_argument("--rand-count", type=int, default=100000,
                   help="random-read request limit (default 100000)")
    add_guest_args(p, "blk")
    args = p.parse_args(argv)
    args.setup_names = setup_names(p, args.setups, DEFAULT_SETUPS)
    if not args.setup_names:
        p.error("--setups names no setup")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        args.size_bytes = parse_size(args.size)
    except UsageError as e:
        p.error(f"--size: {e}")
    if args.size_bytes < REQUEST_SIZE or args.size_bytes % REQUEST_SIZE:
        p.error("--size must be a positive multiple of 1M")
    if args.rand_secs <= 0 or args.rand_count < 1:
        p.error("--rand-secs must be positive and --rand-count at least 1")
    return args


def guest_config(args: argparse.Namespace) -> GuestConfig:
    guest_dir = default_guest_dir()
    append = " ".join([f"pyvmm.run={GUEST_SCRIPT}", f"pyvmm.blkbench.size={args.size_bytes}",
                       f"pyvmm.blkbench.bs={REQUEST_SIZE}", f"pyvmm.blkbench.count={args.rand_count}",
                       f"pyvmm.blkbench.secs={args.rand_secs:g}"])
    return GuestConfig(kernel=args.kernel or str(guest_dir / "vmlinux"),
                       initramfs=args.initramfs or str(guest_dir / "initramfs.cpio"),
                       memory=args.memory, cpus=args.cpus,
                       cmdline=f"{default_cmdline(detect_flavour())} {append}", append=append)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    flavour = detect_flavour()
    guest = guest_config(args)
    if missing := [p for p in (guest.kernel, guest.initramfs) if not Path(p).is_file()]:
        sys.stderr.write(f"bench.blk: {', '.join(missing)} missing: run `make guest` first\n")
        return 2
    setups = build_setups(args.setup_names, guest, args.qemu, args.qemu_cpu)
    facts = host_facts(flavour, args.qemu)
    print(flavour.summary)
    print(f"kernel {guest.kernel}, initramfs {guest.initramfs}, memory {guest.memory}, cpus {guest.cpus}")
    print(f"kernel command line: {guest.cmdline}")
    print(f"disk: fresh sparse raw image of {args.size_bytes + MiB} bytes per run; "
          f"{args.size_bytes >> 20} MiB in {REQUEST_SIZE >> 20} MiB O_DIRECT requests, "
          f"then 4 KiB O_DIRECT random reads for {args.rand_secs:g} s or {args.rand_count} requests")
    print("QEMU: -M q35 with virtio-blk-pci, as pyvmm's disk (microvm's pcie=on needs ACPI, which the guest "
          "kernel lacks); -drive cache=writeback,aio=threads: buffered host I/O like pyvmm's preadv/pwritev")
    load_before = os.getloadavg()
    results = run_all(setups, args.runs, args.timeout, args.size_bytes, guest.kernel)
    load_after = os.getloadavg()
    elapsed = time.monotonic() - started

    summaries = [summarize(s, results[s.name]) for s in setups]
    print()
    print(table(summaries))
    print("medians over the runs; MB = 10^6 bytes; ratio = setup / pyvmm (> 1: the setup is faster)")
    print(f"{flavour.summary}\nhost load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for s in setups:
        print(f"{s.name}: {shlex.join(s.argv('IMG'))}")
    print(f"whole run: {elapsed:.1f} s")
    path = args.json or default_json_path()
    write_json(path, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": facts,
        "guest": asdict(guest),
        "size_bytes": args.size_bytes,
        "request_bytes": REQUEST_SIZE,
        "randread_bytes": RAND_BS,
        "randread_secs_limit": args.rand_secs,
        "randread_count_limit": args.rand_count,
        "qemu_drive": QEMU_DRIVE,
        "runs_per_setup": args.runs,
        "timeout_s": args.timeout,
        "elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "summaries": summaries,
        "runs": [asdict(r) for rs in results.values() for r in rs],
    })
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
