"""Debug-exit port: the guest tells the VMM its exit status.

There is no real hardware behind this; it is pyvmm's version of QEMU's
``isa-debug-exit`` device.  It sits at I/O port 0x501 (DEBUG_EXIT_PORT in
pyvmm/boot/layout.py, length 1).  The guest's /init runs the test program
and writes its exit status N there as one byte (``/dev/port``); the VMM
then exits with status N (docs/guest-contract.md).

Unlike QEMU's device, whose process exits with ``(N << 1) | 1`` so that a
status can never look like a clean 0, the status here is the byte itself:
writing 0 means success and the VMM exits 0, so a test script's status
passes through unchanged.  This is deliberate.

A wider write uses its low byte (x86 is little-endian, so the first byte
of ``data``).  Reads return 0xff, like an unclaimed ISA port.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class DebugExit:
    """One write-only port; each write calls ``on_exit(status)``."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._status: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        """Record the status and call ``on_exit`` (outside the lock)."""
        if offset != 0 or not data:
            log.debug("debug-exit: ignored write %r at offset %#x", data, offset)
            return
        status = data[0]  # the low byte
        with self._lock:
            self._status = status
        log.debug("debug-exit: guest exit status %d", status)
        try:
            self._on_exit(status)
        except Exception:
            log.warning("debug-exit: on_exit callback failed", exc_info=True)

    @property
    def status(self) -> int | None:
        """The last status the guest wrote, or None."""
        with self._lock:
            return self._status
