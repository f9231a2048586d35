"""16550A UART: the PC's COM1 serial port, the guest's console.

The real device is the National Semiconductor PC16550D ("UART with FIFOs"),
which every PC chipset still emulates at I/O port 0x3f8 (8 registers, IRQ 4).
This model follows the PC16550D datasheet, section 8 "Registers":
Table II (register summary and the DLAB-selected divisor latch), 8.1 LCR,
8.3 baud generator, 8.4 LSR, 8.5 FCR, 8.6 IIR with Table IV (interrupt
priorities and how each source is reset), 8.7 IER, 8.8 MCR (incl. loopback),
8.9 MSR, 8.10 SCR, and Table III for reset values.  kvmtool's
``hw/serial.c`` and Firecracker's ``vm-superio`` serial are the same idea.

What a VM needs, and how this model differs from the wire-level chip:

* Transmission is immediate: a THR write hands the byte to ``out`` at once,
  so THR and the transmitter are always empty (LSR.THRE and LSR.TEMT are 1).
* Reception has no line timing: host input given to :meth:`receive` waits in
  an unbounded *backlog* (the "wire") and enters the 16-byte RX FIFO (1 byte
  with FIFOs disabled) as the guest makes room.  So input is never overrun,
  lost or reordered.  In particular an RX FIFO reset does not throw host
  input away: it goes back to the head of the backlog (the guest cannot tell
  this from bytes arriving a moment later).  Looped-back bytes are discarded.
* Host input stays on the wire until the guest has first enabled the
  received-data interrupt (IER.ERBFI): before that no driver is listening,
  and Linux's 8250 start-up reads RBR to flush stale bytes, which would eat
  what a user (or a test) typed while the kernel was still booting.
* With data below the FIFO trigger level the character-timeout interrupt is
  reported at once (there is no "4 character times" to wait for).
* The interrupt output is not gated by MCR.OUT2 (a PC board detail), just as
  in QEMU, kvmtool and Firecracker.

``irq(level)`` is called only when the computed interrupt line level changes.
ISA IRQs are edge-triggered at the IOAPIC, so a new interrupt needs a new
rising edge: e.g. a THR write first acknowledges a pending THRE interrupt
(the line may drop) and then raises it again (THR is empty once more).

Thread safety: one lock guards all state; ``out`` and ``irq`` are called
with the lock held, so they see bytes and level changes in the order the
guest caused them.  They must not call back into this device.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, NamedTuple

from ..snapshot.fields import SaveRefused, blob, boolean, expect_keys, hex_bits, hex_int, items

log = logging.getLogger(__name__)

# Where the PC puts COM1 (registered with length 8).
COM1_PORT = 0x3F8
COM1_IRQ = 4

# Register offsets (Table II).  DLAB (LCR bit 7) switches offsets 0 and 1
# to the divisor latch.
RBR = 0  # receiver buffer (read, DLAB=0)
THR = 0  # transmitter holding register (write, DLAB=0)
DLL = 0  # divisor latch LSB (DLAB=1)
IER = 1  # interrupt enable (DLAB=0)
DLM = 1  # divisor latch MSB (DLAB=1)
IIR = 2  # interrupt identification (read)
FCR = 2  # FIFO control (write)
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch
REGISTER_COUNT = 8

# IER bits (8.7); bits 4-7 are always 0.
IER_ERBFI = 0x01  # enable received data available interrupt
IER_ETBEI = 0x02  # enable transmitter holding register empty interrupt
IER_ELSI = 0x04  # enable receiver line status interrupt
IER_EDSSI = 0x08  # enable modem status interrupt
IER_MASK = 0x0F

# IIR values (8.6, Table IV), highest priority first.  Bit 0 is 0 when an
# interrupt is pending; bits 6-7 are set when the FIFOs are enabled.
IIR_NONE = 0x01  # no interrupt pending
IIR_RLS = 0x06  # receiver line status: OE/PE/FE/BI; reset by reading LSR
IIR_RDA = 0x04  # received data available (>= trigger); reset by reading RBR
IIR_CTI = 0x0C  # character timeout (data below trigger); reset by reading RBR
IIR_THRE = 0x02  # THR empty; reset by reading IIR (if source) or writing THR
IIR_MS = 0x00  # modem status (CTS/DSR/RI/DCD change); reset by reading MSR
IIR_FIFOS_ENABLED = 0xC0

# FCR bits (8.5).
FCR_FIFO_ENABLE = 0x01
FCR_RCVR_FIFO_RESET = 0x02  # self-clearing
FCR_XMIT_FIFO_RESET = 0x04  # self-clearing
FCR_DMA_MODE = 0x08
FCR_RCVR_TRIGGER = 0xC0  # bits 7:6 select the RX trigger level
RCVR_TRIGGER_LEVELS = (1, 4, 8, 14)
FIFO_SIZE = 16

# LCR bits (8.1).
LCR_WLS = 0x03  # word length select
LCR_STB = 0x04  # number of stop bits
LCR_PEN = 0x08  # parity enable
LCR_EPS = 0x10  # even parity select
LCR_STICK_PARITY = 0x20
LCR_SET_BREAK = 0x40
LCR_DLAB = 0x80  # divisor latch access bit

# MCR bits (8.8); bits 5-7 are always 0.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits (8.4).
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_PE = 0x04  # parity error
LSR_FE = 0x08  # framing error
LSR_BI = 0x10  # break interrupt
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty
LSR_RCVR_FIFO_ERROR = 0x80  # PE/FE/BI on some character in the RX FIFO
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits (8.9): four delta bits, then the modem input lines.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge ring indicator
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

# Divisor at reset: the datasheet leaves it undefined; 12 is 9600 baud with
# the PC's 1.8432 MHz clock, what kvmtool uses.  Baud = 115200 / divisor.
DEFAULT_DIVISOR = 12
BAUD_BASE = 115200

# Saved state: host input still on the wire is kept up to this much (a snapshot
# with more is refused, on save and on restore).
BACKLOG_SAVE_MAX = 64 * 1024
_FCR_KEPT = FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_RCVR_TRIGGER   # the bits _write_fcr stores
_STATE_KEYS = ("dll", "dlm", "ier", "fcr", "lcr", "mcr", "scr", "rbr", "lsr_errors", "msr",
               "thre_pending", "receiver_ready", "rx", "backlog")
_RX_KEYS = ("value", "from_host", "brk")


def modem_inputs(mcr: int) -> int:
    """The MSR line bits for ``mcr``: MCR outputs in loopback (8.8), else a cable
    that asserts CTS, DSR and DCD (RI idle)."""
    if not mcr & MCR_LOOP:
        return MSR_CTS | MSR_DSR | MSR_DCD
    lines = 0
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


class _RxChar(NamedTuple):
    """One character in the RX FIFO, with where it came from."""

    value: int
    from_host: bool  # False: looped back from THR/LCR in loopback mode
    brk: bool = False  # a break condition was received with this character


class Serial16550A:
    """A 16550A UART register model (see the module docstring)."""

    def __init__(self, out: Callable[[bytes], None], irq: Callable[[bool], None]) -> None:
        self._out = out
        self._irq = irq
        self._lock = threading.Lock()
        self._backlog: deque[int] = deque()  # host input not yet in the FIFO
        self._rx: deque[_RxChar] = deque()  # the RX FIFO (or the RBR alone)
        self._irq_level = False
        self._callback_failed = False
        self._receiver_ready = False  # set once the guest enables IER.ERBFI
        self._quiesced = False  # snapshot: host input stays on the wire
        self._reset_registers()

    # ---- public interface ---------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Guest IN: an ISA bus splits wide accesses into byte accesses."""
        values = bytearray()
        with self._lock:
            for i in range(size):
                values.append(self._read_register(offset + i))
                self._update_irq()
        return bytes(values)

    def write(self, offset: int, data: bytes) -> None:
        """Guest OUT, byte by byte like ``read``."""
        with self._lock:
            for i, value in enumerate(data):
                self._write_register(offset + i, value)
                self._update_irq()

    def receive(self, data: bytes) -> None:
        """Queue host input (called by the input thread); never drops a byte."""
        with self._lock:
            self._backlog.extend(data)
            if not self._quiesced:
                self._refill_rx()
                self._update_irq()

    def reset(self) -> None:
        """Power-on/reset values (Table III).  Pending host input is kept."""
        with self._lock:
            self._reset_registers()
            self._update_irq()

    @property
    def irq_level(self) -> bool:
        """The interrupt line level last reported through ``irq``."""
        with self._lock:
            return self._irq_level

    @property
    def divisor(self) -> int:
        """The baud rate divisor (baud = 115200 / divisor); informational."""
        with self._lock:
            return self._dll | (self._dlm << 8)

    # ---- snapshot ---------------------------------------------------------------

    def quiesce(self) -> None:
        """Hold host input on the wire (``receive`` only queues it) so that neither
        the registers nor the interrupt line change under a snapshot.  The guest
        must not run until ``resume``."""
        with self._lock:
            self._quiesced = True

    def resume(self) -> None:
        """Let held host input into the FIFO (and raise the interrupt it asks for)."""
        with self._lock:
            self._quiesced = False
            self._refill_rx()
            self._update_irq()

    def save_state(self) -> dict:
        """Every register, the RX FIFO (each character with where it came from and
        its break flag) and the host input still on the wire.  The interrupt line
        level is not saved: it follows from the registers."""
        with self._lock:
            if len(self._backlog) > BACKLOG_SAVE_MAX:
                raise SaveRefused(f"serial: {len(self._backlog)} bytes of host input are waiting "
                                  f"for the guest; at most {BACKLOG_SAVE_MAX} can be saved")
            return {
                "dll": hex(self._dll), "dlm": hex(self._dlm), "ier": hex(self._ier),
                "fcr": hex(self._fcr), "lcr": hex(self._lcr), "mcr": hex(self._mcr),
                "scr": hex(self._scr), "rbr": hex(self._rbr),
                "lsr_errors": hex(self._lsr_errors), "msr": hex(self._msr),
                "thre_pending": self._thre_pending,
                "receiver_ready": self._receiver_ready,
                "rx": [{"value": hex(ch.value), "from_host": ch.from_host, "brk": ch.brk}
                       for ch in self._rx],
                "backlog": bytes(self._backlog).hex(),
            }

    def restore_state(self, state: dict, path: str = "serial") -> None:
        """Load ``save_state``'s dict (checked first: ValueError naming the field),
        then drive the interrupt line to the level the registers give."""
        expect_keys(state, _STATE_KEYS, path)
        regs = {name: hex_int(state[name], f"{path}.{name}", 1)
                for name in ("dll", "dlm", "lcr", "scr", "rbr", "msr")}
        regs["ier"] = hex_bits(state["ier"], f"{path}.ier", IER_MASK)
        regs["fcr"] = hex_bits(state["fcr"], f"{path}.fcr", _FCR_KEPT)
        regs["mcr"] = hex_bits(state["mcr"], f"{path}.mcr", MCR_MASK)
        regs["lsr_errors"] = hex_bits(state["lsr_errors"], f"{path}.lsr_errors", LSR_ERRORS)
        thre_pending = boolean(state["thre_pending"], f"{path}.thre_pending")
        receiver_ready = boolean(state["receiver_ready"], f"{path}.receiver_ready")
        rx = [self._rx_char_from(v, f"{path}.rx[{i}]")
              for i, v in enumerate(items(state["rx"], f"{path}.rx", FIFO_SIZE))]
        backlog = blob(state["backlog"], f"{path}.backlog", max_size=BACKLOG_SAVE_MAX)
        _check_consistent(regs, rx, receiver_ready, path)
        with self._lock:
            for name, value in regs.items():
                setattr(self, f"_{name}", value)
            self._thre_pending = thre_pending
            self._receiver_ready = receiver_ready
            self._rx = deque(rx)
            self._backlog = deque(backlog)
            self._irq_level = self._pending_interrupt() != IIR_NONE
            self._call(self._irq, self._irq_level)

    @staticmethod
    def _rx_char_from(value: object, path: str) -> _RxChar:
        expect_keys(value, _RX_KEYS, path)
        ch = _RxChar(hex_int(value["value"], f"{path}.value", 1),
                     boolean(value["from_host"], f"{path}.from_host"),
                     boolean(value["brk"], f"{path}.brk"))
        if ch.brk and ch.from_host:
            raise ValueError(f"{path}: a break from the host (only loopback makes breaks)")
        return ch

    # ---- register dispatch ----------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = bool(self._lcr & LCR_DLAB)
        if offset == RBR:
            return self._dll if dlab else self._read_rbr()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._read_msr()
        if offset == SCR:
            return self._scr
        log.debug("serial: read of unknown offset %#x", offset)
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = bool(self._lcr & LCR_DLAB)
        if offset == THR:
            if dlab:
                self._dll = value
            else:
                self._write_thr(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._write_lcr(value)
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        else:  # LSR and MSR are read-only (LSR writes are a factory test mode)
            log.debug("serial: ignored write %#04x to offset %#x", value, offset)

    # ---- reads ----------------------------------------------------------------

    def _read_rbr(self) -> int:
        """8.4/Table IV: reading RBR takes the top FIFO character."""
        if self._rx:
            self._rbr = self._rx.popleft().value
            self._refill_rx()
            self._reveal_top_errors()
        return self._rbr  # an empty RBR reads its last value

    def _read_iir(self) -> int:
        """8.6: reading IIR acknowledges a THRE interrupt if that is what it reports."""
        iid = self._pending_interrupt()
        if iid == IIR_THRE:
            self._thre_pending = False
        return iid | (IIR_FIFOS_ENABLED if self._fifo_enabled() else 0)

    def _read_lsr(self) -> int:
        """8.4: OE, PE, FE and BI are cleared by reading LSR."""
        value = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= LSR_DR
        if self._fifo_enabled() and any(ch.brk for ch in self._rx):
            value |= LSR_RCVR_FIFO_ERROR
        self._lsr_errors = 0
        return value

    def _read_msr(self) -> int:
        """8.9: the delta bits are cleared by reading MSR."""
        value = self._msr
        self._msr &= ~MSR_DELTAS
        return value

    # ---- writes ---------------------------------------------------------------

    def _write_thr(self, value: int) -> None:
        # Writing THR acknowledges THRE (the line may drop here) ...
        self._thre_pending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            self._loopback_receive(_RxChar(value, from_host=False))
        else:
            self._transmit(value)
        # ... and since transmission is immediate THR is empty again: a new edge.
        self._thre_pending = True

    def _write_ier(self, value: int) -> None:
        was_enabled = self._ier & IER_ETBEI
        self._ier = value & IER_MASK
        if self._ier & IER_ERBFI and not self._receiver_ready:
            self._receiver_ready = True
            self._refill_rx()
        if self._ier & IER_ETBEI and not was_enabled:
            # Enabling ETBEI while THR is empty (always, here) raises THRE at
            # once; Linux's 8250 driver tests for exactly this at startup.
            self._thre_pending = True

    def _write_fcr(self, value: int) -> None:
        """8.5: FCR0 must be 1 for the other bits to take; changing it clears the FIFOs."""
        enable_changed = (self._fcr ^ value) & FCR_FIFO_ENABLE
        if value & FCR_FIFO_ENABLE:
            self._fcr = value & (FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_RCVR_TRIGGER)
        else:
            self._fcr = 0
        if enable_changed or (value & FCR_FIFO_ENABLE and value & FCR_RCVR_FIFO_RESET):
            self._clear_rx_fifo()
        # XMIT FIFO reset: nothing to do, the transmitter is always empty.

    def _write_lcr(self, value: int) -> None:
        starts_break = value & LCR_SET_BREAK and not self._lcr & LCR_SET_BREAK
        self._lcr = value
        if starts_break and self._mcr & MCR_LOOP:
            # 8.8: in loopback the break reaches our own receiver: one NUL
            # character with BI, revealed when it reaches the top of the FIFO.
            self._loopback_receive(_RxChar(0, from_host=False, brk=True))

    def _write_mcr(self, value: int) -> None:
        leaving_loopback = self._mcr & MCR_LOOP and not value & MCR_LOOP
        self._mcr = value & MCR_MASK
        self._set_modem_inputs(self._modem_inputs())
        if leaving_loopback:
            self._refill_rx()  # the receiver sees the outside line again

    # ---- receive path ---------------------------------------------------------

    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_FIFO_ENABLE)

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled() else 1

    def _rx_trigger(self) -> int:
        if not self._fifo_enabled():
            return 1
        return RCVR_TRIGGER_LEVELS[(self._fcr & FCR_RCVR_TRIGGER) >> 6]

    def _push_rx(self, ch: _RxChar) -> None:
        was_empty = not self._rx
        self._rx.append(ch)
        if was_empty:
            self._reveal_top_errors()

    def _reveal_top_errors(self) -> None:
        """8.4: in FIFO mode a character's error shows in LSR when it reaches the top."""
        if self._rx and self._rx[0].brk:
            self._lsr_errors |= LSR_BI

    def _refill_rx(self) -> None:
        """Move host input from the backlog into the FIFO while there is room."""
        if self._mcr & MCR_LOOP:
            return  # 8.8: in loopback the receiver is disconnected from the line
        if not self._receiver_ready:
            return  # nobody listens yet: keep host input on the wire
        while self._backlog and len(self._rx) < self._rx_capacity():
            self._push_rx(_RxChar(self._backlog.popleft(), from_host=True))

    def _loopback_receive(self, ch: _RxChar) -> None:
        if len(self._rx) >= self._rx_capacity():
            self._lsr_errors |= LSR_OE  # 8.4: the new character is lost
        else:
            self._push_rx(ch)

    def _clear_rx_fifo(self) -> None:
        """RCVR FIFO reset.  Host input returns to the backlog (never lost);
        looped-back characters are discarded."""
        host = [ch.value for ch in self._rx if ch.from_host]
        self._rx.clear()
        self._backlog.extendleft(reversed(host))
        self._refill_rx()

    # ---- modem lines ------------------------------------------------------------

    def _modem_inputs(self) -> int:
        return modem_inputs(self._mcr)

    def _set_modem_inputs(self, lines: int) -> None:
        """8.9: set the delta bits for lines that changed since MSR was read."""
        old = self._msr
        changed = (old ^ lines) & ~MSR_DELTAS
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI  # only the trailing edge of RI counts
        self._msr = lines | (old & MSR_DELTAS) | deltas

    # ---- interrupts ---------------------------------------------------------------

    def _pending_interrupt(self) -> int:
        """Table IV: the highest-priority enabled source, as an IIR value."""
        if self._ier & IER_ELSI and self._lsr_errors:
            return IIR_RLS
        if self._ier & IER_ERBFI and self._rx:
            return IIR_RDA if len(self._rx) >= self._rx_trigger() else IIR_CTI
        if self._ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if self._ier & IER_EDSSI and self._msr & MSR_DELTAS:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending_interrupt() != IIR_NONE
        if level != self._irq_level:
            self._irq_level = level
            self._call(self._irq, level)

    # ---- helpers ------------------------------------------------------------------

    def _transmit(self, value: int) -> None:
        self._call(self._out, bytes([value]))

    def _call(self, callback: Callable, arg: object) -> None:
        """Run a VMM callback; its failure must not become the guest's fault."""
        try:
            callback(arg)
        except Exception:
            if not self._callback_failed:
                log.warning("serial: callback %r failed", callback, exc_info=True)
            self._callback_failed = True

    def _reset_registers(self) -> None:
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._rbr = 0
        self._lsr_errors = 0  # sticky OE/PE/FE/BI until LSR is read
        self._msr = self._modem_inputs()  # lines as they are, no deltas
        self._thre_pending = False
        self._clear_rx_fifo()


def _check_consistent(regs: dict[str, int], rx: list[_RxChar], receiver_ready: bool,
                      path: str) -> None:
    """What the register model never produces: a non-zero FCR without FIFO enable,
    more characters than the receiver holds, host input before the receiver was
    ready, MSR lines that do not follow MCR."""
    fifo = bool(regs["fcr"] & FCR_FIFO_ENABLE)
    if regs["fcr"] and not fifo:
        raise ValueError(f"{path}.fcr: {regs['fcr']:#x} without FIFO enable (bit 0)")
    capacity = FIFO_SIZE if fifo else 1
    if len(rx) > capacity:
        raise ValueError(f"{path}.rx: {len(rx)} characters, the receiver holds {capacity}")
    if not receiver_ready and any(ch.from_host for ch in rx):
        raise ValueError(f"{path}.rx: host input in the receiver before the guest enabled it")
    lines = modem_inputs(regs["mcr"])
    if regs["msr"] & ~MSR_DELTAS != lines:
        raise ValueError(f"{path}.msr: lines {regs['msr'] & ~MSR_DELTAS:#x} do not follow "
                         f"MCR {regs['mcr']:#x} (expected {lines:#x})")
