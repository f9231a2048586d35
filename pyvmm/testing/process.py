"""A VMM process watched from the outside: its console, its stderr, its exit.

``VmmProcess`` runs one VMM command (pyvmm, or QEMU for a benchmark) in a
session of its own, reads its stdout (the serial console) and stderr in
threads, remembers when each watched pattern first appeared, and never
outlives ``stop()``.  Every wait has a deadline; a failed wait raises
``GuestTimeout`` (or ``GuestPanic``/``GuestDied`` when the VMM exited) with
the console's last lines and, for pyvmm, every vCPU's registers (SIGUSR2 makes
pyvmm log them without stopping the guest).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, NoReturn, Sequence

from ..status import ExitStatus

TAIL_LINES = 40
STOP_GRACE = 5.0
DUMP_GRACE = 2.0          # seconds for pyvmm to log its registers after SIGUSR2
ANSI_RE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


class GuestError(Exception):
    """A guest that did not do what was asked; the message has the evidence."""

    def __init__(self, message: str, console: str = "", stderr: str = "",
                 status: int | None = None) -> None:
        super().__init__(message)
        self.console = console
        self.stderr = stderr
        self.status = status


class GuestTimeout(GuestError, TimeoutError):
    """A boot, a command or an expected output took longer than allowed."""


class GuestPanic(GuestError):
    """The guest kernel panicked (pyvmm exit status 100)."""


class GuestDied(GuestError):
    """The VMM ended before the guest did what was asked."""


def parent_and_session(stat: str) -> tuple[int, int]:
    """(parent pid, session id) from a /proc/PID/stat line (proc(5): the command
    name in parentheses may itself hold spaces and parentheses)."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3])


def process_table() -> dict[int, tuple[int, int]]:
    """Every live (or zombie) process: pid -> (parent pid, session id), from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    table[int(name)] = parent_and_session(f.read())
            except (OSError, ValueError):   # it ended meanwhile
                continue
    return table


def command_line(pid: int) -> str:
    """/proc/PID/cmdline with spaces for NULs; "" for a zombie or a process gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_processes(sid: int) -> dict[int, str]:
    """The processes of session ``sid``: pid -> command line."""
    return {pid: command_line(pid) for pid, (_, s) in process_table().items() if s == sid}


def clean_lines(data: bytes) -> list[str]:
    """Console bytes as printable non-empty lines (escape sequences and CRs dropped)."""
    text = ANSI_RE.sub("", data.decode(errors="replace")).replace("\r", "")
    return [line for line in text.splitlines() if line.strip()]


class StreamLog:
    """All bytes of one pipe, read by a thread, with the first match time of each pattern."""

    OVERLAP = 512   # a marker split across two reads is still found

    def __init__(self, stream: IO[bytes], cond: threading.Condition,
                 patterns: dict[str, re.Pattern[bytes]] | None = None) -> None:
        self.data = bytearray()
        self.patterns = dict(patterns or {})
        self.hits: dict[str, tuple[float, re.Match[bytes]]] = {}
        self.closed = False
        self._cond = cond
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        while True:
            try:
                chunk = stream.read1(65536)
            except (OSError, ValueError):
                chunk = b""
            with self._cond:
                if not chunk:
                    self.closed = True
                    self._cond.notify_all()
                    return
                start = max(0, len(self.data) - self.OVERLAP)
                self.data += chunk
                now = time.monotonic()
                for name, pattern in self.patterns.items():
                    if name not in self.hits and (m := pattern.search(self.data, start)):
                        self.hits[name] = (now, m)
                self._cond.notify_all()

    def time_of(self, name: str) -> float | None:
        hit = self.hits.get(name)
        return hit[0] if hit else None

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return clean_lines(bytes(self.data))[-lines:]


class VmmProcess:
    """One VMM process: ``console`` is its stdout, ``errors`` its stderr.

    ``argv`` runs as given; ``VmmProcess.pyvmm_run(*args)`` runs ``python -m pyvmm
    run ARGS`` with this interpreter.  ``watch``/``watch_stderr`` name patterns
    whose first appearance time is kept (benchmarks use them).
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, stdin: bool = True,
                 watch: dict[str, re.Pattern[bytes]] | None = None,
                 watch_stderr: dict[str, re.Pattern[bytes]] | None = None,
                 is_pyvmm: bool = False) -> None:
        self.argv = list(argv)
        self.is_pyvmm = is_pyvmm
        self._cond = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.console = StreamLog(self.proc.stdout, self._cond, watch)
        self.errors = StreamLog(self.proc.stderr, self._cond, watch_stderr)
        self.exited_at: float | None = None
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    @classmethod
    def pyvmm_run(cls, *args: str, log_level: str = "info", python: str | None = None,
                  command: str = "run", **kwargs) -> "VmmProcess":
        argv = [python or sys.executable, "-m", "pyvmm", "--log-level", log_level, command, *args]
        return cls(argv, is_pyvmm=True, **kwargs)

    def _wait(self) -> None:
        self.proc.wait()
        with self._cond:
            self.exited_at = time.monotonic()
            self._cond.notify_all()

    # --- what it printed ---------------------------------------------------------------
    @property
    def text(self) -> str:
        """The console so far."""
        return self.console.text

    @property
    def stderr(self) -> str:
        return self.errors.text

    @property
    def running(self) -> bool:
        return self.exited_at is None

    def wait_until(self, done, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``done()`` is true, checked whenever output
        arrives or the process ends; returns ``done()``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            return bool(done())

    def wait_for_regex(self, pattern: str | bytes, timeout: float) -> re.Match[bytes]:
        """The first console match of ``pattern``; GuestTimeout/GuestDied when it never comes."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        found: list[re.Match[bytes]] = []

        def done() -> bool:
            if not found and (m := regex.search(self.console.data)):
                found.append(m)
            return bool(found) or (self.console.closed and self.exited_at is not None)

        self.wait_until(done, timeout)
        if found:
            return found[0]
        self.fail(f"the console never matched {regex.pattern.decode(errors='replace')!r} "
                  f"within {timeout:.0f} s")

    def wait_for(self, needle: str, timeout: float) -> float:
        """Wait until the console shows ``needle``; seconds since the process started."""
        self.wait_for_regex(re.escape(needle), timeout)
        return time.monotonic() - self.t0

    def send(self, text: str | bytes) -> None:
        """Bytes for the serial console's input."""
        data = text.encode() if isinstance(text, str) else text
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, AttributeError):
            self.fail("cannot send to the console: the VMM is gone")

    def wait_exit(self, timeout: float) -> int:
        """The exit status; GuestTimeout (with registers) when it does not exit in time."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the VMM did not exit within {timeout:.0f} s")
        self.console.thread.join(STOP_GRACE)
        self.errors.thread.join(STOP_GRACE)
        return status

    def started_processes(self) -> dict[int, str]:
        """What the VMM started that still runs (pyvmm's share back-ends, say): the
        other processes of its session, pid -> command line.  After the VMM exited,
        whatever is listed here outlived it."""
        return {pid: cmd for pid, cmd in session_processes(self.proc.pid).items()
                if pid != self.proc.pid}

    # --- ending it ------------------------------------------------------------------------
    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = STOP_GRACE) -> int:
        """End the VMM and everything it started (SIGTERM, then SIGKILL to its group)."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)   # stragglers in the group (a back-end) go too
        self.proc.wait()
        for log, stream in ((self.console, self.proc.stdout), (self.errors, self.proc.stderr)):
            log.thread.join(grace)
            if not log.thread.is_alive():   # (a reader still blocked in read() holds its lock)
                stream.close()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return self.proc.returncode

    kill = stop

    def report(self, why: str) -> str:
        """``why`` with the command, the console tail and stderr (registers)."""
        console = "\n".join(self.console.tail())
        stderr = "\n".join(self.errors.tail(80))
        return (f"{why}\n--- command: {' '.join(self.argv)}\n--- console (last lines):\n{console}"
                f"\n--- VMM stderr (last lines, registers):\n{stderr}")

    def fail(self, why: str) -> NoReturn:
        """Raise the right GuestError: registers first if the VMM still runs, then stop it."""
        status = self.proc.poll()
        if status is None:
            if self.is_pyvmm:
                self.proc.send_signal(signal.SIGUSR2)   # pyvmm logs every vCPU's registers
                self.wait_until(lambda: b"registers:" in self.errors.data, DUMP_GRACE)
            self.stop()
            raise GuestTimeout(self.report(why), self.text, self.stderr, None)
        self.stop()
        kind = GuestPanic if status == ExitStatus.GUEST_PANIC else GuestDied
        raise kind(self.report(f"{why}: the VMM exited with status {status}"),
                   self.text, self.stderr, status)
