"""Run `pyvmm run` as a child process and talk to its serial console.

A boot that hangs never stalls the suite: every wait has a deadline, and on
a deadline the harness asks pyvmm for a register dump (SIGUSR2), kills it and
fails with the serial log and the registers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest


class GuestProcess:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", "pyvmm", "--log-level", "info", "run", *args]
        self.cmd = cmd
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        self.output = bytearray()
        self.stderr = bytearray()
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.output), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True)]
        for t in self._readers:
            t.start()

    def _pump(self, stream, sink: bytearray) -> None:
        while True:
            chunk = stream.read1(4096)
            if not chunk:
                break
            with self._cond:
                sink += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> float:
        """Wait until the console shows ``needle``; returns seconds since start."""
        self.wait_for_regex(re.escape(needle), timeout)
        return time.monotonic() - self.started

    def wait_for_regex(self, pattern: str, timeout: float) -> re.Match:
        """Wait until the console output matches ``pattern``; returns the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        with self._cond:
            while (m := regex.search(self.output)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)):
                    break
                self._cond.wait(min(left, 1.0))
            if m is not None:
                return m
        self.fail(f"console never matched {pattern!r} within {timeout:.0f} s")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"pyvmm did not exit within {timeout:.0f} s")
        for t in self._readers:
            t.join(5)
        return status

    def fail(self, why: str) -> None:
        """Dump registers, kill, and fail the test with everything we know."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR2)  # pyvmm logs every vCPU's registers
            time.sleep(2)
            self.proc.kill()
            self.proc.wait(10)
        for t in self._readers:
            t.join(5)
        pytest.fail(f"{why}\n--- command: {' '.join(self.cmd)}\n--- serial console:\n"
                    f"{self.text[-6000:]}\n--- pyvmm stderr (registers):\n"
                    f"{self.stderr.decode(errors='replace')[-6000:]}", pytrace=False)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
