"""Confining the daemon to the shared directory before it serves the guest.

The FUSE server already resolves every name with ``openat2(RESOLVE_BENEATH)``
on ``O_PATH`` inode fds, so a guest cannot name a host file outside the share.
The sandbox is the second wall, for bugs in that first one:

* ``namespace`` (default as root): a new PID namespace (the daemon forks: the
  child is PID 1 there and serves, the parent waits for it, passes SIGTERM,
  SIGINT and SIGHUP on and exits with its status), a private mount namespace
  and a new network namespace, a fresh procfs mounted inside them, the shared
  directory bind-mounted on itself and made the root with ``pivot_root``; the
  old root is detached.  Afterwards the whole host file system is gone from
  this process's view, and so are the host's processes.
* ``chroot``: the same PID namespace and private procfs, then ``chroot`` into
  the shared directory (no network namespace, no ``pivot_root``: for runs in a
  container that refuses some of it).  Where even the PID and mount namespaces
  are refused, it falls back to a plain ``chroot`` that keeps a descriptor of
  the host's ``/proc/self/fd`` (logged as a warning): code that runs in such a
  daemon could walk from it to other processes' roots, as root in a chroot can
  anyway; the server itself only ever opens a decimal fd name beneath it.
* ``none``: nothing; openat2 alone (and the host's ``/proc/self/fd``).

Every mode hands the server a descriptor of a ``/proc/self/fd`` directory: the
server re-opens ``O_PATH`` inodes for I/O through it (``/proc`` is not visible
after the pivot).  With a PID namespace it is the new procfs's, where
``/proc/self/fd/../../1/root`` is the daemon's own root (the share) and no
host process exists.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
from collections.abc import Callable

from ..heap import trim_heap

log = logging.getLogger(__name__)

SANDBOX_MODES = ("namespace", "chroot", "none")

# <linux/sched.h>, <linux/mount.h>, <sys/mount.h>, <linux/prctl.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
SYS_pivot_root = 155          # x86_64
#: what the waiting parent passes on to the daemon in the PID namespace
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(OSError):
    """The sandbox could not be set up (the daemon must not serve then)."""


class Sandbox:
    """Where the daemon ended up: the shared directory's path in its new view, and
    a ``/proc/self/fd`` descriptor for re-opening inodes (``Passthrough``).
    (A plain class: the parent that only waits imports this module, and a dataclass
    or NamedTuple would cost it dataclasses' or typing's ~1.5 MiB of RSS.)"""

    __slots__ = ("proc_self_fd", "root")

    def __init__(self, root: str, proc_self_fd: int) -> None:
        self.root = root
        self.proc_self_fd = proc_self_fd


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags), None),
           f"mount {target}")


def open_proc_self_fd() -> int:
    return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def enter_sandbox(mode: str, shared_dir: str, prepare: Callable[[], object] = lambda: None) -> Sandbox:
    """Confine this process as ``mode`` says.  With ``namespace`` and ``chroot`` the
    process forks first: only the child returns (see the module docstring).
    ``prepare`` runs in the process that returns, after the fork and while the host's
    file system is still in view: the caller imports its server there, so that the
    parent, which only waits, never holds those modules."""
    shared_dir = os.path.realpath(shared_dir)
    if mode not in SANDBOX_MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}")
    if mode == "none":
        prepare()
        return Sandbox(shared_dir, open_proc_self_fd())
    if mode == "chroot":
        try:
            proc_fd = _private_pid_and_proc(CLONE_NEWNS, prepare)
        except SandboxError as e:
            log.warning("sandbox: no PID namespace (%s): the host's /proc/self/fd stays open", e)
            prepare()
            proc_fd = open_proc_self_fd()
        os.chroot(shared_dir)
        os.chdir("/")
        log.info("sandbox: chroot into %s", shared_dir)
        return Sandbox("/", proc_fd)
    proc_fd = _private_pid_and_proc(CLONE_NEWNS | CLONE_NEWNET, prepare)
    _mount(shared_dir, shared_dir, MS_BIND | MS_REC)  # pivot_root needs a mount point
    os.chdir(shared_dir)
    _check(_libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")   # the old root sat on top
    os.chdir("/")
    log.info("sandbox: new PID, mount and network namespaces, root is %s", shared_dir)
    return Sandbox("/", proc_fd)


def _private_pid_and_proc(namespaces: int, prepare: Callable[[], object]) -> int:
    """Become PID 1 of a new PID namespace (``fork_into_pid_namespace``), run
    ``prepare``, enter new ``namespaces`` (a mount namespace among them), mount a
    fresh procfs on /proc there and return a descriptor of its /proc/self/fd."""
    fork_into_pid_namespace()
    prepare()
    _check(_libc.unshare(namespaces), "unshare")
    _mount(None, "/", MS_REC | MS_PRIVATE)          # nothing we do propagates to the host
    _mount("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "proc")
    return open_proc_self_fd()


def fork_into_pid_namespace() -> None:
    """Fork into a new PID namespace.  Returns in the child, PID 1 there, which dies
    with its parent; the parent never returns: it waits for the child, passes on
    FORWARDED_SIGNALS and exits with the child's status (128 + N for a signal N)."""
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    alive_r, alive_w = os.pipe()       # EOF on alive_r: the parent is gone
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        parent_gone = bool(select.select([alive_r], [], [], 0)[0])   # died before the prctl
        os.close(alive_r)
        if parent_gone:
            os._exit(1)
        return
    os.close(alive_r)
    _wait_and_exit(pid)


def _wait_and_exit(pid: int) -> None:
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
    trim_heap()   # this process only waits from now on
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 1 << 8
            break
    logging.shutdown()
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
             else 128 + os.WTERMSIG(status))
