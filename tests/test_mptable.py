"""MP tables, read back the way Linux's mpparse.c finds and walks them."""

import struct

import pytest

from pyvmm.boot.mptable import MAX_CPUS, build_mptable, write_mptable

EBDA = 0x9FC00
BASE_MEMORY_END = 0xA0000
ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


class FakeMemory:
    """Guest RAM below 1 MiB, bounds-checked."""

    def __init__(self, size: int = 0x100000) -> None:
        self.size = size
        self.buf = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= self.size, f"write outside RAM at {gpa:#x}"
        self.buf[gpa:gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        assert 0 <= gpa and gpa + size <= self.size
        return bytes(self.buf[gpa:gpa + size])


def find_mpf(mem: FakeMemory) -> int:
    """smp_scan_config(): 16-byte steps, signature, length 1, checksum."""
    for addr in range(EBDA, BASE_MEMORY_END, 16):
        mpf = mem.read(addr, 16)
        if mpf[:4] == b"_MP_" and mpf[8] == 1 and sum(mpf) % 256 == 0:
            return addr
    raise AssertionError("no MP floating pointer in the EBDA")


def parse(mem: FakeMemory) -> dict:
    mpf_addr = find_mpf(mem)
    mpf = mem.read(mpf_addr, 16)
    physptr, length, spec, _, feature1 = struct.unpack_from("<IBBBB", mpf, 4)
    assert spec == 4 and feature1 == 0
    header = mem.read(physptr, 44)
    assert header[:4] == b"PCMP"
    table_len, spec = struct.unpack_from("<HB", header, 4)
    table = mem.read(physptr, table_len)
    assert sum(table) % 256 == 0, "configuration table checksum"
    oemcount, lapic = struct.unpack_from("<HI", header, 34)
    entries = []
    offset = 44
    while offset < table_len:           # smp_read_mpc walks by length
        kind = table[offset]
        size = ENTRY_SIZES[kind]
        entries.append(table[offset:offset + size])
        offset += size
    assert offset == table_len
    return dict(mpf_addr=mpf_addr, physptr=physptr, spec=spec, oem=header[8:16],
                oemcount=oemcount, lapic=lapic, entries=entries,
                end=physptr + table_len)


def of_type(entries, kind):
    return [e for e in entries if e[0] == kind]


@pytest.mark.parametrize("num_cpus", [1, 2, 8])
def test_tables_parse_back(num_cpus):
    mem = FakeMemory()
    write_mptable(mem, num_cpus)
    mp = parse(mem)
    assert mp["mpf_addr"] == EBDA
    assert mp["spec"] == 4
    assert mp["oem"] == b"PYVMM   "
    assert mp["lapic"] == 0xFEE00000
    assert mp["oemcount"] == len(mp["entries"])
    assert mp["end"] <= BASE_MEMORY_END

    cpus = of_type(mp["entries"], 0)
    assert len(cpus) == num_cpus
    for index, cpu in enumerate(cpus):
        _, apicid, apicver, flags, signature, features = struct.unpack_from("<BBBBII", cpu)
        assert apicid == index and apicver == 0x14
        assert flags & 1, "enabled"
        assert bool(flags & 2) == (index == 0), "BSP flag only on CPU 0"
        assert signature == 0x600 and features == 0x201

    buses = {e[1]: e[2:8] for e in of_type(mp["entries"], 1)}
    assert buses == {0: b"PCI   ", 1: b"ISA   "}

    (ioapic,) = of_type(mp["entries"], 2)
    _, ioapic_id, version, flags, address = struct.unpack("<BBBBI", ioapic)
    assert (ioapic_id, version, flags, address) == (num_cpus, 0x11, 1, 0xFEC00000)


def io_routes(entries) -> dict[int, int]:
    routes = {}
    for e in of_type(entries, 3):
        _, irqtype, irqflag, srcbus, srcbusirq, dstapic, dstirq = struct.unpack("<BBHBBBB", e)
        assert irqtype == 0 and irqflag == 0          # INT, conforming
        assert srcbus == 1 and dstapic == 2           # ISA -> the I/O APIC (id 2)
        assert srcbusirq not in routes
        routes[srcbusirq] = dstirq
    return routes


def test_isa_interrupts_follow_kvm_default_routing():
    """KVM_CREATE_IRQCHIP routes GSI n to I/O APIC pin n, the PIT included."""
    mem = FakeMemory()
    write_mptable(mem, 2)
    entries = parse(mem)["entries"]
    assert io_routes(entries) == {irq: irq for irq in range(16)}

    lints = {e[7]: e[1] for e in of_type(entries, 4)}
    assert lints == {0: 3, 1: 1}                   # LINT0 ExtINT, LINT1 NMI
    assert all(e[6] == 0xFF for e in of_type(entries, 4))


def test_pc_style_timer_on_pin_2():
    mem = FakeMemory()
    write_mptable(mem, 2, irq0_pin=2)
    routes = io_routes(parse(mem)["entries"])
    assert routes[0] == 2
    assert 2 not in routes                         # the cascade IRQ lost its pin
    assert all(routes[irq] == irq for irq in range(1, 16) if irq != 2)


def test_bad_irq0_pin_rejected():
    with pytest.raises(ValueError, match="pin"):
        build_mptable(1, irq0_pin=16)


def test_floating_pointer_checksum_and_pointer():
    data = build_mptable(4)
    assert data[:4] == b"_MP_" and sum(data[:16]) % 256 == 0
    physptr = struct.unpack_from("<I", data, 4)[0]
    assert physptr == EBDA + 16
    length = struct.unpack_from("<H", data, 16 + 4)[0]
    assert len(data) == 16 + length
    assert sum(data[16:]) % 256 == 0


def test_apic_version_is_used():
    mem = FakeMemory()
    write_mptable(mem, 1, apic_version=0x15)
    (cpu,) = of_type(parse(mem)["entries"], 0)
    assert cpu[2] == 0x15


@pytest.mark.parametrize("num_cpus", [0, -1, MAX_CPUS + 1, 255])
def test_bad_cpu_counts_rejected(num_cpus):
    with pytest.raises(ValueError, match="number of CPUs"):
        write_mptable(FakeMemory(), num_cpus)


def test_max_cpus_fits_in_the_ebda():
    assert EBDA + len(build_mptable(MAX_CPUS)) <= BASE_MEMORY_END
