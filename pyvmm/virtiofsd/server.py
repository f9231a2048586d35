"""FUSE request dispatch for virtio-fs: one descriptor chain in, one reply out.

There is no /dev/fuse here.  The transport (``vhost``) pops a descriptor chain
from a virtqueue and hands ``FuseServer.handle`` two byte streams:

* ``request``: the device-readable part, ``fuse_in_header`` (40 bytes) then the
  opcode's arguments (and, for WRITE, the data);
* ``reply``: the device-writable part, room for ``fuse_out_header`` (16 bytes)
  then the opcode's reply.

``handle`` returns how many reply bytes it wrote: the *used length* the
transport puts in the used ring.  FORGET and BATCH_FORGET (sent on the hiprio
queue without any writable part) get no reply at all: used length 0.

Everything in a request comes from the guest and is checked before use: the
header's ``len`` against the bytes really present, each argument structure
against the remaining length, every name for its NUL, counts against the room
they claim.  A request that fails a check gets ``-EINVAL`` (or nothing, when
not even its header is readable or there is no room for a reply); a failing
host call gets ``-errno`` with the host's errno.  ``handle`` never raises.

The life of a connection: the guest's first request is INIT (anything else
before it gets ``-EIO``); DESTROY at unmount releases every handle and inode
and waits for the next INIT.  See docs/vhost-user-dax.md sections 4-5.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from ctypes import sizeof
from typing import Callable, Iterator, NamedTuple, TypeVar

from . import fuse_abi as abi
from .dax_mapper import DaxMapper
from .iovec import IoVec
from .passthrough import UTIME_NOW, Caller, DirEntry, Entry, Passthrough, SetAttr

log = logging.getLogger(__name__)

IN_HEADER_SIZE = sizeof(abi.fuse_in_header)     # 40
OUT_HEADER_SIZE = sizeof(abi.fuse_out_header)   # 16

#: The oldest protocol minor this server talks (7.12: every structure it parses has
#: its current size from then on; virtio-fs itself arrived with 7.31).
MIN_MINOR_VERSION = 12
#: Largest WRITE payload we accept, and the page count the kernel may put in one request.
MAX_WRITE = 1 << 20
MAX_PAGES = 256
#: What the kernel assumes when FUSE_MAX_PAGES was not agreed (fs/fuse/fuse_i.h
#: FUSE_DEFAULT_MAX_PAGES_PER_REQ), and the guest's page size (x86-64).
DEFAULT_MAX_PAGES = 32
GUEST_PAGE_SIZE = 4096
#: fuse_out_header.len is a u32: no reply may be longer.
MAX_REPLY_LEN = 0xFFFFFFFF
#: Arguments (everything after the header) larger than this are refused, so a guest
#: cannot make us copy a huge buffer into Python; the largest legitimate one is a
#: SETXATTR with a 64 KiB value.  WRITE data is not copied and not limited by this.
MAX_ARGS_SIZE = 256 * 1024

#: INIT flags this server acts on; the reply carries those of them the kernel offered.
#: FUSE_MAP_ALIGNMENT is added when a DAX mapper exists.  Left out on purpose: lock
#: flags (no GETLK/SETLK), WRITEBACK_CACHE (needs O_APPEND and size handling here),
#: POSIX_ACL, SETXATTR_EXT and SECURITY_CTX (extra payloads we do not parse),
#: EXPORT_SUPPORT, SUBMOUNTS, and flags2 altogether (FUSE_HAS_INODE_DAX would need
#: FUSE_ATTR_DAX in attributes).
SUPPORTED_INIT_FLAGS = (
    abi.FUSE_ASYNC_READ            # several READs of one file may be in flight
    | abi.FUSE_ATOMIC_O_TRUNC      # OPEN passes O_TRUNC on (no separate SETATTR)
    | abi.FUSE_BIG_WRITES          # WRITE up to max_write, not 4 KiB
    | abi.FUSE_DO_READDIRPLUS      # READDIRPLUS is implemented ...
    | abi.FUSE_READDIRPLUS_AUTO    # ... and the kernel may switch between it and READDIR
    | abi.FUSE_PARALLEL_DIROPS     # concurrent LOOKUP/READDIR in one directory are fine
    | abi.FUSE_MAX_PAGES           # fuse_init_out.max_pages is filled in
    | abi.FUSE_HANDLE_KILLPRIV_V2  # we clear set-id bits when WRITE/SETATTR/OPEN ask
)

NO_REPLY_OPCODES = frozenset({abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET})

_U64_MAX = (1 << 64) - 1

S = TypeVar("S", bound=ctypes.Structure)


def _op_name(opcode: int) -> str:
    return abi.OPCODE_NAMES.get(opcode, f"opcode {opcode}")


def _invalid(what: str) -> OSError:
    return OSError(errno.EINVAL, f"malformed request: {what}")


# --- parsing helpers ------------------------------------------------------------------------
def parse_struct(data: bytes, cls: type[S], offset: int = 0) -> S:
    """``cls`` read from ``data`` at ``offset``; EINVAL when the bytes are not all there."""
    if offset < 0 or len(data) < offset + sizeof(cls):
        raise _invalid(f"{cls.__name__} needs {sizeof(cls)} bytes at {offset}, "
                       f"{max(0, len(data) - offset)} present")
    return cls.from_buffer_copy(data, offset)


def parse_prefix(data: bytes, cls: type[S], size: int) -> S:
    """``cls`` from at least its first ``size`` bytes (an older, shorter layout of
    the same structure); the fields beyond what ``data`` holds read as zero."""
    if len(data) < size:
        raise _invalid(f"{cls.__name__} needs {size} bytes, {len(data)} present")
    return cls.from_buffer_copy(data[:sizeof(cls)].ljust(sizeof(cls), b"\0"))


def parse_names(data: bytes, count: int, offset: int = 0) -> tuple[list[bytes], int]:
    """``count`` NUL-terminated strings from ``offset``; returns them and the offset
    just after the last NUL.  EINVAL when a NUL is missing."""
    names = []
    for _ in range(count):
        end = data.find(b"\0", offset)
        if end < 0:
            raise _invalid("string without its terminating NUL")
        names.append(data[offset:end])
        offset = end + 1
    return names, offset


def encode_dev(rdev: int) -> int:
    """Host dev_t -> the kernel's 32-bit ``new_encode_dev`` form used in fuse_attr.rdev
    and fuse_mknod_in.rdev (minor low byte, 12-bit major, minor high bits)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(dev: int) -> int:
    """The inverse of ``encode_dev`` (``new_decode_dev``): 32-bit form -> host dev_t."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int(round((seconds - whole) * 1e9))


def _time_pair(ns: int) -> tuple[int, int]:
    """Nanoseconds since the epoch -> (seconds, nsec) as fuse_attr stores them: the
    seconds are two's complement u64 (times before 1970), nsec always 0..999999999."""
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & _U64_MAX, nsec


def attr_from_stat(st: os.stat_result) -> abi.fuse_attr:
    """A host stat as fuse_attr."""
    attr = abi.fuse_attr()
    attr.ino, attr.size, attr.blocks = st.st_ino, st.st_size, st.st_blocks
    attr.atime, attr.atimensec = _time_pair(st.st_atime_ns)
    attr.mtime, attr.mtimensec = _time_pair(st.st_mtime_ns)
    attr.ctime, attr.ctimensec = _time_pair(st.st_ctime_ns)
    attr.mode, attr.nlink = st.st_mode, min(st.st_nlink, 0xFFFFFFFF)
    attr.uid, attr.gid = st.st_uid, st.st_gid
    attr.rdev = encode_dev(st.st_rdev)
    attr.blksize = st.st_blksize
    return attr


# --- requests and replies ---------------------------------------------------------------
class Request:
    """One parsed request: the header, its argument bytes and the raw stream.

    ``args`` holds the bytes after the header up to ``header.len`` (for WRITE only
    the fuse_write_in: the data stays in guest memory, reachable through ``raw``).
    """

    __slots__ = ("header", "args", "raw")

    def __init__(self, header: abi.fuse_in_header, args: bytes, raw: IoVec) -> None:
        self.header = header
        self.args = args
        self.raw = raw

    @property
    def nodeid(self) -> int:
        return self.header.nodeid

    @property
    def caller(self) -> Caller:
        return Caller(self.header.uid, self.header.gid, self.header.pid)


class Reply(NamedTuple):
    """What a handler produced.

    ``payload`` goes right after the out header.  ``data_len`` counts bytes the
    handler already placed there itself (READ).  ``undo`` reverses what the reply
    would hand over (lookup counts, a new file handle) when it cannot be delivered.
    """

    payload: bytes = b""
    data_len: int = 0
    undo: Callable[[], None] | None = None


class Session(NamedTuple):
    """What INIT agreed on.

    ``max_pages`` bounds every buffer the guest hands us: READ, READDIR(PLUS),
    GETXATTR and LISTXATTR sizes are capped at ``max_read`` bytes, WRITE is refused
    beyond ``max_write``, whatever the request or its descriptors claim."""

    minor: int
    flags: int
    max_pages: int = DEFAULT_MAX_PAGES
    max_write: int = MAX_WRITE

    @property
    def max_read(self) -> int:
        return self.max_pages * GUEST_PAGE_SIZE


Handler = Callable[[Request, IoVec], "Reply | None"]


class FuseServer:
    """Serves FUSE requests against a ``Passthrough`` (and a DAX mapper, if any).

    Thread-safe: any number of threads may call ``handle`` at once.
    """

    def __init__(self, fs: Passthrough, *, dax: DaxMapper | None = None) -> None:
        self.fs = fs
        self.dax = dax
        self._lock = threading.Lock()
        self._session: Session | None = None
        self._handlers: dict[int, Handler] = {
            abi.FUSE_INIT: self._init, abi.FUSE_DESTROY: self._destroy,
            abi.FUSE_LOOKUP: self._lookup, abi.FUSE_GETATTR: self._getattr,
            abi.FUSE_SETATTR: self._setattr, abi.FUSE_READLINK: self._readlink,
            abi.FUSE_SYMLINK: self._symlink, abi.FUSE_MKNOD: self._mknod,
            abi.FUSE_MKDIR: self._mkdir, abi.FUSE_UNLINK: self._unlink,
            abi.FUSE_RMDIR: self._rmdir, abi.FUSE_RENAME: self._rename,
            abi.FUSE_RENAME2: self._rename2, abi.FUSE_LINK: self._link,
            abi.FUSE_OPEN: self._open, abi.FUSE_CREATE: self._create,
            abi.FUSE_READ: self._read, abi.FUSE_WRITE: self._write,
            abi.FUSE_STATFS: self._statfs, abi.FUSE_RELEASE: self._release,
            abi.FUSE_RELEASEDIR: self._release, abi.FUSE_FLUSH: self._flush,
            abi.FUSE_FSYNC: self._fsync, abi.FUSE_FSYNCDIR: self._fsyncdir,
            abi.FUSE_OPENDIR: self._opendir, abi.FUSE_READDIR: self._readdir,
            abi.FUSE_READDIRPLUS: self._readdirplus, abi.FUSE_ACCESS: self._access,
            abi.FUSE_SETXATTR: self._setxattr, abi.FUSE_GETXATTR: self._getxattr,
            abi.FUSE_LISTXATTR: self._listxattr, abi.FUSE_REMOVEXATTR: self._removexattr,
            abi.FUSE_LSEEK: self._lseek, abi.FUSE_FALLOCATE: self._fallocate,
            abi.FUSE_COPY_FILE_RANGE: self._copy_file_range,
            abi.FUSE_SETUPMAPPING: self._setupmapping,
            abi.FUSE_REMOVEMAPPING: self._removemapping, abi.FUSE_SYNCFS: self._syncfs,
        }

    @property
    def session(self) -> Session | None:
        """The agreed INIT parameters, None before INIT / after DESTROY."""
        return self._session

    def destroy(self) -> None:
        """The connection is gone (device reset, front-end disconnect): release every
        handle and inode but the root; the next request must be INIT again."""
        with self._lock:
            self._session = None
            self.fs.reset()

    # --- the entry point ---------------------------------------------------------------------
    def handle(self, request: IoVec, reply: IoVec) -> int:
        """Serve one request; returns the number of reply bytes written (used length)."""
        try:
            return self._handle(request, reply)
        except Exception:   # a bug of ours: never let it reach the transport
            log.exception("unexpected failure serving a FUSE request")
            return self.fail(request, reply)

    def fail(self, request: IoVec, reply: IoVec) -> int:
        """Answer ``request`` with -EIO if its header is readable and the reply has
        room (else used length 0); what the transport calls when serving a request
        went wrong in a way ``handle`` could not answer itself.  Never raises."""
        try:
            header = self._read_header(request)
            if header is None or header.opcode in NO_REPLY_OPCODES:
                return 0
            return self._send_error(reply, header.unique, errno.EIO)
        except Exception:
            log.exception("cannot even fail a FUSE request")
            return 0

    def _handle(self, request: IoVec, reply: IoVec) -> int:
        header = self._read_header(request)
        if header is None:
            return 0
        opcode, unique = header.opcode, header.unique
        if opcode in NO_REPLY_OPCODES:
            self._forget(header, request)
            return 0
        if header.len < IN_HEADER_SIZE or header.len > len(request):
            log.warning("request %#x: header len %d, %d bytes present", unique, header.len,
                        len(request))
            return self._send_error(reply, unique, errno.EINVAL)
        if self._session is None and opcode != abi.FUSE_INIT:
            log.debug("request %#x (%s) before INIT", unique, _op_name(opcode))
            return self._send_error(reply, unique, errno.EIO)
        handler = self._handlers.get(opcode)
        if handler is None:
            log.debug("unsupported opcode %d", opcode)
            return self._send_error(reply, unique, errno.ENOSYS)
        return self._dispatch(handler, header, request, reply)

    def _dispatch(self, handler: Handler, header: abi.fuse_in_header, request: IoVec,
                  reply: IoVec) -> int:
        """Run ``handler``; a failure becomes an error reply with the host's errno
        (EINVAL for a value no system call would take, EIO for a bug of ours)."""
        opcode, unique = header.opcode, header.unique
        try:
            result = handler(self._request(header, request), reply)
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) and 0 < e.errno < 512 else errno.EIO
            log.debug("%s %#x nodeid %d: %s", _op_name(opcode), unique, header.nodeid, e)
            return self._send_error(reply, unique, code)
        except (ValueError, OverflowError) as e:
            log.warning("%s %#x: bad value: %s", _op_name(opcode), unique, e)
            return self._send_error(reply, unique, errno.EINVAL)
        except Exception:
            log.exception("%s %#x failed", _op_name(opcode), unique)
            return self._send_error(reply, unique, errno.EIO)
        return self._send(reply, unique, result or Reply())

    @staticmethod
    def _read_header(request: IoVec) -> abi.fuse_in_header | None:
        try:
            raw = request.read(0, IN_HEADER_SIZE)
        except OSError as e:     # the header lies outside guest RAM
            log.warning("unreadable FUSE request header: %s", e)
            return None
        if len(raw) < IN_HEADER_SIZE:
            log.warning("FUSE request of %d bytes: shorter than its header", len(raw))
            return None
        return abi.fuse_in_header.from_buffer_copy(raw)

    @staticmethod
    def _request(header: abi.fuse_in_header, request: IoVec) -> Request:
        """Read the argument bytes (EINVAL when there are too many to copy)."""
        size = header.len - IN_HEADER_SIZE
        if header.opcode == abi.FUSE_WRITE:
            size = min(size, sizeof(abi.fuse_write_in))
        if size > MAX_ARGS_SIZE:
            raise _invalid(f"{size} argument bytes")
        return Request(header, request.read(IN_HEADER_SIZE, size), request)

    @staticmethod
    def _send_error(reply: IoVec, unique: int, code: int) -> int:
        return FuseServer._write_reply(reply, unique, -code, b"", 0)

    def _send(self, reply: IoVec, unique: int, result: Reply) -> int:
        """Write header + payload; undo what the reply hands over if it cannot go out."""
        if len(reply) < OUT_HEADER_SIZE + len(result.payload) + result.data_len:
            log.warning("request %#x: %d reply bytes needed, room for %d", unique,
                        OUT_HEADER_SIZE + len(result.payload) + result.data_len, len(reply))
            self._undo(result)
            return self._send_error(reply, unique, errno.EINVAL)
        written = self._write_reply(reply, unique, 0, result.payload, result.data_len)
        if written == 0:
            self._undo(result)
        return written

    @staticmethod
    def _undo(result: Reply) -> None:
        if result.undo is not None:
            result.undo()

    @staticmethod
    def _write_reply(reply: IoVec, unique: int, error: int, payload: bytes, data_len: int) -> int:
        total = OUT_HEADER_SIZE + len(payload) + data_len
        if len(reply) < OUT_HEADER_SIZE:
            log.warning("request %#x: no room for a reply", unique)
            return 0
        if total > MAX_REPLY_LEN and not error:   # the caps make this impossible
            log.error("request %#x: reply of %d bytes does not fit fuse_out_header.len",
                      unique, total)
            error = -errno.EIO
        if error:
            total = OUT_HEADER_SIZE
        out = abi.fuse_out_header(len=total, error=error, unique=unique)
        try:
            if payload and not error:
                reply.write(OUT_HEADER_SIZE, payload)
            reply.write(0, bytes(out))
        except OSError as e:
            log.warning("request %#x: reply not writable: %s", unique, e)
            return 0
        return total

    # --- INIT / DESTROY / FORGET ---------------------------------------------------------------
    def _init(self, req: Request, reply: IoVec) -> Reply:
        """INIT: agree on the protocol minor and the flags both sides handle.

        Older kernels send a 16-byte fuse_init_in; flags2 counts only when the kernel
        set FUSE_INIT_EXT.  We never set bits of flags2 (nor FUSE_INIT_EXT) in the
        reply.  An INIT on a live session starts a new one (the guest rebooted
        without DESTROY).
        """
        init = parse_prefix(req.args, abi.fuse_init_in, 16)
        out = abi.fuse_init_out(major=abi.FUSE_KERNEL_VERSION,
                                minor=abi.SUPPORTED_MINOR_VERSION)
        if init.major > abi.FUSE_KERNEL_VERSION:   # the kernel retries with our major
            return Reply(bytes(out))
        if init.major < abi.FUSE_KERNEL_VERSION or init.minor < MIN_MINOR_VERSION:
            raise OSError(errno.EPROTO, f"FUSE {init.major}.{init.minor} is too old")
        offered = init.flags
        if init.flags & abi.FUSE_INIT_EXT:
            offered |= init.flags2 << 32
        wanted = SUPPORTED_INIT_FLAGS | (abi.FUSE_MAP_ALIGNMENT if self.dax is not None else 0)
        flags = offered & wanted
        out.minor = min(init.minor, abi.SUPPORTED_MINOR_VERSION)
        out.max_readahead = init.max_readahead
        out.flags = flags & 0xFFFFFFFF
        out.max_write = MAX_WRITE
        out.time_gran = 1
        max_pages = DEFAULT_MAX_PAGES
        if flags & abi.FUSE_MAX_PAGES:
            out.max_pages = max_pages = MAX_PAGES
        if flags & abi.FUSE_MAP_ALIGNMENT:
            out.map_alignment = self.dax.map_alignment
        with self._lock:
            if self._session is not None:
                log.warning("INIT on a live session: releasing the old one")
                self.fs.reset()
            self._session = Session(out.minor, flags, max_pages, MAX_WRITE)
        log.info("FUSE %d.%d session: flags %#x%s", out.major, out.minor, flags,
                 f", DAX alignment 2^{out.map_alignment}" if flags & abi.FUSE_MAP_ALIGNMENT else "")
        size = (abi.FUSE_COMPAT_INIT_OUT_SIZE if init.minor < 5 else
                abi.FUSE_COMPAT_22_INIT_OUT_SIZE if init.minor < 23 else sizeof(out))
        return Reply(bytes(out)[:size])

    def _destroy(self, req: Request, reply: IoVec) -> None:
        """DESTROY (unmount): drop everything; the next INIT starts afresh."""
        self.destroy()

    def _forget(self, header: abi.fuse_in_header, request: IoVec) -> None:
        """FORGET / BATCH_FORGET: lookup counts go down; never a reply, even to a
        malformed request (it is logged and ignored)."""
        if self._session is None:
            return
        if header.len < IN_HEADER_SIZE or header.len > len(request):
            log.warning("forget %#x: header len %d, %d bytes present", header.unique,
                        header.len, len(request))
            return
        try:
            if header.opcode == abi.FUSE_FORGET:
                args = request.read(IN_HEADER_SIZE, min(header.len - IN_HEADER_SIZE, 8))
                self.fs.forget(header.nodeid, parse_struct(args, abi.fuse_forget_in).nlookup)
            else:
                for nodeid, nlookup in self._batch_forget_entries(header, request):
                    self.fs.forget(nodeid, nlookup)
        except OSError as e:
            log.warning("forget %#x ignored: %s", header.unique, e)

    @staticmethod
    def _batch_forget_entries(header: abi.fuse_in_header,
                              request: IoVec) -> list[tuple[int, int]]:
        available = header.len - IN_HEADER_SIZE
        head = parse_struct(request.read(IN_HEADER_SIZE, min(available, 8)),
                            abi.fuse_batch_forget_in)
        size = sizeof(abi.fuse_forget_one)
        if 8 + head.count * size > min(available, MAX_ARGS_SIZE):
            raise _invalid(f"batch forget of {head.count} entries in {available} bytes")
        data = request.read(IN_HEADER_SIZE + 8, head.count * size)
        ones = [abi.fuse_forget_one.from_buffer_copy(data, i * size) for i in range(head.count)]
        return [(one.nodeid, one.nlookup) for one in ones]

    # --- entries and attributes -----------------------------------------------------------
    def _entry_out(self, entry: Entry | None) -> abi.fuse_entry_out:
        """An entry reply; ``None`` = the all-zero entry READDIRPLUS uses for "." and ".."."""
        out = abi.fuse_entry_out()
        if entry is None:
            return out
        sec, nsec = _split_seconds(self.fs.timeout)
        out.nodeid = entry.nodeid
        out.entry_valid = out.attr_valid = sec
        out.entry_valid_nsec = out.attr_valid_nsec = nsec
        out.attr = attr_from_stat(entry.stat)
        return out

    def _entry_reply(self, entry: Entry) -> Reply:
        return Reply(bytes(self._entry_out(entry)), undo=lambda: self.fs.forget(entry.nodeid, 1))

    def _attr_reply(self, st: os.stat_result) -> Reply:
        sec, nsec = _split_seconds(self.fs.timeout)
        out = abi.fuse_attr_out(attr_valid=sec, attr_valid_nsec=nsec, attr=attr_from_stat(st))
        return Reply(bytes(out))

    def _limits(self) -> Session:
        """The session's size limits (the defaults if DESTROY raced this request)."""
        return self._session or Session(abi.SUPPORTED_MINOR_VERSION, 0)

    def _reply_room(self, size: int, reply: IoVec) -> int:
        """A data size the guest asked for, capped at the room after the out header
        and at max_read (descriptors may claim more than any reply can be)."""
        return max(0, min(size, len(reply) - OUT_HEADER_SIZE, self._limits().max_read))

    def _lookup(self, req: Request, reply: IoVec) -> Reply:
        (name,), _ = parse_names(req.args, 1)
        return self._entry_reply(self.fs.lookup(req.nodeid, name))

    def _getattr(self, req: Request, reply: IoVec) -> Reply:
        # fuse_getattr_in may name a handle (FUSE_GETATTR_FH); the inode's O_PATH fd
        # gives the same answer, so the handle is not needed.
        return self._attr_reply(self.fs.getattr(req.nodeid))

    def _setattr(self, req: Request, reply: IoVec) -> Reply:
        return self._attr_reply(self.fs.setattr(req.nodeid, self._setattr_change(req.args)))

    @staticmethod
    def _setattr_change(args: bytes) -> SetAttr:
        """fuse_setattr_in -> SetAttr (unknown ``valid`` bits and FATTR_CTIME, which no
        system call can set, are ignored; FATTR_LOCKOWNER needs nothing)."""
        s = parse_struct(args, abi.fuse_setattr_in)
        valid = s.valid

        def when(flag: int, now_flag: int, sec: int, nsec: int) -> tuple[int, int] | None:
            if valid & now_flag:
                return (0, UTIME_NOW)
            if valid & flag:
                if nsec >= 1_000_000_000:
                    raise _invalid(f"nanoseconds {nsec}")
                return (sec - (1 << 64) if sec >= 1 << 63 else sec, nsec)
            return None

        return SetAttr(
            mode=s.mode if valid & abi.FATTR_MODE else None,
            uid=s.uid if valid & abi.FATTR_UID else None,
            gid=s.gid if valid & abi.FATTR_GID else None,
            size=s.size if valid & abi.FATTR_SIZE else None,
            atime=when(abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, s.atime, s.atimensec),
            mtime=when(abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, s.mtime, s.mtimensec),
            fh=s.fh if valid & abi.FATTR_FH else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID))

    def _readlink(self, req: Request, reply: IoVec) -> Reply:
        return Reply(self.fs.readlink(req.nodeid))

    # --- creating and removing names --------------------------------------------------
    def _symlink(self, req: Request, reply: IoVec) -> Reply:
        (name, target), _ = parse_names(req.args, 2)
        return self._entry_reply(self.fs.symlink(req.caller, req.nodeid, name, target))

    def _mknod(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_mknod_in)
        (name,), _ = parse_names(req.args, 1, sizeof(m))
        entry = self.fs.mknod(req.caller, req.nodeid, name, m.mode, decode_dev(m.rdev), m.umask)
        return self._entry_reply(entry)

    def _mkdir(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_mkdir_in)
        (name,), _ = parse_names(req.args, 1, sizeof(m))
        return self._entry_reply(self.fs.mkdir(req.caller, req.nodeid, name, m.mode, m.umask))

    def _link(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_link_in)
        (name,), _ = parse_names(req.args, 1, sizeof(m))
        return self._entry_reply(self.fs.link(req.caller, m.oldnodeid, req.nodeid, name))

    def _unlink(self, req: Request, reply: IoVec) -> None:
        (name,), _ = parse_names(req.args, 1)
        self.fs.unlink(req.nodeid, name)

    def _rmdir(self, req: Request, reply: IoVec) -> None:
        (name,), _ = parse_names(req.args, 1)
        self.fs.rmdir(req.nodeid, name)

    def _rename(self, req: Request, reply: IoVec) -> None:
        m = parse_struct(req.args, abi.fuse_rename_in)
        (old, new), _ = parse_names(req.args, 2, sizeof(m))
        self.fs.rename(req.nodeid, old, m.newdir, new)

    def _rename2(self, req: Request, reply: IoVec) -> None:
        m = parse_struct(req.args, abi.fuse_rename2_in)
        (old, new), _ = parse_names(req.args, 2, sizeof(m))
        self.fs.rename(req.nodeid, old, m.newdir, new, m.flags)

    # --- files --------------------------------------------------------------------------
    def _open_out(self, fh: int) -> abi.fuse_open_out:
        return abi.fuse_open_out(fh=fh, open_flags=self.fs.open_flags)

    def _open(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_open_in)
        fh = self.fs.open(req.nodeid, m.flags,
                          kill_suidgid=bool(m.open_flags & abi.FUSE_OPEN_KILL_SUIDGID))
        return Reply(bytes(self._open_out(fh)), undo=lambda: self.fs.release(fh))

    def _create(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_create_in)
        (name,), _ = parse_names(req.args, 1, sizeof(m))
        entry, fh = self.fs.create(req.caller, req.nodeid, name, m.flags, m.mode, m.umask,
                                   kill_suidgid=bool(m.open_flags & abi.FUSE_OPEN_KILL_SUIDGID))

        def undo() -> None:
            self.fs.release(fh)
            self.fs.forget(entry.nodeid, 1)

        return Reply(bytes(self._entry_out(entry)) + bytes(self._open_out(fh)), undo=undo)

    def _read(self, req: Request, reply: IoVec) -> Reply:
        """READ: file bytes go straight from the host file into the guest's buffer
        (``preadv``, or the DAX resolver for a buffer inside the window)."""
        m = parse_struct(req.args, abi.fuse_read_in)
        if len(reply) < OUT_HEADER_SIZE:
            raise _invalid("no room for the reply header")
        size = self._reply_room(m.size, reply)
        return Reply(data_len=self.fs.read(m.fh, m.offset, size, reply, OUT_HEADER_SIZE))

    def _write(self, req: Request, reply: IoVec) -> Reply:
        """WRITE: the data follows fuse_write_in (request bytes 80..) and goes from
        guest memory to the file without a copy through Python."""
        m = parse_struct(req.args, abi.fuse_write_in)
        data_offset = IN_HEADER_SIZE + sizeof(m)
        if m.size > self._limits().max_write:
            raise _invalid(f"WRITE of {m.size} bytes, max_write is {self._limits().max_write}")
        if data_offset + m.size > req.header.len:
            raise _invalid(f"WRITE of {m.size} bytes carries {req.header.len - data_offset}")
        n = self.fs.write(m.fh, m.offset, m.size, req.raw, data_offset,
                          kill_suidgid=bool(m.write_flags & abi.FUSE_WRITE_KILL_SUIDGID))
        return Reply(bytes(abi.fuse_write_out(size=n)))

    def _release(self, req: Request, reply: IoVec) -> None:
        """RELEASE / RELEASEDIR: closing the host fd also does what
        FUSE_RELEASE_FLUSH asks for."""
        self.fs.release(parse_struct(req.args, abi.fuse_release_in).fh)

    def _flush(self, req: Request, reply: IoVec) -> None:
        self.fs.flush(parse_struct(req.args, abi.fuse_flush_in).fh)

    def _fsync(self, req: Request, reply: IoVec) -> None:
        m = parse_struct(req.args, abi.fuse_fsync_in)
        self.fs.fsync(m.fh, bool(m.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))

    def _lseek(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_lseek_in)
        return Reply(bytes(abi.fuse_lseek_out(offset=self.fs.lseek(m.fh, m.offset, m.whence))))

    def _fallocate(self, req: Request, reply: IoVec) -> None:
        m = parse_struct(req.args, abi.fuse_fallocate_in)
        self.fs.fallocate(m.fh, m.mode, m.offset, m.length)

    def _copy_file_range(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_copy_file_range_in)
        n = self.fs.copy_file_range(m.fh_in, m.off_in, m.fh_out, m.off_out, m.len, m.flags)
        return Reply(bytes(abi.fuse_write_out(size=n)))

    # --- directories --------------------------------------------------------------------
    def _opendir(self, req: Request, reply: IoVec) -> Reply:
        parse_struct(req.args, abi.fuse_open_in)   # flags: a directory is opened O_RDONLY
        fh = self.fs.opendir(req.nodeid)
        return Reply(bytes(abi.fuse_open_out(fh=fh)), undo=lambda: self.fs.release(fh))

    def _fsyncdir(self, req: Request, reply: IoVec) -> None:
        m = parse_struct(req.args, abi.fuse_fsync_in)
        self.fs.fsyncdir(m.fh, bool(m.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))

    def _dir_entries(self, fh: int, offset: int, room: int) -> Iterator[DirEntry]:
        """The directory's entries from ``offset`` on, read a batch of about ``room``
        bytes at a time, for as long as the caller takes them (it stops when its
        reply is full, so nothing beyond one batch is read ahead)."""
        while True:
            batch = self.fs.readdir(fh, offset, room)
            if not batch:
                return
            yield from batch
            if batch[-1].offset == offset:   # a file system that does not move on
                return
            offset = batch[-1].offset

    def _readdir(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_read_in)
        room = self._reply_room(m.size, reply)
        out = bytearray()
        for ent in self._dir_entries(m.fh, m.offset, room):
            record = _dirent_record(ent.ino, ent.type, ent)
            if len(out) + len(record) > room:
                break
            out += record
        return Reply(bytes(out))

    def _readdirplus(self, req: Request, reply: IoVec) -> Reply:
        """READDIRPLUS: each entry with its attributes and a node id, so the guest
        needs no LOOKUP per name.  Each entry returned counts one lookup, except "."
        and ".." (sent with node id 0: "no attributes for this one").  Entries that
        do not fit are not looked up at all; if the reply cannot be delivered, the
        lookups are forgotten again."""
        m = parse_struct(req.args, abi.fuse_read_in)
        room = self._reply_room(m.size, reply)
        out = bytearray()
        counted: list[int] = []

        def undo() -> None:
            for nodeid in counted:
                self.fs.forget(nodeid, 1)

        try:
            for ent in self._dir_entries(m.fh, m.offset, room):
                size = abi.FUSE_DIRENT_ALIGN(abi.FUSE_NAME_OFFSET_DIRENTPLUS + len(ent.name))
                if len(out) + size > room:
                    break
                record = self._direntplus(req.nodeid, ent, counted)
                if record is not None:
                    out += record
        except BaseException:
            undo()
            raise
        return Reply(bytes(out), undo=undo)

    def _direntplus(self, nodeid: int, ent: DirEntry, counted: list[int]) -> bytes | None:
        """One fuse_direntplus record; None when the entry vanished meanwhile."""
        if ent.name in (b".", b".."):
            return bytes(self._entry_out(None)) + _dirent_record(ent.ino, ent.type, ent)
        try:
            entry = self.fs.lookup(nodeid, ent.name)
        except FileNotFoundError:   # gone meanwhile
            return None
        except PermissionError as e:   # e.g. another user's mount point: list the rest
            log.debug("READDIRPLUS: %r skipped: %s", ent.name, e)
            return None
        counted.append(entry.nodeid)
        st = entry.stat
        return (bytes(self._entry_out(entry))
                + _dirent_record(st.st_ino, stat.S_IFMT(st.st_mode) >> 12, ent))

    # --- file system and attributes ----------------------------------------------------------
    def _statfs(self, req: Request, reply: IoVec) -> Reply:
        v = self.fs.statfs(req.nodeid)
        st = abi.fuse_kstatfs(blocks=v.f_blocks, bfree=v.f_bfree, bavail=v.f_bavail,
                              files=v.f_files, ffree=v.f_ffree, bsize=v.f_bsize,
                              namelen=v.f_namemax, frsize=v.f_frsize)
        return Reply(bytes(abi.fuse_statfs_out(st=st)))

    def _syncfs(self, req: Request, reply: IoVec) -> None:
        self.fs.syncfs(req.nodeid)

    def _access(self, req: Request, reply: IoVec) -> None:
        self.fs.access(req.caller, req.nodeid, parse_struct(req.args, abi.fuse_access_in).mask)

    def _setxattr(self, req: Request, reply: IoVec) -> None:
        """SETXATTR: fuse_setxattr_in is 8 bytes unless FUSE_SETXATTR_EXT was agreed
        (it never is here), then name\\0, then exactly ``size`` value bytes."""
        m = parse_prefix(req.args, abi.fuse_setxattr_in, abi.FUSE_COMPAT_SETXATTR_IN_SIZE)
        (name,), end = parse_names(req.args, 1, abi.FUSE_COMPAT_SETXATTR_IN_SIZE)
        if end + m.size > len(req.args):
            raise _invalid(f"xattr value of {m.size} bytes, {len(req.args) - end} present")
        self.fs.setxattr(req.nodeid, _xattr_name(name), req.args[end:end + m.size], m.flags)

    def _getxattr(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_getxattr_in)
        (name,), _ = parse_names(req.args, 1, sizeof(m))
        return _sized_reply(self.fs.getxattr(req.nodeid, _xattr_name(name)),
                            min(m.size, self._limits().max_read))

    def _listxattr(self, req: Request, reply: IoVec) -> Reply:
        m = parse_struct(req.args, abi.fuse_getxattr_in)
        names = b"".join(n + b"\0" for n in self.fs.listxattr(req.nodeid))
        return _sized_reply(names, min(m.size, self._limits().max_read))

    def _removexattr(self, req: Request, reply: IoVec) -> None:
        (name,), _ = parse_names(req.args, 1)
        self.fs.removexattr(req.nodeid, _xattr_name(name))

    # --- DAX ----------------------------------------------------------------------------
    def _setupmapping(self, req: Request, reply: IoVec) -> None:
        """SETUPMAPPING: map ``len`` bytes of the file at ``foffset`` into the DAX
        window at ``moffset``.  Linux sends fh = -1 and means the node id's file;
        both offsets must be aligned to what INIT announced (map_alignment)."""
        if self.dax is None:
            raise OSError(errno.ENOSYS, "no DAX window")
        m = parse_struct(req.args, abi.fuse_setupmapping_in)
        known = abi.FUSE_SETUPMAPPING_FLAG_READ | abi.FUSE_SETUPMAPPING_FLAG_WRITE
        if m.flags & ~known:
            raise _invalid(f"mapping flags {m.flags:#x}")
        align = 1 << self.dax.map_alignment
        if m.len == 0 or m.foffset % align or m.moffset % align:
            raise _invalid(f"mapping {m.foffset:#x}+{m.len:#x} at {m.moffset:#x} "
                           f"(alignment {align:#x})")
        if m.foffset + m.len > (1 << 63) or m.moffset + m.len > _U64_MAX:
            raise _invalid("mapping range overflows")
        writable = bool(m.flags & abi.FUSE_SETUPMAPPING_FLAG_WRITE)
        with self.fs.mapping_fd(req.nodeid, writable) as fd:
            self.dax.setup_mapping(fd, m.foffset, m.moffset, m.len, writable)

    def _removemapping(self, req: Request, reply: IoVec) -> None:
        """REMOVEMAPPING: a 4-byte count, then ``count`` 16-byte ranges from request
        byte 44 (unaligned); all of them go to the mapper in one call."""
        if self.dax is None:
            raise OSError(errno.ENOSYS, "no DAX window")
        m = parse_struct(req.args, abi.fuse_removemapping_in)
        one = sizeof(abi.fuse_removemapping_one)
        if m.count > abi.FUSE_REMOVEMAPPING_MAX_ENTRY:
            raise _invalid(f"{m.count} ranges to remove")
        if sizeof(m) + m.count * one > len(req.args):
            raise _invalid(f"{m.count} ranges announced, {(len(req.args) - sizeof(m)) // one} sent")
        ranges = []
        for i in range(m.count):
            r = abi.fuse_removemapping_one.from_buffer_copy(req.args, sizeof(m) + i * one)
            if r.len == 0 or r.moffset + r.len > _U64_MAX:
                raise _invalid(f"range {r.moffset:#x}+{r.len:#x}")
            ranges.append((r.moffset, r.len))
        if ranges:
            self.dax.remove_mapping(ranges)


def _dirent_record(ino: int, dtype: int, ent: DirEntry) -> bytes:
    """A fuse_dirent for ``ent``: the fixed part, the name, zero padding to 8 bytes."""
    head = abi.fuse_dirent(ino=ino, off=ent.offset, namelen=len(ent.name), type=dtype)
    record = bytes(head) + ent.name
    return record.ljust(abi.FUSE_DIRENT_ALIGN(len(record)), b"\0")


def _sized_reply(value: bytes, size: int) -> Reply:
    """The GETXATTR/LISTXATTR convention: size 0 asks how big the value is
    (fuse_getxattr_out); a buffer too small for the value is ERANGE."""
    if size == 0:
        return Reply(bytes(abi.fuse_getxattr_out(size=len(value))))
    if len(value) > size:
        raise OSError(errno.ERANGE, f"{len(value)} bytes do not fit in {size}")
    return Reply(value)


def _xattr_name(name: bytes) -> bytes:
    if not name:
        raise _invalid("empty attribute name")
    return name
