"""The back-end side of vhost-user for virtio-fs: memory table, vrings, DAX requests.

The front-end (a VMM: pyvmm, QEMU) connects to our Unix socket and sets the
device up with the messages of ``pyvmm.vhost_user.protocol``:

1. negotiation: GET_FEATURES / SET_FEATURES, GET_PROTOCOL_FEATURES /
   SET_PROTOCOL_FEATURES, SET_OWNER, GET_QUEUE_NUM;
2. ``SET_MEM_TABLE``: guest RAM as up to 8 regions, each an fd (a memfd) that we
   ``mmap`` here (``BackendMemory``); guest addresses in descriptors are looked
   up in it with bounds checks;
3. per queue ``SET_VRING_NUM/ADDR/BASE/CALL/KICK`` and ``SET_VRING_ENABLE``: the
   ring addresses arrive as *front-end virtual addresses* and are turned into
   guest-physical ones through the table; the kick fd is (in pyvmm) the KVM
   ioeventfd of the queue's notify address and the call fd its MSI-X irqfd, so a
   ``Vring`` thread here waits on the kick, serves the chains and writes the call
   fd: the guest and this process talk without the VMM's Python in between;
4. ``SET_BACKEND_REQ_FD``: the channel on which we ask the front-end to map file
   ranges into the DAX window (``BackendChannelMapper``).

Every value the front-end sends is checked by the protocol decoder (layout, fds)
and here (queue indexes, sizes, addresses inside the table).  A bad request gets
an error ack; a broken ring stops that ring (and signals its err fd); a bad
descriptor chain fails that request only.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Protocol, Sequence

from ..devices.virtio.queue import ChainError, DescriptorChain, Virtqueue, VirtqueueError
from ..memory import GuestMemoryError
from ..vhost_user import protocol as p
from ..vhost_user.protocol import Message, PeerClosed, ProtocolError
from .iovec import Foreign, ForeignBufferError, IoVec, Piece

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE

# Virtio feature bits (virtio v1.2 6 "Reserved Feature Bits").
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

BACKEND_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                    | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << p.VHOST_USER_F_PROTOCOL_FEATURES))

# What we need for DAX (docs/vhost-user-dax.md 1.4): REPLY_ACK to learn when a map is done,
# BACKEND_REQ for the channel, BACKEND_SEND_FD to pass the file, SHMEM for the standard messages.
BACKEND_PROTOCOL_FEATURES = ((1 << p.VHOST_USER_PROTOCOL_F_MQ)
                             | (1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK)
                             | (1 << p.VHOST_USER_PROTOCOL_F_BACKEND_REQ)
                             | (1 << p.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD)
                             | (1 << p.VHOST_USER_PROTOCOL_F_RESET_DEVICE)
                             | (1 << p.VHOST_USER_PROTOCOL_F_SHMEM))

# hiprio + up to 16 request queues (Linux 6.1 uses one request queue).
MAX_QUEUES = 17
MAX_QUEUE_SIZE = 32768                 # virtio v1.2 2.7: "Queue Size ... maximum 32768"
VIRTIO_FS_SHMCAP_ID_CACHE = 0          # the DAX window's shared memory region id
CHANNEL_TIMEOUT = 10.0                 # seconds to wait for the front-end's map ack


# --- guest memory --------------------------------------------------------------------------
class MappedRegion(NamedTuple):
    """One region of the front-end's memory table, mapped into this process."""

    gpa: int
    size: int
    user_addr: int     # the front-end's virtual address of the region
    map: mmap.mmap
    start: int         # offset of the region's first byte inside ``map``


class BackendMemory:
    """Guest RAM as the front-end described it in SET_MEM_TABLE.

    Offers what ``Virtqueue`` needs from guest memory (``translate``, ``read``,
    ``write``) plus zero-copy ``view``s and front-end address translation.  Every
    access must lie inside one region, else ``GuestMemoryError``.
    """

    def __init__(self, table: p.VhostUserMemory, fds: Sequence[int]) -> None:
        regions = table.region_list()
        if len(regions) != len(fds):
            raise ValueError(f"{len(regions)} memory regions but {len(fds)} fds")
        self.regions: list[MappedRegion] = []
        try:
            for r, fd in zip(regions, fds):
                self.regions.append(self._map_region(r, fd))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _map_region(r: p.VhostUserMemoryRegion, fd: int) -> MappedRegion:
        aligned = r.mmap_offset - r.mmap_offset % mmap.ALLOCATIONGRANULARITY
        start = r.mmap_offset - aligned
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise ValueError(f"memory region fd {fd}: {e}") from None
        if r.mmap_offset + r.memory_size > size:
            raise ValueError(f"memory region {r.guest_phys_addr:#x}+{r.memory_size:#x} reaches "
                             f"past the end of its file ({size:#x} bytes)")
        m = mmap.mmap(fd, start + r.memory_size, mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        return MappedRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, m, start)

    def _find(self, gpa: int, size: int) -> tuple[MappedRegion, int]:
        if gpa < 0 or size < 0:
            raise GuestMemoryError(f"negative guest access {gpa:#x}+{size:#x}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.gpa + r.size:
                return r, r.start + gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not in the memory table")

    def translate(self, gpa: int, size: int) -> int:
        """Offset of [gpa, gpa+size) inside its region's mapping (or GuestMemoryError)."""
        return self._find(gpa, size)[1]

    def read(self, gpa: int, size: int) -> bytes:
        r, off = self._find(gpa, size)
        return r.map[off:off + size]

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._find(gpa, len(data))
        r.map[off:off + len(data)] = data

    def view(self, gpa: int, size: int) -> memoryview:
        r, off = self._find(gpa, size)
        return memoryview(r.map)[off:off + size]

    def user_to_gpa(self, user_addr: int) -> int:
        """The guest-physical address of a front-end virtual address (SET_VRING_ADDR)."""
        for r in self.regions:
            if r.user_addr <= user_addr < r.user_addr + r.size:
                return r.gpa + user_addr - r.user_addr
        raise GuestMemoryError(f"front-end address {user_addr:#x} is not in the memory table")

    def close(self) -> None:
        for r in self.regions:
            try:
                r.map.close()
            except BufferError:   # a view is still alive: the GC unmaps it later
                log.warning("guest memory region %#x still in use at close", r.gpa)
        self.regions = []


class _SharedLock:
    """Many readers (ring workers using guest memory) or one writer (a new memory table)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def add_shared(self) -> None:
        """One more reader slot for a holder of one (hands it to a pool thread).

        It must not wait for a queued writer: that writer waits for the caller's
        own slot, so waiting here would deadlock."""
        with self._cond:
            assert self._readers > 0
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


# --- the DAX request channel ---------------------------------------------------------------
def _ack_errno(status: int) -> int:
    """The errno in a failure ack: rust-vmm sends -errno, QEMU 1; anything else is EIO."""
    signed = status - (1 << 64) if status >= 1 << 63 else status
    return -signed if -4095 <= signed <= -1 else errno.EIO


class BackendChannelMapper:
    """``dax_mapper.DaxMapper`` over the vhost-user back-end request channel.

    SETUPMAPPING becomes ``SHMEM_MAP`` (standard, when the front-end negotiated
    VHOST_USER_PROTOCOL_F_SHMEM) or the legacy ``FS_MAP`` (one entry); REMOVEMAPPING
    becomes ``SHMEM_UNMAP`` per range or ``FS_UNMAP`` with up to 8 entries.  Each
    request asks for a reply (NEED_REPLY) and waits for the front-end's ack: the
    guest must not touch the range before the front-end has mapped it.  One
    request is in flight at a time (the channel is a simple request/reply stream).

    ``file_io`` sends ``FS_IO``: the front-end copies between a file and guest
    memory that our memory table does not cover (a buffer in the DAX window).
    """

    map_alignment = 12   # page granular: the front-end maps with mmap(MAP_FIXED)

    def __init__(self, sock: socket.socket, use_shmem: bool,
                 timeout: float = CHANNEL_TIMEOUT) -> None:
        self.sock = sock
        self.use_shmem = use_shmem
        self.timeout = timeout
        self._lock = threading.Lock()
        self.counts = {"map": 0, "unmap": 0, "io": 0}   # requests the front-end acked

    def _request(self, request: int, payload: object, fds: Sequence[int] = ()) -> int:
        """Send one request, wait for its ack; returns the ack value, raises OSError."""
        with self._lock:
            try:
                p.send_message(self.sock, request, payload, fds, channel=p.Channel.BACKEND,
                               need_reply=True)
                reply = p.recv_message(self.sock, channel=p.Channel.BACKEND,
                                       timeout=self.timeout, expect_reply_to=request)
            except TimeoutError:
                log.error("front-end did not answer %s within %.0f s",
                          p.request_name(request, p.Channel.BACKEND), self.timeout)
                self._close()
                raise OSError(errno.EIO, "the front-end did not answer") from None
            except (ProtocolError, PeerClosed, OSError) as e:
                log.error("back-end request channel failed on %s: %s",
                          p.request_name(request, p.Channel.BACKEND), e)
                self._close()
                raise OSError(errno.EIO, f"back-end request channel: {e}") from None
        reply.close_fds()
        return int(reply.body)

    def _close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _checked(self, request: int, payload: object, fds: Sequence[int] = ()) -> None:
        status = self._request(request, payload, fds)
        if status:
            raise OSError(_ack_errno(status), f"front-end refused "
                          f"{p.request_name(request, p.Channel.BACKEND)} ({status:#x})")

    def setup_mapping(self, fd: int, fd_offset: int, window_offset: int, length: int,
                      writable: bool) -> None:
        if self.use_shmem:
            msg = p.VhostUserMMap(shmid=VIRTIO_FS_SHMCAP_ID_CACHE, fd_offset=fd_offset,
                                  shm_offset=window_offset, len=length,
                                  flags=p.VHOST_USER_FLAG_MAP_RW if writable else 0)
            self._checked(p.VHOST_USER_BACKEND_SHMEM_MAP, msg, [fd])
        else:
            flags = p.VHOST_USER_FS_FLAG_MAP_R | (p.VHOST_USER_FS_FLAG_MAP_W if writable else 0)
            self._checked(p.VHOST_USER_BACKEND_FS_MAP,
                          _fs_msg([(fd_offset, window_offset, length, flags)]), [fd])
        self.counts["map"] += 1

    def remove_mapping(self, ranges: Sequence[tuple[int, int]]) -> None:
        if self.use_shmem:
            for window_offset, length in ranges:
                msg = p.VhostUserMMap(shmid=VIRTIO_FS_SHMCAP_ID_CACHE,
                                      shm_offset=window_offset, len=length)
                self._checked(p.VHOST_USER_BACKEND_SHMEM_UNMAP, msg)
                self.counts["unmap"] += 1
            return
        n = p.VHOST_USER_FS_BACKEND_ENTRIES
        for i in range(0, len(ranges), n):
            entries = [(0, off, length, 0) for off, length in ranges[i:i + n]]
            self._checked(p.VHOST_USER_BACKEND_FS_UNMAP, _fs_msg(entries))
            self.counts["unmap"] += len(entries)

    def file_io(self, gpa: int, length: int, fd: int, file_offset: int, to_file: bool) -> int:
        """Have the front-end move ``length`` bytes between guest ``gpa`` and ``fd``."""
        flags = p.VHOST_USER_FS_FLAG_MAP_W if to_file else p.VHOST_USER_FS_FLAG_MAP_R
        status = self._request(p.VHOST_USER_BACKEND_FS_IO,
                               _fs_msg([(file_offset, gpa, length, flags)]), [fd])
        if status >= 1 << 63:
            raise OSError(_ack_errno(status), f"FS_IO at guest {gpa:#x}+{length:#x} failed")
        if status > length:
            raise OSError(errno.EIO, f"FS_IO moved {status} bytes of {length}")
        self.counts["io"] += 1
        return status


def _fs_msg(entries: Sequence[tuple[int, int, int, int]]) -> p.VhostUserFSBackendMsg:
    msg = p.VhostUserFSBackendMsg()
    for i, (fd_offset, c_offset, length, flags) in enumerate(entries):
        msg.fd_offset[i], msg.c_offset[i], msg.len[i], msg.flags[i] = (
            fd_offset, c_offset, length, flags)
    return msg


# --- one virtqueue -------------------------------------------------------------------------
class Handler(Protocol):
    """What a ring serves requests with (``server.FuseServer``)."""

    def handle(self, request: IoVec, reply: IoVec) -> int:
        """Serve one request; the used length."""

    def fail(self, request: IoVec, reply: IoVec) -> int:
        """Fail a request ``handle`` could not serve; the used length."""


class Vring:
    """One virtqueue served by a thread that waits on its kick eventfd.

    The ring runs once it has a kick fd and an address and is enabled; the
    thread drains the available ring, hands each request to ``handler`` (inline,
    or on ``pool`` when the daemon has a thread pool), pushes the used element
    and writes the call fd when the driver wants an interrupt.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.addr: tuple[int, int, int] | None = None   # desc, avail, used (guest-physical)
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.queue: Virtqueue | None = None
        self._thread: threading.Thread | None = None
        self._stop_fd: int | None = None
        self._lock = threading.Lock()     # used ring and call fd, shared with pool threads
        self._inflight = 0
        self._idle = threading.Condition(self._lock)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def set_fd(self, which: str, fd: int | None) -> None:
        """Replace the kick, call or err fd (closing the old one) under the lock the
        worker holds while it writes the call and err fds."""
        with self._lock:
            old = getattr(self, which)
            setattr(self, which, fd)
            if old is not None and old != fd:
                os.close(old)

    def start(self, mem: BackendMemory, features: int, handler: Handler, shared: _SharedLock,
              resolver: Callable | None, pool: ThreadPoolExecutor | None) -> None:
        """Start serving (the caller checked kick fd, size and addresses)."""
        assert self.addr is not None and self.kick_fd is not None
        q = Virtqueue(mem, max_size=MAX_QUEUE_SIZE, foreign_buffers=True)
        q.size = self.size
        q.desc_addr, q.driver_addr, q.device_addr = self.addr
        q.event_idx = bool(features & (1 << VIRTIO_RING_F_EVENT_IDX))
        q.check()                       # VirtqueueError: areas not in the memory table
        q.ready = True
        q.resume_from_ring()            # used side: continue after what the used ring holds
        q.last_avail_idx = self.base    # avail side: where the front-end says (normally equal)
        self.queue = q
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(
            target=self._run, args=(q, handler, shared, resolver, pool),
            name=f"vring-{self.index}", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop the thread, wait for requests in flight; returns the next avail index."""
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
            with self._lock:
                while self._inflight:
                    self._idle.wait()
            os.close(self._stop_fd)
            self._thread = self._stop_fd = None
        if self.queue is not None:
            self.base = self.queue.last_avail_idx
            self.queue = None
        return self.base

    def close(self) -> None:
        self.stop()
        for which in ("kick_fd", "call_fd", "err_fd"):
            self.set_fd(which, None)

    # --- the worker ----------------------------------------------------------------------
    def _run(self, q: Virtqueue, handler: Handler, shared: _SharedLock,
             resolver: Callable | None, pool: ThreadPoolExecutor | None) -> None:
        try:
            self._loop(q, handler, shared, resolver, pool)
        except Exception:   # e.g. a kick or call fd that is not an eventfd
            log.exception("vring %d failed, stopped", self.index)
            self._broken()

    def _broken(self) -> None:
        """The ring cannot be served any more: tell the front-end through the err fd."""
        with self._lock:
            if self.err_fd is not None:
                try:
                    os.eventfd_write(self.err_fd, 1)
                except OSError as e:
                    log.warning("vring %d: err fd: %s", self.index, e)

    def _loop(self, q: Virtqueue, handler: Handler, shared: _SharedLock,
              resolver: Callable | None, pool: ThreadPoolExecutor | None) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        log.debug("vring %d: serving (size %d, base %d)", self.index, q.size, q.last_avail_idx)
        while True:
            more = False
            if self.enabled:
                served = self._drain(q, handler, shared, resolver, pool)
                if served is None:
                    return
                # A full pass may mean a driver whose used ring overlaps its avail ring
                # (each completion publishes a new chain): look at the stop fd, go on.
                more = served >= q.size
            events = dict(poller.poll(0 if more else None))
            if self._stop_fd in events:
                return
            if self.kick_fd in events:
                try:
                    os.eventfd_read(self.kick_fd)
                except BlockingIOError:
                    pass

    def _drain(self, q: Virtqueue, handler: Handler, shared: _SharedLock,
               resolver: Callable | None, pool: ThreadPoolExecutor | None) -> int | None:
        """Serve the available chains, at most a ring's worth (the loop looks at its
        stop fd between passes); how many were taken, None when the ring is broken."""
        shared.acquire_shared()
        try:
            for served in range(q.size):
                try:
                    with self._lock:
                        chain = q.pop()
                except ChainError as e:
                    log.warning("vring %d: %s", self.index, e)
                    self._complete(q, e.head, 0)
                    continue
                if chain is None:
                    return served
                if pool is None:
                    self._serve(q, chain, handler, resolver)
                else:
                    with self._lock:
                        # No more requests in flight than the ring holds: a driver
                        # that re-publishes heads cannot pile up work here.
                        while self._inflight >= q.size:
                            self._idle.wait()
                        self._inflight += 1
                    shared.add_shared()   # the pool thread's slot, released when it is done
                    pool.submit(self._serve_pooled, q, chain, handler, resolver, shared)
            return q.size
        except VirtqueueError as e:
            log.error("vring %d is broken, stopped: %s", self.index, e)
            self._broken()
            return None
        finally:
            shared.release_shared()

    def _serve_pooled(self, q: Virtqueue, chain: DescriptorChain, handler: Handler,
                      resolver: Callable | None, shared: _SharedLock) -> None:
        try:
            self._serve(q, chain, handler, resolver)
        except Exception:
            log.exception("vring %d: completing request %d failed", self.index, chain.head)
            self._broken()
        finally:
            shared.release_shared()
            with self._lock:
                self._inflight -= 1
                self._idle.notify_all()

    def _serve(self, q: Virtqueue, chain: DescriptorChain, handler: Handler,
               resolver: Callable | None) -> None:
        """One request: whatever goes wrong in it fails that request only (an error
        reply from ``handler.fail`` if it can write one, else used length 0); the
        ring goes on.  Only a used ring we cannot write stops it (VirtqueueError)."""
        request = IoVec(_pieces(q.mem, chain.readable), resolver)
        reply = IoVec(_pieces(q.mem, chain.writable), resolver)
        try:
            written = self._call(handler.handle, request, reply, chain.head)
            if written is None:
                written = self._call(handler.fail, request, reply, chain.head) or 0
        finally:
            for piece in request.pieces + reply.pieces:
                if isinstance(piece, memoryview):
                    piece.release()
        self._complete(q, chain.head, written)

    def _call(self, fn: Callable[[IoVec, IoVec], int], request: IoVec, reply: IoVec,
              head: int) -> int | None:
        """``fn(request, reply)`` if it returns a used length that fits the reply
        buffers, else None (logged)."""
        try:
            written = fn(request, reply)
        except Exception:
            log.exception("vring %d: request %d failed", self.index, head)
            return None
        if not isinstance(written, int) or not 0 <= written <= len(reply):
            log.error("vring %d: request %d: used length %r, the reply has %d bytes",
                      self.index, head, written, len(reply))
            return None
        return written

    def _complete(self, q: Virtqueue, head: int, written: int) -> None:
        with self._lock:
            q.push(head, written)
            if q.should_interrupt() and self.call_fd is not None:
                try:
                    os.eventfd_write(self.call_fd, 1)
                except OSError as e:   # a call fd the front-end broke: the ring goes on
                    log.warning("vring %d: call fd: %s", self.index, e)


def _pieces(mem: BackendMemory, buffers) -> list[Piece]:
    out: list[Piece] = []
    for b in buffers:
        try:
            out.append(mem.view(b.gpa, b.length))
        except GuestMemoryError:
            out.append(Foreign(b.gpa, b.length))
    return out


# --- the connection ------------------------------------------------------------------------
class RequestRefused(Exception):
    """A front-end request we answer with a failure ack (and a log line)."""


def _not_an_eventfd(fd: int) -> str | None:
    """Why ``fd`` cannot be a vring's kick, call or err fd, or None.  The spec says
    eventfd; a pipe or socket whose reader never reads would block the ring's
    thread on its next call.  Without a /proc to look in, any fd is taken (writes
    are non-blocking anyway)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return None if target == "anon_inode:[eventfd]" else f"{target!r} is not an eventfd"


class VhostUserFsBackend:
    """Serves one front-end connection for a FUSE ``server`` until it closes.

    ``server`` has ``handle`` and ``fail`` (``Handler``), ``destroy()``
    and a ``dax`` attribute that we set to a ``BackendChannelMapper`` once the
    front-end opened the back-end request channel with the features DAX needs.
    """

    def __init__(self, sock: socket.socket, server, thread_pool_size: int = 0) -> None:
        self.sock = sock
        self.server = server
        self.features = 0
        self.protocol_features = 0
        self.mem: BackendMemory | None = None
        self.vrings = [Vring(i) for i in range(MAX_QUEUES)]
        self.backend_channel: socket.socket | None = None
        self.mapper: BackendChannelMapper | None = None
        self._shared = _SharedLock()
        self._pool = (ThreadPoolExecutor(thread_pool_size, thread_name_prefix="fuse")
                      if thread_pool_size > 0 else None)
        self._handlers: dict[int, Callable[[Message], int | None]] = {
            p.VHOST_USER_GET_FEATURES: lambda m: BACKEND_FEATURES,
            p.VHOST_USER_SET_FEATURES: self._set_features,
            p.VHOST_USER_GET_PROTOCOL_FEATURES: lambda m: BACKEND_PROTOCOL_FEATURES,
            p.VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.VHOST_USER_SET_OWNER: lambda m: None,
            p.VHOST_USER_RESET_OWNER: lambda m: self._reset(),
            p.VHOST_USER_RESET_DEVICE: lambda m: self._reset(),
            p.VHOST_USER_GET_QUEUE_NUM: lambda m: MAX_QUEUES,
            p.VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            p.VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            p.VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            p.VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            p.VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            p.VHOST_USER_SET_VRING_KICK: lambda m: self._set_vring_fd(m, "kick_fd"),
            p.VHOST_USER_SET_VRING_CALL: lambda m: self._set_vring_fd(m, "call_fd"),
            p.VHOST_USER_SET_VRING_ERR: lambda m: self._set_vring_fd(m, "err_fd"),
            p.VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            p.VHOST_USER_SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            # The window's size is the front-end's (pyvmm: --fs cache_size=); we ask for none.
            p.VHOST_USER_GET_SHMEM_CONFIG: lambda m: p.VhostUserShMemConfig(nregions=0),
        }

    def _has(self, bit: int) -> bool:
        return bool(self.protocol_features & (1 << bit))

    # --- the message loop ------------------------------------------------------------------
    def serve(self) -> None:
        """Serve front-end requests until it closes the connection (or breaks the stream)."""
        try:
            while True:
                try:
                    msg = p.recv_message(self.sock, channel=p.Channel.FRONTEND)
                except PeerClosed:
                    log.info("the front-end closed the connection")
                    return
                except ProtocolError as e:
                    log.warning("invalid front-end request: %s", e)
                    if not e.in_sync:
                        log.error("lost track of the message stream: closing the connection")
                        return
                    if e.need_reply and e.request is not None:
                        p.send_ack(self.sock, e.request, -errno.EINVAL)
                    continue
                except OSError as e:
                    if p.is_disconnect(e):
                        log.info("the front-end went away: %s", e)
                        return
                    raise
                if not self._dispatch(msg):
                    return
        finally:
            self.close()

    def _dispatch(self, msg: Message) -> bool:
        """Run one request and answer it; False when the connection must end."""
        if msg.is_reply:
            log.warning("unexpected %r from the front-end", msg)
            msg.close_fds()
            return True
        handler = self._handlers.get(msg.request)
        status = 0
        result = None
        try:
            if handler is None:
                raise RequestRefused(f"{msg.name} is not supported")
            result = handler(msg)
        except (RequestRefused, GuestMemoryError, VirtqueueError, ValueError) as e:
            log.warning("%s refused: %s", msg.name, e)
            status = -errno.EINVAL
        except OSError as e:
            log.warning("%s failed: %s", msg.name, e)
            status = -(e.errno or errno.EIO)
        finally:
            msg.close_fds()   # whatever the handler did not take
        if p.has_explicit_reply(msg.request):
            if status:   # a GET_* we cannot answer: silence would stall the front-end
                log.error("cannot answer %s: closing the connection", msg.name)
                return False
            p.send_message(self.sock, msg.request, result, reply=True)
        elif msg.need_reply and self._has(p.VHOST_USER_PROTOCOL_F_REPLY_ACK):
            p.send_ack(self.sock, msg.request, status)
        return True

    # --- negotiation -----------------------------------------------------------------------
    def _set_features(self, msg: Message) -> None:
        if msg.body & ~BACKEND_FEATURES:
            raise RequestRefused(f"features {msg.body & ~BACKEND_FEATURES:#x} were not offered")
        self.features = msg.body
        log.info("features %#x", self.features)

    def _set_protocol_features(self, msg: Message) -> None:
        if msg.body & ~BACKEND_PROTOCOL_FEATURES:
            raise RequestRefused(f"protocol features "
                                 f"{msg.body & ~BACKEND_PROTOCOL_FEATURES:#x} were not offered")
        self.protocol_features = msg.body
        log.info("protocol features %#x", self.protocol_features)

    # --- memory ----------------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        new = BackendMemory(msg.body, msg.fds)   # maps, or raises (fds closed by dispatch)
        self._shared.acquire_exclusive()          # no ring worker touches guest memory now
        try:
            old, self.mem = self.mem, new
            for vr in self.vrings:
                if vr.queue is not None:
                    vr.queue.mem = new
        finally:
            self._shared.release_exclusive()
        if old is not None:
            old.close()
        log.info("memory table: %s", ", ".join(
            f"{r.gpa:#x}+{r.size:#x}" for r in new.regions))

    # --- vrings ----------------------------------------------------------------------------
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < MAX_QUEUES:
            raise RequestRefused(f"vring index {index} out of range 0..{MAX_QUEUES - 1}")
        return self.vrings[index]

    def _stopped(self, index: int) -> Vring:
        vr = self._vring(index)
        if vr.running:
            raise RequestRefused(f"vring {index} is running")
        return vr

    def _set_vring_num(self, msg: Message) -> None:
        vr = self._stopped(msg.body.index)
        num = msg.body.num
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RequestRefused(f"vring {vr.index} size {num} is not a power of two "
                                 f"up to {MAX_QUEUE_SIZE}")
        vr.size = num

    def _set_vring_addr(self, msg: Message) -> None:
        body = msg.body
        vr = self._stopped(body.index)
        if body.flags:   # VHOST_VRING_F_LOG (bit 0): we never offered logging
            raise RequestRefused(f"vring {vr.index} address flags {body.flags:#x}")
        if self.mem is None:
            raise RequestRefused("SET_VRING_ADDR before SET_MEM_TABLE")
        vr.addr = (self.mem.user_to_gpa(body.desc_user_addr),
                   self.mem.user_to_gpa(body.avail_user_addr),
                   self.mem.user_to_gpa(body.used_user_addr))
        self._maybe_start(vr)

    def _set_vring_base(self, msg: Message) -> None:
        vr = self._stopped(msg.body.index)
        if msg.body.num > 0xFFFF:
            raise RequestRefused(f"vring {vr.index} base {msg.body.num} exceeds 16 bits")
        vr.base = msg.body.num

    def _get_vring_base(self, msg: Message) -> p.VhostVringState:
        vr = self._vring(msg.body.index)
        base = vr.stop()
        vr.set_fd("kick_fd", None)   # "stop the ring": it restarts with the next KICK
        log.info("vring %d stopped at %d", vr.index, base)
        return p.VhostVringState(vr.index, base)

    def _set_vring_fd(self, msg: Message, which: str) -> None:
        index = msg.body & p.VHOST_USER_VRING_IDX_MASK
        vr = self._vring(index)
        fd = None if msg.body & p.VHOST_USER_VRING_NOFD_MASK else msg.take_fds()[0]
        if fd is not None:
            if why := _not_an_eventfd(fd):
                os.close(fd)
                raise RequestRefused(f"vring {index}: {which}: {why}")
            # An eventfd whose counter is at its maximum blocks a writer: never the ring's thread.
            os.set_blocking(fd, False)
        if which == "kick_fd":
            vr.stop()
            if fd is None:
                vr.set_fd(which, None)
                raise RequestRefused(f"vring {index}: polling without a kick fd is not supported")
        vr.set_fd(which, fd)
        if which == "kick_fd":
            self._maybe_start(vr)

    def _set_vring_enable(self, msg: Message) -> None:
        vr = self._vring(msg.body.index)
        vr.enabled = bool(msg.body.num)
        log.debug("vring %d %s", vr.index, "enabled" if vr.enabled else "disabled")
        if vr.enabled and vr.running:
            os.eventfd_write(vr.kick_fd, 1)   # look at the ring now

    def _maybe_start(self, vr: Vring) -> None:
        if vr.running or vr.kick_fd is None or vr.addr is None or not vr.size:
            return
        if self.mem is None:
            raise RequestRefused("ring start before SET_MEM_TABLE")
        if not self.features & (1 << p.VHOST_USER_F_PROTOCOL_FEATURES):
            vr.enabled = True   # without protocol features rings start enabled
        vr.start(self.mem, self.features, self.server, self._shared,
                 self._file_io, self._pool)

    def _file_io(self, gpa: int, length: int, fd: int, file_offset: int, to_file: bool) -> int:
        """IoVec resolver for buffers outside the memory table: FS_IO, if there is a channel."""
        mapper = self.mapper
        if mapper is None:
            raise ForeignBufferError(gpa, length)
        return mapper.file_io(gpa, length, fd, file_offset, to_file)

    # --- the back-end request channel ------------------------------------------------------
    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self._has(p.VHOST_USER_PROTOCOL_F_BACKEND_REQ):
            raise RequestRefused("SET_BACKEND_REQ_FD without BACKEND_REQ")
        fd = msg.take_fds()[0]
        try:
            channel = socket.socket(fileno=fd)
        except OSError:   # not a socket: refused, and the fd is ours to close
            os.close(fd)
            raise
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = channel
        needed = (p.VHOST_USER_PROTOCOL_F_REPLY_ACK, p.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD)
        if all(self._has(b) for b in needed):
            self.mapper = BackendChannelMapper(self.backend_channel,
                                               self._has(p.VHOST_USER_PROTOCOL_F_SHMEM))
            log.info("DAX requests go over the back-end channel (%s)",
                     "SHMEM_MAP" if self.mapper.use_shmem else "legacy FS_MAP")
        else:
            self.mapper = None
            log.info("back-end channel without REPLY_ACK/BACKEND_SEND_FD: no DAX")
        self.server.dax = self.mapper

    # --- reset and teardown ----------------------------------------------------------------
    def _reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER: stop every ring, forget the device state."""
        for vr in self.vrings:
            vr.close()
            vr.size, vr.addr, vr.base, vr.enabled = 0, None, 0, False
        self.server.destroy()
        log.info("device reset")

    def close(self) -> None:
        for vr in self.vrings:
            vr.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.server.destroy()
        self.server.dax = None
        if self.mapper is not None:
            c = self.mapper.counts
            log.info("DAX: %d ranges mapped, %d unmapped, %d FS_IO copies", c["map"], c["unmap"],
                     c["io"])
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
