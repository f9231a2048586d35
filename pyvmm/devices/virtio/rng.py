"""virtio-rng: the host's entropy for the guest (virtio v1.2, 5.4).

One queue (requestq, 5.4.2).  The driver posts device-writable buffers; the
device fills them with random bytes from ``os.urandom`` (the host kernel's
CSPRNG) and returns them.  A device may use less than the whole buffer
(5.4.7.2): a request is capped at ``MAX_REQUEST`` bytes so that a guest
cannot make the VMM allocate a huge string.  No feature bits, no
configuration space (5.4.3, 5.4.4).
"""

from __future__ import annotations

import logging
import os

from .device import VIRTIO_ID_RNG, VirtioDevice

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024   # bytes of entropy per chain at most


class VirtioRng(VirtioDevice):
    """An entropy source device."""

    device_id = VIRTIO_ID_RNG
    num_queues = 1

    def process_queue(self, index: int) -> None:
        if index == 0:
            self.serve_queue(0, self._fill)

    def _fill(self, chain) -> int:
        """Fill the chain's writable buffers (up to MAX_REQUEST); bytes written."""
        n = min(chain.writable_len(), MAX_REQUEST)
        if n <= 0:
            return 0
        try:
            return chain.write(self.mem, os.urandom(n))
        except ValueError as e:   # GuestMemoryError: a buffer outside guest RAM
            log.warning("virtio-rng: request %d: %s", chain.head, e)
            return 0
