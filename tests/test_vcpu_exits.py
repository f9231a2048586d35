"""VcpuThread's port-I/O and MMIO dispatch on exits written into a real kvm_run page
by hand: what reaches the bus and what goes back into kvm_run, edge lengths included."""

from __future__ import annotations

import pytest
from tinyguest import Recorder, TinyVm, assemble

from pyvmm import kvm

pytestmark = pytest.mark.kvm

MMIO_BASE = 0xD0000000


@pytest.fixture
def vm(kvm_host):
    vm = TinyVm(assemble(".org 0\nhlt"))   # never run: the exits below are made up
    yield vm
    vm.close()


def mmio_exit(vm: TinyVm, addr: int, length: int, is_write: bool, data: bytes = bytes(8)) -> kvm.kvm_run_mmio:
    vm.thread.vcpu.kvm_run.exit_reason = kvm.KVM_EXIT_MMIO
    mmio = vm.thread.vcpu.exit_mmio
    mmio.phys_addr, mmio.len, mmio.is_write = addr, length, is_write
    mmio.data[:] = data
    vm.thread._dispatch(vm.thread.vcpu.kvm_run)
    return mmio


@pytest.mark.parametrize("length", [1, 2, 4, 8])
def test_mmio_write_passes_len_bytes(vm, length):
    dev = Recorder()
    vm.mmio.register(MMIO_BASE, 0x1000, dev)
    mmio_exit(vm, MMIO_BASE + 0x10, length, True, bytes(range(1, 9)))
    assert dev.writes == [(0x10, bytes(range(1, length + 1)))]


@pytest.mark.parametrize("length", [1, 2, 4, 8])
def test_mmio_read_fills_len_bytes_only(vm, length):
    dev = Recorder(value=bytes(range(0x11, 0x19)))
    vm.mmio.register(MMIO_BASE, 0x1000, dev)
    mmio = mmio_exit(vm, MMIO_BASE + 0x20, length, False, b"\xee" * 8)
    assert dev.reads == [(0x20, length)]
    assert bytes(mmio.data) == bytes(range(0x11, 0x11 + length)) + b"\xee" * (8 - length)


@pytest.mark.parametrize("length", [9, 0xFFFFFFFF])
def test_mmio_len_beyond_the_data_field_is_cut_to_8(vm, length):
    """kvm_run.mmio.data holds 8 bytes; a larger len (KVM never sends one) stays inside them."""
    dev = Recorder(value=bytes(range(0x11, 0x19)))
    vm.mmio.register(MMIO_BASE, 0x1000, dev)
    mmio_exit(vm, MMIO_BASE, length, True, bytes(range(1, 9)))
    mmio = mmio_exit(vm, MMIO_BASE, length, False)
    assert dev.writes == [(0, bytes(range(1, 9)))] and dev.reads == [(0, 8)]
    assert bytes(mmio.data) == bytes(range(0x11, 0x19))


def test_unclaimed_mmio_read_is_all_ones(vm):
    mmio = mmio_exit(vm, MMIO_BASE, 4, False)
    assert bytes(mmio.data) == b"\xff" * 4 + bytes(4)
    assert vm.mmio.unclaimed == {MMIO_BASE: 1}


def test_port_io_out_and_in(vm):
    dev = Recorder(value=b"\xab\xcd")
    vm.pio.register(0x80, 4, dev)
    run, io = vm.thread.vcpu.kvm_run, vm.thread.vcpu.exit_io
    run.exit_reason = kvm.KVM_EXIT_IO
    io.size, io.port, io.count, io.data_offset = 2, 0x82, 1, 0x100
    for direction in (kvm.KVM_EXIT_IO_OUT, kvm.KVM_EXIT_IO_IN):
        vm.thread.vcpu.io_data()[:] = b"\x12\x34"
        io.direction = direction
        vm.thread._dispatch(run)
    assert dev.writes == [(2, b"\x12\x34")] and dev.reads == [(2, 2)]
    assert vm.thread.vcpu.io_data().tobytes() == b"\xab\xcd"


@pytest.mark.parametrize("offset, size, count", [
    (1 << 40, 1, 1),          # data_offset far outside the mapping
    (0x100, 4, 1 << 20),      # a count whose bytes run past its end
])
def test_port_io_data_outside_kvm_run_is_an_error_not_a_short_buffer(vm, offset, size, count):
    vcpu = vm.thread.vcpu
    io = vcpu.exit_io
    io.size, io.port, io.count, io.data_offset, io.direction = size, 0x80, count, offset, kvm.KVM_EXIT_IO_IN
    with pytest.raises(kvm.KvmError, match="outside kvm_run"):
        vcpu.io_data()
    with pytest.raises(kvm.KvmError, match="outside kvm_run"):
        vcpu.io_bytes(offset, size * count)
    assert vcpu.io_bytes(0x100, 2).nbytes == 2
