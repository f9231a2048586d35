"""``--share DIR``: a host directory in the guest, with its back-end started by pyvmm.

``pyvmm run --share DIR[,tag=T][,dax=on][,cache_size=S][,readonly=on]`` does
what ``--fs`` plus a hand-started back-end plus ``pyvmm.share=`` words do:

1. ``start_backend`` starts ``pyvmm-virtiofsd`` (this package's back-end, as
   ``python -m pyvmm.virtiofsd``) on a socket in a private directory, waits
   for the socket, and returns a ``Backend`` to stop later;
2. ``ShareConfig.fs_config`` is the virtio-fs device for it (``FsConfig``);
3. ``ShareConfig.guest_word`` is the guest contract's word for it:
   ``pyvmm.share=TAG[:dax][:ro]``: /init mounts it at /mnt/TAG.

Nothing is left behind on any exit path: ``Backend.stop`` ends the daemon and
removes the directory, and a daemon outlives a VMM killed with SIGKILL only
until its vhost-user connection drops (it serves one connection) or its
parent-death signal arrives.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256 << 20   # DAX window: the guest spends 1.6% of it on struct pages
TAG_RE = re.compile(r"[A-Za-z0-9._-]{1,36}")
START_TIMEOUT = 30.0             # seconds for the back-end's socket to appear
STOP_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1             # <linux/prctl.h>
SUN_PATH_MAX = 107               # sockaddr_un.sun_path, less its NUL (unix(7))
SOCKET_NAME = "vhost-user.sock"


def socket_dir(prefix: str, name: str) -> str:
    """A new private directory for a Unix socket called ``name``: under $TMPDIR, or
    under /tmp when $TMPDIR is missing or too deep for a socket path (sun_path is
    108 bytes).

    Made here rather than with ``tempfile.mkdtemp``: tempfile brings shutil, random,
    bz2 and lzma into a VMM that needs none of them (with the RTC's ``datetime``,
    0.5 MiB of a running VMM's memory, bench/README.md)."""
    parent = os.environ.get("TMPDIR") or "/tmp"
    if (not os.path.isdir(parent)
            or len(os.fsencode(os.path.join(parent, _new_name(prefix), name))) > SUN_PATH_MAX):
        parent = "/tmp"
    for _ in range(100):
        path = os.path.join(parent, _new_name(prefix))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no new directory name under {parent}")


def _new_name(prefix: str) -> str:
    return prefix + os.urandom(6).hex()


def remove_socket_dir(path: str) -> None:
    """Remove a ``socket_dir`` and what was put in it (a socket, nothing deeper); one
    that is gone already is fine."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                os.unlink(entry.path)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


@dataclass(frozen=True)
class ShareConfig:
    path: str
    tag: str
    dax: bool = False
    cache_size: int = DEFAULT_CACHE_SIZE
    readonly: bool = False

    def guest_word(self) -> str:
        """The guest contract's word: ``pyvmm.share=TAG[:dax][:ro]``."""
        return "pyvmm.share=" + self.tag + (":dax" if self.dax else "") + (":ro" if self.readonly else "")

    def fs_config(self, socket_path: str):
        from .vm import FsConfig

        return FsConfig(self.tag, socket_path, dax=self.dax, cache_size=self.cache_size)


class Backend:
    """One pyvmm-virtiofsd child serving one share."""

    def __init__(self, share: ShareConfig, proc: subprocess.Popen, directory: str, socket_path: str) -> None:
        self.share = share
        self.proc = proc
        self.socket_dir = directory
        self.socket_path = socket_path

    def stop(self) -> int | None:
        """End the daemon (it normally exits by itself when the VMM disconnects) and
        remove its directory; returns its exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        remove_socket_dir(self.socket_dir)
        return self.proc.returncode


def _die_with_parent() -> None:
    """In the child: SIGTERM when the VMM dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_backend(share: ShareConfig, log_level: str = "warning", *, stderr=None,
                  extra: tuple[str, ...] = (), python: str = sys.executable) -> Backend:
    """Start pyvmm-virtiofsd for ``share`` on a socket in a new private directory and
    wait for the socket.  Its stderr is ours unless ``stderr`` (a file) is given;
    ``extra``: more daemon options.  ValueError when it does not start."""
    directory = socket_dir("pyvmm-share-", SOCKET_NAME)
    socket_path = os.path.join(directory, SOCKET_NAME)
    argv = [python, "-m", "pyvmm.virtiofsd", "--socket-path", socket_path,
            "--shared-dir", share.path, "--log-level", log_level, *extra]
    if share.readonly:
        argv.append("--readonly")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=_die_with_parent)
    except OSError as e:
        remove_socket_dir(directory)
        raise ValueError(f"--share {share.path}: cannot start pyvmm-virtiofsd: {e.strerror}") from None
    backend = Backend(share, proc, directory, socket_path)
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            backend.stop()
            raise ValueError(f"--share {share.path}: pyvmm-virtiofsd did not start "
                             f"(status {proc.returncode}; see its own message)")
        time.sleep(0.02)
    log.info("share %s: pyvmm-virtiofsd pid %d serves %s", share.tag, proc.pid, share.path)
    return backend


def stop_backends(backends: list[Backend]) -> None:
    for b in backends:
        status = b.stop()
        if status not in (0, None, -signal.SIGTERM):
            log.warning("share %s: pyvmm-virtiofsd exited with status %s", b.share.tag, status)
