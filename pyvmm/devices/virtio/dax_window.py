"""The virtio-fs DAX window: a host reservation that file ranges are mapped into.

A virtio-fs device with ``dax=on`` exposes shared memory region 0 (the DAX
cache, ``VIRTIO_FS_SHMCAP_ID_CACHE``) in PCI BAR 2.  On the host the window is
one anonymous reservation of ``size`` bytes; ``DaxShm`` registers it as a KVM
memory slot wherever the guest places BAR 2.  When the vhost-user backend asks
(SHMEM_MAP or the legacy FS_MAP), ``DaxWindow.map`` puts a range of a file at
``host_addr + offset`` with ``mmap(MAP_SHARED | MAP_FIXED)``; KVM's MMU
notifiers pick the new pages up under the existing slot, so guest loads and
stores then reach the host page cache with no exit and no copy.

Rules this module keeps (docs/vhost-user-dax.md 6):

* Every request is validated before any mmap: page-aligned offset and length,
  length > 0, inside the window, values that fit the wire's u64 (and off_t for
  the file offset), an open regular file whose access mode allows the
  protection asked for.  An invalid request raises ``DaxRequestError`` (a
  ``ValueError``) with a one-line reason and changes nothing.
* The window keeps a table of its mappings, one entry per mapping as it was
  made, bounded (``max_mappings``).  SHMEM_MAP/SHMEM_UNMAP name whole
  mappings (``exclusive``/``exact``: no overlap but the very same range, no
  partial or unknown unmap); the legacy FS_MAP/FS_UNMAP replace and cut
  (docs/vhost-user-dax.md 2.6).
* Nothing is ever mapped outside ``[host_addr, host_addr + size)``: each
  ``mmap(MAP_FIXED)`` is preceded by an explicit bounds check that holds under
  ``python -O`` too.  The window never has an unmapped gap that a later
  ``mmap(NULL)`` of the VMM could land in (and that the guest would then see):
  unmapping puts the reservation back over the range with ``MAP_FIXED``, and a
  failed map does the same before it reports the host error (``OSError``).

Unmapped parts of the window ("holes")
--------------------------------------
Holes are anonymous ``MAP_PRIVATE | MAP_NORESERVE`` memory with ``PROT_READ``
(``HOLE_PROT``): a stray guest read returns zeros (the shared zero page, no
memory is allocated); a stray write allocates nothing either, it faults (see
the table).  This is crosvm's choice.  ``PROT_NONE`` (cloud-hypervisor, alioth) gives the guest
nothing more and faults on reads too; a writable hole would absorb stray writes
but lets the guest make the VMM allocate up to ``size`` bytes of anonymous
memory, and under ``vm.overcommit_memory=2`` a writable private reservation is
charged in full at start (MAP_NORESERVE is ignored there), so a big window
could fail to start.  ``DaxWindow(size, hole_prot=...)`` accepts all three.

What KVM does with an access that the host mapping cannot satisfy was measured
on a PVM host (kvm_pvm, Linux 6.18, tiny guests with pyvmm's run loop, a 2 MiB
window in a memory slot):

=========================================  ======================  =============================
access                                     guest CPL0 (emulated)   guest CPL3 (native)
=========================================  ======================  =============================
read of a PROT_NONE hole                   KVM_EXIT_MMIO           KVM_RUN fails with EFAULT
read of a PROT_READ hole                   zeros                   zeros
write to a PROT_READ hole                  KVM_EXIT_MMIO (write)   KVM_RUN fails with EFAULT
read/write of a PROT_READ|PROT_WRITE hole  zeros / stored          zeros / stored
write to a read-only file mapping          KVM_EXIT_MMIO (write)   KVM_RUN fails with EFAULT
read of a file page beyond EOF             KVM_EXIT_MMIO           KVM_RUN fails with EFAULT
=========================================  ======================  =============================

(PVM runs guest kernel code in KVM's instruction emulator, which treats guest
memory it cannot copy as MMIO; user code runs natively and its faults go
through KVM's MMU.  BAR 2 is not on the MMIO bus, so such an exit is an
unclaimed access: reads return all ones, writes are dropped.  Hardware KVM is expected to behave like the CPL3 column at
every privilege level; not measured here.)  The EFAULT repeats on every
KVM_RUN until something changes; ``kvm_run.exit_reason`` stays 0
(KVM_EXIT_UNKNOWN) although KVM_CAP_MEMORY_FAULT_INFO is reported, so the
VMM does not learn the guest-physical address.  Injecting ``#GP(0)`` with
KVM_SET_VCPU_EVENTS after such an EFAULT ran the guest's #GP handler with the
faulting RIP (measured), so that is how a run loop can survive it: a Linux
guest turns a user-mode #GP into SIGSEGV for that process.  Mapping something
over the page and calling KVM_RUN again also lets the instruction complete
(measured), but without the address the VMM cannot know which page.

No reservation choice avoids EFAULT completely (writes to read-only file
ranges and pages past the end of a file fault whatever the holes are), so the
vCPU run loop must handle ``KVM_RUN`` EFAULT without ending the VMM; with
``PROT_READ`` holes the only EFAULTs left come from a guest writing where it
never asked for write access, or touching a file past its end.

Prefaulting (``DaxWindow(size, prefault=True)``, off by default)
----------------------------------------------------------------
With ``prefault`` each new mapping's host page tables are filled before ``map``
returns (``madvise(MADV_POPULATE_READ)``, Linux 5.14; an EINVAL from an older
kernel turns it off, logged once; any other error is ignored), so the guest's
first touch of a page needs no host page fault behind KVM's.  Writable mappings
get MADV_POPULATE_READ too: MADV_POPULATE_WRITE would dirty the whole range and
allocate blocks in a sparse file (a 2 MiB hole became 2 MiB of blocks and a new
mtime, measured) although the guest may write one page of it.  Off by default
because it did not pay on the PVM host (bench/README.md, ``make bench-fs``):
the host faults it saves cost ~0.3 us a page (64 MiB first touched in 5 ms with
fault-around), the guest's first touch ~28 us, which is KVM's own fault.

``DaxWindow`` is thread-safe: the backend request listener maps and unmaps
while vCPU threads reprogram BAR 2 and other threads resolve ranges.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Protocol

from ...memory import PAGE_SIZE
from ...snapshot.fields import SaveRefused, expect_keys, uint

log = logging.getLogger(__name__)

# <sys/mman.h> (Linux, x86-64), as mmap(2), msync(2) and madvise(2) name them
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MS_ASYNC = 1
MS_INVALIDATE = 2
MS_SYNC = 4
MADV_DONTDUMP = 16
MADV_POPULATE_READ = 22          # Linux 5.14
MAP_FAILED = (1 << 64) - 1   # (void *) -1 as ctypes.c_void_p returns it

# <fcntl.h>: file seals (fcntl(2) "File Sealing")
F_GET_SEALS = 1034
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
O_PATH = 0o10000000

# include/uapi/linux/virtio_fs.h: shared memory region id of the DAX cache (BAR 2)
VIRTIO_FS_SHMCAP_ID_CACHE = 0

DAX_RANGE_SIZE = 2 << 20         # Linux maps the window in 2 MiB ranges (FUSE_DAX_SHIFT 21)
MIN_WINDOW_SIZE = DAX_RANGE_SIZE
U64_LIMIT = 1 << 64              # wire values are u64
OFF_T_LIMIT = 1 << 63            # mmap's offset is a signed 64-bit off_t

HOLE_PROT = PROT_READ            # see "Unmapped parts of the window" above
HOLE_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_HOLE_PROTS = (PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE)

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int64]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_msync = _libc.msync
_msync.restype = ctypes.c_int
_msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class iovec(ctypes.Structure):   # <sys/uio.h>
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


assert ctypes.sizeof(iovec) == 16
# process_vm_readv/writev on our own pid: a copy the kernel does, so an address the
# window cannot serve (a hole that cannot be written, a page past its file's end) is
# an EFAULT return, never a SIGSEGV/SIGBUS in the VMM.
_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _f in (_process_vm_readv, _process_vm_writev):
    _f.restype = ctypes.c_ssize_t
    _f.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.POINTER(iovec),
                   ctypes.c_ulong, ctypes.c_ulong]

FILE_IO_CHUNK = 1 << 20          # FS_IO bounce buffer: the file I/O runs without the lock
# The mapping table's bound: one entry per page at most (entries are disjoint and page
# granular), and never more than this (Linux maps 2 MiB ranges: 65536 of them fill a
# 128 GiB window).  A request that would need more is refused.
MAX_MAPPINGS = 1 << 16


class DaxRequestError(ValueError):
    """An invalid map/unmap/sync request (the reason is one line); nothing changed."""


def _oserror(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DaxMapping:
    """A window range backed by a file range: ``[offset, offset + length)`` of the
    window shows ``[fd_offset, fd_offset + length)`` of the file (dev, ino)."""

    offset: int
    length: int
    writable: bool
    dev: int
    ino: int
    fd_offset: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def clip(self, start: int, end: int) -> "DaxMapping":
        """The part of this mapping inside window range [start, end)."""
        start, end = max(start, self.offset), min(end, self.end)
        return DaxMapping(start, end - start, self.writable, self.dev, self.ino,
                          self.fd_offset + (start - self.offset))

    def continues(self, other: "DaxMapping") -> bool:
        """True when ``other`` starts where this ends, in the window and in the same file."""
        return (self.end == other.offset and self.writable == other.writable
                and self.dev == other.dev and self.ino == other.ino
                and self.fd_offset + self.length == other.fd_offset)


@dataclass(frozen=True)
class DaxSegment:
    """One piece of a ``resolve`` answer: a window range and what backs it."""

    offset: int
    length: int
    mapping: DaxMapping | None   # clipped to this piece; None for a hole

    @property
    def file_offset(self) -> int | None:
        return None if self.mapping is None else self.mapping.fd_offset


class DaxWindow:
    """One reserved host range of ``size`` bytes (a power of two, at least 2 MiB).

    ``host_addr`` is 2 MiB aligned, so 2 MiB guest ranges can be backed by huge
    pages where the file system provides them.
    """

    def __init__(self, size: int, hole_prot: int = HOLE_PROT, prefault: bool = False) -> None:
        if not _is_int(size) or size < MIN_WINDOW_SIZE or size & (size - 1) or size >= U64_LIMIT:
            raise ValueError(f"DAX window size {size!r} is not a power of two of at least "
                             f"{MIN_WINDOW_SIZE >> 20} MiB")
        if hole_prot not in _HOLE_PROTS:
            raise ValueError(f"hole protection {hole_prot!r} is not PROT_NONE, PROT_READ "
                             f"or PROT_READ | PROT_WRITE")
        self.size = size
        self.hole_prot = hole_prot
        self.prefault = bool(prefault)   # see "Prefaulting" above
        self._can_populate = True   # False after EINVAL: a kernel before 5.14
        self.max_mappings = min(size // PAGE_SIZE, MAX_MAPPINGS)
        self._lock = threading.Lock()
        # The mapping table: each entry one mapping as it was asked for (SHMEM_UNMAP names
        # whole mappings), sorted by offset, disjoint, at most max_mappings entries.
        self._maps: list[DaxMapping] = []
        self._starts: list[int] = []         # offsets of _maps, for bisect
        self._closed = False
        self.host_addr = self._reserve(size)
        log.debug("DAX window: %#x bytes at %#x (holes %s)", size, self.host_addr,
                  {PROT_NONE: "PROT_NONE", PROT_READ: "PROT_READ"}.get(hole_prot, "PROT_READ|PROT_WRITE"))

    def _reserve(self, size: int) -> int:
        """mmap(NULL) a little more than ``size`` and trim it to a 2 MiB aligned range."""
        span = size + DAX_RANGE_SIZE
        addr = _mmap(None, span, self.hole_prot, HOLE_FLAGS, -1, 0)
        if addr is None or addr == MAP_FAILED:
            raise _oserror(f"mmap of a {size:#x} byte DAX window")
        base = (addr + DAX_RANGE_SIZE - 1) & ~(DAX_RANGE_SIZE - 1)
        head, tail = base - addr, addr + span - (base + size)
        if head and _munmap(addr, head):
            raise _oserror("munmap")
        if tail and _munmap(base + size, tail):
            raise _oserror("munmap")
        self._dontdump(base, size)
        return base

    @staticmethod
    def _dontdump(addr: int, length: int) -> None:
        # Core dumps of the VMM need neither the reservation nor the guest's files.
        if _madvise(addr, length, MADV_DONTDUMP):
            log.debug("madvise(MADV_DONTDUMP) at %#x: %s", addr, os.strerror(ctypes.get_errno()))

    # --- validation (no side effects) ------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise DaxRequestError("the DAX window is closed")

    def _check_range(self, offset: int, length: int, aligned: bool = True) -> None:
        if not _is_int(offset) or not _is_int(length):
            raise DaxRequestError(f"window offset {offset!r} and length {length!r} must be integers")
        if not 0 <= offset < U64_LIMIT:
            raise DaxRequestError(f"window offset {offset:#x} is not a u64")
        if length == 0:
            raise DaxRequestError("length is zero")
        if not 0 < length < U64_LIMIT:
            raise DaxRequestError(f"length {length:#x} is not a u64")
        if offset + length >= U64_LIMIT:
            raise DaxRequestError(f"window range {offset:#x}+{length:#x} overflows 64 bits")
        if aligned and (offset % PAGE_SIZE or length % PAGE_SIZE):
            raise DaxRequestError(f"window range {offset:#x}+{length:#x} is not {PAGE_SIZE}-byte aligned")
        if offset + length > self.size:
            raise DaxRequestError(f"window range {offset:#x}+{length:#x} ends past the window "
                                  f"({self.size:#x} bytes)")

    @staticmethod
    def _check_file(fd: int, fd_offset: int, length: int, writable: bool) -> os.stat_result:
        if not _is_int(fd_offset):
            raise DaxRequestError(f"file offset {fd_offset!r} must be an integer")
        if not 0 <= fd_offset < U64_LIMIT:
            raise DaxRequestError(f"file offset {fd_offset:#x} is not a u64")
        if fd_offset % PAGE_SIZE:
            raise DaxRequestError(f"file offset {fd_offset:#x} is not {PAGE_SIZE}-byte aligned")
        if fd_offset + length >= OFF_T_LIMIT:
            raise DaxRequestError(f"file range {fd_offset:#x}+{length:#x} does not fit off_t")
        st, mode = _regular_file(fd)
        if mode == os.O_WRONLY:
            raise DaxRequestError(f"fd {fd} is open write-only; a mapping needs read access")
        if writable:
            if mode != os.O_RDWR:
                raise DaxRequestError(f"fd {fd} is open read-only; a writable mapping needs O_RDWR")
            try:
                seals = fcntl.fcntl(fd, F_GET_SEALS)
            except OSError:
                seals = 0   # EINVAL: not a file that supports sealing
            if seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                raise DaxRequestError(f"fd {fd} is sealed against writing")
        return st

    def _assert_inside(self, addr: int, length: int) -> None:
        """The last line of defence before every mmap(MAP_FIXED): inside the window."""
        if not (self.host_addr <= addr and length > 0 and addr + length <= self.host_addr + self.size):
            raise AssertionError(f"refusing mmap at {addr:#x}+{length:#x}: outside the DAX window "
                                 f"{self.host_addr:#x}+{self.size:#x}")

    # --- requests --------------------------------------------------------------------------
    def map(self, offset: int, length: int, fd: int, fd_offset: int, writable: bool, *,
            exclusive: bool = False) -> None:
        """Map ``length`` bytes of file ``fd`` at ``fd_offset`` to window ``offset``.

        By default (the legacy FS_MAP) whatever was at that range is replaced, as
        mmap(MAP_FIXED) does.  ``exclusive`` (SHMEM_MAP) keeps the table's rules: the
        range must be free, or be exactly one existing mapping, which is then replaced
        (the guest's read-to-write upgrade of a range, without a gap another vCPU could
        hit); any other overlap is refused.  The caller keeps ``fd``; the mapping holds
        its own reference to the file.  On a host failure (``OSError``) the range is
        left unmapped.
        """
        if not (isinstance(writable, bool) or (_is_int(writable) and writable in (0, 1))):
            raise DaxRequestError(f"writable flag {writable!r} is not a boolean")
        writable = bool(writable)
        with self._lock:
            st = self._check_map(offset, length, fd, fd_offset, writable, exclusive)
            addr = self.host_addr + offset
            prot = PROT_READ | (PROT_WRITE if writable else 0)
            self._assert_inside(addr, length)
            got = _mmap(addr, length, prot, MAP_SHARED | MAP_FIXED, fd, fd_offset)
            if got is None or got == MAP_FAILED:
                error = _oserror("mmap")
            elif got != addr:   # MAP_FIXED never does this; undo whatever it mapped
                error = OSError(errno.EFAULT, f"mmap: MAP_FIXED returned {got:#x}, not {addr:#x}")
                if self.host_addr <= got and got + length <= self.host_addr + self.size:
                    self._cut(got - self.host_addr, got - self.host_addr + length)
                    self._fill_hole(got - self.host_addr, length)
                else:
                    _munmap(got, length)
            else:
                error = None
            if error is not None:
                # The old contents of the range may or may not have survived: make it a hole.
                self._cut(offset, offset + length)
                self._fill_hole(offset, length)
                log.error("DAX map %#x+%#x of fd %d at %#x failed: %s; the range is unmapped",
                          offset, length, fd, fd_offset, error)
                raise error
            self._dontdump(addr, length)
            self._cut(offset, offset + length)
            self._insert(DaxMapping(offset, length, writable, st.st_dev, st.st_ino, fd_offset))
            if self.prefault:
                self._populate(offset, length)
        log.debug("DAX map %#x+%#x <- dev %#x ino %d at %#x %s", offset, length, st.st_dev,
                  st.st_ino, fd_offset, "rw" if writable else "ro")

    def populate(self, offset: int, length: int) -> bool:
        """Fill the host page tables of window range ``[offset, offset + length)`` if
        one mapping covers it (madvise MADV_POPULATE_READ, see "Prefaulting" above).
        Anything else (a range outside the window, a hole, a mapping replaced
        meanwhile, a closed window, a host error) does nothing and returns False:
        populating is only an optimisation."""
        with self._lock:
            if self._closed or not self._can_populate:
                return False
            try:
                self._check_range(offset, length)
            except DaxRequestError:
                return False
            hit = self._overlapping(offset, offset + length)
            if len(hit) != 1 or hit[0].offset > offset or hit[0].end < offset + length:
                return False
            return self._populate(offset, length)

    def _populate(self, offset: int, length: int) -> bool:
        """madvise(MADV_POPULATE_READ) a mapped range (lock held, range checked)."""
        if not self._can_populate:
            return False
        addr = self.host_addr + offset
        self._assert_inside(addr, length)
        if not _madvise(addr, length, MADV_POPULATE_READ):
            return True
        err = ctypes.get_errno()
        if err == errno.EINVAL:   # the advice is unknown before Linux 5.14
            self._can_populate = False
            log.info("DAX window: madvise(MADV_POPULATE_READ) is not supported by this kernel; "
                     "mappings are not prefaulted")
        else:   # e.g. EFAULT past the end of the file, ENOMEM: the guest faults them in
            log.debug("DAX populate %#x+%#x: %s", offset, length, os.strerror(err))
        return False

    def check_map(self, offset: int, length: int, fd: int, fd_offset: int, writable: bool, *,
                  exclusive: bool = False) -> None:
        """Validate a ``map`` request without doing it (DaxRequestError when invalid):
        how a request of several entries is checked whole before any is mapped."""
        if not (isinstance(writable, bool) or (_is_int(writable) and writable in (0, 1))):
            raise DaxRequestError(f"writable flag {writable!r} is not a boolean")
        with self._lock:
            self._check_map(offset, length, fd, fd_offset, bool(writable), exclusive)

    def _check_map(self, offset: int, length: int, fd: int, fd_offset: int, writable: bool,
                   exclusive: bool) -> os.stat_result:
        """Every check of a map request (lock held); the file's stat."""
        self._check_open()
        self._check_range(offset, length)
        st = self._check_file(fd, fd_offset, length, writable)
        hit = self._overlapping(offset, offset + length)
        if exclusive and hit and not (len(hit) == 1 and (hit[0].offset, hit[0].length) == (offset, length)):
            m = hit[0]
            raise DaxRequestError(f"window range {offset:#x}+{length:#x} overlaps the mapping "
                                  f"{m.offset:#x}+{m.length:#x} (only the very same range may be "
                                  "mapped again)")
        self._check_room(offset, offset + length, hit, adding=1)
        return st

    def _check_room(self, start: int, end: int, hit: list[DaxMapping], adding: int) -> None:
        """The table stays within max_mappings when [start, end) is cut out of it and
        ``adding`` entries go in (lock held)."""
        kept = int(bool(hit) and hit[0].offset < start) + int(bool(hit) and hit[-1].end > end)
        if len(self._maps) - len(hit) + kept + adding > self.max_mappings:
            raise DaxRequestError(f"the DAX window's mapping table is full ({self.max_mappings} "
                                  "mappings)")

    def unmap(self, offset: int, length: int, *, exact: bool = False) -> None:
        """Put ``[offset, offset + length)`` back to the reserved (hole) state.

        By default (the legacy FS_UNMAP, FUSE_REMOVEMAPPING's ranges) the range may
        hold holes and cover mappings in part, which are then cut.  ``exact``
        (SHMEM_UNMAP) requires the range to be exactly one whole mapping.
        """
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            hit = self._overlapping(offset, offset + length)
            if exact and not (len(hit) == 1 and (hit[0].offset, hit[0].length) == (offset, length)):
                what = (f"covers {len(hit)} mappings" if len(hit) > 1 else
                        f"is part of or more than the mapping {hit[0].offset:#x}+{hit[0].length:#x}"
                        if hit else "is not mapped")
                raise DaxRequestError(f"window range {offset:#x}+{length:#x} {what}: an unmap must "
                                      "name exactly one whole mapping")
            self._check_room(offset, offset + length, hit, adding=0)
            self._cut(offset, offset + length)
            self._fill_hole(offset, length)
        log.debug("DAX unmap %#x+%#x", offset, length)

    def unmap_all(self) -> None:
        """Drop every mapping (device reset)."""
        with self._lock:
            if self._closed or not self._maps:
                return
            self._maps, self._starts = [], []
            self._fill_hole(0, self.size)
        log.debug("DAX window: all mappings dropped")

    def sync(self, offset: int, length: int) -> None:
        """msync(MS_SYNC) the mapped parts of ``[offset, offset + length)``.

        A range with no mapping in it is an invalid request; holes between
        mappings are skipped.  A write-back failure is an ``OSError``.
        """
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            parts = [m.clip(offset, offset + length) for m in self._overlapping(offset, offset + length)]
            if not parts:
                raise DaxRequestError(f"window range {offset:#x}+{length:#x} is not mapped")
            for m in parts:
                if _msync(self.host_addr + m.offset, m.length, MS_SYNC):
                    raise _oserror(f"msync of window range {m.offset:#x}+{m.length:#x}")
        log.debug("DAX sync %#x+%#x (%d mapped parts)", offset, length, len(parts))

    def file_io(self, offset: int, length: int, fd: int, fd_offset: int, to_file: bool) -> int:
        """Copy between window bytes ``[offset, offset + length)`` and file ``fd``.

        For FS_IO: a FUSE READ/WRITE whose guest buffer lies in the window.  The
        file I/O goes through a bounce buffer without the window's lock (a file
        that blocks must not block map/unmap/reset); only the copy to or from the
        window holds it, and that copy is done by the kernel (``process_vm_*v``
        on our own pid), so a hole that cannot be written or a mapped page past
        its file's end is an EFAULT, never a fault in the VMM.  ``to_file``:
        window -> file, else file -> window.  Returns the bytes moved (short at
        end of file or at the first window byte that cannot be copied; OSError
        EFAULT when not even the first one can).
        """
        if not _is_int(fd_offset) or not _is_int(length) or not 0 <= fd_offset < OFF_T_LIMIT - length:
            raise DaxRequestError(f"file range {fd_offset!r}+{length!r} is out of range")
        with self._lock:
            self._check_open()
            self._check_range(offset, length, aligned=False)
        self._check_io_file(fd, to_file)
        total = 0
        while total < length:
            n = min(FILE_IO_CHUNK, length - total)
            if to_file:
                data = self._window_copy(offset + total, bytearray(n), into_window=False)
                done = os.pwrite(fd, data, fd_offset + total) if data else 0
            else:
                data = os.pread(fd, n, fd_offset + total)
                done = len(self._window_copy(offset + total, bytearray(data), into_window=True))
            total += done
            if done < n:
                break
        return total

    @staticmethod
    def _check_io_file(fd: int, to_file: bool) -> None:
        _, mode = _regular_file(fd)
        if mode == (os.O_RDONLY if to_file else os.O_WRONLY):
            raise DaxRequestError(f"fd {fd} is not open for {'writing' if to_file else 'reading'}")

    def _window_copy(self, offset: int, buf: bytearray, into_window: bool) -> bytearray:
        """Copy ``buf`` into the window at ``offset``, or fill it from there; returns the
        part that was copied (shorter when the window could not serve the rest)."""
        if not buf:
            return buf
        local = iovec(ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)), len(buf))
        with self._lock:   # the range stays mapped (or a hole) while the kernel copies
            self._check_open()
            self._check_range(offset, len(buf), aligned=False)
            addr = self.host_addr + offset
            self._assert_inside(addr, len(buf))
            remote = iovec(addr, len(buf))
            call = _process_vm_writev if into_window else _process_vm_readv
            got = call(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:   # EFAULT: the first byte already cannot be copied
            err = ctypes.get_errno()
            raise OSError(err, f"DAX window {offset:#x}+{len(buf):#x} cannot be "
                               f"{'written' if into_window else 'read'}: {os.strerror(err)}")
        return buf[:got]

    def close(self) -> None:
        """munmap the whole window.  Remove its KVM memory slot first (DaxShm.close)."""
        with self._lock:
            if self._closed:
                return
            if _munmap(self.host_addr, self.size):
                raise _oserror("munmap of the DAX window")
            self._closed = True
            self._maps, self._starts = [], []
        log.debug("DAX window at %#x closed", self.host_addr)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "DaxWindow":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- queries ---------------------------------------------------------------------------
    def mappings(self) -> list[DaxMapping]:
        """What the window shows, by window offset: adjacent ranges of one file at
        consecutive file offsets with the same protection are merged."""
        with self._lock:
            return _merged(self._maps)

    def entries(self) -> list[DaxMapping]:
        """The mapping table itself: one entry per mapping as it was made."""
        with self._lock:
            return list(self._maps)

    def overlapping(self, offset: int, length: int) -> list[DaxMapping]:
        """The (merged) mappings that intersect the (validated) range, unclipped."""
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            return [m for m in _merged(self._maps) if m.offset < offset + length and offset < m.end]

    def resolve(self, offset: int, length: int) -> list[DaxSegment]:
        """Which file bytes back window bytes ``[offset, offset + length)``.

        Byte granular (a virtqueue buffer inside the window need not be page
        aligned); the answer covers the range exactly, holes included, in order.
        """
        with self._lock:
            self._check_open()
            self._check_range(offset, length, aligned=False)
            end = offset + length
            out: list[DaxSegment] = []
            pos = offset
            for m in self._overlapping(offset, end):
                part = m.clip(offset, end)
                if part.offset > pos:
                    out.append(DaxSegment(pos, part.offset - pos, None))
                out.append(DaxSegment(part.offset, part.length, part))
                pos = part.end
            if pos < end:
                out.append(DaxSegment(pos, end - pos, None))
            return out

    # --- the record ------------------------------------------------------------------------
    def _overlapping(self, start: int, end: int) -> list[DaxMapping]:
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._maps[i].end <= start:
            i += 1
        out = []
        while i < len(self._maps) and self._maps[i].offset < end:
            out.append(self._maps[i])
            i += 1
        return out

    def _cut(self, start: int, end: int) -> None:
        """Remove [start, end) from the record, splitting mappings that stick out."""
        hit = self._overlapping(start, end)
        if not hit:
            return
        i = bisect.bisect_left(self._starts, hit[0].offset)
        keep = []
        if hit[0].offset < start:
            keep.append(hit[0].clip(hit[0].offset, start))
        if hit[-1].end > end:
            keep.append(hit[-1].clip(end, hit[-1].end))
        self._maps[i:i + len(hit)] = keep
        self._starts[i:i + len(hit)] = [m.offset for m in keep]

    def _insert(self, new: DaxMapping) -> None:
        """Insert into a gap of the table."""
        i = bisect.bisect_left(self._starts, new.offset)
        self._maps.insert(i, new)
        self._starts.insert(i, new.offset)

    def _fill_hole(self, offset: int, length: int) -> None:
        """mmap the reservation kind over a window range (MAP_FIXED, never a gap)."""
        addr = self.host_addr + offset
        self._assert_inside(addr, length)
        got = _mmap(addr, length, self.hole_prot, HOLE_FLAGS | MAP_FIXED, -1, 0)
        if got is None or got == MAP_FAILED or got != addr:
            error = _oserror("mmap of a DAX window hole")
            log.critical("DAX window %#x+%#x: cannot restore the reservation at %#x+%#x: %s",
                         self.host_addr, self.size, offset, length, error)
            raise error
        self._dontdump(addr, length)


def _merged(maps: list[DaxMapping]) -> list[DaxMapping]:
    """``maps`` (sorted, disjoint) with each run of continuing mappings made one."""
    out: list[DaxMapping] = []
    for m in maps:
        if out and out[-1].continues(m):
            prev = out[-1]
            out[-1] = DaxMapping(prev.offset, prev.length + m.length, m.writable, m.dev, m.ino,
                                 prev.fd_offset)
        else:
            out.append(m)
    return out


def _regular_file(fd: int) -> tuple[os.stat_result, int]:
    """(stat, access mode) of ``fd``, which a back-end sent: an open, regular file that
    can be read or written (not O_PATH), or DaxRequestError."""
    if not _is_int(fd) or fd < 0:
        raise DaxRequestError(f"fd {fd!r} is not a file descriptor")
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except (OSError, OverflowError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DaxRequestError(f"fd {fd} is not an open file descriptor ({reason})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DaxRequestError(f"fd {fd} is {_file_kind(st.st_mode)}, not a regular file")
    if flags & O_PATH:
        raise DaxRequestError(f"fd {fd} is an O_PATH descriptor: it cannot be mapped or read")
    return st, flags & os.O_ACCMODE


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return f"of type {stat.S_IFMT(mode):#o}"


class MemorySlotsLike(Protocol):
    """What DaxShm needs of ``pyvmm.memory.MemorySlots``."""

    def add(self, gpa: int, size: int, host_addr: int) -> int: ...

    def remove(self, slot: int) -> None: ...

    def move(self, slot: int, new_gpa: int) -> None: ...


class DaxShm:
    """The window as the PCI transport sees it: BAR 2 host memory in a KVM slot.

    A virtio-fs device delegates its shared-memory hooks here::

        def shared_memory_regions(self): return self.dax.shared_memory_regions()
        def shm_is_memory(self): return True
        def shm_moved(self, old, new): self.dax.shm_moved(old, new)
    """

    def __init__(self, window: DaxWindow, slots: MemorySlotsLike,
                 shmid: int = VIRTIO_FS_SHMCAP_ID_CACHE) -> None:
        self.window = window
        self.slots = slots
        self.shmid = shmid
        self.slot: int | None = None
        self.gpa: int | None = None
        self._lock = threading.Lock()

    def shared_memory_regions(self) -> list[tuple[int, int]]:
        return [(self.shmid, self.window.size)]

    def shm_is_memory(self) -> bool:
        return True

    def shm_moved(self, old: int | None, new: int | None) -> None:
        """BAR 2 stopped decoding at ``old`` and/or started at ``new``: add, move or
        remove the window's memory slot.  Guest-driven, so it never raises: an
        address KVM refuses leaves the window out of the guest's view (logged)."""
        with self._lock:
            if old != self.gpa:   # e.g. an earlier address KVM refused
                log.debug("DAX BAR: told it left %s, slot was at %s", _hex(old), _hex(self.gpa))
            if self.window.closed:   # a slot must never point at an unmapped window
                self._drop_slot()
                return
            if new is None:
                self._drop_slot()
                return
            if not _is_int(new) or new < 0 or new % PAGE_SIZE or new + self.window.size > U64_LIMIT:
                log.warning("DAX BAR: guest address %s refused: not a page-aligned 64-bit range", new)
                self._drop_slot()
                return
            try:
                if self.slot is None:
                    self.slot = self.slots.add(new, self.window.size, self.window.host_addr)
                else:
                    self.slots.move(self.slot, new)
            except Exception as e:  # noqa: BLE001 - a guest-chosen address, never fatal
                log.warning("DAX BAR: window cannot be placed at %#x: %s", new, e)
                self._drop_slot()
                return
            self.gpa = new
        log.debug("DAX BAR: window %#x+%#x in slot %d at %#x", self.window.host_addr,
                  self.window.size, self.slot, new)

    def _drop_slot(self) -> None:
        if self.slot is not None:
            try:
                self.slots.remove(self.slot)
            except (KeyError, ValueError, OSError) as e:   # a failed move already removed it
                log.debug("DAX BAR: slot %d removal: %s", self.slot, e)
            log.debug("DAX BAR: slot %d removed", self.slot)
        self.slot = None
        self.gpa = None

    def window_offset(self, gpa: int, length: int) -> int | None:
        """The window offset of guest range ``[gpa, gpa + length)`` if wholly inside
        the window at its current address, else None."""
        with self._lock:
            if self.gpa is None or not _is_int(gpa) or not _is_int(length) or length < 0:
                return None
            if self.gpa <= gpa and gpa + length <= self.gpa + self.window.size:
                return gpa - self.gpa
            return None

    def reset(self) -> None:
        """Device reset: every mapping goes (the slot stays while the BAR decodes)."""
        self.window.unmap_all()

    # --- snapshot ---------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The window's size; the memory slot follows BAR 2, which the PCI root maps.

        Only an empty window can be saved.  A mapping is a file the back-end opened
        and mmap'ed into the window on the guest's behalf (a DAX mount): a snapshot
        cannot carry it (a new back-end has neither the fd nor the FUSE node and
        handle behind it, and the guest's page tables point into the window), so a
        window with mappings refuses the save (SaveRefused).  At a snapshot point
        nothing is mounted yet and the window is empty."""
        maps = self.window.mappings()
        if maps:
            raise SaveRefused(f"the DAX window has {len(maps)} file mapping(s), e.g. "
                              f"{maps[0].offset:#x}+{maps[0].length:#x}: the share is mounted with "
                              "DAX and a snapshot cannot carry file mappings (unmount it first)")
        return {"window_size": self.window.size}

    def parse_state(self, state: object, path: str) -> None:
        expect_keys(state, ("window_size",), path)
        size = uint(state["window_size"], f"{path}.window_size", U64_LIMIT)
        if size != self.window.size:
            raise ValueError(f"{path}.window_size: {size:#x} in the snapshot, {self.window.size:#x} here")
        return None

    def restore_state(self, state: dict, path: str = "dax") -> None:
        """Check the window's size; the slot comes back with BAR 2 (PciRoot)."""
        self.parse_state(state, path)

    def close(self) -> None:
        """Remove the slot, then unmap the window (in that order: a slot must never
        point at host addresses that something else could be mapped at)."""
        with self._lock:
            self._drop_slot()
            self.window.close()


class DaxWindows:
    """Every DAX window of one VM, by the guest-physical range it is at now.

    FS_IO is how a back-end reaches a FUSE buffer that lies in a DAX window: its
    memory table covers guest RAM only.  That window need not be its own device's:
    a guest program that uses a DAX mapping of share A as the buffer of an O_DIRECT
    read() of a file on share B puts A's window pages on B's queue.  So every
    virtio-fs device of a VM shares one registry and FS_IO is routed by address to
    the window that holds it.  One entry per device, added when it is built.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shms: list[DaxShm] = []

    def add(self, shm: DaxShm) -> None:
        with self._lock:
            if shm not in self._shms:
                self._shms.append(shm)

    def remove(self, shm: DaxShm) -> None:
        with self._lock:
            if shm in self._shms:
                self._shms.remove(shm)

    def locate(self, gpa: int, length: int) -> tuple[DaxWindow, int] | None:
        """(window, offset) of the window that holds guest range [gpa, gpa + length)
        whole, at the address its BAR decodes now; None when no window does."""
        with self._lock:
            shms = list(self._shms)
        for shm in shms:
            offset = shm.window_offset(gpa, length)
            if offset is not None:
                return shm.window, offset
        return None


def _hex(value: int | None) -> str:
    return "nowhere" if value is None else f"{value:#x}"
