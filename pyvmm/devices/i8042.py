"""Intel 8042 PS/2 controller: just the controller, no keyboard or mouse.

The real device is the 8042 microcontroller of the IBM PC/AT keyboard
interface, today part of every Super I/O chip.  It owns two I/O ports:
0x60 (data: command responses and keyboard bytes) and 0x64 (read: status
register; write: controller command).  A VM needs it because it is the
oldest way to reset a PC: the 0xFE command pulses the CPU reset line, and
Linux's ``reboot`` uses it (``reboot=k``, also its fallback).

The model follows the IBM PC/AT Technical Reference, "Keyboard Controller":
the status register bits, the command byte (controller RAM byte 0), the
commands written to port 0x64 and the output port (bit 0 = system reset,
bit 1 = A20 gate).  Commands are executed at once, so the input buffer is
never full (IBF = 0).  Responses wait in a small output queue (a real 8042
has a one-byte output buffer and would stall).  Bytes for the keyboard or
mouse are dropped: nothing is plugged in, and no IRQ 1/12 is raised.

Registration: ports 0x61-0x63 between the two belong to others (0x61 is the
PC speaker / NMI status port that KVM's in-kernel PIT handles), so the
controller is registered as two one-byte ranges through two views::

    kbd = I8042(reset=lambda: machine.guest_ended("guest reset (i8042)"))
    bus.register(I8042_DATA_PORT, 1, kbd.data_port)
    bus.register(I8042_COMMAND_PORT, 1, kbd.command_port)

``I8042.read``/``write`` themselves take offsets relative to 0x60
(0 = data, 4 = status/command), which is what the two views forward.

Guests: Linux's i8042 driver probes for a keyboard and mouse and would
wait for replies that never come; give a kernel that has the driver
``i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`` (what Firecracker
passes).  pyvmm's default guest kernel is built without it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from ..snapshot.fields import blob, boolean, expect_keys, hex_int, optional

log = logging.getLogger(__name__)

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # status register when read
DATA_OFFSET = 0  # offsets relative to I8042_DATA_PORT
COMMAND_OFFSET = I8042_COMMAND_PORT - I8042_DATA_PORT

# Status register (read from port 0x64).
STATUS_OBF = 0x01  # output buffer full: port 0x60 has a byte for the CPU
STATUS_IBF = 0x02  # input buffer full (never, commands run at once)
STATUS_SYS = 0x04  # system flag, mirrors command byte bit 2
STATUS_CMD = 0x08  # A2: the last write went to port 0x64 (command)
STATUS_INH = 0x10  # keyboard inhibit switch: 1 = not inhibited
STATUS_AUXDATA = 0x20  # output buffer holds mouse data (never here)
STATUS_TIMEOUT = 0x40
STATUS_PARITY = 0x80

# Command byte ("controller command byte", RAM byte 0).
CTR_KBDINT = 0x01  # IRQ 1 on keyboard data
CTR_AUXINT = 0x02  # IRQ 12 on mouse data
CTR_SYS = 0x04  # system flag (POST passed)
CTR_KBDDIS = 0x10  # keyboard interface disabled
CTR_AUXDIS = 0x20  # mouse interface disabled
CTR_XLATE = 0x40  # translate scan codes to set 1
CTR_DEFAULT = CTR_XLATE | CTR_SYS | CTR_KBDINT  # what a PC BIOS leaves

# Commands written to port 0x64.
CMD_READ_RAM = 0x20  # 0x20-0x3F: read RAM byte N-0x20 (0x20: command byte)
CMD_WRITE_RAM = 0x60  # 0x60-0x7F: next data byte -> RAM byte N-0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9  # mouse interface test: 0x00 = no error
CMD_SELF_TEST = 0xAA  # controller self-test: 0x55 = passed
CMD_KBD_TEST = 0xAB  # keyboard interface test: 0x00 = no error
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1  # next data byte -> output port
CMD_WRITE_KBD_OUTBUF = 0xD2  # next data byte -> output buffer, as if from keyboard
CMD_WRITE_AUX = 0xD4  # next data byte -> mouse (dropped: none attached)
CMD_PULSE_OUTPUT = 0xF0  # 0xF0-0xFF: pulse output port bits whose mask bit is 0
CMD_RESET = 0xFE  # = pulse bit 0: the CPU reset line

SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00

# Output port.
OUTPUT_PORT_RESET = 0x01  # 0 = hold the CPU in reset
OUTPUT_PORT_A20 = 0x02  # A20 gate
OUTPUT_PORT_DEFAULT = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

RAM_SIZE = 32
OUTPUT_QUEUE_MAX = 16
_STATE_KEYS = ("ram", "output_port", "output_queue", "last_data", "last_write_was_command",
               "pending_command")


def _waits_for_data(cmd: int) -> bool:
    """The commands whose data byte comes next on port 0x60."""
    return (CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE
            or cmd in (CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX))


class I8042:
    """The 8042 controller; see the module docstring for how to register it."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset_line = reset
        self._lock = threading.Lock()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = CTR_DEFAULT
        self._output_port = OUTPUT_PORT_DEFAULT
        self._outbuf: deque[int] = deque(maxlen=OUTPUT_QUEUE_MAX)
        self._last_data = 0
        self._last_write_was_command = False
        self._pending: int | None = None  # command waiting for its data byte
        self.data_port = _PortView(self, DATA_OFFSET)
        self.command_port = _PortView(self, COMMAND_OFFSET)

    # ---- public interface ---------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Guest IN at 0x60 + offset (wide accesses split into bytes)."""
        with self._lock:
            return bytes(self._read_byte(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        """Guest OUT at 0x60 + offset.  ``reset`` runs after the lock is released."""
        with self._lock:
            pulse_reset = False
            for i, value in enumerate(data):
                pulse_reset |= self._write_byte(offset + i, value)
        if pulse_reset:
            self._pulse_reset()

    @property
    def command_byte(self) -> int:
        with self._lock:
            return self._ram[0]

    # ---- snapshot -------------------------------------------------------------

    def save_state(self) -> dict:
        """Controller RAM (byte 0 is the command byte), the output port, the bytes
        waiting for the CPU, and a command that waits for its data byte."""
        with self._lock:
            return {
                "ram": bytes(self._ram).hex(),
                "output_port": hex(self._output_port),
                "output_queue": bytes(self._outbuf).hex(),
                "last_data": hex(self._last_data),
                "last_write_was_command": self._last_write_was_command,
                "pending_command": None if self._pending is None else hex(self._pending),
            }

    def restore_state(self, state: dict, path: str = "i8042") -> None:
        """Load ``save_state``'s dict; everything is checked first (ValueError)."""
        expect_keys(state, _STATE_KEYS, path)
        ram = bytearray(blob(state["ram"], f"{path}.ram", RAM_SIZE))
        output_port = hex_int(state["output_port"], f"{path}.output_port", 1)
        queue = blob(state["output_queue"], f"{path}.output_queue", max_size=OUTPUT_QUEUE_MAX)
        last_data = hex_int(state["last_data"], f"{path}.last_data", 1)
        last_command = boolean(state["last_write_was_command"], f"{path}.last_write_was_command")
        pending = optional(lambda v, p: hex_int(v, p, 1), state["pending_command"],
                           f"{path}.pending_command")
        if pending is not None and not _waits_for_data(pending):
            raise ValueError(f"{path}.pending_command: command {pending:#04x} takes no data byte")
        with self._lock:
            self._ram = ram
            self._output_port = output_port
            self._outbuf = deque(queue, maxlen=OUTPUT_QUEUE_MAX)
            self._last_data = last_data
            self._last_write_was_command = last_command
            self._pending = pending

    # ---- ports ----------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if offset == DATA_OFFSET:
            if self._outbuf:
                self._last_data = self._outbuf.popleft()
            return self._last_data  # an empty buffer reads its last byte
        if offset == COMMAND_OFFSET:
            return self._status()
        log.debug("i8042: read of unknown offset %#x", offset)
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> bool:
        """Returns True when the write asks to pulse the CPU reset line."""
        if offset == DATA_OFFSET:
            self._last_write_was_command = False
            return self._write_data(value)
        if offset == COMMAND_OFFSET:
            self._last_write_was_command = True
            return self._command(value)
        log.debug("i8042: ignored write %#04x to offset %#x", value, offset)
        return False

    def _status(self) -> int:
        status = STATUS_INH
        if self._outbuf:
            status |= STATUS_OBF
        if self._ram[0] & CTR_SYS:
            status |= STATUS_SYS
        if self._last_write_was_command:
            status |= STATUS_CMD
        return status

    # ---- commands -------------------------------------------------------------

    def _command(self, cmd: int) -> bool:
        self._pending = None  # a new command cancels one waiting for data
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + RAM_SIZE:
            self._respond(self._ram[cmd - CMD_READ_RAM])
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE:
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._ram[0] |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self._ram[0] &= ~CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._respond(INTERFACE_TEST_PASSED)
        elif cmd == CMD_SELF_TEST:
            self._respond(SELF_TEST_PASSED)
        elif cmd == CMD_KBD_DISABLE:
            self._ram[0] |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self._ram[0] &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._respond(self._output_port)
        elif cmd in (CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX):
            self._pending = cmd
        elif cmd >= CMD_PULSE_OUTPUT:
            return not cmd & OUTPUT_PORT_RESET  # mask bit 0 clear: pulse reset
        else:
            log.debug("i8042: ignored command %#04x", cmd)
        return False

    def _write_data(self, value: int) -> bool:
        cmd, self._pending = self._pending, None
        if cmd is None:
            log.debug("i8042: byte %#04x for the keyboard dropped (none attached)", value)
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE:
            self._ram[cmd - CMD_WRITE_RAM] = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & OUTPUT_PORT_RESET  # bit 0 clear: CPU held in reset
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._respond(value)
        else:  # CMD_WRITE_AUX
            log.debug("i8042: byte %#04x for the mouse dropped (none attached)", value)
        return False

    def _respond(self, value: int) -> None:
        self._outbuf.append(value)

    def _pulse_reset(self) -> None:
        log.debug("i8042: CPU reset requested")
        try:
            self._reset_line()
        except Exception:
            log.warning("i8042: reset callback failed", exc_info=True)


class _PortView:
    """One of the controller's ports as a bus device of its own (length 1)."""

    def __init__(self, controller: I8042, base_offset: int) -> None:
        self._controller = controller
        self._base_offset = base_offset

    def read(self, offset: int, size: int) -> bytes:
        return self._controller.read(self._base_offset + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._controller.write(self._base_offset + offset, data)
