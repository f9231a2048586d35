"""The snapshot point: the guest says "now is a good moment to snapshot me".

pyvmm's own port (0x502, SNAPSHOT_PORT in pyvmm/boot/layout.py, length 1;
docs/guest-contract.md).  With ``pyvmm.snapshot=1`` the default guest's
/init writes one byte here when its boot is done and before it mounts a
share or runs anything.  The VMM then pauses every vCPU (the writing one
included, with this ``out`` completed) and saves the machine; the guest sees
nothing but time passing, and after a restore it continues right after the
write.  Reads return 0xff, like an unclaimed ISA port.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)


class SnapshotPoint:
    """One write-only port; each write calls ``on_reached()`` (on the vCPU thread)."""

    def __init__(self, on_reached: Callable[[], None]) -> None:
        self._on_reached = on_reached
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not data:
            return
        self.count += 1
        self._on_reached()
