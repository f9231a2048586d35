"""Snapshot state of the legacy devices: 16550A serial, CMOS RTC, i8042, pvpanic.

Each: save -> JSON -> restore into a new instance -> save again is the same dict,
the restored device behaves as the saved one, and damaged dicts are refused
with ValueError (never another exception).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.i8042 import I8042, STATUS_CMD, STATUS_OBF
from pyvmm.devices.pvpanic import PVPANIC_PANICKED, PvPanic
from pyvmm.devices.rtc import (CMOS_RTC_HOURS, CMOS_RTC_MINUTES, CMOS_RTC_SECONDS, CMOS_RTC_YEAR,
                               CMOS_STATUS_B, CMOS_STATUS_C, REG_B_24H, REG_B_DM, REG_B_SET,
                               REG_B_UIE, REG_C_IRQF, REG_C_UF, CmosRtc)
from pyvmm.devices.serial import (BACKLOG_SAVE_MAX, FCR, IER, IER_ERBFI, IER_ETBEI, IIR, IIR_RDA,
                                  IIR_THRE, LCR, LCR_DLAB, LCR_SET_BREAK, LSR, LSR_BI, LSR_DR, MCR,
                                  MCR_LOOP, MCR_RTS, MSR, RBR, SCR, THR)
from pyvmm.snapshot.fields import SaveRefused
from state_fakes import mutated, through_json
from test_serial import Uart

T0 = datetime(2024, 2, 27, 15, 4, 5, tzinfo=timezone.utc).timestamp()


# --- serial ------------------------------------------------------------------------------
def busy_uart() -> Uart:
    """FIFOs on (trigger 4), a divisor, scratch, IER with RX and THRE, two host bytes
    in the FIFO and more on the wire, a pending THRE."""
    u = Uart()
    u.wr(LCR, LCR_DLAB)
    u.wr(0, 0x01)                      # DLL: 115200 baud
    u.wr(1, 0x00)
    u.wr(LCR, 0x03)                    # 8N1
    u.wr(FCR, 0x41)                    # FIFO on, trigger level 4
    u.wr(SCR, 0x5A)
    u.wr(IER, IER_ERBFI | IER_ETBEI)
    u.dev.receive(b"ab")
    u.dev.receive(bytes(range(100)))   # 16 in the FIFO at most, the rest on the wire
    return u


def registers(u: Uart) -> dict:
    """What the guest reads without side effects."""
    return {"lcr": u.rd(LCR), "mcr": u.rd(MCR), "scr": u.rd(SCR), "ier": u.rd(IER)}


def test_serial_round_trip_and_behaviour():
    a = busy_uart()
    state = a.dev.save_state()
    assert len(state["rx"]) == 16 and state["backlog"] == (bytes(b"ab" + bytes(range(100)))[16:]).hex()
    b = Uart()
    b.dev.restore_state(through_json(state))
    assert b.dev.save_state() == state
    assert b.irqs == [True]                      # the line driven to the restored level
    assert b.dev.irq_level and b.dev.divisor == 1
    assert registers(b) == registers(a)
    assert b.rd(IIR) & 0xCF == a.rd(IIR) & 0xCF  # RX data available, FIFOs on
    assert b.rd(LSR) & LSR_DR
    got = bytearray()
    while b.rd(LSR) & LSR_DR:
        got.append(b.rd(RBR))
    assert bytes(got) == b"ab" + bytes(range(100))   # FIFO first, then the wire, nothing lost


def test_serial_pending_rx_byte_and_thre_survive():
    a = Uart()
    a.wr(IER, IER_ERBFI | IER_ETBEI)
    a.dev.receive(b"Z")
    b = Uart()
    b.dev.restore_state(through_json(a.dev.save_state()))
    assert b.rd(IIR) & 0x0F == IIR_RDA           # no FIFO: one character is the trigger level
    assert b.rd(RBR) == ord("Z")
    assert b.rd(IIR) & 0x0F == IIR_THRE          # then the THRE that was pending
    b.wr(THR, ord("!"))
    assert b.out == [b"!"]


def test_serial_loopback_break_keeps_its_error_bit():
    a = Uart()
    a.wr(FCR, 0x01)
    a.wr(MCR, MCR_LOOP | MCR_RTS)
    a.wr(THR, 0x41)
    a.wr(LCR, LCR_SET_BREAK)                     # a NUL with BI behind the 'A'
    state = through_json(a.dev.save_state())
    assert [c["brk"] for c in state["rx"]] == [False, True]
    b = Uart()
    b.dev.restore_state(state)
    assert b.rd(MSR) & 0xF0 == a.rd(MSR) & 0xF0
    assert b.rd(RBR) == 0x41
    assert b.rd(LSR) & LSR_BI                    # revealed as the break reaches the top
    assert b.rd(RBR) == 0


def test_serial_quiesce_holds_host_input():
    u = Uart()
    u.wr(IER, IER_ERBFI)
    u.dev.quiesce()
    u.dev.receive(b"late")
    assert u.irqs == [] and not u.rd(LSR) & LSR_DR
    state = through_json(u.dev.save_state())
    assert state["rx"] == [] and state["backlog"] == b"late".hex()
    u.dev.resume()
    assert u.irqs == [True] and u.rd(RBR) == ord("l")


def test_serial_irq_driven_low_when_nothing_is_pending():
    b = Uart()
    b.dev.restore_state(through_json(Uart().dev.save_state()))
    assert b.irqs == [False] and not b.dev.irq_level


def test_serial_backlog_bound():
    a = Uart()
    a.dev.receive(bytes(BACKLOG_SAVE_MAX + 1))
    with pytest.raises(SaveRefused, match="at most 65536"):
        a.dev.save_state()
    state = through_json(Uart().dev.save_state())
    state["backlog"] = "00" * (BACKLOG_SAVE_MAX + 1)
    with pytest.raises(ValueError, match=r"serial\.backlog: 65537 bytes, at most 65536"):
        Uart().dev.restore_state(state)


@pytest.mark.parametrize("field, value, message", [
    ("ier", "0x10", r"serial\.ier: bits 0x10"),
    ("fcr", "0x40", r"serial\.fcr: 0x40 without FIFO enable"),
    ("lcr", "0x100", r"serial\.lcr: 0x100 does not fit"),
    ("msr", "0x00", r"serial\.msr: lines 0x0 do not follow MCR"),
    ("thre_pending", 1, r"serial\.thre_pending: expected true or false"),
    ("rx", [{"value": "0x41", "from_host": True, "brk": False}] * 2, r"serial\.rx: 2 characters, the receiver holds 1"),
    ("rx", [{"value": "0x41", "from_host": True, "brk": True}], r"serial\.rx\[0\]: a break from the host"),
    ("rx", [{"value": "0x41", "from_host": True}], r"serial\.rx\[0\]: missing brk"),
    ("backlog", "abc", r"serial\.backlog: expected a string of hex bytes"),
])
def test_serial_refuses(field, value, message):
    state = through_json(Uart().dev.save_state())
    state[field] = value
    u = Uart()
    with pytest.raises(ValueError, match=message):
        u.dev.restore_state(state)
    assert u.irqs == []                           # nothing was applied


def test_serial_host_input_before_the_receiver_was_ready_is_refused():
    state = through_json(Uart().dev.save_state())
    state["rx"] = [{"value": "0x41", "from_host": True, "brk": False}]
    with pytest.raises(ValueError, match="before the guest enabled it"):
        Uart().dev.restore_state(state)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_serial_damaged_state_only_value_errors(data):
    state = through_json(busy_uart().dev.save_state())
    try:
        Uart().dev.restore_state(mutated(data.draw, state))
    except ValueError:
        pass


# --- RTC -------------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rtc_read(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, bytes([index]))
    return rtc.read(1, 1)[0]


def rtc_write(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, bytes([index]))
    rtc.write(1, bytes([value]))


def test_rtc_round_trip_and_guest_time_follows_the_host_clock():
    clock = Clock(T0)
    a = CmosRtc(clock)
    a.set_memory_size(512 << 20, 0)
    rtc_write(a, CMOS_STATUS_B, REG_B_24H | REG_B_DM | REG_B_UIE)
    rtc_write(a, CMOS_RTC_YEAR, 99)                # the guest set its clock: 2099
    rtc_write(a, 0x40, 0x77)                       # plain CMOS RAM
    clock.t += 1.5
    rtc_read(a, CMOS_STATUS_C)                     # latch and clear register C
    a.write(0, bytes([0x80 | 0x40]))               # NMI disabled, index 0x40
    state = through_json(a.save_state())
    assert state["index"] == 0x40 and state["nmi_disabled"] is True
    later = Clock(T0 + 3600.25)                    # restored an hour later
    b = CmosRtc(later)
    b.restore_state(state)
    assert b.save_state() == state
    assert b.nmi_disabled and b.read(1, 1)[0] == 0x77
    assert rtc_read(b, CMOS_RTC_YEAR) == 99
    assert rtc_read(b, CMOS_RTC_HOURS) == 16       # 15:04 + 1 h: the offset is kept
    assert rtc_read(b, CMOS_RTC_MINUTES) == 4
    assert rtc_read(b, CMOS_STATUS_C) == 0         # no update cycle seen yet since restore
    later.t += 1
    assert rtc_read(b, CMOS_STATUS_C) & (REG_C_IRQF | REG_C_UF) == REG_C_IRQF | REG_C_UF


def test_rtc_offset_round_trip_is_exact_for_far_dates():
    clock = Clock(T0 + 0.123456789)
    a = CmosRtc(clock)
    rtc_write(a, CMOS_STATUS_B, REG_B_24H | REG_B_DM)
    rtc_write(a, 0x32, 99)                         # century 99: the year 9924
    state = through_json(a.save_state())
    b = CmosRtc(Clock(T0))
    b.restore_state(state)
    assert b.save_state() == state


def test_rtc_staged_time_while_set():
    clock = Clock(T0)
    a = CmosRtc(clock)
    rtc_write(a, CMOS_STATUS_B, REG_B_24H | REG_B_DM | REG_B_SET)
    rtc_write(a, CMOS_RTC_SECONDS, 30)
    state = through_json(a.save_state())
    assert state["staged"]["seconds"] == 30
    b = CmosRtc(Clock(T0 + 100))
    b.restore_state(state)
    assert rtc_read(b, CMOS_RTC_SECONDS) == 30     # still frozen at what the guest wrote
    rtc_write(b, CMOS_STATUS_B, REG_B_24H | REG_B_DM)
    assert rtc_read(b, CMOS_RTC_SECONDS) == 30     # SET cleared: runs from there


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("staged", None) or s.__setitem__("ram", _set_byte(s["ram"], CMOS_STATUS_B, REG_B_SET)),
     r"rtc\.staged: must be given exactly when Register B has SET"),
    (lambda s: s.__setitem__("ram", "00" * 127), r"rtc\.ram: expected 128 bytes, got 127"),
    (lambda s: s.__setitem__("ram", _set_byte(s["ram"], 0x0A, 0xA6)), r"rtc\.ram: Register A has UIP"),
    (lambda s: s.__setitem__("index", 128), r"rtc\.index: 128 is not in 0\.\.127"),
    (lambda s: s.__setitem__("offset_ns", 1e9), r"rtc\.offset_ns: expected an integer, got float"),
    (lambda s: s.__setitem__("offset_ns", 1 << 80), r"rtc\.offset_ns: .* is not in"),
    (lambda s: s.__setitem__("reg_c", "0x1"), r"rtc\.reg_c: bits 0x1"),
])
def test_rtc_refuses(edit, message):
    state = through_json(CmosRtc(Clock(T0)).save_state())
    edit(state)
    with pytest.raises(ValueError, match=message):
        CmosRtc(Clock(T0)).restore_state(state)


def _set_byte(hexdata: str, index: int, value: int) -> str:
    data = bytearray.fromhex(hexdata)
    data[index] = value
    return data.hex()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rtc_damaged_state_only_value_errors(data):
    clock = Clock(T0)
    a = CmosRtc(clock)
    rtc_write(a, CMOS_STATUS_B, REG_B_24H | REG_B_SET)
    state = through_json(a.save_state())
    b = CmosRtc(clock)
    try:
        b.restore_state(mutated(data.draw, state))
    except ValueError:
        return
    for index in range(0x40):                      # whatever was accepted reads fine
        rtc_read(b, index)
    rtc_write(b, CMOS_STATUS_B, REG_B_24H)


# --- i8042 --------------------------------------------------------------------------------------
def test_i8042_round_trip_and_behaviour():
    resets = []
    a = I8042(reset=lambda: resets.append(1))
    a.write(4, b"\xaa")                        # self-test: 0x55 waits for the CPU
    a.write(4, b"\x20")                        # read command byte: waits behind it
    a.write(4, b"\xd1")                        # write output port: waits for its data byte
    state = through_json(a.save_state())
    assert state["output_queue"] == "5545" and state["pending_command"] == "0xd1"
    b = I8042(reset=lambda: resets.append(2))
    b.restore_state(state)
    assert b.save_state() == state
    assert b.read(4, 1)[0] & (STATUS_OBF | STATUS_CMD) == STATUS_OBF | STATUS_CMD
    assert b.read(0, 1) == b"\x55" and b.read(0, 1) == b"\x45"
    b.write(0, b"\x02")                        # the data byte of 0xd1: reset line low
    assert resets == [2]


@pytest.mark.parametrize("field, value, message", [
    ("pending_command", "0xaa", r"i8042\.pending_command: command 0xaa takes no data byte"),
    ("output_queue", "00" * 17, r"i8042\.output_queue: 17 bytes, at most 16"),
    ("ram", "00", r"i8042\.ram: expected 32 bytes"),
    ("last_write_was_command", None, r"i8042\.last_write_was_command"),
])
def test_i8042_refuses(field, value, message):
    state = through_json(I8042(reset=lambda: None).save_state())
    state[field] = value
    with pytest.raises(ValueError, match=message):
        I8042(reset=lambda: None).restore_state(state)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_i8042_damaged_state_only_value_errors(data):
    a = I8042(reset=lambda: None)
    a.write(4, b"\x60")
    state = through_json(a.save_state())
    try:
        I8042(reset=lambda: None).restore_state(mutated(data.draw, state))
    except ValueError:
        pass


# --- pvpanic ------------------------------------------------------------------------------------
def test_pvpanic_round_trip():
    a = PvPanic(lambda event: None)
    a.config_write(4, b"\x06\x00")                       # memory decode + bus master
    a.bar_write(0, 0, bytes([PVPANIC_PANICKED]))
    state = through_json(a.save_state())
    b = PvPanic(lambda event: None)
    b.restore_state(state, "pvpanic")
    assert b.events == PVPANIC_PANICKED and b.config.data == a.config.data
    assert b.save_state() == state
    state["events"] = "0x4"
    with pytest.raises(ValueError, match=r"pvpanic\.events: bits 0x4"):
        PvPanic(lambda event: None).restore_state(state, "pvpanic")
