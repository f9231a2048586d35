"""Fuzz target: the virtio-pci transport as the guest driver sees it
(pyvmm/devices/virtio/pci.py over pyvmm/pci/config.py and pci/msix.py).

A virtio-rng device on the PCI transport, with a fake KVM VM that checks
irqfd/ioeventfd use the way KVM would (tests/test_msix.py).  The input is a
sequence of guest accesses: PCI config space reads and writes of 1, 2 or 4
bytes (BARs, capabilities, the PCI_CFG window, MSI-X control), BAR 0 reads and
writes (common configuration, ISR, device config, notify, MSI-X table and PBA)
and BAR moves.  Nothing a guest does may raise; a bug the device logs (its
queue worker) counts as a crash too.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing  # noqa: E402

if __name__ == "__main__":
    fuzzing.run(__file__)   # before pyvmm is imported: see fuzzing.run

from fuzzing import Input, checked, pack  # noqa: E402

from pyvmm.devices.virtio import pci as vp  # noqa: E402
from pyvmm.devices.virtio.rng import VirtioRng  # noqa: E402
from pyvmm.irq import GsiRouter  # noqa: E402
from pyvmm.memory import GuestMemory  # noqa: E402
from test_msix import FakeVm  # noqa: E402

RAM = 2 << 20
SIZES = (1, 2, 4)
BAR_SIZES = (1, 2, 4, 8)
BAR0_ADDRESSES = (None, 0xE000_0000, 0xFEB0_0000)

_mem: GuestMemory | None = None


def _memory() -> GuestMemory:
    global _mem   # one memfd for the run; queues the guest sets up point into it
    if _mem is None:
        _mem = GuestMemory(RAM)
    return _mem


def fuzz_one(data: bytes) -> None:
    with checked():
        vm = FakeVm()
        pci = vp.VirtioPciDevice(VirtioRng(), _memory(), vm, GsiRouter(vm))
        try:
            _run(Input(data), pci)
        finally:
            pci.close()


def _value(inp: Input, size: int) -> bytes:
    return inp.take(size)


def _run(inp: Input, pci: vp.VirtioPciDevice) -> None:
    bar0 = None
    while len(inp):
        op = inp.u8() % 7
        if op == 0:
            pci.config_read(inp.u8(), inp.pick(SIZES))
        elif op == 1:
            offset, size = inp.u8(), inp.pick(SIZES)
            pci.config_write(offset, _value(inp, size))
        elif op == 2:    # the common configuration, where most of the state machine is
            size = inp.pick(SIZES)
            pci.bar_write(vp.BAR0, vp.COMMON_OFFSET + inp.u8() % 64, _value(inp, size))
        elif op == 3:
            pci.bar_read(vp.BAR0, vp.COMMON_OFFSET + inp.u8() % 64, inp.pick(SIZES))
        elif op == 4:
            size = inp.pick(BAR_SIZES)
            pci.bar_write(vp.BAR0, inp.u16() % vp.BAR0_SIZE, _value(inp, size))
        elif op == 5:
            pci.bar_read(vp.BAR0, inp.u16() % vp.BAR0_SIZE, inp.pick(BAR_SIZES))
        else:
            new = inp.pick(BAR0_ADDRESSES)
            pci.bar_moved(vp.BAR0, bar0, new)
            bar0 = new


def _common(offset: int, value: int, size: int) -> bytes:
    return bytes([2, SIZES.index(size), offset]) + value.to_bytes(size, "little")


def seeds() -> list[bytes]:
    """What Linux's virtio_pci_modern does: reset, ACK|DRIVER, features, FEATURES_OK,
    queue 0 set-up, DRIVER_OK, a notify; then MSI-X enable and a vector."""
    init = (_common(vp.DEVICE_STATUS, 0, 1) + _common(vp.DEVICE_STATUS, 3, 1)
            + _common(vp.DRIVER_FEATURE_SELECT, 1, 4) + _common(vp.DRIVER_FEATURE, 1, 4)
            + _common(vp.DEVICE_STATUS, 11, 1) + _common(vp.QUEUE_SELECT, 0, 2)
            + _common(vp.QUEUE_SIZE, 8, 2) + _common(vp.QUEUE_DESC, 0x10000, 4)
            + _common(vp.QUEUE_DRIVER, 0x11000, 4) + _common(vp.QUEUE_DEVICE, 0x12000, 4)
            + _common(vp.QUEUE_ENABLE, 1, 2) + _common(vp.DEVICE_STATUS, 15, 1))
    notify = bytes([4, 0]) + pack("H", vp.NOTIFY_OFFSET) + b"\0"
    moved = bytes([6, 1, 6, 2])
    config = bytes([0, 0, 0, 1, 0x10, 2]) + pack("I", 0xFFFFFFFF) + bytes([0, 0x10, 2])
    return [init + notify + moved, config + bytes([5]) + pack("H", vp.MSIX_TABLE_OFFSET) + b"\2",
            init + bytes([2, 0, vp.DEVICE_STATUS, 0])]

