"""The VM's GSI routing table: legacy IOAPIC/PIC pins plus MSI routes.

KVM_SET_GSI_ROUTING replaces the whole table, so one object owns it.  GSIs
0-23 keep KVM's default wiring (GSI n -> IOAPIC pin n, and for n < 16 also
PIC pin n; virt/kvm/irqchip.c's default routing); MSI routes are handed out
from GSI 24 up, one per MSI-X vector.  An irqfd bound to such a GSI lets a
backend (or a device thread) interrupt the guest with a single eventfd write.
"""

from __future__ import annotations

import logging
import threading

from . import kvm

log = logging.getLogger(__name__)

IOAPIC_NUM_PINS = 24
PIC_NUM_PINS = 16
FIRST_MSI_GSI = IOAPIC_NUM_PINS


def legacy_routes() -> list[kvm.kvm_irq_routing_entry]:
    entries = []
    for gsi in range(IOAPIC_NUM_PINS):
        e = kvm.kvm_irq_routing_entry(gsi=gsi, type=kvm.KVM_IRQ_ROUTING_IRQCHIP)
        e.irqchip.irqchip = kvm.KVM_IRQCHIP_IOAPIC
        e.irqchip.pin = gsi
        entries.append(e)
        if gsi < PIC_NUM_PINS:
            p = kvm.kvm_irq_routing_entry(gsi=gsi, type=kvm.KVM_IRQ_ROUTING_IRQCHIP)
            p.irqchip.irqchip = kvm.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else kvm.KVM_IRQCHIP_PIC_SLAVE
            p.irqchip.pin = gsi % 8
            entries.append(p)
    return entries


class GsiRouter:
    """Allocates MSI GSIs and keeps KVM's routing table in step."""

    def __init__(self, vm: kvm.Vm, max_gsi: int = 4096) -> None:
        self._vm = vm
        self._max = max_gsi
        self._msi: dict[int, tuple[int, int] | None] = {}  # gsi -> (address, data) or None
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            gsi = next((g for g in range(FIRST_MSI_GSI, self._max) if g not in self._msi), None)
            if gsi is None:
                raise ValueError(f"no free GSI (all {self._max - FIRST_MSI_GSI} MSI routes in use)")
            self._msi[gsi] = None
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            if self._msi.get(gsi, ()) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._commit()

    def free(self, gsi: int) -> None:
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._commit()

    def _commit(self) -> None:
        entries = legacy_routes()
        for gsi, route in sorted(self._msi.items()):
            if route is None:
                continue
            e = kvm.kvm_irq_routing_entry(gsi=gsi, type=kvm.KVM_IRQ_ROUTING_MSI)
            e.msi.address_lo = route[0] & 0xFFFFFFFF
            e.msi.address_hi = route[0] >> 32
            e.msi.data = route[1]
            entries.append(e)
        self._vm.set_gsi_routing(entries)
