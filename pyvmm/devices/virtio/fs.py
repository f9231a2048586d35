"""virtio-fs (virtio v1.2, 5.11) with a vhost-user backend.

The VMM owns only the control plane: the PCI function, the configuration
space (tag, number of request queues) and the vhost-user conversation.  The
data path never touches Python: the guest's kicks are KVM ioeventfds handed
to the backend as kick fds, and the backend's call fds are the MSI-X vectors'
irqfd eventfds (``pyvmm.pci.msix``).

Queues: index 0 is the high-priority queue (FORGET, INTERRUPT), 1..N the
request queues.  The backend is connected and its features read when the
device is created, so a missing backend is an error at start-up.
"""

from __future__ import annotations

import ctypes
import logging
import threading

from ...vhost_user import protocol as vu
from ...vhost_user.frontend import (DEFAULT_PROTOCOL_FEATURES, BackendError, VhostUserError,
                                    VhostUserFrontend, guest_memory_regions)
from .device import VIRTIO_ID_FS, VirtioDevice

log = logging.getLogger(__name__)

VIRTIO_FS_TAG_LEN = 36          # 5.11.4: tag is 36 bytes, not NUL-terminated when full
DEFAULT_QUEUE_SIZE = 1024
# Backend feature bits that are vhost's business, not the guest driver's:
# NOTIFY_ON_EMPTY (24), VHOST_F_LOG_ALL (26), VHOST_USER_F_PROTOCOL_FEATURES (30).
VHOST_ONLY_FEATURES = (1 << 24) | (1 << 26) | (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
# Without a DAX window there is nothing for SHMEM_MAP to map into.
PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES & ~(1 << vu.VHOST_USER_PROTOCOL_F_SHMEM)


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
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
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
        try:
            self.frontend = VhostUserFrontend(socket_path)
            self.backend_features = self.frontend.negotiate(PROTOCOL_FEATURES, min_queues=self.num_queues)
        except VhostUserError as e:
            raise ValueError(f"--fs tag={tag}: {e}") from None
        self._started = False
        self._closed = threading.Event()
        threading.Thread(target=self._watch_backend, name=f"virtio-fs-{tag}-watch", daemon=True).start()

    def _watch_backend(self, period: float = 0.5) -> None:
        """Log, once, a backend that goes away: the VM keeps running without the share."""
        while not self._closed.wait(period):
            if self.frontend.hung_up():
                log.error("virtio-fs %s: vhost-user backend %s went away; the share no longer "
                          "answers, the VM keeps running", self.tag.decode(), self.socket_path)
                return

    # --- VirtioDevice -------------------------------------------------------------------
    def device_features(self) -> int:
        """The backend's virtio features, as it offers them (VERSION_1 included)."""
        return self.backend_features & ~VHOST_ONLY_FEATURES

    def transport_features(self) -> int:
        return 0  # no ring features the backend did not offer itself

    def config_bytes(self) -> bytes:
        return bytes(virtio_fs_config(tag=self.tag, num_request_queues=self.num_request_queues))

    def process_queue(self, index: int) -> None:
        """Never called: the backend serves the rings."""

    def start_backend(self, kick_fds: list[int], call_fds: list[int]) -> None:
        """DRIVER_OK: hand guest memory and every ready ring to the backend."""
        fe = self.frontend
        fe.set_features(self.driver_features)
        fe.set_mem_table(guest_memory_regions(self.mem))
        for index, q in enumerate(self.queues):
            if not q.ready:
                continue
            fe.setup_vring(index, size=q.size, desc=q.desc_addr, avail=q.driver_addr,
                           used=q.device_addr, kick_fd=kick_fds[index], call_fd=call_fds[index])
        self._started = True
        log.info("virtio-fs %s: backend %s serves %d queues", self.tag.decode(), self.socket_path,
                 sum(q.ready for q in self.queues))

    def reset(self) -> None:
        if self._started:
            try:
                self.frontend.reset_device()
            except (VhostUserError, OSError) as e:
                log.warning("virtio-fs %s: backend reset failed: %s", self.tag.decode(), e)
            self._started = False
        super().reset()

    def close(self) -> None:
        self._closed.set()
        self.frontend.close()


__all__ = ["VirtioFs", "BackendError"]
