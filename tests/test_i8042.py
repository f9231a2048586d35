"""Tests of the i8042 controller model: reset line, self-test, command byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.bus import Bus
from pyvmm.devices.i8042 import (
    CTR_AUXDIS, CTR_KBDDIS, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT,
    STATUS_CMD, STATUS_IBF, STATUS_OBF,
)


class Machine:
    """An I8042 on a port bus, registered the way the VMM does it."""

    def __init__(self) -> None:
        self.resets = 0
        self.kbd = I8042(reset=self.reset)
        self.bus = Bus("pio")
        self.bus.register(I8042_DATA_PORT, 1, self.kbd.data_port)
        self.bus.register(I8042_COMMAND_PORT, 1, self.kbd.command_port)

    def reset(self) -> None:
        self.resets += 1

    def command(self, cmd: int) -> None:
        self.bus.write(I8042_COMMAND_PORT, bytes([cmd]))

    def data(self, value: int) -> None:
        self.bus.write(I8042_DATA_PORT, bytes([value]))

    def status(self) -> int:
        return self.bus.read(I8042_COMMAND_PORT, 1)[0]

    def response(self) -> int:
        assert self.status() & STATUS_OBF
        return self.bus.read(I8042_DATA_PORT, 1)[0]


@pytest.fixture
def m() -> Machine:
    return Machine()


def test_0xfe_pulses_reset(m: Machine) -> None:
    assert m.status() & STATUS_IBF == 0  # what Linux's kb_wait() polls
    m.command(0xFE)
    assert m.resets == 1


def test_other_pulse_commands(m: Machine) -> None:
    m.command(0xFF)  # pulses nothing
    m.command(0xFD)  # bit 0 masked: no reset
    assert m.resets == 0
    m.command(0xF0)  # pulses all four lines, reset among them
    assert m.resets == 1


def test_write_output_port_reset_bit(m: Machine) -> None:
    m.command(0xD1)
    m.data(0x03)  # reset line high: nothing happens
    assert m.resets == 0
    m.command(0xD0)
    assert m.response() == 0x03
    m.command(0xD1)
    m.data(0x02)  # bit 0 clear: reset
    assert m.resets == 1


def test_self_test_and_interface_tests(m: Machine) -> None:
    m.command(0xAA)
    assert m.response() == 0x55
    m.command(0xAB)
    assert m.response() == 0x00
    assert not m.status() & STATUS_OBF


def test_command_byte_read_write(m: Machine) -> None:
    m.command(0x60)
    m.data(0x45)
    m.command(0x20)
    assert m.response() == 0x45
    m.command(0xAD)
    m.command(0xA7)
    m.command(0x20)
    assert m.response() == 0x45 | CTR_KBDDIS | CTR_AUXDIS
    m.command(0xAE)
    m.command(0xA8)
    assert m.kbd.command_byte == 0x45


def test_status_tracks_last_port_written(m: Machine) -> None:
    m.command(0x20)
    assert m.status() & STATUS_CMD
    m.response()
    m.data(0xF4)  # a keyboard command: dropped, nothing attached
    assert m.status() & (STATUS_CMD | STATUS_OBF) == 0


def test_empty_output_buffer_repeats_last_byte(m: Machine) -> None:
    m.command(0xAA)
    assert m.response() == 0x55
    assert m.bus.read(I8042_DATA_PORT, 1) == b"\x55"


def test_reset_callback_failure_is_contained() -> None:
    def broken() -> None:
        raise RuntimeError("vm gone")

    kbd = I8042(reset=broken)
    kbd.command_port.write(0, b"\xfe")


def test_direct_offsets(m: Machine) -> None:
    m.kbd.write(4, b"\xaa")
    assert m.kbd.read(4, 1)[0] & STATUS_OBF
    assert m.kbd.read(0, 1) == b"\x55"
    assert m.kbd.read(1, 1) == b"\xff"  # 0x61 is not ours


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.binary(min_size=1, max_size=4)), max_size=60))
def test_random_accesses_never_raise(ops) -> None:
    kbd = I8042(reset=lambda: None)
    for is_write, offset, data in ops:
        if is_write:
            kbd.write(offset, data)
        else:
            assert len(kbd.read(offset, len(data))) == len(data)
