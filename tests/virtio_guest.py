"""A virtio-pci function as a guest sees it, for the device-state tests.

``PciGuest`` plugs a ``VirtioPciDevice`` into a ``PciRoot`` (with a fake KVM VM
and real guest RAM) and plays the guest driver: feature negotiation, MSI-X,
ring set-up through the common configuration (rings laid out by
``test_virtqueue.Driver``), kicks (what KVM's ioeventfd does) and waiting for
the interrupt eventfd (what KVM's irqfd would consume).
"""

from __future__ import annotations

import copy
import os
import select
import struct
import time

from pyvmm.bus import Bus
from pyvmm.devices.virtio import pci as vp
from pyvmm.devices.virtio.device import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                                         VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
                                         VIRTIO_F_EVENT_IDX)
from pyvmm.irq import GsiRouter
from pyvmm.memory import GuestMemory
from pyvmm.pci.msix import PCI_MSIX_FLAGS_ENABLE
from pyvmm.pci.root import PciRoot
from test_msix import FakeVm
from test_pci_root import W32, W64
from test_virtqueue import Driver

RAM = 8 << 20
RINGS = 0x10000          # queue q's rings at RINGS + q * STRIDE
STRIDE = 0x8000
DATA = 0x200000          # request buffers


class PciGuest:
    def __init__(self, model, mem: GuestMemory | None = None, slots=None) -> None:
        self.vm = FakeVm()
        self.router = GsiRouter(self.vm)
        self.mem = mem if mem is not None else GuestMemory(RAM)
        self.mmio = Bus("mmio")
        self.root = PciRoot(self.mmio, W32, W64)
        self.model = model
        self.pci = vp.VirtioPciDevice(model, self.mem, self.vm, self.router)
        self.slot = self.root.add(self.pci)
        self.rings: dict[int, Driver] = {}
        self.next_data = DATA

    # --- common configuration ------------------------------------------------------------------
    def rd(self, offset: int, size: int) -> int:
        return int.from_bytes(self.pci.bar_read(0, offset, size), "little")

    def wr(self, offset: int, value: int, size: int) -> None:
        self.pci.bar_write(0, offset, value.to_bytes(size, "little"))

    def init_driver(self, queues: list[int], size: int = 16, event_idx: bool = False) -> int:
        """Linux's order: status, features, MSI-X (vector 0: config, q + 1: queue q),
        the rings, DRIVER_OK.  Returns the features written."""
        ack = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        self.wr(vp.DEVICE_STATUS, ack, 1)
        features = self.pci.offered_features()
        if not event_idx:
            features &= ~(1 << VIRTIO_F_EVENT_IDX)
        for sel in (0, 1):
            self.wr(vp.DRIVER_FEATURE_SELECT, sel, 4)
            self.wr(vp.DRIVER_FEATURE, (features >> (32 * sel)) & 0xFFFFFFFF, 4)
        self.wr(vp.DEVICE_STATUS, ack | VIRTIO_CONFIG_S_FEATURES_OK, 1)
        self.pci.config_write(self.pci.msix_cap + 2, PCI_MSIX_FLAGS_ENABLE.to_bytes(2, "little"))
        for v in range(self.pci.msix.num_vectors):
            self.pci.bar_write(0, vp.MSIX_TABLE_OFFSET + 16 * v,
                               struct.pack("<IIII", 0xFEE00000, 0, 0x40 + v, 0))
        self.wr(vp.CONFIG_MSIX_VECTOR, 0, 2)
        for q in queues:
            base = RINGS + q * STRIDE
            d = Driver(self.mem, size=size, desc=base, avail=base + 0x1000, used=base + 0x2000,
                       max_size=max(size, 256))
            self.rings[q] = d
            self.wr(vp.QUEUE_SELECT, q, 2)
            self.wr(vp.QUEUE_SIZE, size, 2)
            self.wr(vp.QUEUE_MSIX_VECTOR, q + 1, 2)
            for field, addr in ((vp.QUEUE_DESC, d.desc), (vp.QUEUE_DRIVER, d.avail), (vp.QUEUE_DEVICE, d.used)):
                self.wr(field, addr & 0xFFFFFFFF, 4)
                self.wr(field + 4, addr >> 32, 4)
            self.wr(vp.QUEUE_ENABLE, 1, 2)
        self.wr(vp.DEVICE_STATUS, ack | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK, 1)
        return features

    def driver_snapshot(self) -> tuple[dict[int, Driver], int]:
        """The guest driver's own bookkeeping (in a real guest it is in guest RAM)."""
        return {q: copy.copy(d) for q, d in self.rings.items()}, self.next_data

    def adopt(self, snapshot: tuple[dict[int, Driver], int]) -> None:
        """Continue as the driver of ``driver_snapshot()`` (after a restore into self)."""
        rings, self.next_data = snapshot
        self.rings = {q: copy.copy(d) for q, d in rings.items()}
        for d in self.rings.values():
            d.mem = self.mem

    # --- requests ----------------------------------------------------------------------------------
    def buffer(self, data: bytes | int) -> tuple[int, int]:
        content = bytes(data)   # an int: that many zero bytes
        gpa = self.next_data
        self.next_data += (len(content) + 0xFFF) & ~0xFFF
        self.mem.write(gpa, content)
        return gpa, len(content)

    def post(self, q: int, out: bytes = b"", in_len: int = 0) -> tuple[int, int | None]:
        """Publish one chain (a readable buffer with ``out``, a writable one of
        ``in_len`` bytes) and kick; returns (head, gpa of the writable buffer)."""
        d = self.rings[q]
        outs = [self.buffer(out)] if out else []
        ins = [self.buffer(in_len)] if in_len else []
        head = d.add(out=outs, in_=ins)
        self.kick(q)
        return head, ins[0][0] if ins else None

    def kick(self, q: int) -> None:
        os.eventfd_write(self.pci.kicks[q].eventfd, 1)

    def call_fd(self, q: int) -> int:
        return self.pci.msix.eventfds[self.pci.queues[q].msix_vector]

    def wait_used(self, q: int, idx: int, timeout: float = 5.0) -> None:
        d = self.rings[q]
        deadline = time.monotonic() + timeout
        while d.used_idx() != idx:
            assert time.monotonic() < deadline, f"queue {q}: used idx {d.used_idx()}, waited for {idx}"
            time.sleep(0.005)

    def wait_call(self, q: int, timeout: float = 5.0) -> None:
        fd = self.call_fd(q)
        r, _, _ = select.select([fd], [], [], timeout)
        assert r, f"queue {q}: no interrupt"
        os.eventfd_read(fd)

    def close(self, keep_mem: bool = False) -> None:
        self.root.close()
        if not keep_mem:
            self.mem.close()


def copy_ram(src: GuestMemory) -> GuestMemory:
    """Guest RAM as a restore brings it back: a new memfd with the same bytes."""
    dst = GuestMemory(src.size)
    for r in src.ranges:
        dst.write(r.gpa, src.read(r.gpa, r.size))
    return dst
