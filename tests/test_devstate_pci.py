"""Snapshot state of the PCI layer: config space, root complex, MSI-X."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.irq import GsiRouter
from pyvmm.pci import config as cfg
from pyvmm.pci.config import PciConfigSpace
from pyvmm.pci.msix import PCI_MSIX_FLAGS_ENABLE, Msix
from state_fakes import mutated, through_json
from test_msix import FakeVm, entry, readable
from test_pci_root import BAR0, BAR2_HI, BAR2_LO, W32, W64, FakeDevice, Machine


# --- config space ---------------------------------------------------------------------------------
def test_config_round_trip_keeps_guest_writes():
    a = FakeDevice().config
    a.write(cfg.PCI_COMMAND, b"\x06\x00")
    a.write(cfg.PCI_INTERRUPT_LINE, b"\x0b")
    a.set_bar_address(0, 0xC000_0000)
    state = through_json(a.save_state())
    b = FakeDevice().config
    b.restore_state(state)
    assert b.data == a.data and b.save_state() == state
    assert b.bar_address(0) == 0xC000_0000


@pytest.mark.parametrize("offset, value, message", [
    (cfg.PCI_VENDOR_ID, 0x1AF4, r"vendor id 0x1af4 in the snapshot, 0x1234 here: not the same device"),
    (cfg.PCI_DEVICE_ID, 0x1041, r"device id 0x1041 in the snapshot, 0x5678 here"),
    (cfg.PCI_CLASS_PROG + 2, 0x01, r"class code 0x010000 in the snapshot, 0xff0000 here"),
    (cfg.PCI_SUBSYSTEM_ID, 0x1100, r"subsystem id 0x1100 in the snapshot, 0x0000 here"),
    (cfg.PCI_BASE_ADDRESS_0, 0x01, r"byte 0x10 is 0x01, its read-only bits 0xff"),   # BAR flags / low bits
    (cfg.PCI_INTERRUPT_PIN, 0x01, r"byte 0x3d is 0x01"),
    (cfg.PCI_CAPABILITY_LIST, 0x40, r"byte 0x34 is 0x40"),
])
def test_config_read_only_bits_must_match(offset, value, message):
    state = through_json(FakeDevice().config.save_state())
    data = bytearray.fromhex(state["data"])
    data[offset] = value & 0xFF
    if offset in (cfg.PCI_VENDOR_ID, cfg.PCI_DEVICE_ID, cfg.PCI_SUBSYSTEM_ID):
        data[offset:offset + 2] = value.to_bytes(2, "little")
    state["data"] = data.hex()
    b = FakeDevice().config
    before = bytes(b.data)
    with pytest.raises(ValueError, match=message):
        b.restore_state(state, "cfg")
    assert bytes(b.data) == before


def test_config_w1c_status_bits_may_be_set():
    state = through_json(PciConfigSpace(1, 2, 3).save_state())
    data = bytearray.fromhex(state["data"])
    data[cfg.PCI_STATUS + 1] = 0x80                 # detected parity error (set by a device)
    state["data"] = data.hex()
    PciConfigSpace(1, 2, 3).restore_state(state)


# --- root complex ---------------------------------------------------------------------------------
def programmed_machine() -> tuple[Machine, FakeDevice, int]:
    """A device whose BARs the guest moved (as Linux does when it reassigns)."""
    m = Machine()
    dev = FakeDevice()
    slot = m.root.add(dev)
    m.cfg_write(slot, BAR0, W32[0] + 0x10_0000)
    m.cfg_write(slot, BAR2_LO, 0x8000_0000 | 0xC)
    m.cfg_write(slot, BAR2_HI, W64[0] >> 32)
    m.select(slot, 0x3C)                            # leave the latch somewhere recognisable
    return m, dev, slot


def test_root_round_trip_bars_decoded_where_the_guest_put_them():
    a, _, slot = programmed_machine()
    a0, a2 = a.root.bar_address(slot, 0), a.root.bar_address(slot, 2)
    assert (a0, a2) == (W32[0] + 0x10_0000, W64[0] + 0x8000_0000)
    state = through_json(a.root.save_state())
    assert [s["name"] for s in state["slots"]] == ["host-bridge", "pci-device"]

    b = Machine()
    dev = FakeDevice()
    assert b.root.add(dev) == slot
    first = (b.root.bar_address(slot, 0), b.root.bar_address(slot, 2))
    assert first != (a0, a2)
    dev.moves.clear()
    b.root.restore_state(state)
    assert b.root.save_state() == state
    assert (b.root.bar_address(slot, 0), b.root.bar_address(slot, 2)) == (a0, a2)
    # every BAR left its construction-time address and was mapped afresh: bar_moved both times
    assert dev.moves == [(0, first[0], None), (2, first[1], None), (0, None, a0), (2, None, a2)]
    assert b.mmio.read(a0 + 4, 4) == b"\x40" * 4 and b.mmio.read(a2, 4) == b"\x42" * 4
    assert b.mmio.find(first[0]) is None
    assert int.from_bytes(b.pio.read(0xCF8, 4), "little") == int.from_bytes(a.pio.read(0xCF8, 4), "little")


def test_root_swapped_bars_do_not_collide():
    """Two devices whose BAR0s the guest swapped: mapping in slot order would overlap
    the other's old mapping if the root did not clear them all first."""
    a = Machine()
    d1, d2 = FakeDevice(), FakeDevice()
    s1, s2 = a.root.add(d1), a.root.add(d2)
    x1, x2 = a.root.bar_address(s1, 0), a.root.bar_address(s2, 0)
    a.cfg_write(s1, cfg.PCI_COMMAND, 0, 2)             # decode off while moving, as Linux does
    a.cfg_write(s2, cfg.PCI_COMMAND, 0, 2)
    a.cfg_write(s1, BAR0, x2)
    a.cfg_write(s2, BAR0, x1)
    a.cfg_write(s1, cfg.PCI_COMMAND, 6, 2)
    a.cfg_write(s2, cfg.PCI_COMMAND, 6, 2)
    state = through_json(a.root.save_state())
    b = Machine()
    e1, e2 = FakeDevice(), FakeDevice()
    b.root.add(e1), b.root.add(e2)
    b.root.restore_state(state)
    assert (b.root.bar_address(s1, 0), b.root.bar_address(s2, 0)) == (x2, x1)
    assert b.mmio.find(x2)[0].device is e1


def test_root_decode_off_is_restored():
    a, dev, slot = programmed_machine()
    a.cfg_write(slot, cfg.PCI_COMMAND, 0, 2)
    assert a.root.bar_address(slot, 0) is None
    b = Machine()
    b.root.add(FakeDevice())
    b.root.restore_state(through_json(a.root.save_state()))
    assert b.root.bar_address(slot, 0) is None and b.root.bar_address(slot, 2) is None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["slots"].pop(), r"pci\.slots: no state for slot\(s\) 1"),
    (lambda s: s["slots"][1].__setitem__("slot", 7), r"pci\.slots\[1\]\.slot: no device is in slot 7"),
    (lambda s: s["slots"].append(dict(s["slots"][1])), r"pci\.slots\[2\]\.slot: twice in slot 1"),
    (lambda s: s["slots"][1].__setitem__("name", "virtio-VirtioBlock"),
     r"pci\.slots\[1\]\.name: slot 1 holds 'virtio-VirtioBlock' in the snapshot, 'pci-device' here"),
    (lambda s: s.__setitem__("address", "0x100000000"), r"pci\.address: .* does not fit in 4"),
    (lambda s: s["slots"][1]["state"]["config"].__setitem__("data", "00"),
     r"pci\.slots\[1\]\.state\.config\.data: expected 256 bytes"),
])
def test_root_refuses_and_changes_nothing(edit, message):
    a, _, _ = programmed_machine()
    state = through_json(a.root.save_state())
    edit(state)
    b = Machine()
    dev = FakeDevice()
    b.root.add(dev)
    before = (bytes(dev.config.data), list(dev.moves))
    with pytest.raises(ValueError, match=message):
        b.root.restore_state(state)
    assert (bytes(dev.config.data), dev.moves) == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_root_damaged_state_only_value_errors(data):
    a, _, _ = programmed_machine()
    state = through_json(a.root.save_state())
    b = Machine()
    b.root.add(FakeDevice())
    try:
        b.root.restore_state(mutated(data.draw, state))
    except ValueError:
        pass


# --- MSI-X ------------------------------------------------------------------------------------------
def programmed_msix(vm: FakeVm) -> Msix:
    """Enabled; vectors 0 and 1 live, vector 2 masked with an interrupt latched, 3 untouched."""
    m = Msix(vm, GsiRouter(vm), 4, 0, 0x4000, 0, 0x5000)
    m.control_written(PCI_MSIX_FLAGS_ENABLE)
    m.table_write(0, entry(0xFEE00000, 0x41, False))
    m.table_write(16, entry(0xFEE01000, 0x42, False))
    m.table_write(32, entry(0xFEE00000, 0x43, True))
    m.interrupt(2)
    return m


def test_msix_round_trip_pending_bit_survives_and_routes_follow():
    vm_a = FakeVm()
    a = programmed_msix(vm_a)
    state = through_json(a.save_state())
    assert state["pending"] == [2] and state["enabled"] is True
    vm_b = FakeVm()
    b = Msix(vm_b, GsiRouter(vm_b), 4, 0, 0x4000, 0, 0x5000)
    b.restore_state(state)
    assert b.save_state() == state
    assert b.pba_read(0, 8)[0] == 0b0100 == a.pba_read(0, 8)[0]
    assert vm_b.msi_routes() == {b.gsis[0]: (0xFEE00000, 0x41), b.gsis[1]: (0xFEE01000, 0x42)}
    assert vm_b.irqfds == {b.eventfds[0]: b.gsis[0], b.eventfds[1]: b.gsis[1]}
    assert readable(b.eventfds[2])                  # latched, not delivered
    # the guest unmasks vector 2: the latched interrupt goes to KVM with the irqfd
    b.table_write(32 + 12, struct.pack("<I", 0))
    assert vm_b.irqfds[b.eventfds[2]] == b.gsis[2]
    assert vm_b.msi_routes()[b.gsis[2]] == (0xFEE00000, 0x43)
    a.close()
    b.close()


def test_msix_function_masked_vectors_are_pending():
    vm = FakeVm()
    a = Msix(vm, GsiRouter(vm), 2, 0, 0x4000, 0, 0x5000)
    a.table_write(0, entry(0xFEE00000, 0x41, False))
    a.control_written(PCI_MSIX_FLAGS_ENABLE | 0x4000)   # MASKALL
    a.interrupt(0)
    state = through_json(a.save_state())
    assert state["pending"] == [0] and state["function_masked"] is True
    b = Msix(vm, GsiRouter(vm), 2, 0, 0x4000, 0, 0x5000)
    b.restore_state(state)
    assert readable(b.eventfds[0]) and b.eventfds[0] not in vm.irqfds
    a.close()
    b.close()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("pending", [0]), r"msix\.pending: vector 0 is pending but not masked"),
    (lambda s: s.__setitem__("pending", [4]), r"msix\.pending\[0\]: 4 is not in 0\.\.3"),
    (lambda s: s.__setitem__("pending", [2, 2]), r"msix\.pending: expected distinct numbers"),
    (lambda s: s.__setitem__("table", s["table"][:-2]), r"msix\.table: expected 64 bytes, got 63"),
    (lambda s: s.__setitem__("enabled", "yes"), r"msix\.enabled: expected true or false"),
])
def test_msix_refuses(edit, message):
    vm = FakeVm()
    a = programmed_msix(vm)
    state = through_json(a.save_state())
    edit(state)
    vm_b = FakeVm()
    b = Msix(vm_b, GsiRouter(vm_b), 4, 0, 0x4000, 0, 0x5000)
    with pytest.raises(ValueError, match=message):
        b.restore_state(state)
    assert vm_b.calls == [] and not any(readable(fd) for fd in b.eventfds)
    a.close()
    b.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_msix_damaged_state_only_value_errors(data):
    vm = FakeVm()
    a = programmed_msix(vm)
    state = through_json(a.save_state())
    a.close()
    vm_b = FakeVm()
    b = Msix(vm_b, GsiRouter(vm_b), 4, 0, 0x4000, 0, 0x5000)
    try:
        b.restore_state(mutated(data.draw, state))
    except ValueError:
        pass
    finally:
        b.close()
    assert len(os.listdir("/proc/self/fd")) < 200   # no eventfd leak across examples
