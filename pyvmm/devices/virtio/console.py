"""virtio-console: one console port without MULTIPORT (virtio v1.2, 5.3).

Queues (5.3.2): receiveq0 (index 0) carries host bytes to the guest in
device-writable buffers the driver posts ahead of time; transmitq0 (index 1)
carries guest bytes to the host in device-readable buffers, copied out buffer
by buffer and at most ``TRANSMIT_MAX`` bytes per chain.

Host input arrives through ``receive()`` (the host's input thread, or the
agent port answering the guest) and waits in a backlog until the driver has
posted receive buffers: nothing is reordered, and nothing is dropped until
``BACKLOG_MAX`` bytes wait (a guest that never reads must not grow the VMM).
Both ``receive()`` and ``process_queue(0)`` (the driver posted buffers and
kicked) move as much of the backlog as fits; a lock keeps receiveq0 to one thread at a time, as a
``Virtqueue`` is not thread-safe.

VIRTIO_CONSOLE_F_EMERG_WRITE (5.3.3) is offered: a driver may write a
character to ``emerg_wr`` in the configuration space at any time, even before
the queues are set up (the kernel's early console), and it goes to ``out``.
VIRTIO_CONSOLE_F_SIZE is not offered: ``cols``/``rows`` read as 0.

Snapshot: the backlog (at most ``BACKLOG_SAVE_MAX`` bytes).  While quiesced,
host input only joins the backlog; the transport's worker delivers it on resume.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Callable

from ...snapshot.fields import SaveRefused, blob, expect_keys
from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .queue import buffer_pieces

log = logging.getLogger(__name__)

# Feature bits (5.3.3)
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# Queue indexes without VIRTIO_CONSOLE_F_MULTIPORT (5.3.2)
RECEIVEQ0 = 0
TRANSMITQ0 = 1


class virtio_console_config(ctypes.LittleEndianStructure):
    """The device configuration space (5.3.4)."""

    _pack_ = 1
    _fields_ = [
        ("cols", ctypes.c_uint16),
        ("rows", ctypes.c_uint16),
        ("max_nr_ports", ctypes.c_uint32),
        ("emerg_wr", ctypes.c_uint32),
    ]


assert ctypes.sizeof(virtio_console_config) == 12
assert virtio_console_config.cols.offset == 0
assert virtio_console_config.rows.offset == 2
assert virtio_console_config.max_nr_ports.offset == 4
assert virtio_console_config.emerg_wr.offset == 8

EMERG_WR_OFFSET = virtio_console_config.emerg_wr.offset
BACKLOG_SAVE_MAX = 1 << 20   # host input a snapshot may carry; more is refused
BACKLOG_MAX = 16 << 20       # host input waiting for the guest; more is dropped
# Guest output per transmit chain (Linux sends at most 32 KiB at once): its
# descriptors may all point at the same guest pages, so a chain's length is no
# measure of what the guest really wrote.  Copied buffer by buffer, the rest dropped.
TRANSMIT_MAX = 64 * 1024
# Descriptors per queue (the driver uses what the device offers, 4.1.4.3).  Linux's
# driver posts a page-sized receive buffer in every receiveq0 slot while it probes,
# and each costs ~4 ms of emulated kernel code on a PVM host: 256 slots made the
# probe ~1 s of every boot.  32 pages (128 KiB) of host input in flight is plenty
# for a console and the agent; transmits are sent one at a time.
QUEUE_SIZE = 32


class VirtioConsole(VirtioDevice):
    """A console: guest output goes to ``out(bytes)``, host input comes in via ``receive``."""

    device_id = VIRTIO_ID_CONSOLE
    num_queues = 2
    queue_max_size = QUEUE_SIZE

    def __init__(self, out: Callable[[bytes], None]) -> None:
        super().__init__()
        self.out = out
        self._lock = threading.Lock()      # receiveq0, the backlog, activation state
        self._backlog = bytearray()        # host bytes not yet in a guest buffer
        self._paused = False               # quiesced: host input waits in the backlog

    # --- VirtioDevice ------------------------------------------------------------------------
    def device_features(self) -> int:
        return 1 << VIRTIO_CONSOLE_F_EMERG_WRITE

    def config_bytes(self) -> bytes:
        cfg = virtio_console_config()
        cfg.max_nr_ports = 1
        return bytes(cfg)

    def config_write(self, offset: int, data: bytes) -> None:
        # emerg_wr (5.3.4): the low byte of the written value is one character.
        if offset == EMERG_WR_OFFSET and data:
            self._out(bytes(data[:1]))

    def activate(self, mem, queues: list, interrupt, driver_features: int) -> None:
        with self._lock:
            super().activate(mem, queues, interrupt, driver_features)
        # The transport's worker runs process_queue for every ready queue when it
        # starts, so buffers posted before DRIVER_OK get the backlog then.

    def reset(self) -> None:
        with self._lock:   # waits for a receive() that is delivering right now
            super().reset()
        # The backlog is kept: bytes typed before the driver (re)starts arrive later.

    def quiesce(self) -> None:
        with self._lock:   # waits for a receive() that is delivering right now
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        # The transport's worker, restarted next, delivers what arrived meanwhile.

    def save_state(self) -> dict:
        with self._lock:
            if len(self._backlog) > BACKLOG_SAVE_MAX:
                raise SaveRefused(f"virtio-console: {len(self._backlog)} bytes of host input wait "
                                  f"for the guest; at most {BACKLOG_SAVE_MAX} can be saved")
            return {"backlog": bytes(self._backlog).hex()}

    def parse_state(self, state: object, path: str) -> bytes:
        expect_keys(state, ("backlog",), path)
        return blob(state["backlog"], f"{path}.backlog", max_size=BACKLOG_SAVE_MAX)

    def apply_state(self, parsed: bytes) -> None:
        with self._lock:
            self._backlog = bytearray(parsed)

    def process_queue(self, index: int) -> None:
        if index == RECEIVEQ0:
            with self._lock:
                self._deliver()
        elif index == TRANSMITQ0:
            self._transmit()

    # --- host -> guest -----------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Queue host input for the guest (any thread); delivered as buffers allow."""
        if not data:
            return
        with self._lock:
            room = BACKLOG_MAX - len(self._backlog)
            if len(data) > room:   # e.g. agent replies to a guest that never reads them
                log.warning("virtio-console: %d bytes of host input wait for the guest: %d "
                            "more dropped", len(self._backlog), len(data) - max(room, 0))
                data = data[:max(room, 0)]
            self._backlog += data
            self._deliver()

    def pending(self) -> int:
        """Host bytes waiting for guest receive buffers."""
        with self._lock:
            return len(self._backlog)

    def _deliver(self) -> None:
        """Move backlog bytes into receiveq0 chains (the lock is held)."""
        if self._backlog and self.mem is not None and not self._paused:
            self.serve_queue(RECEIVEQ0, self._fill_from_backlog, more=lambda: bool(self._backlog))

    def _fill_from_backlog(self, chain) -> int:
        n = self._scatter(chain)
        del self._backlog[:n]
        return n

    def _scatter(self, chain) -> int:
        """Copy the head of the backlog into the chain's writable buffers; bytes copied.

        Buffer by buffer, so that a buffer outside guest RAM stops the copy
        exactly where it is: the bytes before it count as delivered (the used
        length), the rest stay in the backlog.
        """
        src = bytes(self._backlog[:chain.writable_len()])   # a copy: the backlog may be resized
        done = 0
        for buf in chain.writable:
            if done >= len(src):
                break
            n = min(buf.length, len(src) - done)
            try:
                self.mem.write(buf.gpa, src[done:done + n])
            except ValueError as e:   # GuestMemoryError
                log.warning("virtio-console: receiveq0 request %d: %s", chain.head, e)
                break
            done += n
        return done

    # --- guest -> host -----------------------------------------------------------------------
    def _transmit(self) -> None:
        self.serve_queue(TRANSMITQ0, self._send)

    def _send(self, chain) -> int:
        """Write a transmit chain out buffer by buffer, at most ``TRANSMIT_MAX`` bytes of it."""
        total = chain.readable_len()
        if total > TRANSMIT_MAX:
            log.warning("virtio-console: transmitq0 request %d of %d bytes: only the first %d "
                        "are written", chain.head, total, TRANSMIT_MAX)
        for gpa, n in buffer_pieces(chain.readable, 0, TRANSMIT_MAX):
            try:
                data = self.mem.read(gpa, n)
            except ValueError as e:   # GuestMemoryError
                log.warning("virtio-console: transmitq0 request %d: %s", chain.head, e)
                break
            self._out(data)
        return 0                  # the device writes nothing into a transmit buffer

    def _out(self, data: bytes) -> None:
        try:
            self.out(data)
        except OSError as e:   # a closed stdout must not stop the guest
            log.warning("virtio-console: output failed: %s", e)
