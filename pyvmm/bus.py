"""Port-I/O and MMIO buses: an address range maps to one device.

A device is any object with ``read(offset, size) -> bytes`` and
``write(offset, data) -> None``; ``offset`` is relative to the base the
device was registered at.  This mirrors kvmtool's ioport/mmio trees and
Firecracker's ``Bus``: the vCPU run loop looks the exit address up here.
Each range has a name (``claimant``), which the exit trace and statistics
(pyvmm.trace) show.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

UNCLAIMED = "unclaimed"   # the claimant of an address no device covers
MAX_UNCLAIMED_ADDRESSES = 1024   # Bus.unclaimed: the guest picks the addresses


class Device(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """A registration that overlaps another or is malformed."""


@dataclass(frozen=True)
class Range:
    base: int
    length: int
    device: Device
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Sorted, non-overlapping address ranges -> devices.

    Accesses that hit no device read as all ones and drop writes, like an
    unclaimed ISA port or an unpopulated MMIO hole; they are counted and logged
    at debug level so a reader can see what the guest probed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # (bases, ranges): replaced as a whole under _lock, read without it, so
        # a vCPU thread's lookup sees either the old or the new map, never half.
        self._table: tuple[list[int], list[Range]] = ([], [])
        self._lock = threading.Lock()
        self.unclaimed: dict[int, int] = {}   # address -> accesses, the first addresses only
        self.unclaimed_elsewhere = 0           # accesses to addresses beyond those

    def register(self, base: int, length: int, device: Device, name: str | None = None) -> None:
        """``name`` says who answers there (default: the device's ``name`` or its class)."""
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range base={base:#x} length={length:#x}")
        with self._lock:
            bases, ranges = self._table
            i = bisect.bisect_right(bases, base)
            if i > 0 and ranges[i - 1].end > base:
                raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {ranges[i - 1]}")
            if i < len(ranges) and ranges[i].base < base + length:
                raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {ranges[i]}")
            self._table = (bases[:i] + [base] + bases[i:],
                           ranges[:i] + [Range(base, length, device, name or device_name(device))] + ranges[i:])

    def unregister(self, base: int) -> Device:
        with self._lock:
            bases, ranges = self._table
            i = bisect.bisect_left(bases, base)
            if i == len(bases) or bases[i] != base:
                raise BusError(f"{self.name}: nothing registered at {base:#x}")
            self._table = (bases[:i] + bases[i + 1:], ranges[:i] + ranges[i + 1:])
            return ranges[i].device

    def range_at(self, addr: int, size: int = 1) -> Range | None:
        """The range covering all of [addr, addr+size), if one does."""
        bases, ranges = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        return r if addr + size <= r.base + r.length else None

    def find(self, addr: int, size: int = 1) -> tuple[Device, int] | None:
        """The device covering [addr, addr+size) and the offset into it."""
        r = self.range_at(addr, size)
        return None if r is None else (r.device, addr - r.base)

    def claimant(self, addr: int, size: int = 1) -> str:
        """The name of the device an access to [addr, addr+size) goes to, or UNCLAIMED."""
        r = self.range_at(addr, size)
        return UNCLAIMED if r is None else r.name

    def read(self, addr: int, size: int) -> bytes:
        r = self.range_at(addr, size)
        if r is None:
            self._count_unclaimed(addr, "read", size)
            return b"\xff" * size
        device = r.device
        try:
            data = device.read(addr - r.base, size)
        except Exception:  # a device bug: that access fails, the VM goes on
            log.exception("%s: %r failed a %d-byte read at %#x", self.name, device, size, addr)
            return b"\xff" * size
        if len(data) != size:  # a device bug must not corrupt the exit data
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        r = self.range_at(addr, len(data))
        if r is None:
            self._count_unclaimed(addr, "write", len(data))
            return
        device = r.device
        try:
            device.write(addr - r.base, data)
        except Exception:  # a device bug: that access is dropped, the VM goes on
            log.exception("%s: %r failed a %d-byte write at %#x", self.name, device, len(data), addr)

    def _count_unclaimed(self, addr: int, kind: str, size: int) -> None:
        with self._lock:
            n = self.unclaimed.get(addr, 0) + 1
            if n == 1 and len(self.unclaimed) >= MAX_UNCLAIMED_ADDRESSES:
                self.unclaimed_elsewhere += 1
                return
            self.unclaimed[addr] = n
        if n <= 3:
            log.debug("%s: unclaimed %s of %d bytes at %#x", self.name, kind, size, addr)


def device_name(device: Device) -> str:
    """A device's own ``name``, else its class name in lower case."""
    name = getattr(device, "name", None)
    return name if isinstance(name, str) and name else type(device).__name__.lower()
