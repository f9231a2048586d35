"""Tests of the debug-exit port (the guest's exit status)."""

from __future__ import annotations

from pyvmm.boot.layout import DEBUG_EXIT_PORT
from pyvmm.bus import Bus
from pyvmm.devices.debug_exit import DebugExit


def make() -> tuple[Bus, DebugExit, list[int]]:
    calls: list[int] = []
    dev = DebugExit(calls.append)
    bus = Bus("pio")
    bus.register(DEBUG_EXIT_PORT, 1, dev)
    return bus, dev, calls


def test_byte_is_the_status() -> None:
    bus, dev, calls = make()
    bus.write(DEBUG_EXIT_PORT, b"\x00")
    bus.write(DEBUG_EXIT_PORT, b"\x2a")
    assert calls == [0, 42]  # not QEMU's (N << 1) | 1
    assert dev.status == 42


def test_wider_write_uses_low_byte() -> None:
    dev_calls: list[int] = []
    dev = DebugExit(dev_calls.append)
    dev.write(0, (0x1203).to_bytes(2, "little"))
    dev.write(0, (0xAABBCC07).to_bytes(4, "little"))
    assert dev_calls == [3, 7]


def test_reads_return_ff() -> None:
    bus, dev, calls = make()
    assert bus.read(DEBUG_EXIT_PORT, 1) == b"\xff"
    assert dev.read(0, 4) == b"\xff" * 4
    assert calls == [] and dev.status is None


def test_odd_accesses_are_ignored() -> None:
    calls: list[int] = []
    dev = DebugExit(calls.append)
    dev.write(0, b"")
    dev.write(1, b"\x05")
    assert calls == []


def test_callback_failure_is_contained() -> None:
    def broken(status: int) -> None:
        raise RuntimeError("boom")

    dev = DebugExit(broken)
    dev.write(0, b"\x01")
    assert dev.status == 1
