"""Confining the daemon to the shared directory before it serves the guest.

The FUSE server already resolves every name with ``openat2(RESOLVE_BENEATH)``
on ``O_PATH`` inode fds, so a guest cannot name a host file outside the share.
The sandbox is the second wall, for bugs in that first one:

* ``namespace`` (default as root): a private mount namespace and a new network
  namespace (``unshare``), the shared directory bind-mounted on itself and made
  the root with ``pivot_root``; the old root is detached.  Afterwards the whole
  host file system is gone from this process's view.
* ``chroot``: ``chroot`` into the shared directory (for runs that are already in
  a container, where new namespaces may be refused).
* ``none``: nothing; openat2 alone.

All three keep a descriptor of ``/proc/self/fd`` opened beforehand: the server
re-opens ``O_PATH`` inodes for I/O through it (``/proc`` is not visible after
the pivot).  A PID namespace is not used: it would need a fork.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

SANDBOX_MODES = ("namespace", "chroot", "none")

# <linux/sched.h>, <linux/mount.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
SYS_pivot_root = 155          # x86_64

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(OSError):
    """The sandbox could not be set up (the daemon must not serve then)."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), None,
                       ctypes.c_ulong(flags), None), f"mount {target}")


def open_proc_self_fd() -> int:
    return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def enter_sandbox(mode: str, shared_dir: str) -> str:
    """Confine this process as ``mode`` says; returns the shared dir's path afterwards."""
    shared_dir = os.path.realpath(shared_dir)
    if mode == "none":
        return shared_dir
    if mode == "chroot":
        os.chroot(shared_dir)
        os.chdir("/")
        log.info("sandbox: chroot into %s", shared_dir)
        return "/"
    if mode != "namespace":
        raise ValueError(f"unknown sandbox mode {mode!r}")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(CLONE_NEWNS|CLONE_NEWNET)")
    _mount(None, "/", MS_REC | MS_PRIVATE)          # nothing we do propagates to the host
    _mount(shared_dir, shared_dir, MS_BIND | MS_REC)  # pivot_root needs a mount point
    os.chdir(shared_dir)
    _check(_libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")   # the old root sat on top
    os.chdir("/")
    log.info("sandbox: new mount and network namespaces, root is %s", shared_dir)
    return "/"
