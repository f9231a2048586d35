"""``Guest``: a booted guest to run commands in, for tests and benchmarks.

::

    from pyvmm.testing import Guest, Share

    with Guest(shares={"data": Share("/srv/data", dax=True)}) as g:
        r = g.run("sha256sum /mnt/data/file")
        assert r.returncode == 0, r.stderr

A ``Guest`` is one ``pyvmm run --agent socket=...`` process (so a crashing
guest or VMM never takes the test process with it, several guests can run at
once, and signal handlers stay where they belong).  ``run`` talks to the
guest agent over that socket; ``expect``/``send`` use the serial console,
where a shell runs too.  Every wait has a deadline, and every failure is a
``GuestError`` whose message carries the console's last lines and the vCPUs'
registers.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..agent import AgentClosed, AgentConnection, AgentSession, AgentTimeout, Result, connect
from ..shares import socket_dir
from .process import GuestError, GuestTimeout, VmmProcess

BOOT_TIMEOUT = 300.0      # seconds; a boot takes 10-40 s on PVM hosts, about 1 s with VMX/SVM
RUN_TIMEOUT = 120.0
EXIT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Share:
    """A host directory for ``Guest(shares={tag: Share(...)})``, mounted at /mnt/TAG."""

    path: str
    dax: bool = False
    readonly: bool = False
    cache_size: str | None = None   # the DAX window, e.g. "64M" (default 256M)

    def option(self, tag: str) -> str:
        spec = f"{os.fspath(self.path)},tag={tag}"
        if self.dax:
            spec += ",dax=on"
        if self.readonly:
            spec += ",readonly=on"
        if self.cache_size:
            spec += f",cache_size={self.cache_size}"
        return spec


class Guest:
    """A guest booted by pyvmm, with its agent ready (see the module docstring).

    ``kernel``/``initramfs``: default the default guest's.  ``shares``: tag ->
    host directory or ``Share``.  ``append``: words for the kernel command line.
    ``args``: more ``pyvmm run`` options.  Call ``start()`` (or use ``with``).
    """

    def __init__(self, *, kernel: str | None = None, initramfs: str | None = None,
                 memory: str = "256M", cpus: int = 1,
                 shares: Mapping[str, str | os.PathLike | Share] | None = None,
                 append: Sequence[str] = (), args: Sequence[str] = (),
                 boot_timeout: float = BOOT_TIMEOUT, env: Mapping[str, str] | None = None,
                 python: str | None = None, log_level: str = "info",
                 restore_from: str | os.PathLike | None = None) -> None:
        self.restore_from = os.fspath(restore_from) if restore_from is not None else None
        self.kernel, self.initramfs = kernel, initramfs
        self.memory, self.cpus = memory, cpus
        self.shares = {tag: s if isinstance(s, Share) else Share(os.fspath(s))
                       for tag, s in (shares or {}).items()}
        self.append = list(append)
        self.args = list(args)
        self.boot_timeout = boot_timeout
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.log_level = log_level
        self.vmm: VmmProcess | None = None
        self.boot_seconds: float | None = None
        self._session: AgentSession | None = None
        self._connection: AgentConnection | None = None
        self._dir: str | None = None
        self._lock = threading.Lock()

    # --- life cycle ------------------------------------------------------------------------
    @classmethod
    def restore(cls, snapshot: str | os.PathLike, **kwargs) -> "Guest":
        """A guest resumed from ``snapshot`` (see ``Guest.snapshot``); ``shares`` must
        name the snapshot's virtio-fs tags.  Call ``start()`` or use ``with``."""
        return cls(restore_from=snapshot, **kwargs)

    @classmethod
    def snapshot(cls, path: str | os.PathLike, **kwargs) -> float:
        """Boot a guest (``Guest`` keyword arguments) to its snapshot point and write the
        snapshot to ``path``; returns the seconds it took.  Its shares' tags (and DAX
        windows) are fixed there: restores give them directories of their own."""
        guest = cls(**kwargs)
        path = os.fspath(path)
        argv = [*guest.pyvmm_args(None), "--snapshot", path]
        vmm = VmmProcess.pyvmm_run(*argv, log_level=guest.log_level, python=guest.python,
                                   env=guest.env, stdin=False)
        try:
            status = vmm.wait_exit(guest.boot_timeout)
        finally:
            vmm.stop()
        if status != 0 or not os.path.isdir(path):
            vmm.fail(f"pyvmm run --snapshot {path} did not write the snapshot")
        return time.monotonic() - vmm.t0

    def pyvmm_args(self, agent_socket: str | None) -> list[str]:
        """The ``pyvmm run`` (or ``pyvmm restore DIR``) options for this guest."""
        argv = ["--agent", f"socket={agent_socket}"] if agent_socket else []
        for tag, share in self.shares.items():
            argv += ["--share", share.option(tag)]
        if self.restore_from is not None:
            return [self.restore_from, *argv, *self.args]
        argv += ["--memory", str(self.memory), "--cpus", str(self.cpus)]
        if self.kernel:
            argv += ["--kernel", os.fspath(self.kernel)]
        if self.initramfs:
            argv += ["--initramfs", os.fspath(self.initramfs)]
        for word in self.append:
            argv += ["--append", word]
        return argv + self.args

    def start(self) -> "Guest":
        """Boot and wait until the agent is ready (``boot_timeout``)."""
        self._dir = socket_dir("pyvmm-guest-", "agent.sock")
        sock = os.path.join(self._dir, "agent.sock")
        self.vmm = VmmProcess.pyvmm_run(*self.pyvmm_args(sock), log_level=self.log_level,
                                        python=self.python, env=self.env,
                                        command="run" if self.restore_from is None else "restore")
        self._connect(sock)
        return self

    def _connect(self, sock: str) -> None:
        try:
            if not self.vmm.wait_until(lambda: os.path.exists(sock) or not self.vmm.running, 60):
                self.vmm.fail("pyvmm did not open its agent socket within 60 s")
            if not self.vmm.running:
                self.vmm.fail("pyvmm ended before the guest booted")
            self._connection = connect(sock)
            self._session = self._connection.session
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        try:
            problems = self._session.wait_ready(self.boot_timeout)
        except AgentTimeout:
            self.vmm.fail(f"the guest was not ready within {self.boot_timeout:.0f} s")
        except AgentClosed:
            self._vmm_ended("the guest never became ready")
        self.boot_seconds = time.monotonic() - self.vmm.t0
        if problems:
            self.vmm.fail(f"the guest could not set up: {problems.strip()}")

    def _vmm_ended(self, why: str) -> None:
        """The agent connection closed: the VMM exited (or is exiting)."""
        self.vmm.wait_until(lambda: not self.vmm.running, EXIT_TIMEOUT)
        self.vmm.fail(why)

    def __enter__(self) -> "Guest":
        return self.start() if self.vmm is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> int | None:
        """Stop the VMM and everything it started; returns its exit status."""
        status = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self.vmm is not None:
            status = self.vmm.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return status

    # --- using it ----------------------------------------------------------------------------
    def run(self, command: str, timeout: float = RUN_TIMEOUT, check: bool = False) -> Result:
        """Run ``command`` with /bin/sh -c in the guest; its status and output.

        ``check``: raise GuestError when the status is not 0.  On ``timeout`` the
        command's process group is killed and GuestTimeout raised (the guest
        stays usable)."""
        if self._session is None:
            raise RuntimeError("Guest.run() before start()")
        try:
            result = self._session.run(command, timeout)
        except AgentTimeout as e:
            partial = e.result.stdout + e.result.stderr if e.result else ""
            raise GuestTimeout(self.vmm.report(f"{e}; it printed:\n{partial[-4000:]}"),
                               self.vmm.text, self.vmm.stderr) from None
        except (AgentClosed, OSError):
            self._vmm_ended(f"the VMM ended while {command!r} ran")
        if check and result.returncode != 0:
            raise GuestError(f"{command!r} exited with {result.returncode}\n--- stdout:\n"
                             f"{result.stdout[-4000:]}\n--- stderr:\n{result.stderr[-4000:]}",
                             self.vmm.text, self.vmm.stderr, result.returncode)
        return result

    def expect(self, pattern: str, timeout: float = RUN_TIMEOUT) -> re.Match[bytes]:
        """Wait until the serial console matches ``pattern`` (a regex)."""
        return self.vmm.wait_for_regex(pattern, timeout)

    def send(self, text: str) -> None:
        """Type ``text`` on the serial console (a shell runs there)."""
        self.vmm.send(text)

    @property
    def console(self) -> str:
        return self.vmm.text if self.vmm else ""

    def console_tail(self, lines: int = 40) -> list[str]:
        return self.vmm.console.tail(lines) if self.vmm else []


__all__ = ["Guest", "Share", "Result", "GuestError", "GuestTimeout"]
