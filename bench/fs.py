"""virtio-fs benchmark: guest sequential reads of a file served by Debian's virtiofsd.

The first form of "virtio-fs over vhost-user with a DAX window" (no DAX):
a 64 MiB file (``pattern write FILE 67108864 7``, written on the host into a
fresh temporary directory) is shared through Debian's
/usr/lib/qemu/virtiofsd (``-o cache=auto``), mounted by the guest's /init at
/mnt/share (``pyvmm.share=share``), and read by
``pyvmm.run=/pyvmm-tests/fsbench.sh``:

* **read()**: ``pattern sum FILE`` (1 MiB read() calls plus an FNV hash),
  timed in the guest with /proc/uptime (10 ms resolution) around the command;
  the fork+exec cost of the same command on an empty file is measured too and
  subtracted (both the raw and the corrected figure are kept);
* **mmap**: ``mmapread FILE`` (map it, hash it), which times itself.

The guest page cache is dropped before each, so both go through virtio-fs;
the file is in the host's page cache (the host just wrote and read it).

The physical reference is the host itself, on the same file, in the same run:
**host read()** is a second pass of 1 MiB readinto() calls in Python (the
first pass warms the page cache), **host mmap** is the same static mmapread
binary the guest runs.  Ratios are guest / host.  The guest's hashes are
checked against ``pattern sum`` on the host.

Setups: ``pyvmm`` (``--fs tag=share,socket=SOCK``), and ``qemu-q35``: QEMU
with ``vhost-user-fs-pci`` on a memfd memory backend shared with its own
virtiofsd instance.  On a PVM host QEMU/KVM stops at the guest kernel's int3
self-test; that row records the failure reason and the last console lines as
bench/boot.py does.  ``qemu-q35-tcg`` (QEMU's JIT, no KVM) is optional.
Every run has a deadline; the VMM's and virtiofsd's process groups are
killed afterwards.  Results are printed and written as JSON (default
bench/results/fs-<date>.json).  A benchmark, not a test.

    python -m bench.fs [--runs 1] [--timeout 300] [--setups pyvmm,qemu-q35]
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench.boot import (DEFAULT_QEMU_CPU, QEMU_FATAL_RE, REPO, RESULTS_DIR, STOP_GRACE_S, GuestConfig,
                        describe_kvm_error, host_facts, qemu_argv, run_watched, signal_group, stats,
                        write_json)
from pyvmm.cli import default_guest_dir, parse_size
from pyvmm.cmdline import default_cmdline
from pyvmm.platform import detect_flavour

MiB = 1 << 20
FILE_SIZE = 64 * MiB
PATTERN_SEED = 7
FILE_NAME = "fsbench.bin"
TAG = "share"
GUEST_SCRIPT = "/pyvmm-tests/fsbench.sh"
GUEST_APPEND = f"pyvmm.share={TAG} pyvmm.run={GUEST_SCRIPT}"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
VIRTIOFSD_OPTS = ["-o", "cache=auto", "-o", "sandbox=chroot"]
HOST_BIN = REPO / "guest" / "build" / "initramfs.root" / "bin"   # static: runs on the host too

EXEC_RE = re.compile(rb"fsbench exec centis=(\d+)")
READ_RE = re.compile(rb"fsbench read hash=([0-9a-f]+) bytes=(\d+) centis=(\d+)")
MMAP_RE = re.compile(rb"fsbench mmap hash=([0-9a-f]+) bytes=(\d+) mbps=([0-9.]+)")
LINE_RE = re.compile(rb"^fsbench .*$", re.M)

DEFAULT_SETUPS = ("pyvmm", "qemu-q35")
OPTIONAL_SETUPS = ("qemu-q35-tcg",)
TCG_NOTE = "TCG = QEMU's software emulation (no KVM): a reference, not a like-for-like peer"


# --- setups -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    name: str
    argv: Callable[[str], list[str]]   # the command line for a vhost-user socket path
    expected_status: int
    fatal_stderr: re.Pattern[bytes] | None = None
    note: str = ""


def pyvmm_setup(guest: GuestConfig) -> Setup:
    def argv(sock: str) -> list[str]:
        return [sys.executable, "-m", "pyvmm", "run",
                "--kernel", guest.kernel, "--initramfs", guest.initramfs,
                "--cpus", str(guest.cpus), "--memory", guest.memory,
                "--fs", f"tag={TAG},socket={sock}", "--append", guest.append]
    return Setup("pyvmm", argv, expected_status=0)


def qemu_setup(name: str, qemu: str, cpu: str, guest: GuestConfig) -> Setup:
    tcg = name.endswith("-tcg")
    base = qemu_argv(qemu, "tcg" if tcg else "kvm", "q35", "max" if tcg else cpu, guest)
    mem = guest.memory

    def argv(sock: str) -> list[str]:
        # vhost-user needs guest RAM the backend can map: a shared memfd backend.
        return base + ["-chardev", f"socket,id=char0,path={sock.replace(',', ',,')}",
                       "-device", f"vhost-user-fs-pci,chardev=char0,tag={TAG}",
                       "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                       "-numa", "node,memdev=mem"]
    return Setup(name, argv, expected_status=1, fatal_stderr=QEMU_FATAL_RE,
                 note=TCG_NOTE if tcg else "")


# --- virtiofsd ----------------------------------------------------------------------------
def start_virtiofsd(sock: str, shared: str, log: Path) -> tuple[subprocess.Popen | None, str | None]:
    """Start a virtiofsd in its own process group; (proc, None) or (None, why not)."""
    if not os.path.exists(VIRTIOFSD):
        return None, f"{VIRTIOFSD} is missing: `make setup` installs qemu-system-common"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}",
                                 *VIRTIOFSD_OPTS], stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            return None, "virtiofsd did not start: " + log.read_text(errors="replace")[-500:]
        time.sleep(0.05)
    return proc, None


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to a process group we created; always reaps."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc, signal.SIGKILL)  # stragglers in the group, if any
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass


# --- one run ------------------------------------------------------------------------------
@dataclass
class RunResult:
    setup: str
    run: int
    argv: list[str] = field(default_factory=list)
    read_mbps: float | None = None          # exec-corrected
    read_raw_mbps: float | None = None      # including `pattern sum`'s fork+exec
    read_centis: int | None = None
    exec_centis: int | None = None
    mmap_mbps: float | None = None
    read_hash: str | None = None
    mmap_hash: str | None = None
    fsbench_lines: list[str] = field(default_factory=list)
    ready_s: float | None = None
    exit_s: float | None = None
    status: int | None = None
    killed: bool = False
    fatal_s: float | None = None
    load_1min: float | None = None
    failure: str | None = None
    console_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    virtiofsd_log_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None


def run_once(setup: Setup, index: int, timeout: float, shared: str, host_hash: str,
             kernel: str) -> RunResult:
    """One boot with its own virtiofsd; neither outlives this call."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-fs-") as tmp:
        sock = os.path.join(tmp, "vfs.sock")
        log = Path(tmp) / "virtiofsd.log"
        argv = setup.argv(sock)
        load = os.getloadavg()[0]
        backend, why = start_virtiofsd(sock, shared, log)
        if backend is None:
            return RunResult(setup=setup.name, run=index, argv=argv, load_1min=load, failure=why)
        try:
            stderr_patterns = {"fatal": setup.fatal_stderr} if setup.fatal_stderr is not None else {}
            try:
                t0, proc, waiter, out, err, ended_by = run_watched(argv, setup, timeout, stderr_patterns)
            except OSError as e:
                return RunResult(setup=setup.name, run=index, argv=argv, load_1min=load,
                                 failure=f"cannot start {argv[0]}: {e.strerror}")
        finally:
            kill_group(backend)
        vlog = log.read_text(errors="replace").splitlines()[-10:]
    r = RunResult(setup=setup.name, run=index, argv=argv, status=proc.returncode, load_1min=load,
                  killed=ended_by is not None, console_tail=out.tail(), stderr_tail=err.tail(),
                  virtiofsd_log_tail=vlog)
    if (t := out.time_of("ready")) is not None:
        r.ready_s = t - t0
    if ended_by is None and waiter.exited_at is not None:
        r.exit_s = waiter.exited_at - t0
    if (t := err.time_of("fatal")) is not None:
        r.fatal_s = t - t0
    parse_console(bytes(out.data), r)
    r.failure = failure_reason(setup, r, ended_by, bytes(err.data), timeout, host_hash, kernel)
    return r


def parse_console(console: bytes, r: RunResult) -> None:
    console = console.replace(b"\r", b"")
    r.fsbench_lines = [m.group(0).decode(errors="replace") for m in LINE_RE.finditer(console)]
    if m := EXEC_RE.search(console):
        r.exec_centis = int(m.group(1))
    if m := READ_RE.search(console):
        r.read_hash, nbytes, r.read_centis = m.group(1).decode(), int(m.group(2)), int(m.group(3))
        if r.read_centis > 0:
            r.read_raw_mbps = nbytes / (r.read_centis / 100) / 1e6
        net = r.read_centis - (r.exec_centis or 0)
        if net > 0:
            r.read_mbps = nbytes / (net / 100) / 1e6
    if m := MMAP_RE.search(console):
        r.mmap_hash = m.group(1).decode()
        r.mmap_mbps = float(m.group(3))


def failure_reason(setup: Setup, r: RunResult, ended_by: str | None, stderr: bytes, timeout: float,
                   host_hash: str, kernel: str) -> str | None:
    if ended_by == "fatal":
        return describe_kvm_error(stderr, kernel) + f", {r.fatal_s:.1f} s after start"
    if ended_by == "timeout":
        where = "after" if r.ready_s is not None else "before"
        return f"no exit within the {timeout:.0f} s timeout ({where} ready)"
    if r.ready_s is None:
        return f"exited with status {r.status} before `pyvmm-guest: ready`"
    if r.read_mbps is None or r.mmap_mbps is None:
        return f"no fsbench result for read() and mmap (exit status {r.status})"
    if r.read_hash != host_hash or r.mmap_hash != host_hash:
        return f"hash mismatch: guest read {r.read_hash}, mmap {r.mmap_hash}, host {host_hash}"
    if r.status != setup.expected_status:
        return f"exit status {r.status}, expected {setup.expected_status}"
    return None


# --- the host reference -------------------------------------------------------------------
def host_reference(path: str) -> dict:
    """The host's own page-cache reads of the file: read() twice (second timed), then mmap."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    read_s = None
    for _ in range(2):
        with open(path, "rb", buffering=0) as f:
            t = time.monotonic()
            while f.readinto(view):
                pass
            read_s = time.monotonic() - t
    size = os.path.getsize(path)
    # Python's own mmap pass: touch every page (no hashing)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        t = time.monotonic()
        for off in range(0, size, MiB):
            n = min(MiB, size - off)
            view[:n] = m[off:off + n]
        py_mmap_s = time.monotonic() - t
    # the guest's own binaries, run on the host: same hash loop as in the guest
    t = time.monotonic()
    sum_out = subprocess.run([str(HOST_BIN / "pattern"), "sum", path], check=True, capture_output=True,
                             text=True, timeout=120).stdout.split()
    sum_s = time.monotonic() - t
    mm_out = subprocess.run([str(HOST_BIN / "mmapread"), path], check=True, capture_output=True,
                            text=True, timeout=120).stdout.split()
    if mm_out[0] != sum_out[0]:
        raise RuntimeError(f"host mmapread hash {mm_out[0]} != pattern sum hash {sum_out[0]}")
    return {
        "bytes": size,
        "hash": sum_out[0],
        "read_mbps": size / read_s / 1e6,                 # Python readinto, 1 MiB, second pass
        "python_mmap_copy_mbps": size / py_mmap_s / 1e6,  # Python mmap slices, 1 MiB
        "pattern_sum_mbps": size / sum_s / 1e6,           # `pattern sum` incl. exec, as the guest's read()
        "mmap_mbps": float(mm_out[2]),                    # mmapread, as the guest's mmap
    }


# --- report -------------------------------------------------------------------------------
def summarize(setup: Setup, results: list[RunResult]) -> dict:
    ok = [r for r in results if r.ok]
    failures = [r for r in results if not r.ok]
    return {
        "setup": setup.name, "note": setup.note, "runs": len(results), "ok": len(ok),
        "read_mbps": stats([r.read_mbps for r in ok]),
        "read_raw_mbps": stats([r.read_raw_mbps for r in ok]),
        "mmap_mbps": stats([r.mmap_mbps for r in ok]),
        "failure": failures[0].failure if failures else None,
        "failure_console_tail": failures[0].console_tail if failures else [],
        "failure_stderr_tail": failures[0].stderr_tail if failures else [],
    }


def table(summaries: list[dict], host: dict) -> str:
    header = (f"{'setup':<14} {'runs':>5}  {'read() MB/s':>11}  {'(raw)':>7}  {'mmap MB/s':>9}  "
              f"ratio guest/host (read(), mmap)")
    lines = [header, "-" * len(header)]
    lines.append(f"{'host':<14} {'':>5}  {host['read_mbps']:>11.1f}  {'':>7}  {host['mmap_mbps']:>9.1f}  "
                 f"1 (page-cache reference)")
    for s in summaries:
        def cell(metric: str, width: int) -> str:
            st = s[metric]
            return f"{st.median:>{width}.1f}" if st else f"{'-':>{width}}"
        if s["ok"]:
            ratios = (f"{s['read_mbps'].median / host['read_mbps']:.3g}x, "
                      f"{s['mmap_mbps'].median / host['mmap_mbps']:.3g}x")
        else:
            ratios = "-"
        row = (f"{s['setup']:<14} {s['ok']:>2}/{s['runs']:<2}  {cell('read_mbps', 11)}  "
               f"{cell('read_raw_mbps', 7)}  {cell('mmap_mbps', 9)}  {ratios}")
        if s["note"]:
            row += f"\n{'':<14}   ({s['note']})"
        if s["failure"]:
            row += f"\n{'':<14}   FAILED: {s['failure']}"
            row += "".join(f"\n{'':<14}   | {line}" for line in s["failure_console_tail"][-5:])
        lines.append(row)
    return "\n".join(lines)


def progress_line(r: RunResult) -> str:
    def f(x: float | None) -> str:
        return f"{x:.1f} MB/s" if x is not None else "-"
    status = "killed" if r.killed else f"status {r.status}"
    exit_s = f"{r.exit_s:.1f} s" if r.exit_s is not None else "-"
    line = (f"read() {f(r.read_mbps)} (raw {f(r.read_raw_mbps)}), mmap {f(r.mmap_mbps)}; "
            f"exit {exit_s}, {status} (load {r.load_1min:.1f})")
    return line + (f"  FAILED: {r.failure}" if r.failure else "")


# --- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fs", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="boots per setup (default 1)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per boot before it is killed (default 300)")
    known = DEFAULT_SETUPS + OPTIONAL_SETUPS
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                   help=f"comma-separated, from {', '.join(known)} (default {','.join(DEFAULT_SETUPS)})")
    p.add_argument("--kernel", help="default: guest/build/vmlinux")
    p.add_argument("--initramfs", help="default: guest/build/initramfs.cpio")
    p.add_argument("--memory", default="256M", help="guest RAM (default 256M, pyvmm's default)")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary")
    p.add_argument("--qemu-cpu", default=DEFAULT_QEMU_CPU, help=f"QEMU -cpu for KVM (default {DEFAULT_QEMU_CPU})")
    p.add_argument("--json", type=Path, help="where to write the results (default bench/results/fs-<date>.json)")
    args = p.parse_args(argv)
    args.setup_names = [s.strip() for s in args.setups.split(",") if s.strip()]
    if bad := [s for s in args.setup_names if s not in known]:
        p.error(f"unknown setup(s) {', '.join(bad)}; known: {', '.join(known)}")
    if not args.setup_names:
        p.error("--setups names no setup")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    parse_size(args.memory)
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    flavour = detect_flavour()
    guest_dir = default_guest_dir()
    guest = GuestConfig(kernel=args.kernel or str(guest_dir / "vmlinux"),
                        initramfs=args.initramfs or str(guest_dir / "initramfs.cpio"),
                        memory=args.memory, cpus=args.cpus,
                        cmdline=f"{default_cmdline(flavour)} {GUEST_APPEND}", append=GUEST_APPEND)
    needed = [guest.kernel, guest.initramfs, str(HOST_BIN / "pattern"), str(HOST_BIN / "mmapread")]
    if missing := [p for p in needed if not Path(p).is_file()]:
        sys.stderr.write(f"bench.fs: {', '.join(missing)} missing: run `make guest` first\n")
        return 2
    setups = [pyvmm_setup(guest) if n == "pyvmm" else qemu_setup(n, args.qemu, args.qemu_cpu, guest)
              for n in args.setup_names]
    facts = host_facts(flavour, args.qemu)
    print(flavour.summary)
    print(f"kernel {guest.kernel}, initramfs {guest.initramfs}, memory {guest.memory}, cpus {guest.cpus}")
    print(f"kernel command line: {guest.cmdline}")
    print(f"virtiofsd: {VIRTIOFSD} {' '.join(VIRTIOFSD_OPTS)} (one instance per run)")

    load_before = os.getloadavg()
    results: dict[str, list[RunResult]] = {s.name: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-fs-share-") as shared:
        path = os.path.join(shared, FILE_NAME)
        subprocess.run([str(HOST_BIN / "pattern"), "write", path, str(FILE_SIZE), str(PATTERN_SEED)],
                       check=True, timeout=120)
        host = host_reference(path)
        print(f"file: {FILE_SIZE >> 20} MiB, pattern seed {PATTERN_SEED}, hash {host['hash']}")
        print(f"host: read() {host['read_mbps']:.1f} MB/s, mmapread {host['mmap_mbps']:.1f} MB/s, "
              f"pattern sum {host['pattern_sum_mbps']:.1f} MB/s, python mmap {host['python_mmap_copy_mbps']:.1f} MB/s")
        for index in range(1, args.runs + 1):
            for setup in setups:
                done = results[setup.name]
                if any(not r.ok for r in done):
                    continue
                print(f"[{setup.name} run {index}/{args.runs}] ...", end=" ", flush=True)
                r = run_once(setup, index, args.timeout, shared, host["hash"], guest.kernel)
                done.append(r)
                print(progress_line(r), flush=True)
    load_after = os.getloadavg()
    elapsed = time.monotonic() - started

    summaries = [summarize(s, results[s.name]) for s in setups]
    print()
    print(table(summaries, host))
    print("medians over the runs; MB = 10^6 bytes; read() = `pattern sum` (1 MiB read() + hash) in the guest, "
          "timed by /proc/uptime (10 ms), its fork+exec cost subtracted (raw: not subtracted); "
          "host read() = Python readinto, 1 MiB, page cache warm; mmap = mmapread on both")
    print(f"{flavour.summary}\nhost load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for s in setups:
        print(f"{s.name}: {shlex.join(s.argv('SOCK'))}")
    print(f"whole run: {elapsed:.1f} s")
    out = args.json or RESULTS_DIR / f"fs-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    write_json(out, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": facts,
        "guest": asdict(guest),
        "file_bytes": FILE_SIZE,
        "pattern_seed": PATTERN_SEED,
        "virtiofsd": [VIRTIOFSD, *VIRTIOFSD_OPTS],
        "host_reference": host,
        "runs_per_setup": args.runs,
        "timeout_s": args.timeout,
        "elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "summaries": summaries,
        "runs": [asdict(r) for rs in results.values() for r in rs],
    })
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
