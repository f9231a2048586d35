"""Tests of the MC146818 CMOS RTC model with an injected clock."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.rtc import (
    CMOS_CENTURY, CMOS_RTC_DAY_MONTH, CMOS_RTC_DAY_WEEK, CMOS_RTC_HOURS,
    CMOS_RTC_HOURS_ALARM, CMOS_RTC_MINUTES, CMOS_RTC_MINUTES_ALARM,
    CMOS_RTC_MONTH, CMOS_RTC_SECONDS, CMOS_RTC_SECONDS_ALARM, CMOS_RTC_YEAR,
    CMOS_STATUS_A, CMOS_STATUS_B, CMOS_STATUS_C, CMOS_STATUS_D, REG_A_UIP,
    REG_B_24H, REG_B_DM, REG_B_SET, REG_B_UIE, REG_B_AIE, REG_C_AF, REG_C_IRQF,
    REG_C_PF, REG_C_UF, REG_D_VRT, CmosRtc, civil_from_days, days_from_civil, days_in_month,
)

# Tuesday 2024-02-27 15:04:05 UTC
T0 = datetime(2024, 2, 27, 15, 4, 5, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def rtc(clock: Clock) -> CmosRtc:
    return CmosRtc(clock)


def cmos_read(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, bytes([index]))
    return rtc.read(1, 1)[0]


def cmos_write(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, bytes([index]))
    rtc.write(1, bytes([value]))


def test_defaults(rtc: CmosRtc) -> None:
    assert cmos_read(rtc, CMOS_STATUS_A) & REG_A_UIP == 0
    assert cmos_read(rtc, CMOS_STATUS_B) == 0x02  # 24-hour, BCD
    assert cmos_read(rtc, CMOS_STATUS_D) == REG_D_VRT


def test_bcd_24_hour(rtc: CmosRtc) -> None:
    assert cmos_read(rtc, CMOS_RTC_SECONDS) == 0x05
    assert cmos_read(rtc, CMOS_RTC_MINUTES) == 0x04
    assert cmos_read(rtc, CMOS_RTC_HOURS) == 0x15
    assert cmos_read(rtc, CMOS_RTC_DAY_WEEK) == 3  # Sunday = 1
    assert cmos_read(rtc, CMOS_RTC_DAY_MONTH) == 0x27
    assert cmos_read(rtc, CMOS_RTC_MONTH) == 0x02
    assert cmos_read(rtc, CMOS_RTC_YEAR) == 0x24
    assert cmos_read(rtc, CMOS_CENTURY) == 0x20


def test_binary_mode(rtc: CmosRtc) -> None:
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H | REG_B_DM)
    assert cmos_read(rtc, CMOS_RTC_HOURS) == 15
    assert cmos_read(rtc, CMOS_RTC_DAY_MONTH) == 27
    assert cmos_read(rtc, CMOS_RTC_YEAR) == 24
    assert cmos_read(rtc, CMOS_CENTURY) == 20


@pytest.mark.parametrize(
    "hour, bcd, binary",
    [(0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11),
     (12, 0x92, 0x80 | 12), (15, 0x83, 0x83), (23, 0x91, 0x80 | 11)],
)
def test_12_hour_mode(clock: Clock, hour: int, bcd: int, binary: int) -> None:
    clock.t = datetime(2024, 1, 1, hour, 0, 0, tzinfo=timezone.utc).timestamp()
    rtc = CmosRtc(clock)
    cmos_write(rtc, CMOS_STATUS_B, 0)  # 12-hour, BCD
    assert cmos_read(rtc, CMOS_RTC_HOURS) == bcd
    cmos_write(rtc, CMOS_STATUS_B, REG_B_DM)  # 12-hour, binary
    assert cmos_read(rtc, CMOS_RTC_HOURS) == binary


def test_time_follows_the_clock(rtc: CmosRtc, clock: Clock) -> None:
    clock.t += 60
    assert cmos_read(rtc, CMOS_RTC_MINUTES) == 0x05
    clock.t = datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
    assert cmos_read(rtc, CMOS_RTC_YEAR) == 0x99
    assert cmos_read(rtc, CMOS_CENTURY) == 0x19


def test_index_nmi_bit_is_masked(rtc: CmosRtc) -> None:
    rtc.write(0, bytes([0x80 | CMOS_RTC_HOURS]))
    assert rtc.read(1, 1)[0] == 0x15
    assert rtc.nmi_disabled
    rtc.write(0, bytes([0x80 | 0x40]))
    rtc.write(1, b"\x5a")
    assert cmos_read(rtc, 0x40) == 0x5A
    assert not rtc.nmi_disabled


def test_index_port_reads_ff(rtc: CmosRtc) -> None:
    assert rtc.read(0, 1) == b"\xff"


def test_cmos_ram_and_alarm_bytes_are_stored(rtc: CmosRtc) -> None:
    for index in (CMOS_RTC_SECONDS_ALARM, CMOS_RTC_MINUTES_ALARM, CMOS_RTC_HOURS_ALARM, 0x0E, 0x7F):
        cmos_write(rtc, index, index ^ 0x55)
        assert cmos_read(rtc, index) == index ^ 0x55


def test_register_c_clears_on_read(rtc: CmosRtc, clock: Clock) -> None:
    cmos_write(rtc, CMOS_STATUS_A, 0x20)  # no periodic rate: only UF matters
    assert cmos_read(rtc, CMOS_STATUS_C) == 0
    clock.t += 1
    assert cmos_read(rtc, CMOS_STATUS_C) == REG_C_UF
    assert cmos_read(rtc, CMOS_STATUS_C) == 0


def test_register_c_irqf_and_periodic_flag(rtc: CmosRtc, clock: Clock) -> None:
    cmos_read(rtc, CMOS_STATUS_C)
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H | REG_B_UIE)
    clock.t += 0.01  # 1024 Hz default rate: several periods, same second
    assert cmos_read(rtc, CMOS_STATUS_C) == REG_C_PF
    clock.t += 1
    assert cmos_read(rtc, CMOS_STATUS_C) == REG_C_IRQF | REG_C_UF | REG_C_PF


def test_alarm_flag(rtc: CmosRtc, clock: Clock) -> None:
    cmos_write(rtc, CMOS_STATUS_A, 0x20)
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H | REG_B_AIE)
    cmos_write(rtc, CMOS_RTC_SECONDS_ALARM, 0x07)
    cmos_write(rtc, CMOS_RTC_MINUTES_ALARM, 0xC0)  # don't care
    cmos_write(rtc, CMOS_RTC_HOURS_ALARM, 0xFF)  # don't care
    clock.t += 1  # :06
    assert cmos_read(rtc, CMOS_STATUS_C) == REG_C_UF
    clock.t += 1  # :07
    assert cmos_read(rtc, CMOS_STATUS_C) == REG_C_IRQF | REG_C_AF | REG_C_UF


def test_guest_sets_the_clock_with_set(rtc: CmosRtc, clock: Clock) -> None:
    cmos_write(rtc, CMOS_STATUS_B, REG_B_SET | REG_B_24H)
    cmos_write(rtc, CMOS_RTC_YEAR, 0x30)
    cmos_write(rtc, CMOS_RTC_MONTH, 0x06)
    cmos_write(rtc, CMOS_RTC_DAY_MONTH, 0x15)
    cmos_write(rtc, CMOS_RTC_HOURS, 0x08)
    cmos_write(rtc, CMOS_RTC_MINUTES, 0x30)
    cmos_write(rtc, CMOS_RTC_SECONDS, 0x00)
    clock.t += 10  # frozen while SET
    assert cmos_read(rtc, CMOS_RTC_SECONDS) == 0x00
    assert cmos_read(rtc, CMOS_RTC_YEAR) == 0x30
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H)
    clock.t += 3
    assert cmos_read(rtc, CMOS_RTC_SECONDS) == 0x03
    assert cmos_read(rtc, CMOS_RTC_HOURS) == 0x08
    assert cmos_read(rtc, CMOS_RTC_DAY_MONTH) == 0x15
    assert cmos_read(rtc, CMOS_RTC_DAY_WEEK) == 7  # 2030-06-15 is a Saturday


def test_set_clears_uie(rtc: CmosRtc) -> None:
    cmos_write(rtc, CMOS_STATUS_B, REG_B_SET | REG_B_UIE | REG_B_24H)
    assert cmos_read(rtc, CMOS_STATUS_B) == REG_B_SET | REG_B_24H


def test_12_hour_write_is_decoded(rtc: CmosRtc) -> None:
    cmos_write(rtc, CMOS_STATUS_B, REG_B_SET)  # 12-hour BCD
    cmos_write(rtc, CMOS_RTC_HOURS, 0x80 | 0x12)  # 12 PM = noon
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H)
    assert cmos_read(rtc, CMOS_RTC_HOURS) == 0x12


def test_invalid_time_is_ignored(rtc: CmosRtc) -> None:
    cmos_write(rtc, CMOS_STATUS_B, REG_B_SET | REG_B_24H)
    cmos_write(rtc, CMOS_RTC_MONTH, 0x13)
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H)
    assert cmos_read(rtc, CMOS_RTC_MONTH) == 0x02


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc).date()


@given(st.dates())
def test_civil_calendar_agrees_with_datetime(date) -> None:
    days = (date - EPOCH).days
    assert days_from_civil(date.year, date.month, date.day) == days
    assert civil_from_days(days) == (date.year, date.month, date.day)
    assert (days + 4) % 7 == date.isoweekday() % 7     # 0 = Sunday, as the model counts


@pytest.mark.parametrize("year, month, days", [
    (2024, 2, 29), (2023, 2, 28), (1900, 2, 28), (2000, 2, 29), (2023, 4, 30), (2023, 12, 31)])
def test_days_in_month(year: int, month: int, days: int) -> None:
    assert days_in_month(year, month) == days


def test_a_day_that_is_not_in_the_month_is_ignored(rtc: CmosRtc) -> None:
    before = cmos_read(rtc, CMOS_RTC_DAY_MONTH)
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H | REG_B_SET)
    cmos_write(rtc, CMOS_RTC_MONTH, 0x02)
    cmos_write(rtc, CMOS_RTC_DAY_MONTH, 0x30)          # 30 February
    cmos_write(rtc, CMOS_STATUS_B, REG_B_24H)
    assert cmos_read(rtc, CMOS_RTC_DAY_MONTH) == before


def test_registers_c_and_d_are_read_only(rtc: CmosRtc) -> None:
    cmos_write(rtc, CMOS_STATUS_D, 0)
    assert cmos_read(rtc, CMOS_STATUS_D) == REG_D_VRT
    cmos_write(rtc, CMOS_STATUS_A, 0xFF)
    assert cmos_read(rtc, CMOS_STATUS_A) == 0x7F


@pytest.mark.parametrize(
    "low, high, expect",
    [
        # extended KiB above 1 MiB capped at 0xFFFF; (512-16) MiB = 0x1F00 * 64 KiB
        (512 << 20, 0, {0x15: 0x80, 0x16: 0x02, 0x17: 0xFF, 0x18: 0xFF, 0x30: 0xFF, 0x31: 0xFF,
                        0x34: 0x00, 0x35: 0x1F, 0x5B: 0, 0x5C: 0, 0x5D: 0}),
        # 16 GiB above 4 GiB = 0x040000 * 64 KiB
        (3 << 30, 16 << 30, {0x34: 0x00, 0x35: 0xBF, 0x5B: 0x00, 0x5C: 0x00, 0x5D: 0x04}),
        (8 << 20, 0, {0x17: 0x00, 0x18: 0x1C, 0x30: 0x00, 0x31: 0x1C, 0x34: 0, 0x35: 0}),
        (512 << 10, 0, {0x15: 0x00, 0x16: 0x02, 0x30: 0, 0x31: 0}),
        (1 << 30, 1 << 50, {0x5B: 0xFF, 0x5C: 0xFF, 0x5D: 0xFF}),  # capped at 24 bits
    ],
)
def test_memory_size_bytes(rtc: CmosRtc, low: int, high: int, expect: dict[int, int]) -> None:
    rtc.set_memory_size(low, high)
    for index, value in expect.items():
        assert cmos_read(rtc, index) == value, hex(index)


def test_memory_size_rejects_negative(rtc: CmosRtc) -> None:
    with pytest.raises(ValueError):
        rtc.set_memory_size(-1, 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.binary(min_size=1, max_size=4)), max_size=60),
       st.floats(min_value=-1e12, max_value=1e12))
def test_random_accesses_never_raise(ops, t) -> None:
    rtc = CmosRtc(lambda: t)
    for is_write, offset, data in ops:
        if is_write:
            rtc.write(offset, data)
        else:
            assert len(rtc.read(offset, len(data))) == len(data)
