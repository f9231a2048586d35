"""MSI-X (pyvmm.pci.msix) and the GSI routing table (pyvmm.irq), against a fake KVM VM."""

from __future__ import annotations

import os
import resource
import select
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm import kvm
from pyvmm.irq import FIRST_MSI_GSI, GsiRouter, legacy_routes
from pyvmm.pci.config import PciConfigSpace
from pyvmm.pci.msix import (MSI_ADDRESS_BASE, PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL,
                            Msix)

ENABLE, MASKALL = PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL


def decode_route(e) -> tuple:
    if e.type == kvm.KVM_IRQ_ROUTING_IRQCHIP:
        return ("irqchip", e.gsi, e.irqchip.irqchip, e.irqchip.pin)
    if e.type == kvm.KVM_IRQ_ROUTING_MSI:
        return ("msi", e.gsi, (e.msi.address_hi << 32) | e.msi.address_lo, e.msi.data)
    return ("?", e.gsi, e.type)


class FakeVm:
    """Records irqfd / ioeventfd / routing calls and checks them the way KVM would."""

    def __init__(self) -> None:
        self.irqfds: dict[int, int] = {}        # eventfd -> gsi
        self.ioeventfds: dict[int, int] = {}    # address -> eventfd
        self.routing: list[tuple] | None = None
        self.calls: list[tuple] = []

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        self.calls.append(("irqfd", fd, gsi, deassign))
        os.fstat(fd)                            # EBADF like KVM for a closed fd
        if deassign:
            assert self.irqfds.get(fd) == gsi, "deassigning an irqfd that is not assigned"
            del self.irqfds[fd]
        else:
            assert fd not in self.irqfds, "irqfd assigned twice (KVM: EBUSY)"
            self.irqfds[fd] = gsi

    def ioeventfd(self, fd: int, addr: int, length: int, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        self.calls.append(("ioeventfd", fd, addr, length, deassign))
        if deassign:
            assert self.ioeventfds.get(addr) == fd, "deassigning an unknown ioeventfd (KVM: ENOENT)"
            del self.ioeventfds[addr]
        else:
            os.fstat(fd)
            assert addr not in self.ioeventfds, "ioeventfd assigned twice (KVM: EEXIST)"
            self.ioeventfds[addr] = fd

    def set_gsi_routing(self, entries) -> None:
        self.calls.append(("routing", len(entries)))
        self.routing = [decode_route(e) for e in entries]

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        return {r[1]: (r[2], r[3]) for r in self.routing or [] if r[0] == "msi"}


LEGACY = [decode_route(e) for e in legacy_routes()]


def readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def entry(address: int, data: int, masked: bool) -> bytes:
    return struct.pack("<IIII", address & 0xFFFFFFFF, address >> 32, data, int(masked))


@pytest.fixture
def vm():
    return FakeVm()


@pytest.fixture
def router(vm):
    return GsiRouter(vm)


@pytest.fixture
def msix(vm, router):
    m = Msix(vm, router, 4, 0, 0x4000, 0, 0x5000)
    yield m
    if not getattr(m, "_test_closed", False):
        m.close()


def close(m: Msix) -> None:
    m.close()
    m._test_closed = True


# --- GSI routing table ----------------------------------------------------------------------------
def test_legacy_routes_mirror_kvm_default_routing():
    ioapic = [r for r in LEGACY if r[2] == kvm.KVM_IRQCHIP_IOAPIC]
    pic = [r for r in LEGACY if r[2] in (kvm.KVM_IRQCHIP_PIC_MASTER, kvm.KVM_IRQCHIP_PIC_SLAVE)]
    assert [(r[1], r[3]) for r in ioapic] == [(g, g) for g in range(24)]
    assert [(r[1], r[2], r[3]) for r in pic] == \
        [(g, kvm.KVM_IRQCHIP_PIC_MASTER if g < 8 else kvm.KVM_IRQCHIP_PIC_SLAVE, g % 8) for g in range(16)]
    assert len(LEGACY) == 40


def test_router_allocates_from_24_and_commits_whole_tables(vm, router):
    g1, g2 = router.allocate(), router.allocate()
    assert (g1, g2) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1) == (24, 25)
    assert vm.routing is None                              # nothing routed yet, nothing committed
    router.set_msi(g2, 0xFEE01000, 0x41)
    assert vm.routing == LEGACY + [("msi", g2, 0xFEE01000, 0x41)]
    router.set_msi(g1, 0xFEE00000, 0x30)
    assert vm.routing == LEGACY + [("msi", g1, 0xFEE00000, 0x30), ("msi", g2, 0xFEE01000, 0x41)]
    n = len(vm.calls)
    router.set_msi(g1, 0xFEE00000, 0x30)                   # unchanged: no ioctl
    assert len(vm.calls) == n
    router.free(g2)
    assert vm.routing == LEGACY + [("msi", g1, 0xFEE00000, 0x30)]
    assert router.allocate() == g2                         # reused
    router.free(1000)                                      # unknown: ignored


def test_router_64bit_message_address(vm, router):
    g = router.allocate()
    router.set_msi(g, 0x1_2345_6780, 7)
    assert vm.routing[-1] == ("msi", g, 0x1_2345_6780, 7)


def test_router_exhaustion_is_a_clear_error(vm):
    r = GsiRouter(vm, max_gsi=26)
    r.allocate(), r.allocate()
    with pytest.raises(Exception) as e:
        r.allocate()
    assert not isinstance(e.value, StopIteration)


# --- capability ----------------------------------------------------------------------------------
def test_capability_body_and_mask(vm, router):
    m = Msix(vm, router, 5, 2, 0x800, 3, 0x1000)
    body, writable = m.capability()
    control, table, pba = struct.unpack("<HII", body)
    assert control == 4                                    # table size - 1, disabled, not masked
    assert (table & 7, table & ~7) == (2, 0x800)           # BIR, offset
    assert (pba & 7, pba & ~7) == (3, 0x1000)
    assert struct.unpack("<HII", writable) == (0xC000, 0, 0)
    assert m.table_size == 5 * 16 and m.pba_size == 8
    m.close()


def test_capability_in_config_space(vm, router):
    m = Msix(vm, router, 3, 0, 0x4000, 0, 0x5000)
    conf = PciConfigSpace(1, 2, 0)
    body, writable = m.capability()
    off = conf.add_capability(PCI_CAP_ID_MSIX, body, writable)
    assert conf.capabilities() == [(0x11, off)]
    assert conf.read(off, 4) == bytes([0x11, 0, 2, 0])
    conf.write(off + 2, b"\xff\xff")                       # only ENABLE and MASKALL stick
    assert conf.get(off + 2, 2) == 0xC002
    conf.write(off + 4, b"\xff" * 8)                       # table / PBA locations are read-only
    assert conf.get(off + 4, 4) == 0x4000 and conf.get(off + 8, 4) == 0x5000
    m.close()


@pytest.mark.parametrize("n, pba", [(1, 8), (64, 8), (65, 16), (2048, 256)])
def test_pba_size(vm, n, pba):
    m = Msix(vm, GsiRouter(vm, max_gsi=4096), n, 0, 0, 0, 0x8000)
    try:
        assert m.pba_size == pba
        assert m.table_size == 16 * n
        if n <= 64:   # (the fds of a bigger table may be >= 1024: see test_pba_read_with_high_fd_numbers)
            assert m.pba_read(0, 8) == b"\0" * 8
            assert m.pba_read(0, pba) == b"\0" * pba
    finally:
        m.close()


@pytest.mark.parametrize("n", [0, -1, 2049])
def test_vector_count_limits(vm, router, n):
    with pytest.raises(ValueError):
        Msix(vm, router, n, 0, 0, 0, 0x1000)


def test_reset_state(vm, msix):
    for v in range(4):
        assert msix.entry(v) == (0, 0, True)
        assert msix.table_read(v * 16 + 12, 4) == b"\x01\0\0\0"
    assert not msix.enabled and not msix.function_masked
    assert len(set(msix.gsis)) == 4 and all(g >= 24 for g in msix.gsis)
    assert len(set(msix.eventfds)) == 4
    assert vm.irqfds == {} and vm.routing is None


# --- routing and masking --------------------------------------------------------------------------
def test_enable_and_unmask_attach_irqfd_and_route(vm, msix):
    msix.table_write(16, entry(0xFEE0_2000, 0x4041, masked=True))
    assert vm.irqfds == {}
    msix.control_written(ENABLE)
    assert vm.irqfds == {}                                 # still masked
    msix.table_write(16 + 12, b"\0\0\0\0")                 # unmask vector 1
    assert vm.irqfds == {msix.eventfds[1]: msix.gsis[1]}
    assert vm.routing[:len(LEGACY)] == LEGACY
    assert vm.msi_routes() == {msix.gsis[1]: (0xFEE0_2000, 0x4041)}
    # the route is in place by the time the irqfd goes live
    kinds = [c[0] for c in vm.calls]
    assert kinds.index("routing") < kinds.index("irqfd")


def test_unmask_before_enable(vm, msix):
    msix.table_write(0, entry(MSI_ADDRESS_BASE, 0x21, masked=False))
    assert vm.irqfds == {}                                 # MSI-X still disabled
    msix.control_written(ENABLE)
    assert vm.irqfds == {msix.eventfds[0]: msix.gsis[0]}
    msix.control_written(0)                                # disable detaches
    assert vm.irqfds == {}


def test_vector_mask_detaches(vm, msix):
    msix.control_written(ENABLE)
    msix.table_write(32, entry(0xFEE00000, 0x50, masked=False))
    assert msix.eventfds[2] in vm.irqfds
    msix.table_write(32 + 12, b"\x01")
    assert vm.irqfds == {}
    msix.table_write(32 + 12, b"\x00")
    assert vm.irqfds == {msix.eventfds[2]: msix.gsis[2]}


def test_function_mask_detaches_all(vm, msix):
    msix.control_written(ENABLE)
    for v in range(4):
        msix.table_write(v * 16, entry(0xFEE00000, 0x30 + v, masked=False))
    assert len(vm.irqfds) == 4
    msix.control_written(ENABLE | MASKALL)
    assert msix.function_masked and vm.irqfds == {}
    msix.control_written(ENABLE)
    assert vm.irqfds == {fd: g for fd, g in zip(msix.eventfds, msix.gsis)}
    assert vm.msi_routes() == {g: (0xFEE00000, 0x30 + v) for v, g in enumerate(msix.gsis)}


def test_notify_while_masked_latches_and_unmask_delivers(vm, msix):
    msix.control_written(ENABLE)
    msix.table_write(16, entry(0xFEE00000, 0x61, masked=True))
    msix.interrupt(1)
    assert msix.pba_read(0, 8) == (0b10).to_bytes(8, "little")
    assert msix.pba_read(0, 1) == b"\x02" and msix.pba_read(1, 1) == b"\0"
    assert vm.irqfds == {}
    msix.table_write(16 + 12, b"\0\0\0\0")                 # unmask
    assert vm.irqfds == {msix.eventfds[1]: msix.gsis[1]}
    assert readable(msix.eventfds[1])                      # KVM finds the count when it assigns the irqfd
    assert msix.pba_read(0, 8) == b"\0" * 8                # no longer pending from the guest's view


def test_notify_while_function_masked_latches(vm, msix):
    msix.control_written(ENABLE | MASKALL)
    msix.table_write(0, entry(0xFEE00000, 0x61, masked=False))
    msix.interrupt(0)
    assert msix.pba_read(0, 8)[0] == 1
    msix.control_written(ENABLE)
    assert msix.eventfds[0] in vm.irqfds and readable(msix.eventfds[0])


def test_notify_unmasked_is_not_pending(vm, msix):
    msix.control_written(ENABLE)
    msix.table_write(0, entry(0xFEE00000, 0x61, masked=False))
    msix.interrupt(0)
    assert readable(msix.eventfds[0])
    assert msix.pba_read(0, 8) == b"\0" * 8


@pytest.mark.parametrize("vector", [-1, 4, 100])
def test_notify_out_of_range_is_ignored(msix, vector):
    msix.interrupt(vector)
    assert not any(readable(fd) for fd in msix.eventfds)


@pytest.mark.parametrize("address", [0xFED0_0000, 0xFEF0_0000, 0x0, 0x1_FEE0_0000, 0xFFFF_FFFF_FEE0_0000])
def test_address_outside_lapic_window_not_routed(vm, msix, address):
    msix.control_written(ENABLE)
    msix.table_write(0, entry(address, 0x41, masked=False))
    assert vm.irqfds == {}
    assert vm.msi_routes() == {}
    msix.table_write(0, struct.pack("<II", 0xFEEFF00C, 0))  # now inside (any LAPIC id, RH/DM bits)
    assert vm.irqfds == {msix.eventfds[0]: msix.gsis[0]}
    assert vm.msi_routes() == {msix.gsis[0]: (0xFEEFF00C, 0x41)}
    msix.table_write(0, struct.pack("<I", 0xFED00000))      # and out again: detached
    assert vm.irqfds == {}


def test_data_change_while_live_updates_route(vm, msix):
    msix.control_written(ENABLE)
    msix.table_write(0, entry(0xFEE00000, 0x41, masked=False))
    msix.table_write(8, struct.pack("<I", 0x42))
    assert vm.msi_routes() == {msix.gsis[0]: (0xFEE00000, 0x42)}
    assert list(vm.irqfds) == [msix.eventfds[0]]
    assert sum(1 for c in vm.calls if c[0] == "irqfd") == 1   # not re-attached


def test_pba_read_with_high_fd_numbers(vm, router):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("RLIMIT_NOFILE too low to get fds above 1024")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard) if hard != resource.RLIM_INFINITY else 2048, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1030:   # take every fd number below 1030
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        m = Msix(vm, router, 2, 0, 0x4000, 0, 0x5000)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert min(m.eventfds) > 1024
        m.interrupt(0)
        assert m.pba_read(0, 8)[0] == 1                    # a guest read of the PBA (vCPU thread)
    finally:
        m.close()


# --- table / PBA accesses ---------------------------------------------------------------------------
def test_table_odd_offsets_and_sizes(vm, msix):
    msix.table_write(1, b"\xE0\xFE")                       # bytes 1-2 of vector 0's address
    assert msix.table_read(0, 4) == b"\x00\xE0\xFE\x00"
    assert msix.table_read(1, 2) == b"\xE0\xFE"
    msix.table_write(0, b"\x00\x00\xE0\xFE")
    assert msix.table_read(2, 1) == b"\xE0"
    # a write that crosses from vector 0's control into vector 1's address refreshes both
    msix.table_write(8, struct.pack("<I", 0x33))
    msix.control_written(ENABLE)
    msix.table_write(16, entry(0xFEE00000, 0x34, masked=True))
    msix.table_write(12, b"\x00\x00\x00\x00\x00\x00\xE0\xFE")
    assert msix.entry(0) == (0xFEE00000, 0x33, False)
    assert vm.irqfds == {msix.eventfds[0]: msix.gsis[0]}   # vector 1 stays masked
    msix.table_write(16 + 12, b"\0")
    assert set(vm.irqfds) == {msix.eventfds[0], msix.eventfds[1]}
    assert msix.table_read(0, 64) == bytes(msix.table)


@pytest.mark.parametrize("offset, size", [(64, 1), (63, 2), (61, 4), (64, 8), (-1, 4), (-16, 16), (0x1000, 4)])
def test_table_out_of_range(vm, msix, offset, size):
    before = bytes(msix.table)
    assert msix.table_read(offset, size) == b"\xff" * size
    msix.table_write(offset, b"\0" * size)
    assert bytes(msix.table) == before
    assert vm.calls == []


@pytest.mark.parametrize("offset, size", [(8, 1), (7, 2), (4, 8), (-1, 1), (100, 4)])
def test_pba_out_of_range(msix, offset, size):
    assert msix.pba_read(offset, size) == b"\xff" * size


def live_vectors(m: Msix) -> set[int]:
    out = set()
    for v in range(m.num_vectors):
        address, _, masked = m.entry(v)
        if m.enabled and not m.function_masked and not masked and address >> 20 == 0xFEE:
            out.add(v)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("table_w"), st.integers(-4, 72), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("table_r"), st.integers(-4, 72), st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("pba_r"), st.integers(-4, 12), st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("ctrl"), st.sampled_from([0, ENABLE, MASKALL, ENABLE | MASKALL]), st.just(0)),
    st.tuples(st.just("addr"), st.integers(0, 3), st.sampled_from([0xFEE00000, 0xFEE01000, 0xFED00000])),
    st.tuples(st.just("unmask"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("notify"), st.integers(-1, 4), st.just(0)),
), max_size=40))
def test_random_accesses_keep_irqfds_in_step(ops):
    vm = FakeVm()
    router = GsiRouter(vm)
    m = Msix(vm, router, 4, 0, 0x4000, 0, 0x5000)
    try:
        for op, a, b in ops:
            if op == "table_w":
                m.table_write(a, b)
            elif op == "table_r":
                assert len(m.table_read(a, b)) == b
            elif op == "pba_r":
                assert len(m.pba_read(a, b)) == b
            elif op == "ctrl":
                m.control_written(a)
            elif op == "addr":
                m.table_write(16 * a, struct.pack("<II", b, 0))
            elif op == "unmask":
                m.table_write(16 * a + 12, struct.pack("<I", int(b)))
            else:
                m.interrupt(a)
            live = live_vectors(m)
            assert vm.irqfds == {m.eventfds[v]: m.gsis[v] for v in live}
            routes = vm.msi_routes()
            for v in live:
                address, data, _ = m.entry(v)
                assert routes[m.gsis[v]] == (address, data)
            pba = int.from_bytes(m.pba_read(0, 8), "little")
            for v in range(4):
                assert bool(pba >> v & 1) == (v not in live and readable(m.eventfds[v]))
    finally:
        m.close()
    assert vm.irqfds == {}


# --- close -------------------------------------------------------------------------------------------
def test_close_frees_gsis_and_closes_fds(vm, router, msix):
    msix.control_written(ENABLE)
    for v in range(4):
        msix.table_write(v * 16, entry(0xFEE00000, 0x30 + v, masked=v == 3))
    fds, gsis = list(msix.eventfds), list(msix.gsis)
    assert len(vm.irqfds) == 3
    close(msix)
    assert vm.irqfds == {}                                 # deassigned before the fds went away
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert vm.routing == LEGACY                            # the MSI routes are gone
    assert router.allocate() == gsis[0] == FIRST_MSI_GSI   # and the GSIs free again


def test_close_tolerates_irqfd_errors(vm, router):
    m = Msix(vm, router, 2, 0, 0, 0, 0x100)
    m.control_written(ENABLE)
    m.table_write(0, entry(0xFEE00000, 1, masked=False))

    def broken(fd, gsi, deassign=False):
        raise OSError(9, "vm gone")
    vm.irqfd = broken
    m.close()
    assert router.allocate() == FIRST_MSI_GSI
