"""MC146818 CMOS real-time clock and its 128 bytes of battery-backed RAM.

The real device is the Motorola MC146818A RTC of the IBM PC/AT, still
emulated by every PC chipset behind I/O ports 0x70 (index) and 0x71 (data).
Register this device at 0x70 with length 2: offset 0 is the index port,
offset 1 the data port.

The model follows the MC146818A datasheet: the address map (time, calendar
and alarm bytes 0x00-0x09, registers A-D at 0x0A-0x0D, RAM after that),
Table 3 "Time, Calendar and Alarm Data Modes" (BCD or binary, 12- or 24-hour
with the PM bit 0x80), and the sections on Registers A, B, C and D.  The
PC/AT adds the NMI-disable bit (bit 7 of the index port) and the BIOS
convention for the century byte (0x32) and the memory-size bytes that
SeaBIOS reads (see :meth:`CmosRtc.set_memory_size`).

What this model does instead of counting seconds:

* The time registers are computed from ``clock()`` (UTC) plus an offset on
  every read, so there is no update cycle and UIP (Register A bit 7) is
  always 0.  Setting the clock with SET (Register B bit 7) freezes the time
  registers, takes the guest's writes, and on clearing SET stores the new
  offset from ``clock()``.  A time write without SET takes effect at once.
  The day of week is derived from the date.
* Register C's flags are latched lazily when it is read: UF if a second has
  passed since the last read, PF if a periodic-rate edge has, AF if the
  alarm matches the current second.  The RTC interrupt (IRQ 8) is not wired;
  Linux only reads the time at boot and does not need it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from ..snapshot.fields import blob, boolean, expect_keys, hex_bits, integer, uint

log = logging.getLogger(__name__)

# Where the PC puts it (registered at 0x70 with length 2).
RTC_PORT = 0x70
RTC_IRQ = 8
INDEX_OFFSET = 0  # port 0x70, write-only: register index | NMI disable
DATA_OFFSET = 1  # port 0x71: the selected register
NMI_DISABLE = 0x80  # index port bit 7 (PC/AT): not part of the index
INDEX_MASK = 0x7F
CMOS_SIZE = 128

# Address map (datasheet "Address Map"; names as in SeaBIOS's rtc.h).
CMOS_RTC_SECONDS = 0x00
CMOS_RTC_SECONDS_ALARM = 0x01
CMOS_RTC_MINUTES = 0x02
CMOS_RTC_MINUTES_ALARM = 0x03
CMOS_RTC_HOURS = 0x04
CMOS_RTC_HOURS_ALARM = 0x05
CMOS_RTC_DAY_WEEK = 0x06
CMOS_RTC_DAY_MONTH = 0x07
CMOS_RTC_MONTH = 0x08
CMOS_RTC_YEAR = 0x09
CMOS_STATUS_A = 0x0A
CMOS_STATUS_B = 0x0B
CMOS_STATUS_C = 0x0C
CMOS_STATUS_D = 0x0D
CMOS_CENTURY = 0x32  # PC/AT BIOS convention (also the ACPI FADT default)
TIME_REGISTERS = (
    CMOS_RTC_SECONDS, CMOS_RTC_MINUTES, CMOS_RTC_HOURS, CMOS_RTC_DAY_WEEK,
    CMOS_RTC_DAY_MONTH, CMOS_RTC_MONTH, CMOS_RTC_YEAR, CMOS_CENTURY,
)

# Memory-size bytes (IBM PC/AT and SeaBIOS/QEMU conventions).
CMOS_MEM_BASE_LOW = 0x15  # KiB of base memory (<= 640)
CMOS_MEM_BASE_HIGH = 0x16
CMOS_MEM_EXTMEM_LOW_AT = 0x17  # KiB above 1 MiB (PC/AT copy)
CMOS_MEM_EXTMEM_HIGH_AT = 0x18
CMOS_MEM_EXTMEM_LOW = 0x30  # KiB above 1 MiB, capped at 0xFFFF
CMOS_MEM_EXTMEM_HIGH = 0x31
CMOS_MEM_EXTMEM2_LOW = 0x34  # 64 KiB units between 16 MiB and 4 GiB
CMOS_MEM_EXTMEM2_HIGH = 0x35
CMOS_MEM_HIGHMEM_LOW = 0x5B  # 64 KiB units above 4 GiB (24 bits)
CMOS_MEM_HIGHMEM_MID = 0x5C
CMOS_MEM_HIGHMEM_HIGH = 0x5D

# Register A.
REG_A_UIP = 0x80  # update in progress (read-only; always 0 here)
REG_A_DV = 0x70  # divider chain: 010 = 32.768 kHz time base, running
REG_A_RS = 0x0F  # periodic interrupt rate select
REG_A_DEFAULT = 0x26  # 32.768 kHz, 1024 Hz periodic rate (what PC BIOSes set)

# Register B.
REG_B_SET = 0x80  # stop updates so the time can be set
REG_B_PIE = 0x40  # periodic interrupt enable
REG_B_AIE = 0x20  # alarm interrupt enable
REG_B_UIE = 0x10  # update-ended interrupt enable
REG_B_SQWE = 0x08  # square-wave enable
REG_B_DM = 0x04  # data mode: 1 = binary, 0 = BCD
REG_B_24H = 0x02  # 1 = 24-hour mode, 0 = 12-hour mode
REG_B_DSE = 0x01  # daylight saving enable (not modelled)
REG_B_DEFAULT = REG_B_24H  # 24-hour, BCD

# Register C (read-only, cleared by reading).
REG_C_IRQF = 0x80  # an enabled flag below is set
REG_C_PF = 0x40  # periodic
REG_C_AF = 0x20  # alarm
REG_C_UF = 0x10  # update ended

# Register D (read-only).
REG_D_VRT = 0x80  # valid RAM and time: the battery is fine

HOURS_PM = 0x80  # Table 3: PM flag on the hours byte in 12-hour mode
ALARM_DONT_CARE = 0xC0  # an alarm byte of 0xC0-0xFF matches any value

SECONDS_PER_DAY = 86400

KiB = 1024
MiB = 1024 * KiB
NS_PER_S = 1_000_000_000

# Saved state.  The staged time fields (while SET is 1) by name; the values are
# whatever the guest wrote, decoded (BCD garbage decodes to at most 165).
STAGED_NAMES = {
    "seconds": CMOS_RTC_SECONDS, "minutes": CMOS_RTC_MINUTES, "hours": CMOS_RTC_HOURS,
    "day_of_week": CMOS_RTC_DAY_WEEK, "day_of_month": CMOS_RTC_DAY_MONTH,
    "month": CMOS_RTC_MONTH, "year": CMOS_RTC_YEAR, "century": CMOS_CENTURY,
}
_STATE_KEYS = ("ram", "index", "nmi_disabled", "offset_ns", "staged", "reg_c")
_REG_C_FLAGS = REG_C_IRQF | REG_C_PF | REG_C_AF | REG_C_UF


# ---- the civil calendar (proleptic Gregorian, UTC, years 1-9999) ----------------
# The RTC holds a date; the model keeps a count of seconds.  These two convert,
# in the "era" form (400-year cycles of 146097 days, years starting on 1 March so
# that the leap day is the last day of a year); done here rather than with the
# datetime module, which a VMM otherwise does not import (it and tempfile were
# 0.5 MiB of a running VMM's memory, bench/README.md).

def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to the date (negative before it)."""
    y = year - (month <= 2)
    era = y // 400
    year_of_era = y - era * 400                                   # 0-399
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1  # from 1 March
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468                     # 719468: 0000-03-01 to 1970-01-01


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of the date ``days`` after 1970-01-01."""
    z = days + 719468
    era = z // 146097
    day_of_era = z - era * 146097                                 # 0-146096
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524
                   - day_of_era // 146096) // 365                 # 0-399
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    mp = (5 * day_of_year + 2) // 153                             # month from March, 0-11
    day = day_of_year - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return year_of_era + era * 400 + (month <= 2), month, day


def days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


_MIN_TIME = days_from_civil(1, 1, 1) * SECONDS_PER_DAY
_MAX_TIME = days_from_civil(9999, 12, 31) * SECONDS_PER_DAY + SECONDS_PER_DAY - 1
MAX_OFFSET_NS = math.ceil(_MAX_TIME - _MIN_TIME) * NS_PER_S   # beyond it the clock only clamps


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """An MC146818 RTC with PC/AT CMOS RAM (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ram = bytearray(CMOS_SIZE)
        self._ram[CMOS_STATUS_A] = REG_A_DEFAULT
        self._ram[CMOS_STATUS_B] = REG_B_DEFAULT
        self._index = 0
        self._nmi_disabled = False
        self._offset_ns = 0  # guest time = clock() + offset (whole ns: saved exactly)
        self._staged: dict[int, int] | None = None  # time fields while SET is 1
        self._reg_c = 0
        now = self._clock()
        self._last_poll = now
        self._last_second = math.floor(now)

    # ---- public interface ---------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Guest IN; a wide access is split into byte accesses like on ISA."""
        with self._lock:
            return bytes(self._read_port(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_port(offset + i, value)

    def set_memory_size(self, low_bytes: int, high_bytes: int) -> None:
        """Fill the memory-size bytes as SeaBIOS (and QEMU's pc_cmos_init) expect.

        ``low_bytes`` is the RAM below 4 GiB (including the first MiB),
        ``high_bytes`` the RAM above 4 GiB.
        """
        if low_bytes < 0 or high_bytes < 0:
            raise ValueError("memory sizes must not be negative")
        base_kib = min(low_bytes // KiB, 640)
        ext_kib = min(max(low_bytes - 1 * MiB, 0) // KiB, 0xFFFF)
        ext2_64k = min(max(low_bytes - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
        high_64k = min(high_bytes // (64 * KiB), 0xFFFFFF)
        with self._lock:
            self._put_le(CMOS_MEM_BASE_LOW, base_kib, 2)
            self._put_le(CMOS_MEM_EXTMEM_LOW_AT, ext_kib, 2)
            self._put_le(CMOS_MEM_EXTMEM_LOW, ext_kib, 2)
            self._put_le(CMOS_MEM_EXTMEM2_LOW, ext2_64k, 2)
            self._put_le(CMOS_MEM_HIGHMEM_LOW, high_64k, 3)

    @property
    def nmi_disabled(self) -> bool:
        """Bit 7 of the last index written (the PC's NMI mask); informational."""
        with self._lock:
            return self._nmi_disabled

    # ---- snapshot -------------------------------------------------------------

    def save_state(self) -> dict:
        """CMOS RAM, the index and NMI bit, the guest time as an offset from the
        host clock, the time fields the guest is setting (SET) and the Register C
        flags not yet read.  After a restore the guest clock runs on from the host
        clock plus that offset: time passes while a snapshot waits, as on a PC
        whose battery kept the RTC going."""
        with self._lock:
            staged = None
            if self._staged is not None:
                staged = {name: self._staged[index] for name, index in STAGED_NAMES.items()}
            return {
                "ram": bytes(self._ram).hex(),
                "index": self._index,
                "nmi_disabled": self._nmi_disabled,
                "offset_ns": self._offset_ns,
                "staged": staged,
                "reg_c": hex(self._reg_c),
            }

    def restore_state(self, state: dict, path: str = "rtc") -> None:
        """Load ``save_state``'s dict; everything is checked first (ValueError)."""
        expect_keys(state, _STATE_KEYS, path)
        ram = bytearray(blob(state["ram"], f"{path}.ram", CMOS_SIZE))
        if ram[CMOS_STATUS_A] & REG_A_UIP:
            raise ValueError(f"{path}.ram: Register A has UIP set (this RTC never updates)")
        index = uint(state["index"], f"{path}.index", INDEX_MASK)
        nmi_disabled = boolean(state["nmi_disabled"], f"{path}.nmi_disabled")
        offset_ns = integer(state["offset_ns"], f"{path}.offset_ns", -MAX_OFFSET_NS, MAX_OFFSET_NS)
        staged = self._staged_from(state["staged"], f"{path}.staged")
        if (staged is not None) != bool(ram[CMOS_STATUS_B] & REG_B_SET):
            raise ValueError(f"{path}.staged: must be given exactly when Register B has SET")
        reg_c = hex_bits(state["reg_c"], f"{path}.reg_c", _REG_C_FLAGS)
        with self._lock:
            self._ram = ram
            self._index = index
            self._nmi_disabled = nmi_disabled
            self._offset_ns = offset_ns
            self._staged = staged
            self._reg_c = reg_c
            now = self._clock()
            self._last_poll = now
            self._last_second = math.floor(self._guest_time(now))

    @staticmethod
    def _staged_from(value: object, path: str) -> dict[int, int] | None:
        if value is None:
            return None
        expect_keys(value, STAGED_NAMES, path)
        return {index: uint(value[name], f"{path}.{name}", 0xFF)
                for name, index in STAGED_NAMES.items()}

    # ---- ports ----------------------------------------------------------------

    def _read_port(self, offset: int) -> int:
        if offset == DATA_OFFSET:
            return self._read_register(self._index)
        if offset != INDEX_OFFSET:
            log.debug("rtc: read of unknown offset %#x", offset)
        return 0xFF  # the index port is write-only

    def _write_port(self, offset: int, value: int) -> None:
        if offset == INDEX_OFFSET:
            self._nmi_disabled = bool(value & NMI_DISABLE)
            self._index = value & INDEX_MASK
        elif offset == DATA_OFFSET:
            self._write_register(self._index, value)
        else:
            log.debug("rtc: ignored write %#04x to offset %#x", value, offset)

    # ---- registers ------------------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            return self._encode(index, self._time_fields()[index])
        if index == CMOS_STATUS_A:
            return self._ram[CMOS_STATUS_A] & ~REG_A_UIP  # never mid-update
        if index == CMOS_STATUS_C:
            return self._read_reg_c()
        if index == CMOS_STATUS_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            self._write_time(index, value)
        elif index == CMOS_STATUS_A:
            self._ram[CMOS_STATUS_A] = value & ~REG_A_UIP
        elif index == CMOS_STATUS_B:
            self._write_reg_b(value)
        elif index in (CMOS_STATUS_C, CMOS_STATUS_D):
            log.debug("rtc: ignored write %#04x to read-only register %#x", value, index)
        else:  # alarm bytes and general CMOS RAM
            self._ram[index] = value

    def _write_reg_b(self, value: int) -> None:
        old = self._ram[CMOS_STATUS_B]
        if value & REG_B_SET:
            value &= ~REG_B_UIE  # "Register B": SET going high clears UIE
            if not old & REG_B_SET:
                self._staged = self._time_fields()  # updates stop: freeze
        elif old & REG_B_SET:
            self._commit_staged_time()  # updates resume from the new time
        self._ram[CMOS_STATUS_B] = value

    def _read_reg_c(self) -> int:
        """Register C: latch the flags since the last read, return them, clear."""
        self._latch_flags()
        value = self._reg_c
        self._reg_c = 0
        return value

    # ---- time -----------------------------------------------------------------

    def _guest_time(self, host_time: float) -> float:
        return host_time + self._offset_ns / NS_PER_S

    def _time_fields(self) -> dict[int, int]:
        """The time registers' binary values (hours 0-23), frozen while SET."""
        if self._staged is not None:
            return dict(self._staged)
        return self._fields_at(self._guest_time(self._clock()))

    @staticmethod
    def _fields_at(timestamp: float) -> dict[int, int]:
        t = math.floor(min(max(timestamp, _MIN_TIME), _MAX_TIME))
        days, seconds = divmod(t, SECONDS_PER_DAY)
        year, month, day = civil_from_days(days)
        return {
            CMOS_RTC_SECONDS: seconds % 60,
            CMOS_RTC_MINUTES: seconds // 60 % 60,
            CMOS_RTC_HOURS: seconds // 3600,
            CMOS_RTC_DAY_WEEK: (days + 4) % 7 + 1,  # 1 = Sunday; 1970-01-01 was a Thursday
            CMOS_RTC_DAY_MONTH: day,
            CMOS_RTC_MONTH: month,
            CMOS_RTC_YEAR: year % 100,
            CMOS_CENTURY: year // 100,
        }

    def _write_time(self, index: int, value: int) -> None:
        if self._staged is None:  # no SET: change the running clock at once
            self._staged = self._time_fields()
            self._staged[index] = self._decode(index, value)
            self._commit_staged_time()
        else:
            self._staged[index] = self._decode(index, value)

    def _commit_staged_time(self) -> None:
        fields, self._staged = self._staged, None
        if fields is None:
            return
        year = fields[CMOS_CENTURY] * 100 + fields[CMOS_RTC_YEAR]
        month, day = fields[CMOS_RTC_MONTH], fields[CMOS_RTC_DAY_MONTH]
        hours, minutes, seconds = fields[CMOS_RTC_HOURS], fields[CMOS_RTC_MINUTES], fields[CMOS_RTC_SECONDS]
        if not (1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= days_in_month(year, month)
                and hours < 24 and minutes < 60 and seconds < 60):
            log.debug("rtc: guest set an invalid time %r; ignored", fields)
            return
        new = (days_from_civil(year, month, day) * SECONDS_PER_DAY
               + hours * 3600 + minutes * 60 + seconds)
        self._offset_ns = round((new - self._clock()) * NS_PER_S)

    # ---- data modes (Table 3) -------------------------------------------------

    def _encode(self, index: int, value: int) -> int:
        """Binary value -> register byte in the mode Register B selects."""
        reg_b = self._ram[CMOS_STATUS_B]
        pm = 0
        if index == CMOS_RTC_HOURS and not reg_b & REG_B_24H:
            pm = HOURS_PM if value >= 12 else 0
            value = value % 12 or 12
        if not reg_b & REG_B_DM:
            value = _to_bcd(value)
        return (value | pm) & 0xFF

    def _decode(self, index: int, byte: int) -> int:
        """Register byte -> binary value (hours 0-23); the inverse of _encode."""
        reg_b = self._ram[CMOS_STATUS_B]
        twelve_hour = index == CMOS_RTC_HOURS and not reg_b & REG_B_24H
        pm = twelve_hour and bool(byte & HOURS_PM)
        if twelve_hour:
            byte &= ~HOURS_PM
        value = byte if reg_b & REG_B_DM else _from_bcd(byte)
        if twelve_hour:
            value = value % 12 + (12 if pm else 0)
        return value

    # ---- register C flags -----------------------------------------------------

    def _latch_flags(self) -> None:
        now = self._clock()
        reg_b = self._ram[CMOS_STATUS_B]
        second = math.floor(self._guest_time(now))
        if self._staged is None and second > self._last_second:
            self._reg_c |= REG_C_UF  # at least one update cycle ended
            if self._alarm_matches():
                self._reg_c |= REG_C_AF
        self._last_second = second
        period = self._periodic_period()
        if period and math.floor(now / period) > math.floor(self._last_poll / period):
            self._reg_c |= REG_C_PF
        self._last_poll = now
        # PF/AF/UF sit at the same bit positions as PIE/AIE/UIE in Register B.
        if self._reg_c & reg_b & (REG_B_PIE | REG_B_AIE | REG_B_UIE):
            self._reg_c |= REG_C_IRQF

    def _alarm_matches(self) -> bool:
        fields = self._time_fields()
        for alarm, current in (
            (CMOS_RTC_SECONDS_ALARM, CMOS_RTC_SECONDS),
            (CMOS_RTC_MINUTES_ALARM, CMOS_RTC_MINUTES),
            (CMOS_RTC_HOURS_ALARM, CMOS_RTC_HOURS),
        ):
            byte = self._ram[alarm]
            if byte & ALARM_DONT_CARE == ALARM_DONT_CARE:
                continue
            if byte != self._encode(current, fields[current]):
                return False
        return True

    def _periodic_period(self) -> float:
        """Register A's RS bits -> seconds per periodic edge (0: off).

        With the 32.768 kHz time base RS=1 and 2 give 256 and 128 Hz, and
        RS=3..15 give 2**(16-RS) Hz (8192 Hz down to 2 Hz).
        """
        rs = self._ram[CMOS_STATUS_A] & REG_A_RS
        if rs == 0:
            return 0.0
        hz = {1: 256, 2: 128}.get(rs, 1 << (16 - rs))
        return 1.0 / hz

    # ---- helpers ----------------------------------------------------------------

    def _put_le(self, index: int, value: int, nbytes: int) -> None:
        for i in range(nbytes):
            self._ram[index + i] = (value >> (8 * i)) & 0xFF
