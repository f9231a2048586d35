"""The --trace filter syntax and the --stats report (pyvmm.trace), without a guest.

The tiny-guest tests (tests/test_tiny_guests.py) check the lines and counts
of real exits; a boot test checks --stats on a Linux boot.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm import kvm
from pyvmm.bus import Bus
from pyvmm.trace import (KINDS, QueueCounters, RunCounters, TraceOutput, TraceSpec, TraceSpecError,
                         format_stats, parse_trace)


@pytest.mark.parametrize("text, spec", [
    ("exits", TraceSpec()),
    ("exits=/tmp/t.log", TraceSpec(path="/tmp/t.log")),
    ("exits=a=b", TraceSpec(path="a=b")),
    ("exits,io", TraceSpec(kinds=frozenset({"io"}))),
    ("exits,io,port=0x3f8", TraceSpec(kinds=frozenset({"io"}), ports=((0x3F8, 0x3F8),))),
    ("exits,port=0x3f8-0x3ff", TraceSpec(kinds=frozenset({"io"}), ports=((0x3F8, 0x3FF),))),
    ("exits,port=1016,port=0x501", TraceSpec(kinds=frozenset({"io"}), ports=((1016, 1016), (0x501, 0x501)))),
    ("exits,addr=0xfebd0000-0xfebdffff", TraceSpec(kinds=frozenset({"mmio"}),
                                                   addrs=((0xFEBD0000, 0xFEBDFFFF),))),
    ("exits,mmio,port=0x80", TraceSpec(kinds=frozenset({"io", "mmio"}), ports=((0x80, 0x80),))),
    ("exits=f,fixup,efault,vcpu=1", TraceSpec(path="f", kinds=frozenset({"fixup", "efault"}),
                                              vcpus=((1, 1),))),
    ("exits,vcpu=0-3", TraceSpec(vcpus=((0, 3),))),
])
def test_parse(text, spec):
    assert parse_trace(text) == spec


@pytest.mark.parametrize("text, words", [
    ("", "expected exits"),
    ("syscalls", "expected exits"),
    ("exits=", "needs a file name"),
    ("exits,", "unknown filter ''"),
    ("exits,serial", "unknown filter 'serial'"),
    ("exits,io=1", "unknown filter 'io=1'"),
    ("exits,port", "unknown filter 'port'"),
    ("exits,port=", "port=''"),
    ("exits,port=com1", "expected N or N-M"),
    ("exits,port=0x10000", "0xffff"),
    ("exits,port=0x3ff-0x3f8", "N <= M"),
    ("exits,port=-1", "expected N or N-M"),
    ("exits,vcpu=1-2-3", "expected N or N-M"),
    ("exits,addr=0x1_0000_0000_0000_0000", "0xffffffffffffffff"),
])
def test_parse_rejects(text, words):
    with pytest.raises(TraceSpecError) as e:
        parse_trace(text)
    assert words in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="exits=,iomuxpradfcv0123456789-x", max_size=40))
def test_parse_never_fails_otherwise(text):
    try:
        spec = parse_trace(text)
    except TraceSpecError:
        return
    assert spec.kinds <= set(KINDS) and spec.kinds


ranges = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(sorted).map(tuple)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(KINDS), unique=True), st.lists(ranges, max_size=3),
       st.lists(ranges, max_size=3), st.integers(0, 0xFFFF))
def test_filters_round_trip_and_select(kinds, ports, addrs, probe):
    items = ["exits", *kinds] + [f"port={lo:#x}-{hi:#x}" for lo, hi in ports] \
        + [f"addr={lo}-{hi}" for lo, hi in addrs]
    spec = parse_trace(",".join(items))
    assert spec.ports == tuple(ports) and spec.addrs == tuple(addrs)
    expected = set(kinds) | ({"io"} if ports else set()) | ({"mmio"} if addrs else set())
    assert spec.kinds == (expected or set(KINDS))
    in_ports = any(lo <= probe <= hi for lo, hi in ports)
    assert spec.shows("io", probe) == ("io" in spec.kinds and (not ports or in_ports))
    assert spec.shows("mmio", probe) == ("mmio" in spec.kinds and (not addrs or any(
        lo <= probe <= hi for lo, hi in addrs)))


def test_vcpu_filter():
    spec = parse_trace("exits,vcpu=1-2,vcpu=5")
    assert [i for i in range(8) if spec.shows_vcpu(i)] == [1, 2, 5]
    assert all(TraceSpec().shows_vcpu(i) for i in range(8))


def test_trace_file_that_cannot_be_written(tmp_path):
    with pytest.raises(TraceSpecError, match="cannot write"):
        TraceOutput(TraceSpec(path=str(tmp_path / "no" / "such" / "dir")))


class FakeVcpu:
    index = 0


def test_stats_report_names_everything():
    from pyvmm.trace import VcpuWatch

    pio, mmio = Bus("pio"), Bus("mmio")
    pio.unclaimed.update({0x61: 3, 0x80: 7})
    watch = VcpuWatch(FakeVcpu(), pio, mmio)
    watch.reasons = {kvm.KVM_EXIT_IO: 10, kvm.KVM_EXIT_MMIO: 2}
    watch.accesses = {("serial", "out"): 9, ("unclaimed", "in"): 1, ("virtio-VirtioRng.bar0", "write"): 2}
    report = format_stats(RunCounters(
        seconds=2.0, first_run=0.5, setup=0.25, watches=[watch], fixups={"int3": 1},
        memory_faults=[0], buses=[pio, mmio],
        queues=[("virtio-VirtioRng", [QueueCounters(kicks=4, wakeups=3, interrupts=2, suppressed=1)]),
                ("virtio-VirtioFs", None)]))
    lines = report.splitlines()
    assert all(line.startswith("pyvmm: stats: ") for line in lines)
    assert "12 exits to pyvmm in 2.00 s (6/s); first KVM_RUN 0.500 s after pyvmm started" in lines[0]
    assert "by reason: IO 10, MMIO 2" in report
    assert "by vCPU: vcpu0 12" in report
    assert "by device and direction: serial out 9, virtio-VirtioRng.bar0 write 2, unclaimed in 1" in report
    assert "unclaimed pio: 0x80 x7, 0x61 x3" in report and "unclaimed mmio: none" in report
    assert "int3 1" in report and "EFAULTs turned into #GP: 0" in report
    assert "virtio-VirtioRng queue 0: 4 kicks in 3 worker wakeups, 2 interrupts (1 suppressed" in report
    assert "virtio-VirtioFs: its queues are served by the vhost-user back-end outside the VMM" in report
    assert "kvm_stat" in lines[-1] and "perf kvm stat" in lines[-1]
