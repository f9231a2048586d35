"""The PCI root complex: host bridge 00:00.0, configuration mechanism #1,
BAR allocation, and BAR mapping on the MMIO bus.

Configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): the guest writes
an address to port 0xCF8 (bit 31 enable, bus 23:16, device 15:11, function
10:8, register 7:2) and reads or writes the data at 0xCFC-0xCFF; a byte or
word access at 0xCFC+n reaches register + n.  Only bus 0, function 0.

Like a firmware, ``PciRoot.add`` assigns every BAR an address (32-bit BARs
from the MMIO hole below 4 GiB, 64-bit ones from a window above RAM) and
turns on memory decode, so Linux finds the devices ready.  Whenever the guest
rewrites a BAR or toggles memory decode, ``_remap`` moves the BAR's bus
registration and tells the device.

Snapshot: ``save_state`` holds the 0xCF8 latch and every slot's device state;
``restore_state`` loads them all, then maps each BAR where the saved config
space says, from scratch, so every device's ``bar_moved`` runs again (KVM
ioeventfds on the notify addresses, the DAX window's memory slot).
``quiesce``/``resume`` pass on to every device.
"""

from __future__ import annotations

import logging
import threading

from ..bus import Bus, BusError
from ..snapshot.fields import expect_keys, hex_int, items, text, uint
from . import config as cfg
from .config import BarInfo, PciConfigSpace
from .device import BarRegion, PciDevice

log = logging.getLogger(__name__)

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_CONFIG_IO_LEN = 8
PCI_MAX_DEVICES = 32

HOST_BRIDGE_VENDOR = 0x8086   # Intel
HOST_BRIDGE_DEVICE = 0x0D57   # a generic host bridge id, as other VMMs use
PCI_CLASS_BRIDGE_HOST = 0x060000


class HostBridge(PciDevice):
    name = "host-bridge"

    def __init__(self) -> None:
        super().__init__(PciConfigSpace(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, PCI_CLASS_BRIDGE_HOST))


class AddressWindow:
    """A bump allocator of naturally aligned BAR addresses."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.next = start, end, start

    def allocate(self, size: int) -> int:
        addr = (self.next + size - 1) & ~(size - 1)
        if addr + size > self.end:
            raise ValueError(f"no room for a {size:#x}-byte BAR in [{self.start:#x}, {self.end:#x})")
        self.next = addr + size
        return addr

    def contains(self, addr: int, size: int) -> bool:
        return self.start <= addr and addr + size <= self.end


class PciRoot:
    """Bus 0: devices by slot, config mechanism #1 on the port-I/O bus."""

    def __init__(self, mmio: Bus, window32: tuple[int, int], window64: tuple[int, int]) -> None:
        self.mmio = mmio
        self.window32 = AddressWindow(*window32)
        self.window64 = AddressWindow(*window64)
        self.devices: dict[int, PciDevice] = {}
        self._mapped: dict[tuple[int, int], int] = {}  # (slot, bar) -> address mapped on the bus
        self._address = 0
        self._lock = threading.RLock()
        self.add(HostBridge())

    # --- devices ----------------------------------------------------------------------------
    def add(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug ``device`` in, assign its BARs, enable decode; returns the slot."""
        with self._lock:
            if slot is None:
                slot = next((s for s in range(PCI_MAX_DEVICES) if s not in self.devices), None)
            if slot is None or slot in self.devices or not 0 <= slot < PCI_MAX_DEVICES:
                raise ValueError("no free PCI slot")
            conf = device.config
            for index, bar in sorted(conf.bars.items()):
                if bar.io:
                    raise ValueError("I/O BARs are not supported")
                window = self.window64 if bar.is64 else self.window32
                conf.set_bar_address(index, window.allocate(bar.size))
            if conf.bars:
                conf.set(cfg.PCI_COMMAND, conf.get(cfg.PCI_COMMAND, 2)
                         | cfg.PCI_COMMAND_MEMORY | cfg.PCI_COMMAND_MASTER, 2)
            self.devices[slot] = device
            self._remap(slot)
            log.info("pci: 00:%02x.0 %s", slot, device.name)
            return slot

    def close(self) -> None:
        for device in self.devices.values():
            device.close()

    # --- snapshot -------------------------------------------------------------------------------
    def quiesce(self) -> None:
        """Quiesce every device, by slot (see PciDevice.quiesce)."""
        for _, device in sorted(self.devices.items()):
            device.quiesce()

    def resume(self) -> None:
        """Resume every device, by slot (see PciDevice.resume)."""
        for _, device in sorted(self.devices.items()):
            device.resume()

    def save_state(self) -> dict:
        """The address latch and, by slot, each device's name and state (quiesce first)."""
        with self._lock:
            return {"address": hex(self._address),
                    "slots": [{"slot": slot, "name": device.name, "state": device.save_state()}
                              for slot, device in sorted(self.devices.items())]}

    def restore_state(self, state: dict, path: str = "pci") -> None:
        """Check every slot's state against the device plugged there (same slots, same
        names, each device's own checks), then load them and map the BARs afresh."""
        expect_keys(state, ("address", "slots"), path)
        address = hex_int(state["address"], f"{path}.address", 4)
        parsed = {}
        for i, entry in enumerate(items(state["slots"], f"{path}.slots", PCI_MAX_DEVICES)):
            where = f"{path}.slots[{i}]"
            expect_keys(entry, ("slot", "name", "state"), where)
            slot = uint(entry["slot"], f"{where}.slot", PCI_MAX_DEVICES - 1)
            device = self.devices.get(slot)
            if device is None or slot in parsed:
                raise ValueError(f"{where}.slot: {'no device is' if device is None else 'twice'} "
                                 f"in slot {slot}")
            name = text(entry["name"], f"{where}.name", 64)
            if name != device.name:
                raise ValueError(f"{where}.name: slot {slot} holds {name!r} in the snapshot, "
                                 f"{device.name!r} here")
            parsed[slot] = device.parse_state(entry["state"], f"{where}.state")
        missing = sorted(set(self.devices) - set(parsed))
        if missing:
            raise ValueError(f"{path}.slots: no state for slot(s) {', '.join(map(str, missing))}")
        with self._lock:
            self._unmap_all()
            for slot, device_state in sorted(parsed.items()):
                self.devices[slot].apply_state(device_state)
            self._address = address
            for slot in sorted(self.devices):
                self._remap(slot)

    def _unmap_all(self) -> None:
        """Take every BAR off the bus (and tell its device), so that the restored
        addresses can be mapped in any order without overlapping the old ones."""
        for (slot, index), have in sorted(self._mapped.items()):
            device = self.devices[slot]
            if device.bar_is_mmio(index):
                self.mmio.unregister(have)
            device.bar_moved(index, have, None)
        self._mapped.clear()

    # --- config mechanism #1: a port-I/O bus device at 0xCF8, 8 ports ---------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return self._address.to_bytes(4, "little")
            return b"\xff" * size
        return self._config_access(offset - 4, size, None)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 4:
            if offset == 0 and len(data) == 4:
                self._address = int.from_bytes(data, "little")
            return
        self._config_access(offset - 4, len(data), data)

    def _config_access(self, port_offset: int, size: int, data: bytes | None) -> bytes:
        address = self._address
        bus, slot, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        register = (address & 0xFC) + port_offset
        with self._lock:
            device = self.devices.get(slot)
            if not address & 0x80000000 or bus != 0 or function != 0 or device is None \
                    or register + size > cfg.CONFIG_SPACE_SIZE:
                return b"\xff" * size
            if data is None:
                return device.config_read(register, size)
            device.config_write(register, data)
            if register < cfg.PCI_BASE_ADDRESS_0 + 4 * cfg.PCI_NUM_BARS and \
                    register + size > cfg.PCI_COMMAND:
                self._remap(slot)
            return b""

    # --- BAR mapping ---------------------------------------------------------------------------
    def _remap(self, slot: int) -> None:
        """Make the bus registrations of ``slot``'s BARs match its config space."""
        device = self.devices[slot]
        conf = device.config
        decode = bool(conf.get(cfg.PCI_COMMAND, 2) & cfg.PCI_COMMAND_MEMORY)
        for index, bar in conf.bars.items():
            want = conf.bar_address(index) if decode and not conf.bar_mid_sizing(index) else None
            if want is not None and not self._acceptable(bar, want):
                want = None  # mid-sizing (all ones) or outside the windows: decode nothing
            have = self._mapped.get((slot, index))
            if want == have:
                continue
            if have is not None:
                if device.bar_is_mmio(index):
                    self.mmio.unregister(have)
                del self._mapped[(slot, index)]
            if want is not None and device.bar_is_mmio(index):
                try:
                    self.mmio.register(want, bar.size, BarRegion(device, index))
                except BusError as e:
                    log.warning("pci: 00:%02x.0 BAR%d at %#x: %s", slot, index, want, e)
                    want = None
            if want is None and have is None:
                continue
            if want is not None:
                self._mapped[(slot, index)] = want
            log.debug("pci: 00:%02x.0 BAR%d %s -> %s", slot, index,
                      f"{have:#x}" if have is not None else "off", f"{want:#x}" if want is not None else "off")
            device.bar_moved(index, have, want)

    def _acceptable(self, bar: BarInfo, addr: int) -> bool:
        return self.window32.contains(addr, bar.size) or (bar.is64 and self.window64.contains(addr, bar.size))

    def bar_address(self, slot: int, index: int) -> int | None:
        """Where BAR ``index`` of ``slot`` currently decodes (None: nowhere)."""
        return self._mapped.get((slot, index))
