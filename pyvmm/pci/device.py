"""A PCI function: configuration space plus BAR regions.

Subclasses fill in ``config`` (ids, BARs, capabilities) and implement
``bar_read``/``bar_write`` for their memory BARs.  The root complex
(``pyvmm.pci.root``) maps each BAR on the MMIO bus where the guest programs
it and calls ``bar_moved`` so that a device can follow with what is not on
the bus: ioeventfds on notify addresses, a KVM memory slot behind a BAR.
"""

from __future__ import annotations

from .config import PciConfigSpace


class PciDevice:
    name = "pci-device"

    def __init__(self, config: PciConfigSpace) -> None:
        self.config = config

    def config_read(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        pass

    def bar_moved(self, bar: int, old: int | None, new: int | None) -> None:
        """BAR ``bar`` stopped decoding at ``old`` and/or started at ``new``."""

    def bar_is_mmio(self, bar: int) -> bool:
        """False for a BAR backed by a KVM memory slot instead of MMIO exits."""
        return True

    def close(self) -> None:
        pass


class BarRegion:
    """Bus adapter: one mapped BAR of a device on the MMIO bus."""

    def __init__(self, device: PciDevice, bar: int) -> None:
        self.device = device
        self.bar = bar

    def read(self, offset: int, size: int) -> bytes:
        return self.device.bar_read(self.bar, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.device.bar_write(self.bar, offset, data)
