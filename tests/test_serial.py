"""Register-level tests of the 16550A model (no KVM needed)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.serial import (
    DLL, DLM, FCR, IER, IER_EDSSI, IER_ELSI, IER_ERBFI, IER_ETBEI, IIR,
    IIR_CTI, IIR_MS, IIR_NONE, IIR_RDA, IIR_RLS, IIR_THRE, LCR, LCR_DLAB,
    LCR_SET_BREAK, LSR, LSR_BI, LSR_DR, LSR_OE, LSR_RCVR_FIFO_ERROR, LSR_TEMT,
    LSR_THRE, MCR, MCR_DTR, MCR_LOOP, MCR_OUT1, MCR_OUT2, MCR_RTS, MSR,
    MSR_CTS, MSR_DCD, MSR_DCTS, MSR_DDCD, MSR_DDSR, MSR_DSR, MSR_RI, MSR_TERI,
    RBR, SCR, THR, Serial16550A,
)


class Uart:
    """A Serial16550A with recorded output and irq calls, and byte helpers."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.irqs: list[bool] = []
        self.dev = Serial16550A(self.out.append, self.irqs.append)

    def rd(self, offset: int) -> int:
        return self.dev.read(offset, 1)[0]

    def wr(self, offset: int, value: int) -> None:
        self.dev.write(offset, bytes([value]))

    def iid(self) -> int:
        return self.rd(IIR) & 0x0F

    def drain(self) -> bytes:
        data = bytearray()
        while self.rd(LSR) & LSR_DR:
            data.append(self.rd(RBR))
        return bytes(data)


@pytest.fixture
def u() -> Uart:
    """A UART whose guest driver has started (enabled, then masked, ERBFI)."""
    uart = Uart()
    uart.wr(IER, IER_ERBFI)
    uart.wr(IER, 0)
    uart.irqs.clear()
    return uart


def test_input_waits_until_the_driver_enables_receive_interrupts() -> None:
    """Bytes typed while the kernel boots survive the 8250 driver's start-up flush."""
    uart = Uart()
    uart.dev.receive(b"echo hi\n")
    assert uart.rd(LSR) & LSR_DR == 0
    uart.rd(RBR)                        # the driver's flush reads find nothing
    uart.wr(FCR, 0x07)
    uart.wr(IER, IER_ERBFI)             # now the driver listens
    assert uart.drain() == b"echo hi\n"


# ---- plain registers --------------------------------------------------------

def test_reset_values(u: Uart) -> None:
    assert u.rd(IER) == 0
    assert u.rd(IIR) == IIR_NONE
    assert u.rd(LCR) == 0
    assert u.rd(MCR) == 0
    assert u.rd(LSR) == LSR_THRE | LSR_TEMT
    assert u.rd(MSR) == MSR_CTS | MSR_DSR | MSR_DCD  # cable asserts them, no deltas
    assert u.irqs == []


def test_dlab_selects_divisor_latch(u: Uart) -> None:
    u.wr(LCR, LCR_DLAB | 0x03)
    u.wr(DLL, 0x01)
    u.wr(DLM, 0x00)
    assert u.rd(DLL) == 0x01 and u.rd(DLM) == 0x00
    assert u.dev.divisor == 1
    u.wr(LCR, 0x03)
    assert u.rd(IER) == 0  # DLM did not leak into IER
    u.wr(IER, 0x0F)
    u.wr(LCR, LCR_DLAB)
    assert u.rd(DLM) == 0x00 and u.rd(IER) == 0x00  # offset 1 is DLM again
    u.wr(THR, 0x0C)  # with DLAB, offset 0 writes DLL: nothing is sent
    assert u.out == [] and u.dev.divisor == 12


def test_lcr_mcr_scr_readback(u: Uart) -> None:
    u.wr(LCR, 0x1B)
    u.wr(MCR, 0xFF)
    u.wr(SCR, 0xA5)
    u.wr(IER, 0xFF)
    assert u.rd(LCR) == 0x1B
    assert u.rd(MCR) == 0x1F  # bits 5-7 read as 0
    assert u.rd(SCR) == 0xA5
    assert u.rd(IER) == 0x0F  # bits 4-7 read as 0


def test_fifo_enable_sets_iir_bits(u: Uart) -> None:
    u.wr(FCR, 0x01)
    assert u.rd(IIR) == 0xC0 | IIR_NONE
    u.wr(FCR, 0x00)
    assert u.rd(IIR) == IIR_NONE


def test_wide_access_is_split_into_bytes(u: Uart) -> None:
    u.dev.write(LCR, bytes([0x03, 0x0B]))  # LCR then MCR
    assert u.rd(LCR) == 0x03 and u.rd(MCR) == 0x0B
    assert u.dev.read(LCR, 2) == bytes([0x03, 0x0B])
    assert len(u.dev.read(4, 4)) == 4


def test_transmit_is_immediate(u: Uart) -> None:
    for b in b"hi\n":
        u.wr(THR, b)
        assert u.rd(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert b"".join(u.out) == b"hi\n"


def test_writes_to_lsr_and_msr_are_ignored(u: Uart) -> None:
    u.wr(LSR, 0xFF)
    u.wr(MSR, 0xFF)
    assert u.rd(LSR) == LSR_THRE | LSR_TEMT
    assert u.rd(MSR) == MSR_CTS | MSR_DSR | MSR_DCD


# ---- THRE interrupt and the irq line ----------------------------------------

def test_thre_interrupt_when_etbei_is_enabled(u: Uart) -> None:
    u.wr(IER, IER_ETBEI)
    assert u.irqs == [True]
    assert u.rd(IIR) == IIR_THRE  # reading IIR reports and clears it
    assert u.irqs == [True, False]
    assert u.rd(IIR) == IIR_NONE


def test_thre_rearms_only_on_etbei_rising_edge(u: Uart) -> None:
    u.wr(IER, IER_ETBEI)
    u.rd(IIR)
    u.wr(IER, IER_ETBEI)  # still set: no new interrupt
    assert u.iid() == IIR_NONE
    u.wr(IER, 0)
    u.wr(IER, IER_ETBEI)  # the Linux 8250 startup test does exactly this
    assert u.iid() == IIR_THRE


def test_irq_sequence_for_interrupt_driven_transmit(u: Uart) -> None:
    u.wr(IER, IER_ETBEI)  # rise
    assert u.rd(IIR) == IIR_THRE  # fall: acknowledged
    u.wr(THR, ord("a"))  # THR empty again: rise
    u.wr(THR, ord("b"))  # acknowledged by the write (fall), empty again (rise)
    assert u.rd(IIR) == IIR_THRE  # fall
    assert u.irqs == [True, False, True, False, True, False]
    assert u.out == [b"a", b"b"]


def test_thr_write_gives_new_edge_with_irq_already_high(u: Uart) -> None:
    u.wr(IER, IER_ETBEI)
    u.irqs.clear()
    u.wr(THR, 0x41)
    assert u.irqs == [False, True]


def test_thr_write_does_not_drop_line_held_by_rx(u: Uart) -> None:
    u.wr(IER, IER_ETBEI | IER_ERBFI)
    u.dev.receive(b"x")
    u.irqs.clear()
    u.wr(THR, 0x41)
    assert u.irqs == []  # RX data keeps the line high throughout


def test_disabling_ier_drops_the_line(u: Uart) -> None:
    u.wr(IER, IER_ETBEI)
    u.wr(IER, 0)
    assert u.irqs == [True, False]


# ---- priorities --------------------------------------------------------------

def test_iir_priority_order(u: Uart) -> None:
    u.wr(IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI)
    u.wr(MCR, MCR_LOOP)  # entering loopback drops CTS/DSR/DCD: modem deltas
    u.wr(THR, 1)  # looped back: RX data (FIFO off: 1-byte holding register)
    u.wr(THR, 2)  # no room: overrun -> line status
    assert u.iid() == IIR_RLS
    assert u.rd(LSR) & LSR_OE  # reading LSR clears the line status source
    assert u.iid() == IIR_RDA
    assert u.rd(RBR) == 1
    assert u.iid() == IIR_THRE
    assert u.iid() == IIR_MS  # THRE was acknowledged by the previous IIR read
    msr = u.rd(MSR)
    assert msr & (MSR_DCTS | MSR_DDSR | MSR_DDCD) == MSR_DCTS | MSR_DDSR | MSR_DDCD
    assert u.iid() == IIR_NONE
    assert u.irqs[-1] is False


def test_rx_interrupt_follows_data(u: Uart) -> None:
    u.wr(IER, IER_ERBFI)
    u.dev.receive(b"ab")
    assert u.irqs == [True]
    assert u.iid() == IIR_RDA  # FIFOs disabled: trigger level is 1
    assert u.rd(RBR) == ord("a")
    assert u.irqs == [True]  # "b" moved into the holding register
    assert u.rd(RBR) == ord("b")
    assert u.irqs == [True, False]


def test_trigger_level_and_character_timeout(u: Uart) -> None:
    u.wr(FCR, 0x81)  # FIFO on, trigger 8
    u.wr(IER, IER_ERBFI)
    u.dev.receive(b"1234")
    assert u.rd(IIR) == 0xC0 | IIR_CTI  # below trigger: timeout
    u.dev.receive(b"5678")
    assert u.rd(IIR) == 0xC0 | IIR_RDA
    assert u.drain() == b"12345678"
    assert u.rd(IIR) == 0xC0 | IIR_NONE


# ---- receive FIFO and backlog ------------------------------------------------

def test_fifo_holds_16_and_backlog_the_rest(u: Uart) -> None:
    u.wr(FCR, 0x07)
    u.dev.receive(bytes(range(40)))
    assert u.rd(LSR) & (LSR_DR | LSR_OE) == LSR_DR  # no overrun, ever
    assert u.drain() == bytes(range(40))


def test_no_loss_or_reorder_across_1000_bytes_in_chunks(u: Uart) -> None:
    u.wr(FCR, 0xC7)
    data = bytes((i * 7 + 3) & 0xFF for i in range(1000))
    got = bytearray()
    pos = 0
    step = 0
    while pos < len(data):
        n = 1 + (step * 13) % 37
        u.dev.receive(data[pos:pos + n])
        pos += n
        for _ in range(step % 5):  # read a few, sometimes none
            if u.rd(LSR) & LSR_DR:
                got.append(u.rd(RBR))
        step += 1
    got += u.drain()
    assert bytes(got) == data


def test_rx_fifo_reset_keeps_host_input(u: Uart) -> None:
    u.wr(FCR, 0x01)
    u.dev.receive(b"keep me")
    u.wr(FCR, 0x03)  # RCVR FIFO reset
    u.wr(FCR, 0x00)  # disabling the FIFOs clears them too
    assert u.drain() == b"keep me"


def test_concurrent_receive_and_read_lose_nothing(u: Uart) -> None:
    u.wr(FCR, 0x01)
    data = bytes(i & 0xFF for i in range(3000))

    def feed() -> None:
        for i in range(0, len(data), 50):
            u.dev.receive(data[i:i + 50])

    t = threading.Thread(target=feed)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if u.rd(LSR) & LSR_DR:
            got.append(u.rd(RBR))
    t.join()
    assert bytes(got) == data


# ---- loopback -----------------------------------------------------------------

def test_loopback_sends_tx_to_rx_and_not_out(u: Uart) -> None:
    u.wr(FCR, 0x01)
    u.wr(MCR, MCR_LOOP)
    for b in b"loop":
        u.wr(THR, b)
    assert u.out == []
    assert u.drain() == b"loop"


def test_loopback_msr_follows_mcr(u: Uart) -> None:
    # Linux's 8250 probe: MCR = LOOP|OUT2|RTS must read back as DCD|CTS.
    u.wr(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert u.rd(MSR) & 0xF0 == MSR_DCD | MSR_CTS
    u.wr(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    msr = u.rd(MSR)
    assert msr & 0xF0 == MSR_DSR | MSR_RI
    assert msr & 0x0F == MSR_DCTS | MSR_DDSR | MSR_DDCD  # RI rose: no TERI
    u.wr(MCR, MCR_LOOP)
    assert u.rd(MSR) == MSR_DDSR | MSR_TERI  # RI fell: trailing edge
    assert u.rd(MSR) == 0  # deltas cleared by the read
    u.wr(MCR, 0)
    assert u.rd(MSR) == MSR_CTS | MSR_DSR | MSR_DCD | MSR_DCTS | MSR_DDSR | MSR_DDCD


def test_loopback_holds_host_input_until_it_ends(u: Uart) -> None:
    u.wr(FCR, 0x01)
    u.wr(MCR, MCR_LOOP)
    u.dev.receive(b"host")
    assert not u.rd(LSR) & LSR_DR  # the receiver is disconnected from the line
    u.wr(THR, ord("L"))
    assert u.drain() == b"L"
    u.wr(MCR, 0)
    assert u.drain() == b"host"


def test_loopback_break_sets_bi(u: Uart) -> None:
    u.wr(FCR, 0x01)
    u.wr(MCR, MCR_LOOP)
    u.wr(THR, ord("a"))
    u.wr(LCR, LCR_SET_BREAK)
    lsr = u.rd(LSR)
    assert lsr & LSR_DR and not lsr & LSR_BI  # break is behind "a"
    assert lsr & LSR_RCVR_FIFO_ERROR
    assert u.rd(RBR) == ord("a")
    assert u.rd(LSR) & LSR_BI  # now the break character is on top
    assert not u.rd(LSR) & LSR_BI  # cleared by reading LSR
    assert u.rd(RBR) == 0


def test_reset_restores_registers_and_keeps_input(u: Uart) -> None:
    u.wr(IER, IER_ETBEI)
    u.wr(LCR, 0x83)
    u.dev.receive(b"xy")
    u.dev.reset()
    assert u.irqs == [True, False]
    assert u.rd(LCR) == 0 and u.rd(IER) == 0
    assert u.drain() == b"xy"


def test_callback_failure_does_not_reach_the_guest() -> None:
    def broken(_: object) -> None:
        raise OSError("stdout closed")

    dev = Serial16550A(broken, broken)
    dev.write(IER, b"\x02")
    dev.write(THR, b"x")
    assert dev.read(LSR, 1)[0] & LSR_THRE


# ---- property tests ---------------------------------------------------------

access = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 7), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, 7), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("receive"), st.just(0), st.binary(max_size=40)),
    st.tuples(st.just("reset"), st.just(0), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(access, max_size=80))
def test_random_accesses_never_raise_and_irq_reports_only_changes(ops) -> None:
    irqs: list[bool] = []
    dev = Serial16550A(lambda b: None, irqs.append)
    for kind, offset, arg in ops:
        if kind == "read":
            assert len(dev.read(offset, arg)) == arg
        elif kind == "write":
            dev.write(offset, arg)
        elif kind == "receive":
            dev.receive(arg)
        else:
            dev.reset()
    dev.read(8, 1)  # even outside its 8 registers it answers
    dev.write(9, b"\x00")
    for i, level in enumerate(irqs):  # alternating, starting with a rise
        assert level == (i % 2 == 0)
    assert dev.irq_level == (bool(irqs) and irqs[-1])


receive_side = st.one_of(
    st.tuples(st.just("receive"), st.binary(max_size=30)),
    st.tuples(st.just("fcr"), st.integers(0, 255)),
    st.tuples(st.just("mcr"), st.integers(0, 255)),
    st.tuples(st.just("ier"), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 20)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(receive_side, max_size=60))
def test_host_input_is_never_lost_or_reordered(ops) -> None:
    u = Uart()
    sent = bytearray()
    got = bytearray()
    for kind, arg in ops:
        if kind == "receive":
            u.dev.receive(arg)
            sent += arg
        elif kind == "fcr":
            u.wr(FCR, arg)
        elif kind == "mcr":
            u.wr(MCR, arg)  # may enter or leave loopback (nothing is sent)
        elif kind == "ier":
            u.wr(IER, arg)
        else:
            for _ in range(arg):
                if u.rd(LSR) & LSR_DR:
                    got.append(u.rd(RBR))
    u.wr(MCR, 0)
    u.wr(IER, IER_ERBFI)  # a driver that never listened has received nothing yet
    got += u.drain()
    assert bytes(got) == bytes(sent)
