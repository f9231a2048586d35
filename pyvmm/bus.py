"""Port-I/O and MMIO buses: an address range maps to one device.

A device is any object with ``read(offset, size) -> bytes`` and
``write(offset, data) -> None``; ``offset`` is relative to the base the
device was registered at.  This mirrors kvmtool's ioport/mmio trees and
Firecracker's ``Bus``: the vCPU run loop looks the exit address up here.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

UNCLAIMED_ADDRESSES_MAX = 256   # distinct unclaimed addresses counted one by one


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

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Sorted, non-overlapping address ranges -> devices.

    Accesses that hit no device read as all ones and drop writes, like an
    unclaimed ISA port or an unpopulated MMIO hole; they are counted and logged
    at debug level so a reader can see what the guest probed: per address for
    the first ``UNCLAIMED_ADDRESSES_MAX`` addresses (a guest can probe millions),
    all of them in ``unclaimed_total``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # (bases, ranges): replaced as a whole under _lock, read without it, so
        # a vCPU thread's lookup sees either the old or the new map, never half.
        self._table: tuple[list[int], list[Range]] = ([], [])
        self._lock = threading.Lock()
        self.unclaimed: dict[int, int] = {}   # address -> accesses (the first addresses only)
        self.unclaimed_total = 0

    def register(self, base: int, length: int, device: Device) -> None:
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
                           ranges[:i] + [Range(base, length, device)] + ranges[i:])

    def unregister(self, base: int) -> Device:
        with self._lock:
            bases, ranges = self._table
            i = bisect.bisect_left(bases, base)
            if i == len(bases) or bases[i] != base:
                raise BusError(f"{self.name}: nothing registered at {base:#x}")
            self._table = (bases[:i] + bases[i + 1:], ranges[:i] + ranges[i + 1:])
            return ranges[i].device

    def find(self, addr: int, size: int = 1) -> tuple[Device, int] | None:
        """The device covering [addr, addr+size) and the offset into it."""
        bases, ranges = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        if addr + size > r.end:
            return None
        return r.device, addr - r.base

    def read(self, addr: int, size: int) -> bytes:
        hit = self.find(addr, size)
        if hit is None:
            self._count_unclaimed(addr, "read", size)
            return b"\xff" * size
        device, offset = hit
        try:
            data = device.read(offset, size)
        except Exception:  # a device bug: that access fails, the VM goes on
            log.exception("%s: %r failed a %d-byte read at %#x", self.name, device, size, addr)
            return b"\xff" * size
        if len(data) != size:  # a device bug must not corrupt the exit data
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        hit = self.find(addr, len(data))
        if hit is None:
            self._count_unclaimed(addr, "write", len(data))
            return
        device, offset = hit
        try:
            device.write(offset, data)
        except Exception:  # a device bug: that access is dropped, the VM goes on
            log.exception("%s: %r failed a %d-byte write at %#x", self.name, device, len(data), addr)

    def _count_unclaimed(self, addr: int, kind: str, size: int) -> None:
        with self._lock:
            self.unclaimed_total += 1
            n = self.unclaimed.get(addr, 0) + 1
            if n == 1 and len(self.unclaimed) >= UNCLAIMED_ADDRESSES_MAX:
                return   # counted in the total only
            self.unclaimed[addr] = n
        if n <= 3:
            log.debug("%s: unclaimed %s of %d bytes at %#x", self.name, kind, size, addr)
