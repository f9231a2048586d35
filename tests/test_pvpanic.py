"""The pvpanic-pci device model (pyvmm/devices/pvpanic.py)."""

from pyvmm.devices.pvpanic import (PCI_DEVICE_ID_REDHAT_PVPANIC, PCI_VENDOR_ID_REDHAT,
                                   PVPANIC_CRASH_LOADED, PVPANIC_PANICKED, PvPanic)
from pyvmm.pci.config import PCI_BASE_ADDRESS_0


def test_ids_class_and_bar():
    dev = PvPanic(lambda event: None)
    assert dev.config_read(0, 4) == bytes([0x36, 0x1B, 0x11, 0x00])   # 1b36:0011
    assert (PCI_VENDOR_ID_REDHAT, PCI_DEVICE_ID_REDHAT_PVPANIC) == (0x1B36, 0x0011)
    assert dev.config_read(0x08, 4) == bytes([0x01, 0x00, 0x80, 0x08])   # rev 1, class 0880, prog-if 0
    assert 0 in dev.config.bars and dev.config.bars[0].size == 16
    dev.config_write(PCI_BASE_ADDRESS_0, b"\xff\xff\xff\xff")          # BAR sizing
    assert int.from_bytes(dev.config_read(PCI_BASE_ADDRESS_0, 4), "little") == 0xFFFFFFF0


def test_capabilities_read_and_events_reported():
    events = []
    dev = PvPanic(events.append)
    assert dev.bar_read(0, 0, 1) == bytes([PVPANIC_PANICKED | PVPANIC_CRASH_LOADED])
    dev.bar_write(0, 0, b"\x00")     # no event bit: nothing happens
    dev.bar_write(0, 4, b"\x01")     # not the event register
    assert events == []
    dev.bar_write(0, 0, b"\x01")
    dev.bar_write(0, 0, b"\x82")     # unknown bits are masked off
    assert events == [PVPANIC_PANICKED, PVPANIC_CRASH_LOADED]
    assert dev.events == PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
