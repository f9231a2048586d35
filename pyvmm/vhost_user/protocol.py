"""The vhost-user wire protocol: message layouts, validation and fd passing.

Everything here follows the vhost-user specification (QEMU
``docs/interop/vhost-user.rst``; section names are quoted in the comments) and,
for the legacy virtio-fs DAX messages that never entered the spec, the facts
collected in docs/vhost-user-dax.md 2.1.

A message is a 12-byte header (request, flags, size) followed by ``size``
payload bytes; file descriptors travel as ``SCM_RIGHTS`` ancillary data on the
same ``sendmsg`` (at most 8 per message).  Two channels carry messages:

* ``Channel.FRONTEND``: the main socket.  Requests are front-end -> back-end
  (``VHOST_USER_*`` codes), replies come back on it.
* ``Channel.BACKEND``: the back-end request channel set up with
  ``VHOST_USER_SET_BACKEND_REQ_FD``.  Requests are back-end -> front-end
  (``VHOST_USER_BACKEND_*`` codes), replies are the front-end's u64 acks.

On the back-end channel the codes 6/7/8 are decoded as the legacy
``FS_MAP``/``FS_UNMAP``/``FS_SYNC`` (cloud-hypervisor / rust-vmm <= 0.11
numbering), not as the standard ``SHARED_OBJECT_*`` messages that reuse them:
pyvmm never negotiates ``VHOST_USER_PROTOCOL_F_SHARED_OBJECT``.  Code 9 is the
standard ``SHMEM_MAP``; the legacy ``FS_IO`` that also used 9 is spoken as 1003 (see below).

``decode`` and ``recv_message`` check everything a peer controls before any
value is used: header size against the bytes present, an upper bound on the
payload, the version bits and reserved flag bits, that the request code is
known and supported, that the payload has exactly the layout of that request
(or of its reply), field sanity (region overlap and overflow, fd flag bits,
config sizes, shared-memory ranges) and that exactly the file descriptors the
message needs came with it.  A violation raises ``ProtocolError`` and every
received descriptor that was not handed on in a ``Message`` is closed.

What decode does *not* know is the receiver's own state (window size, queue
count, memory map): bounds against those are the caller's job.
"""

from __future__ import annotations

import array
import ctypes
import enum
import errno
import logging
import os
import select
import socket
import time
from ctypes import c_uint8, c_uint32, c_uint64, sizeof
from typing import Any, Callable, Iterable, NamedTuple, Sequence

log = logging.getLogger(__name__)

U64_MAX = (1 << 64) - 1

# --- header (spec "Message Specification" / "Header") ---------------------------------------
VHOST_USER_HDR_SIZE = 12
VHOST_USER_VERSION = 0x1            # flags bits 0-1: version, currently 0x01
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x4         # flags bit 2: reply flag, set on every reply
VHOST_USER_NEED_REPLY_MASK = 0x8    # flags bit 3: need_reply (spec "REPLY_ACK")
VHOST_USER_FLAGS_KNOWN = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK

# Our own limits.  The largest payload the spec defines is the GET_SHMEM_CONFIG reply
# (2056 bytes); rust-vmm refuses anything above 4096, and so do we.
MAX_PAYLOAD_SIZE = 4096
# "at most 8 descriptors in each message" (spec "Back-end communication"); SET_MEM_TABLE
# sends one per region and has at most VHOST_MEMORY_BASELINE_NREGIONS regions.
MAX_FDS_PER_MESSAGE = 8

# --- front-end message types (spec "Front-end message types") ---------------------------
_names_before = set(globals())
VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4           # deprecated: "no longer used"
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_LOG_BASE = 6
VHOST_USER_SET_LOG_FD = 7
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_SEND_RARP = 19
VHOST_USER_NET_SET_MTU = 20
VHOST_USER_SET_BACKEND_REQ_FD = 21   # formerly VHOST_USER_SET_SLAVE_REQ_FD
VHOST_USER_IOTLB_MSG = 22
VHOST_USER_SET_VRING_ENDIAN = 23
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25
VHOST_USER_CREATE_CRYPTO_SESSION = 26
VHOST_USER_CLOSE_CRYPTO_SESSION = 27
VHOST_USER_POSTCOPY_ADVISE = 28
VHOST_USER_POSTCOPY_LISTEN = 29
VHOST_USER_POSTCOPY_END = 30
VHOST_USER_GET_INFLIGHT_FD = 31
VHOST_USER_SET_INFLIGHT_FD = 32
VHOST_USER_GPU_SET_SOCKET = 33
VHOST_USER_RESET_DEVICE = 34
VHOST_USER_VRING_KICK = 35
VHOST_USER_GET_MAX_MEM_SLOTS = 36
VHOST_USER_ADD_MEM_REG = 37
VHOST_USER_REM_MEM_REG = 38
VHOST_USER_SET_STATUS = 39
VHOST_USER_GET_STATUS = 40
VHOST_USER_GET_SHARED_OBJECT = 41
VHOST_USER_SET_DEVICE_STATE_FD = 42
VHOST_USER_CHECK_DEVICE_STATE = 43
VHOST_USER_GET_SHMEM_CONFIG = 44
_FRONTEND_NAMES = {globals()[k]: k for k in set(globals()) - _names_before if k.startswith("VHOST_USER_")}
del _names_before

# --- back-end message types (spec "Back-end message types") -----------------------------
VHOST_USER_BACKEND_IOTLB_MSG = 1
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = 2
VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG = 3
VHOST_USER_BACKEND_VRING_CALL = 4
VHOST_USER_BACKEND_VRING_ERR = 5
VHOST_USER_BACKEND_SHARED_OBJECT_ADD = 6
VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE = 7
VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP = 8
VHOST_USER_BACKEND_SHMEM_MAP = 9     # needs VHOST_USER_PROTOCOL_F_SHMEM
VHOST_USER_BACKEND_SHMEM_UNMAP = 10
# Legacy virtio-fs DAX messages: never in the spec (docs/vhost-user-dax.md 2.1).  This is the
# numbering of rust-vmm vhost <= 0.11 / cloud-hypervisor 2020-2024 / Rust virtiofsd <= 1.12 /
# alioth.
VHOST_USER_BACKEND_FS_MAP = 6
VHOST_USER_BACKEND_FS_UNMAP = 7
VHOST_USER_BACKEND_FS_SYNC = 8
# FS_IO (the legacy 9) collides with the standard SHMEM_MAP, so pyvmm speaks FS_IO under
# the number rust-vmm gave it in 2024 when it moved the FS_* family out of the standard
# range (FS_MAP 1000 ... FS_IO 1003).  Same 8-entry payload; c_offset is a guest-physical
# address; MAP_W = guest memory -> file, else file -> guest; reply = bytes moved, or a
# negative errno.  pyvmm-virtiofsd sends it for a FUSE READ/WRITE buffer that lies in the
# DAX window, which its memory table does not cover (docs/vhost-user-dax.md 2.1 and 2.4).
VHOST_USER_BACKEND_FS_IO = 1003

# --- feature bits --------------------------------------------------------------------------
# Virtio feature word (spec "Communication"; vhost-only bits never shown to the guest).
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Protocol features (spec "Protocol features"; docs/vhost-user-dax.md 1.4 for bits 17-22).
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_NET_MTU = 4
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5       # formerly SLAVE_REQ
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10  # formerly SLAVE_SEND_FD
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_STATUS = 16
VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 18
VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19
VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT = 20
VHOST_USER_PROTOCOL_F_GPA_ADDRESSES = 21
# Earlier drafts used 20, then 21 (docs/vhost-user-dax.md 2.2).
VHOST_USER_PROTOCOL_F_SHMEM = 22

# --- payload constants ---------------------------------------------------------------------
# SET_VRING_KICK/CALL/ERR u64: "Bits (0-7) of the payload contain the vring index. Bit 8 is
# the invalid FD flag."
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100
VHOST_VRING_F_LOG = 0                        # vring address flags bit 0 (spec "Migration")
VHOST_MEMORY_BASELINE_NREGIONS = 8           # regions in one SET_MEM_TABLE
VHOST_USER_MAX_CONFIG_SIZE = 256             # device config space carried by GET/SET_CONFIG
VHOST_USER_CONFIG_HDR_SIZE = 12              # offset, size, flags
VHOST_SET_CONFIG_TYPE_FRONTEND = 0           # config flags: "used for writable fields"
VHOST_SET_CONFIG_TYPE_MIGRATION = 1          # config flags: "used for live migration"
VHOST_USER_FS_BACKEND_ENTRIES = 8            # legacy FS_* entries (docs/vhost-user-dax.md 2.1)
VHOST_USER_FS_FLAG_MAP_R = 0x1               # legacy FS_MAP flags = mmap prot bits
VHOST_USER_FS_FLAG_MAP_W = 0x2
VHOST_USER_FS_UNMAP_WHOLE = U64_MAX          # legacy FS_UNMAP len: "the whole window"
VHOST_USER_FLAG_MAP_RW = 0x1                 # SHMEM_MAP flags bit 0: 0 read-only, 1 read-write
VHOST_USER_MAX_SHMEM_REGIONS = 256           # GET_SHMEM_CONFIG memory_sizes[] entries


def _check_size(struct: type, size: int) -> None:
    if sizeof(struct) != size:
        raise AssertionError(f"{struct.__name__} is {sizeof(struct)} bytes, the spec says {size}")


# --- binary layouts (spec "Payload"; all little-endian) ------------------------------------
class VhostUserHeader(ctypes.LittleEndianStructure):
    """request u32, flags u32, size u32 (spec "Header")."""
    _fields_ = [("request", c_uint32), ("flags", c_uint32), ("size", c_uint32)]


class VhostUserU64(ctypes.LittleEndianStructure):
    """"A single 64-bit integer"."""
    _fields_ = [("value", c_uint64)]


class VhostVringState(ctypes.LittleEndianStructure):
    """"A vring state description" (struct vhost_vring_state)."""
    _fields_ = [("index", c_uint32), ("num", c_uint32)]


class VhostVringAddr(ctypes.LittleEndianStructure):
    """"A vring address description" (struct vhost_vring_addr): note desc, used, avail."""
    _fields_ = [("index", c_uint32), ("flags", c_uint32),
                ("desc_user_addr", c_uint64), ("used_user_addr", c_uint64),
                ("avail_user_addr", c_uint64), ("log_guest_addr", c_uint64)]


class VhostUserMemoryRegion(ctypes.LittleEndianStructure):
    """One region of "Memory regions description"."""
    _fields_ = [("guest_phys_addr", c_uint64), ("memory_size", c_uint64),
                ("userspace_addr", c_uint64), ("mmap_offset", c_uint64)]


class VhostUserMemory(ctypes.LittleEndianStructure):
    """"Memory regions description"; on the wire only ``nregions`` regions follow."""
    _fields_ = [("nregions", c_uint32), ("padding", c_uint32),
                ("regions", VhostUserMemoryRegion * VHOST_MEMORY_BASELINE_NREGIONS)]

    def wire_size(self) -> int:
        return 8 + sizeof(VhostUserMemoryRegion) * self.nregions

    def region_list(self) -> list[VhostUserMemoryRegion]:
        return list(self.regions[:min(self.nregions, VHOST_MEMORY_BASELINE_NREGIONS)])


class VhostUserMemRegMsg(ctypes.LittleEndianStructure):
    """"Single memory region description" (ADD_MEM_REG / REM_MEM_REG)."""
    _fields_ = [("padding", c_uint64), ("region", VhostUserMemoryRegion)]


class VhostUserConfig(ctypes.LittleEndianStructure):
    """"Virtio device config space"; on the wire only ``size`` payload bytes follow."""
    _fields_ = [("offset", c_uint32), ("size", c_uint32), ("flags", c_uint32),
                ("region", c_uint8 * VHOST_USER_MAX_CONFIG_SIZE)]

    def wire_size(self) -> int:
        return VHOST_USER_CONFIG_HDR_SIZE + self.size

    @property
    def data(self) -> bytes:
        return bytes(self.region[:min(self.size, VHOST_USER_MAX_CONFIG_SIZE)])


class VhostUserFSBackendMsg(ctypes.LittleEndianStructure):
    """Legacy FS_MAP/FS_UNMAP/FS_SYNC payload: 8-entry arrays (docs/vhost-user-dax.md 2.1).

    ``c_offset`` is the offset in the DAX window; ``flags`` uses MAP_R (bit 0) and
    MAP_W (bit 1).  Entries with ``len`` 0 are unused.
    """
    _fields_ = [("fd_offset", c_uint64 * VHOST_USER_FS_BACKEND_ENTRIES),
                ("c_offset", c_uint64 * VHOST_USER_FS_BACKEND_ENTRIES),
                ("len", c_uint64 * VHOST_USER_FS_BACKEND_ENTRIES),
                ("flags", c_uint64 * VHOST_USER_FS_BACKEND_ENTRIES)]

    def entries(self) -> list[tuple[int, int, int, int]]:
        """The used entries as (fd_offset, c_offset, len, flags)."""
        return [(self.fd_offset[i], self.c_offset[i], self.len[i], self.flags[i])
                for i in range(VHOST_USER_FS_BACKEND_ENTRIES) if self.len[i]]


class VhostUserMMap(ctypes.LittleEndianStructure):
    """SHMEM_MAP / SHMEM_UNMAP "MMAP request" (docs/vhost-user-dax.md 2.2)."""
    _fields_ = [("shmid", c_uint8), ("padding", c_uint8 * 7), ("fd_offset", c_uint64),
                ("shm_offset", c_uint64), ("len", c_uint64), ("flags", c_uint64)]


class VhostUserShMemConfig(ctypes.LittleEndianStructure):
    """GET_SHMEM_CONFIG reply: region sizes indexed by shmid (docs/vhost-user-dax.md 2.2)."""
    _fields_ = [("nregions", c_uint32), ("padding", c_uint32),
                ("memory_sizes", c_uint64 * VHOST_USER_MAX_SHMEM_REGIONS)]


# Sizes from the spec (and docs/vhost-user-dax.md 1.3, 2.1, 2.2).
_check_size(VhostUserHeader, 12)
_check_size(VhostUserU64, 8)
_check_size(VhostVringState, 8)
_check_size(VhostVringAddr, 40)
_check_size(VhostUserMemoryRegion, 32)
_check_size(VhostUserMemory, 8 + 32 * VHOST_MEMORY_BASELINE_NREGIONS)
_check_size(VhostUserMemRegMsg, 40)
_check_size(VhostUserConfig, VHOST_USER_CONFIG_HDR_SIZE + VHOST_USER_MAX_CONFIG_SIZE)
_check_size(VhostUserFSBackendMsg, 256)
_check_size(VhostUserMMap, 40)
_check_size(VhostUserShMemConfig, 2056)

# The Linux UAPI names of the two vhost structures (linux/vhost_types.h).
vhost_vring_state = VhostVringState
vhost_vring_addr = VhostVringAddr


# --- errors and messages -------------------------------------------------------------------
class ProtocolError(ValueError):
    """A message that breaks the protocol.

    ``request``/``flags`` are the header's values when the header could be read (so a
    receiver can still send an error ack when NEED_REPLY was set); ``in_sync`` tells whether
    the stream is still at a message boundary (False: the connection must be dropped).
    """

    def __init__(self, message: str, *, request: int | None = None, flags: int | None = None,
                 in_sync: bool = True) -> None:
        super().__init__(message)
        self.request = request
        self.flags = flags
        self.in_sync = in_sync

    @property
    def need_reply(self) -> bool:
        return bool(self.flags is not None and self.flags & VHOST_USER_NEED_REPLY_MASK)


class PeerClosed(ConnectionError):
    """The peer closed the socket (at a message boundary or, ``mid_message``, in the
    middle of one: a short read)."""

    def __init__(self, message: str, *, mid_message: bool = False) -> None:
        super().__init__(message)
        self.mid_message = mid_message


class Channel(enum.Enum):
    FRONTEND = "frontend"   # main socket: VHOST_USER_* requests from the front-end
    BACKEND = "backend"     # back-end request channel: VHOST_USER_BACKEND_* requests


_BACKEND_NAMES = {
    VHOST_USER_BACKEND_IOTLB_MSG: "VHOST_USER_BACKEND_IOTLB_MSG",
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG",
    VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG: "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG",
    VHOST_USER_BACKEND_VRING_CALL: "VHOST_USER_BACKEND_VRING_CALL",
    VHOST_USER_BACKEND_VRING_ERR: "VHOST_USER_BACKEND_VRING_ERR",
    VHOST_USER_BACKEND_FS_MAP: "VHOST_USER_BACKEND_FS_MAP",
    VHOST_USER_BACKEND_FS_UNMAP: "VHOST_USER_BACKEND_FS_UNMAP",
    VHOST_USER_BACKEND_FS_SYNC: "VHOST_USER_BACKEND_FS_SYNC",
    VHOST_USER_BACKEND_SHMEM_MAP: "VHOST_USER_BACKEND_SHMEM_MAP",
    VHOST_USER_BACKEND_SHMEM_UNMAP: "VHOST_USER_BACKEND_SHMEM_UNMAP",
    VHOST_USER_BACKEND_FS_IO: "VHOST_USER_BACKEND_FS_IO",
}


def request_name(request: int, channel: Channel = Channel.FRONTEND) -> str:
    names = _FRONTEND_NAMES if channel is Channel.FRONTEND else _BACKEND_NAMES
    return names.get(request, f"request {request}")


class Message:
    """A decoded, validated message.  The receiver owns ``fds`` (see ``close_fds``).

    ``body`` is the parsed payload: None (no payload), an int (u64 payloads and acks) or a
    copy of the matching ctypes structure.
    """

    __slots__ = ("request", "flags", "payload", "body", "fds", "channel")

    def __init__(self, request: int, flags: int, payload: bytes, body: Any,
                 fds: list[int] | None = None, channel: Channel = Channel.FRONTEND) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.body = body
        self.fds = [] if fds is None else fds
        self.channel = channel

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def name(self) -> str:
        return request_name(self.request, self.channel)

    def take_fds(self) -> list[int]:
        """Hand the descriptors over to the caller (the message forgets them)."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        close_fds(self.take_fds())

    def __repr__(self) -> str:
        kind = "reply" if self.is_reply else "request"
        return f"<{self.name} {kind} flags={self.flags:#x} size={len(self.payload)} fds={len(self.fds)}>"


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- payload parsers -----------------------------------------------------------------------
# Each takes the payload and returns (body, (min_fds, max_fds)); each raises ProtocolError.
_Parsed = tuple[Any, tuple[int, int]]
_Parser = Callable[[bytes], _Parsed]


def _size_error(what: str, got: int, want: str) -> ProtocolError:
    return ProtocolError(f"{what} payload is {got} bytes, expected {want}")


def _parse_empty(payload: bytes) -> _Parsed:
    if payload:
        raise _size_error("an empty", len(payload), "0")
    return None, (0, 0)


def _parse_u64(payload: bytes) -> _Parsed:
    if len(payload) != 8:
        raise _size_error("a u64", len(payload), "8")
    return VhostUserU64.from_buffer_copy(payload).value, (0, 0)


def _struct_parser(cls: type, check: Callable[[Any], None] | None = None,
                   fds: tuple[int, int] = (0, 0)) -> _Parser:
    def parse(payload: bytes) -> _Parsed:
        if len(payload) != sizeof(cls):
            raise _size_error(f"a {cls.__name__}", len(payload), str(sizeof(cls)))
        body = cls.from_buffer_copy(payload)
        if check is not None:
            check(body)
        return body, fds
    return parse


def _end(start: int, length: int, what: str) -> int:
    end = start + length
    if end > U64_MAX + 1:
        raise ProtocolError(f"{what} {start:#x}+{length:#x} overflows 64 bits")
    return end


def _parse_memory(payload: bytes) -> _Parsed:
    if len(payload) < 8:
        raise _size_error("a memory table", len(payload), "at least 8")
    n = int.from_bytes(payload[:4], "little")
    if not 1 <= n <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(f"memory table has {n} regions, expected 1..{VHOST_MEMORY_BASELINE_NREGIONS}")
    want = 8 + sizeof(VhostUserMemoryRegion) * n
    if len(payload) != want:
        raise _size_error(f"a {n}-region memory table", len(payload), str(want))
    body = VhostUserMemory.from_buffer_copy(payload + bytes(sizeof(VhostUserMemory) - want))
    spans = []
    for i, r in enumerate(body.region_list()):
        if r.memory_size == 0:
            raise ProtocolError(f"memory region {i} is empty")
        gpa_end = _end(r.guest_phys_addr, r.memory_size, f"memory region {i} guest range")
        _end(r.userspace_addr, r.memory_size, f"memory region {i} user range")
        _end(r.mmap_offset, r.memory_size, f"memory region {i} mmap range")
        for j, (start, end) in enumerate(spans):
            if r.guest_phys_addr < end and start < gpa_end:
                raise ProtocolError(f"memory regions {j} and {i} overlap in guest-physical space")
        spans.append((r.guest_phys_addr, gpa_end))
    return body, (n, n)


def _check_mem_reg(body: VhostUserMemRegMsg) -> None:
    r = body.region
    if r.memory_size == 0:
        raise ProtocolError("memory region is empty")
    _end(r.guest_phys_addr, r.memory_size, "memory region guest range")
    _end(r.userspace_addr, r.memory_size, "memory region user range")
    _end(r.mmap_offset, r.memory_size, "memory region mmap range")


def _parse_config(payload: bytes) -> _Parsed:
    if len(payload) < VHOST_USER_CONFIG_HDR_SIZE:
        raise _size_error("a config", len(payload), f"at least {VHOST_USER_CONFIG_HDR_SIZE}")
    offset = int.from_bytes(payload[0:4], "little")
    size = int.from_bytes(payload[4:8], "little")
    flags = int.from_bytes(payload[8:12], "little")
    if size > VHOST_USER_MAX_CONFIG_SIZE or offset > VHOST_USER_MAX_CONFIG_SIZE - size:
        raise ProtocolError(f"config access {offset}+{size} is outside the "
                            f"{VHOST_USER_MAX_CONFIG_SIZE}-byte config space")
    if len(payload) != VHOST_USER_CONFIG_HDR_SIZE + size:
        raise _size_error(f"a {size}-byte config", len(payload), str(VHOST_USER_CONFIG_HDR_SIZE + size))
    if flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
        raise ProtocolError(f"config flags {flags:#x} are neither FRONTEND (0) nor MIGRATION (1)")
    body = VhostUserConfig.from_buffer_copy(payload + bytes(sizeof(VhostUserConfig) - len(payload)))
    return body, (0, 0)


def _parse_config_reply(payload: bytes) -> _Parsed:
    # "vhost-user back-end uses zero length of payload to indicate an error"
    if not payload:
        return None, (0, 0)
    return _parse_config(payload)


def _parse_vring_fd(payload: bytes) -> _Parsed:
    value, _ = _parse_u64(payload)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise ProtocolError(f"vring fd payload {value:#x} has bits other than index and NOFD")
    n = 0 if value & VHOST_USER_VRING_NOFD_MASK else 1
    return value, (n, n)


def _check_enable(body: VhostVringState) -> None:
    if body.num not in (0, 1):
        raise ProtocolError(f"SET_VRING_ENABLE num {body.num} is neither 0 nor 1")


def _check_reserved_num(body: VhostVringState) -> None:
    if body.num != 0:
        raise ProtocolError(f"vring state num {body.num} is reserved and must be 0")


def _fs_checker(request: int) -> Callable[[VhostUserFSBackendMsg], None]:
    def check(body: VhostUserFSBackendMsg) -> None:
        for i in range(VHOST_USER_FS_BACKEND_ENTRIES):
            length = body.len[i]
            if not length:
                continue
            if request == VHOST_USER_BACKEND_FS_UNMAP and length == VHOST_USER_FS_UNMAP_WHOLE:
                continue
            _end(body.c_offset[i], length, f"entry {i} window range")
            if request in (VHOST_USER_BACKEND_FS_MAP, VHOST_USER_BACKEND_FS_IO):
                _end(body.fd_offset[i], length, f"entry {i} file range")
                if body.flags[i] & ~(VHOST_USER_FS_FLAG_MAP_R | VHOST_USER_FS_FLAG_MAP_W):
                    raise ProtocolError(f"entry {i} has unknown flags {body.flags[i]:#x}")
    return check


def _check_mmap(body: VhostUserMMap) -> None:
    if body.len == 0:
        raise ProtocolError("shared memory request has length 0")
    _end(body.fd_offset, body.len, "file range")
    _end(body.shm_offset, body.len, "shared memory range")
    if body.flags & ~VHOST_USER_FLAG_MAP_RW:
        raise ProtocolError(f"shared memory request has unknown flags {body.flags:#x}")


class _Spec(NamedTuple):
    request: _Parser | None          # None: known code that pyvmm does not speak
    reply: _Parser = _parse_u64      # requests without an explicit reply get a u64 ack


_UNSUPPORTED = _Spec(request=None)
_state = _struct_parser(VhostVringState)

_FRONTEND_SPECS: dict[int, _Spec] = {
    VHOST_USER_GET_FEATURES: _Spec(_parse_empty, _parse_u64),
    VHOST_USER_SET_FEATURES: _Spec(_parse_u64),
    VHOST_USER_SET_OWNER: _Spec(_parse_empty),
    VHOST_USER_RESET_OWNER: _Spec(_parse_empty),
    VHOST_USER_SET_MEM_TABLE: _Spec(_parse_memory),
    VHOST_USER_SET_LOG_BASE: _UNSUPPORTED,
    VHOST_USER_SET_LOG_FD: _Spec(lambda p: (_parse_empty(p)[0], (1, 1))),
    VHOST_USER_SET_VRING_NUM: _Spec(_state),
    VHOST_USER_SET_VRING_ADDR: _Spec(_struct_parser(VhostVringAddr)),
    VHOST_USER_SET_VRING_BASE: _Spec(_state),
    VHOST_USER_GET_VRING_BASE: _Spec(_state, _state),
    VHOST_USER_SET_VRING_KICK: _Spec(_parse_vring_fd),
    VHOST_USER_SET_VRING_CALL: _Spec(_parse_vring_fd),
    VHOST_USER_SET_VRING_ERR: _Spec(_parse_vring_fd),
    VHOST_USER_GET_PROTOCOL_FEATURES: _Spec(_parse_empty, _parse_u64),
    VHOST_USER_SET_PROTOCOL_FEATURES: _Spec(_parse_u64),
    VHOST_USER_GET_QUEUE_NUM: _Spec(_parse_empty, _parse_u64),
    VHOST_USER_SET_VRING_ENABLE: _Spec(_struct_parser(VhostVringState, _check_enable)),
    VHOST_USER_SEND_RARP: _Spec(_parse_u64),
    VHOST_USER_NET_SET_MTU: _Spec(_parse_u64),
    VHOST_USER_SET_BACKEND_REQ_FD: _Spec(lambda p: (_parse_empty(p)[0], (1, 1))),
    VHOST_USER_IOTLB_MSG: _UNSUPPORTED,
    VHOST_USER_SET_VRING_ENDIAN: _Spec(_state),
    VHOST_USER_GET_CONFIG: _Spec(_parse_config, _parse_config_reply),
    VHOST_USER_SET_CONFIG: _Spec(_parse_config),
    VHOST_USER_CREATE_CRYPTO_SESSION: _UNSUPPORTED,
    VHOST_USER_CLOSE_CRYPTO_SESSION: _UNSUPPORTED,
    VHOST_USER_POSTCOPY_ADVISE: _UNSUPPORTED,
    VHOST_USER_POSTCOPY_LISTEN: _UNSUPPORTED,
    VHOST_USER_POSTCOPY_END: _UNSUPPORTED,
    VHOST_USER_GET_INFLIGHT_FD: _UNSUPPORTED,
    VHOST_USER_SET_INFLIGHT_FD: _UNSUPPORTED,
    VHOST_USER_GPU_SET_SOCKET: _UNSUPPORTED,
    VHOST_USER_RESET_DEVICE: _Spec(_parse_empty),
    VHOST_USER_VRING_KICK: _Spec(_struct_parser(VhostVringState, _check_reserved_num)),
    VHOST_USER_GET_MAX_MEM_SLOTS: _Spec(_parse_empty, _parse_u64),
    VHOST_USER_ADD_MEM_REG: _Spec(_struct_parser(VhostUserMemRegMsg, _check_mem_reg, (1, 1))),
    # "No file descriptors SHOULD be passed ... the back-end MAY accept messages with one"
    VHOST_USER_REM_MEM_REG: _Spec(_struct_parser(VhostUserMemRegMsg, _check_mem_reg, (0, 1))),
    VHOST_USER_SET_STATUS: _Spec(_parse_u64),
    VHOST_USER_GET_STATUS: _Spec(_parse_empty, _parse_u64),
    VHOST_USER_GET_SHARED_OBJECT: _UNSUPPORTED,
    VHOST_USER_SET_DEVICE_STATE_FD: _UNSUPPORTED,
    VHOST_USER_CHECK_DEVICE_STATE: _UNSUPPORTED,
    VHOST_USER_GET_SHMEM_CONFIG: _Spec(_parse_empty, _struct_parser(VhostUserShMemConfig)),
}

_BACKEND_SPECS: dict[int, _Spec] = {
    VHOST_USER_BACKEND_IOTLB_MSG: _UNSUPPORTED,
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: _Spec(_parse_empty),
    VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG: _UNSUPPORTED,
    VHOST_USER_BACKEND_VRING_CALL: _Spec(_struct_parser(VhostVringState, _check_reserved_num)),
    VHOST_USER_BACKEND_VRING_ERR: _Spec(_struct_parser(VhostVringState, _check_reserved_num)),
    VHOST_USER_BACKEND_FS_MAP: _Spec(_struct_parser(
        VhostUserFSBackendMsg, _fs_checker(VHOST_USER_BACKEND_FS_MAP), (1, 1))),
    VHOST_USER_BACKEND_FS_UNMAP: _Spec(_struct_parser(
        VhostUserFSBackendMsg, _fs_checker(VHOST_USER_BACKEND_FS_UNMAP))),
    VHOST_USER_BACKEND_FS_SYNC: _Spec(_struct_parser(
        VhostUserFSBackendMsg, _fs_checker(VHOST_USER_BACKEND_FS_SYNC))),
    VHOST_USER_BACKEND_FS_IO: _Spec(_struct_parser(
        VhostUserFSBackendMsg, _fs_checker(VHOST_USER_BACKEND_FS_IO), (1, 1))),
    VHOST_USER_BACKEND_SHMEM_MAP: _Spec(_struct_parser(VhostUserMMap, _check_mmap, (1, 1))),
    VHOST_USER_BACKEND_SHMEM_UNMAP: _Spec(_struct_parser(VhostUserMMap, _check_mmap)),
}


def has_explicit_reply(request: int, channel: Channel = Channel.FRONTEND) -> bool:
    """True for requests whose reply is not a plain REPLY_ACK u64 (GET_*)."""
    if channel is not Channel.FRONTEND:
        return False
    return request in (VHOST_USER_GET_FEATURES, VHOST_USER_GET_PROTOCOL_FEATURES,
                       VHOST_USER_GET_VRING_BASE, VHOST_USER_GET_QUEUE_NUM, VHOST_USER_GET_CONFIG,
                       VHOST_USER_GET_MAX_MEM_SLOTS, VHOST_USER_GET_STATUS,
                       VHOST_USER_GET_SHMEM_CONFIG)


# --- validation ----------------------------------------------------------------------------
def parse_header(data: bytes) -> VhostUserHeader:
    """Parse and check a 12-byte header on its own (before its payload is read)."""
    if len(data) < VHOST_USER_HDR_SIZE:
        raise ProtocolError(f"message is {len(data)} bytes, shorter than the "
                            f"{VHOST_USER_HDR_SIZE}-byte header")
    hdr = VhostUserHeader.from_buffer_copy(data[:VHOST_USER_HDR_SIZE])
    err = dict(request=hdr.request, flags=hdr.flags)
    if hdr.flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise ProtocolError(f"{_hdr_name(hdr)}: version {hdr.flags & VHOST_USER_VERSION_MASK}, "
                            f"expected {VHOST_USER_VERSION}", **err)
    if hdr.flags & ~VHOST_USER_FLAGS_KNOWN:
        raise ProtocolError(f"{_hdr_name(hdr)}: reserved flag bits set in {hdr.flags:#x}", **err)
    if hdr.size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"{_hdr_name(hdr)}: payload size {hdr.size} exceeds the "
                            f"{MAX_PAYLOAD_SIZE}-byte limit", in_sync=False, **err)
    return hdr


def _hdr_name(hdr: VhostUserHeader) -> str:
    return f"message {hdr.request}"


def _validate(request: int, flags: int, payload: bytes, nfds: int, channel: Channel,
              expect_reply_to: int | None = None) -> Any:
    """Check one complete message; return its parsed body or raise ProtocolError."""
    err = dict(request=request, flags=flags)
    specs = _FRONTEND_SPECS if channel is Channel.FRONTEND else _BACKEND_SPECS
    name = request_name(request, channel)
    is_reply = bool(flags & VHOST_USER_REPLY_MASK)
    if expect_reply_to is not None:
        want = request_name(expect_reply_to, channel)
        if not is_reply:
            raise ProtocolError(f"expected the reply to {want}, got a {name} request "
                                "(REPLY flag clear)", **err)
        if request != expect_reply_to:
            raise ProtocolError(f"expected the reply to {want}, got a reply to {name}", **err)
    if nfds > MAX_FDS_PER_MESSAGE:
        raise ProtocolError(f"{name}: {nfds} file descriptors, at most "
                            f"{MAX_FDS_PER_MESSAGE} per message", **err)
    spec = specs.get(request)
    if spec is None:
        raise ProtocolError(f"unknown {channel.value}-channel request code {request}", **err)
    if is_reply and flags & VHOST_USER_NEED_REPLY_MASK:
        raise ProtocolError(f"reply to {name} sets NEED_REPLY", **err)
    # On the back-end channel every reply is a u64 ack, also for requests pyvmm does not speak
    # (the front-end's failure ack for them).
    if spec.request is None and not (is_reply and channel is Channel.BACKEND):
        raise ProtocolError(f"{name} is not supported by pyvmm", **err)
    parser = spec.reply if is_reply else spec.request
    kind = "reply to " + name if is_reply else name
    try:
        body, (lo, hi) = parser(payload)
    except ProtocolError as e:
        raise ProtocolError(f"{kind}: {e}", **err) from None
    if not lo <= nfds <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise ProtocolError(f"{kind}: carries {nfds} file descriptors, expected {want}", **err)
    return body


def decode(data: bytes, fds: Sequence[int] = (), *, channel: Channel = Channel.FRONTEND,
           expect_reply_to: int | None = None) -> Message:
    """Decode one whole message (header + payload) that arrived with ``fds``.

    On success the returned Message owns ``fds``; on ProtocolError they are all closed.
    ``expect_reply_to``: the message must be the reply to that request code.
    """
    fds = list(fds)
    try:
        hdr = parse_header(data)
        payload = bytes(data[VHOST_USER_HDR_SIZE:])
        if hdr.size != len(payload):
            raise ProtocolError(f"{request_name(hdr.request, channel)}: header says {hdr.size} "
                                f"payload bytes, {len(payload)} present",
                                request=hdr.request, flags=hdr.flags)
        body = _validate(hdr.request, hdr.flags, payload, len(fds), channel, expect_reply_to)
    except ProtocolError:
        close_fds(fds)
        raise
    return Message(hdr.request, hdr.flags, payload, body, fds, channel)


# --- encoding ------------------------------------------------------------------------------
def payload_bytes(payload: Any) -> bytes:
    """The wire bytes of a payload: None, an int (u64), a ctypes structure or bytes."""
    if payload is None:
        return b""
    if isinstance(payload, bool):
        raise TypeError("a bool is not a vhost-user payload")
    if isinstance(payload, int):
        if not 0 <= payload <= U64_MAX:
            raise ProtocolError(f"u64 payload {payload} is out of range")
        return bytes(VhostUserU64(payload))
    if isinstance(payload, (VhostUserMemory, VhostUserConfig)):
        return bytes(payload)[:payload.wire_size()]
    if isinstance(payload, ctypes.Structure):
        return bytes(payload)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"cannot encode a {type(payload).__name__} payload")


def encode(request: int, payload: Any = None, fds: Sequence[int] = (), *,
           channel: Channel = Channel.FRONTEND, reply: bool = False,
           need_reply: bool = False) -> tuple[bytes, list[int]]:
    """Build one message and check it as the receiver would.

    Returns (bytes, fds) for ``send_bytes``.  Raises ProtocolError for a message the peer
    would refuse; the caller keeps ownership of ``fds`` either way.
    """
    body = payload_bytes(payload)
    flags = VHOST_USER_VERSION
    if reply:
        flags |= VHOST_USER_REPLY_MASK
    if need_reply:
        flags |= VHOST_USER_NEED_REPLY_MASK
    if len(body) > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"{request_name(request, channel)}: payload of {len(body)} bytes "
                            f"exceeds {MAX_PAYLOAD_SIZE}", request=request, flags=flags)
    fds = list(fds)
    for fd in fds:
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"{request_name(request, channel)}: bad file descriptor {fd!r}")
    _validate(request, flags, body, len(fds), channel)
    return bytes(VhostUserHeader(request, flags, len(body))) + body, fds


# --- socket I/O ----------------------------------------------------------------------------
_ANCBUF = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


def send_bytes(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data`` whole, with ``fds`` as SCM_RIGHTS on its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    view = memoryview(data)
    while True:
        sent = sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
        view = view[sent:]
        anc = []
        if not view:
            return


def send_message(sock: socket.socket, request: int, payload: Any = None, fds: Sequence[int] = (),
                 *, channel: Channel = Channel.FRONTEND, reply: bool = False,
                 need_reply: bool = False) -> None:
    """Encode (with all checks) and send one message.  ``fds`` stay the caller's."""
    data, fds = encode(request, payload, fds, channel=channel, reply=reply, need_reply=need_reply)
    log.debug("-> %s%s flags=%#x size=%d fds=%d", request_name(request, channel),
              " reply" if reply else "", int.from_bytes(data[4:8], "little"),
              len(data) - VHOST_USER_HDR_SIZE, len(fds))
    send_bytes(sock, data, fds)


def send_ack(sock: socket.socket, request: int, status: int, *,
             channel: Channel = Channel.FRONTEND) -> None:
    """Send the REPLY_ACK u64 for ``request``: 0 success, anything else failure.

    A negative ``status`` (e.g. -errno) is sent as its two's complement.  Unlike
    ``send_message`` this works for any request code, so that a request this module refuses
    (unknown, unsupported) can still get the failure ack its NEED_REPLY asks for.
    """
    flags = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
    log.debug("-> ack %s status=%d", request_name(request, channel), status)
    send_bytes(sock, bytes(VhostUserHeader(request & 0xFFFFFFFF, flags, 8))
               + bytes(VhostUserU64(status & U64_MAX)))


def _wait_readable(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        return
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for a vhost-user message")
        if poller.poll(max(1, int(remaining * 1000 + 0.999))):
            return


def _collect_fds(ancdata: list, msg_flags: int, fds: list[int]) -> bool:
    """Add the received descriptors to ``fds``; True when some were cut off (MSG_CTRUNC)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return bool(msg_flags & socket.MSG_CTRUNC)


def _recv_exact(sock: socket.socket, n: int, fds: list[int], deadline: float | None,
                what: str) -> tuple[bytes, bool]:
    """Exactly ``n`` bytes (PeerClosed when the stream ends first), and whether
    descriptors sent with them were cut off."""
    buf = bytearray()
    truncated = False
    while len(buf) < n:
        _wait_readable(sock, deadline)
        data, ancdata, msg_flags, _ = sock.recvmsg(n - len(buf), _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        truncated |= _collect_fds(ancdata, msg_flags, fds)
        if not data:
            if what == "header" and not buf:
                raise PeerClosed("the peer closed the connection")
            raise PeerClosed(f"the peer closed the connection in the middle of a message "
                             f"({len(buf)} of {n} {what} bytes)", mid_message=True)
        buf += data
    return bytes(buf), truncated


def recv_message(sock: socket.socket, *, channel: Channel = Channel.FRONTEND,
                 timeout: float | None = None, expect_reply_to: int | None = None) -> Message:
    """Receive and decode exactly one message.

    Raises PeerClosed (EOF), TimeoutError (``timeout`` seconds passed; the stream may be
    mid-message afterwards), ProtocolError (see ``decode``) or OSError.  Descriptors are
    closed on every error.  Reads never go past the end of this message, so its
    successor's fds stay queued.

    The stream is framed by the header's size field alone: whenever that is at most
    ``MAX_PAYLOAD_SIZE`` the whole message is consumed, also when its header is wrong
    otherwise (version, reserved flags) or it came with more than 8 descriptors, and the
    ProtocolError says ``in_sync`` (the receiver can refuse it and go on).  Only a size
    beyond the maximum leaves the stream out of step (``in_sync`` False).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    fds: list[int] = []
    try:
        head, truncated = _recv_exact(sock, VHOST_USER_HDR_SIZE, fds, deadline, "header")
        hdr = VhostUserHeader.from_buffer_copy(head)
        if hdr.size > MAX_PAYLOAD_SIZE:   # its payload is not read: out of step from here
            raise ProtocolError(f"{request_name(hdr.request, channel)}: payload size {hdr.size} "
                                f"exceeds the {MAX_PAYLOAD_SIZE}-byte limit", in_sync=False,
                                request=hdr.request, flags=hdr.flags)
        payload = b""
        if hdr.size:
            payload, cut = _recv_exact(sock, hdr.size, fds, deadline, "payload")
            truncated |= cut
        if truncated:
            raise ProtocolError(f"{request_name(hdr.request, channel)}: more than "
                                f"{MAX_FDS_PER_MESSAGE} file descriptors were sent with one "
                                "message (ancillary data truncated)",
                                request=hdr.request, flags=hdr.flags)
    except BaseException:
        close_fds(fds)
        raise
    msg = decode(head + payload, fds, channel=channel, expect_reply_to=expect_reply_to)
    log.debug("<- %r", msg)
    return msg


def is_disconnect(exc: BaseException) -> bool:
    """True for the OSErrors that mean the peer went away."""
    return isinstance(exc, (PeerClosed, BrokenPipeError, ConnectionResetError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN))
