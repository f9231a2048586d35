"""MSI-X: capability, vector table and pending-bit array (PCI Local Bus 3.0, 6.8.2).

Each vector owns an eventfd and a GSI.  While the vector may fire (MSI-X
enabled, function not masked, vector not masked) the eventfd is a KVM irqfd
on that GSI, and the GSI is routed to the vector's message address/data:
a device thread or a vhost-user backend interrupts the guest by writing the
eventfd, with no Python on the way.  While the vector is masked the irqfd is
detached, so writes latch in the eventfd's counter; that counter is the
vector's pending bit, and re-attaching the irqfd delivers it (KVM polls the
eventfd when an irqfd is assigned).

Snapshot: the table, the enable and function-mask bits and the pending
vectors (the PBA).  A restore latches each pending vector's eventfd again and
refreshes every vector, which sets the GSI routes and irqfds of the live ones.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from typing import NamedTuple

from .. import kvm
from ..irq import GsiRouter
from ..snapshot.fields import blob, boolean, expect_keys, index_set

log = logging.getLogger(__name__)

PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1
MSI_ADDRESS_BASE = 0xFEE00000  # x86: messages go to the LAPICs' window


def unpack_entry(table: bytes | bytearray, vector: int) -> tuple[int, int, bool]:
    """(message address, data, masked) of ``vector`` in a vector table."""
    lo, hi, data, ctrl = struct.unpack_from("<IIII", table, vector * PCI_MSIX_ENTRY_SIZE)
    return (hi << 32) | lo, data, bool(ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)


def may_fire(enabled: bool, function_masked: bool, address: int, masked: bool) -> bool:
    """Whether a vector is delivered (irqfd attached) rather than latched (6.8.2):
    MSI-X on, the function and the vector unmasked, an address in the LAPIC window."""
    return (enabled and not function_masked and not masked
            and address >> 20 == MSI_ADDRESS_BASE >> 20)


class MsixState(NamedTuple):
    table: bytes
    enabled: bool
    function_masked: bool
    pending: frozenset[int]


class Msix:
    def __init__(self, vm: kvm.Vm, router: GsiRouter, num_vectors: int,
                 table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> None:
        if not 1 <= num_vectors <= 2048:
            raise ValueError("MSI-X supports 1 to 2048 vectors")
        self._vm = vm
        self._router = router
        self.num_vectors = num_vectors
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.table = bytearray(num_vectors * PCI_MSIX_ENTRY_SIZE)
        for v in range(num_vectors):  # vectors start masked (6.8.2.9)
            struct.pack_into("<I", self.table, v * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_ENTRY_CTRL_MASKBIT)
        self.eventfds: list[int] = []
        self.gsis: list[int] = []
        try:
            for _ in range(num_vectors):
                self.eventfds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                self.gsis.append(router.allocate())
        except (OSError, ValueError):
            self._release()
            raise
        self._attached = [False] * num_vectors
        self.enabled = False
        self.function_masked = False
        self._lock = threading.Lock()

    @property
    def table_size(self) -> int:
        return self.num_vectors * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.num_vectors + 63) // 64) * 8

    def capability(self) -> tuple[bytes, bytes]:
        """Capability body after id/next, and its writable mask."""
        control = self.num_vectors - 1
        body = struct.pack("<HII", control, self.table_offset | self.table_bar,
                           self.pba_offset | self.pba_bar)
        writable = struct.pack("<HII", PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL, 0, 0)
        return body, writable

    def control_written(self, control: int) -> None:
        """The guest wrote the Message Control word."""
        with self._lock:
            self.enabled = bool(control & PCI_MSIX_FLAGS_ENABLE)
            self.function_masked = bool(control & PCI_MSIX_FLAGS_MASKALL)
            for v in range(self.num_vectors):
                self._refresh(v)

    # --- table and PBA in the BAR ---------------------------------------------------------
    def table_read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.table_size:
            return b"\xff" * size
        with self._lock:
            return bytes(self.table[offset:offset + size])

    def table_write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.table_size:
            return
        with self._lock:
            self.table[offset:offset + len(data)] = data
            first, last = offset // 16, (offset + len(data) - 1) // 16
            for v in range(first, last + 1):
                self._refresh(v)

    def pba_read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.pba_size:
            return b"\xff" * size
        bits = 0
        with self._lock:
            for v in range(self.num_vectors):
                if not self._attached[v] and self._latched(v):
                    bits |= 1 << v
        return bits.to_bytes(self.pba_size, "little")[offset:offset + size]

    # --- interrupts ----------------------------------------------------------------------------
    def interrupt(self, vector: int) -> None:
        """Raise ``vector`` (any thread); latched while masked."""
        if 0 <= vector < self.num_vectors:
            os.eventfd_write(self.eventfds[vector], 1)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(message address, data, masked) of a vector."""
        return unpack_entry(self.table, vector)

    def _latched(self, vector: int) -> bool:
        poller = select.poll()  # not select(): fds above 1023 are fine
        poller.register(self.eventfds[vector], select.POLLIN)
        return bool(poller.poll(0))

    def _refresh(self, vector: int) -> None:
        address, data, masked = self.entry(vector)
        live = may_fire(self.enabled, self.function_masked, address, masked)
        if not live and self.enabled and not self.function_masked and not masked:
            log.debug("msix: vector %d has address %#x outside the LAPIC window: not routed", vector, address)
        gsi, fd = self.gsis[vector], self.eventfds[vector]
        if live:
            self._router.set_msi(gsi, address, data)
            if not self._attached[vector]:
                self._vm.irqfd(fd, gsi)
                self._attached[vector] = True
        elif self._attached[vector]:
            self._vm.irqfd(fd, gsi, deassign=True)
            self._attached[vector] = False

    # --- snapshot ---------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """Table, enable and function-mask bits, and the pending vectors: those whose
        eventfd holds a count while their irqfd is detached.  Whoever writes the
        eventfds (device threads, a back-end) must be stopped."""
        with self._lock:
            pending = [v for v in range(self.num_vectors) if not self._attached[v] and self._latched(v)]
            return {"table": self.table.hex(), "enabled": self.enabled,
                    "function_masked": self.function_masked, "pending": pending}

    def parse_state(self, state: object, path: str) -> MsixState:
        expect_keys(state, ("table", "enabled", "function_masked", "pending"), path)
        parsed = MsixState(blob(state["table"], f"{path}.table", self.table_size),
                           boolean(state["enabled"], f"{path}.enabled"),
                           boolean(state["function_masked"], f"{path}.function_masked"),
                           index_set(state["pending"], f"{path}.pending", self.num_vectors))
        for v in sorted(parsed.pending):
            address, _, masked = unpack_entry(parsed.table, v)
            if may_fire(parsed.enabled, parsed.function_masked, address, masked):
                raise ValueError(f"{path}.pending: vector {v} is pending but not masked "
                                 "(a vector that may fire is delivered, not latched)")
        return parsed

    def apply_state(self, parsed: MsixState) -> None:
        """Load the table and bits, latch the pending vectors, then route and attach
        every live vector (none of them has a count: no interrupt fires here)."""
        with self._lock:
            self.table[:] = parsed.table
            self.enabled = parsed.enabled
            self.function_masked = parsed.function_masked
            for v, fd in enumerate(self.eventfds):
                try:
                    os.eventfd_read(fd)   # EFD_NONBLOCK: clears a count, if any
                except BlockingIOError:
                    pass
                if v in parsed.pending:
                    os.eventfd_write(fd, 1)
            for v in range(self.num_vectors):
                self._refresh(v)

    def restore_state(self, state: dict, path: str = "msix") -> None:
        self.apply_state(self.parse_state(state, path))

    def close(self) -> None:
        """Detach every irqfd, free the GSIs and close the eventfds (idempotent)."""
        with self._lock:
            for v, gsi in enumerate(self.gsis):
                if self._attached[v]:
                    try:
                        self._vm.irqfd(self.eventfds[v], gsi, deassign=True)
                    except OSError:
                        pass
                    self._attached[v] = False
            self._release()

    def _release(self) -> None:
        for gsi in self.gsis:
            self._router.free(gsi)
        for fd in self.eventfds:
            os.close(fd)
        self.gsis, self.eventfds = [], []
