"""The virtio-fs DAX window (pyvmm.devices.virtio.dax_window): mapping files into one
host reservation, request validation, the mapping record, the BAR 2 memory slot.

Everything but the last test runs without KVM: the window is an ordinary host
mapping, checked through its bytes and /proc/self/maps.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import dax_window
from pyvmm.devices.virtio.dax_window import (DAX_RANGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE,
                                      VIRTIO_FS_SHMCAP_ID_CACHE, DaxMapping, DaxRequestError,
                                      DaxShm, DaxWindow)
from pyvmm.memory import MemorySlots

PAGE = 4096
SIZE = 2 << 20          # the smallest window: 512 pages
U64 = 1 << 64


# --- helpers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    ino: int
    path: str


def proc_maps() -> list[Vma]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append(Vma(lo, hi, fields[1], int(fields[2], 16), fields[3], int(fields[4]),
                           fields[5].strip() if len(fields) > 5 else ""))
    return out


def window_layout(w: DaxWindow) -> list[tuple]:
    """The window as /proc/self/maps shows it: merged (start, end, perms, dev, ino, file offset),
    window-relative.  Asserts the window is covered with no gap."""
    lo, hi = w.host_addr, w.host_addr + w.size
    vmas = [v for v in proc_maps() if v.start < hi and v.end > lo]
    assert vmas, "the window is not mapped at all"
    assert vmas[0].start == lo and vmas[-1].end == hi, "the window's ends are not mapped"
    for a, b in zip(vmas, vmas[1:]):
        assert a.end == b.start, f"gap inside the window at {a.end - lo:#x}"
    out: list[list] = []
    for v in vmas:
        file_backed = v.perms.endswith("s")
        item = [v.start - lo, v.end - lo, v.perms, v.dev if file_backed else None,
                v.ino if file_backed else None, v.offset if file_backed else None]
        out.append(item)
    return _merge(out)


def record_layout(w: DaxWindow, ident: dict[tuple[int, int], tuple[str, int]]) -> list[tuple]:
    """The window as DaxWindow's record says it is, in window_layout's terms."""
    hole = {PROT_NONE: "---p", PROT_READ: "r--p", PROT_READ | PROT_WRITE: "rw-p"}[w.hole_prot]
    out: list[list] = []
    pos = 0
    for m in w.mappings():
        if m.offset > pos:
            out.append([pos, m.offset, hole, None, None, None])
        dev, ino = ident[(m.dev, m.ino)]
        out.append([m.offset, m.end, "rw-s" if m.writable else "r--s", dev, ino, m.fd_offset])
        pos = m.end
    if pos < w.size:
        out.append([pos, w.size, hole, None, None, None])
    return _merge(out)


def _merge(items: list[list]) -> list[tuple]:
    merged: list[list] = []
    for it in items:
        if merged:
            p = merged[-1]
            same = p[2:5] == it[2:5] and p[1] == it[0]
            if same and (p[5] is None or p[5] + (p[1] - p[0]) == it[5]):
                p[1] = it[1]
                continue
        merged.append(list(it))
    return [tuple(x) for x in merged]


def snapshot(w: DaxWindow) -> tuple:
    return tuple(window_layout(w)), tuple(w.mappings())


@pytest.fixture
def window():
    w = DaxWindow(SIZE)
    yield w
    w.close()


@dataclass
class SharedFile:
    path: str
    fd: int          # O_RDWR
    ro_fd: int       # O_RDONLY
    data: bytes
    ident: tuple[str, int]
    key: tuple[int, int]


def make_file(path, pages: int, tag: int) -> SharedFile:
    data = b"".join(struct.pack("<HH", tag, i % 0x10000) * (PAGE // 4) for i in range(pages))
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    st_ = os.fstat(fd)
    return SharedFile(str(path), fd, ro, data, identity_in_maps(fd), (st_.st_dev, st_.st_ino))


def identity_in_maps(fd: int) -> tuple[str, int]:
    """Map one page of ``fd`` in a scratch window and read its dev/inode from /proc/self/maps."""
    with DaxWindow(SIZE) as w:
        w.map(0, PAGE, fd, 0, False)
        vma = next(v for v in proc_maps() if v.start == w.host_addr)
        return vma.dev, vma.ino


@pytest.fixture
def files(tmp_path):
    made = [make_file(tmp_path / f"f{i}", 64, 0xA0 + i) for i in range(2)]
    yield made
    for f in made:
        os.close(f.fd)
        os.close(f.ro_fd)


def idents(files) -> dict:
    return {f.key: f.ident for f in files}


# --- mapping and reading ------------------------------------------------------------------------
def test_window_is_one_aligned_reservation(window):
    assert window.size == SIZE and window.host_addr % DAX_RANGE_SIZE == 0
    assert window_layout(window) == [(0, SIZE, "r--p", None, None, None)]
    assert ctypes.string_at(window.host_addr + SIZE - 8, 8) == b"\0" * 8   # holes read zeros
    assert window.mappings() == []


@pytest.mark.parametrize("size", [0, 1, PAGE, 1 << 20, 3 << 20, (2 << 20) + PAGE, -(2 << 20),
                                  2.0 * (2 << 20), True, "2M", 1 << 64])
def test_window_size_must_be_a_power_of_two_of_2mib_or_more(size):
    with pytest.raises(ValueError):
        DaxWindow(size)


def test_window_hole_protection_choices():
    for prot, perms in ((PROT_NONE, "---p"), (PROT_READ | PROT_WRITE, "rw-p")):
        with DaxWindow(4 << 20, hole_prot=prot) as w:
            assert window_layout(w) == [(0, 4 << 20, perms, None, None, None)]
    with pytest.raises(ValueError):
        DaxWindow(SIZE, hole_prot=PROT_WRITE)


def test_map_shows_file_bytes(window, files):
    f = files[0]
    window.map(0, 3 * PAGE, f.ro_fd, 5 * PAGE, writable=False)
    assert ctypes.string_at(window.host_addr, 3 * PAGE) == f.data[5 * PAGE:8 * PAGE]
    assert ctypes.string_at(window.host_addr + 3 * PAGE, 16) == b"\0" * 16
    assert window.mappings() == [DaxMapping(0, 3 * PAGE, False, *f.key, 5 * PAGE)]
    assert window_layout(window) == record_layout(window, idents(files))


def test_writable_mapping_store_reaches_the_file(window, files):
    f = files[0]
    window.map(SIZE - 2 * PAGE, 2 * PAGE, f.fd, 0, writable=True)
    ctypes.memmove(window.host_addr + SIZE - PAGE + 100, b"written through the window", 26)
    window.sync(SIZE - 2 * PAGE, 2 * PAGE)
    with open(f.path, "rb") as g:
        g.seek(PAGE + 100)
        assert g.read(26) == b"written through the window"
    assert [v[2] for v in window_layout(window)] == ["r--p", "rw-s"]


def test_read_only_mapping_is_prot_read(window, files):
    window.map(PAGE, PAGE, files[0].fd, 0, writable=False)   # an O_RDWR fd mapped read-only
    layout = window_layout(window)
    assert layout[1][:3] == (PAGE, 2 * PAGE, "r--s")
    assert layout == record_layout(window, idents(files))


def test_exact_range_remap_upgrades_read_to_write(window, files):
    f = files[0]
    window.map(DAX_RANGE_SIZE // 2, 4 * PAGE, f.ro_fd, 8 * PAGE, writable=False)
    window.map(DAX_RANGE_SIZE // 2, 4 * PAGE, f.fd, 8 * PAGE, writable=True)
    assert window.mappings() == [DaxMapping(DAX_RANGE_SIZE // 2, 4 * PAGE, True, *f.key, 8 * PAGE)]
    assert [v[2] for v in window_layout(window)] == ["r--p", "rw-s", "r--p"]
    ctypes.memmove(window.host_addr + DAX_RANGE_SIZE // 2, b"upgraded", 8)
    window.sync(DAX_RANGE_SIZE // 2, PAGE)
    assert os.pread(f.ro_fd, 8, 8 * PAGE) == b"upgraded"


def test_unmap_restores_the_reservation(window, files):
    window.map(0, 8 * PAGE, files[0].fd, 0, writable=True)
    window.unmap(2 * PAGE, 4 * PAGE)
    assert ctypes.string_at(window.host_addr + 2 * PAGE, 8) == b"\0" * 8
    assert [v[:3] for v in window_layout(window)] == [
        (0, 2 * PAGE, "rw-s"), (2 * PAGE, 6 * PAGE, "r--p"), (6 * PAGE, 8 * PAGE, "rw-s"),
        (8 * PAGE, SIZE, "r--p")]
    window.unmap(0, SIZE)
    assert window.mappings() == []
    assert window_layout(window) == [(0, SIZE, "r--p", None, None, None)]
    window.unmap(0, PAGE)    # unmapping a hole is harmless


def test_unmap_all_and_close(files):
    w = DaxWindow(SIZE)
    w.map(0, PAGE, files[0].fd, 0, True)
    w.map(4 * PAGE, PAGE, files[1].fd, 0, False)
    w.unmap_all()
    assert w.mappings() == [] and window_layout(w) == [(0, SIZE, "r--p", None, None, None)]
    lo, hi = w.host_addr, w.host_addr + w.size
    w.close()
    w.close()
    assert w.closed
    assert not [v for v in proc_maps() if v.start < hi and v.end > lo]
    for call in (lambda: w.map(0, PAGE, files[0].fd, 0, False), lambda: w.unmap(0, PAGE),
                 lambda: w.sync(0, PAGE), lambda: w.resolve(0, 1)):
        with pytest.raises(DaxRequestError, match="closed"):
            call()


def test_failed_mmap_leaves_the_range_reserved(window, files):
    """A file that validates but cannot be mmap'ed (procfs: ENODEV): an OSError, and
    the range is a hole afterwards, never a gap."""
    window.map(0, 2 * PAGE, files[0].fd, 0, True)
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            window.map(0, PAGE, fd, 0, False)
        assert not isinstance(e.value, DaxRequestError) and e.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    assert [v[:3] for v in window_layout(window)][:2] == [(0, PAGE, "r--p"), (PAGE, 2 * PAGE, "rw-s")]
    assert window.mappings() == [DaxMapping(PAGE, PAGE, True, *files[0].key, PAGE)]


def test_the_last_check_before_mmap_holds_without_assert_statements(window):
    """The bounds check before every mmap(MAP_FIXED) is an explicit raise (python -O keeps it)."""
    for addr, length in ((window.host_addr - PAGE, PAGE), (window.host_addr + SIZE - PAGE, 2 * PAGE),
                         (window.host_addr + SIZE, PAGE), (window.host_addr, 0)):
        with pytest.raises(AssertionError, match="outside the DAX window"):
            window._assert_inside(addr, length)
    window._assert_inside(window.host_addr, SIZE)


# --- validation boundaries ------------------------------------------------------------------------
def test_range_boundaries_that_are_valid(window, files):
    fd = files[0].fd
    window.map(0, PAGE, fd, 0, False)                     # offset 0
    window.map(SIZE - PAGE, PAGE, fd, 63 * PAGE, False)   # the last page
    assert ctypes.string_at(window.host_addr + SIZE - PAGE, 4) == files[0].data[63 * PAGE:63 * PAGE + 4]
    window.map(0, SIZE, fd, 0, True)                      # the whole window (mostly past EOF)
    window.unmap(SIZE - PAGE, PAGE)
    window.sync(0, PAGE)
    window.map(0, PAGE, fd, (1 << 63) - 2 * PAGE, False)  # file offset at the off_t limit
    assert window_layout(window) == record_layout(window, idents(files))


BAD_RANGES = [
    (SIZE, PAGE, "past the window"),                    # one page past the end
    (SIZE - PAGE, 2 * PAGE, "past the window"),         # straddles the end
    (0, SIZE + PAGE, "past the window"),
    (U64 - PAGE, 2 * PAGE, "overflows 64 bits"),        # offset + length wraps a u64
    (PAGE, U64 - PAGE, "overflows 64 bits"),
    (U64, PAGE, "not a u64"),
    (0, U64, "not a u64"),
    (-PAGE, PAGE, "not a u64"),
    (0, -PAGE, "not a u64"),
    (0, 0, "zero"),
    (1, PAGE, "aligned"), (PAGE // 2, PAGE, "aligned"), (PAGE - 1, PAGE, "aligned"),
    (0, 1, "aligned"), (0, PAGE + 1, "aligned"), (0, PAGE - 1, "aligned"),
    (0.0, PAGE, "integers"), (None, PAGE, "integers"), (0, "4096", "integers"), (True, PAGE, "integers"),
]


@pytest.mark.parametrize("offset,length,reason", BAD_RANGES)
def test_bad_window_ranges_are_refused_and_change_nothing(window, files, offset, length, reason):
    window.map(PAGE, PAGE, files[0].fd, 0, True)
    before = snapshot(window)
    requests = [lambda: window.map(offset, length, files[0].fd, 0, False),
                lambda: window.unmap(offset, length),
                lambda: window.sync(offset, length)]
    if reason not in ("aligned",):
        requests.append(lambda: window.resolve(offset, length))
    for request in requests:
        with pytest.raises(DaxRequestError, match=reason) as e:
            request()
        assert "\n" not in str(e.value)
    assert snapshot(window) == before


@pytest.mark.parametrize("fd_offset,length,reason", [
    (1, PAGE, "aligned"), (PAGE // 2, PAGE, "aligned"), (PAGE + 8, PAGE, "aligned"),
    (-PAGE, PAGE, "not a u64"), (U64, PAGE, "not a u64"),
    (1 << 63, PAGE, "off_t"), ((1 << 63) - PAGE, PAGE, "off_t"), (U64 - PAGE, PAGE, "off_t"),
    (0.0, PAGE, "integer"), (None, PAGE, "integer"),
])
def test_bad_file_offsets_are_refused(window, files, fd_offset, length, reason):
    before = snapshot(window)
    with pytest.raises(DaxRequestError, match=reason):
        window.map(0, length, files[0].fd, fd_offset, True)
    assert snapshot(window) == before


def test_bad_file_descriptors_are_refused(window, files, tmp_path):
    before = snapshot(window)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    null = os.open("/dev/null", os.O_RDWR)
    opath = os.open(files[0].path, os.O_PATH)
    wronly = os.open(files[0].path, os.O_WRONLY)
    memfd = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, PAGE)
    import fcntl
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    closed = os.open(files[0].path, os.O_RDONLY)   # opened last, so nothing reuses its number
    os.close(closed)
    cases = [
        (closed, False, "not an open file descriptor"),
        (dir_fd, False, "a directory, not a regular file"),
        (r, False, "a pipe, not a regular file"),
        (w, False, "a pipe, not a regular file"),
        (sock.fileno(), False, "a socket, not a regular file"),
        (null, False, "a character device, not a regular file"),
        (opath, False, "O_PATH"),
        (wronly, False, "write-only"),
        (files[0].ro_fd, True, "read-only; a writable mapping needs O_RDWR"),
        (memfd, True, "sealed"),
        (-1, False, "not a file descriptor"),
        (1 << 40, False, "not an open file descriptor"),
        (None, False, "not a file descriptor"),
        (3.0, False, "not a file descriptor"),
    ]
    try:
        for fd, writable, reason in cases:
            with pytest.raises(DaxRequestError, match=reason):
                window.map(0, PAGE, fd, 0, writable)
        with pytest.raises(DaxRequestError, match="boolean"):
            window.map(0, PAGE, files[0].fd, 0, "yes")
        window.map(0, PAGE, memfd, 0, False)      # a sealed memfd maps read-only
        window.unmap(0, PAGE)
    finally:
        for fd in (dir_fd, r, w, null, opath, wronly, memfd):
            os.close(fd)
        sock.close()
    assert snapshot(window) == before


def test_sync_needs_a_mapping(window, files):
    with pytest.raises(DaxRequestError, match="not mapped"):
        window.sync(0, SIZE)
    window.map(4 * PAGE, PAGE, files[0].fd, 0, True)
    window.sync(0, SIZE)   # mapped parts are synced, holes skipped


# --- the record: splits, merges, resolve --------------------------------------------------------
def test_resolve_across_split_mappings(window, files):
    a, b = files
    window.map(0, 16 * PAGE, a.fd, 0, True)                 # A[0:16]
    window.map(4 * PAGE, 2 * PAGE, b.ro_fd, 10 * PAGE, False)  # B over the middle: A splits
    window.unmap(10 * PAGE, PAGE)                            # a hole in the right part
    assert window.mappings() == [
        DaxMapping(0, 4 * PAGE, True, *a.key, 0),
        DaxMapping(4 * PAGE, 2 * PAGE, False, *b.key, 10 * PAGE),
        DaxMapping(6 * PAGE, 4 * PAGE, True, *a.key, 6 * PAGE),
        DaxMapping(11 * PAGE, 5 * PAGE, True, *a.key, 11 * PAGE),
    ]
    segs = window.resolve(3 * PAGE + 100, 9 * PAGE)          # byte granular, ends mid-page 12
    assert [(s.offset, s.length, s.file_offset) for s in segs] == [
        (3 * PAGE + 100, PAGE - 100, 3 * PAGE + 100),
        (4 * PAGE, 2 * PAGE, 10 * PAGE),
        (6 * PAGE, 4 * PAGE, 6 * PAGE),
        (10 * PAGE, PAGE, None),
        (11 * PAGE, PAGE + 100, 11 * PAGE),
    ]
    assert [s.mapping and (s.mapping.dev, s.mapping.ino) for s in segs] == [a.key, b.key, a.key, None, a.key]
    # what resolve says is what the window shows
    for s in segs:
        got = ctypes.string_at(window.host_addr + s.offset, s.length)
        if s.mapping is None:
            assert got == b"\0" * s.length
        else:
            src = a if (s.mapping.dev, s.mapping.ino) == a.key else b
            assert got == src.data[s.file_offset:s.file_offset + s.length]
    assert window.resolve(SIZE - 1, 1) == [type(segs[0])(SIZE - 1, 1, None)]
    assert window_layout(window) == record_layout(window, idents(files))


def test_record_merges_contiguous_ranges_of_one_file(window, files):
    a = files[0]
    window.map(0, 2 * PAGE, a.fd, 0, True)
    window.map(2 * PAGE, 2 * PAGE, a.fd, 2 * PAGE, True)     # continues: one mapping
    window.map(4 * PAGE, PAGE, a.fd, 9 * PAGE, True)         # other file offset: separate
    window.map(5 * PAGE, PAGE, a.ro_fd, 10 * PAGE, False)    # other protection: separate
    assert [(m.offset, m.length) for m in window.mappings()] == [
        (0, 4 * PAGE), (4 * PAGE, PAGE), (5 * PAGE, PAGE)]
    window.map(PAGE, PAGE, a.fd, PAGE, True)                 # the same bytes again: still one
    assert window.mappings()[0] == DaxMapping(0, 4 * PAGE, True, *a.key, 0)
    assert window.overlapping(3 * PAGE, 2 * PAGE) == window.mappings()[:2]
    assert window_layout(window) == record_layout(window, idents(files))


# --- random request sequences ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_fds(tmp_path_factory):
    d = tmp_path_factory.mktemp("dax")
    fa = make_file(d / "a", 40, 0xF0)
    fb = make_file(d / "b", 8, 0xF1)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    closed = os.open(d / "a", os.O_RDONLY)
    os.close(closed)
    fds = {"a_rw": fa.fd, "a_ro": fa.ro_fd, "b_rw": fb.fd, "b_ro": fb.ro_fd,
           "dir": dir_fd, "pipe": r, "closed": closed}
    yield fds, {fa.key: fa.ident, fb.key: fb.ident}, {fa.ident, fb.ident}
    for fd in (fa.fd, fa.ro_fd, fb.fd, fb.ro_fd, dir_fd, r, w):
        os.close(fd)


NPAGES = SIZE // PAGE
valid_offsets = st.one_of(st.integers(0, 40), st.integers(NPAGES - 30, NPAGES - 1)).map(lambda p: p * PAGE)
offsets = st.one_of(
    valid_offsets, valid_offsets, valid_offsets, valid_offsets,
    st.integers(-2, NPAGES + 2).map(lambda p: p * PAGE),                   # around both ends
    st.integers(0, NPAGES).map(lambda p: p * PAGE + 1),                    # unaligned
    st.sampled_from([U64 - PAGE, U64, 1 << 63, -1, (1 << 63) - PAGE]),     # wire extremes
)
valid_lengths = st.integers(1, 24).map(lambda p: p * PAGE)
lengths = st.one_of(
    valid_lengths, valid_lengths, valid_lengths, valid_lengths,
    st.sampled_from([0, 1, PAGE - 1, SIZE, SIZE + PAGE, U64 - PAGE, U64, -PAGE]),
)
valid_fd_offsets = st.integers(0, 48).map(lambda p: p * PAGE)
fd_offsets = st.one_of(valid_fd_offsets, valid_fd_offsets, valid_fd_offsets,
                       st.sampled_from([1, -PAGE, (1 << 63) - PAGE, 1 << 63, U64]))
fd_names = st.one_of(st.sampled_from(["a_rw", "a_ro", "b_rw", "b_ro"]),
                     st.sampled_from(["a_rw", "b_rw", "dir", "pipe", "closed"]))
ops = st.one_of(
    st.tuples(st.just("map"), offsets, lengths, fd_names, fd_offsets, st.booleans()),
    st.tuples(st.just("map"), offsets, lengths, fd_names, fd_offsets, st.booleans()),
    st.tuples(st.just("unmap"), offsets, lengths),
    st.tuples(st.just("sync"), offsets, lengths),
    st.tuples(st.just("resolve"), offsets, lengths),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ops, min_size=1, max_size=25))
def test_random_requests_keep_the_window_consistent(fuzz_fds, requests):
    fds, ident, maps_idents = fuzz_fds
    keys = {name: (os.fstat(fd).st_dev, os.fstat(fd).st_ino) for name, fd in fds.items() if name != "closed"}
    model: dict[int, tuple] = {}   # page -> (dev, ino, file page, writable)
    with DaxWindow(SIZE) as w:
        for req in requests:
            kind, offset, length = req[:3]
            try:
                if kind == "map":
                    name, fd_offset, writable = req[3:]
                    w.map(offset, length, fds[name], fd_offset, writable)
                    dev, ino = keys[name]
                    for i in range(length // PAGE):
                        model[offset // PAGE + i] = (dev, ino, fd_offset // PAGE + i, writable)
                elif kind == "unmap":
                    w.unmap(offset, length)
                    for i in range(length // PAGE):
                        model.pop(offset // PAGE + i, None)
                elif kind == "sync":
                    w.sync(offset, length)
                else:
                    segs = w.resolve(offset, length)
                    assert sum(s.length for s in segs) == length and segs[0].offset == offset
            except DaxRequestError as e:
                assert str(e) and "\n" not in str(e)
            # the record says what the model says, page by page
            pages = {}
            for m in w.mappings():
                assert 0 <= m.offset < m.end <= SIZE
                for i in range(m.length // PAGE):
                    pages[m.offset // PAGE + i] = (m.dev, m.ino, m.fd_offset // PAGE + i, m.writable)
            assert pages == model
            # /proc/self/maps says what the record says; no test file is mapped outside the window
            assert window_layout(w) == record_layout(w, ident)
            lo, hi = w.host_addr, w.host_addr + SIZE
            outside = [v for v in proc_maps()
                       if (v.dev, v.ino) in maps_idents and not (lo <= v.start and v.end <= hi)]
            assert not outside


# --- DaxShm: the window as BAR 2 in a KVM memory slot ----------------------------------------------
class FakeSlots:
    def __init__(self, refuse: set[int] = frozenset()) -> None:
        self.calls: list[tuple] = []
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.refuse = set(refuse)
        self.next = 3

    def add(self, gpa: int, size: int, host_addr: int) -> int:
        self.calls.append(("add", gpa, size, host_addr))
        if gpa in self.refuse:
            raise ValueError(f"memory slot {gpa:#x} overlaps")
        slot, self.next = self.next, self.next + 1
        self.slots[slot] = (gpa, size, host_addr)
        return slot

    def remove(self, slot: int) -> None:
        self.calls.append(("remove", slot))
        del self.slots[slot]

    def move(self, slot: int, new_gpa: int) -> None:
        self.calls.append(("move", slot, new_gpa))
        if new_gpa in self.refuse:
            raise ValueError(f"memory slot {new_gpa:#x} overlaps")
        gpa, size, hva = self.slots[slot]
        self.slots[slot] = (new_gpa, size, hva)


def test_shm_slot_follows_the_bar(window):
    slots = FakeSlots()
    shm = DaxShm(window, slots)
    assert shm.shared_memory_regions() == [(VIRTIO_FS_SHMCAP_ID_CACHE, SIZE)] and shm.shm_is_memory()
    shm.shm_moved(None, 0x80000000)
    assert slots.slots == {3: (0x80000000, SIZE, window.host_addr)} and shm.gpa == 0x80000000
    assert shm.window_offset(0x80000000 + 0x1234, 16) == 0x1234
    assert shm.window_offset(0x80000000 + SIZE - 8, 16) is None
    shm.shm_moved(0x80000000, 0x4000000000)
    assert slots.slots == {3: (0x4000000000, SIZE, window.host_addr)}
    assert shm.window_offset(0x80000000, 1) is None and shm.window_offset(0x4000000000, 1) == 0
    shm.shm_moved(0x4000000000, None)
    assert slots.slots == {} and shm.slot is None and shm.window_offset(0x4000000000, 1) is None
    shm.shm_moved(None, None)
    assert slots.calls == [("add", 0x80000000, SIZE, window.host_addr), ("move", 3, 0x4000000000),
                           ("remove", 3)]


def test_shm_refused_addresses_never_raise(window):
    slots = FakeSlots(refuse={0xC0000000})
    shm = DaxShm(window, slots)
    shm.shm_moved(None, 0xC0000000)            # refused add: not visible, no exception
    assert shm.slot is None and slots.slots == {}
    shm.shm_moved(None, 0xA0000000)
    shm.shm_moved(0xA0000000, 0xC0000000)      # refused move: the slot goes, no exception
    assert shm.slot is None and shm.gpa is None and slots.slots == {}
    shm.shm_moved(None, 0x1001)                # not page aligned
    shm.shm_moved(None, U64 - PAGE)            # the window would wrap
    assert slots.slots == {}
    shm.shm_moved(None, 0xE0000000)
    assert shm.gpa == 0xE0000000


def test_shm_with_memory_slots(window):
    """The real MemorySlots bookkeeping over a recording stand-in for the KVM VM."""
    class Vm:
        def __init__(self):
            self.regions = []

        def set_user_memory_region(self, slot, gpa, size, hva, flags=0):
            self.regions.append((slot, gpa, size, hva))

    vm = Vm()
    slots = MemorySlots(vm, 8)
    slots.add(0, 1 << 30, 0x10000000)                            # guest RAM in slot 0
    shm = DaxShm(window, slots)
    shm.shm_moved(None, 1 << 32)
    shm.shm_moved(1 << 32, 2 << 32)
    assert slots.get(shm.slot) == (2 << 32, SIZE, window.host_addr, 0)
    shm.shm_moved(2 << 32, 0x20000000)                          # over guest RAM: refused
    assert shm.slot is None
    assert vm.regions[-1][2] == 0                                # the window's slot is deleted
    assert slots.get(0)[0] == 0                                  # RAM untouched
    shm.shm_moved(None, 3 << 32)
    slot = shm.slot
    shm.close()
    assert vm.regions[-1] == (slot, 3 << 32, 0, window.host_addr) and window.closed
    shm.shm_moved(None, 3 << 32)                                 # after close: ignored
    assert shm.slot is None


def test_shm_reset_and_close_order(files):
    events = []

    class Slots(FakeSlots):
        def remove(self, slot):
            events.append(("remove", w.closed))
            super().remove(slot)

    w = DaxWindow(SIZE)
    shm = DaxShm(w, Slots())
    shm.shm_moved(None, 0xC0000000)
    w.map(0, PAGE, files[0].fd, 0, True)
    shm.reset()
    assert w.mappings() == [] and shm.slot is not None
    shm.close()
    assert events == [("remove", False)] and w.closed


# --- a guest sees the window (KVM) ---------------------------------------------------------------
@pytest.mark.kvm
def test_guest_user_mode_reads_and_writes_through_the_window(kvm_host, files):
    """A tiny guest in user mode (native on PVM: its faults go through KVM's MMU) reads a
    read-only file range, a hole, stores into a writable range; the VMM then remaps ranges
    and moves BAR 2 mid-run, and the guest sees the new layout at the new address."""
    from tinyguest import ENTER_USER_MODE, Recorder, TinyVm, assemble

    win_a, win_b, report = 0xC0000000, 0xC0400000, 0xD0000000
    a, b = files
    code = assemble(f""".org 0{ENTER_USER_MODE}
    user:
        mov ${report:#x}, %ecx
        mov ${win_a:#x}, %ebx
        mov (%rbx), %eax             # 1: file A page 3 (read-only range)
        mov %eax, (%rcx)
        mov 0x2000(%rbx), %eax       # 2: a hole
        mov %eax, (%rcx)
        movl $0x11223344, 0x1000(%rbx)   # store into file B page 0 (writable range)
        mov 0x10(%rcx), %eax         # the VMM remaps and moves the BAR here
        mov ${win_b:#x}, %ebx
        mov (%rbx), %eax             # 3: file B page 5, newly mapped over offset 0
        mov %eax, (%rcx)
        mov 0x2000(%rbx), %eax       # 4: file A page 7, newly mapped over the hole
        mov %eax, (%rcx)
        mov 0x1000(%rbx), %eax       # 5: the guest's own store
        mov %eax, (%rcx)
        mov ${win_a:#x}, %ebx
        mov (%rbx), %eax             # 6: the old BAR address: nothing there any more
        mov %eax, (%rcx)
        movl $0, 8(%rcx)             # done
    1:  jmp 1b
    """)
    vm = TinyVm(code)
    window = DaxWindow(SIZE)
    shm = DaxShm(window, vm.slots)
    try:
        vm.allow_user_mode()

        shm.shm_moved(None, win_a)      # BAR 2 starts decoding: the slot goes in first,
        window.map(0, PAGE, a.ro_fd, 3 * PAGE, False)   # then files are mapped under it
        window.map(PAGE, PAGE, b.fd, 0, True)

        def remap(offset, size):
            window.map(0, PAGE, b.ro_fd, 5 * PAGE, False)
            window.map(2 * PAGE, PAGE, a.fd, 7 * PAGE, False)
            shm.shm_moved(win_a, win_b)

        class Done:
            def read(self, offset, size):
                return b"\0" * size

            def write(self, offset, data):
                vm._exit(0, "done")

        out, ctl = Recorder(), Recorder()
        ctl.on_read = remap
        vm.mmio.register(report, 4, out)
        vm.mmio.register(report + 8, 4, Done())
        vm.mmio.register(report + 0x10, 4, ctl)
        status = vm.run()
        assert (status, vm.reason) == (0, "done")
        page = lambda f, n: f.data[n * PAGE:n * PAGE + 4]
        assert [w for _, w in out.writes] == [
            page(a, 3), b"\0" * 4, page(b, 5), page(a, 7), struct.pack("<I", 0x11223344), b"\xff" * 4]
        window.sync(PAGE, PAGE)
        assert os.pread(b.ro_fd, 4, 0) == struct.pack("<I", 0x11223344)
        print(f"KVM flavour: {kvm_host}")
    finally:
        shm.close()
        vm.close()


# --- FS_IO: file <-> window copies ----------------------------------------------------------------
def test_file_io_both_ways(window, files, tmp_path):
    src, dst = files
    window.map(0, 4 * PAGE, dst.fd, 0, True)          # the guest's buffer: a writable mapping
    assert window.file_io(100, 3000, src.ro_fd, PAGE, to_file=False) == 3000
    assert os.pread(dst.fd, 3000, 100) == src.data[PAGE:PAGE + 3000]
    out = tmp_path / "out"
    out.write_bytes(b"")
    ofd = os.open(out, os.O_WRONLY)
    try:   # more than one bounce chunk would be needed for a larger range; one is enough here
        assert window.file_io(PAGE, 2 * PAGE, ofd, 10, to_file=True) == 2 * PAGE
    finally:
        os.close(ofd)
    assert out.read_bytes()[10:] == dst.data[PAGE:3 * PAGE]


def test_file_io_holes_and_end_of_file(window, files, tmp_path):
    src, _ = files
    out = tmp_path / "out"
    out.write_bytes(b"")
    ofd = os.open(out, os.O_WRONLY)
    try:
        assert window.file_io(8 * PAGE, PAGE, ofd, 0, to_file=True) == PAGE   # a hole reads zeros
        assert out.read_bytes() == bytes(PAGE)
    finally:
        os.close(ofd)
    with pytest.raises(OSError) as e:                  # a hole cannot be written: EFAULT, no crash
        window.file_io(8 * PAGE, PAGE, src.ro_fd, 0, to_file=False)
    assert e.value.errno == errno.EFAULT
    # a mapping longer than its file: the copy stops at the last page the file backs
    short = tmp_path / "short"
    short.write_bytes(b"s" * PAGE)
    sfd = os.open(short, os.O_RDWR)
    try:
        window.map(0, 4 * PAGE, sfd, 0, True)
        assert window.file_io(0, 4 * PAGE, src.ro_fd, 0, to_file=False) == PAGE
        with pytest.raises(OSError) as e:   # a mapped page past end of file: EFAULT, no SIGBUS
            window.file_io(PAGE, PAGE, sfd, 0, to_file=True)
        assert e.value.errno == errno.EFAULT
    finally:
        os.close(sfd)
    assert window.file_io(0, 10, src.ro_fd, len(src.data), to_file=False) == 0   # file EOF


def test_file_io_refuses_bad_files_and_ranges(window, files, tmp_path):
    src, _ = files
    r, w = os.pipe()
    path_fd = os.open(src.path, os.O_PATH)
    dir_fd = os.open(tmp_path, os.O_RDONLY)
    wo_fd = os.open(src.path, os.O_WRONLY)
    try:
        for fd, to_file in [(r, False), (w, True), (path_fd, False), (dir_fd, False),
                            (wo_fd, False), (src.ro_fd, True), (-1, False), (99999, False),
                            (1 << 40, False)]:
            with pytest.raises(DaxRequestError):
                window.file_io(0, PAGE, fd, 0, to_file)
        for offset, length in [(SIZE, 1), (SIZE - 1, 2), (0, 0), (-1, 1), (0, 1 << 64)]:
            with pytest.raises(DaxRequestError):
                window.file_io(offset, length, src.ro_fd, 0, False)
        with pytest.raises(DaxRequestError):
            window.file_io(0, PAGE, src.ro_fd, (1 << 63) - 1, False)
    finally:
        for fd in (r, w, path_fd, dir_fd, wo_fd):
            os.close(fd)


# --- prefaulting new mappings (MADV_POPULATE_READ) ----------------------------------------------------
class MadviseRecorder:
    """Stands in for libc's madvise: records MADV_POPULATE_READ calls, lets the rest
    through, and fails the populate advice with ``fail`` (an errno) when set."""

    def __init__(self, real, fail: int = 0) -> None:
        self.real = real
        self.fail = fail
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, addr: int, length: int, advice: int) -> int:
        if advice != dax_window.MADV_POPULATE_READ:
            return self.real(addr, length, advice)
        self.calls.append((addr, length, advice))
        if self.fail:
            ctypes.set_errno(self.fail)
            return -1
        return self.real(addr, length, advice)


@pytest.fixture
def madvise(monkeypatch):
    rec = MadviseRecorder(dax_window._madvise)
    monkeypatch.setattr(dax_window, "_madvise", rec)
    return rec


@pytest.fixture
def prefaulting():
    w = DaxWindow(SIZE, prefault=True)
    yield w
    w.close()


def resident_kib(addr: int) -> int:
    """Rss of the VMA that starts at ``addr`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split(maxsplit=1)[0]:
                inside = int(line.split("-", 1)[0], 16) == addr
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"no VMA at {addr:#x}")


def test_prefault_populates_exactly_the_mapped_range(prefaulting, files, madvise):
    """With prefault, map fills the host page tables of the range it mapped before it
    returns: MADV_POPULATE_READ, for writable mappings too (MADV_POPULATE_WRITE
    would dirty every page and allocate blocks in a sparse file)."""
    w = prefaulting
    w.map(4 * PAGE, 8 * PAGE, files[0].ro_fd, 0, False)
    w.map(16 * PAGE, 4 * PAGE, files[1].fd, 8 * PAGE, True)
    assert madvise.calls == [(w.host_addr + 4 * PAGE, 8 * PAGE, dax_window.MADV_POPULATE_READ),
                             (w.host_addr + 16 * PAGE, 4 * PAGE, dax_window.MADV_POPULATE_READ)]
    assert resident_kib(w.host_addr + 4 * PAGE) == 8 * PAGE // 1024
    st_before = os.fstat(files[1].fd)
    ctypes.memmove(w.host_addr + 16 * PAGE, b"\xee", 1)          # still writable
    assert os.pread(files[1].fd, 1, 8 * PAGE) == b"\xee"
    assert os.fstat(files[1].fd).st_size == st_before.st_size


def test_no_prefault_by_default_and_never_outside_a_mapping(window, files, madvise):
    """Without prefault map does not populate; populate() of anything but a range
    inside one current mapping (a hole, a range past the window or sticking out of
    a mapping, a closed window) does nothing."""
    window.map(0, 4 * PAGE, files[0].ro_fd, 0, False)
    assert madvise.calls == [] and resident_kib(window.host_addr) == 0
    for offset, length in ((4 * PAGE, PAGE), (2 * PAGE, 4 * PAGE), (SIZE - PAGE, 2 * PAGE),
                           (SIZE, PAGE), (0, 0), (-PAGE, PAGE), (PAGE, 1), (U64 - PAGE, PAGE)):
        assert not window.populate(offset, length)
    assert madvise.calls == []
    assert window.populate(PAGE, 2 * PAGE)
    assert madvise.calls == [(window.host_addr + PAGE, 2 * PAGE, dax_window.MADV_POPULATE_READ)]
    window.unmap(0, 4 * PAGE)
    assert not window.populate(PAGE, 2 * PAGE)     # unmapped meanwhile: a hole now
    window.close()
    assert not window.populate(0, PAGE)
    assert len(madvise.calls) == 1


def test_prefault_einval_falls_back_once(prefaulting, files, madvise, caplog):
    """A kernel before 5.14 refuses the advice with EINVAL: the mapping stands, one
    message says so, and later mappings do not try again."""
    w = prefaulting
    madvise.fail = errno.EINVAL
    with caplog.at_level("INFO", logger=dax_window.__name__):
        w.map(0, 4 * PAGE, files[0].ro_fd, 0, False)
        w.map(8 * PAGE, 4 * PAGE, files[0].ro_fd, 0, False)
        assert not w.populate(0, 4 * PAGE)
    assert len(madvise.calls) == 1
    assert len([r for r in caplog.records if "not supported" in r.message]) == 1
    assert w.mappings() == [DaxMapping(0, 4 * PAGE, False, *files[0].key, 0),
                            DaxMapping(8 * PAGE, 4 * PAGE, False, *files[0].key, 0)]
    assert bytes((ctypes.c_char * 4).from_address(w.host_addr)) == files[0].data[:4]


def test_prefault_other_errors_keep_the_mapping(prefaulting, files, madvise):
    """Any other failure (EFAULT: pages past the end of the file) is ignored for that
    range only: the mapping stands and the next one is populated again."""
    w = prefaulting
    madvise.fail = errno.EFAULT
    w.map(0, 4 * PAGE, files[0].ro_fd, 0, False)
    madvise.fail = 0
    w.map(4 * PAGE, 4 * PAGE, files[0].ro_fd, 0, False)
    assert [c[0] - w.host_addr for c in madvise.calls] == [0, 4 * PAGE]
    assert len(w.mappings()) == 2 and resident_kib(w.host_addr + 4 * PAGE) > 0
