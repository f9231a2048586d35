"""KVM memory slot bookkeeping (pyvmm.memory.MemorySlots): a slot keeps its number
when it moves, and the table never disagrees with KVM.

``KvmSlots`` stands in for the KVM VM fd with KVM's own rules (an overlap is
EEXIST and changes nothing; a same-slot, same-size call at a new address is a
move); the last test does the same against the real /dev/kvm.
"""

from __future__ import annotations

import errno

import pytest

from pyvmm.devices.virtio.dax_window import DaxShm, DaxWindow
from pyvmm.memory import MemorySlots

MiB = 1 << 20
WINDOW = 2 * MiB


class KvmSlots:
    """KVM_SET_USER_MEMORY_REGION as KVM checks it, on a dict: slot -> (gpa, size, hva)."""

    def __init__(self, refuse=lambda gpa, size: False) -> None:
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.calls = 0
        self.refuse = refuse     # (gpa, size) -> True: fail as KVM would for its own reasons

    def set_user_memory_region(self, slot, gpa, size, hva, flags=0):
        self.calls += 1
        if self.refuse(gpa, size):
            raise OSError(errno.EINVAL, "refused")
        if size == 0:
            self.slots.pop(slot, None)
            return
        old = self.slots.get(slot)
        if old is not None and (old[1], old[2]) != (size, hva):
            raise OSError(errno.EINVAL, "only the address of an existing slot can change")
        for other, (g, s, _) in self.slots.items():
            if other != slot and gpa < g + s and g < gpa + size:
                raise OSError(errno.EEXIST, "overlaps another slot")
        self.slots[slot] = (gpa, size, hva)


def table(slots: MemorySlots, numbers) -> dict[int, tuple[int, int, int]]:
    return {n: slots.get(n)[:3] for n in numbers}


def test_move_keeps_the_slot_number_with_a_lower_slot_free():
    """Two DAX windows: the first one's BAR stops decoding (its slot goes), then the
    second one's BAR moves.  Its slot must stay what it was, in KVM and in the table."""
    kvm = KvmSlots()
    slots = MemorySlots(kvm, 16)
    slots.add(0, 256 * MiB, 0x7F0000000000)                       # guest RAM: slot 0
    wa, wb = DaxWindow(WINDOW), DaxWindow(WINDOW)
    a, b = DaxShm(wa, slots), DaxShm(wb, slots)
    try:
        a.shm_moved(None, 1 << 32)
        b.shm_moved(None, 2 << 32)
        assert (a.slot, b.slot) == (1, 2)
        a.shm_moved(1 << 32, None)                                # memory decode off on A
        assert 1 not in kvm.slots
        b.shm_moved(2 << 32, 3 << 32)                             # B's BAR 2 moves
        assert b.slot == 2 and b.gpa == 3 << 32
        assert kvm.slots == {0: (0, 256 * MiB, 0x7F0000000000), 2: (3 << 32, WINDOW, wb.host_addr)}
        assert kvm.slots == table(slots, (0, 2))
        b.close()                                                  # no slot may outlive a window
        assert set(kvm.slots) == {0}
    finally:
        a.close()
        b.close()


def test_refused_move_changes_nothing_anywhere():
    kvm = KvmSlots()
    slots = MemorySlots(kvm, 4)
    ram = slots.add(0, 64 * MiB, 0x10000000)
    window = slots.add(1 << 32, WINDOW, 0x20000000)
    before, calls = dict(kvm.slots), kvm.calls
    with pytest.raises(ValueError, match="overlaps"):
        slots.move(window, 32 * MiB)                              # over guest RAM
    with pytest.raises(ValueError, match="page aligned"):
        slots.move(window, (1 << 32) + 1)
    assert kvm.calls == calls and kvm.slots == before == table(slots, (ram, window))

    kvm2 = KvmSlots(refuse=lambda gpa, size: size and gpa == 5 << 32)   # an address KVM refuses
    slots2 = MemorySlots(kvm2, 4)
    n = slots2.add(1 << 32, WINDOW, 0x20000000)
    with pytest.raises(OSError):
        slots2.move(n, 5 << 32)                                    # KVM refuses: still there
    assert kvm2.slots == {n: (1 << 32, WINDOW, 0x20000000)} == table(slots2, (n,))
    slots2.move(n, 1 << 32)                                        # same address: nothing to do
    assert kvm2.slots == {n: (1 << 32, WINDOW, 0x20000000)}


def test_refused_remove_keeps_the_slot_in_the_table():
    kvm = KvmSlots(refuse=lambda gpa, size: size == 0)
    slots = MemorySlots(kvm, 4)
    n = slots.add(1 << 32, WINDOW, 0x20000000)
    with pytest.raises(OSError):
        slots.remove(n)
    assert table(slots, (n,)) == kvm.slots


@pytest.mark.kvm
def test_move_with_the_real_kvm(kvm_host):
    """KVM_MR_MOVE on this host's /dev/kvm: the slot keeps its number, its old range is
    free afterwards and its new one taken."""
    from pyvmm import kvm as k

    host = k.Kvm()
    vm = host.create_vm()
    wa, wb = DaxWindow(WINDOW), DaxWindow(WINDOW)
    try:
        slots = MemorySlots(vm, host.check_extension(k.KVM_CAP_NR_MEMSLOTS))
        a = slots.add(1 << 32, WINDOW, wa.host_addr)
        b = slots.add(2 << 32, WINDOW, wb.host_addr)
        slots.remove(a)
        slots.move(b, 3 << 32)
        assert slots.get(b)[0] == 3 << 32
        with pytest.raises(OSError) as e:      # KVM has b at its new address...
            vm.set_user_memory_region(a, 3 << 32, WINDOW, wa.host_addr)
        assert e.value.errno == errno.EEXIST
        vm.set_user_memory_region(a, 2 << 32, WINDOW, wa.host_addr)   # ...not at the old one
        vm.set_user_memory_region(a, 2 << 32, 0, wa.host_addr)
        slots.remove(b)
    finally:
        vm.close()
        host.close()
        wa.close()
        wb.close()
    print(f"KVM flavour: {kvm_host}")
