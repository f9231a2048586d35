"""A FUSE "guest kernel" for tests: builds requests, calls FuseServer.handle, parses replies.

``FuseClient`` speaks the wire format byte by byte, like the guest kernel's
fs/fuse would over a virtqueue, so the tests exercise exactly what the
transport hands the server: one request stream, one reply area.
``FakeDax`` stands in for the transport's DAX mapper.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import stat
from ctypes import sizeof
from dataclasses import dataclass, field

from pyvmm.virtiofsd import fuse_abi as abi
from pyvmm.virtiofsd.iovec import IoVec
from pyvmm.virtiofsd.server import FuseServer

IN = sizeof(abi.fuse_in_header)
OUT = sizeof(abi.fuse_out_header)
DEFAULT_REPLY = 8192
#: what Linux 6.1 offers in INIT (no DAX window)
LINUX_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_LOCKS | abi.FUSE_ATOMIC_O_TRUNC
               | abi.FUSE_EXPORT_SUPPORT | abi.FUSE_BIG_WRITES | abi.FUSE_DONT_MASK
               | abi.FUSE_SPLICE_WRITE | abi.FUSE_SPLICE_MOVE | abi.FUSE_SPLICE_READ
               | abi.FUSE_FLOCK_LOCKS | abi.FUSE_HAS_IOCTL_DIR | abi.FUSE_AUTO_INVAL_DATA
               | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_ASYNC_DIO
               | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_NO_OPEN_SUPPORT | abi.FUSE_PARALLEL_DIROPS
               | abi.FUSE_HANDLE_KILLPRIV | abi.FUSE_POSIX_ACL | abi.FUSE_ABORT_ERROR
               | abi.FUSE_MAX_PAGES | abi.FUSE_CACHE_SYMLINKS | abi.FUSE_NO_OPENDIR_SUPPORT
               | abi.FUSE_EXPLICIT_INVAL_DATA | abi.FUSE_HANDLE_KILLPRIV_V2
               | abi.FUSE_SETXATTR_EXT | abi.FUSE_INIT_EXT)
LINUX_FLAGS2 = (abi.FUSE_SECURITY_CTX | abi.FUSE_HAS_INODE_DAX) >> 32


class FuseError(OSError):
    """The server answered with -errno."""


@dataclass
class Raw:
    """One exchange: the used length, the out header and the reply payload."""

    used: int
    header: abi.fuse_out_header | None
    payload: bytes


def cstr(*names: bytes) -> bytes:
    return b"".join(n + b"\0" for n in names)


def in_header(opcode: int, length: int, *, nodeid: int = 1, unique: int = 7, uid: int = 0,
              gid: int = 0, pid: int = 1) -> bytes:
    return bytes(abi.fuse_in_header(len=length, opcode=opcode, unique=unique, nodeid=nodeid,
                                    uid=uid, gid=gid, pid=pid))


def request(opcode: int, args: bytes = b"", **kw) -> bytes:
    return in_header(opcode, IN + len(args), **kw) + args


class FuseClient:
    """Sends requests to a FuseServer the way the guest kernel would."""

    def __init__(self, server: FuseServer, *, uid: int = 0, gid: int = 0) -> None:
        self.server = server
        self.uid, self.gid = uid, gid
        self._uniques = itertools.count(2, 2)    # thread-safe: next() holds the GIL

    # --- raw exchange ---------------------------------------------------------------------
    def exchange(self, data: bytes, reply_size: int = DEFAULT_REPLY) -> Raw:
        reply = bytearray(reply_size)
        used = self.server.handle(IoVec.of(data), IoVec([memoryview(reply)]))
        assert 0 <= used <= reply_size
        if used == 0:
            return Raw(0, None, b"")
        header = abi.fuse_out_header.from_buffer_copy(reply)
        assert header.len == used, "out header len must equal the used length"
        return Raw(used, header, bytes(reply[OUT:used]))

    def call(self, opcode: int, args: bytes = b"", *, nodeid: int = 1,
             reply_size: int = DEFAULT_REPLY, uid: int | None = None,
             gid: int | None = None) -> bytes:
        """Send one request; its payload, or FuseError(-error)."""
        unique = next(self._uniques)
        data = request(opcode, args, nodeid=nodeid, unique=unique,
                       uid=self.uid if uid is None else uid, gid=self.gid if gid is None else gid)
        raw = self.exchange(data, reply_size)
        assert raw.header is not None, f"no reply to opcode {opcode}"
        assert raw.header.unique == unique
        if raw.header.error:
            assert raw.header.error < 0 and raw.used == OUT
            raise FuseError(-raw.header.error, os.strerror(-raw.header.error))
        return raw.payload

    def error_of(self, opcode: int, args: bytes = b"", **kw) -> int:
        """The errno a request fails with (0 = it succeeded)."""
        try:
            self.call(opcode, args, **kw)
        except FuseError as e:
            return e.errno
        return 0

    # --- session ----------------------------------------------------------------------------
    def init(self, flags: int = LINUX_FLAGS, flags2: int = LINUX_FLAGS2, minor: int = 37,
             max_readahead: int = 128 * 1024) -> abi.fuse_init_out:
        init = abi.fuse_init_in(major=7, minor=minor, max_readahead=max_readahead,
                                flags=flags, flags2=flags2)
        payload = self.call(abi.FUSE_INIT, bytes(init))
        assert len(payload) == sizeof(abi.fuse_init_out)
        return abi.fuse_init_out.from_buffer_copy(payload)

    def destroy(self) -> None:
        self.call(abi.FUSE_DESTROY)

    # --- names -----------------------------------------------------------------------------
    @staticmethod
    def _entry(payload: bytes) -> abi.fuse_entry_out:
        assert len(payload) == sizeof(abi.fuse_entry_out)
        return abi.fuse_entry_out.from_buffer_copy(payload)

    def lookup(self, name: bytes, parent: int = 1) -> abi.fuse_entry_out:
        return self._entry(self.call(abi.FUSE_LOOKUP, cstr(name), nodeid=parent))

    def forget(self, nodeid: int, nlookup: int = 1) -> int:
        data = request(abi.FUSE_FORGET, bytes(abi.fuse_forget_in(nlookup)), nodeid=nodeid)
        return self.server.handle(IoVec.of(data), IoVec())

    def batch_forget(self, pairs: list[tuple[int, int]]) -> int:
        args = bytes(abi.fuse_batch_forget_in(count=len(pairs)))
        args += b"".join(bytes(abi.fuse_forget_one(n, c)) for n, c in pairs)
        return self.server.handle(IoVec.of(request(abi.FUSE_BATCH_FORGET, args)), IoVec())

    def getattr(self, nodeid: int = 1) -> abi.fuse_attr:
        payload = self.call(abi.FUSE_GETATTR, bytes(abi.fuse_getattr_in()), nodeid=nodeid)
        assert len(payload) == sizeof(abi.fuse_attr_out)
        return abi.fuse_attr_out.from_buffer_copy(payload).attr

    def setattr(self, nodeid: int, **fields) -> abi.fuse_attr:
        payload = self.call(abi.FUSE_SETATTR, bytes(abi.fuse_setattr_in(**fields)), nodeid=nodeid)
        return abi.fuse_attr_out.from_buffer_copy(payload).attr

    def mkdir(self, name: bytes, mode: int = 0o755, umask: int = 0, parent: int = 1,
              **kw) -> abi.fuse_entry_out:
        args = bytes(abi.fuse_mkdir_in(mode=mode, umask=umask)) + cstr(name)
        return self._entry(self.call(abi.FUSE_MKDIR, args, nodeid=parent, **kw))

    def mknod(self, name: bytes, mode: int, rdev: int = 0, umask: int = 0, parent: int = 1,
              **kw) -> abi.fuse_entry_out:
        args = bytes(abi.fuse_mknod_in(mode=mode, rdev=rdev, umask=umask)) + cstr(name)
        return self._entry(self.call(abi.FUSE_MKNOD, args, nodeid=parent, **kw))

    def symlink(self, name: bytes, target: bytes, parent: int = 1, **kw) -> abi.fuse_entry_out:
        return self._entry(self.call(abi.FUSE_SYMLINK, cstr(name, target), nodeid=parent, **kw))

    def link(self, nodeid: int, name: bytes, parent: int = 1, **kw) -> abi.fuse_entry_out:
        args = bytes(abi.fuse_link_in(oldnodeid=nodeid)) + cstr(name)
        return self._entry(self.call(abi.FUSE_LINK, args, nodeid=parent, **kw))

    def readlink(self, nodeid: int) -> bytes:
        return self.call(abi.FUSE_READLINK, nodeid=nodeid)

    def unlink(self, name: bytes, parent: int = 1) -> None:
        self.call(abi.FUSE_UNLINK, cstr(name), nodeid=parent)

    def rmdir(self, name: bytes, parent: int = 1) -> None:
        self.call(abi.FUSE_RMDIR, cstr(name), nodeid=parent)

    def rename(self, old: bytes, new: bytes, parent: int = 1, newparent: int = 1) -> None:
        self.call(abi.FUSE_RENAME, bytes(abi.fuse_rename_in(newparent)) + cstr(old, new),
                  nodeid=parent)

    def rename2(self, old: bytes, new: bytes, flags: int, parent: int = 1,
                newparent: int = 1) -> None:
        args = bytes(abi.fuse_rename2_in(newdir=newparent, flags=flags)) + cstr(old, new)
        self.call(abi.FUSE_RENAME2, args, nodeid=parent)

    # --- files -------------------------------------------------------------------------------
    def open(self, nodeid: int, flags: int = os.O_RDONLY, open_flags: int = 0) -> abi.fuse_open_out:
        payload = self.call(abi.FUSE_OPEN, bytes(abi.fuse_open_in(flags, open_flags)),
                            nodeid=nodeid)
        assert len(payload) == sizeof(abi.fuse_open_out)
        return abi.fuse_open_out.from_buffer_copy(payload)

    def create(self, name: bytes, flags: int = os.O_RDWR, mode: int = stat.S_IFREG | 0o644,
               umask: int = 0, parent: int = 1, open_flags: int = 0,
               **kw) -> tuple[abi.fuse_entry_out, abi.fuse_open_out]:
        args = bytes(abi.fuse_create_in(flags=flags | os.O_CREAT, mode=mode, umask=umask,
                                        open_flags=open_flags)) + cstr(name)
        payload = self.call(abi.FUSE_CREATE, args, nodeid=parent, **kw)
        assert len(payload) == sizeof(abi.fuse_entry_out) + sizeof(abi.fuse_open_out)
        return (abi.fuse_entry_out.from_buffer_copy(payload),
                abi.fuse_open_out.from_buffer_copy(payload, sizeof(abi.fuse_entry_out)))

    def read(self, nodeid: int, fh: int, offset: int, size: int,
             reply_size: int | None = None) -> bytes:
        args = bytes(abi.fuse_read_in(fh=fh, offset=offset, size=size))
        return self.call(abi.FUSE_READ, args, nodeid=nodeid,
                         reply_size=reply_size if reply_size is not None else OUT + size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, write_flags: int = 0) -> int:
        args = bytes(abi.fuse_write_in(fh=fh, offset=offset, size=len(data),
                                       write_flags=write_flags)) + data
        payload = self.call(abi.FUSE_WRITE, args, nodeid=nodeid)
        return abi.fuse_write_out.from_buffer_copy(payload).size

    def release(self, nodeid: int, fh: int, opcode: int = abi.FUSE_RELEASE) -> None:
        self.call(opcode, bytes(abi.fuse_release_in(fh=fh)), nodeid=nodeid)

    def flush(self, nodeid: int, fh: int) -> None:
        self.call(abi.FUSE_FLUSH, bytes(abi.fuse_flush_in(fh=fh)), nodeid=nodeid)

    def fsync(self, nodeid: int, fh: int, flags: int = 0, opcode: int = abi.FUSE_FSYNC) -> None:
        self.call(opcode, bytes(abi.fuse_fsync_in(fh=fh, fsync_flags=flags)), nodeid=nodeid)

    # --- directories ------------------------------------------------------------------------
    def opendir(self, nodeid: int = 1) -> int:
        payload = self.call(abi.FUSE_OPENDIR, bytes(abi.fuse_open_in()), nodeid=nodeid)
        return abi.fuse_open_out.from_buffer_copy(payload).fh

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096,
                plus: bool = False) -> list[DirEnt]:
        args = bytes(abi.fuse_read_in(fh=fh, offset=offset, size=size))
        payload = self.call(abi.FUSE_READDIRPLUS if plus else abi.FUSE_READDIR, args,
                            nodeid=nodeid, reply_size=OUT + size)
        return parse_dirents(payload, plus)

    def list_all(self, nodeid: int = 1, plus: bool = False, size: int = 4096) -> list[DirEnt]:
        fh = self.opendir(nodeid)
        out: list[DirEnt] = []
        offset = 0
        while True:
            page = self.readdir(nodeid, fh, offset, size, plus)
            if not page:
                break
            out += page
            offset = page[-1].off
        self.release(nodeid, fh, abi.FUSE_RELEASEDIR)
        return out


@dataclass
class DirEnt:
    name: bytes
    ino: int
    off: int
    type: int
    entry: abi.fuse_entry_out | None = None


def parse_dirents(payload: bytes, plus: bool) -> list[DirEnt]:
    """Parse a READDIR / READDIRPLUS reply the way the kernel's parse_dirfile does."""
    out, pos = [], 0
    fixed = abi.FUSE_NAME_OFFSET_DIRENTPLUS if plus else abi.FUSE_NAME_OFFSET
    while pos < len(payload):
        assert pos + fixed <= len(payload)
        entry = abi.fuse_entry_out.from_buffer_copy(payload, pos) if plus else None
        d = abi.fuse_dirent.from_buffer_copy(payload, pos + fixed - abi.FUSE_NAME_OFFSET)
        assert 0 < d.namelen <= 255
        name = payload[pos + fixed:pos + fixed + d.namelen]
        assert b"/" not in name and len(name) == d.namelen
        size = abi.FUSE_DIRENT_ALIGN(fixed + d.namelen)
        assert payload[pos + fixed + d.namelen:pos + size] == b"\0" * (size - fixed - d.namelen)
        out.append(DirEnt(name, d.ino, d.off, d.type, entry))
        pos += size
    assert pos == len(payload)
    return out


@dataclass
class FakeDax:
    """A DaxMapper that remembers what it was asked (and can be told to fail)."""

    map_alignment: int = 21
    fail: OSError | None = None
    mapped: list[tuple] = field(default_factory=list)
    removed: list[list[tuple[int, int]]] = field(default_factory=list)

    def setup_mapping(self, fd: int, fd_offset: int, window_offset: int, length: int,
                      writable: bool) -> None:
        if self.fail is not None:
            raise self.fail
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.mapped.append((st.st_ino, fd_offset, window_offset, length, writable,
                            flags & os.O_ACCMODE))

    def remove_mapping(self, ranges) -> None:
        if self.fail is not None:
            raise self.fail
        self.removed.append(list(ranges))


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}

