"""virtio over PCI, the modern (1.x) interface (virtio v1.2, 4.1).

One PCI function per virtio device.  BAR 0 (32-bit memory, 32 KiB) holds
every structure the driver uses, each found through a vendor-specific PCI
capability (4.1.4):

    0x0000  common configuration   (VIRTIO_PCI_CAP_COMMON_CFG)
    0x1000  ISR status             (VIRTIO_PCI_CAP_ISR_CFG)
    0x2000  device configuration   (VIRTIO_PCI_CAP_DEVICE_CFG)
    0x3000  queue notify addresses (VIRTIO_PCI_CAP_NOTIFY_CFG), 4 bytes per queue
    0x4000  MSI-X table, 0x5000 MSI-X PBA

Kicks: each queue's notify address is a KVM ioeventfd, so a guest kick wakes
the device's worker thread without a trip through the vCPU thread.
Interrupts: MSI-X only (``pyvmm.pci.msix``: irqfd per vector).  ``counters``
counts, per queue, the kicks the worker reads and the interrupts it raises
(``--stats``); a vhost-user back-end's rings bypass both.

Threads and locks.  vCPU threads reach the transport through BAR 0 (and the
PCI_CFG window), a worker thread serves the queues, and other threads may
interrupt the driver (console input) or take a dead back-end's rings over:

* ``_lock`` (the transport lock) guards the common configuration, the status
  state machine (activation, reset), the worker handle and the back-end flags.
  Whoever holds it never waits long: not for a worker (a reset whose worker is
  busy finishes on that worker when it stops, see below) and, through the
  model's own bounds, not for a back-end.
* ``_status_lock`` guards ``status``, ``generation`` and ``isr``, which worker
  threads update too (``_needs_reset``, ``_interrupt_queue``).  Nothing waits
  while holding it.
* Each ``Worker`` has its own stop flag and stop eventfd; a successor never
  shares them, and a new worker starts only once its predecessor has stopped,
  and never after ``close()`` (which closes the kick eventfds it would poll).

Reset (the driver writes 0 to device_status, 4.1.4.3.2): the worker is asked to
stop after the chain it is serving; the vCPU waits for it at most
``RESET_WAIT`` seconds.  When it is still busy, the reset is left pending and
the worker finishes it when it stops: until then device_status keeps reading
non-zero (the driver waits for 0, 2.4) and other common configuration writes
are ignored.  So the model and the queues are never reset under a live worker.

Snapshot and restore:

* ``quiesce()`` stops the worker thread once the chains it is serving are
  done (an external data path: its rings, ``VirtioDevice.stop_backend``) and
  the model's own side channels; ``resume()`` restarts exactly what it
  stopped.  Between the two the guest must not run.
* ``save_state()`` (quiesced only) saves the PCI config space, the common
  configuration (status, generation, feature selects, driver features, config
  vector, queue select), ISR, whether the device was activated, the queues,
  MSI-X and the model's own state.
* ``restore_state()`` on a freshly built device checks all of it first, then
  loads it; an activated device is activated again (``device.activate``) with
  no guest action but left quiesced: ``resume()`` starts its worker or hands
  the rings to the back-end at their saved bases.  KVM registrations follow:
  MSI-X routes and irqfds from ``Msix.apply_state``, the ioeventfds from
  ``bar_moved`` when the PCI root maps BAR 0 again.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ... import kvm
from ...irq import GsiRouter
from ...pci.config import BarInfo, PciConfigSpace
from ...pci.device import PciDevice
from ...pci.msix import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL, Msix, MsixState
from ...snapshot.fields import (SaveRefused, boolean, expect_keys, hex_bits, hex_int, index_set, items,
                                uint)
from ...trace import QueueCounters
from .device import (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
                     VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_EVENT_IDX,
                     VIRTIO_F_VERSION_1, VirtioDevice)
from .queue import Virtqueue, VirtqueueError, VirtqueueState

log = logging.getLogger(__name__)

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040   # modern device id = 0x1040 + virtio device id (4.1.2.1)
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100
VIRTIO_PCI_REVISION = 1
PCI_CAP_ID_VNDR = 0x09

# virtio_pci_cap.cfg_type (4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8

VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

BAR0 = 0
BAR0_SIZE = 0x8000
SHM_BAR = 2   # 64-bit prefetchable: shared memory regions (4.1.4.7), e.g. the DAX window
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x1000
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000

# struct virtio_pci_common_cfg field offsets (4.1.4.3)
DEVICE_FEATURE_SELECT = 0
DEVICE_FEATURE = 4
DRIVER_FEATURE_SELECT = 8
DRIVER_FEATURE = 12
CONFIG_MSIX_VECTOR = 16
NUM_QUEUES = 18
DEVICE_STATUS = 20
CONFIG_GENERATION = 21
QUEUE_SELECT = 22
QUEUE_SIZE = 24
QUEUE_MSIX_VECTOR = 26
QUEUE_ENABLE = 28
QUEUE_NOTIFY_OFF = 30
QUEUE_DESC = 32
QUEUE_DRIVER = 40
QUEUE_DEVICE = 48
COMMON_CFG_LEN = 56
COMMON_FIELDS = [  # (offset, size) of every field, for splitting guest writes
    (0, 4), (4, 4), (8, 4), (12, 4), (16, 2), (18, 2), (20, 1), (21, 1), (22, 2), (24, 2),
    (26, 2), (28, 2), (30, 2), (32, 8), (40, 8), (48, 8)]

CLASS_CODES = {2: 0x010000, 3: 0x078000, 4: 0x00FF00, 26: 0x018000}  # blk, console, rng, fs
WORKER_STOP_TIMEOUT = 10.0   # quiesce and close (no vCPU waits): how long a worker may take to stop
RESET_WAIT = 0.2             # how long a vCPU's reset waits for a worker before leaving it pending
_STATE_KEYS = ("config", "status", "generation", "device_feature_select", "driver_feature_select",
               "driver_features", "config_msix_vector", "queue_select", "isr", "active",
               "broken_queues", "queues", "msix", "device")


def virtio_pci_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"",
                   cap_id: int = 0) -> bytes:
    """struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id, pad, offset, length."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, cap_id, offset, length) + extra


def virtio_pci_cap64(cfg_type: int, bar: int, offset: int, length: int, cap_id: int) -> bytes:
    """struct virtio_pci_cap64 (4.1.4.7): a virtio_pci_cap with offset_hi and length_hi."""
    return struct.pack("<BBBBxxIIII", 24, cfg_type, bar, cap_id, offset & 0xFFFFFFFF,
                       length & 0xFFFFFFFF, offset >> 32, length >> 32)


def shm_layout(regions: list[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], int]:
    """Place shared memory regions back to back in BAR 2: [(shmid, offset, size)], BAR size."""
    placed, offset = [], 0
    for shmid, size in regions:
        if size <= 0 or size & 0xFFF:
            raise ValueError(f"shared memory region {shmid}: size {size:#x} is not whole pages")
        placed.append((shmid, offset, size))
        offset += size
    bar_size = 1 << max(offset - 1, 0xFFF).bit_length() if placed else 0
    return placed, bar_size


@dataclass(frozen=True)
class TransportState:
    """A checked snapshot of a VirtioPciDevice (``parse_state``)."""

    config: bytes
    common: dict            # status, generation, selects, driver features, vectors, ISR
    active: bool
    broken_queues: frozenset[int]
    queues: list[VirtqueueState]
    msix: MsixState
    device: object          # the model's own parsed state


@dataclass
class Kick:
    eventfd: int
    address: int | None = None   # guest-physical notify address registered with KVM


class Worker:
    """One worker thread with its own stop flag and stop eventfd.

    ``serve(worker)`` runs on the thread and returns once ``stopping`` is set or
    ``stop_fd`` is readable.  ``stop`` asks for that and waits a bounded time;
    a worker that is still busy runs the caller's ``then`` when it has stopped.
    """

    def __init__(self, name: str, serve: Callable[["Worker"], None]) -> None:
        self.stopping = threading.Event()
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stopped = threading.Event()   # serve returned: the queues are no longer touched
        self._lock = threading.Lock()      # guards _after and the life of stop_fd
        self._after: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._run, args=(serve,), name=name, daemon=True)
        self.thread.start()

    def _run(self, serve: Callable[["Worker"], None]) -> None:
        try:
            serve(self)
        finally:
            with self._lock:
                os.close(self.stop_fd)
                self.stop_fd = -1
                after, self._after = self._after, None
                self.stopped.set()
            if after is not None:
                after()

    def stop(self, timeout: float, then: Callable[[], None] | None = None) -> bool:
        """Ask the worker to stop after the chain in progress and wait up to ``timeout``
        seconds.  True: it has stopped.  False: it is still busy (or is the caller);
        ``then`` (replacing any earlier one) runs on its thread once it stops."""
        with self._lock:
            self._after = None
            if self.stopped.is_set():
                return True
            self.stopping.set()
            os.eventfd_write(self.stop_fd, 1)
        if self.thread is not threading.current_thread():
            self.stopped.wait(timeout)
        with self._lock:
            if self.stopped.is_set():
                return True
            self._after = then
            return False


class VirtioPciDevice(PciDevice):
    """A ``VirtioDevice`` on the PCI bus (the transport's state machine lives here)."""

    def __init__(self, device: VirtioDevice, mem, vm: kvm.Vm, router: GsiRouter) -> None:
        self.device = device
        self.mem = mem
        self.vm = vm
        self.name = f"virtio-{type(device).__name__}"
        conf = PciConfigSpace(PCI_VENDOR_ID_REDHAT_QUMRANET, VIRTIO_PCI_DEVICE_ID_BASE + device.device_id,
                              CLASS_CODES.get(device.device_id, 0xFF0000), VIRTIO_PCI_REVISION,
                              PCI_VENDOR_ID_REDHAT_QUMRANET, VIRTIO_PCI_SUBSYSTEM_ID)
        conf.add_bar(BarInfo(BAR0, BAR0_SIZE))
        super().__init__(conf)
        n = device.num_queues
        if n * NOTIFY_OFF_MULTIPLIER > NOTIFY_SIZE:
            raise ValueError("too many queues")
        self.msix = Msix(vm, router, n + 1, BAR0, MSIX_TABLE_OFFSET, BAR0, MSIX_PBA_OFFSET)
        conf.add_capability(PCI_CAP_ID_VNDR, virtio_pci_cap(VIRTIO_PCI_CAP_COMMON_CFG, BAR0, COMMON_OFFSET, COMMON_SIZE))
        conf.add_capability(PCI_CAP_ID_VNDR, virtio_pci_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG, BAR0, NOTIFY_OFFSET, NOTIFY_SIZE, struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        conf.add_capability(PCI_CAP_ID_VNDR, virtio_pci_cap(VIRTIO_PCI_CAP_ISR_CFG, BAR0, ISR_OFFSET, ISR_SIZE))
        conf.add_capability(PCI_CAP_ID_VNDR, virtio_pci_cap(VIRTIO_PCI_CAP_DEVICE_CFG, BAR0, DEVICE_OFFSET, DEVICE_SIZE))
        # VIRTIO_PCI_CAP_PCI_CFG (4.1.4.9): a window into the BARs through config space.
        self.pci_cfg_cap = conf.add_capability(
            PCI_CAP_ID_VNDR, virtio_pci_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, b"\x00" * 4),
            # writable: bar, offset, length and pci_cfg_data (body starts at cap_len)
            writable=bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12)
        self.shm_regions, shm_size = shm_layout(device.shared_memory_regions())
        if self.shm_regions:
            conf.add_bar(BarInfo(SHM_BAR, shm_size, is64=True, prefetchable=True))
            for shmid, offset, size in self.shm_regions:
                conf.add_capability(PCI_CAP_ID_VNDR, virtio_pci_cap64(
                    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG, SHM_BAR, offset, size, shmid))
        body, writable = self.msix.capability()
        self.msix_cap = conf.add_capability(PCI_CAP_ID_MSIX, body, writable)
        self.queues = [Virtqueue(mem, device.queue_max_size) for _ in range(n)]
        self.kicks = [Kick(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)) for _ in range(n)]
        self.counters = [QueueCounters() for _ in range(n)]   # --stats (pyvmm.trace)
        self.bar0: int | None = None
        # Which lock guards what: see the module docstring.
        self._lock = threading.RLock()         # the transport: everything below but the status
        self._status_lock = threading.Lock()   # status, generation, isr
        self._worker: Worker | None = None     # replaced only once it has stopped
        self._reset_pending = False      # a reset waits for the worker to stop
        self._spare_call_fd = -1
        self._active = False             # device.activate ran and no reset since
        self._backend_running = False    # the external data path has the rings
        self._quiesced = False
        self._resume_worker = False      # what quiesce stopped (or a restore left stopped)
        self._resume_backend = False
        self._closed = False             # close() ran: no worker may start any more
        device.needs_reset = self._needs_reset
        device.stop_requested = self._stop_requested
        self._reset_state()

    # --- state --------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.generation = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        for q in self.queues:
            q.reset()

    def offered_features(self) -> int:
        return self.device.device_features() | self.device.transport_features()

    # --- PCI plumbing ----------------------------------------------------------------------------
    def _pci_cfg_window(self) -> tuple[int, int, int, int] | None:
        """(data offset, bar, bar offset, length) of the PCI_CFG access window, if usable."""
        cap = self.pci_cfg_cap
        bar, off, length = self.config.data[cap + 4], self.config.get(cap + 8, 4), self.config.get(cap + 12, 4)
        if bar != BAR0 or length not in (1, 2, 4) or off % length or off + length > BAR0_SIZE:
            return None
        return cap + 16, bar, off, length

    def config_read(self, offset: int, size: int) -> bytes:
        window = self._pci_cfg_window()
        if window and offset == window[0] and size >= window[3]:
            _, bar, off, length = window
            return (self.bar_read(bar, off, length) + b"\x00" * 4)[:size]
        return super().config_read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        window = self._pci_cfg_window()
        if window and offset == window[0] and len(data) >= window[3]:
            _, bar, off, length = window
            self.bar_write(bar, off, bytes(data[:length]))
            return
        super().config_write(offset, data)
        control = self.msix_cap + 2
        if offset < control + 2 and offset + len(data) > control:
            self.msix.control_written(self.config.get(control, 2))

    def bar_is_mmio(self, bar: int) -> bool:
        return not (bar == SHM_BAR and self.device.shm_is_memory())

    def bar_moved(self, bar: int, old: int | None, new: int | None) -> None:
        if bar == SHM_BAR:
            self.device.shm_moved(old, new)
            return
        if bar != BAR0:
            return
        with self._lock:
            self.bar0 = new
            for index, kick in enumerate(self.kicks):
                if kick.address is not None:
                    self.vm.ioeventfd(kick.eventfd, kick.address, 0, deassign=True)
                    kick.address = None
                if new is not None:
                    kick.address = new + NOTIFY_OFFSET + index * NOTIFY_OFF_MULTIPLIER
                    # Length 0 (KVM_CAP_IOEVENTFD_ANY_LENGTH): a guest store of any width
                    # to this address signals the eventfd, and no datamatch: whatever
                    # value it writes (the queue index).  KVM completes the store itself,
                    # with no exit to this process (api.rst 4.59 KVM_IOEVENTFD).
                    self.vm.ioeventfd(kick.eventfd, kick.address, 0)

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar == SHM_BAR:
            return self.device.shm_read(offset, size)
        with self._lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_CFG_LEN:
                data = self._common_bytes() + b"\x00" * 8
                return data[offset - COMMON_OFFSET:offset - COMMON_OFFSET + size]
            if offset == ISR_OFFSET:
                with self._status_lock:
                    isr, self.isr = self.isr, 0  # read to clear (4.1.4.5)
                return bytes([isr]) + b"\x00" * (size - 1)
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
                return self.device.config_read(offset - DEVICE_OFFSET, size)
            if MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
                return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
            if MSIX_PBA_OFFSET <= offset < BAR0_SIZE:
                return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return b"\x00" * size

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar == SHM_BAR:
            self.device.shm_write(offset, data)
            return
        with self._lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_CFG_LEN:
                self._common_write(offset - COMMON_OFFSET, data)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
                self.device.config_write(offset - DEVICE_OFFSET, data)
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
                index = (offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER
                if index < len(self.kicks):  # no ioeventfd caught it: pass it on
                    os.eventfd_write(self.kicks[index].eventfd, 1)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
                self.msix.table_write(offset - MSIX_TABLE_OFFSET, data)

    # --- common configuration ---------------------------------------------------------------------
    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_bytes(self) -> bytes:
        q = self._selected_queue()
        sel = self.device_feature_select
        device_feature = (self.offered_features() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        dsel = self.driver_feature_select
        driver_feature = (self.driver_features >> (32 * dsel)) & 0xFFFFFFFF if dsel < 2 else 0
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ", self.device_feature_select, device_feature,
            self.driver_feature_select, driver_feature, self.config_msix_vector, len(self.queues),
            self.status, self.generation & 0xFF, self.queue_select,
            q.size if q else 0, q.msix_vector if q else VIRTIO_MSI_NO_VECTOR,
            int(q.ready) if q else 0, self.queue_select if q else 0,
            q.desc_addr if q else 0, q.driver_addr if q else 0, q.device_addr if q else 0)

    def _common_write(self, offset: int, data: bytes) -> None:
        if self._reset_pending:   # the driver must wait for device_status 0 first (2.4)
            log.debug("%s: common configuration write during a reset: ignored", self.name)
            return
        buf = bytearray(self._common_bytes())
        end = min(offset + len(data), COMMON_CFG_LEN)
        buf[offset:end] = data[:end - offset]
        for field, size in COMMON_FIELDS:
            if field < end and offset < field + size:
                self._set_field(field, int.from_bytes(buf[field:field + size], "little"))

    def _set_field(self, field: int, value: int) -> None:
        q = self._selected_queue()
        if field == DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif field == DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif field == DRIVER_FEATURE:
            if self.driver_feature_select < 2 and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif field == CONFIG_MSIX_VECTOR:
            self.config_msix_vector = value if value < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR
        elif field == DEVICE_STATUS:
            self._set_status(value)
        elif field == QUEUE_SELECT:
            self.queue_select = value
        elif q is None or q.ready and field != QUEUE_MSIX_VECTOR:
            return  # a live queue's layout cannot change (4.1.4.3.2)
        elif field == QUEUE_SIZE:
            if 1 <= value <= self.device.queue_max_size:
                q.size = value
        elif field == QUEUE_MSIX_VECTOR:
            q.msix_vector = value if value < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR
        elif field == QUEUE_ENABLE:
            if value == 1:
                self._enable_queue(q)
        elif field == QUEUE_DESC:
            q.desc_addr = value
        elif field == QUEUE_DRIVER:
            q.driver_addr = value
        elif field == QUEUE_DEVICE:
            q.device_addr = value

    def _enable_queue(self, q: Virtqueue) -> None:
        try:
            q.check()
        except VirtqueueError as e:
            log.warning("%s: queue %d rejected: %s", self.name, self.queue_select, e)
            self._needs_reset()
            return
        q.event_idx = bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1)
        q.ready = True

    # --- status state machine (2.1, 3.1) ------------------------------------------------------------
    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        new = value & 0xFF
        with self._status_lock:
            old = self.status
            if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
                offered = self.offered_features()
                if self.driver_features & ~offered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                    log.warning("%s: driver asked for features %#x of %#x: refused",
                                self.name, self.driver_features, offered)
                    new &= ~VIRTIO_CONFIG_S_FEATURES_OK
            self.status = new | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK \
                and new & VIRTIO_CONFIG_S_FEATURES_OK and not new & VIRTIO_CONFIG_S_FAILED:
            self._activate()

    def _activate(self) -> None:
        self.device.activate(self.mem, self.queues, self._interrupt_queue, self.driver_features)
        self._active = True
        if self._quiesced:   # started by resume()
            self._resume_backend = self.device.external_datapath
            self._resume_worker = not self.device.external_datapath
        elif self.device.external_datapath:
            self._start_backend()
        else:
            self._start_worker()
        log.info("%s: driver ready, features %#x", self.name, self.driver_features)

    def _start_backend(self) -> None:
        """Kicks go straight from KVM to the backend, calls straight from it to KVM."""
        kick_fds = [kick.eventfd for kick in self.kicks]
        call_fds = []
        for q in self.queues:
            vector = q.msix_vector if q.msix_vector < self.msix.num_vectors else None
            call_fds.append(self.msix.eventfds[vector] if vector is not None else self._no_vector_fd())
        try:
            self.device.start_backend(kick_fds, call_fds, take_over=self._take_over)
        except Exception as e:  # the backend failed or went away: the guest sees a device error
            log.error("%s: backend could not start the device: %s", self.name, e)
            self._needs_reset()
            return
        self._backend_running = True

    def _take_over(self, prepare: Callable[[], None]) -> None:
        """The back-end is gone (any thread): unless the device was reset meanwhile,
        ``prepare()`` readies the rings and the transport's worker serves them."""
        with self._lock:
            if not self._active or self._reset_pending or not (self._backend_running or self._resume_backend):
                return
            prepare()
            self._backend_running = self._resume_backend = False
            self._start_worker()

    def _start_worker(self) -> None:
        """The device's worker thread: kicks -> process_queue (transport lock held)."""
        if self._closed:     # e.g. a stopping worker's successor, after close() (its fds are gone)
            return
        if self._quiesced:   # e.g. a backend died while quiesced: resume() starts it
            self._resume_worker = True
            return
        old = self._worker
        if old is not None and not old.stop(0, then=lambda: self._successor_of(old)):
            return           # the old worker is still busy: its successor starts when it stops
        self._worker = Worker(f"{self.name}-worker", self._work)

    def _successor_of(self, old: Worker) -> None:
        """On ``old``'s thread once it has stopped: start the worker it stood in the way of."""
        with self._lock:
            if self._worker is old:
                self._worker = None
                if self._active and not self._reset_pending:
                    self._start_worker()

    def _stop_requested(self) -> bool:
        """For the model's serve loop: stop after the chain in progress."""
        worker = self._worker
        return worker is not None and worker.stopping.is_set()

    def _no_vector_fd(self) -> int:
        """A call eventfd for a queue the driver gave no MSI-X vector (nobody listens)."""
        if self._spare_call_fd < 0:
            self._spare_call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._spare_call_fd

    def _reset(self) -> None:
        """The driver wrote 0 to device_status (a vCPU thread, transport lock held).
        The reset finishes now, or on the worker once it stops (module docstring)."""
        if self._reset_pending:
            return
        worker = self._worker
        if worker is not None and not worker.stop(RESET_WAIT,
                                                  then=lambda: self._finish_pending_reset(worker)):
            self._reset_pending = True
            log.info("%s: reset waits for the worker to finish its request", self.name)
            return
        self._finish_reset()

    def _finish_pending_reset(self, worker: Worker) -> None:
        """On ``worker``'s thread once it has stopped."""
        with self._lock:
            if self._reset_pending and self._worker is worker:
                self._finish_reset()

    def _finish_reset(self) -> None:
        """No worker runs: reset the model, the queues and the common configuration."""
        self._worker = None
        self._reset_pending = False
        self.device.reset()
        with self._status_lock:
            self._reset_state()
        self._active = self._backend_running = False
        self._resume_worker = self._resume_backend = False
        for kick in self.kicks:  # drop kicks that arrived before the reset
            try:
                os.eventfd_read(kick.eventfd)
            except BlockingIOError:
                pass

    def _needs_reset(self) -> None:
        """The driver broke a ring: tell it through NEEDS_RESET and a config interrupt (2.1.2).
        Any thread (a worker, a vCPU)."""
        with self._status_lock:
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            self.generation += 1
            self.isr |= VIRTIO_PCI_ISR_CONFIG
        vector = self.config_msix_vector
        if vector != VIRTIO_MSI_NO_VECTOR:
            self.msix.interrupt(vector)

    # --- data path ------------------------------------------------------------------------------------
    def _interrupt_queue(self, index: int) -> None:
        q = self.queues[index]
        counters = self.counters[index]
        if not q.should_interrupt():
            counters.suppressed += 1   # (a race between threads may lose a count: statistics only)
            return
        with self._status_lock:
            self.isr |= VIRTIO_PCI_ISR_QUEUE
            counters.interrupts += 1
        if q.msix_vector != VIRTIO_MSI_NO_VECTOR:
            self.msix.interrupt(q.msix_vector)

    def _work(self, worker: Worker) -> None:
        """Worker thread: wait for kicks, let the device process that queue, until
        ``worker`` is asked to stop (checked between queues; serve_queue checks it
        between chains through ``device.stop_requested``)."""
        poller = select.poll()
        poller.register(worker.stop_fd, select.POLLIN)
        by_fd = {}
        for index, kick in enumerate(self.kicks):
            poller.register(kick.eventfd, select.POLLIN)
            by_fd[kick.eventfd] = index
        pending = [i for i, q in enumerate(self.queues) if q.ready]  # kicks may predate us
        while True:
            for index in pending:
                if worker.stopping.is_set():
                    return
                if self.queues[index].ready:
                    try:
                        self.device.process_queue(index)
                    except Exception:  # a device bug must not kill the worker silently
                        log.exception("%s: queue %d processing failed", self.name, index)
                        self._needs_reset()
            pending = []
            for fd, events in poller.poll():
                if fd == worker.stop_fd:
                    return
                if events & select.POLLNVAL:   # an fd closed under us: a lifecycle bug, not the guest's
                    log.error("%s: the worker's fd %d was closed under it; it stops", self.name, fd)
                    return
                try:
                    kicks = os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                index = by_fd[fd]
                self.counters[index].kicks += kicks     # the guest's kicks since the last read
                self.counters[index].wakeups += 1
                pending.append(index)

    # --- snapshot ------------------------------------------------------------------------------------
    @property
    def quiesced(self) -> bool:
        return self._quiesced

    def quiesce(self) -> None:
        """Stop everything that works on the rings outside vCPU exits: the model's side
        channels, then the worker (after the chains it is serving) or the back-end's
        rings (GET_VRING_BASE, bases kept).  SaveRefused when that fails; resume()
        then restarts whatever was stopped."""
        with self._lock:
            if self._quiesced:
                return
            if self._reset_pending:
                raise SaveRefused(f"{self.name}: a device reset waits for the worker to stop")
            self._quiesced = True
            self.device.quiesce()
            worker = self._worker
            if worker is not None:     # also the successor of a dead back-end
                self._resume_worker = True
                if not worker.stop(WORKER_STOP_TIMEOUT, then=lambda: self._successor_of(worker)):
                    raise SaveRefused(f"{self.name}: the worker did not stop within "
                                      f"{WORKER_STOP_TIMEOUT:g} s")
                self._worker = None
            elif self._backend_running:
                self._backend_running = False
                self._resume_backend = True
                self.device.stop_backend()
            log.debug("%s: quiesced", self.name)

    def resume(self) -> None:
        """Restart what quiesce() stopped, or start a restored active device."""
        with self._lock:
            if not self._quiesced:
                return
            self._quiesced = False
            self.device.resume()
            if self._resume_backend:
                self._start_backend()
            if self._resume_worker:
                self._start_worker()
            self._resume_worker = self._resume_backend = False
            log.debug("%s: resumed", self.name)

    def save_state(self) -> dict:
        with self._lock:
            if not self._quiesced:
                raise SaveRefused(f"{self.name}: quiesce() the device before save_state()")
            return {
                "config": self.config.save_state(),
                "status": hex(self.status),
                "generation": self.generation,
                "device_feature_select": hex(self.device_feature_select),
                "driver_feature_select": hex(self.driver_feature_select),
                "driver_features": hex(self.driver_features),
                "config_msix_vector": self.config_msix_vector,
                "queue_select": self.queue_select,
                "isr": hex(self.isr),
                "active": self._active,
                "broken_queues": sorted(self.device.broken_queues),
                "queues": [q.save_state() for q in self.queues],
                "msix": self.msix.save_state(),
                "device": self.device.save_state(),
            }

    def parse_state(self, state: object, path: str) -> TransportState:
        """Check everything against this device (its config space, the features it
        offers, its queue and vector counts, guest RAM, the model's own checks)."""
        if self._active or self._worker is not None or self._backend_running:
            raise RuntimeError(f"{self.name}: restore_state needs a freshly built device")
        expect_keys(state, _STATE_KEYS, path)
        config = self.config.parse_state(state["config"], f"{path}.config")
        common = self._parse_common(state, path)
        active = boolean(state["active"], f"{path}.active")
        ready = VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK
        if active and common["status"] & ready != ready:
            raise ValueError(f"{path}.active: an activated device has DRIVER_OK and FEATURES_OK "
                             f"in its status, not {common['status']:#x}")
        broken = index_set(state["broken_queues"], f"{path}.broken_queues", len(self.queues))
        if broken and not active:
            raise ValueError(f"{path}.broken_queues: broken queues on a device that is not active")
        saved_queues = items(state["queues"], f"{path}.queues", len(self.queues))
        if len(saved_queues) != len(self.queues):
            raise ValueError(f"{path}.queues: {len(saved_queues)} queues, this device has {len(self.queues)}")
        queues = [q.parse_state(v, f"{path}.queues[{i}]")
                  for i, (q, v) in enumerate(zip(self.queues, saved_queues))]
        for i, q in enumerate(queues):
            self._check_vector(q.msix_vector, f"{path}.queues[{i}].msix_vector")
        msix = self.msix.parse_state(state["msix"], f"{path}.msix")
        control = int.from_bytes(config[self.msix_cap + 2:self.msix_cap + 4], "little")
        if (msix.enabled, msix.function_masked) != (bool(control & PCI_MSIX_FLAGS_ENABLE),
                                                    bool(control & PCI_MSIX_FLAGS_MASKALL)):
            raise ValueError(f"{path}.msix: enabled/function_masked do not match the MSI-X "
                             f"message control {control:#06x} in the config space")
        device = self.device.parse_state(state["device"], f"{path}.device")
        return TransportState(config, common, active, broken, queues, msix, device)

    def _parse_common(self, state: dict, path: str) -> dict:
        common = {name: hex_int(state[name], f"{path}.{name}", 4)
                  for name in ("device_feature_select", "driver_feature_select")}
        common.update({
            "status": hex_int(state["status"], f"{path}.status", 1),
            "generation": uint(state["generation"], f"{path}.generation", 0xFFFFFFFF),
            "config_msix_vector": self._check_vector(
                uint(state["config_msix_vector"], f"{path}.config_msix_vector", VIRTIO_MSI_NO_VECTOR),
                f"{path}.config_msix_vector"),
            "queue_select": uint(state["queue_select"], f"{path}.queue_select", 0xFFFF),
            "isr": hex_bits(state["isr"], f"{path}.isr", VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG),
        })
        features = hex_int(state["driver_features"], f"{path}.driver_features", 8)
        extra = features & ~self.offered_features()
        if extra:
            raise ValueError(f"{path}.driver_features: {features:#x} has features this device does "
                             f"not offer ({extra:#x})")
        common["driver_features"] = features
        return common

    def _check_vector(self, vector: int, path: str) -> int:
        if vector != VIRTIO_MSI_NO_VECTOR and vector >= self.msix.num_vectors:
            raise ValueError(f"{path}: vector {vector}, this device has {self.msix.num_vectors}")
        return vector

    def apply_state(self, parsed: TransportState) -> None:
        """Load a checked state.  An active device is activated again (no worker, no
        back-end yet: it is left quiesced until resume())."""
        with self._lock:
            self.config.apply_state(parsed.config)
            for name, value in parsed.common.items():
                setattr(self, name, value)
            for q, saved in zip(self.queues, parsed.queues):
                q.apply_state(saved)
            self.msix.apply_state(parsed.msix)
            self.device.apply_state(parsed.device)
            self._quiesced = True
            self.device.quiesce()
            if parsed.active:
                self._activate()           # quiesced: records what resume() starts
                self.device.broken_queues = set(parsed.broken_queues)

    def close(self) -> None:
        """Stop the worker and give back every fd and KVM registration (idempotent)."""
        with self._lock:
            self._closed = True           # a stopping worker's successor must not start now
            worker = self._worker
            self._reset_pending = False   # done here
        if worker is not None and not worker.stop(WORKER_STOP_TIMEOUT):
            log.error("%s: the worker did not stop within %g s; the device is left as it is",
                      self.name, WORKER_STOP_TIMEOUT)
            return   # its queues, kick eventfds and vectors stay valid while it runs
        self._worker = None
        self.device.reset()
        if hasattr(self.device, "close"):
            self.device.close()
        self.msix.close()
        for kick in self.kicks:
            if kick.address is not None:
                try:
                    self.vm.ioeventfd(kick.eventfd, kick.address, 0, deassign=True)
                except OSError:
                    pass
            os.close(kick.eventfd)
        self.kicks = []
        if self._spare_call_fd >= 0:
            os.close(self._spare_call_fd)
            self._spare_call_fd = -1
