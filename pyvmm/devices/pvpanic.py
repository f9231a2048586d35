"""pvpanic-pci: the guest kernel tells the VMM that it panicked.

QEMU's ``pvpanic-pci`` device (docs/specs/pvpanic.rst in QEMU's tree), driven
by Linux's drivers/misc/pvpanic/pvpanic-pci.c (``CONFIG_PVPANIC_PCI``):

* PCI vendor 0x1b36 (Red Hat), device 0x0011, class 0x0880 (system
  peripheral, other);
* BAR 0, a small memory BAR.  Reading byte 0 returns the events the device
  supports; the driver writes one event bit there from its panic notifier,
  which runs inside ``panic()`` before ``panic=`` reboots the machine.

Events (include/uapi/misc/pvpanic.h):

* ``PVPANIC_PANICKED`` (bit 0): the guest kernel panicked;
* ``PVPANIC_CRASH_LOADED`` (bit 1): it panicked and a kdump kernel takes over.

Without this device a panic with ``panic=-1`` ends in a reboot, which looks
like a clean exit: with it, pyvmm exits with its "guest kernel panic" status.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..pci.config import BarInfo, PciConfigSpace
from ..pci.device import PciDevice
from ..snapshot.fields import expect_keys, hex_bits

log = logging.getLogger(__name__)

PCI_VENDOR_ID_REDHAT = 0x1B36
PCI_DEVICE_ID_REDHAT_PVPANIC = 0x0011
PCI_CLASS_SYSTEM_OTHER = 0x088000   # class 0x08, subclass 0x80, prog-if 0
PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
PVPANIC_EVENTS = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
BAR0_SIZE = 16   # the smallest memory BAR (PCI 3.0, 6.2.5.1); QEMU uses 2 bytes of it


class PvPanic(PciDevice):
    """Calls ``on_panic(event)`` when the guest writes an event bit to BAR 0."""

    name = "pvpanic"

    def __init__(self, on_panic: Callable[[int], None]) -> None:
        conf = PciConfigSpace(PCI_VENDOR_ID_REDHAT, PCI_DEVICE_ID_REDHAT_PVPANIC,
                              PCI_CLASS_SYSTEM_OTHER, revision=1,
                              subsystem_vendor_id=PCI_VENDOR_ID_REDHAT,
                              subsystem_id=PCI_DEVICE_ID_REDHAT_PVPANIC)
        conf.add_bar(BarInfo(0, BAR0_SIZE))
        super().__init__(conf)
        self._on_panic = on_panic
        self.events = 0   # every event bit the guest has written

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar == 0 and offset == 0:
            return bytes([PVPANIC_EVENTS]) + b"\x00" * (size - 1)
        return b"\x00" * size

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar != 0 or offset != 0 or not data:
            return
        event = data[0] & PVPANIC_EVENTS
        if not event:
            return
        self.events |= event
        log.debug("pvpanic: guest event %#x", event)
        self._on_panic(event)

    # --- snapshot ---------------------------------------------------------------------
    def save_state(self) -> dict:
        """The config space and the events seen (non-zero only after a panic)."""
        return {"config": self.config.save_state(), "events": hex(self.events)}

    def parse_state(self, state: object, path: str) -> tuple:
        expect_keys(state, ("config", "events"), path)
        return (self.config.parse_state(state["config"], f"{path}.config"),
                hex_bits(state["events"], f"{path}.events", PVPANIC_EVENTS))

    def apply_state(self, parsed: tuple) -> None:
        config, self.events = parsed
        self.config.apply_state(config)
