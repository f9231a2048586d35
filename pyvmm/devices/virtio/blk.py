"""virtio-blk: a raw disk image as a virtio block device (virtio v1.2, 5.2).

One request queue.  A request is one descriptor chain laid out as
``struct virtio_blk_req`` (5.2.6)::

    readable:  virtio_blk_req header {type u32, reserved u32, sector u64}
               [data to write, or discard/write-zeroes segments]
    writable:  [data read, or the device id]  status u8 (the LAST writable byte)

The framing is not assumed (2.6.4 "Message Framing"): the header, the data and
the status may share buffers or be cut across any number of them.  Reads and
writes go straight between the image file and guest RAM (``os.preadv`` /
``os.pwritev`` on views of guest memory, no copy).

Everything in a request comes from the guest and is checked: a short header,
a missing status byte, a data length that is not a multiple of 512, a range
beyond the capacity or a buffer outside guest RAM fail that request with
VIRTIO_BLK_S_IOERR (or VIRTIO_BLK_S_UNSUPP where 5.2.6.2 says so) and the
queue goes on.  A read-only device opens the image O_RDONLY, so no bug here
can write it.

Snapshot: no request is in flight at a snapshot point, so the device state is
the image's identity: its path, the read-only flag, and size, mtime and a
sampled SHA-256 (``sampled_digest``) that ``parse_state`` compares with the
image opened now.  A disk written since the snapshot (by anything: the guest
that went on running, another VM, the host) no longer matches the guest's page
cache in the saved RAM, so the restore is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading

from ...snapshot.fields import blob, boolean, expect_keys, integer, text, uint
from .device import VIRTIO_ID_BLOCK, VirtioDevice
from .queue import buffer_pieces

log = logging.getLogger(__name__)

SECTOR_SIZE = 512          # the protocol's unit, whatever blk_size says (5.2.5)
SECTOR_SHIFT = 9

# Feature bits (5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Request status (5.2.6)
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# virtio_blk_discard_write_zeroes.flags (5.2.6)
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# The device id string of VIRTIO_BLK_T_GET_ID (5.2.6): NUL-padded ASCII, up to 20 bytes.
VIRTIO_BLK_ID_BYTES = 20

# Limits this device advertises in its configuration space.
MAX_DISCARD_SECTORS = 0x3FFFFF          # ~2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8            # 4 KiB: the host's hole-punching granule
MAX_WRITE_ZEROES_SECTORS = 0x3FFFFF
MAX_WRITE_ZEROES_SEG = 32

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

MAX_USED_LEN = 0xFFFFFFFF                # used element len is a u32 (2.7.8); a lower bound may be given
IOV_MAX = 1024                          # limits.h: iovecs per preadv/pwritev call
ZERO_CHUNK = 1 << 20                    # bytes per pwrite when zeroes are written out

# The sampled digest of an image (snapshot identity): its size, the first and the
# last MiB, and SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes evenly spaced in between.
SAMPLE_EDGE = 1 << 20
SAMPLE_BLOCK = 4096
SAMPLE_BLOCKS = 16
MAX_PATH = 4096                         # PATH_MAX
_STATE_KEYS = ("path", "readonly", "size", "mtime_ns", "sampled_sha256")


class virtio_blk_req(ctypes.LittleEndianStructure):
    """The request header: the first 16 device-readable bytes of a chain (5.2.6)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("sector", ctypes.c_uint64),
    ]


class virtio_blk_discard_write_zeroes(ctypes.LittleEndianStructure):
    """One segment of a DISCARD or WRITE_ZEROES request (5.2.6)."""

    _pack_ = 1
    _fields_ = [
        ("sector", ctypes.c_uint64),
        ("num_sectors", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),     # bit 0: unmap, bits 1..31: reserved
    ]


class virtio_blk_geometry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("cylinders", ctypes.c_uint16),
        ("heads", ctypes.c_uint8),
        ("sectors", ctypes.c_uint8),
    ]


class virtio_blk_topology(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("physical_block_exp", ctypes.c_uint8),
        ("alignment_offset", ctypes.c_uint8),
        ("min_io_size", ctypes.c_uint16),
        ("opt_io_size", ctypes.c_uint32),
    ]


class virtio_blk_config(ctypes.LittleEndianStructure):
    """The device configuration space (5.2.4), up to ``unused1``.

    The fields after it (secure erase, zoned) belong to features this device
    does not offer; reads there return zeroes (``VirtioDevice.config_read``).
    """

    _pack_ = 1
    _fields_ = [
        ("capacity", ctypes.c_uint64),
        ("size_max", ctypes.c_uint32),
        ("seg_max", ctypes.c_uint32),
        ("geometry", virtio_blk_geometry),
        ("blk_size", ctypes.c_uint32),
        ("topology", virtio_blk_topology),
        ("writeback", ctypes.c_uint8),
        ("unused0", ctypes.c_uint8),
        ("num_queues", ctypes.c_uint16),
        ("max_discard_sectors", ctypes.c_uint32),
        ("max_discard_seg", ctypes.c_uint32),
        ("discard_sector_alignment", ctypes.c_uint32),
        ("max_write_zeroes_sectors", ctypes.c_uint32),
        ("max_write_zeroes_seg", ctypes.c_uint32),
        ("write_zeroes_may_unmap", ctypes.c_uint8),
        ("unused1", ctypes.c_uint8 * 3),
    ]


assert ctypes.sizeof(virtio_blk_req) == 16
assert ctypes.sizeof(virtio_blk_discard_write_zeroes) == 16
assert ctypes.sizeof(virtio_blk_geometry) == 4
assert ctypes.sizeof(virtio_blk_topology) == 8
assert ctypes.sizeof(virtio_blk_config) == 60
assert virtio_blk_config.capacity.offset == 0
assert virtio_blk_config.seg_max.offset == 12
assert virtio_blk_config.geometry.offset == 16
assert virtio_blk_config.blk_size.offset == 20
assert virtio_blk_config.topology.offset == 24
assert virtio_blk_config.writeback.offset == 32
assert virtio_blk_config.num_queues.offset == 34
assert virtio_blk_config.max_discard_sectors.offset == 36
assert virtio_blk_config.max_discard_seg.offset == 40
assert virtio_blk_config.discard_sector_alignment.offset == 44
assert virtio_blk_config.max_write_zeroes_sectors.offset == 48
assert virtio_blk_config.max_write_zeroes_seg.offset == 52
assert virtio_blk_config.write_zeroes_may_unmap.offset == 56

REQ_HEADER_SIZE = ctypes.sizeof(virtio_blk_req)
SEGMENT_SIZE = ctypes.sizeof(virtio_blk_discard_write_zeroes)


# --- fallocate(2): os.posix_fallocate has no mode argument -------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode`` flags; OSError on failure."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), offset + len(data))
        if not chunk:
            raise OSError(errno.EIO, f"short read at byte {offset + len(data)} (image shrank?)")
        data += chunk
    return bytes(data)


def sampled_digest(fd: int, size: int) -> bytes:
    """SHA-256 over the image size, the first and last MiB and SAMPLE_BLOCKS evenly
    spaced 4 KiB blocks: a few MiB read whatever the size, and any change of size
    or of the parts a guest rewrites most (partition table, superblocks, the
    journal at either end) shows."""
    h = hashlib.sha256(size.to_bytes(8, "little"))
    edge = min(SAMPLE_EDGE, size)
    spans = [(0, edge), (size - edge, edge)]
    if size >= SAMPLE_BLOCK:
        step = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
        spans += [(i * step, SAMPLE_BLOCK) for i in range(SAMPLE_BLOCKS)]
    for offset, length in spans:
        h.update(_pread_exact(fd, length, offset))
    return h.digest()


class RequestError(Exception):
    """A request fails with ``status``; the queue carries on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _vectored(op, fd: int, views: list[memoryview], offset: int) -> None:
    """Run os.preadv/os.pwritev over ``views`` until every byte is done."""
    views = [v for v in views if len(v)]
    while views:
        n = op(fd, views[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short {op.__name__} at byte {offset} (image shrank?)")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


class VirtioBlock(VirtioDevice):
    """A virtio block device backed by a raw image file (or a host block device).

    ``path`` is opened O_RDWR, or O_RDONLY when ``readonly``; a missing or
    unreadable file, a directory, a size that is not a multiple of 512 or an
    image locked by another process raise ValueError with a one-line message.
    """

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1

    def __init__(self, path: str, readonly: bool = False, serial: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.readonly = readonly
        self.fd = -1
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise ValueError(f"disk image {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ValueError(f"disk image {path}: not a regular file or block device")
            size = os.lseek(fd, 0, os.SEEK_END)   # st_size is 0 for a block device
            if size % SECTOR_SIZE:
                raise ValueError(f"disk image {path}: size {size} is not a multiple of {SECTOR_SIZE}")
            try:  # like any disk: one writer, or any number of readers
                fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"disk image {path}: in use (locked by another process or disk)") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.capacity = size >> SECTOR_SHIFT      # in 512-byte sectors
        name = serial if serial is not None else "pyvmm-" + os.path.basename(path)
        ascii_name = "".join(c if " " <= c <= "~" else "_" for c in name)
        self.serial = ascii_name.encode("ascii")[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self._no_fallocate: set[int] = set()      # fallocate modes the backend refused
        self._close_lock = threading.Lock()

    # --- VirtioDevice ------------------------------------------------------------------------
    def device_features(self) -> int:
        features = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if self.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        return features

    def config_bytes(self) -> bytes:
        cfg = virtio_blk_config()
        cfg.capacity = self.capacity
        cfg.seg_max = max(1, self.queue_max_size - 2)   # a chain also holds header and status
        cfg.blk_size = SECTOR_SIZE
        if not self.readonly:
            cfg.max_discard_sectors = MAX_DISCARD_SECTORS
            cfg.max_discard_seg = MAX_DISCARD_SEG
            cfg.discard_sector_alignment = DISCARD_SECTOR_ALIGNMENT
            cfg.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
            cfg.max_write_zeroes_seg = MAX_WRITE_ZEROES_SEG
            cfg.write_zeroes_may_unmap = 1
        return bytes(cfg)

    def process_queue(self, index: int) -> None:
        if index == 0:
            self.serve_queue(0, self._handle)

    # --- snapshot ----------------------------------------------------------------------------
    def identity(self) -> dict:
        """What the image is now: size, mtime (ns) and the sampled digest."""
        st = os.fstat(self.fd)
        return {"size": self._current_size(), "mtime_ns": st.st_mtime_ns,
                "sampled_sha256": sampled_digest(self.fd, self._current_size()).hex()}

    def _current_size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)   # st_size is 0 for a block device

    def save_state(self) -> dict:
        return {"path": self.path, "readonly": self.readonly, **self.identity()}

    def parse_state(self, state: object, path: str) -> None:
        """The same image, unchanged since the snapshot, with the same access."""
        expect_keys(state, _STATE_KEYS, path)
        saved_path = text(state["path"], f"{path}.path", MAX_PATH)
        readonly = boolean(state["readonly"], f"{path}.readonly")
        saved = {"size": uint(state["size"], f"{path}.size", (1 << 63) - 1),
                 "mtime_ns": integer(state["mtime_ns"], f"{path}.mtime_ns", -(1 << 63), (1 << 63) - 1),
                 "sampled_sha256": blob(state["sampled_sha256"], f"{path}.sampled_sha256", 32).hex()}
        if saved_path != self.path:
            raise ValueError(f"{path}.path: the snapshot's disk is {saved_path}, this one {self.path}")
        if readonly != self.readonly:
            was = "read-only" if readonly else "writable"
            raise ValueError(f"{path}.readonly: disk {self.path} was {was} in the snapshot")
        now = self.identity()
        if saved["size"] != now["size"]:
            self._changed(path, f"size {saved['size']} -> {now['size']} bytes")
        if saved["mtime_ns"] != now["mtime_ns"]:
            self._changed(path, f"mtime {saved['mtime_ns']} -> {now['mtime_ns']} ns (written since?)")
        if saved["sampled_sha256"] != now["sampled_sha256"]:
            self._changed(path, "its sampled contents (sha256) differ")
        return None

    def _changed(self, path: str, how: str) -> None:
        raise ValueError(f"{path}: disk {self.path} changed since the snapshot: {how}; the "
                         "saved guest memory no longer matches it")

    def close(self) -> None:
        """Close the image (idempotent)."""
        with self._close_lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    # --- one request -------------------------------------------------------------------------
    def _handle(self, chain) -> int:
        """Execute one request; the bytes written into its writable buffers."""
        mem = self.mem
        status_gpa = None
        for buf in reversed(chain.writable):
            if buf.length > 0:
                status_gpa = buf.gpa + buf.length - 1
                break
        if status_gpa is None:
            log.warning("virtio-blk %s: request %d has no status byte", self.path, chain.head)
            return 0
        try:
            mem.translate(status_gpa, 1)
        except ValueError as e:          # do nothing that cannot be reported
            log.warning("virtio-blk %s: request %d: status byte: %s", self.path, chain.head, e)
            return 0
        data_in_len = chain.writable_len() - 1
        try:
            written = self._execute(chain, data_in_len)
            status = VIRTIO_BLK_S_OK
        except RequestError as e:
            log.debug("virtio-blk %s: request %d: %s", self.path, chain.head, e)
            status, written = e.status, 0
        except ValueError as e:          # GuestMemoryError: a buffer outside guest RAM
            log.warning("virtio-blk %s: request %d: %s", self.path, chain.head, e)
            status, written = VIRTIO_BLK_S_IOERR, 0
        except OSError as e:
            log.warning("virtio-blk %s: request %d: I/O error: %s", self.path, chain.head, e)
            status, written = VIRTIO_BLK_S_IOERR, 0
        except Exception:                # a bug here must not leave the request hanging
            log.exception("virtio-blk %s: request %d failed", self.path, chain.head)
            status, written = VIRTIO_BLK_S_IOERR, 0
        try:
            mem.write(status_gpa, bytes([status]))
        except ValueError as e:
            log.warning("virtio-blk %s: request %d: status byte unwritable: %s", self.path, chain.head, e)
            return 0
        # The used length counts bytes written from the first writable byte on
        # (2.7.8.1): the status byte only joins them when the data before it is whole.
        if written == data_in_len:
            written += 1
        return min(written, MAX_USED_LEN)

    def _execute(self, chain, data_in_len: int) -> int:
        """Do the request; return data bytes written (before the status) or raise RequestError."""
        if chain.readable_len() < REQ_HEADER_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"header of {chain.readable_len()} bytes")
        hdr = virtio_blk_req.from_buffer_copy(chain.read(self.mem, 0, REQ_HEADER_SIZE))
        data_out_len = chain.readable_len() - REQ_HEADER_SIZE
        if self.fd < 0:
            raise RequestError(VIRTIO_BLK_S_IOERR, "image closed")
        if hdr.type == VIRTIO_BLK_T_IN:
            self._check_range(hdr.sector, data_in_len)
            self._rw(os.preadv, chain.writable, 0, data_in_len, hdr.sector)
            return data_in_len
        if hdr.type == VIRTIO_BLK_T_OUT:
            if self.readonly:
                raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            self._check_range(hdr.sector, data_out_len)
            self._rw(os.pwritev, chain.readable, REQ_HEADER_SIZE, data_out_len, hdr.sector)
            self._write_through()
            return 0
        if hdr.type == VIRTIO_BLK_T_FLUSH:
            os.fsync(self.fd)
            return 0
        if hdr.type == VIRTIO_BLK_T_GET_ID:
            n = min(data_in_len, VIRTIO_BLK_ID_BYTES)
            if n <= 0:
                raise RequestError(VIRTIO_BLK_S_IOERR, "GET_ID without a data buffer")
            return chain.write(self.mem, self.serial[:n])
        if hdr.type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if self.readonly:
                raise RequestError(VIRTIO_BLK_S_IOERR, "discard/write zeroes on a read-only disk")
            self._discard_write_zeroes(hdr.type, self._segments_payload(chain, hdr.type, data_out_len))
            self._write_through()
            return 0
        raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {hdr.type}")

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"data length {length} is not a multiple of {SECTOR_SIZE}")
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise RequestError(VIRTIO_BLK_S_IOERR,
                               f"sectors {sector}+{length >> SECTOR_SHIFT} beyond capacity {self.capacity}")

    def _rw(self, op, buffers, offset: int, length: int, sector: int) -> None:
        """Move ``length`` bytes at ``offset`` of ``buffers`` to/from the image at ``sector``."""
        with contextlib.ExitStack() as stack:
            views = [stack.enter_context(self.mem.view(gpa, n))
                     for gpa, n in buffer_pieces(buffers, offset, length)]
            _vectored(op, self.fd, views, sector << SECTOR_SHIFT)

    def _write_through(self) -> None:
        """Without a negotiated FLUSH, a completed write must be stable (5.2.6.2)."""
        if not self.has_feature(VIRTIO_BLK_F_FLUSH):
            os.fdatasync(self.fd)

    def _segments_payload(self, chain, rtype: int, length: int) -> bytes:
        """The segment list of a DISCARD / WRITE_ZEROES request, its length checked
        before a byte is copied (at most max_*_seg segments of 16 bytes)."""
        max_seg = MAX_DISCARD_SEG if rtype == VIRTIO_BLK_T_DISCARD else MAX_WRITE_ZEROES_SEG
        if length <= 0 or length % SEGMENT_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{length} bytes of segments")
        if length // SEGMENT_SIZE > max_seg:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{length // SEGMENT_SIZE} segments, at most {max_seg}")
        return chain.read(self.mem, REQ_HEADER_SIZE, length)

    def _discard_write_zeroes(self, rtype: int, payload: bytes) -> None:
        """Zero or punch the ranges of ``payload`` (checked by ``_segments_payload``)."""
        discard = rtype == VIRTIO_BLK_T_DISCARD
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        count = len(payload) // SEGMENT_SIZE
        segments = [virtio_blk_discard_write_zeroes.from_buffer_copy(payload, i * SEGMENT_SIZE)
                    for i in range(count)]
        for seg in segments:   # check them all before touching the image
            if seg.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"unknown segment flags {seg.flags:#x}")
            if discard and seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard with the unmap flag")
            if seg.num_sectors > max_sectors:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"segment of {seg.num_sectors} sectors")
            self._check_range(seg.sector, seg.num_sectors << SECTOR_SHIFT)
        for seg in segments:
            if seg.num_sectors == 0:
                continue
            offset, length = seg.sector << SECTOR_SHIFT, seg.num_sectors << SECTOR_SHIFT
            if discard or seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            else:
                mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            self._zero(mode, offset, length)

    def _zero(self, mode: int, offset: int, length: int) -> None:
        """Make [offset, offset+length) of the image read as zeroes."""
        if mode not in self._no_fallocate:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                    log.info("virtio-blk %s: fallocate mode %#x unsupported (%s): writing zeroes",
                             self.path, mode, e.strerror)
                    self._no_fallocate.add(mode)
                else:
                    log.warning("virtio-blk %s: fallocate failed (%s): writing zeroes", self.path, e)
        zeroes = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, memoryview(zeroes)[:min(len(zeroes), end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write of zeroes")
            offset += n
