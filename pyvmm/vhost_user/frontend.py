"""The VMM's side of a vhost-user connection (the "front-end").

``VhostUserFrontend(path)`` connects to a back-end's Unix socket and offers one
method per front-end request.  Each call is one request/reply exchange under a
lock, so several threads may share a frontend.

Negotiation (``negotiate``): GET_FEATURES; if the back-end offers
VHOST_USER_F_PROTOCOL_FEATURES (bit 30): GET_PROTOCOL_FEATURES and
SET_PROTOCOL_FEATURES with the offered bits pyvmm understands; SET_OWNER;
GET_QUEUE_NUM when MQ was negotiated.  Once REPLY_ACK is negotiated every
request without an explicit reply carries NEED_REPLY and the call waits for
the back-end's u64 ack (non-zero: ``BackendError``).

Activation (guest DRIVER_OK): ``set_features``, ``set_mem_table``, then per queue
``setup_vring`` (NUM, ADDR, BASE, CALL, KICK, ERR, ENABLE) and finally
``set_backend_req_fd`` if the device wants back-end requests (DAX).  Device
reset: ``reset_device`` (stops every started ring with GET_VRING_BASE, then
RESET_DEVICE when the back-end offers it).

Failures, all ``VhostUserError``:
* ``BackendUnavailable``: the socket is missing or nobody listens on it;
* ``BackendError``: the back-end refused a request (error ack, empty GET_CONFIG
  reply) or broke the protocol (wrong reply) -- the latter closes the
  connection, as the spec asks of a front-end that "receives a wrong reply";
* ``BackendTimeout`` (a BackendError): no reply within ``timeout`` seconds, or
  within what is left of an operation's ``deadline``; the connection is closed
  (a late reply could not be told apart from the next).  An operation whose
  budget is spent before a request is sent fails without sending it.

Deadlines: ``with frontend.deadline(seconds):`` gives every request the calling
thread makes inside one overall budget.  A device activation or reset is one
operation however many messages it takes, so a back-end that answers each one
just inside ``timeout`` cannot hold a vCPU for minutes.
* ``BackendGone`` (a BackendError): the back-end closed the socket, or the
  connection was closed by one of the above.  Every later call raises it too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from . import protocol as p
from .protocol import Message, PeerClosed, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0

# Protocol features pyvmm understands and accepts when the back-end offers them.
DEFAULT_PROTOCOL_FEATURES = (
    (1 << p.VHOST_USER_PROTOCOL_F_MQ)
    | (1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    | (1 << p.VHOST_USER_PROTOCOL_F_BACKEND_REQ)
    | (1 << p.VHOST_USER_PROTOCOL_F_CONFIG)
    | (1 << p.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD)
    | (1 << p.VHOST_USER_PROTOCOL_F_RESET_DEVICE)
    | (1 << p.VHOST_USER_PROTOCOL_F_SHMEM)
)

# Split virtqueue area sizes (virtio v1.2 2.7): descriptor table, available ring (flags,
# idx, ring[num], used_event), used ring (flags, idx, ring[num] of 8 bytes, avail_event).
VIRTQ_MAX_SIZE = 32768


def desc_table_size(num: int) -> int:
    return 16 * num


def avail_ring_size(num: int) -> int:
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    return 6 + 8 * num


class VhostUserError(Exception):
    """Base of every error of a vhost-user connection."""


class BackendUnavailable(VhostUserError, ConnectionError):
    """The back-end socket does not exist or nothing accepts connections on it."""


class BackendError(VhostUserError):
    """The back-end refused a request or broke the protocol."""


class BackendTimeout(BackendError, TimeoutError):
    """The back-end did not answer in time; the connection has been closed."""


class BackendGone(BackendError, ConnectionError):
    """The connection to the back-end is closed."""


class FeatureNotNegotiated(VhostUserError):
    """A request that needs a (protocol) feature that was not negotiated."""


class RingAddressError(VhostUserError, ValueError):
    """A ring's guest-physical range is not inside the memory table."""


class MemoryRegion(NamedTuple):
    """One guest RAM region for SET_MEM_TABLE, with the fd that maps it."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int   # where the VMM has it mapped
    mmap_offset: int      # offset of the region in ``fd``
    fd: int


def guest_memory_regions(mem: Any) -> list[MemoryRegion]:
    """The memory table of a ``pyvmm.memory.GuestMemory`` (memfd ``fd`` at ``host_addr``,
    ``ranges`` of (gpa, size, offset))."""
    return [MemoryRegion(r.gpa, r.size, mem.host_addr + r.offset, r.offset, mem.fd)
            for r in mem.ranges]


def _bit(n: int) -> int:
    return 1 << n


class VhostUserFrontend:
    """One connection to a vhost-user back-end (see the module docstring)."""

    def __init__(self, socket_path: str | os.PathLike, *, timeout: float | None = DEFAULT_TIMEOUT,
                 connect: bool = True) -> None:
        self.path = os.fspath(socket_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed_reason: str | None = "not connected"
        self._closing = False
        self.features = 0              # virtio features the back-end offers
        self.acked_features: int | None = None
        self.backend_protocol_features = 0
        self.protocol_features = 0     # negotiated
        self.queue_num: int | None = None
        self._mem_table: list[MemoryRegion] = []
        self._vring_num: dict[int, int] = {}
        self._started: set[int] = set()
        self._local = threading.local()   # .deadline: this thread's operation deadline
        if connect:
            self.connect()

    # --- connection ------------------------------------------------------------------
    def connect(self) -> None:
        if self._sock is not None:
            raise VhostUserError(f"{self.path}: already connected")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise BackendUnavailable(
                f"vhost-user backend socket {self.path} does not exist (is the backend running?)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise BackendUnavailable(
                f"vhost-user backend socket {self.path}: connection refused (nothing listening)"
            ) from None
        except (OSError, TimeoutError) as e:
            sock.close()
            raise BackendUnavailable(
                f"cannot connect to vhost-user backend socket {self.path}: {e}") from None
        self._sock = sock
        self._closed_reason = None
        self._closing = False
        log.info("connected to vhost-user backend %s", self.path)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def hung_up(self) -> bool:
        """True when the back-end has closed its end (checked without reading)."""
        sock = self._sock
        if sock is None:
            return True
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLRDHUP)
            return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                       for _, ev in poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Close the connection.  A call waiting in another thread ends with BackendGone."""
        sock = self._sock
        if sock is None:
            return
        self._closing = True
        try:
            sock.shutdown(socket.SHUT_RDWR)   # wakes a waiting recv; does not free the fd
        except OSError:
            pass
        with self._lock:
            self._drop("closed by the VMM", level=logging.INFO)

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop(self, reason: str, level: int = logging.WARNING) -> None:
        """Close the socket for good (lock held)."""
        if self._sock is None:
            return
        log.log(level, "vhost-user backend %s: connection closed: %s", self.path, reason)
        try:
            self._sock.close()
        finally:
            self._sock = None
            self._closed_reason = reason
            self._started.clear()

    # --- the request/reply core -------------------------------------------------------
    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features & _bit(bit))

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol_feature(p.VHOST_USER_PROTOCOL_F_REPLY_ACK)

    def _require(self, bit: int, request: int) -> None:
        if not self.has_protocol_feature(bit):
            raise FeatureNotNegotiated(
                f"{p.request_name(request)} needs protocol feature bit {bit}, which "
                f"{self.path} did not negotiate")

    @contextlib.contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """One budget of ``seconds`` for every request this thread makes inside (each
        reply still waits at most ``timeout``).  Nested: the earlier end holds."""
        outer = getattr(self._local, "deadline", None)
        end = None if seconds is None else time.monotonic() + seconds
        if end is None or (outer is not None and outer < end):
            end = outer
        self._local.deadline = end
        try:
            yield
        finally:
            self._local.deadline = outer

    def _wait_limit(self, name: str) -> float | None:
        """How long the next send or reply may take: ``timeout``, or less when this
        thread's deadline is closer (BackendTimeout when it has passed)."""
        end = getattr(self._local, "deadline", None)
        if end is None:
            return self.timeout
        left = end - time.monotonic()
        if left <= 0:
            raise BackendTimeout(f"vhost-user backend {self.path}: the operation ran out of time "
                                 f"before {name}")
        return left if self.timeout is None else min(left, self.timeout)

    def _call(self, request: int, payload: Any = None, fds: Sequence[int] = (), *,
              ack: bool | None = None) -> Message | None:
        """Send one request and wait for its reply or ack.

        Returns the reply for requests with an explicit reply, None otherwise.  ``ack``
        forces (True) or suppresses (False) NEED_REPLY; default: set it when REPLY_ACK
        was negotiated.  ``fds`` stay the caller's.
        """
        name = p.request_name(request)
        explicit = p.has_explicit_reply(request)
        need_ack = not explicit and (self.reply_ack if ack is None else ack)
        data, fds = p.encode(request, payload, fds, need_reply=need_ack)
        with self._lock:
            sock = self._sock
            if sock is None:
                raise BackendGone(f"vhost-user backend {self.path}: connection is closed "
                                  f"({self._closed_reason}); cannot send {name}")
            limit = self._wait_limit(name)
            log.debug("-> %s flags=%#x size=%d fds=%d", name,
                      int.from_bytes(data[4:8], "little"), len(data) - p.VHOST_USER_HDR_SIZE,
                      len(fds))
            try:
                sock.settimeout(limit)
                p.send_bytes(sock, data, fds)
            except TimeoutError:
                self._drop(f"timed out sending {name}")
                raise BackendTimeout(f"vhost-user backend {self.path}: timed out sending {name}") from None
            except OSError as e:
                self._drop(f"sending {name} failed: {e}")
                raise BackendGone(f"vhost-user backend {self.path} is gone ({name}: {e})") from None
            if not (explicit or need_ack):
                return None
            try:
                msg = p.recv_message(sock, timeout=limit, expect_reply_to=request)
            except PeerClosed as e:
                why = "closed by the VMM" if self._closing else f"{e}"
                self._drop(f"waiting for the reply to {name}: {why}")
                raise BackendGone(f"vhost-user backend {self.path} is gone: {why} "
                                  f"(waiting for the reply to {name})") from None
            except TimeoutError:
                self._drop(f"no reply to {name} within {limit:g} s")
                raise BackendTimeout(f"vhost-user backend {self.path} did not reply to {name} "
                                     f"within {limit:g} s") from None
            except ProtocolError as e:
                self._drop(f"bad reply to {name}: {e}")
                raise BackendError(f"vhost-user backend {self.path} sent a bad reply to "
                                   f"{name}: {e}") from None
            except OSError as e:
                self._drop(f"receiving the reply to {name} failed: {e}")
                raise BackendGone(f"vhost-user backend {self.path} is gone ({name}: {e})") from None
        msg.close_fds()   # replies pyvmm asks for never carry fds; decode has checked
        if need_ack:
            if msg.body != 0:
                log.warning("vhost-user backend %s refused %s (status %#x)", self.path, name, msg.body)
                raise BackendError(f"vhost-user backend {self.path} refused {name} "
                                   f"(status {_status(msg.body)})")
            return None
        return msg

    # --- features and ownership -------------------------------------------------------
    def get_features(self) -> int:
        msg = self._call(p.VHOST_USER_GET_FEATURES)
        self.features = msg.body
        return msg.body

    def set_features(self, features: int) -> None:
        """Ack virtio ``features`` (a subset of the back-end's); keeps bit 30 when offered."""
        if features & ~self.features:
            raise ValueError(f"features {features:#x} include bits the back-end does not offer "
                             f"({features & ~self.features:#x})")
        if self.features & _bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
            features |= _bit(p.VHOST_USER_F_PROTOCOL_FEATURES)
        self._call(p.VHOST_USER_SET_FEATURES, features)
        self.acked_features = features

    @property
    def rings_start_disabled(self) -> bool:
        """With VHOST_USER_F_PROTOCOL_FEATURES acked, rings need SET_VRING_ENABLE(1)."""
        return bool((self.acked_features or 0) & _bit(p.VHOST_USER_F_PROTOCOL_FEATURES))

    def get_protocol_features(self) -> int:
        if not self.features & _bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
            raise FeatureNotNegotiated(f"{self.path} does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        msg = self._call(p.VHOST_USER_GET_PROTOCOL_FEATURES)
        self.backend_protocol_features = msg.body
        return msg.body

    def set_protocol_features(self, features: int) -> None:
        if features & ~self.backend_protocol_features:
            raise ValueError(f"protocol features {features:#x} include bits the back-end does "
                             f"not offer ({features & ~self.backend_protocol_features:#x})")
        # Never NEED_REPLY here: REPLY_ACK only takes effect once this message is processed.
        self._call(p.VHOST_USER_SET_PROTOCOL_FEATURES, features, ack=False)
        self.protocol_features = features

    def set_owner(self) -> None:
        self._call(p.VHOST_USER_SET_OWNER)

    def reset_owner(self) -> None:
        """Deprecated by the spec (back-ends may drop all state); prefer ``reset_device``."""
        self._call(p.VHOST_USER_RESET_OWNER)

    def get_queue_num(self) -> int:
        self._require(p.VHOST_USER_PROTOCOL_F_MQ, p.VHOST_USER_GET_QUEUE_NUM)
        msg = self._call(p.VHOST_USER_GET_QUEUE_NUM)
        self.queue_num = msg.body
        return msg.body

    def negotiate(self, protocol_features: int = DEFAULT_PROTOCOL_FEATURES, *,
                  min_queues: int = 1) -> int:
        """The connection-time sequence; returns the back-end's virtio features."""
        features = self.get_features()
        if features & _bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self.get_protocol_features()
            self.set_protocol_features(offered & protocol_features)
        self.set_owner()
        if self.has_protocol_feature(p.VHOST_USER_PROTOCOL_F_MQ):
            n = self.get_queue_num()
            if n < min_queues:
                raise BackendError(f"vhost-user backend {self.path} supports {n} queues, "
                                   f"the device needs {min_queues}")
        log.info("vhost-user backend %s: features %#x, protocol features %#x (offered %#x)%s",
                 self.path, features, self.protocol_features, self.backend_protocol_features,
                 f", {self.queue_num} queues" if self.queue_num is not None else "")
        return features

    # --- memory ----------------------------------------------------------------------
    def set_mem_table(self, regions: Iterable[MemoryRegion | tuple]) -> None:
        """Send the guest RAM regions, each with its fd (in region order)."""
        regions = [MemoryRegion(*r) for r in regions]
        if not 1 <= len(regions) <= p.VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"a memory table has 1..{p.VHOST_MEMORY_BASELINE_NREGIONS} "
                             f"regions, not {len(regions)}")
        table = p.VhostUserMemory(nregions=len(regions))
        for i, r in enumerate(regions):
            table.regions[i] = p.VhostUserMemoryRegion(r.guest_phys_addr, r.memory_size,
                                                       r.userspace_addr, r.mmap_offset)
        self._call(p.VHOST_USER_SET_MEM_TABLE, table, [r.fd for r in regions])
        self._mem_table = regions

    @property
    def mem_table(self) -> list[MemoryRegion]:
        return list(self._mem_table)

    def translate(self, gpa: int, size: int) -> int:
        """The VMM (user) address of guest-physical [gpa, gpa+size) per the memory table."""
        for r in self._mem_table:
            if r.guest_phys_addr <= gpa and gpa + size <= r.guest_phys_addr + r.memory_size:
                return r.userspace_addr + (gpa - r.guest_phys_addr)
        raise RingAddressError(f"guest-physical range {gpa:#x}+{size:#x} is not in the "
                               "vhost-user memory table")

    # --- vrings ----------------------------------------------------------------------
    def _check_index(self, index: int) -> None:
        if not 0 <= index <= p.VHOST_USER_VRING_IDX_MASK:
            raise ValueError(f"vring index {index} is out of range 0..{p.VHOST_USER_VRING_IDX_MASK}")
        if self.queue_num is not None and index >= self.queue_num:
            raise ValueError(f"vring index {index}: the back-end has {self.queue_num} queues")

    def set_vring_num(self, index: int, num: int) -> None:
        self._check_index(index)
        if not 1 <= num <= VIRTQ_MAX_SIZE:
            raise ValueError(f"vring {index}: queue size {num} is out of range 1..{VIRTQ_MAX_SIZE}")
        self._call(p.VHOST_USER_SET_VRING_NUM, p.VhostVringState(index, num))
        self._vring_num[index] = num

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, *,
                       translate: Callable[[int, int], int] | None = None,
                       flags: int = 0, log_guest_addr: int = 0) -> tuple[int, int, int]:
        """Send the ring addresses: guest-physical ``desc``/``avail``/``used`` become VMM
        addresses through ``translate(gpa, size)`` (default: the memory table).

        Needs the queue size from ``set_vring_num``.  Returns the (desc, avail, used) user
        addresses sent.  A range outside guest RAM raises RingAddressError, nothing sent.
        """
        self._check_index(index)
        num = self._vring_num.get(index)
        if num is None:
            raise ValueError(f"vring {index}: SET_VRING_NUM must come before SET_VRING_ADDR")
        translate = translate or self.translate
        addrs = []
        for what, gpa, size in (("descriptor table", desc, desc_table_size(num)),
                                ("available ring", avail, avail_ring_size(num)),
                                ("used ring", used, used_ring_size(num))):
            try:
                addrs.append(translate(gpa, size))
            except ValueError as e:
                raise RingAddressError(f"vring {index} {what} at {gpa:#x}+{size:#x}: {e}") from None
        d, a, u = addrs
        self._call(p.VHOST_USER_SET_VRING_ADDR, p.VhostVringAddr(index, flags, d, u, a, log_guest_addr))
        return d, a, u

    def set_vring_base(self, index: int, base: int) -> None:
        """The next available index the back-end will process (0 on a fresh ring)."""
        self._check_index(index)
        if not 0 <= base <= 0xFFFF:
            raise ValueError(f"vring {index}: base {base} is not a 16-bit ring index")
        self._call(p.VHOST_USER_SET_VRING_BASE, p.VhostVringState(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stop the ring; returns the next available index it would have processed."""
        self._check_index(index)
        msg = self._call(p.VHOST_USER_GET_VRING_BASE, p.VhostVringState(index, 0))
        self._started.discard(index)
        if msg.body.index != index:
            raise BackendError(f"vhost-user backend {self.path}: GET_VRING_BASE for vring "
                               f"{index} answered for vring {msg.body.index}")
        return msg.body.num

    def _set_vring_fd(self, request: int, index: int, fd: int | None) -> None:
        self._check_index(index)
        if fd is None:
            self._call(request, index | p.VHOST_USER_VRING_NOFD_MASK)
        else:
            self._call(request, index, [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the guest's notifications arrive on (None: the back-end polls)."""
        self._set_vring_fd(p.VHOST_USER_SET_VRING_KICK, index, fd)
        self._started.add(index)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the back-end signals used buffers on (an irqfd)."""
        self._set_vring_fd(p.VHOST_USER_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(p.VHOST_USER_SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._check_index(index)
        if not self.features & _bit(p.VHOST_USER_F_PROTOCOL_FEATURES):
            raise FeatureNotNegotiated(f"SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES, "
                                       f"which {self.path} does not offer")
        self._call(p.VHOST_USER_SET_VRING_ENABLE, p.VhostVringState(index, int(bool(enable))))

    def setup_vring(self, index: int, *, size: int, desc: int, avail: int, used: int,
                    kick_fd: int | None, call_fd: int | None, err_fd: int | None = None,
                    base: int = 0, translate: Callable[[int, int], int] | None = None,
                    enable: bool = True) -> None:
        """Start one ring: NUM, ADDR, BASE, CALL, KICK, ERR (if given), ENABLE.

        SET_VRING_ENABLE(1) is sent only when rings start disabled (bit 30 acked).
        """
        self.set_vring_num(index, size)
        self.set_vring_addr(index, desc, avail, used, translate=translate)
        self.set_vring_base(index, base)
        self.set_vring_call(index, call_fd)
        self.set_vring_kick(index, kick_fd)
        if err_fd is not None:
            self.set_vring_err(index, err_fd)
        if enable and self.rings_start_disabled:
            self.set_vring_enable(index, True)

    def stop_vring(self, index: int) -> int:
        """Disable (when rings can be disabled) and stop a ring; returns its base."""
        if self.rings_start_disabled:
            self.set_vring_enable(index, False)
        return self.get_vring_base(index)

    @property
    def started_vrings(self) -> set[int]:
        return set(self._started)

    def reset_device(self) -> dict[int, int]:
        """Device reset: stop every started ring, then RESET_DEVICE if negotiated.

        Returns {index: base} of the stopped rings.  Without RESET_DEVICE the back-end
        keeps its other state, which the next activation (SET_FEATURES, SET_MEM_TABLE,
        per-ring setup) overwrites.  RESET_OWNER is not sent: the spec deprecates it.
        """
        bases = {i: self.stop_vring(i) for i in sorted(self._started)}
        if self.has_protocol_feature(p.VHOST_USER_PROTOCOL_F_RESET_DEVICE):
            self._call(p.VHOST_USER_RESET_DEVICE)
            self.acked_features = None    # the back-end is back to its initial state
            self._vring_num.clear()
        return bases

    # --- back-end channel, config, shared memory ----------------------------------------
    def set_backend_req_fd(self) -> socket.socket:
        """Create the back-end request channel; returns the VMM's end of the socketpair.

        Receive requests on it with ``protocol.recv_message(sock, channel=Channel.BACKEND)``
        and answer with ``protocol.send_ack`` when they carry NEED_REPLY.
        """
        self._require(p.VHOST_USER_PROTOCOL_F_BACKEND_REQ, p.VHOST_USER_SET_BACKEND_REQ_FD)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._call(p.VHOST_USER_SET_BACKEND_REQ_FD, None, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def get_config(self, offset: int, size: int, flags: int = p.VHOST_SET_CONFIG_TYPE_FRONTEND) -> bytes:
        self._require(p.VHOST_USER_PROTOCOL_F_CONFIG, p.VHOST_USER_GET_CONFIG)
        req = _config(offset, bytes(size), flags)
        msg = self._call(p.VHOST_USER_GET_CONFIG, req)
        if msg.body is None:
            raise BackendError(f"vhost-user backend {self.path} refused GET_CONFIG {offset}+{size}")
        if (msg.body.offset, msg.body.size) != (offset, size):
            with self._lock:
                self._drop("GET_CONFIG reply for a different range")
            raise BackendError(f"vhost-user backend {self.path}: GET_CONFIG {offset}+{size} "
                               f"answered {msg.body.offset}+{msg.body.size}")
        return msg.body.data

    def set_config(self, offset: int, data: bytes, flags: int = p.VHOST_SET_CONFIG_TYPE_FRONTEND) -> None:
        self._require(p.VHOST_USER_PROTOCOL_F_CONFIG, p.VHOST_USER_SET_CONFIG)
        self._call(p.VHOST_USER_SET_CONFIG, _config(offset, data, flags))

    def get_shmem_config(self) -> list[int]:
        """Shared memory region sizes indexed by shmid (needs F_SHMEM)."""
        self._require(p.VHOST_USER_PROTOCOL_F_SHMEM, p.VHOST_USER_GET_SHMEM_CONFIG)
        msg = self._call(p.VHOST_USER_GET_SHMEM_CONFIG)
        return list(msg.body.memory_sizes)


def serve_backend_requests(sock: socket.socket, handle: Callable[[Message], int | None], *,
                           label: str = "vhost-user") -> str | None:
    """Serve the back-end request channel (from ``set_backend_req_fd``) until it closes.

    For every valid request ``handle(msg)`` runs and returns the ack status (0 or None:
    success).  An exception from it becomes a failure ack: ``-errno`` for an OSError,
    ``-EINVAL`` for a ValueError, ``-EIO`` for anything else (logged with its traceback).
    The handler may ``msg.take_fds()`` to keep descriptors; the rest are closed after it
    returns.  The ack is sent only when the request set NEED_REPLY.

    An invalid request is logged and answered ``-EINVAL`` when it asked for a reply, and
    serving goes on: the header's size field frames the stream, so a wrong version,
    reserved flag bits, an unknown code, a bad payload or too many fds cost that request
    only.  The channel is closed only when the stream itself cannot be trusted any more:
    a size beyond the protocol's maximum, a short read (the back-end closed it in the
    middle of a message), a failed receive or ack.  Then the loop shuts the socket down,
    so that a back-end waiting for an ack sees the end at once instead of waiting for
    it, and returns the reason (for the caller to report, once).  It returns None when the
    back-end closed its end at a message boundary, or when another thread stopped the
    loop with ``sock.shutdown(socket.SHUT_RDWR)``.  The caller closes ``sock`` afterwards.
    """
    while True:
        try:
            msg = p.recv_message(sock, channel=p.Channel.BACKEND)
        except PeerClosed as e:
            if e.mid_message:
                return _distrust(sock, label, str(e))
            log.info("%s: back-end request channel closed", label)
            return None
        except ProtocolError as e:
            if not e.in_sync:
                return _distrust(sock, label, str(e))
            log.warning("%s: invalid back-end request refused: %s", label, e)
            if e.need_reply and e.request is not None:
                try:
                    p.send_ack(sock, e.request, -errno.EINVAL, channel=p.Channel.BACKEND)
                except OSError as err:
                    return _distrust(sock, label, f"cannot send an ack: {err}")
            continue
        except OSError as e:
            return _distrust(sock, label, f"receive failed: {e}")
        if msg.is_reply:   # the VMM never sends requests on this channel
            log.warning("%s: unexpected %r on the back-end request channel", label, msg)
            msg.close_fds()
            continue
        try:
            status = handle(msg) or 0
        except OSError as e:
            log.warning("%s: %s failed: %s", label, msg.name, e)
            status = -(e.errno or errno.EIO)
        except ValueError as e:
            log.warning("%s: %s refused: %s", label, msg.name, e)
            status = -errno.EINVAL
        except Exception:
            log.exception("%s: %s handler failed", label, msg.name)
            status = -errno.EIO
        finally:
            msg.close_fds()
        if msg.need_reply:
            try:
                p.send_ack(sock, msg.request, status, channel=p.Channel.BACKEND)
            except OSError as e:
                return _distrust(sock, label, f"cannot ack {msg.name}: {e}")


def _distrust(sock: socket.socket, label: str, reason: str) -> str:
    """End the back-end request channel for good: the socket is shut down so that the
    back-end's pending and later requests fail at once; the caller reports ``reason``."""
    log.debug("%s: back-end request channel shut down: %s", label, reason)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return reason


def _config(offset: int, data: bytes, flags: int) -> p.VhostUserConfig:
    if not (0 <= offset and len(data) <= p.VHOST_USER_MAX_CONFIG_SIZE
            and offset + len(data) <= p.VHOST_USER_MAX_CONFIG_SIZE):
        raise ValueError(f"config access {offset}+{len(data)} is outside the "
                         f"{p.VHOST_USER_MAX_CONFIG_SIZE}-byte config space")
    cfg = p.VhostUserConfig(offset=offset, size=len(data), flags=flags)
    cfg.region[:len(data)] = list(data)
    return cfg


def _status(value: int) -> str:
    """An ack value for humans: QEMU sends 1, rust-vmm -errno as u64."""
    if value >= 1 << 63:
        neg = (1 << 64) - value
        try:
            return f"-{neg} ({os.strerror(neg)})"
        except (ValueError, OverflowError):
            return f"-{neg}"
    return f"{value:#x}"
