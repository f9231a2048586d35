"""Soak: many boots of the default guest with a DAX share, and back-ends killed mid-run.

Every run is what a CI user types, ``pyvmm run --share DIR,tag=soak,dax=on
--exec CMD`` (``pyvmm.testing.VmmProcess``), with TMPDIR in a private directory:

* **boot** (``--boots``, default 100): the host writes a file of random bytes on
  the share; the guest maps it through the DAX window and writes the mapping
  into a new file (``daxtool copy``, a FUSE WRITE whose buffer is the window),
  prints a marker and idles ``HOLD_S`` seconds; the host compares the two files
  and expects the command's status, BOOT_STATUS;
* **kill** (``--kills``, default 20): the same copy, then the guest copies the
  file again and again; once it has said so, the host SIGKILLs the share's
  back-end (pyvmm-virtiofsd, found in the VMM's session) after a random delay,
  so requests are in flight.  The guest's loop then fails, a second touch of
  the share must fail, a command that does not touch it must work, and the
  guest ends with KILL_STATUS; the VMM must have logged that its back-end went
  away and exit with that status by itself.

While the guest idles the harness samples the VMM's /proc/PID/status (RssAnon,
RssFile, RssShmem, Threads) and its open fds.  After each run, nothing may be
left: no process of the VMM's session (its back-end included), no child of this
process, no file or socket in the private TMPDIR, no fd or thread of this
process beyond what it had before the first run; and the VMM's stderr holds no
traceback.  Across runs the samples must not grow: the median of the last
quarter of the runs of a kind, less that of the first quarter, stays within a
tolerance (``--rss-tolerance``, ``FD_TOLERANCE``).

Results: a one-screen summary, and JSON (``--json``, default
bench/results/soak-<date>.json); exit status 1 on any failure or leak.

    python -m bench.soak [--boots 100] [--kills 20] [--timeout 300] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.boot import RESULTS_DIR, git_commit, proc_kib_fields, write_json
from pyvmm.cli import default_guest_dir
from pyvmm.platform import detect_flavour
from pyvmm.testing import GuestError, VmmProcess
from pyvmm.testing.process import process_table

TAG = "soak"
FILE_BYTES = (1 << 20) + 12345        # a partial last page and a partial 2 MiB DAX chunk
HOLD_S = 3                            # the guest idles this long after its marker: the sample
BOOT_STATUS = 3                       # the guest command's own status, passed through
KILL_STATUS = 7
KILL_DELAY_MAX_S = 1.0                # the back-end dies this long (random) after the loop starts
LOOP_MAX = 600                        # iterations of the guest's copy loop before it gives up
EXIT_GRACE_S = 2.0                    # for the session to empty after the VMM exited
FD_TOLERANCE = 2                      # growth allowed in the VMM's fd and thread counts
RSS_TOLERANCE_KIB = 8 << 10
BACKEND = "pyvmm.virtiofsd"
BACKEND_GONE = "went away"            # pyvmm's log line when a back-end dies
WARNING_RE = re.compile(r"pyvmm: (WARNING|ERROR|CRITICAL): ")
SAMPLED = ("RssAnon", "RssFile", "RssShmem", "Threads")

MNT = f"/mnt/{TAG}"
# Status 11-14: the guest step that failed.
BOOT_COMMAND = (f"daxtool copy {MNT}/in.bin {MNT}/out.bin || exit 11; "
                f"echo soak: copied; sleep {HOLD_S}; exit {BOOT_STATUS}")
KILL_COMMAND = (f"daxtool copy {MNT}/in.bin {MNT}/out.bin || exit 11; echo soak: looping; i=0; "
                f"while daxtool copy {MNT}/in.bin /tmp/probe >/dev/null 2>&1; do "
                f"i=$((i+1)); [ $i -lt {LOOP_MAX} ] || exit 12; done; "
                f"echo soak: share-gone; "
                f"if cat {MNT}/in.bin >/dev/null 2>&1; then exit 13; fi; "
                f"echo alive > /tmp/alive && [ \"$(cat /tmp/alive)\" = alive ] || exit 14; "
                f"echo soak: alive; sleep {HOLD_S}; exit {KILL_STATUS}")


# --- what /proc says ------------------------------------------------------------------------
def proc_status(pid: int | str) -> dict[str, int]:
    """The SAMPLED fields of /proc/PID/status (memory in KiB); {} when it is gone."""
    try:
        return proc_kib_fields(f"/proc/{pid}/status", SAMPLED)
    except OSError:
        return {}


def fd_count(pid: int | str = "self") -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def children_of(ppid: int) -> list[int]:
    """Live (or zombie) processes whose parent is ``ppid``."""
    return [pid for pid, (parent, _) in process_table().items() if parent == ppid]


def sample(vmm: VmmProcess) -> dict[str, int]:
    """The VMM's memory, threads and fds while its guest is up."""
    values = proc_status(vmm.proc.pid)
    if (fds := fd_count(vmm.proc.pid)) is not None:
        values["fds"] = fds
    return values


@dataclass
class Baseline:
    """This process before the first run: what each run must leave as it was."""
    fds: int
    threads: int

    @classmethod
    def now(cls) -> "Baseline":
        return cls(fd_count() or 0, threading.active_count())

    def leaks(self, tmpdir: Path) -> list[str]:
        """What is left over now: children, files in ``tmpdir``, fds, threads (each
        removed or forgotten once reported, so the next run starts clean)."""
        found = []
        deadline = time.monotonic() + EXIT_GRACE_S   # reader threads end as the pipes close
        while threading.active_count() > self.threads and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in children_of(os.getpid()):
            found.append(f"child process {pid} of the harness")
        for entry in sorted(os.listdir(tmpdir)):
            found.append(f"left in TMPDIR: {entry}")
            path = tmpdir / entry
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if (fds := fd_count() or 0) > self.fds:
            found.append(f"harness fds {self.fds} -> {fds}")
            self.fds = fds
        if (threads := threading.active_count()) > self.threads:
            found.append(f"harness threads {self.threads} -> {threads}")
            self.threads = threads
        return found


def outlived(vmm: VmmProcess, grace: float = EXIT_GRACE_S) -> list[str]:
    """Processes of the exited VMM's session still there after ``grace`` (then killed)."""
    deadline = time.monotonic() + grace
    while (left := vmm.started_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        vmm.signal_group(signal.SIGKILL)
    return [f"outlived the VMM: pid {pid} {cmd or '(zombie)'}" for pid, cmd in left.items()]


# --- statistics -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    first: int
    median: float
    last: int
    min: int
    max: int
    drift: int        # max - min
    growth: float     # median of the last quarter - median of the first quarter


def series(values: list[int]) -> Series | None:
    if not values:
        return None
    q = max(1, len(values) // 4)
    return Series(values[0], statistics.median(values), values[-1], min(values), max(values),
                  max(values) - min(values),
                  statistics.median(values[-q:]) - statistics.median(values[:q]))


def tolerance(key: str, rss_kib: int) -> int:
    return rss_kib if key.startswith("Rss") else FD_TOLERANCE


def growth_problems(kind: str, samples: list[dict[str, int]], rss_kib: int) -> list[str]:
    """A sampled value that grows across the runs of one kind beyond its tolerance."""
    out = []
    for key in (*SAMPLED, "fds"):
        s = series([x[key] for x in samples if key in x])
        if s is not None and s.growth > tolerance(key, rss_kib):
            out.append(f"{kind}: VMM {key} grew by {s.growth:g} across runs "
                       f"(first {s.first}, last {s.last}; tolerance {tolerance(key, rss_kib)})")
    return out


def warnings(stderr: str, keep: int = 10) -> list[str]:
    """pyvmm's WARNING and ERROR log lines, each once, at most ``keep``."""
    lines = [line for line in stderr.splitlines() if WARNING_RE.match(line)]
    return list(dict.fromkeys(lines))[:keep]


# --- one run --------------------------------------------------------------------------------
@dataclass
class Run:
    kind: str                    # "boot" or "kill"
    index: int
    seconds: float = 0.0
    status: int | None = None
    kill_delay_s: float | None = None
    sample: dict[str, int] = field(default_factory=dict)
    failure: str | None = None
    leaks: list[str] = field(default_factory=list)
    vmm_warnings: list[str] = field(default_factory=list)   # its WARNING/ERROR log lines

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.leaks


def serving_backend(started: dict[int, str], table: dict[int, tuple[int, int]]) -> int | None:
    """The back-end process that serves the share: the one with no back-end child.
    In a sandbox pyvmm-virtiofsd forks into a new PID namespace, and the child
    serves while the parent waits for it.  None unless exactly one such process."""
    backends = {pid for pid, cmd in started.items() if BACKEND in cmd}
    leaves = [pid for pid in backends if not any(table.get(c, (0, 0))[0] == pid for c in backends)]
    return leaves[0] if len(leaves) == 1 else None


class Soak:
    """The runs, one at a time, in a work directory of their own."""

    def __init__(self, work: Path, timeout: float, seed: int) -> None:
        self.work = work
        self.tmpdir = work / "tmp"          # the VMM's TMPDIR: its sockets, its back-end's
        self.tmpdir.mkdir()
        self.timeout = timeout
        self.random = random.Random(seed)
        self.baseline = Baseline.now()

    def run(self, kind: str, index: int) -> Run:
        run = Run(kind, index)
        share = self.work / f"{kind}-{index}"
        share.mkdir()
        data = self.random.randbytes(FILE_BYTES)
        (share / "in.bin").write_bytes(data)
        t0 = time.monotonic()
        vmm = VmmProcess.pyvmm_run("--share", f"{share},tag={TAG},dax=on", "--exec",
                                   BOOT_COMMAND if kind == "boot" else KILL_COMMAND,
                                   env={"TMPDIR": str(self.tmpdir)}, stdin=False)
        try:
            run.status = self.guest(kind, vmm, run)
            run.vmm_warnings = warnings(vmm.stderr)
            run.failure = self.verdict(kind, vmm, run, share, data)
            run.leaks = outlived(vmm)
        except GuestError as e:
            run.failure = str(e)
        finally:
            vmm.stop()
            run.seconds = time.monotonic() - t0
            shutil.rmtree(share, ignore_errors=True)
        run.leaks += self.baseline.leaks(self.tmpdir)
        return run

    def guest(self, kind: str, vmm: VmmProcess, run: Run) -> int:
        """Drive one guest to its end; its exit status."""
        if kind == "kill":
            vmm.wait_for("soak: looping", self.timeout)
            server = serving_backend(vmm.started_processes(), process_table())
            if server is None:
                vmm.fail(f"no {BACKEND} serving in the VMM's session")
            run.kill_delay_s = round(self.random.uniform(0, KILL_DELAY_MAX_S), 3)
            time.sleep(run.kill_delay_s)
            try:
                os.kill(server, signal.SIGKILL)
            except ProcessLookupError:
                vmm.fail(f"{BACKEND} (pid {server}) ended before it was killed")
            vmm.wait_for("soak: alive", self.timeout)
        else:
            vmm.wait_for("soak: copied", self.timeout)
        run.sample = sample(vmm)
        return vmm.wait_exit(self.timeout)

    @staticmethod
    def verdict(kind: str, vmm: VmmProcess, run: Run, share: Path, data: bytes) -> str | None:
        expected = BOOT_STATUS if kind == "boot" else KILL_STATUS
        out = share / "out.bin"
        if run.status != expected:
            return vmm.report(f"exit status {run.status}, expected {expected}")
        if not out.exists() or out.read_bytes() != data:
            return vmm.report("the guest's copy through the DAX window differs from the host's file")
        if "Traceback" in vmm.stderr:
            return vmm.report("a traceback on the VMM's stderr")
        if kind == "kill" and BACKEND_GONE not in vmm.stderr:
            return vmm.report("the VMM did not log its back-end's death")
        if not run.sample or "RssAnon" not in run.sample:
            return vmm.report("no sample of the VMM while the guest was up")
        return None


# --- report ---------------------------------------------------------------------------------
def summary(runs: list[Run], rss_kib: int) -> dict:
    out: dict = {"runs": len(runs), "failures": [], "leaks": [], "growth": [], "series": {}}
    for kind in ("boot", "kill"):
        mine = [r for r in runs if r.kind == kind]
        if not mine:
            continue
        samples = [r.sample for r in mine if r.sample]
        values = {key: [s[key] for s in samples if key in s] for key in (*SAMPLED, "fds")}
        values["seconds"] = [round(r.seconds) for r in mine]
        out["series"][kind] = {key: asdict(v) for key, v in
                               ((key, series(vs)) for key, vs in values.items()) if v is not None}
        out["growth"] += growth_problems(kind, samples, rss_kib)
    seen = collections.Counter(f"{r.kind}: " + re.sub(r"/\S+", "PATH", line)
                               for r in runs for line in r.vmm_warnings)
    out["vmm_warnings"] = dict(seen.most_common())
    out["failures"] = [f"{r.kind} {r.index}: {r.failure}" for r in runs if r.failure]
    out["leaks"] = [f"{r.kind} {r.index}: {leak}" for r in runs for leak in r.leaks]
    out["ok"] = not (out["failures"] or out["leaks"] or out["growth"])
    return out


def summary_text(s: dict) -> str:
    lines = []
    for kind, per_key in s["series"].items():
        lines.append(f"{kind} runs: first / median / last, min..max, drift (max-min), growth "
                     "(last quarter - first quarter, medians)")
        for key, v in per_key.items():
            unit = " KiB" if key.startswith("Rss") else (" s" if key == "seconds" else "")
            lines.append(f"  {key:<9} {v['first']} / {v['median']:g} / {v['last']}{unit}, "
                         f"{v['min']}..{v['max']}, drift {v['drift']}, growth {v['growth']:g}")
    for line, count in s["vmm_warnings"].items():
        lines.append(f"VMM log, in {count} runs: {line[:160]}")
    lines.append(f"{s['runs']} runs: {len(s['failures'])} failed, {len(s['leaks'])} leaks, "
                 f"{len(s['growth'])} growing samples: {'OK' if s['ok'] else 'FAILED'}")
    for problem in s["failures"] + s["leaks"] + s["growth"]:
        lines.append("  " + problem.splitlines()[0])
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--boots", type=int, default=100, help="boots with a DAX share (default 100)")
    p.add_argument("--kills", type=int, default=20,
                   help="boots whose back-end is killed mid-run (default 20)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds for each step of a run: boot to marker, marker to exit "
                        "(default 600: a loaded host slows boots)")
    p.add_argument("--seed", type=int, default=None, help="random seed (file contents, kill delays)")
    p.add_argument("--rss-tolerance", type=int, default=RSS_TOLERANCE_KIB,
                   help=f"KiB an Rss* sample may grow across runs (default {RSS_TOLERANCE_KIB})")
    p.add_argument("--json", type=Path, help="default bench/results/soak-<date>.json")
    return p.parse_args(argv)


def progress(run: Run, total: int, done: int) -> str:
    s = run.sample
    mem = (f"RssAnon {s.get('RssAnon', 0) >> 10} MiB, RssShmem {s.get('RssShmem', 0) >> 10} MiB, "
           f"fds {s.get('fds')}") if s else "no sample"
    verdict = "ok" if run.ok else ("FAILED: " + (run.failure or "; ".join(run.leaks)).splitlines()[0])
    delay = f", kill after {run.kill_delay_s} s" if run.kill_delay_s is not None else ""
    return (f"[{done}/{total}] {run.kind} {run.index}: {run.seconds:.1f} s, status {run.status}"
            f"{delay}, {mem}: {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    flavour = detect_flavour()
    guest_dir = default_guest_dir()
    if missing := [str(p) for p in (guest_dir / "vmlinux", guest_dir / "initramfs.cpio") if not p.is_file()]:
        sys.stderr.write(f"bench.soak: {', '.join(missing)} missing: run `make guest` first\n")
        return 2
    print(f"{flavour.summary}\nguest {guest_dir}; {args.boots} boots + {args.kills} back-end kills, "
          f"seed {seed}")
    plan = [("boot", i) for i in range(args.boots)] + [("kill", i) for i in range(args.kills)]
    started, commit = time.monotonic(), git_commit()
    runs: list[Run] = []
    work = Path(tempfile.mkdtemp(prefix="pyvmm-soak-", dir="/tmp"))   # short: socket paths
    try:
        soak = Soak(work, args.timeout, seed)
        for kind, index in plan:
            runs.append(soak.run(kind, index))
            print(progress(runs[-1], len(plan), len(runs)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = summary(runs, args.rss_tolerance)
    elapsed = time.monotonic() - started
    print()
    print(summary_text(result))
    print(f"whole run: {elapsed:.0f} s")
    path = args.json or RESULTS_DIR / f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    write_json(path, {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        # each run starts a new VMM: a tree updated meanwhile is what the later runs ran
        "kvm_flavour": flavour.summary, "pyvmm_commit": commit, "pyvmm_commit_at_end": git_commit(),
        "seed": seed,
        "guest_dir": str(guest_dir), "boot_command": BOOT_COMMAND, "kill_command": KILL_COMMAND,
        "elapsed_s": elapsed, "summary": result, "runs": [asdict(r) for r in runs],
    })
    print(f"results: {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
