"""The host file system behind a virtio-fs share ("passthrough"), in FUSE's terms.

The guest kernel names files by *node ids* it got from us (LOOKUP, CREATE,
MKDIR, READDIRPLUS, ...) and open files by *file handles* (OPEN, OPENDIR,
CREATE).  This module keeps both tables and performs the host system calls;
``server`` turns FUSE requests into calls of the methods below and their
results back into wire structures.

How the share stays a share
---------------------------
* **An inode is an fd, never a path.**  Every node id maps to one host inode,
  identified by ``(st_dev, st_ino)`` and held open as an
  ``O_PATH|O_NOFOLLOW|O_CLOEXEC`` descriptor.  A path could be renamed under
  us or swapped for a symlink between a check and a use; a descriptor cannot.
* **Names from the guest are single components.**  LOOKUP opens ``name``
  relative to the parent's fd with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_MAGICLINKS)`` and ``O_NOFOLLOW``: no ``/``, no ``..`` out of the
  parent, no trip through ``/proc/*/fd`` style links, and a symlink is opened
  as itself, never followed.  The guest follows symlinks on its own side
  (READLINK, then LOOKUPs of the target's components), so a symlink pointing
  at ``/etc`` or ``../../..`` resolves *inside the guest's view* of the share.
* **I/O descriptors are re-opened from the O_PATH fd** through a descriptor of
  ``/proc/self/fd`` opened before any sandbox: ``openat(proc_self_fd, "17",
  O_RDWR)`` follows the "magic link" to exactly the inode we hold, whatever
  happened to its name meanwhile.  Only regular files and directories are
  re-opened: opening a device node or a FIFO a guest created could touch host
  hardware or block a worker forever.
* **Creation runs as the caller.**  MKDIR/MKNOD/SYMLINK/CREATE/LINK switch the
  calling *thread's* effective uid/gid (raw ``setresuid``/``setresgid``
  system calls: glibc's wrappers, and so ``os.setresuid``, change every thread
  of the process) and its umask to the request's, so that new objects get the
  owner and mode the guest expects.  Each worker thread first detaches its
  file-system context with ``unshare(CLONE_FS)``, which makes its umask and
  working directory its own.

Lookup counts
-------------
Every reply that hands the guest a node id (an "entry": LOOKUP, CREATE, MKNOD,
MKDIR, SYMLINK, LINK, each READDIRPLUS entry but "." and "..") adds one to the
node's count; FORGET subtracts.  At zero the node's fd is closed and its id is
never seen again.  The root (node id 1) lives until ``close()``.

An fd is only closed once no request is still using it (``_Held.users``): a
FORGET or RELEASE racing with a READ on another thread must not let the fd
number be reused for some other file under the READ's feet.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from .fuse_abi import FUSE_ROOT_ID
from .iovec import IoVec

log = logging.getLogger(__name__)

# --- host ABI that Python's os module lacks (x86-64) ---------------------------------------
NO_ID = 0xFFFFFFFF            # (uid_t) -1: "unchanged" to setresuid, so never a caller's id
SYS_setresuid = 117
SYS_setresgid = 119
SYS_getdents64 = 217
SYS_renameat2 = 316
SYS_openat2 = 437

# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# <linux/fs.h> renameat2 flags
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# <linux/stat.h> utimensat special nanosecond values
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

CLONE_FS = 0x00000200
#: The kernel's O_LARGEFILE on x86-64 (glibc defines it as 0 for 64-bit programs, but
#: the guest kernel puts the real bit in every open's flags).
KERNEL_O_LARGEFILE = 0o100000

#: Open flags of the guest's that are passed on to the host; everything else
#: (O_CREAT, O_EXCL and O_TRUNC where they do not belong, O_DIRECT, O_PATH,
#: O_NOFOLLOW, O_DIRECTORY, O_TMPFILE, FMODE_EXEC, ...) is dropped or set by us.
GUEST_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_NONBLOCK | os.O_DSYNC
                    | os.O_SYNC | os.O_NOATIME | KERNEL_O_LARGEFILE)

#: Attribute / entry cache timeouts (seconds) and FOPEN_* flags per ``--cache`` mode,
#: like virtiofsd's: "auto" re-validates every second, "always" trusts the guest's
#: cache for a day (and keeps page cache across opens), "never" caches nothing
#: (and makes every read/write go to the host: FOPEN_DIRECT_IO).
CACHE_TIMEOUTS = {"auto": 1.0, "always": 86400.0, "never": 0.0}
_FOPEN_DIRECT_IO = 1 << 0      # fuse_abi.FOPEN_DIRECT_IO
_FOPEN_KEEP_CACHE = 1 << 1     # fuse_abi.FOPEN_KEEP_CACHE
CACHE_OPEN_FLAGS = {"auto": 0, "always": _FOPEN_KEEP_CACHE, "never": _FOPEN_DIRECT_IO}

#: getdents64 buffer of one READDIR: at least one entry of the longest name (19 + 256,
#: aligned), at most what one reply could carry of the shortest fuse_dirents.
DIRENT_BATCH_MIN = 280
DIRENT_BATCH_MAX = 256 * 1024
_MAX_OFF_T = (1 << 63) - 1
#: copy_file_range's reply carries a u32 byte count: copy at most this much per request
_MAX_COPY = 0xFFFFF000


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


# --- the few C entry points ---------------------------------------------------------------
class open_how(ctypes.Structure):
    """struct open_how of <linux/openat2.h>: the argument block of openat2(2)."""
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class HostCalls:
    """System calls Python 3.11's ``os`` module does not offer, through ctypes.

    Each method raises OSError with the host's errno, like ``os`` functions.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self._fallocate = self._libc.fallocate
        self._fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        self._utimensat = self._libc.utimensat
        self._utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(timespec),
                                    ctypes.c_int]
        self._syncfs = self._libc.syncfs
        self._syncfs.argtypes = [ctypes.c_int]
        self._unshare = self._libc.unshare
        self._unshare.argtypes = [ctypes.c_int]

    @staticmethod
    def _check(result: int, what: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")
        return result

    def syscall(self, number: int, *args: int | bytes | ctypes._Pointer, what: str) -> int:
        """Raw ``syscall(2)``; integer arguments go as C longs."""
        cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        return self._check(self._syscall(ctypes.c_long(number), *cargs), what)

    def openat2(self, dirfd: int, name: bytes, flags: int, mode: int, resolve: int) -> int:
        how = open_how(flags=flags, mode=mode, resolve=resolve)
        return self.syscall(SYS_openat2, dirfd, ctypes.c_char_p(name), ctypes.byref(how),
                            ctypes.sizeof(how), what="openat2")

    def renameat2(self, olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes,
                  flags: int) -> None:
        self.syscall(SYS_renameat2, olddirfd, ctypes.c_char_p(oldname), newdirfd,
                     ctypes.c_char_p(newname), flags, what="renameat2")

    def getdents64(self, fd: int, buf: ctypes.Array) -> int:
        return self.syscall(SYS_getdents64, fd, buf, len(buf), what="getdents64")

    def set_thread_egid(self, gid: int) -> None:
        """setresgid(-1, gid, -1) for the calling thread only (fsgid follows egid)."""
        self.syscall(SYS_setresgid, -1, gid, -1, what="setresgid")

    def set_thread_euid(self, uid: int) -> None:
        """setresuid(-1, uid, -1) for the calling thread only (fsuid follows euid)."""
        self.syscall(SYS_setresuid, -1, uid, -1, what="setresuid")

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._check(self._fallocate(fd, mode, offset, length), "fallocate")

    def utimensat(self, dirfd: int, name: bytes, atime: tuple[int, int],
                  mtime: tuple[int, int]) -> None:
        times = (timespec * 2)(timespec(*atime), timespec(*mtime))
        self._check(self._utimensat(dirfd, name, times, 0), "utimensat")

    def syncfs(self, fd: int) -> None:
        self._check(self._syncfs(fd), "syncfs")

    def unshare(self, flags: int) -> None:
        self._check(self._unshare(flags), "unshare")


# --- what the tables hold -----------------------------------------------------------------
class _Held:
    """A descriptor owned by a table and borrowed by the requests in flight.

    ``users`` counts the requests using ``fd`` right now; ``dropped`` says the table
    let go of it.  The fd is closed when both say so (``Passthrough._unuse``).
    """

    __slots__ = ("fd", "users", "dropped")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dropped = False


class _Inode(_Held):
    """A host inode the guest knows by ``nodeid``: an O_PATH fd plus its lookup count."""

    __slots__ = ("nodeid", "key", "kind", "lookups")

    def __init__(self, fd: int, nodeid: int, st: os.stat_result) -> None:
        super().__init__(fd)
        self.nodeid = nodeid
        self.key = (st.st_dev, st.st_ino)
        self.kind = stat.S_IFMT(st.st_mode)
        self.lookups = 1


class _Handle(_Held):
    """An open file or directory the guest knows by ``fh``.

    A directory handle keeps nothing of its listing: each READDIR seeks the
    directory fd to the guest's offset and reads one batch (``lock`` keeps the
    seek and the read of one request together).
    """

    __slots__ = ("fh", "nodeid", "is_dir", "lock")

    def __init__(self, fd: int, fh: int, nodeid: int, is_dir: bool) -> None:
        super().__init__(fd)
        self.fh = fh
        self.nodeid = nodeid
        self.is_dir = is_dir
        self.lock = threading.Lock()


class Caller(NamedTuple):
    """Who sent a request (from fuse_in_header): creation runs with these ids."""

    uid: int
    gid: int
    pid: int = 0


class Entry(NamedTuple):
    """A node id handed to the guest (one lookup counted) and its attributes."""

    nodeid: int
    stat: os.stat_result


class DirEntry(NamedTuple):
    """One directory entry: ``offset`` is where the *next* entry starts: the host's
    ``d_off`` cookie, which the guest sends back to continue after this entry."""

    name: bytes
    ino: int
    type: int          # DT_* (== S_IFMT >> 12), 0 when the host file system does not say
    offset: int


class SetAttr(NamedTuple):
    """The changes of one SETATTR; ``None`` = leave alone.

    Times are ``(seconds, nanoseconds)``; nanoseconds ``UTIME_NOW`` means "now".
    ``fh`` names an open handle to act through (FATTR_FH).
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: tuple[int, int] | None = None
    mtime: tuple[int, int] | None = None
    fh: int | None = None
    kill_suidgid: bool = False


def check_name(name: bytes, *, new: bool = False) -> None:
    """A guest name must be one path component: not empty, no '/' and no NUL.

    ``new``: the name is created, removed or renamed, so "." and ".." are refused too.
    """
    if not name or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL, f"bad name {name[:64]!r}")
    if new and name in (b".", b".."):
        raise _err(errno.EINVAL, f"cannot create or remove {name!r}")


def check_offset(offset: int, length: int = 0) -> None:
    """File offsets are signed 64-bit on the host (loff_t): refuse what does not fit."""
    if offset < 0 or length < 0 or offset + length > _MAX_OFF_T:
        raise _err(errno.EINVAL, f"offset {offset:#x}+{length:#x} out of range")


class Passthrough:
    """The shared directory: node ids and file handles over host descriptors.

    Thread-safe: one lock guards both tables; system calls run outside it.
    """

    def __init__(self, root: str, *, cache: str = "auto", readonly: bool = False,
                 proc_self_fd: int | None = None) -> None:
        if cache not in CACHE_TIMEOUTS:
            raise ValueError(f"cache must be one of {', '.join(CACHE_TIMEOUTS)}, not {cache!r}")
        self.readonly = readonly
        self.cache = cache
        #: entry and attribute cache timeout in seconds
        self.timeout = CACHE_TIMEOUTS[cache]
        #: FOPEN_* flags for every OPEN/CREATE reply
        self.open_flags = CACHE_OPEN_FLAGS[cache]
        self.host = HostCalls()
        self._lock = threading.Lock()
        self._thread = threading.local()
        self._inodes: dict[int, _Inode] = {}
        self._by_key: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_nodeid = FUSE_ROOT_ID + 1
        self._next_fh = 1
        self._have_openat2 = True
        self._switch_ids = os.geteuid() == 0
        self._proc = proc_self_fd if proc_self_fd is not None else os.open(
            "/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(self._proc)
            raise
        root_inode = _Inode(fd, FUSE_ROOT_ID, os.fstat(fd))
        self._root_key = root_inode.key
        self._inodes[FUSE_ROOT_ID] = root_inode
        self._by_key[root_inode.key] = root_inode
        log.info("sharing %s (cache=%s%s)", root, cache, ", read-only" if readonly else "")

    # --- life cycle ------------------------------------------------------------------------
    def reset(self) -> None:
        """The guest went away (DESTROY, device reset): forget every handle and inode
        except the root, as if the connection were new."""
        with self._lock:
            for handle in self._handles.values():
                self._drop(handle)
            self._handles.clear()
            root = self._inodes.get(FUSE_ROOT_ID)     # None once closed
            for node in self._inodes.values():
                if node is not root:
                    self._drop(node)
            self._inodes = {FUSE_ROOT_ID: root} if root is not None else {}
            self._by_key = {root.key: root} if root is not None else {}

    def close(self) -> None:
        """Close every descriptor this object holds (root and /proc/self/fd included).

        Call it once no request can arrive any more; later requests fail with EBADF.
        """
        with self._lock:
            for held in [*self._handles.values(), *self._inodes.values()]:
                self._drop(held)
            self._handles.clear()
            self._inodes.clear()
            self._by_key.clear()
            if self._proc >= 0:
                os.close(self._proc)
                self._proc = -1

    # --- table plumbing --------------------------------------------------------------------
    def _drop(self, held: _Held) -> None:
        """The table lets go of ``held`` (call with the lock held)."""
        held.dropped = True
        if held.users == 0 and held.fd >= 0:
            os.close(held.fd)
            held.fd = -1

    def _unuse(self, held: _Held) -> None:
        with self._lock:
            held.users -= 1
            if held.dropped and held.users == 0 and held.fd >= 0:
                os.close(held.fd)
                held.fd = -1

    @contextmanager
    def _inode(self, nodeid: int) -> Iterator[_Inode]:
        """Borrow the inode ``nodeid`` for the duration of a request (EBADF if unknown)."""
        with self._lock:
            node = self._inodes.get(nodeid)
            if node is None:
                raise _err(errno.EBADF, f"unknown node id {nodeid}")
            node.users += 1
        try:
            yield node
        finally:
            self._unuse(node)

    @contextmanager
    def _handle(self, fh: int, *, is_dir: bool | None = None) -> Iterator[_Handle]:
        """Borrow the open handle ``fh`` (EBADF if unknown; ENOTDIR/EISDIR on the
        wrong kind when ``is_dir`` says which one is wanted)."""
        with self._lock:
            handle = self._handles.get(fh)
            if handle is None:
                raise _err(errno.EBADF, f"unknown file handle {fh}")
            if is_dir is not None and handle.is_dir != is_dir:
                raise _err(errno.ENOTDIR if is_dir else errno.EISDIR, f"file handle {fh}")
            handle.users += 1
        try:
            yield handle
        finally:
            self._unuse(handle)

    def _register(self, fd: int) -> Entry:
        """Count one lookup of the inode behind the O_PATH ``fd`` (consumed).

        A known inode keeps its node id (the new fd is closed); a new one gets the
        next id.  The fd is what keeps ``(st_dev, st_ino)`` from being reused while
        it is in the table.
        """
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        with self._lock:
            node = self._by_key.get(key)
            if node is not None:
                node.lookups += 1
            else:
                node = _Inode(fd, self._next_nodeid, st)
                self._next_nodeid += 1
                self._inodes[node.nodeid] = node
                self._by_key[key] = node
                fd = -1
        if fd >= 0:
            os.close(fd)
        return Entry(node.nodeid, st)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """FORGET: the guest dropped ``nlookup`` references to ``nodeid``."""
        with self._lock:
            node = self._inodes.get(nodeid)
            if node is None or nodeid == FUSE_ROOT_ID:
                return
            node.lookups -= min(nlookup, node.lookups)
            if node.lookups == 0:
                del self._inodes[nodeid]
                del self._by_key[node.key]
                self._drop(node)

    def _add_handle(self, fd: int, nodeid: int, is_dir: bool) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(fd, fh, nodeid, is_dir)
        return fh

    def release(self, fh: int) -> None:
        """RELEASE / RELEASEDIR: the guest closed ``fh`` for good."""
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is None:
                raise _err(errno.EBADF, f"unknown file handle {fh}")
            self._drop(handle)

    # --- host helpers ------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.readonly:
            raise _err(errno.EROFS, "the share is read-only")

    def _open_beneath(self, dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
        """Open the single component ``name`` under ``dirfd`` without leaving it.

        openat2 with RESOLVE_BENEATH (no "..", no absolute paths, no symlink out)
        and RESOLVE_NO_MAGICLINKS; O_NOFOLLOW keeps a final symlink unfollowed.
        Kernels before 5.6 lack openat2: then plain openat with O_NOFOLLOW, which is
        equivalent for a name that ``check_name`` accepted (no '/').
        """
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if self._have_openat2:
            try:
                return self.host.openat2(dirfd, name, flags, mode,
                                         RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                log.warning("openat2 is not available: falling back to openat + O_NOFOLLOW")
                self._have_openat2 = False
        return os.open(name, flags, mode, dir_fd=dirfd)

    def _reopen(self, node: _Inode, flags: int) -> int:
        """A real I/O descriptor for ``node``, opened through /proc/self/fd/N.

        Only regular files and directories: a symlink cannot be opened (ELOOP, as
        O_NOFOLLOW would say), and a device node or FIFO is refused (EACCES, as on a
        ``nodev`` mount) so a guest cannot reach host devices or park a thread in a
        FIFO open.
        """
        if node.kind == stat.S_IFLNK:
            raise _err(errno.ELOOP, "cannot open a symlink")
        if node.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise _err(errno.EACCES, "special files are not opened on the host")
        if node.kind == stat.S_IFDIR:
            flags |= os.O_DIRECTORY
        return os.open(str(node.fd), flags | os.O_CLOEXEC, dir_fd=self._proc)

    def _private_fs_context(self) -> None:
        """Give the calling thread its own cwd and umask (unshare(CLONE_FS), once)."""
        if not getattr(self._thread, "fs_private", False):
            self.host.unshare(CLONE_FS)
            self._thread.fs_private = True

    @contextmanager
    def _as_caller(self, caller: Caller, umask: int = 0) -> Iterator[None]:
        """Run the body with this thread's euid/egid and umask set to the caller's.

        Order matters: the group is switched while we are still root, and restored
        after the uid came back to root.  Without root (tests as a normal user) the
        ids cannot change and only the umask is applied.
        """
        if caller.uid == NO_ID or caller.gid == NO_ID:   # -1 would mean "keep root's"
            raise OSError(errno.EINVAL, f"caller ids {caller.uid}:{caller.gid}")
        self._private_fs_context()
        old_umask = os.umask(umask & 0o777)
        try:
            if not self._switch_ids or (caller.uid == os.geteuid() and caller.gid == os.getegid()):
                yield
                return
            euid, egid = os.geteuid(), os.getegid()
            self.host.set_thread_egid(caller.gid)
            try:
                self.host.set_thread_euid(caller.uid)
                try:
                    yield
                finally:
                    self.host.set_thread_euid(euid)
            finally:
                self.host.set_thread_egid(egid)
        finally:
            os.umask(old_umask)

    @contextmanager
    def _in_proc_fd_dir(self) -> Iterator[None]:
        """Make /proc/self/fd this thread's working directory for the body.

        For the few calls that take only a path (xattrs of symlinks and special
        files): ``getxattr("17")`` then follows the magic link to the inode we hold,
        not to what its name resolves to.  The thread's cwd is private
        (``_private_fs_context``) and restored afterwards.
        """
        self._private_fs_context()
        saved = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fchdir(self._proc)
            yield
        finally:
            os.fchdir(saved)
            os.close(saved)

    def _kill_suidgid(self, fd: int, *, via_proc: bool = False) -> None:
        """Clear set-user-ID, and set-group-ID when group-executable (what the kernel
        does on a write by someone without CAP_FSETID): FUSE_HANDLE_KILLPRIV_V2."""
        mode = os.fstat(fd).st_mode
        clear = mode & stat.S_ISUID
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            clear |= stat.S_ISGID
        if clear and stat.S_ISREG(mode):
            new_mode = stat.S_IMODE(mode) & ~clear
            if via_proc:
                os.chmod(str(fd), new_mode, dir_fd=self._proc)
            else:
                os.fchmod(fd, new_mode)

    def _child(self, parent: _Inode, name: bytes) -> Entry:
        """Look up ``name`` under ``parent`` and count it (the tail of every creation)."""
        return self._register(self._open_beneath(parent.fd, name, os.O_PATH))

    # --- names -----------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Entry:
        """LOOKUP ``name`` in directory ``parent`` (one lookup counted)."""
        check_name(name)
        with self._inode(parent) as directory:
            if name == b"..":
                return self._lookup_parent(directory)
            return self._child(directory, name)

    def _lookup_parent(self, directory: _Inode) -> Entry:
        """".." of the root is the root.  Elsewhere RESOLVE_BENEATH forbids "..", so it
        is opened plainly and accepted only when it is an inode the guest already
        reached from the root (its own lookups pin every ancestor): a directory
        moved out of the share on the host cannot lead the guest further out."""
        if directory.nodeid == FUSE_ROOT_ID:
            fd = os.open(str(directory.fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc)
            return self._register(fd)
        fd = os.open(b"..", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
        try:
            st = os.fstat(fd)
            with self._lock:
                known = (st.st_dev, st.st_ino) in self._by_key
        except OSError:
            os.close(fd)
            raise
        if not known:
            os.close(fd)
            raise _err(errno.EACCES, "the parent is not a directory the guest looked up")
        return self._register(fd)

    def getattr(self, nodeid: int) -> os.stat_result:
        with self._inode(nodeid) as node:
            return os.fstat(node.fd)

    def setattr(self, nodeid: int, change: SetAttr) -> os.stat_result:
        """SETATTR: mode, then owner, size, set-id bits, times; returns the new stat."""
        self._check_writable()
        with self._inode(nodeid) as node:
            if change.fh is not None:
                with self._handle(change.fh) as handle:
                    if handle.nodeid != nodeid:   # the change would land on another file
                        raise OSError(errno.EBADF, f"handle {change.fh} is not node {nodeid}'s")
                    self._apply(node, change, handle.fd)
            else:
                self._apply(node, change, None)
            return os.fstat(node.fd)

    def _apply(self, node: _Inode, change: SetAttr, fd: int | None) -> None:
        """One SETATTR, through the open ``fd`` when the guest named a handle, else
        through the O_PATH fd (via /proc/self/fd where the call needs a real file)."""
        target = str(fd if fd is not None else node.fd)
        if change.mode is not None:
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(change.mode))
            else:   # a symlink gets EOPNOTSUPP from the host, as lchmod does
                os.chmod(target, stat.S_IMODE(change.mode), dir_fd=self._proc)
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else change.uid
            gid = -1 if change.gid is None else change.gid
            os.chown(target, uid, gid, dir_fd=self._proc)
        if change.size is not None:
            check_offset(change.size)
            self._truncate(node, change.size, fd)
        if change.kill_suidgid and change.mode is None and node.kind == stat.S_IFREG:
            self._kill_suidgid(fd if fd is not None else node.fd, via_proc=fd is None)
        if change.atime is not None or change.mtime is not None:
            omit = (0, UTIME_OMIT)
            self.host.utimensat(self._proc, target.encode(), change.atime or omit,
                                change.mtime or omit)

    def _truncate(self, node: _Inode, size: int, fd: int | None) -> None:
        if fd is not None:
            os.ftruncate(fd, size)
            return
        if node.kind == stat.S_IFDIR:
            raise _err(errno.EISDIR)
        if node.kind != stat.S_IFREG:
            raise _err(errno.EINVAL, "only regular files can be truncated")
        wfd = self._reopen(node, os.O_WRONLY)
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)

    def readlink(self, nodeid: int) -> bytes:
        with self._inode(nodeid) as node:
            if node.kind != stat.S_IFLNK:
                raise _err(errno.EINVAL, "not a symlink")
            return os.readlink(b"", dir_fd=node.fd)

    # --- creation -------------------------------------------------------------------------
    def mkdir(self, caller: Caller, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._check_writable()
        check_name(name, new=True)
        with self._inode(parent) as directory:
            with self._as_caller(caller, umask):
                os.mkdir(name, stat.S_IMODE(mode), dir_fd=directory.fd)
            return self._child(directory, name)

    def mknod(self, caller: Caller, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        """MKNOD: regular files, FIFOs, sockets and device nodes (``rdev`` a host dev_t).
        A device node created here is never opened by this server (see ``_reopen``)."""
        self._check_writable()
        check_name(name, new=True)
        with self._inode(parent) as directory:
            with self._as_caller(caller, umask):
                os.mknod(name, mode, rdev, dir_fd=directory.fd)
            return self._child(directory, name)

    def symlink(self, caller: Caller, parent: int, name: bytes, target: bytes) -> Entry:
        """SYMLINK: ``target`` is stored as given; the host never follows it."""
        self._check_writable()
        check_name(name, new=True)
        if not target or b"\0" in target:
            raise _err(errno.EINVAL if target else errno.ENOENT, "bad symlink target")
        with self._inode(parent) as directory:
            with self._as_caller(caller):
                os.symlink(target, name, dir_fd=directory.fd)
            return self._child(directory, name)

    def link(self, caller: Caller, nodeid: int, parent: int, name: bytes) -> Entry:
        """LINK: a new name for ``nodeid``.  linkat follows the /proc magic link to the
        inode itself (a symlink is linked, not its target) without the
        CAP_DAC_READ_SEARCH that AT_EMPTY_PATH would need."""
        self._check_writable()
        check_name(name, new=True)
        with self._inode(nodeid) as node, self._inode(parent) as directory:
            with self._as_caller(caller):
                os.link(str(node.fd), name, src_dir_fd=self._proc, dst_dir_fd=directory.fd,
                        follow_symlinks=True)
            return self._child(directory, name)

    def unlink(self, parent: int, name: bytes) -> None:
        self._check_writable()
        check_name(name, new=True)
        with self._inode(parent) as directory:
            os.unlink(name, dir_fd=directory.fd)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._check_writable()
        check_name(name, new=True)
        with self._inode(parent) as directory:
            os.rmdir(name, dir_fd=directory.fd)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int = 0) -> None:
        """RENAME / RENAME2 (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT)."""
        self._check_writable()
        check_name(name, new=True)
        check_name(newname, new=True)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise _err(errno.EINVAL, f"rename flags {flags:#x}")
        with self._inode(parent) as old, self._inode(newparent) as new:
            if flags:
                self.host.renameat2(old.fd, name, new.fd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)

    # --- open files ------------------------------------------------------------------------
    def _guest_open_flags(self, flags: int) -> int:
        """The guest's open flags as far as they are passed on (GUEST_OPEN_FLAGS)."""
        flags &= GUEST_OPEN_FLAGS
        if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise _err(errno.EROFS, "the share is read-only")
        return flags

    def open(self, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> int:
        """OPEN: a new handle on ``nodeid``; returns the fh."""
        flags = self._guest_open_flags(flags)
        with self._inode(nodeid) as node:
            fd = self._reopen(node, flags)
        try:
            if kill_suidgid and flags & os.O_TRUNC:
                self._kill_suidgid(fd)
        except OSError:
            os.close(fd)
            raise
        return self._add_handle(fd, nodeid, is_dir=False)

    def create(self, caller: Caller, parent: int, name: bytes, flags: int, mode: int,
               umask: int, *, kill_suidgid: bool = False) -> tuple[Entry, int]:
        """CREATE: make (or, without O_EXCL, open) ``name`` and open it in one go.

        The file is first created with O_EXCL, so that only a file we made is opened
        with O_CREAT.  If it already exists and the guest did not ask for O_EXCL, the
        existing object is looked up first and re-opened only if it is a regular
        file: a device node or FIFO named like it is never opened.
        Returns (entry, fh).
        """
        self._check_writable()
        check_name(name, new=True)
        exclusive = bool(flags & os.O_EXCL)
        flags = self._guest_open_flags(flags)
        with self._inode(parent) as directory:
            try:
                with self._as_caller(caller, umask):
                    fd = self._open_beneath(directory.fd, name, flags | os.O_CREAT | os.O_EXCL,
                                            stat.S_IMODE(mode))
            except FileExistsError:
                if exclusive:
                    raise
                return self._open_existing(caller, directory, name, flags, kill_suidgid)
        try:
            entry = self._register(os.open(str(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc))
        except OSError:
            os.close(fd)
            raise
        return entry, self._add_handle(fd, entry.nodeid, is_dir=False)

    def _open_existing(self, caller: Caller, directory: _Inode, name: bytes, flags: int,
                       kill_suidgid: bool) -> tuple[Entry, int]:
        """CREATE found a file that the guest did not know about (made on the host
        meanwhile): open it like OPEN would, but with the caller's ids, since the
        guest kernel never checked the caller's access to this file."""
        entry = self._child(directory, name)
        try:
            with self._as_caller(caller):
                fh = self.open(entry.nodeid, flags, kill_suidgid=kill_suidgid)
        except OSError:
            self.forget(entry.nodeid, 1)
            raise
        return entry, fh

    def read(self, fh: int, offset: int, size: int, dest: IoVec, dest_offset: int) -> int:
        """READ: up to ``size`` file bytes straight into ``dest`` (guest memory)."""
        check_offset(offset)
        with self._handle(fh, is_dir=False) as handle:
            return dest.read_from_file(handle.fd, offset, dest_offset, size)

    def write(self, fh: int, offset: int, size: int, src: IoVec, src_offset: int, *,
              kill_suidgid: bool = False) -> int:
        """WRITE: ``size`` bytes of ``src`` (guest memory) into the file at ``offset``."""
        self._check_writable()
        check_offset(offset, size)
        with self._handle(fh, is_dir=False) as handle:
            if kill_suidgid:
                self._kill_suidgid(handle.fd)
            return src.write_to_file(handle.fd, offset, src_offset, size)

    def flush(self, fh: int) -> None:
        """FLUSH (the guest's close(2) of one descriptor): closing a duplicate gives
        file systems with close-time semantics (NFS) their flush."""
        with self._handle(fh) as handle:
            os.close(os.dup(handle.fd))

    def fsync(self, fh: int, datasync: bool, *, is_dir: bool = False) -> None:
        with self._handle(fh, is_dir=is_dir) as handle:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """LSEEK: the kernel only asks for SEEK_DATA / SEEK_HOLE (it does the others)."""
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise _err(errno.EINVAL, f"whence {whence}")
        check_offset(offset)
        with self._handle(fh, is_dir=False) as handle:
            return os.lseek(handle.fd, offset, whence)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """FALLOCATE: the mode bits (KEEP_SIZE, PUNCH_HOLE, ...) go to the host as given."""
        self._check_writable()
        check_offset(offset, length)
        with self._handle(fh, is_dir=False) as handle:
            self.host.fallocate(handle.fd, mode, offset, length)

    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int) -> int:
        """COPY_FILE_RANGE between two open handles; returns the bytes copied."""
        self._check_writable()
        if flags:
            raise _err(errno.EINVAL, f"copy_file_range flags {flags:#x}")
        length = min(length, _MAX_COPY)
        check_offset(off_in, length)
        check_offset(off_out, length)
        with self._handle(fh_in, is_dir=False) as src, self._handle(fh_out, is_dir=False) as dst:
            return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)

    @contextmanager
    def mapping_fd(self, nodeid: int, writable: bool) -> Iterator[int]:
        """A descriptor of regular file ``nodeid`` for a DAX mapping, O_RDWR when the
        guest wants to write through the mapping; closed after the body."""
        if writable:
            self._check_writable()
        with self._inode(nodeid) as node:
            if node.kind != stat.S_IFREG:
                raise _err(errno.EINVAL, "only regular files can be mapped")
            fd = self._reopen(node, os.O_RDWR if writable else os.O_RDONLY)
        try:
            yield fd
        finally:
            os.close(fd)

    # --- directories -------------------------------------------------------------------------
    def opendir(self, nodeid: int) -> int:
        with self._inode(nodeid) as node:
            if node.kind != stat.S_IFDIR:
                raise _err(errno.ENOTDIR)
            fd = self._reopen(node, os.O_RDONLY)
        return self._add_handle(fd, nodeid, is_dir=True)

    def readdir(self, fh: int, offset: int, size: int) -> list[DirEntry]:
        """The next entries of directory handle ``fh`` from ``offset`` on ("." and
        ".." included): one getdents64 of at most ``size`` bytes (at least one
        entry's worth), so a request never holds more than that.  ``offset`` is 0
        or the ``offset`` of an entry returned before: the host's d_off, so the
        listing resumes where the host file system says (entries added or removed
        meanwhile may or may not show up; the others come exactly once).  An empty
        list is the end of the directory."""
        check_offset(offset)
        size = min(max(size, DIRENT_BATCH_MIN), DIRENT_BATCH_MAX)
        with self._handle(fh, is_dir=True) as handle:
            buf = ctypes.create_string_buffer(size)
            with handle.lock:
                os.lseek(handle.fd, offset, os.SEEK_SET)
                n = self.host.getdents64(handle.fd, buf)
        entries = [DirEntry(name, ino, dtype, off) for name, ino, dtype, off
                   in parse_dirents(buf.raw[:n])]
        if handle.nodeid == FUSE_ROOT_ID:
            entries = self._hide_roots_parent(entries)
        return entries

    def _hide_roots_parent(self, entries: list[DirEntry]) -> list[DirEntry]:
        """At the root, ".." would show the inode number of a host directory outside
        the share: show the root's own, as the guest sees the root as its own parent."""
        root_ino = self._root_key[1]
        return [DirEntry(e.name, root_ino, e.type, e.offset) if e.name == b".." else e
                for e in entries]

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fsync(fh, datasync, is_dir=True)

    # --- file system -------------------------------------------------------------------------
    def statfs(self, nodeid: int) -> os.statvfs_result:
        with self._inode(nodeid) as node:
            return os.statvfs(node.fd)

    def syncfs(self, nodeid: int) -> None:
        """SYNCFS: sync the host file system holding ``nodeid`` (the share's root when
        the node is neither a regular file nor a directory)."""
        with self._inode(nodeid) as node:
            if node.kind in (stat.S_IFREG, stat.S_IFDIR):
                fd = self._reopen(node, os.O_RDONLY)
                try:
                    self.host.syncfs(fd)
                finally:
                    os.close(fd)
                return
        self.syncfs(FUSE_ROOT_ID)

    def access(self, caller: Caller, nodeid: int, mask: int) -> None:
        """ACCESS: may ``caller`` read/write/execute ``nodeid``?  (virtiofs mounts with
        default_permissions, so the guest kernel rarely asks.)  Checked against the
        mode bits with the caller's uid and primary gid; root may do anything but
        execute a file without any x bit."""
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise _err(errno.EINVAL, f"access mask {mask:#x}")
        with self._inode(nodeid) as node:
            st = os.fstat(node.fd)
        if mask == os.F_OK:
            return
        if mask & os.W_OK and self.readonly:
            raise _err(errno.EROFS)
        if caller.uid == 0:
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise _err(errno.EACCES)
            return
        if caller.uid == st.st_uid:
            allowed = (st.st_mode >> 6) & 7
        elif caller.gid == st.st_gid:
            allowed = (st.st_mode >> 3) & 7
        else:
            allowed = st.st_mode & 7
        if mask & ~allowed:
            raise _err(errno.EACCES)

    # --- extended attributes -------------------------------------------------------------
    @contextmanager
    def _xattr_target(self, nodeid: int, writing: bool) -> Iterator[int | str]:
        """What to pass to os.*xattr for ``nodeid``: a real fd for regular files and
        directories, else (symlinks, device nodes, FIFOs, sockets, which must not
        be opened) the magic link name with /proc/self/fd as this thread's cwd."""
        if writing:
            self._check_writable()
        with self._inode(nodeid) as node:
            if node.kind in (stat.S_IFREG, stat.S_IFDIR):
                fd = self._reopen(node, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    yield fd
                finally:
                    os.close(fd)
            else:
                with self._in_proc_fd_dir():
                    yield str(node.fd)

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        with self._xattr_target(nodeid, writing=False) as target:
            return os.getxattr(target, name)

    def listxattr(self, nodeid: int) -> list[bytes]:
        with self._xattr_target(nodeid, writing=False) as target:
            return [os.fsencode(n) for n in os.listxattr(target)]

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        with self._xattr_target(nodeid, writing=True) as target:
            os.setxattr(target, name, value, flags)

    def removexattr(self, nodeid: int, name: bytes) -> None:
        with self._xattr_target(nodeid, writing=True) as target:
            os.removexattr(target, name)

    # --- introspection (tests, debugging) -------------------------------------------------
    def lookup_count(self, nodeid: int) -> int:
        """How many lookups of ``nodeid`` the guest holds (0 = unknown node id)."""
        with self._lock:
            node = self._inodes.get(nodeid)
            return node.lookups if node is not None else 0

    def counts(self) -> tuple[int, int]:
        """(inodes, open handles) currently in the tables, the root included."""
        with self._lock:
            return len(self._inodes), len(self._handles)


class linux_dirent64(ctypes.LittleEndianStructure):
    """struct linux_dirent64 (getdents64(2)) without its name: d_name follows, NUL
    terminated, and d_reclen covers the whole record (8-byte aligned)."""

    _pack_ = 1
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_uint16), ("d_type", ctypes.c_uint8)]


assert ctypes.sizeof(linux_dirent64) == 19


def parse_dirents(data: bytes) -> Iterator[tuple[bytes, int, int, int]]:
    """(name, d_ino, d_type, d_off) of each struct linux_dirent64 in a getdents64
    buffer; a record that does not fit or has no NUL ends the walk."""
    pos, head = 0, ctypes.sizeof(linux_dirent64)
    while pos + head <= len(data):
        d = linux_dirent64.from_buffer_copy(data, pos)
        if d.d_reclen < head or pos + d.d_reclen > len(data):
            break
        end = data.find(b"\0", pos + head, pos + d.d_reclen)
        if end < 0:
            break
        yield data[pos + head:end], d.d_ino, d.d_type, d.d_off
        pos += d.d_reclen


__all__ = [
    "Caller", "DirEntry", "Entry", "HostCalls", "Passthrough", "SetAttr", "check_name",
    "check_offset", "CACHE_TIMEOUTS", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_WHITEOUT",
    "UTIME_NOW", "UTIME_OMIT",
]
