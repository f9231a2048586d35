"""Fuzz target: the virtio-pci transport and PCI configuration space as a guest
reaches them (pyvmm/devices/virtio/pci.py, pyvmm/pci/config.py, pci/root.py,
pci/msix.py).

A virtio-rng device on the PCI transport, plugged into the PCI root on a
port-I/O and an MMIO bus as pyvmm.vm wires it (tests/test_pci_root.py), with
a fake KVM VM that checks irqfd/ioeventfd use the way KVM would
(tests/test_msix.py).  The input is a sequence of guest accesses:
configuration mechanism #1 (address latch, data reads and writes of 1, 2 or
4 bytes: BARs, command register, capabilities, the PCI_CFG window, MSI-X
control), MMIO reads and writes of BAR 0 wherever the guest put it (common
configuration, ISR, device config, notify, MSI-X table and PBA), and writes
of guest RAM (rings and chains for the device's worker).  Nothing a guest
does may raise or make a device log a bug.
"""

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
from pyvmm.pci.root import PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA  # noqa: E402
from test_msix import FakeVm  # noqa: E402
from test_pci_root import W32, Machine  # noqa: E402

RAM = 2 << 20
AREA = 256 << 10      # the guest RAM an input may write (rings, buffers)
SIZES = (1, 2, 4)
BAR_SIZES = (1, 2, 4, 8)
CONF1_ENABLE = 0x80000000

_mem: GuestMemory | None = None


def _memory() -> GuestMemory:
    global _mem   # one memfd for the run; each input starts from zeroed rings
    if _mem is None:
        _mem = GuestMemory(RAM)
    return _mem


def fuzz_one(data: bytes) -> None:
    with checked():
        mem = _memory()
        mem.write(0, bytes(AREA))
        vm, machine = FakeVm(), Machine()
        pci = vp.VirtioPciDevice(VirtioRng(), mem, vm, GsiRouter(vm))
        slot = machine.root.add(pci)
        try:
            _run(Input(data), machine, slot, mem)
        finally:
            machine.root.close()


def _run(inp: Input, m: Machine, slot: int, mem: GuestMemory) -> None:
    while len(inp):
        op = inp.u8() % 8
        bar0 = m.root.bar_address(slot, vp.BAR0)
        bar0 = W32[0] if bar0 is None else bar0
        if op == 0:
            address = inp.u32() if inp.u8() == 0xFF else CONF1_ENABLE | (slot << 11) | inp.u8()
            m.pio.write(PCI_CONFIG_ADDRESS, (address & 0xFFFFFFFF).to_bytes(4, "little"))
        elif op == 1:
            m.pio.read(PCI_CONFIG_DATA + inp.u8() % 4, inp.pick(SIZES))
        elif op == 2:
            port = PCI_CONFIG_DATA + inp.u8() % 4
            m.pio.write(port, inp.take(inp.pick(SIZES)))
        elif op == 3:    # the common configuration, where most of the state machine is
            offset = vp.COMMON_OFFSET + inp.u8() % 64
            m.mmio.write(bar0 + offset, inp.take(inp.pick(SIZES)))
        elif op == 4:
            m.mmio.read(bar0 + vp.COMMON_OFFSET + inp.u8() % 64, inp.pick(SIZES))
        elif op == 5:
            offset = inp.u16() % vp.BAR0_SIZE
            m.mmio.write(bar0 + offset, inp.take(inp.pick(BAR_SIZES)))
        elif op == 6:
            m.mmio.read(bar0 + inp.u16() % vp.BAR0_SIZE, inp.pick(BAR_SIZES))
        else:
            mem.write(inp.u16() * 4 % AREA, inp.blob(64))


def _common(offset: int, value: int, size: int) -> bytes:
    return bytes([3, offset, SIZES.index(size)]) + value.to_bytes(size, "little")


def _ram(gpa: int, data: bytes) -> bytes:
    return bytes([7]) + pack("H", gpa // 4) + pack("H", len(data)) + data


def seeds() -> list[bytes]:
    """What Linux's virtio_pci_modern does: reset, ACK|DRIVER, features, FEATURES_OK,
    queue 0 at 0x10000/0x11000/0x12000, DRIVER_OK; a chain with one writable buffer
    made available and notified; MSI-X enabled through config space."""
    init = (_common(vp.DEVICE_STATUS, 0, 1) + _common(vp.DEVICE_STATUS, 3, 1)
            + _common(vp.DRIVER_FEATURE_SELECT, 1, 4) + _common(vp.DRIVER_FEATURE, 1, 4)
            + _common(vp.DEVICE_STATUS, 11, 1) + _common(vp.QUEUE_SELECT, 0, 2)
            + _common(vp.QUEUE_SIZE, 8, 2) + _common(vp.QUEUE_MSIX_VECTOR, 1, 2)
            + _common(vp.QUEUE_DESC, 0x10000, 4) + _common(vp.QUEUE_DRIVER, 0x11000, 4)
            + _common(vp.QUEUE_DEVICE, 0x12000, 4) + _common(vp.QUEUE_ENABLE, 1, 2)
            + _common(vp.DEVICE_STATUS, 15, 1))
    chain = _ram(0x10000, pack("QIHH", 0x20000, 16, 2, 0)) + _ram(0x11000, pack("HHH", 0, 1, 0))
    notify = bytes([5]) + pack("H", vp.NOTIFY_OFFSET) + b"\0" + b"\0"
    msix = (bytes([0, 0, 0x40 | 0x10]) + bytes([1, 0, 1])          # read the capability list
            + bytes([0, 0, 0x04, 2, 0, 1]) + pack("H", 0x0006))    # command: memory + master
    isr = bytes([6]) + pack("H", vp.ISR_OFFSET) + b"\0"
    return [init + chain + notify + isr, msix + init, init + _common(vp.DEVICE_STATUS, 0, 1)]
