"""Guest RAM and KVM memory slots.

Guest RAM is one memfd (so that a vhost-user backend can map the very same
pages later) mmap'ed once into the VMM.  It is cut into guest-physical ranges
around the 32-bit MMIO hole (see ``pyvmm.boot.e820.ram_ranges``) and each
range becomes one KVM memory slot.

Every access the VMM makes on behalf of the guest goes through
``GuestMemory.translate``: a guest-physical range that is not wholly inside
one RAM range is an error (``GuestMemoryError``), never a read or write
outside the mapping.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import threading
from typing import TYPE_CHECKING, NamedTuple

from .boot.e820 import ram_ranges

if TYPE_CHECKING:   # (pyvmm-virtiofsd maps guest RAM with this module and never needs KVM)
    from .kvm import Vm

log = logging.getLogger(__name__)

PAGE_SIZE = 4096


class GuestMemoryError(ValueError):
    """A guest-physical access outside guest RAM."""


class RamRange(NamedTuple):
    gpa: int      # guest-physical start
    size: int     # bytes
    offset: int   # offset into the memfd / host mapping


class GuestMemory:
    """Guest RAM: a memfd of ``size`` bytes mapped at ``host_addr``.

    ``from_snapshot`` makes it from a snapshot's RAM file instead: either that
    file mapped MAP_PRIVATE (the file is never written, and every restore of
    it shares its unchanged pages through the page cache), or, when a
    vhost-user back-end must map the same pages (``shared=True``), a new memfd
    holding a copy of the file's data."""

    def __init__(self, size: int, name: str = "pyvmm-ram", *, fd: int | None = None,
                 private: bool = False) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest RAM size {size} is not a positive multiple of {PAGE_SIZE}")
        self.size = size
        self.private = private
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING) if fd is None else fd
        try:
            if fd is None:
                os.ftruncate(self.fd, size)
                # The fd goes to vhost-user back-ends: sealed, nobody can shrink the file
                # under a mapping of it (which would make accesses SIGBUS).
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr = ctypes.addressof(self._anchor)
        self.ranges = [RamRange(gpa, sz, off) for gpa, sz, off in ram_ranges(size)]

    @classmethod
    def from_snapshot(cls, path: str, size: int, shared: bool) -> "GuestMemory":
        """RAM from a snapshot file of exactly ``size`` bytes (see the class docstring)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != size:
                raise ValueError(f"{path} is not {size} bytes")
            if not shared:
                return cls(size, fd=fd, private=True)
            mem = cls(size)
            try:
                copy_data(fd, mem._map, size)
            except BaseException:
                mem.close()
                raise
            return mem
        finally:
            if shared:
                os.close(fd)

    def view_all(self) -> memoryview:
        """All of guest RAM, for a snapshot (release it before close())."""
        return memoryview(self._map)

    def translate(self, gpa: int, size: int) -> int:
        """Offset into the RAM mapping of [gpa, gpa+size), or GuestMemoryError."""
        if gpa < 0 or size < 0:
            raise GuestMemoryError(f"negative guest access {gpa:#x}+{size:#x}")
        for r in self.ranges:
            if r.gpa <= gpa and gpa + size <= r.gpa + r.size:
                return r.offset + (gpa - r.gpa)
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not RAM")

    def read(self, gpa: int, size: int) -> bytes:
        off = self.translate(gpa, size)
        return self._map[off:off + size]

    def write(self, gpa: int, data: bytes) -> None:
        off = self.translate(gpa, len(data))
        self._map[off:off + len(data)] = data

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of guest RAM (release it before close())."""
        off = self.translate(gpa, size)
        return memoryview(self._map)[off:off + size]

    def close(self) -> None:
        del self._anchor
        self._map.close()
        os.close(self.fd)


def copy_data(fd: int, dest: mmap.mmap, size: int) -> int:
    """Copy the data extents of the (sparse) file ``fd`` into ``dest``; holes stay
    zero.  Returns the bytes copied."""
    copied, offset = 0, 0
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as src:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:   # ENXIO: no data after offset
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            dest[start:end] = src[start:end]
            copied += end - start
            offset = end
    return copied


class MemorySlots:
    """KVM memory slot bookkeeping for one VM: add, move and remove at run time.

    Slot numbers are handed out lowest-free-first; the DAX window of a
    virtio-fs device gets one, RAM ranges get theirs at start-up.  A slot
    keeps its number for its whole life (``move`` changes only its address),
    and the table changes only after KVM accepted the change, so the table
    and KVM never disagree: a refused add, move or remove leaves both as they
    were.
    """

    def __init__(self, vm: Vm, max_slots: int) -> None:
        self._vm = vm
        self._max = max_slots
        self._slots: dict[int, tuple[int, int, int, int]] = {}  # slot -> gpa, size, hva, flags
        self._lock = threading.Lock()

    def _check_free(self, gpa: int, size: int, moving: int | None = None) -> None:
        """[gpa, gpa + size) is page aligned and overlaps no slot but ``moving`` (lock held)."""
        if gpa < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"memory slot {gpa:#x}+{size:#x} is not page aligned")
        for slot, (other_gpa, other_size, _, _) in self._slots.items():
            if slot != moving and gpa < other_gpa + other_size and other_gpa < gpa + size:
                raise ValueError(f"memory slot {gpa:#x}+{size:#x} overlaps {other_gpa:#x}+{other_size:#x}")

    def add(self, gpa: int, size: int, host_addr: int, flags: int = 0) -> int:
        if host_addr % PAGE_SIZE:
            raise ValueError(f"memory slot {gpa:#x}+{size:#x} at {host_addr:#x} is not page aligned")
        with self._lock:
            self._check_free(gpa, size)
            slot = next((s for s in range(self._max) if s not in self._slots), None)
            if slot is None:
                raise ValueError("no free KVM memory slot")
            self._vm.set_user_memory_region(slot, gpa, size, host_addr, flags)
            self._slots[slot] = (gpa, size, host_addr, flags)
        log.debug("slot %d: gpa %#x size %#x hva %#x", slot, gpa, size, host_addr)
        return slot

    def remove(self, slot: int) -> None:
        with self._lock:
            gpa, _, host_addr, flags = self._slots[slot]
            self._vm.set_user_memory_region(slot, gpa, 0, host_addr, flags)
            del self._slots[slot]
        log.debug("slot %d removed", slot)

    def move(self, slot: int, new_gpa: int) -> None:
        """Move a slot to another guest-physical address, keeping its number.

        One KVM_SET_USER_MEMORY_REGION with the same slot, size, host address and
        flags and a new address is KVM's "move" (KVM_MR_MOVE): it either moves the
        slot or fails with the slot where it was, so a refused move (an overlap,
        an address KVM does not take) changes nothing here either."""
        with self._lock:
            gpa, size, host_addr, flags = self._slots[slot]
            if new_gpa == gpa:
                return
            self._check_free(new_gpa, size, moving=slot)
            self._vm.set_user_memory_region(slot, new_gpa, size, host_addr, flags)
            self._slots[slot] = (new_gpa, size, host_addr, flags)
        log.debug("slot %d moved: gpa %#x -> %#x", slot, gpa, new_gpa)

    def get(self, slot: int) -> tuple[int, int, int, int]:
        with self._lock:
            return self._slots[slot]
