"""virtio-fs (virtio v1.2, 5.11) with a vhost-user backend.

The VMM owns only the control plane: the PCI function, the configuration
space (tag, number of request queues) and the vhost-user conversation.  The
data path never touches Python: the guest's kicks are KVM ioeventfds handed
to the backend as kick fds, and the backend's call fds are the MSI-X vectors'
irqfd eventfds (``pyvmm.pci.msix``).

Queues: index 0 is the high-priority queue (FORGET, INTERRUPT), 1..N the
request queues.  The backend is connected and its features read when the
device is created, so a missing backend is an error at start-up.

A vCPU waits for the back-end at DRIVER_OK (``start_backend``) and at a reset:
each of these conversations has one overall budget, ``operation_timeout``
seconds for all its messages (``VhostUserFrontend.deadline``).  A back-end that
misses it fails the operation (NEEDS_RESET, or a reset without its help).

Snapshot: ``stop_backend`` (the transport's quiesce) stops each started ring
with GET_VRING_BASE and keeps the base it answers; ``save_state`` records the
device's configuration and those bases.  A restore builds the device anew
against a NEW back-end (a fresh connection made by the constructor), and the
transport's ``start_backend`` hands it each ring with SET_VRING_BASE at its
saved base.  The back-end's FUSE session (INIT, nodes, open files) is not part
of a snapshot: a guest that had mounted the share meets a back-end that knows
none of its nodes.  A snapshot point comes before the mount.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct
import threading

from ...vhost_user import protocol as vu
from ...vhost_user.frontend import (DEFAULT_PROTOCOL_FEATURES, BackendError, VhostUserError,
                                    VhostUserFrontend, guest_memory_regions, serve_backend_requests)
from ...snapshot.fields import SaveRefused, expect_keys, items, optional, text, uint
from .dax_window import VIRTIO_FS_SHMCAP_ID_CACHE, DaxShm, DaxWindow, DaxWindows
from .device import VIRTIO_ID_FS, VirtioDevice

log = logging.getLogger(__name__)

VIRTIO_FS_TAG_LEN = 36          # 5.11.4: tag is 36 bytes, not NUL-terminated when full
DEFAULT_QUEUE_SIZE = 1024
# Seconds one activation (DRIVER_OK), reset or ring stop may wait on the back-end in
# all, whatever the number of messages: a vCPU thread waits for it.
OPERATION_TIMEOUT = 10.0
# Backend feature bits that are vhost's business, not the guest driver's:
# NOTIFY_ON_EMPTY (24), VHOST_F_LOG_ALL (26), VHOST_USER_F_PROTOCOL_FEATURES (30).
VHOST_ONLY_FEATURES = (1 << 24) | (1 << 26) | (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
# Without a DAX window there is nothing for SHMEM_MAP to map into.
PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES & ~(1 << vu.VHOST_USER_PROTOCOL_F_SHMEM)
FS_UNMAP_ALL = (1 << 64) - 1    # legacy FS_UNMAP length meaning "the whole window"
FUSE_IN_HEADER_SIZE = 40        # struct fuse_in_header (include/uapi/linux/fuse.h)
FUSE_OUT_HEADER_SIZE = 16       # struct fuse_out_header: len u32, error s32, unique u64
_STATE_KEYS = ("tag", "num_request_queues", "queue_size", "dax", "ring_bases")


def handle_dax_request(window: DaxWindow | None, msg: vu.Message,
                       windows: DaxWindows | None = None) -> int:
    """One back-end request on the DAX window: FS_MAP/FS_UNMAP/FS_SYNC (legacy, up to
    8 entries), SHMEM_MAP/SHMEM_UNMAP, or FS_IO (routed through ``windows``, the VM's
    windows at their current guest addresses).  ``window`` is the device's own (None:
    a device without DAX, which serves FS_IO only).  Invalid requests raise ValueError
    (DaxWindow validates every offset and length before any mmap), which becomes a
    failure ack.

    The rules (docs/vhost-user-dax.md 2.6): SHMEM_MAP may not overlap a mapping but
    may replace exactly one of the very same range; SHMEM_UNMAP names exactly one whole
    mapping.  The legacy family keeps its own meaning: FS_MAP replaces what is there,
    FS_UNMAP may cover holes and parts of mappings; an FS_MAP of several entries is all
    or nothing (every entry is checked before the first is mapped)."""
    if msg.request == vu.VHOST_USER_BACKEND_FS_IO:
        return _fs_io(windows, msg)
    if window is None:
        raise ValueError(f"{msg.name}: this virtio-fs device has no DAX window")
    if msg.request == vu.VHOST_USER_BACKEND_FS_MAP:
        _fs_map(window, msg)
    elif msg.request in (vu.VHOST_USER_BACKEND_FS_UNMAP, vu.VHOST_USER_BACKEND_FS_SYNC):
        for _, c_offset, length, _ in msg.body.entries():
            if msg.request == vu.VHOST_USER_BACKEND_FS_SYNC:
                window.sync(c_offset, length)
            elif length == FS_UNMAP_ALL:
                window.unmap_all()
            else:
                window.unmap(c_offset, length)
    elif msg.request in (vu.VHOST_USER_BACKEND_SHMEM_MAP, vu.VHOST_USER_BACKEND_SHMEM_UNMAP):
        body = msg.body
        if body.shmid != VIRTIO_FS_SHMCAP_ID_CACHE:
            raise ValueError(f"shared memory region {body.shmid} does not exist")
        if msg.request == vu.VHOST_USER_BACKEND_SHMEM_MAP:
            if len(msg.fds) != 1:
                raise ValueError(f"SHMEM_MAP needs exactly one fd, got {len(msg.fds)}")
            window.map(body.shm_offset, body.len, msg.fds[0], body.fd_offset,
                       writable=bool(body.flags & vu.VHOST_USER_FLAG_MAP_RW), exclusive=True)
        else:
            window.unmap(body.shm_offset, body.len, exact=True)
    else:
        raise ValueError(f"{msg.name} is not a request pyvmm serves")
    return 0


def _fs_map(window: DaxWindow, msg: vu.Message) -> None:
    """Legacy FS_MAP, all or nothing: every entry is validated before any is mapped, and
    a host failure part-way unmaps the entries this request already mapped."""
    if len(msg.fds) != 1:
        raise ValueError(f"FS_MAP needs exactly one fd, got {len(msg.fds)}")
    entries = []
    for fd_offset, c_offset, length, flags in msg.body.entries():
        if not flags & (vu.VHOST_USER_FS_FLAG_MAP_R | vu.VHOST_USER_FS_FLAG_MAP_W):
            raise ValueError("FS_MAP entry asks for neither read nor write access")
        entry = (c_offset, length, msg.fds[0], fd_offset, bool(flags & vu.VHOST_USER_FS_FLAG_MAP_W))
        window.check_map(*entry)
        entries.append(entry)
    done = []
    try:
        for entry in entries:
            window.map(*entry)
            done.append(entry)
    except (OSError, ValueError):
        for c_offset, length, *_ in done:
            window.unmap(c_offset, length)
        raise


def _fs_io(windows: DaxWindows | None, msg: vu.Message) -> int:
    """FS_IO: copy between the attached file and guest buffers that lie in a DAX window
    of this VM, whichever device's (a back-end's memory table does not cover them).
    Each entry's c_offset is a guest-physical address; MAP_W moves guest bytes to the
    file.  The ack is the total moved; a short copy (end of file) ends the request."""
    if len(msg.fds) != 1:
        raise ValueError(f"FS_IO needs exactly one fd, got {len(msg.fds)}")
    total = 0
    for fd_offset, gpa, length, flags in msg.body.entries():
        found = windows.locate(gpa, length) if windows is not None else None
        if found is None:
            raise OSError(errno.EFAULT, f"FS_IO range {gpa:#x}+{length:#x} is not in a DAX window")
        window, offset = found
        try:
            moved = window.file_io(offset, length, msg.fds[0], fd_offset,
                                   to_file=bool(flags & vu.VHOST_USER_FS_FLAG_MAP_W))
        except OSError:
            if total:   # what was moved stays moved: report it
                break
            raise
        total += moved
        if moved < length:
            break
    return total


class virtio_fs_config(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("tag", ctypes.c_char * VIRTIO_FS_TAG_LEN),
                ("num_request_queues", ctypes.c_uint32)]


assert ctypes.sizeof(virtio_fs_config) == 40


class VirtioFs(VirtioDevice):
    """A virtio-fs device whose requests a vhost-user backend serves."""

    device_id = VIRTIO_ID_FS
    external_datapath = True   # the transport runs no worker: the backend owns the rings

    def __init__(self, tag: str, socket_path: str, num_request_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, dax_window: int | None = None,
                 slots=None, windows: DaxWindows | None = None,
                 operation_timeout: float = OPERATION_TIMEOUT) -> None:
        super().__init__()
        raw = tag.encode()
        if not raw or len(raw) > VIRTIO_FS_TAG_LEN or b"\0" in raw:
            raise ValueError(f"virtio-fs tag {tag!r} must be 1 to {VIRTIO_FS_TAG_LEN} bytes")
        if not 1 <= num_request_queues <= 64:
            raise ValueError("num_queues must be from 1 to 64")
        if not 1 <= queue_size <= 32768 or queue_size & (queue_size - 1):
            raise ValueError("queue_size must be a power of two up to 32768")
        self.tag = raw
        self.num_request_queues = num_request_queues
        self.num_queues = 1 + num_request_queues
        self.queue_max_size = queue_size
        self.socket_path = socket_path
        self.operation_timeout = operation_timeout
        try:
            self.frontend = VhostUserFrontend(socket_path)
            self.backend_features = self.frontend.negotiate(
                DEFAULT_PROTOCOL_FEATURES if dax_window else PROTOCOL_FEATURES, min_queues=self.num_queues)
        except VhostUserError as e:
            raise ValueError(f"--fs tag={tag}: {e}") from None
        # The DAX window (BAR 2): a host reservation registered as a KVM memory slot.
        self.dax: DaxShm | None = None
        self._request_channel = None
        if dax_window:
            if not self.frontend.has_protocol_feature(vu.VHOST_USER_PROTOCOL_F_BACKEND_REQ):
                self.frontend.close()
                raise ValueError(f"--fs tag={tag},dax=on: the backend at {socket_path} offers no "
                                 "backend request channel, so it cannot map files into a DAX window")
            if not self.frontend.has_protocol_feature(vu.VHOST_USER_PROTOCOL_F_SHMEM):
                log.warning("virtio-fs %s: dax=on with a backend that does not offer SHMEM_MAP: "
                            "expecting the legacy FS_MAP requests (a backend without DAX, such "
                            "as Debian's C virtiofsd, cannot serve a DAX mount)", tag)
            self.dax = DaxShm(DaxWindow(dax_window), slots, VIRTIO_FS_SHMCAP_ID_CACHE)
        # The VM's DAX windows, for FS_IO: a buffer on this device's queue may lie in any
        # device's window (docs/vhost-user-dax.md 2.1).
        self.windows = windows if windows is not None else DaxWindows()
        if self.dax is not None:
            self.windows.add(self.dax)
        self._started = False      # this connection has the device's features and memory
        self._ring_bases: dict[int, int] | None = None   # rings stopped by stop_backend
        self._backend_gone = False
        self._take_over = None
        self._closed = threading.Event()
        threading.Thread(target=self._watch_backend, name=f"virtio-fs-{tag}-watch", daemon=True).start()

    def _watch_backend(self, period: float = 0.5) -> None:
        """Log, once, a backend that goes away: the VM keeps running without the share."""
        while not self._closed.wait(period):
            if self.frontend.hung_up():
                log.error("virtio-fs %s: vhost-user backend %s went away; pyvmm answers the "
                          "share's requests with ENOTCONN, the VM keeps running",
                          self.tag.decode(), self.socket_path)
                self._answer_for_dead_backend()
                return

    def _answer_for_dead_backend(self) -> None:
        """Serve the rings ourselves, failing every request, so the guest sees errors
        instead of waiting forever (docs/vhost-user-dax.md 6: a dead backend leaves the VM running).
        The watch thread: the transport's take-over runs ``_resume_rings`` under its lock."""
        self._backend_gone = True
        take_over = self._take_over
        if take_over is not None:
            take_over(self._resume_rings)

    def _resume_rings(self) -> None:
        """Continue each ready ring after the last request the back-end completed
        (transport lock held, no worker runs)."""
        for index, q in enumerate(self.queues):
            if q.ready:
                # A request's data buffers may lie in a DAX window (O_DIRECT I/O into a DAX
                # mapping); its FUSE headers are in RAM, which is all an error reply needs.
                # Refused as a bad chain, it would complete with nothing written, and the
                # guest would take that for success.
                q.foreign_buffers = True
                try:
                    q.resume_from_ring()
                except ValueError as e:  # the ring is not in guest RAM any more
                    log.warning("virtio-fs %s: queue %d: %s", self.tag.decode(), index, e)
                    self.broken_queues.add(index)

    # --- VirtioDevice -------------------------------------------------------------------
    def device_features(self) -> int:
        """The backend's virtio features, as it offers them (VERSION_1 included)."""
        return self.backend_features & ~VHOST_ONLY_FEATURES

    def transport_features(self) -> int:
        return 0  # no ring features the backend did not offer itself

    def config_bytes(self) -> bytes:
        return bytes(virtio_fs_config(tag=self.tag, num_request_queues=self.num_request_queues))

    def process_queue(self, index: int) -> None:
        """Only after the backend died: answer every request with ENOTCONN."""
        if self._backend_gone:
            self.serve_queue(index, self._fail_request)

    def _fail_request(self, chain) -> int:
        """A FUSE reply carrying only an error (fuse_out_header: len, error, unique)."""
        if chain.writable_len() < FUSE_OUT_HEADER_SIZE:
            return 0  # FORGET and friends expect no reply
        try:
            header = chain.read(self.mem, 0, FUSE_IN_HEADER_SIZE)
        except ValueError:
            header = b""
        unique = struct.unpack_from("<Q", header, 8)[0] if len(header) >= 16 else 0
        reply = struct.pack("<IiQ", FUSE_OUT_HEADER_SIZE, -errno.ENOTCONN, unique)
        try:
            return chain.write(self.mem, reply)
        except ValueError:
            return 0

    def shared_memory_regions(self) -> list[tuple[int, int]]:
        return self.dax.shared_memory_regions() if self.dax else []

    def shm_is_memory(self) -> bool:
        return self.dax is not None

    def shm_moved(self, old: int | None, new: int | None) -> None:
        if self.dax is not None:
            self.dax.shm_moved(old, new)

    def _wants_request_channel(self) -> bool:
        """A DAX device always; one without DAX when the back-end can send FS_IO (it
        needs BACKEND_REQ, BACKEND_SEND_FD for the file and REPLY_ACK for the count)."""
        if self.dax is not None:
            return True
        return all(self.frontend.has_protocol_feature(bit) for bit in (
            vu.VHOST_USER_PROTOCOL_F_BACKEND_REQ, vu.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD,
            vu.VHOST_USER_PROTOCOL_F_REPLY_ACK))

    def _serve_backend_requests(self) -> None:
        """Open the back-end request channel and serve FS_MAP, FS_IO & co. on a thread."""
        if self._request_channel is not None:
            return
        self._request_channel = self.frontend.set_backend_req_fd()
        threading.Thread(target=self._backend_request_loop, args=(self._request_channel,),
                         name=f"virtio-fs-{self.tag.decode()}-backend-req", daemon=True).start()

    def _backend_request_loop(self, channel) -> None:
        window = self.dax.window if self.dax is not None else None
        tag = self.tag.decode()
        reason = serve_backend_requests(channel, lambda msg: handle_dax_request(window, msg, self.windows),
                                        label=f"virtio-fs {tag}")
        if reason is not None and not self._closed.is_set():
            log.error("virtio-fs %s: back-end request channel closed, its stream cannot be "
                      "trusted (%s): no more DAX mappings or FS_IO for this share, the guest "
                      "gets errors for new mappings; the VM keeps running", tag, reason)

    def start_backend(self, kick_fds: list[int], call_fds: list[int], take_over=None) -> None:
        """DRIVER_OK (on a vCPU thread): ``_hand_rings_over`` within one budget of
        ``operation_timeout`` seconds, however many messages it takes."""
        self._take_over = take_over
        with self.frontend.deadline(self.operation_timeout):
            self._hand_rings_over(kick_fds, call_fds)

    def _hand_rings_over(self, kick_fds: list[int], call_fds: list[int]) -> None:
        """Hand guest memory and every ready ring to the backend.  After
        ``stop_backend`` or a restore, each ring resumes at the base it stopped at."""
        fe = self.frontend
        if not self._started:   # a connection that has not seen the device yet
            fe.set_features(self.driver_features)
            fe.set_mem_table(guest_memory_regions(self.mem))
        bases = self._ring_bases or {}
        for index, q in enumerate(self.queues):
            if not q.ready:
                continue
            fe.setup_vring(index, size=q.size, desc=q.desc_addr, avail=q.driver_addr,
                           used=q.device_addr, kick_fd=kick_fds[index], call_fd=call_fds[index],
                           base=bases.get(index, 0))
        self._ring_bases = None
        if self._wants_request_channel():
            self._serve_backend_requests()
        self._started = True
        log.info("virtio-fs %s: backend %s serves %d queues%s", self.tag.decode(), self.socket_path,
                 sum(q.ready for q in self.queues),
                 f" from bases {bases}" if bases else "")

    def stop_backend(self) -> None:
        """Stop every started ring (SET_VRING_ENABLE 0, GET_VRING_BASE); the back-end
        finishes the requests it took first.  Keeps each ring's base for start_backend."""
        if self._backend_gone:
            return   # the transport's worker serves the rings; it stops that itself
        bases = self._ring_bases or {}
        try:
            with self.frontend.deadline(self.operation_timeout):
                for index in sorted(self.frontend.started_vrings):
                    bases[index] = self.frontend.stop_vring(index)
        except (VhostUserError, OSError) as e:
            raise SaveRefused(f"virtio-fs {self.tag.decode()}: the back-end did not stop its "
                              f"rings: {e}") from None
        finally:
            self._ring_bases = bases
        log.info("virtio-fs %s: rings stopped at %s", self.tag.decode(), bases)

    # --- snapshot -------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The configuration this device was built with (checked on restore), the
        DAX window (refused when it has mappings) and the base of each stopped ring
        (null: a ring the back-end was not serving)."""
        tag = self.tag.decode()
        if self._backend_gone:
            raise SaveRefused(f"virtio-fs {tag}: its back-end {self.socket_path} went away; the "
                              "device only fails requests now, a snapshot would carry that on")
        if self._started and self._ring_bases is None:
            raise SaveRefused(f"virtio-fs {tag}: the back-end still serves the rings (quiesce first)")
        bases = self._ring_bases or {}
        for index, base in sorted(bases.items()):
            used = int.from_bytes(self.mem.read(self.queues[index].device_addr + 2, 2), "little")
            if used != base:
                raise SaveRefused(f"virtio-fs {tag}: ring {index} stopped at {base} with its used "
                                  f"index at {used}: the back-end has requests in flight, which a "
                                  "new back-end could not complete")
        return {
            "tag": tag,
            "num_request_queues": self.num_request_queues,
            "queue_size": self.queue_max_size,
            "dax": None if self.dax is None else self.dax.save_state(),
            "ring_bases": [bases.get(i) for i in range(self.num_queues)],
        }

    def parse_state(self, state: object, path: str) -> dict[int, int]:
        """Same tag, queues, queue size and DAX window as this device; the bases."""
        expect_keys(state, _STATE_KEYS, path)
        for name, here in (("tag", self.tag.decode()), ("num_request_queues", self.num_request_queues),
                           ("queue_size", self.queue_max_size)):
            saved = (text(state[name], f"{path}.{name}", VIRTIO_FS_TAG_LEN) if name == "tag"
                     else uint(state[name], f"{path}.{name}", 1 << 16))
            if saved != here:
                raise ValueError(f"{path}.{name}: {saved!r} in the snapshot, {here!r} here")
        if (state["dax"] is None) != (self.dax is None):
            saved, here = ("none", "one") if state["dax"] is None else ("one", "none")
            raise ValueError(f"{path}.dax: {saved} DAX window in the snapshot, {here} here")
        if self.dax is not None:
            self.dax.parse_state(state["dax"], f"{path}.dax")
        listed = items(state["ring_bases"], f"{path}.ring_bases", self.num_queues)
        if len(listed) != self.num_queues:
            raise ValueError(f"{path}.ring_bases: {len(listed)} rings, this device has {self.num_queues}")
        bases = {i: optional(lambda v, p: uint(v, p, 0xFFFF), v, f"{path}.ring_bases[{i}]")
                 for i, v in enumerate(listed)}
        return {i: base for i, base in bases.items() if base is not None}

    def apply_state(self, parsed: dict[int, int]) -> None:
        self._ring_bases = dict(parsed)

    def reset(self) -> None:
        # A back-end that went away has nothing left to reset (asking it would only
        # log a broken pipe at every VM stop after a back-end death).
        if self._started and not self._backend_gone:
            try:   # on a vCPU thread: one budget for the whole sequence
                with self.frontend.deadline(self.operation_timeout):
                    self.frontend.reset_device()
            except (VhostUserError, OSError) as e:
                log.warning("virtio-fs %s: backend reset failed: %s", self.tag.decode(), e)
        self._started = False
        self._ring_bases = None
        if self.dax is not None:
            self.dax.reset()   # every mapping goes back to the reserved state
        super().reset()

    def close(self) -> None:
        self._closed.set()
        if self._request_channel is not None:
            try:
                self._request_channel.shutdown(2)  # SHUT_RDWR ends the serving thread
            except OSError:
                pass
            self._request_channel.close()
        self.frontend.close()
        if self.dax is not None:
            self.windows.remove(self.dax)
            self.dax.close()


__all__ = ["VirtioFs", "BackendError"]
