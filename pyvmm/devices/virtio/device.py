"""The transport-independent part of a virtio device (virtio v1.2, 2.1-2.7).

A device model subclasses ``VirtioDevice``: it names its device id, queues,
feature bits and configuration space, and processes the chains the driver
makes available.  The PCI transport (``pyvmm.devices.virtio.pci``) owns the
feature negotiation, the status state machine, the queues' addresses and the
interrupts, and calls into the device at these points:

* ``activate(mem, queues, interrupt)`` once the driver sets DRIVER_OK;
* ``process_queue(index)`` from the device's worker thread after a kick;
* ``reset()`` when the driver writes 0 to the status or the VM stops.

``interrupt(index)`` (given at activation) interrupts the driver: it says that used buffers are
ready on queue ``index``; it honours VIRTIO_RING_F_EVENT_IDX and masking.

Snapshots: the transport saves the queues, the negotiation and the interrupts;
a model saves only what is its own (``save_state``/``parse_state``/
``apply_state``; the identity of a disk, a console's pending input, ...).
``quiesce``/``resume`` stop and restart what a model does outside the
transport's worker, and ``stop_backend`` stops an external data path's rings.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ...snapshot.fields import expect_keys
from .queue import ChainError, DescriptorChain, VirtqueueError

log = logging.getLogger(__name__)

# Feature bits, reserved range (virtio v1.2, 6 "Reserved Feature Bits")
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

# Device status bits (2.1)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128

# Device ids (5 "Device Types")
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_FS = 26

TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)


class VirtioDevice:
    """Base class of device models; see the module docstring."""

    device_id: int = 0
    num_queues: int = 1
    queue_max_size: int = 256

    def __init__(self) -> None:
        self.mem = None
        self.queues: list = []
        self.broken_queues: set[int] = set()   # rings that hit VirtqueueError, until reset
        self._interrupt: Callable[[int], None] | None = None
        self.driver_features = 0
        self.needs_reset: Callable[[], None] = lambda: None  # set by the transport
        # Set by the transport: the worker is being stopped (reset, quiesce, close),
        # so stop after the chain in progress.
        self.stop_requested: Callable[[], bool] = lambda: False

    # --- what a subclass defines -------------------------------------------------------
    external_datapath = False  # True: a backend (vhost-user) serves the rings, see start_backend

    def device_features(self) -> int:
        """Device-specific feature bits; the transport adds ``transport_features()``."""
        return 0

    def transport_features(self) -> int:
        """Ring and version features the transport offers on the device's behalf."""
        return TRANSPORT_FEATURES

    def start_backend(self, kick_fds: list[int], call_fds: list[int],
                      take_over: Callable[[Callable[[], None]], None]) -> None:
        """External data path only: after ``activate``, hand the rings to the backend
        with each queue's kick eventfd (a KVM ioeventfd) and call eventfd (an irqfd).
        ``take_over(prepare)`` (any thread, for when the backend is gone) takes the
        transport lock and, unless the device was reset meanwhile, calls ``prepare()``
        (the model readies the rings) and starts the transport's own worker on them:
        from then on ``process_queue`` is called."""
        raise NotImplementedError

    def stop_backend(self) -> None:
        """External data path only: stop every ring the backend serves and remember
        where each stopped; the next ``start_backend`` resumes each ring there."""
        raise NotImplementedError

    # --- snapshot ---------------------------------------------------------------------
    def quiesce(self) -> None:
        """Stop touching the rings and interrupts from anywhere but the transport's
        worker (which the transport stops itself), e.g. host input delivery."""

    def resume(self) -> None:
        """Undo ``quiesce``."""

    def save_state(self) -> dict:
        """The model's own state (the transport saves queues and negotiation)."""
        return {}

    def parse_state(self, state: object, path: str) -> Any:
        """Check saved state against this model (ValueError); nothing changes yet."""
        expect_keys(state, (), path)
        return None

    def apply_state(self, parsed: Any) -> None:
        """Load what ``parse_state`` returned (before the transport re-activates)."""

    def restore_state(self, state: dict, path: str | None = None) -> None:
        """Check, then load (on a transport, VirtioPciDevice.restore_state does both)."""
        self.apply_state(self.parse_state(state, path or type(self).__name__))

    def config_bytes(self) -> bytes:
        """The device configuration space, little-endian, as the driver reads it."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """Driver writes into the configuration space (most devices ignore them)."""

    def process_queue(self, index: int) -> None:
        """Handle every available chain on queue ``index`` (worker thread)."""
        raise NotImplementedError

    # --- shared memory regions (2.10), e.g. the virtio-fs DAX window ----------------------
    def shared_memory_regions(self) -> list[tuple[int, int]]:
        """(shmid, size) of each region; the PCI transport puts them in BAR 2."""
        return []

    def shm_is_memory(self) -> bool:
        """True when the regions are host memory (a KVM slot) rather than MMIO."""
        return False

    def shm_moved(self, old: int | None, new: int | None) -> None:
        """The shared memory BAR stopped decoding at ``old`` and/or started at ``new``."""

    def shm_read(self, offset: int, size: int) -> bytes:
        return b"\x00" * size

    def shm_write(self, offset: int, data: bytes) -> None:
        pass

    # --- lifecycle, called by the transport -------------------------------------------
    def activate(self, mem, queues: list, interrupt: Callable[[int], None], driver_features: int) -> None:
        self.mem = mem
        self.queues = queues
        self._interrupt = interrupt
        self.driver_features = driver_features
        self.broken_queues = set()

    def reset(self) -> None:
        self.queues = []
        self._interrupt = None
        self.driver_features = 0
        self.broken_queues = set()

    def serve_queue(self, index: int, handle: Callable[[DescriptorChain], int],
                    more: Callable[[], bool] = lambda: True) -> None:
        """The device side of queue ``index``: pop each available chain while
        ``more()`` and the transport is not stopping the worker (``stop_requested``:
        reset, quiesce, close), complete it with ``handle(chain)`` bytes written,
        and interrupt the driver once at the end.  A bad chain (ChainError) is
        completed with 0 bytes; a broken ring (VirtqueueError) stops the queue
        until reset and asks the transport for NEEDS_RESET."""
        if index >= len(self.queues) or index in self.broken_queues:
            return
        q = self.queues[index]
        pushed = False
        try:
            while more() and not self.stop_requested():
                try:
                    chain = q.pop()
                except ChainError as e:
                    log.warning("%s: queue %d: %s", type(self).__name__, index, e)
                    q.push(e.head, 0)
                    pushed = True
                    continue
                if chain is None:
                    break
                q.push(chain.head, handle(chain))
                pushed = True
        except VirtqueueError as e:
            log.error("%s: queue %d broken: %s", type(self).__name__, index, e)
            self.broken_queues.add(index)
            self.needs_reset()
            return
        if pushed:
            self.interrupt(index)

    def interrupt(self, index: int) -> None:
        if self._interrupt is not None:
            self._interrupt(index)

    def config_read(self, offset: int, size: int) -> bytes:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return b"\x00" * size
        return data[offset:offset + size]

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)
