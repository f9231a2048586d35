"""virtio-fs benchmark: guest sequential I/O on a 64 MiB file, DAX and not, per back-end and VMM.

What the guest does (``pyvmm.run=/pyvmm-tests/fsbench.sh``, on the share that
its /init mounts at /mnt/share, with ``-o dax`` for the DAX setup), each step
timed by a small static helper in the guest itself (guest/helpers/):

* **read()**: ``rwbench read``, 1 MiB read() calls and an FNV hash of the data;
* **mmap read**: ``mmapread FILE 2``, one MAP_SHARED mapping hashed in user
  space (mmap + page faults + hash), then hashed once more: **mmap again**,
  the same mapping with no page fault left, i.e. the data path alone;
* **write()**: ``rwbench write``, the ``pattern`` bytes for another seed in
  1 MiB write() calls over a preallocated 64 MiB file, then fsync;
* **mmap write**: ``mmapwrite``, the same through a MAP_SHARED mapping of a
  second preallocated file, then msync(MS_SYNC);
* **meta**: ``metabench``, 1,000 files created (open O_CREAT + close), then
  stat()ed, then unlinked, in one process: ops/s with 3 ops per file.

The guest page cache is written back and dropped before each of these, so
they start cold in the guest, while the host's page cache holds the files
(the host has just written them).  The two reads are also repeated at once
("warm"): a new process, but the guest page cache full, or with DAX the
window already mapped.  Around each step the guest prints Cached: from
/proc/meminfo: the **page-cache growth** (kB).  Everything is checked on the
host: the read hashes against the file's, the written files with
``pattern check``, the metadata directory left empty.

The **host reference** is the host's own page cache, through the same static
binaries run on the host, on the same kind of files: read() and mmap read of
the warm file (the limit a guest can reach), write() and mmap write over
preallocated files (fsync/msync included, as in the guest), metabench in a
host directory; the best of 3 runs each.  Ratios are guest / host.

Setups (ONE boot each, each with its own vhost-user back-end and a fresh share):

* ``pyvmm-dax``: pyvmm + pyvmm-virtiofsd, ``--fs ...,dax=on,cache_size=128M``
  (a window twice the file: no reclaim), mounted ``-o dax``;
* ``pyvmm``: pyvmm + pyvmm-virtiofsd without DAX;
* ``pyvmm-debian``: pyvmm + Debian's /usr/lib/qemu/virtiofsd (no DAX support);
* ``qemu-q35``: QEMU q35 (KVM) with ``vhost-user-fs-pci`` + Debian's
  virtiofsd.  On a PVM host QEMU/KVM stops at the guest kernel's int3
  self-test; the row records that failure, as bench/boot.py does;
* ``qemu-q35-tcg``: the same under QEMU's TCG JIT, no KVM: a labelled
  reference, not a like-for-like peer (it takes seconds, so it is run too).

Every boot has a deadline; the VMM's and the back-end's process groups are
killed afterwards.  Results are printed (with the KVM flavour) and written as
JSON (``--json``, default bench/results/fs-<date>.json).  A benchmark, not a
test: nothing asserts on speed.

    python -m bench.fs [--setups pyvmm-dax,pyvmm,pyvmm-debian,qemu-q35,qemu-q35-tcg]
                       [--timeout 900] [--memory 256M] [--cpus 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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

from bench.boot import (QEMU_FATAL_RE, REPO, RESULTS_DIR, STOP_GRACE_S, GuestConfig, Watched,
                        add_guest_args, boot_failure, host_facts, qemu_argv, run_watched,
                        setup_names, write_json)
from pyvmm.cli import UsageError, default_guest_dir, parse_size
from pyvmm.cmdline import default_cmdline
from pyvmm.platform import detect_flavour

MiB = 1 << 20
FILE_SIZE = 64 * MiB
META_FILES = 1000                      # fsbench.sh's metabench count
TAG = "share"
GUEST_APPEND = f"pyvmm.share={TAG} pyvmm.run=/pyvmm-tests/fsbench.sh"
DAX_APPEND = "pyvmm.dax=1"
DAX_WINDOW = "128M"                    # twice the file: no window reclaim during a pass
HOST_BIN = REPO / "guest" / "build" / "initramfs.root" / "bin"   # static: they run on the host too
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
VIRTIOFSD_OPTS = ["-o", "cache=auto", "-o", "sandbox=chroot"]
BACKEND_START_S = 20.0
TCG_NOTE = ("TCG = QEMU's software emulation (no KVM): a reference, not a like-for-like peer; "
            "its guest clock moves in 10 ms steps here")


@dataclass(frozen=True)
class ShareFile:
    """A file the host puts on the share before each boot (fsbench.sh knows the names)."""
    name: str
    seed: int                  # the `pattern` seed the host writes
    expect_seed: int           # what it must hold after the guest ran


READ_FILE = ShareFile("fsbench.bin", 7, 7)
WRITE_FILE = ShareFile("write.bin", 1, 8)         # rwbench write ... 8
MMAP_WRITE_FILE = ShareFile("mmapw.bin", 2, 9)    # mmapwrite ... 9
SHARE_FILES = (READ_FILE, WRITE_FILE, MMAP_WRITE_FILE)
META_DIR = "meta"

# fsbench.sh's phases, in its order, with their headings; the reads are checked
# against the file's hash.
PHASE_HEADINGS = {"read": "read()", "read_warm": "read() warm", "mmap_read": "mmap read",
                  "mmap_read_warm": "mmap warm", "write": "write()", "mmap_write": "mmap write",
                  "meta": "meta"}
PHASES = tuple(PHASE_HEADINGS)
READ_PHASES = ("read", "read_warm", "mmap_read", "mmap_read_warm")
WRITTEN_BY = {"write": WRITE_FILE, "mmap_write": MMAP_WRITE_FILE}
HOST_REPEATS = 3                       # the host reference keeps the best of 3 (it is the limit)


@dataclass(frozen=True)
class Column:
    """One column of the report: a number (``key``) from one phase's words."""
    heading: str
    phase: str
    key: str = "mbps"


COLUMNS = (Column("read()", "read"), Column("read() warm", "read_warm"),
           Column("mmap read", "mmap_read"), Column("mmap warm", "mmap_read_warm"),
           Column("mmap again", "mmap_read", "again_mbps"),
           Column("write()", "write"), Column("mmap write", "mmap_write"),
           Column("meta ops/s", "meta", "ops_per_s"))

FSBENCH_RE = re.compile(rb"^fsbench (\w+) (.*?)\r?$", re.M)


# --- back-ends and setups ----------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    name: str
    argv: Callable[[str, str], list[str]]   # (socket path, shared dir) -> command line


def pyvmm_virtiofsd_argv(sock: str, shared: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm.virtiofsd", "--socket-path", sock, "--shared-dir", shared]


def debian_virtiofsd_argv(sock: str, shared: str) -> list[str]:
    return [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}", *VIRTIOFSD_OPTS]


PYVMM_VIRTIOFSD = Backend("pyvmm-virtiofsd", pyvmm_virtiofsd_argv)
DEBIAN_VIRTIOFSD = Backend("Debian virtiofsd", debian_virtiofsd_argv)


@dataclass(frozen=True)
class Setup:
    key: str                                # the --setups name
    label: str                              # the table row
    backend: Backend
    vmm_argv: Callable[[str], list[str]]    # socket path -> the VMM's command line
    expected_status: int                    # the VMM's exit status when the guest script passed
    fatal_stderr: re.Pattern[bytes] | None = None
    note: str = ""


def guest_with(guest: GuestConfig, dax: bool) -> GuestConfig:
    """The benchmark's kernel command line words (and DAX's) added to a base config."""
    words = f"{GUEST_APPEND} {DAX_APPEND}" if dax else GUEST_APPEND
    return dataclasses.replace(guest, cmdline=f"{guest.cmdline} {words}", append=words)


def pyvmm_setup(key: str, label: str, guest: GuestConfig, backend: Backend, dax: bool) -> Setup:
    g = guest_with(guest, dax)
    fs_extra = f",dax=on,cache_size={DAX_WINDOW}" if dax else ""

    def argv(sock: str) -> list[str]:
        return [sys.executable, "-m", "pyvmm", "run", "--kernel", g.kernel, "--initramfs", g.initramfs,
                "--cpus", str(g.cpus), "--memory", g.memory,
                "--fs", f"tag={TAG},socket={sock}{fs_extra}", "--append", g.append]
    return Setup(key, label, backend, argv, expected_status=0)


def qemu_setup(key: str, guest: GuestConfig, qemu: str, cpu: str) -> Setup:
    tcg = key.endswith("-tcg")
    g = guest_with(guest, dax=False)    # vhost-user-fs-pci in QEMU has no DAX window
    base = qemu_argv(qemu, "tcg" if tcg else "kvm", "q35", "max" if tcg else cpu, g)

    def argv(sock: str) -> list[str]:
        # vhost-user needs guest RAM the back-end can map: a shared memfd backend.
        return base + ["-chardev", f"socket,id=char0,path={sock.replace(',', ',,')}",
                       "-device", f"vhost-user-fs-pci,chardev=char0,tag={TAG}",
                       "-object", f"memory-backend-memfd,id=mem,size={g.memory},share=on",
                       "-numa", "node,memdev=mem"]
    label = f"QEMU q35{' TCG' if tcg else ''} + {DEBIAN_VIRTIOFSD.name}"
    # isa-debug-exit: QEMU exits with (status << 1) | 1; the guest's status is 0.
    return Setup(key, label, DEBIAN_VIRTIOFSD, argv, expected_status=1, fatal_stderr=QEMU_FATAL_RE,
                 note=TCG_NOTE if tcg else "")


SETUP_MAKERS: dict[str, Callable[[GuestConfig, str, str], Setup]] = {
    "pyvmm-dax": lambda g, q, c: pyvmm_setup("pyvmm-dax", "pyvmm + pyvmm-virtiofsd (DAX)", g,
                                             PYVMM_VIRTIOFSD, dax=True),
    "pyvmm": lambda g, q, c: pyvmm_setup("pyvmm", "pyvmm + pyvmm-virtiofsd (no DAX)", g,
                                         PYVMM_VIRTIOFSD, dax=False),
    "pyvmm-debian": lambda g, q, c: pyvmm_setup("pyvmm-debian", "pyvmm + Debian virtiofsd", g,
                                                DEBIAN_VIRTIOFSD, dax=False),
    "qemu-q35": lambda g, q, c: qemu_setup("qemu-q35", g, q, c),
    "qemu-q35-tcg": lambda g, q, c: qemu_setup("qemu-q35-tcg", g, q, c),
}
DEFAULT_SETUPS = ("pyvmm-dax", "pyvmm", "pyvmm-debian", "qemu-q35", "qemu-q35-tcg")


# --- host side: files, helpers, back-end processes -----------------------------------------
def host_tool(*args: str, timeout: float = 300) -> str:
    """Run one of the guest's static helpers on the host; its stdout (raises on failure)."""
    return subprocess.run([str(HOST_BIN / args[0]), *args[1:]], check=True, capture_output=True,
                          text=True, timeout=timeout).stdout.strip()


def words(text: str) -> dict[str, str]:
    """``key=value key=value`` -> dict (the helpers' and fsbench.sh's output)."""
    return dict(w.split("=", 1) for w in text.split() if "=" in w)


def fill_share(shared: Path) -> None:
    for f in SHARE_FILES:
        host_tool("pattern", "write", str(shared / f.name), str(FILE_SIZE), str(f.seed))


def check_share(shared: Path) -> dict[str, str]:
    """What the guest left on the share: phase name -> "ok" or what is wrong."""
    checks = {}
    for phase, f in WRITTEN_BY.items():
        r = subprocess.run([str(HOST_BIN / "pattern"), "check", str(shared / f.name), str(FILE_SIZE),
                            str(f.expect_seed)], capture_output=True, text=True, timeout=300)
        checks[phase] = "ok" if r.returncode == 0 else f"pattern check failed: {r.stderr.strip()}"
    meta = shared / META_DIR
    left = sorted(os.listdir(meta)) if meta.is_dir() else None
    checks["meta"] = ("ok" if left == [] else "no meta directory" if left is None
                      else f"{len(left)} files left in {META_DIR}/")
    return checks


def start_backend(backend: Backend, sock: str, shared: str, log: Path) -> tuple[subprocess.Popen | None, str | None]:
    """Start a vhost-user back-end in its own process group; (proc, None) or (None, why not)."""
    argv = backend.argv(sock, shared)
    if not os.path.exists(argv[0]):
        return None, f"{argv[0]} is missing: `make setup` installs it"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + BACKEND_START_S
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_backend(proc)
            return None, f"{backend.name} did not start: " + log.read_text(errors="replace")[-500:]
        time.sleep(0.05)
    return proc, None


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group of ``proc`` (started with start_new_session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_backend(proc: subprocess.Popen) -> int | None:
    """Give a back-end whose VMM is gone time to exit by itself (both kinds do), else
    SIGTERM it; then SIGKILL whatever is left of its process group.  Its own exit
    status, or None if we had to end it."""
    try:
        status = proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        status = None
        signal_group(proc, signal.SIGTERM)
    signal_group(proc, signal.SIGKILL)   # stragglers in the group, if any
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    return status


# --- one boot ---------------------------------------------------------------------------
@dataclass
class Phase:
    """One fsbench.sh line: a helper's key=value words plus Cached: around it."""
    name: str
    words: dict[str, str] = field(default_factory=dict)
    cache_growth_kb: int | None = None
    check: str | None = None             # "ok", or what is wrong (failed, hash, content)

    @property
    def ok(self) -> bool:
        return self.check == "ok"

    def value(self, key: str) -> float | None:
        """A number from the words, if the phase ran and its result checked out."""
        return float(self.words[key]) if self.ok and key in self.words else None


@dataclass
class RunResult:
    setup: str
    label: str
    vmm_argv: list[str]
    backend_argv: list[str]
    mount: str | None = None
    phases: dict[str, Phase] = field(default_factory=dict)
    ready_s: float | None = None
    exit_s: float | None = None
    status: int | None = None
    ended_by: str | None = None           # "timeout" / "fatal": stopped by us; None: exited
    backend_status: int | None = None     # None: it did not exit by itself
    fatal_s: float | None = None
    load_1min: float | None = None
    failure: str | None = None
    console_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    backend_log_tail: list[str] = field(default_factory=list)


def run_setup(setup: Setup, timeout: float, host_hash: str, kernel: str) -> RunResult:
    """One boot on a fresh share with its own back-end; neither outlives this call."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-fs-") as tmp:
        shared, sock, log = Path(tmp) / "share", os.path.join(tmp, "vfs.sock"), Path(tmp) / "backend.log"
        shared.mkdir()
        fill_share(shared)
        r = RunResult(setup.key, setup.label, setup.vmm_argv(sock), setup.backend.argv(sock, str(shared)),
                      load_1min=os.getloadavg()[0])
        backend, why = start_backend(setup.backend, sock, str(shared), log)
        if backend is None:
            r.failure = why
            return r
        try:
            watched = run_watched(r.vmm_argv, setup, timeout,
                                  {"fatal": setup.fatal_stderr} if setup.fatal_stderr else {})
        except OSError as e:
            r.failure = f"cannot start {r.vmm_argv[0]}: {e.strerror}"
            return r
        finally:
            r.backend_status = stop_backend(backend)
        r.backend_log_tail = log.read_text(errors="replace").splitlines()[-10:]
        record_watched(r, watched)
        parse_console(bytes(watched.out.data), r)
        check_phases(r, host_hash, check_share(shared))   # what was reported, also after a timeout
    r.failure = failure_reason(setup, r, watched.ended_by, bytes(watched.err.data), timeout, kernel)
    return r


def record_watched(r: RunResult, w: Watched) -> None:
    """Times, status and stream tails from bench.boot's run_watched()."""
    r.status, r.ended_by = w.proc.returncode, w.ended_by
    r.console_tail, r.stderr_tail = w.out.tail(), w.err.tail()
    if (t := w.out.time_of("ready")) is not None:
        r.ready_s = t - w.t0
    if w.ended_by is None and w.vmm.exited_at is not None:
        r.exit_s = w.vmm.exited_at - w.t0
    if (t := w.err.time_of("fatal")) is not None:
        r.fatal_s = t - w.t0


def phase_from(name: str, text: str) -> Phase:
    """A Phase from a helper's ``key=value`` words (or fsbench.sh's ``failed status=N``)."""
    w = words(text)
    phase = Phase(name, words=w, check=f"the guest helper {text}" if text.startswith("failed") else None)
    if "cached_before_kb" in w and "cached_after_kb" in w:
        phase.cache_growth_kb = int(w["cached_after_kb"]) - int(w["cached_before_kb"])
    return phase


def parse_console(console: bytes, r: RunResult) -> None:
    for m in FSBENCH_RE.finditer(console):
        name, rest = m.group(1).decode(), m.group(2).decode(errors="replace")
        if name == "mount":
            r.mount = rest
        else:
            r.phases[name] = phase_from(name, rest)


def check_phases(r: RunResult, host_hash: str, share_checks: dict[str, str]) -> None:
    """Reads against the host file's hash, writes and meta against what the share holds."""
    for name, phase in r.phases.items():
        if phase.check is not None:          # the guest helper failed
            continue
        if name in READ_PHASES:
            got = (phase.words.get("hash"), phase.words.get("bytes"))
            phase.check = ("ok" if got == (host_hash, str(FILE_SIZE))
                           else f"hash {got[0]} bytes {got[1]}, host {host_hash} bytes {FILE_SIZE}")
        else:
            phase.check = share_checks.get(name, "not checked")


def failure_reason(setup: Setup, r: RunResult, ended_by: str | None, stderr: bytes, timeout: float,
                   kernel: str) -> str | None:
    if why := boot_failure(r, ended_by, stderr, timeout, kernel):
        return why
    if missing := [p for p in PHASES if p not in r.phases]:
        return f"no fsbench result for {', '.join(missing)} (exit status {r.status})"
    if bad := [f"{n}: {p.check}" for n, p in r.phases.items() if not p.ok]:
        return "; ".join(bad)
    if r.status != setup.expected_status:
        return f"exit status {r.status}, expected {setup.expected_status}"
    return None


# --- the host reference -----------------------------------------------------------------
def host_reference(dirpath: Path) -> dict[str, Phase]:
    """The host's page cache, through the guest's own binaries: the limit for each phase."""
    fill_share(dirpath)
    (dirpath / META_DIR).mkdir()
    read_file = str(dirpath / READ_FILE.name)

    def mmap_read() -> str:
        hash_, nbytes, mbps, _, again, _ = host_tool("mmapread", read_file, "2").split()
        return f"hash={hash_} bytes={nbytes} mbps={mbps} again_mbps={again}"

    def write_args(f: ShareFile) -> list[str]:
        return [str(dirpath / f.name), str(FILE_SIZE), str(f.expect_seed)]
    runs: dict[str, Callable[[], str]] = {
        "read": lambda: host_tool("rwbench", "read", read_file),
        "mmap_read": mmap_read,
        "write": lambda: host_tool("rwbench", "write", *write_args(WRITE_FILE)),
        "mmap_write": lambda: host_tool("mmapwrite", *write_args(MMAP_WRITE_FILE)),
        "meta": lambda: host_tool("metabench", str(dirpath / META_DIR), str(META_FILES)),
    }
    runs["read"]()                                  # the page cache is warm from here on
    phases = {name: best_of(name, run) for name, run in runs.items()}
    checks = check_share(dirpath)
    same = phases["mmap_read"].words["hash"] == phases["read"].words["hash"]
    checks["read"] = checks["mmap_read"] = "ok" if same else "read() and mmap hashes differ"
    for name, phase in phases.items():
        phase.check = checks[name]
    # one page cache on the host: its warm reads are these same reads
    phases["read_warm"], phases["mmap_read_warm"] = phases["read"], phases["mmap_read"]
    return phases


def best_of(name: str, run: Callable[[], str]) -> Phase:
    """HOST_REPEATS runs of a host measurement; the fastest one."""
    phases = [phase_from(name, run()) for _ in range(HOST_REPEATS)]
    key = "ops_per_s" if name == "meta" else "mbps"
    return max(phases, key=lambda p: float(p.words[key]))


# --- report -------------------------------------------------------------------------------
LABEL_W = 34
CELL_W = 11


def cell(phase: Phase | None, key: str) -> float | None:
    return phase.value(key) if phase is not None else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def grid(title: str, headings: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = f"{title:<{LABEL_W}}" + "".join(f"{h:>{CELL_W + 1}}" for h in headings)
    lines = [head, "-" * len(head)]
    lines += [f"{label:<{LABEL_W}}" + "".join(f"{c:>{CELL_W + 1}}" for c in cells) for label, cells in rows]
    return "\n".join(lines)


def report(results: list[RunResult], host: dict[str, Phase], notes: dict[str, str]) -> str:
    headings = [c.heading for c in COLUMNS]
    rates = [("host (page cache)", [fmt(cell(host.get(c.phase), c.key), ".1f") for c in COLUMNS])]
    ratios, growth = [], []
    for r in results:
        guest = [cell(r.phases.get(c.phase), c.key) for c in COLUMNS]
        limit = [cell(host.get(c.phase), c.key) for c in COLUMNS]
        rates.append((r.label, [fmt(g, ".1f") for g in guest]))
        ratios.append((r.label, [fmt(g / h if g is not None and h else None, ".2g") for g, h in zip(guest, limit)]))
        growth.append((r.label, [fmt(r.phases[p].cache_growth_kb if p in r.phases else None, "d")
                                 for p in PHASES]))
    parts = [grid("MB/s (meta: ops/s)", headings, rates), "",
             grid("guest / host", headings, ratios), "",
             grid("guest page-cache growth, kB", list(PHASE_HEADINGS.values()), growth)]
    for r in results:
        if notes.get(r.label):
            parts.append(f"\n{r.label}: {notes[r.label]}")
        if r.failure:
            parts.append(f"\n{r.label}: FAILED: {r.failure}")
            parts += [f"  | {line}" for line in r.console_tail[-5:]]
    parts += ["", *(f"{r.label}: mount {r.mount}" for r in results if r.mount)]
    return "\n".join(parts)


def progress_line(r: RunResult) -> str:
    cells = [f"{c.heading} {fmt(cell(r.phases.get(c.phase), c.key), '.1f')}" for c in COLUMNS]
    end = f"exit {r.exit_s:.0f} s, status {r.status}" if r.exit_s is not None else f"stopped ({r.ended_by})"
    line = f"{', '.join(cells)}; {end} (load {r.load_1min:.1f})"
    return line + (f"\n    FAILED: {r.failure}" if r.failure else "")


# --- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fs", description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                   help=f"comma-separated, from {', '.join(SETUP_MAKERS)} (default {','.join(DEFAULT_SETUPS)})")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per boot before it is killed (default 900; a non-DAX boot takes ~6 min on PVM)")
    add_guest_args(p, "fs")
    args = p.parse_args(argv)
    args.setup_names = setup_names(p, args.setups, SETUP_MAKERS)
    if not args.setup_names:
        p.error("--setups names no setup")
    try:
        parse_size(args.memory)
    except UsageError as e:
        p.error(f"--memory: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    flavour = detect_flavour()
    guest_dir = default_guest_dir()
    guest = GuestConfig(kernel=args.kernel or str(guest_dir / "vmlinux"),
                        initramfs=args.initramfs or str(guest_dir / "initramfs.cpio"),
                        memory=args.memory, cpus=args.cpus, cmdline=default_cmdline(flavour), append="")
    helpers = [HOST_BIN / n for n in ("pattern", "rwbench", "mmapread", "mmapwrite", "metabench")]
    if missing := [str(p) for p in (Path(guest.kernel), Path(guest.initramfs), *helpers) if not p.is_file()]:
        sys.stderr.write(f"bench.fs: {', '.join(missing)} missing: run `make guest` first\n")
        return 2
    setups = [SETUP_MAKERS[n](guest, args.qemu, args.qemu_cpu) for n in args.setup_names]
    facts = host_facts(flavour, args.qemu)
    print(flavour.summary)
    print(f"kernel {guest.kernel}, initramfs {guest.initramfs}, memory {guest.memory}, cpus {guest.cpus}")
    print(f"kernel command line: {guest.cmdline} {GUEST_APPEND} [{DAX_APPEND}]")

    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-fs-host-") as tmp:
        host = host_reference(Path(tmp))
    host_hash = host["read"].words["hash"]
    print(f"file: {FILE_SIZE >> 20} MiB (`pattern write F {FILE_SIZE} {READ_FILE.seed}`), hash {host_hash}")
    load_before = os.getloadavg()
    results = []
    for setup in setups:
        print(f"[{setup.label}] ...", end=" ", flush=True)
        results.append(run_setup(setup, args.timeout, host_hash, guest.kernel))
        print(progress_line(results[-1]), flush=True)
    load_after = os.getloadavg()
    elapsed = time.monotonic() - started

    print()
    print(report(results, host, {s.label: s.note for s in setups}))
    print(f"\nMB = 10^6 bytes; {FILE_SIZE >> 20} MiB files; one boot per setup; each phase timed by a "
          "guest helper (guest/helpers/); meta = create+stat+unlink of "
          f"{META_FILES} files, 3 ops per file")
    print(f"{flavour.summary}\nhost load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for r in results:
        print(f"{r.label}:\n  {shlex.join(r.backend_argv)}\n  {shlex.join(r.vmm_argv)}")
    print(f"whole run: {elapsed:.0f} s")
    out = args.json or RESULTS_DIR / f"fs-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    write_json(out, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": facts,
        "guest": asdict(guest),
        "file_bytes": FILE_SIZE,
        "meta_files": META_FILES,
        "dax_window": DAX_WINDOW,
        "host_reference": {k: asdict(v) for k, v in host.items()},
        "timeout_s": args.timeout,
        "elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "runs": [asdict(r) for r in results],
    })
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
