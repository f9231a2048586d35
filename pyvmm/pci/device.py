"""A PCI function: configuration space plus BAR regions.

Subclasses fill in ``config`` (ids, BARs, capabilities) and implement
``bar_read``/``bar_write`` for their memory BARs.  The root complex
(``pyvmm.pci.root``) maps each BAR on the MMIO bus where the guest programs
it and calls ``bar_moved`` so that a device can follow with what is not on
the bus: ioeventfds on notify addresses, a KVM memory slot behind a BAR.
"""

from __future__ import annotations

from typing import Any

from ..snapshot.fields import expect_keys
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

    # --- snapshot: see PciRoot.save_state / restore_state ------------------------------
    def quiesce(self) -> None:
        """Stop whatever works on the device's behalf outside vCPU exits, so that
        ``save_state`` sees a still picture (threads, back-ends)."""

    def resume(self) -> None:
        """Restart what ``quiesce`` (or ``apply_state``) left stopped."""

    def save_state(self) -> dict:
        return {"config": self.config.save_state()}

    def parse_state(self, state: object, path: str) -> Any:
        """Check saved state (ValueError naming the field); nothing changes yet."""
        expect_keys(state, ("config",), path)
        return self.config.parse_state(state["config"], f"{path}.config")

    def apply_state(self, parsed: Any) -> None:
        """Load what ``parse_state`` returned.  BAR mappings are the root's job."""
        self.config.apply_state(parsed)

    def restore_state(self, state: dict, path: str | None = None) -> None:
        """Check, then load (a device on its own; on a bus, PciRoot.restore_state)."""
        self.apply_state(self.parse_state(state, path or self.name))


class BarRegion:
    """Bus adapter: one mapped BAR of a device on the MMIO bus."""

    def __init__(self, device: PciDevice, bar: int) -> None:
        self.device = device
        self.bar = bar
        self.name = f"{device.name}.bar{bar}"   # what the exit trace shows

    def read(self, offset: int, size: int) -> bytes:
        return self.device.bar_read(self.bar, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.device.bar_write(self.bar, offset, data)
