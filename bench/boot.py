"""Boot-time benchmark: pyvmm against QEMU (microvm and q35) with the same guest.

What is measured, per setup and per run (wall clock, ``time.monotonic()``):

* **ready**: from just before the VMM process is spawned to the moment
  ``pyvmm-guest: ready`` appears on its serial console (the guest's /init
  prints it as soon as user space runs);
* **exit**: from the same start to the VMM process's exit.  The guest ends
  itself: ``pyvmm.run=/pyvmm-tests/boot-checks.sh`` makes /init run that
  script, print ``pyvmm-guest: exit 0`` and write the status to I/O port 0x501
  (pyvmm exits 0; QEMU's isa-debug-exit exits with (0 << 1) | 1 = 1).

For pyvmm the time is also split, from its ``--log-level debug`` line
"VMM start to first KVM_RUN: X s" (seen on stderr at a known wall-clock time):
process start -> first KVM_RUN (Python start-up + pyvmm's own set-up X),
first KVM_RUN -> ready (the guest kernel booting, then /init starting), and
ready -> exit (guest user space, then the VMM tearing down).

Every setup boots the same kernel and initramfs with the same memory, vCPUs
and kernel command line (pyvmm's default for this host's KVM flavour plus the
appended words).  Setups are run round-robin (pyvmm, microvm, q35, pyvmm, ...)
so that drift in the host's load spreads over all of them.  The console and
stderr are read through pipes by threads; every run has a deadline after which
the VMM's process group is terminated, and QEMU's "KVM internal error" (after
which QEMU pauses forever) ends a run at once.  A setup that fails a run is not
run again; the failure, its reason and the last console lines are recorded.
On a PVM host the QEMU/KVM setups stop at the guest kernel's int3 self-test
(see DEFAULT_QEMU_CPU); ``--setups ...,qemu-microvm-tcg`` adds QEMU's TCG as
a reference that does not go through KVM at all.

Results are printed as a table and written as JSON (``--json``, default
bench/results/boot-<date>.json).  This is a benchmark, not a test: nothing
here asserts on time.

    python -m bench.boot [--runs 3] [--timeout 180] [--setups pyvmm,qemu-microvm,qemu-q35]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from pyvmm.cli import default_guest_dir, parse_size
from pyvmm.cmdline import default_cmdline
from pyvmm.platform import Flavour, detect_flavour
from pyvmm.testing.process import StreamLog, VmmProcess

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

GUEST_APPEND = "pyvmm.run=/pyvmm-tests/boot-checks.sh"
READY_RE = re.compile(rb"pyvmm-guest: ready")
# The first output of a guest command: boot-checks.sh's first line, or FIRST_COMMAND's.
FIRST_COMMAND = "echo first-output"
FIRST_RE = re.compile(rb"check: cpus=|first-output")
FIRST_RUN_RE = re.compile(rb"VMM start to first KVM_RUN: ([0-9.]+) s")
# QEMU pauses the VM after these and never exits by itself.
QEMU_FATAL_RE = re.compile(rb"KVM internal error|emulation failure|KVM: entry failed")
FATAL_GRACE_S = 1.0      # let QEMU finish its register dump before we end it
STOP_GRACE_S = 5.0       # SIGTERM -> SIGKILL
TAIL_LINES = 10
ANSI_RE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")  # SeaBIOS clears the screen

QEMU_MACHINES = {
    "qemu-microvm": "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on",
    "qemu-q35": "q35",
}
# With KVM on PVM the guest sees the host's CPUID except CX16 (docs/pvm.md "CPUID"), so hiding
# CMPXCHG16B is what -cpu can do; the rest is hidden by the command line.  Measured
# with QEMU 7.2 on a PVM host: host / max / qemu64 without -cx16 stop at
# `lock cmpxchg16b` in __cmpxchg_double_slab; with -cx16 they all stop at the
# kernel's int3 self-test (QEMU pauses the VM on any emulation failure at CPL0,
# where pyvmm finishes the instruction itself), whichever model is used.
DEFAULT_QEMU_CPU = "host,-cx16,-arch-capabilities"
# pyvmm-exec: a cold boot to the output of `pyvmm run --exec`; pyvmm-restore: the same
# command after `pyvmm restore` of a snapshot taken at the guest's snapshot point.
DEFAULT_SETUPS = ("pyvmm", "pyvmm-exec", "pyvmm-restore", "qemu-microvm", "qemu-q35",
                  "qemu-microvm-tcg")
# pyvmm-ram-at-boot: `pyvmm run --memory-at-boot`, every byte of RAM online before user
# space (on PVM pyvmm otherwise boots with 256M and /init adds the rest after ready).
OPTIONAL_SETUPS = ("pyvmm-ram-at-boot",)


# --- configuration ----------------------------------------------------------------
@dataclass(frozen=True)
class GuestConfig:
    kernel: str
    initramfs: str
    memory: str
    cpus: int
    cmdline: str   # the full kernel command line (default + appended words)
    append: str    # the appended words alone (pyvmm gets them through --append)


@dataclass(frozen=True)
class Setup:
    name: str
    argv: list[str]
    expected_status: int
    fatal_stderr: re.Pattern[bytes] | None = None


def guest_config(args: argparse.Namespace, flavour: Flavour) -> GuestConfig:
    guest_dir = default_guest_dir()
    kernel = args.kernel or str(guest_dir / "vmlinux")
    initramfs = args.initramfs or str(guest_dir / "initramfs.cpio")
    cmdline = " ".join(w for w in (default_cmdline(flavour), args.append) if w)
    return GuestConfig(kernel=kernel, initramfs=initramfs, memory=args.memory,
                       cpus=args.cpus, cmdline=cmdline, append=args.append)


def pyvmm_setup(guest: GuestConfig, name: str = "pyvmm") -> Setup:
    argv = [*pyvmm_argv("run"), "--kernel", guest.kernel, "--initramfs", guest.initramfs,
            "--cpus", str(guest.cpus), "--memory", guest.memory]
    if name == "pyvmm-ram-at-boot":
        argv.append("--memory-at-boot")
    if guest.append:
        argv += ["--append", guest.append]
    return Setup(name, argv, expected_status=0)


def pyvmm_argv(command: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", "--log-level", "debug", command]


def pyvmm_exec_setup(guest: GuestConfig) -> Setup:
    """A cold boot to a command's output (the console on stdout too, for `ready`)."""
    argv = [*pyvmm_argv("run"), "--kernel", guest.kernel, "--initramfs", guest.initramfs,
            "--cpus", str(guest.cpus), "--memory", guest.memory, "--serial", "stdio",
            "--exec", FIRST_COMMAND]
    return Setup("pyvmm-exec", argv, expected_status=0)


def pyvmm_restore_setup(snapshot: str) -> Setup:
    """The same command in a guest restored from ``snapshot`` (taken by ``take_snapshot``)."""
    argv = [*pyvmm_argv("restore"), snapshot, "--serial", "stdio", "--exec", FIRST_COMMAND]
    return Setup("pyvmm-restore", argv, expected_status=0)


def qemu_argv(qemu: str, accel: str, machine: str, cpu: str, guest: GuestConfig) -> list[str]:
    memory_mib = parse_size(guest.memory) >> 20
    return [qemu, "-accel", accel, "-M", machine, "-cpu", cpu,
            "-m", f"{memory_mib}M", "-smp", str(guest.cpus),
            "-kernel", guest.kernel, "-initrd", guest.initramfs, "-append", guest.cmdline,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0x501,iosize=1"]


def qemu_setup(name: str, qemu: str, cpu: str, guest: GuestConfig) -> Setup:
    if name == "qemu-microvm-tcg":
        argv = qemu_argv(qemu, "tcg", QEMU_MACHINES["qemu-microvm"], "max", guest)
    else:
        argv = qemu_argv(qemu, "kvm", QEMU_MACHINES[name], cpu, guest)
    # isa-debug-exit: QEMU exits with (status << 1) | 1; the guest's status is 0.
    return Setup(name, argv, expected_status=1, fatal_stderr=QEMU_FATAL_RE)


def build_setups(names: list[str], guest: GuestConfig, qemu: str, cpu: str,
                 snapshot: str | None = None) -> list[Setup]:
    def one(name: str) -> Setup:
        if name in ("pyvmm", "pyvmm-ram-at-boot"):
            return pyvmm_setup(guest, name)
        if name == "pyvmm-exec":
            return pyvmm_exec_setup(guest)
        if name == "pyvmm-restore":
            return pyvmm_restore_setup(snapshot)
        return qemu_setup(name, qemu, cpu, guest)

    return [one(n) for n in names]


def take_snapshot(guest: GuestConfig, path: str) -> float:
    """The snapshot pyvmm-restore resumes: the same guest stopped at its snapshot point."""
    from pyvmm.testing import Guest

    return Guest.snapshot(path, kernel=guest.kernel, initramfs=guest.initramfs,
                          memory=guest.memory, cpus=guest.cpus)


# --- one run ------------------------------------------------------------------------
@dataclass
class RunResult:
    setup: str
    run: int
    ready_s: float | None = None
    first_s: float | None = None           # the first output of a guest command
    exit_s: float | None = None            # None: killed by us, not exited by itself
    status: int | None = None              # the exit status (also when we ended it)
    killed: bool = False                   # ended by us (timeout or fatal KVM error)
    fatal_s: float | None = None           # QEMU: when it reported the KVM internal error
    load_1min: float | None = None         # the host's load average when the run started
    first_kvm_run_s: float | None = None   # pyvmm: when its debug line appeared on stderr
    vmm_setup_s: float | None = None       # pyvmm: "VMM start to first KVM_RUN: X s"
    failure: str | None = None
    console_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None


def wait_for_end(vmm: VmmProcess, timeout: float) -> str | None:
    """Wait until the process exits, QEMU reports a fatal KVM error, or the deadline passes."""
    deadline = vmm.t0 + timeout
    while vmm.exited_at is None:
        now = time.monotonic()
        fatal_at = vmm.errors.time_of("fatal")
        if fatal_at is not None and now - fatal_at >= FATAL_GRACE_S:
            return "fatal"
        if now >= deadline:
            return "timeout"
        vmm.wait_until(lambda: vmm.exited_at is not None or "fatal" in vmm.errors.hits,
                       min(0.5, deadline - now))
    return None


class Watched(NamedTuple):
    """One finished (or stopped) VMM process and what its streams showed."""
    t0: float                 # monotonic time just before the spawn
    proc: subprocess.Popen
    vmm: VmmProcess           # exited_at: when it exited by itself
    out: StreamLog            # the console, with READY_RE
    err: StreamLog            # stderr, with the caller's patterns
    ended_by: str | None      # None: exited by itself; "fatal"/"timeout": stopped by us


def run_watched(argv: list[str], setup, timeout: float,
                stderr_patterns: dict[str, re.Pattern[bytes]]) -> Watched:
    """Run ``argv`` in its own session (pyvmm.testing.VmmProcess) until it exits,
    reports a fatal KVM error (``setup.fatal_stderr``) or ``timeout`` passes; its
    process group never outlives this call.  Raises OSError when it cannot start."""
    vmm = VmmProcess(argv, cwd=str(REPO), stdin=False, watch={"ready": READY_RE, "first": FIRST_RE},
                     watch_stderr=stderr_patterns)
    try:
        ended_by = wait_for_end(vmm, timeout)
    finally:
        vmm.stop(STOP_GRACE_S)   # also on KeyboardInterrupt: never leave a VMM behind
    return Watched(vmm.t0, vmm.proc, vmm, vmm.console, vmm.errors, ended_by)


def run_once(setup: Setup, index: int, timeout: float, kernel: str) -> RunResult:
    """Boot once; times are seconds since just before the process was spawned."""
    load = os.getloadavg()[0]
    stderr_patterns = {"first_run": FIRST_RUN_RE}
    if setup.fatal_stderr is not None:
        stderr_patterns["fatal"] = setup.fatal_stderr
    try:
        t0, proc, vmm, out, err, ended_by = run_watched(setup.argv, setup, timeout, stderr_patterns)
    except OSError as e:
        return RunResult(setup=setup.name, run=index, load_1min=load,
                         failure=f"cannot start {setup.argv[0]}: {e.strerror}")
    result = make_result(setup, index, t0, ended_by, proc, vmm, out, err, timeout, kernel)
    result.load_1min = load
    return result


def make_result(setup: Setup, index: int, t0: float, ended_by: str | None, proc: subprocess.Popen,
                vmm: VmmProcess, out: StreamLog, err: StreamLog, timeout: float,
                kernel: str) -> RunResult:
    r = RunResult(setup=setup.name, run=index, status=proc.returncode,
                  console_tail=out.tail(), stderr_tail=err.tail())
    if (t := out.time_of("ready")) is not None:
        r.ready_s = t - t0
    if (t := out.time_of("first")) is not None:
        r.first_s = t - t0
    if ended_by is None and vmm.exited_at is not None:
        r.exit_s = vmm.exited_at - t0
    r.killed = ended_by is not None
    if (t := err.time_of("fatal")) is not None:
        r.fatal_s = t - t0
    if (hit := err.hits.get("first_run")) is not None:
        r.first_kvm_run_s = hit[0] - t0
        r.vmm_setup_s = float(hit[1].group(1))
    r.failure = failure_reason(setup, r, ended_by, bytes(err.data), timeout, kernel)
    return r


def boot_failure(r, ended_by: str | None, stderr: bytes, timeout: float, kernel: str) -> str | None:
    """Why a boot did not get as far as running the guest's job, or None.

    Shared by every bench: ``r`` has ``fatal_s``, ``ready_s`` and ``status``."""
    if ended_by == "fatal":
        return describe_kvm_error(stderr, kernel) + f", {r.fatal_s:.1f} s after start"
    if ended_by == "timeout":
        where = "after" if r.ready_s is not None else "before"
        return f"no exit within the {timeout:.0f} s timeout ({where} ready)"
    if r.ready_s is None:
        return f"exited with status {r.status} before `pyvmm-guest: ready`"
    return None


def failure_reason(setup: Setup, r: RunResult, ended_by: str | None, stderr: bytes,
                   timeout: float, kernel: str) -> str | None:
    if why := boot_failure(r, ended_by, stderr, timeout, kernel):
        return why
    if r.status != setup.expected_status:
        return f"exit status {r.status}, expected {setup.expected_status}"
    return None


# --- explaining a QEMU failure --------------------------------------------------------
def describe_kvm_error(stderr: bytes, kernel: str) -> str:
    """One line from QEMU's 'KVM internal error' dump: where and which instruction."""
    text = stderr.decode(errors="replace")
    parts = ["QEMU stopped the VM: KVM internal error"]
    if m := re.search(r"Suberror: (\d+)", text):
        parts[0] += f", suberror {m.group(1)}" + (" (emulation failure)" if m.group(1) == "1" else "")
    if m := re.search(r"RIP=([0-9a-f]+)", text):
        rip = int(m.group(1), 16)
        parts.append(f"at RIP {rip:#x}{symbolize(kernel, rip)}")
    if m := re.search(r"Code=.*?<([0-9a-f]{2})>((?: [0-9a-f]{2}){0,3})", text):
        parts.append(f"instruction bytes {m.group(1)}{m.group(2)}")
    if m := re.search(r"CPL=(\d)", text):
        parts.append(f"CPL {m.group(1)}")
    return ", ".join(parts)


def symbolize(kernel: str, address: int) -> str:
    """`` <symbol+0xoff>`` from the kernel's symbol table (nm), or '' if unknown."""
    nm = shutil.which("nm")
    if nm is None:
        return ""
    try:
        listing = subprocess.run([nm, "-n", kernel], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    best: tuple[int, str] | None = None
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        value = int(fields[0], 16)
        if value > address:
            break
        best = (value, fields[2])
    return f" <{best[1]}+{address - best[0]:#x}>" if best else ""


# --- statistics and report --------------------------------------------------------------
@dataclass
class Stats:
    n: int
    median: float
    min: float
    max: float

    def cell(self) -> str:
        return f"{self.median:6.2f} {self.min:7.2f} {self.max:7.2f}"


def stats(values: list[float | None]) -> Stats | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return Stats(len(xs), statistics.median(xs), min(xs), max(xs))


def summarize(setup: Setup, results: list[RunResult]) -> dict:
    ok = [r for r in results if r.ok]
    failures = [r for r in results if not r.ok]
    return {
        "setup": setup.name,
        "argv": setup.argv,
        "runs": len(results),
        "ok": len(ok),
        "ready": stats([r.ready_s for r in ok]),
        "first": stats([r.first_s for r in ok]),
        "exit": stats([r.exit_s for r in ok]),
        "failure": failures[0].failure if failures else None,
        "failure_console_tail": failures[0].console_tail if failures else [],
        "failure_stderr_tail": failures[0].stderr_tail if failures else [],
    }


def pyvmm_split(results: list[RunResult]) -> dict[str, Stats | None]:
    ok = [r for r in results if r.ok and r.first_kvm_run_s is not None]
    return {
        "process_start_to_first_kvm_run": stats([r.first_kvm_run_s for r in ok]),
        "vmm_start_to_first_kvm_run": stats([r.vmm_setup_s for r in ok]),
        "python_startup_and_args": stats([r.first_kvm_run_s - r.vmm_setup_s for r in ok]),
        "first_kvm_run_to_ready": stats([r.ready_s - r.first_kvm_run_s for r in ok]),
        "ready_to_exit": stats([r.exit_s - r.ready_s for r in ok]),
    }


def ratio(a: Stats | None, b: Stats | None) -> float | None:
    return a.median / b.median if a and b and b.median else None


def fmt_ratio(x: float | None) -> str:
    return f"{x:5.2f}" if x is not None else "  -  "


def table(summaries: list[dict]) -> str:
    base = next((s for s in summaries if s["setup"] == "pyvmm"), None)
    header = (f"{'setup':<17} {'runs':>5}  {'ready median/min/max (s)':<24}  "
              f"{'exit median/min/max (s)':<24}  {'QEMU/pyvmm ready, exit':<23}  {'pyvmm/QEMU ready, exit'}")
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(table_row(s, base))
    return "\n".join(lines)


def table_row(s: dict, base: dict | None) -> str:
    runs = f"{s['ok']}/{s['runs']}"
    ready = s["ready"].cell() if s["ready"] else "-"
    exit_ = s["exit"].cell() if s["exit"] else "-"
    if base is None or s is base or not s["ok"]:
        ratios = ""
    else:
        ratios = (f"{fmt_ratio(ratio(s['ready'], base['ready']))}, {fmt_ratio(ratio(s['exit'], base['exit']))}"
                  f"{'':<11}  {fmt_ratio(ratio(base['ready'], s['ready']))}, "
                  f"{fmt_ratio(ratio(base['exit'], s['exit']))}")
    row = f"{s['setup']:<17} {runs:>5}  {ready:<24}  {exit_:<24}  {ratios}"
    if s["failure"]:
        row += f"\n{'':<17}   FAILED: {s['failure']}"
        row += "".join(f"\n{'':<17}   | {line}" for line in s["failure_console_tail"][-5:])
    return row.rstrip()


def first_output_table(summaries: list[dict]) -> str:
    """Time to a guest command's first output: cold boots against a restore."""
    base = next((s for s in summaries if s["setup"] == "pyvmm-restore" and s["first"]), None)
    header = f"{'setup':<17} {'first output median/min/max (s)':<32}  {'this / pyvmm-restore'}"
    lines = ["time to a guest command's first output (boot-checks.sh's first line, or "
             f"`{FIRST_COMMAND}` through the agent):", header, "-" * len(header)]
    for s in summaries:
        if not s["first"]:
            continue
        r = fmt_ratio(ratio(s["first"], base["first"])) if base and s is not base else ""
        lines.append(f"{s['setup']:<17} {s['first'].cell():<32}  {r}")
    return "\n".join(lines)


SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty",
                "Anonymous")


def proc_kib_fields(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    """The first number of each ``Field:`` line of a /proc file (memory in KiB)."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0])
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """KiB per field of /proc/PID/smaps_rollup."""
    return proc_kib_fields(f"/proc/{pid}/smaps_rollup", SMAPS_FIELDS)


STATUS_RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def status_rss(pid: int) -> dict[str, int]:
    """KiB per RSS field of /proc/PID/status."""
    return proc_kib_fields(f"/proc/{pid}/status", STATUS_RSS_FIELDS)


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's children file)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def file_rss(pid: int, path: str) -> int:
    """KiB of ``pid``'s RSS in its mappings of the file at ``path`` (matched by device
    and inode: the process may see it under another name, e.g. from a sandbox)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    total, ours = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if ":" not in fields[0]:    # a mapping: range, perms, offset, dev, inode[, path]
                ours = len(fields) >= 5 and fields[3] == dev and int(fields[4]) == st.st_ino
            elif ours and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def running_memory(guest: GuestConfig, work: str) -> dict[str, dict[str, int]]:
    """RSS of a cold-booted VMM with a DAX share and of its back-end, while the guest
    runs (after a command that read a file through the window).  A sandboxed back-end
    is two processes: the one the VMM started waits for the server in its PID
    namespace.  The guest RAM memfd counts in RssShmem only for the pages the VMM
    itself touched; the shared file's pages that the guest read through the DAX
    window count in the VMM's RssFile (and again, alone, as RssDaxFile)."""
    from pyvmm.testing import Guest, Share

    share_dir = os.path.join(work, "rss-share")
    os.mkdir(share_dir)
    shared_file = os.path.join(share_dir, "file")
    with open(shared_file, "wb") as f:
        f.write(os.urandom(1 << 20))
    with Guest(kernel=guest.kernel, initramfs=guest.initramfs, memory=guest.memory,
               cpus=guest.cpus, shares={"data": Share(share_dir, dax=True)}) as g:
        g.run("cat /mnt/data/file > /dev/null")
        vmm = g.vmm.proc.pid
        rss = {"pyvmm": {**status_rss(vmm), "RssDaxFile": file_rss(vmm, shared_file)}}
        for child in child_pids(vmm):
            rss["pyvmm-virtiofsd"] = status_rss(child)
            for server in child_pids(child):   # sandboxed: the server is its child (sandbox.py)
                rss["pyvmm-virtiofsd server"] = status_rss(server)
    return rss


def rss_text(rss: dict[str, dict[str, int]]) -> str:
    return "\n".join(f"{proc} RSS while a guest with a DAX share runs: "
                     + ", ".join(f"{k} {v / 1024:.1f}" for k, v in fields.items()) + " MiB"
                     for proc, fields in rss.items())


def restore_memory(snapshot: str, count: int, shares: dict | None = None) -> list[dict[str, int]]:
    """Memory of ``count`` restores of one snapshot running side by side (each VMM's
    smaps_rollup once every guest is ready and has run one command)."""
    from pyvmm.testing import Guest

    guests = [Guest.restore(snapshot, shares=shares or {}) for _ in range(count)]
    try:
        for g in guests:
            g.start().run("true")
        return [smaps_rollup(g.vmm.proc.pid) for g in guests]
    finally:
        for g in guests:
            g.close()


def memory_text(label: str, rows: list[dict[str, int]]) -> str:
    lines = [f"{label}: " + ", ".join(f"{k} {sum(r[k] for r in rows) / 1024:.1f}"
                                      for k in SMAPS_FIELDS) + " MiB in all"]
    for i, r in enumerate(rows):
        lines.append(f"  restore {i + 1}: " + ", ".join(f"{k} {r[k] / 1024:.1f}" for k in SMAPS_FIELDS) + " MiB")
    return "\n".join(lines)


def split_text(split: dict[str, Stats | None]) -> str:
    labels = {
        "process_start_to_first_kvm_run": "process start -> first KVM_RUN",
        "python_startup_and_args": "  of which Python start-up, imports, args, reading files",
        "vmm_start_to_first_kvm_run": "  of which VMM start -> first KVM_RUN (pyvmm's debug log)",
        "first_kvm_run_to_ready": "first KVM_RUN -> ready (guest kernel boot + /init start)",
        "ready_to_exit": "ready -> exit (guest user space + VMM teardown)",
    }
    lines = ["pyvmm time split, median / min / max (s):"]
    for key, label in labels.items():
        s = split.get(key)
        lines.append(f"  {label:<62} {s.cell() if s else '-'}")
    return "\n".join(lines)


# --- host facts, JSON --------------------------------------------------------------------
def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return out.splitlines()[0] if out else "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out or "unknown"


def host_facts(flavour: Flavour, qemu: str | None = None) -> dict:
    """The host, and QEMU's version when the bench runs QEMU."""
    facts = {
        "kvm_flavour": flavour.name,
        "kvm_flavour_summary": flavour.summary,
        "host": platform.node(),
        "host_kernel": platform.release(),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyvmm_commit": git_commit(),
    }
    if qemu is not None:
        facts["qemu"] = qemu_version(qemu)
    return facts


def default_json_path() -> Path:
    return RESULTS_DIR / f"boot-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"


def to_jsonable(obj):
    if isinstance(obj, Stats):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    return obj


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(report), indent=2) + "\n")


# --- main ---------------------------------------------------------------------------------
def add_guest_args(p: argparse.ArgumentParser, bench: str) -> None:
    """The options every bench shares: the guest, the QEMU peer, the JSON file."""
    p.add_argument("--kernel", help="default: guest/build/vmlinux")
    p.add_argument("--initramfs", help="default: guest/build/initramfs.cpio")
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M, pyvmm's default)")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    p.add_argument("--qemu-cpu", default=DEFAULT_QEMU_CPU, help=f"QEMU -cpu for KVM (default {DEFAULT_QEMU_CPU})")
    p.add_argument("--json", type=Path,
                   help=f"where to write the results (default bench/results/{bench}-<date>.json)")


def setup_names(p: argparse.ArgumentParser, text: str, known) -> list[str]:
    """The --setups list, each name checked against ``known`` (p.error otherwise)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if bad := [s for s in names if s not in known]:
        p.error(f"unknown setup(s) {', '.join(bad)}; known: {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.boot", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="boots per setup (default 3)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per boot before it is killed (default 180)")
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                   help=f"comma-separated, from {', '.join(DEFAULT_SETUPS + OPTIONAL_SETUPS)}")
    p.add_argument("--append", default=GUEST_APPEND, help=f"kernel command line words (default {GUEST_APPEND})")
    p.add_argument("--no-rss", dest="rss", action="store_false",
                   help="skip the RSS measurement of a running VMM (one more boot)")
    p.add_argument("--rss-only", action="store_true",
                   help="only boot pyvmm once with a DAX share and print its and its back-end's RSS")
    add_guest_args(p, "boot")
    args = p.parse_args(argv)
    args.setup_names = setup_names(p, args.setups, DEFAULT_SETUPS + OPTIONAL_SETUPS)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def run_all(setups: list[Setup], runs: int, timeout: float, kernel: str) -> dict[str, list[RunResult]]:
    """Round-robin over the setups; a setup that failed once is not run again."""
    results: dict[str, list[RunResult]] = {s.name: [] for s in setups}
    for index in range(1, runs + 1):
        for setup in setups:
            done = results[setup.name]
            if any(not r.ok for r in done):
                continue
            print(f"[{setup.name} run {index}/{runs}] ...", end=" ", flush=True)
            r = run_once(setup, index, timeout, kernel)
            done.append(r)
            print(progress_line(r), flush=True)
    return results


def progress_line(r: RunResult) -> str:
    def t(x: float | None) -> str:
        return f"{x:.2f} s" if x is not None else "-"
    status = "killed" if r.killed else f"status {r.status}"
    line = f"ready {t(r.ready_s)}, exit {t(r.exit_s)}, {status} (load {r.load_1min:.1f})"
    return line + (f"  FAILED: {r.failure}" if r.failure else "")


def missing_guest_files(guest: GuestConfig) -> list[str]:
    return [p for p in (guest.kernel, guest.initramfs) if not Path(p).is_file()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flavour = detect_flavour()
    guest = guest_config(args, flavour)
    if missing := missing_guest_files(guest):
        sys.stderr.write(f"bench.boot: {', '.join(missing)} missing: run `make guest` first\n")
        return 2
    if args.rss_only:
        return print_rss_only(guest)
    facts = host_facts(flavour, args.qemu)
    print(flavour.summary)
    print(f"kernel {guest.kernel}, initramfs {guest.initramfs}, memory {guest.memory}, cpus {guest.cpus}")
    print(f"kernel command line: {guest.cmdline}")
    work = tempfile.mkdtemp(prefix="bench-boot-")
    snapshots: dict = {}
    try:
        snapshot = os.path.join(work, "snapshot")
        if "pyvmm-restore" in args.setup_names:
            snapshots["snapshot_s"] = take_snapshot(guest, snapshot)
            print(f"snapshot of the guest at its snapshot point taken in {snapshots['snapshot_s']:.1f} s")
        setups = build_setups(args.setup_names, guest, args.qemu, args.qemu_cpu, snapshot)
        load_before = os.getloadavg()
        results = run_all(setups, args.runs, args.timeout, guest.kernel)
        load_after = os.getloadavg()
        if "pyvmm-restore" in args.setup_names:
            snapshots.update(snapshot_memory(guest, snapshot, work))
        rss = running_memory(guest, work) if args.rss and "pyvmm" in args.setup_names else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summaries = [summarize(s, results[s.name]) for s in setups]
    split = pyvmm_split(results.get("pyvmm", []))
    print_report(flavour, guest, setups, summaries, split, (load_before[0], load_after[0]))
    if rss:
        print(rss_text(rss))
    if snapshots:
        print(f"snapshot file sizes: {snapshots['files']}")
        print(memory_text("4 restores at once, no share (RAM mapped MAP_PRIVATE from the snapshot)",
                          snapshots["memory_private"]))
        print(memory_text("4 restores at once, each with a share (RAM copied into a memfd a "
                          "back-end can map)", snapshots["memory_shared"]))
    path = args.json or default_json_path()
    write_json(path, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": facts,
        "guest": asdict(guest),
        "runs_per_setup": args.runs,
        "timeout_s": args.timeout,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "summaries": summaries,
        "pyvmm_split": split,
        "snapshots": snapshots,
        "rss": rss,
        "runs": [asdict(r) for rs in results.values() for r in rs],
    })
    print(f"results written to {path}")
    return 0


def print_rss_only(guest: GuestConfig) -> int:
    """``--rss-only``: running_memory alone, printed (no JSON, no other setup)."""
    work = tempfile.mkdtemp(prefix="bench-boot-")
    try:
        rss = running_memory(guest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(rss_text(rss))
    for proc, fields in rss.items():
        total, dax = fields["RssAnon"] + fields["RssFile"], fields.get("RssDaxFile", 0)
        print(f"{proc}: RssAnon + RssFile {total / 1024:.1f} MiB"
              + (f" ({(total - dax) / 1024:.1f} MiB without the shared file's pages in the "
                 "DAX window)" if dax else ""))
    return 0


def snapshot_memory(guest: GuestConfig, snapshot: str, work: str) -> dict:
    """RSS of 4 concurrent restores, without and with a share (another snapshot)."""
    from pyvmm.testing import Guest, Share

    share_dir = os.path.join(work, "share")
    os.mkdir(share_dir)
    shared_snapshot = os.path.join(work, "snapshot-share")
    Guest.snapshot(shared_snapshot, kernel=guest.kernel, initramfs=guest.initramfs,
                   memory=guest.memory, cpus=guest.cpus, shares={"data": share_dir})
    sizes = {}
    for name in ("snapshot.json", "memory.bin"):
        st = os.stat(os.path.join(snapshot, name))
        sizes[name] = f"{st.st_size >> 10} KiB ({st.st_blocks * 512 >> 10} KiB on disk)"
    return {"files": sizes,
            "memory_private": restore_memory(snapshot, 4),
            "memory_shared": restore_memory(shared_snapshot, 4, {"data": Share(share_dir)})}


def print_report(flavour: Flavour, guest: GuestConfig, setups: list[Setup], summaries: list[dict],
                 split: dict[str, Stats | None], loads: tuple[float, float]) -> None:
    print()
    print(table(summaries))
    print("ratios are of medians; QEMU/pyvmm > 1 (and pyvmm/QEMU < 1) means pyvmm is faster")
    print()
    print(first_output_table(summaries))
    print()
    if any(s.name == "pyvmm" for s in setups):
        print(split_text(split))
    print(f"{flavour.summary}\nkernel {guest.kernel}, memory {guest.memory}, cpus {guest.cpus}; "
          f"host load average (1 min) before {loads[0]:.2f}, after {loads[1]:.2f}")
    for s in setups:
        print(f"{s.name}: {shlex.join(s.argv)}")


if __name__ == "__main__":
    sys.exit(main())
