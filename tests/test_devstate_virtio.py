"""Snapshot state of the virtio layer: split virtqueues, the PCI transport with
quiesce/resume and re-activation, and the device models (rng, console, blk, fs)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import pci as vp
from pyvmm.devices.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from pyvmm.devices.virtio.console import BACKLOG_SAVE_MAX, VirtioConsole
from pyvmm.devices.virtio.device import VIRTIO_CONFIG_S_DRIVER_OK
from pyvmm.devices.virtio.fs import VirtioFs
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.irq import GsiRouter
from pyvmm.memory import GuestMemory
from pyvmm.snapshot.fields import SaveRefused
from pyvmm.virtiofsd.vhost import VhostUserFsBackend
from state_fakes import mutated, through_json
from test_msix import FakeVm, readable
from test_virtiofsd_vhost import EchoServer
from test_virtqueue import DATA, Driver
from virtio_guest import PciGuest, copy_ram

QRAM = 4 << 20


@pytest.fixture(scope="module")
def qmem():
    m = GuestMemory(QRAM)
    yield m
    m.close()


# --- Virtqueue -------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", [0, 0xFFFE])       # and across the 16-bit wrap
@pytest.mark.parametrize("event_idx", [False, True])
def test_virtqueue_restored_mid_ring_pops_the_next_chain(qmem, start, event_idx):
    d = Driver(qmem, size=8, event_idx=event_idx, start_idx=start)
    d.mem.write(d.used + 2, struct.pack("<H", start))
    d.q.resume_from_ring()
    heads = [d.add(out=[(DATA + 64 * i, 16)], in_=[(DATA + 0x1000 + 64 * i, 32)]) for i in range(3)]
    d.set_used_event(start)                          # the driver wants an interrupt at the first
    for _ in range(2):
        chain = d.q.pop()
        d.q.push(chain.head, 7)
    assert d.q.should_interrupt()
    state = through_json(d.q.save_state())
    assert (state["last_avail_idx"], state["used_idx"]) == ((start + 2) & 0xFFFF,) * 2

    q = Virtqueue(qmem, 256)
    q.restore_state(state)
    assert q.save_state() == state
    chain = q.pop()
    assert chain.head == heads[2] and chain.readable[0].gpa == DATA + 128
    assert q.pop() is None
    q.push(chain.head, 9)
    assert d.used_idx() == (start + 3) & 0xFFFF
    assert d.used_elem((start + 2) % 8) == (heads[2], 9)
    assert q.should_interrupt() == (not event_idx)      # used_event passed long ago with EVENT_IDX


def test_virtqueue_notification_bookkeeping_survives(qmem):
    d = Driver(qmem, size=8, event_idx=True)
    d.add(out=[(DATA, 16)])
    d.set_used_event(0)
    d.q.push(d.q.pop().head, 0)                      # pushed, should_interrupt not asked yet
    d.q.set_kicks_enabled(False)
    state = through_json(d.q.save_state())
    assert state["pushed_since_check"] == 1 and state["kicks_enabled"] is False
    q = Virtqueue(qmem, 256)
    q.restore_state(state)
    assert q.should_interrupt()                         # the interrupt owed before the snapshot


@pytest.mark.parametrize("field, value, message", [
    ("size", 0, r"q\.size: 0 is not in 1\.\.256"),
    ("size", 512, r"q\.size: 512 is not in 1\.\.256"),
    ("desc_addr", hex(QRAM), r"q: descriptor table at 0x400000\+0x80 is not in guest RAM"),
    ("driver_addr", "0x20001", r"q: available ring at 0x20001 is not 2-byte aligned"),
    ("desc_addr", "0x10000000000000000", r"q\.desc_addr: .* does not fit"),
    ("last_avail_idx", 20, r"q: 19 chains popped and not used, queue size 8"),
    ("pushed_since_check", 5, r"q\.pushed_since_check: 5 pushes do not lead"),
    ("msix_vector", 0x10000, r"q\.msix_vector: 65536 is not in"),
    ("ready", "true", r"q\.ready: expected true or false"),
])
def test_virtqueue_refuses(qmem, field, value, message):
    d = Driver(qmem, size=8)
    d.add(out=[(DATA, 16)])
    d.q.push(d.q.pop().head, 0)
    state = through_json(d.q.save_state())
    state[field] = value
    q = Virtqueue(qmem, 256)
    with pytest.raises(ValueError, match=message):
        q.restore_state(state, "q")
    assert q.save_state() == Virtqueue(qmem, 256).save_state()


def test_virtqueue_not_ready_has_no_ring_position(qmem):
    state = through_json(Virtqueue(qmem, 256).save_state())
    state["used_idx"] = state["last_avail_idx"] = 3
    with pytest.raises(ValueError, match="not ready"):
        Virtqueue(qmem, 256).restore_state(state)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_virtqueue_damaged_state_only_value_errors(qmem, data):
    d = Driver(qmem, size=8, event_idx=True)
    d.add(out=[(DATA, 16)])
    d.q.push(d.q.pop().head, 0)
    q = Virtqueue(qmem, 256)
    try:
        q.restore_state(mutated(data.draw, through_json(d.q.save_state())))
    except ValueError:
        return
    try:                                             # an accepted state is usable
        while q.pop() is not None:
            pass
    except Exception as e:
        assert type(e).__name__ in ("VirtqueueError", "ChainError")


# --- the transport, with virtio-rng ------------------------------------------------------------------
def rng_request(g: PciGuest, n: int = 32) -> int:
    head, gpa = g.post(0, in_len=n)
    return head


def test_transport_round_trip_reactivates_and_serves():
    a = PciGuest(VirtioRng())
    features = a.init_driver([0])
    rng_request(a)
    a.wait_used(0, 1)
    a.wait_call(0)
    with pytest.raises(SaveRefused, match="quiesce"):
        a.pci.save_state()
    a.pci.quiesce()
    state = through_json(a.root.save_state())
    dev_state = state["slots"][1]["state"]
    assert dev_state["active"] is True and dev_state["queues"][0]["used_idx"] == 1
    assert dev_state["driver_features"] == hex(features)

    b = PciGuest(VirtioRng(), mem=copy_ram(a.mem))
    b.root.restore_state(state)
    assert b.root.save_state() == state              # restored, quiesced: the same picture
    assert b.pci.status & VIRTIO_CONFIG_S_DRIVER_OK and b.pci.driver_features == features
    assert b.pci._worker is None                     # nothing runs before resume()
    bar0 = b.root.bar_address(b.slot, 0)
    assert bar0 == a.root.bar_address(a.slot, 0)
    assert b.vm.ioeventfds == {bar0 + vp.NOTIFY_OFFSET: b.pci.kicks[0].eventfd}
    msix = b.pci.msix
    assert b.vm.irqfds == {msix.eventfds[v]: msix.gsis[v] for v in range(2)}
    assert b.vm.msi_routes() == {msix.gsis[v]: (0xFEE00000, 0x40 + v) for v in range(2)}

    b.adopt(a.driver_snapshot())
    head = rng_request(b)                            # a kick before resume waits
    b.root.resume()
    b.wait_used(0, 2)
    b.wait_call(0)
    assert b.rings[0].used_elem(1) == (head, 32)
    a.close()
    b.close()


def test_quiesce_and_resume_for_snapshot_and_continue():
    g = PciGuest(VirtioRng())
    g.init_driver([0])
    g.pci.quiesce()
    g.pci.quiesce()                                  # idempotent
    rng_request(g)
    assert not readable(g.call_fd(0)) and g.rings[0].used_idx() == 0
    state = g.root.save_state()
    g.pci.resume()
    g.wait_used(0, 1)
    g.wait_call(0)
    assert state["slots"][1]["state"]["queues"][0]["used_idx"] == 0
    g.pci.resume()                                   # idempotent
    g.close()


class SlowRng(VirtioRng):
    """Its first request blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def _fill(self, chain) -> int:
        self.entered.set()
        assert self.release.wait(5)
        return super()._fill(chain)


def test_quiesce_stops_after_the_chain_in_progress():
    g = PciGuest(SlowRng())
    g.init_driver([0])
    d = g.rings[0]
    for _ in range(3):
        d.add(in_=[g.buffer(16)])
    g.kick(0)
    assert g.model.entered.wait(5)                   # the worker is inside chain 1
    quiescing = threading.Thread(target=g.pci.quiesce)
    quiescing.start()
    deadline = time.monotonic() + 5
    while not g.pci._stop_requested():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    g.model.release.set()
    quiescing.join(5)
    assert not quiescing.is_alive() and g.pci.quiesced
    assert d.used_idx() == 1                         # chain 1 finished, 2 and 3 wait
    state = g.pci.save_state()
    assert (state["queues"][0]["last_avail_idx"], state["queues"][0]["used_idx"]) == (1, 1)
    g.pci.resume()
    g.wait_used(0, 3)
    g.close()


def test_restore_of_an_inactive_device_starts_nothing():
    a = PciGuest(VirtioRng())
    a.pci.quiesce()
    state = through_json(a.root.save_state())
    b = PciGuest(VirtioRng())
    b.root.restore_state(state)
    b.root.resume()
    assert b.pci._worker is None and b.pci.status == 0
    a.close()
    b.close()


def test_restore_keeps_broken_queues_and_pending_config_interrupt():
    a = PciGuest(VirtioRng())
    a.init_driver([0])
    a.rings[0].set_avail_idx(100)                    # more than the queue size: broken ring
    a.kick(0)
    assert readable_soon(a.pci.msix.eventfds[0])     # the config interrupt (NEEDS_RESET)
    a.pci.quiesce()
    state = through_json(a.root.save_state())
    s = state["slots"][1]["state"]
    assert s["broken_queues"] == [0] and int(s["status"], 16) & 64 and int(s["isr"], 16) == 2
    b = PciGuest(VirtioRng(), mem=copy_ram(a.mem))
    b.root.restore_state(state)
    assert b.pci.device.broken_queues == {0}
    assert b.root.save_state() == state
    a.close()
    b.close()


def readable_soon(fd: int) -> bool:
    import select
    r, _, _ = select.select([fd], [], [], 5)
    return bool(r)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("driver_features", hex(1 << 40)), r"driver_features: 0x10000000000 has features "
                                                               r"this device does not offer \(0x10000000000\)"),
    (lambda s: s.__setitem__("config_msix_vector", 2), r"config_msix_vector: vector 2, this device has 2"),
    (lambda s: s["queues"][0].__setitem__("msix_vector", 5), r"queues\[0\]\.msix_vector: vector 5"),
    (lambda s: s["queues"].append(s["queues"][0]), r"queues: expected a list of at most 1"),
    (lambda s: s.__setitem__("status", "0x3"), r"active: an activated device has DRIVER_OK"),
    (lambda s: s["msix"].__setitem__("enabled", False), r"msix: enabled/function_masked do not match"),
    (lambda s: s.__setitem__("device", {"x": 1}), r"\.device: unknown x"),
    (lambda s: s.__setitem__("isr", "0x4"), r"\.isr: bits 0x4"),
])
def test_transport_refuses(edit, message):
    a = PciGuest(VirtioRng())
    a.init_driver([0])
    a.pci.quiesce()
    state = through_json(a.pci.save_state())
    edit(state)
    b = PciGuest(VirtioRng())
    calls = list(b.vm.calls)
    with pytest.raises(ValueError, match=message):
        b.pci.restore_state(state)
    assert b.vm.calls == calls and not b.pci.quiesced
    a.close()
    b.close()


@pytest.fixture(scope="module")
def saved_rng():
    a = PciGuest(VirtioRng())
    a.init_driver([0])
    rng_request(a)
    a.wait_used(0, 1)
    a.pci.quiesce()
    state = through_json(a.pci.save_state())
    yield a.mem, state
    a.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_transport_damaged_state_only_value_errors(saved_rng, data):
    mem, state = saved_rng
    vm = FakeVm()
    pci = vp.VirtioPciDevice(VirtioRng(), mem, vm, GsiRouter(vm))
    try:
        pci.restore_state(mutated(data.draw, state))
    except ValueError:
        pass
    finally:
        pci.close()


# --- virtio-console ----------------------------------------------------------------------------------
def test_console_backlog_round_trip_and_delivery_on_resume():
    out = []
    a = PciGuest(VirtioConsole(out.append))
    a.init_driver([0, 1])
    a.pci.quiesce()
    a.model.receive(b"typed while paused")         # waits: nothing touches the ring
    assert a.rings[0].used_idx() == 0
    state = through_json(a.root.save_state())
    assert state["slots"][1]["state"]["device"] == {"backlog": b"typed while paused".hex()}

    b = PciGuest(VirtioConsole(out.append), mem=copy_ram(a.mem))
    b.root.restore_state(state)
    b.adopt(a.driver_snapshot())
    b.model.receive(b"!")                          # restored, not resumed: still waits
    head, gpa = b.post(0, in_len=64)
    assert b.rings[0].used_idx() == 0
    b.root.resume()
    b.wait_used(0, 1)
    assert b.rings[0].used_elem(0) == (head, 19)
    assert b.mem.read(gpa, 19) == b"typed while paused!"
    a.close()
    b.close()


def test_console_backlog_bound():
    c = VirtioConsole(lambda data: None)
    c.receive(bytes(BACKLOG_SAVE_MAX + 1))
    with pytest.raises(SaveRefused, match="at most 1048576"):
        c.save_state()
    with pytest.raises(ValueError, match=r"con\.backlog: 1048577 bytes, at most 1048576"):
        c.parse_state({"backlog": "00" * (BACKLOG_SAVE_MAX + 1)}, "con")


def test_rng_has_no_state():
    assert VirtioRng().save_state() == {}
    with pytest.raises(ValueError, match=r"rng: unknown seed"):
        VirtioRng().parse_state({"seed": 1}, "rng")


# --- virtio-blk: the image's identity ------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(3 << 20))
    return str(path)


def blk_state(path: str, readonly: bool = False) -> dict:
    d = VirtioBlock(path, readonly=readonly)
    try:
        return through_json(d.save_state())
    finally:
        d.close()


def test_blk_identity_round_trip(image):
    state = blk_state(image)
    assert set(state) == {"path", "readonly", "size", "mtime_ns", "sampled_sha256"}
    assert state["size"] == 3 << 20 and len(state["sampled_sha256"]) == 64
    d = VirtioBlock(image)
    d.restore_state(state, "blk")
    assert through_json(d.save_state()) == state
    d.close()


def _rewrite(path: str, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("change, message", [
    (lambda p: open(p, "ab").write(bytes(512)), r"changed since the snapshot: size 3145728 -> 3146240"),
    (lambda p: _rewrite(p, 5 << 18, b"x"), r"changed since the snapshot: mtime"),
    (lambda p: _rewrite(p, 0, b"new partition table", keep_mtime=True), r"changed since the snapshot: its sampled contents \(sha256\) differ"),
    (lambda p: _rewrite(p, (3 << 20) - 1, b"!", keep_mtime=True), r"changed since the snapshot: its sampled contents"),
    (lambda p: os.utime(p, ns=(0, 1)), r"changed since the snapshot: mtime .* -> 1 ns"),
])
def test_blk_changed_disk_is_refused(image, change, message):
    state = blk_state(image)
    change(image)
    d = VirtioBlock(image)
    try:
        with pytest.raises(ValueError, match=rf"blk: disk {image} " + message):
            d.parse_state(state, "blk")
    finally:
        d.close()


def test_blk_access_and_path_must_match(image, tmp_path):
    state = blk_state(image)
    d = VirtioBlock(image, readonly=True)
    with pytest.raises(ValueError, match=r"blk\.readonly: disk .* was writable in the snapshot"):
        d.parse_state(state, "blk")
    d.close()
    other = tmp_path / "other.img"
    other.write_bytes(open(image, "rb").read())
    d = VirtioBlock(str(other))
    with pytest.raises(ValueError, match=r"blk\.path: the snapshot's disk is .*disk\.img, this one .*other\.img"):
        d.parse_state(state, "blk")
    d.close()


def test_blk_through_the_transport(image):
    a = PciGuest(VirtioBlock(image))
    a.init_driver([0])
    header = a.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 8))
    payload = a.buffer(b"S" * 512)
    status = a.buffer(1)
    d = a.rings[0]
    d.add(out=[header, payload], in_=[status])
    a.kick(0)
    a.wait_used(0, 1)
    a.pci.quiesce()
    state = through_json(a.root.save_state())
    mem = copy_ram(a.mem)
    a.close()                                       # the image lock goes with the device

    b = PciGuest(VirtioBlock(image), mem=mem)
    b.root.restore_state(state)
    b.adopt(a.driver_snapshot())
    b.root.resume()
    header = b.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 8))
    data, status = b.buffer(512), b.buffer(1)
    b.rings[0].add(out=[header], in_=[data, status])
    b.kick(0)
    b.wait_used(0, 2)
    assert b.mem.read(data[0], 512) == b"S" * 512 and b.mem.read(status[0], 1) == b"\0"
    b.close()


# --- virtio-fs with a back-end on a thread (the real-process test is in test_devstate_virtiofs) ---------
class ThreadBackend:
    """pyvmm-virtiofsd's vhost-user back-end with an echoing FUSE stand-in, on a thread."""

    def __init__(self, path: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self.path = path
        self.server = EchoServer()

        def run() -> None:
            conn, _ = listener.accept()
            listener.close()
            try:
                VhostUserFsBackend(conn, self.server).serve()
            finally:
                conn.close()

        threading.Thread(target=run, daemon=True).start()


class FakeSlots:
    def __init__(self) -> None:
        self.slots: dict[int, int] = {}

    def add(self, gpa: int, size: int, host_addr: int) -> int:
        slot = max(self.slots, default=-1) + 1
        self.slots[slot] = gpa
        return slot

    def move(self, slot: int, gpa: int) -> None:
        self.slots[slot] = gpa

    def remove(self, slot: int) -> None:
        del self.slots[slot]


def fs(tmp_path, name: str, **kw) -> VirtioFs:
    path = str(tmp_path / f"{name}.sock")
    ThreadBackend(path)
    return VirtioFs("share", path, queue_size=16, **kw)


def test_fs_state_checks_the_configuration(tmp_path):
    a = fs(tmp_path, "a")
    state = through_json(a.save_state())
    assert state == {"tag": "share", "num_request_queues": 1, "queue_size": 16, "dax": None,
                     "ring_bases": [None, None]}
    for name, value, message in (("tag", "other", r"fs\.tag: 'other' in the snapshot, 'share' here"),
                                 ("queue_size", 1024, r"fs\.queue_size: 1024 in the snapshot, 16 here"),
                                 ("num_request_queues", 2, r"fs\.num_request_queues: 2"),
                                 ("ring_bases", [0], r"fs\.ring_bases: 1 rings, this device has 2"),
                                 ("ring_bases", [0, 1 << 16], r"fs\.ring_bases\[1\]: 65536 is not in"),
                                 ("dax", {"window_size": 1 << 21}, r"fs\.dax: one DAX window in the snapshot, none here")):
        bad = dict(state, **{name: value})
        with pytest.raises(ValueError, match=message):
            a.parse_state(bad, "fs")
    a.close()


def test_fs_dax_window_slot_follows_bar2_and_mappings_refuse_the_save(tmp_path):
    slots_a = FakeSlots()
    a = PciGuest(fs(tmp_path, "a", dax_window=2 << 20, slots=slots_a))
    a.init_driver([0, 1])
    bar2 = a.root.bar_address(a.slot, vp.SHM_BAR)
    assert slots_a.slots == {0: bar2}
    a.pci.quiesce()
    state = through_json(a.root.save_state())
    assert state["slots"][1]["state"]["device"]["dax"] == {"window_size": 2 << 20}
    assert state["slots"][1]["state"]["device"]["ring_bases"] == [0, 0]

    window = a.model.dax.window
    f = tmp_path / "mapped"
    f.write_bytes(bytes(4096))
    fd = os.open(f, os.O_RDONLY)
    window.map(0, 4096, fd, 0, writable=False)
    os.close(fd)
    with pytest.raises(SaveRefused, match=r"DAX window has 1 file mapping.*mounted with DAX"):
        a.root.save_state()
    window.unmap_all()

    slots_b = FakeSlots()
    b = PciGuest(fs(tmp_path, "b", dax_window=2 << 20, slots=slots_b), mem=copy_ram(a.mem))
    b.root.restore_state(state)
    assert slots_b.slots == {0: bar2}                # the window's KVM slot at the saved BAR 2
    b.adopt(a.driver_snapshot())
    b.root.resume()
    head, gpa = b.post(1, out=b"ping".ljust(16, b"."), in_len=64)
    b.wait_used(1, 1)
    b.wait_call(1)
    assert b.mem.read(gpa, 16) == b"ping".ljust(16, b".")
    a.close()
    b.close()


def test_fs_save_refuses_a_running_backend_and_requests_in_flight(tmp_path):
    g = PciGuest(fs(tmp_path, "a"))
    g.init_driver([0, 1])
    g.pci._quiesced = True                          # a transport that forgot to stop the rings
    with pytest.raises(SaveRefused, match="still serves the rings"):
        g.model.save_state()
    g.pci._quiesced = False
    g.pci.quiesce()
    g.rings[1].mem.write(g.rings[1].used + 2, struct.pack("<H", 7))   # a used idx the base is not
    g.model._ring_bases[1] = 8
    with pytest.raises(SaveRefused, match="ring 1 stopped at 8 with its used index at 7"):
        g.model.save_state()
    g.close()


# --- every model's checks against damaged input ------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    image = tmp / "disk.img"
    image.write_bytes(bytes(1 << 20))
    console = VirtioConsole(lambda data: None)
    console.receive(b"pending")
    out = [VirtioRng(), console, VirtioBlock(str(image)), fs(tmp, "m", dax_window=1 << 21, slots=FakeSlots())]
    yield [(m, through_json(m.save_state())) for m in out]
    for m in out[2:]:
        m.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_models_damaged_state_only_value_errors(models, data):
    model, state = data.draw(st.sampled_from(models))
    try:
        model.parse_state(mutated(data.draw, state), "m")
    except ValueError:
        pass


# --- the whole device set, in the order the machine-level code uses ------------------------------------
def test_every_device_round_trips_like_a_machine(tmp_path, image):
    """Serial, RTC, i8042 and a PCI bus with rng (driven), blk, console, fs and pvpanic:
    quiesce -> save everything -> JSON -> build anew -> restore -> resume -> the
    same state again."""
    from pyvmm.devices.i8042 import I8042
    from pyvmm.devices.pvpanic import PvPanic
    from pyvmm.devices.rtc import CmosRtc
    from pyvmm.devices.serial import Serial16550A

    def build(mem, sock_name):
        lines = []
        legacy = {"serial": Serial16550A(lambda data: None, lines.append), "rtc": CmosRtc(),
                  "i8042": I8042(reset=lambda: None)}
        g = PciGuest(VirtioRng(), mem=mem)
        for model in (VirtioBlock(image), VirtioConsole(lambda data: None), fs(tmp_path, sock_name)):
            g.root.add(vp.VirtioPciDevice(model, g.mem, g.vm, g.router))
        g.root.add(PvPanic(lambda event: None))
        return legacy, g, lines

    legacy, a, _ = build(None, "a")
    a.init_driver([0])
    rng_request(a)
    a.wait_used(0, 1)
    legacy["serial"].write(1, b"\x01")               # IER: RX interrupts on
    legacy["serial"].receive(b"x")
    for dev in legacy.values():
        getattr(dev, "quiesce", lambda: None)()
    a.root.quiesce()
    saved = through_json({**{name: dev.save_state() for name, dev in legacy.items()},
                          "pci": a.root.save_state()})
    assert [s["name"] for s in saved["pci"]["slots"]] == [
        "host-bridge", "virtio-VirtioRng", "virtio-VirtioBlock", "virtio-VirtioConsole",
        "virtio-VirtioFs", "pvpanic"]
    mem = copy_ram(a.mem)
    a.close()

    legacy2, b, lines = build(mem, "b")
    for name in ("serial", "rtc", "i8042"):          # the serial drives IRQ 4 here
        legacy2[name].restore_state(saved[name])
    b.root.restore_state(saved["pci"])
    assert lines == [True]
    b.root.quiesce()                                 # already quiesced by the restore
    again = through_json({**{name: dev.save_state() for name, dev in legacy2.items()},
                          "pci": b.root.save_state()})
    assert again == saved
    b.root.resume()
    b.adopt(a.driver_snapshot())
    rng_request(b)
    b.wait_used(0, 2)
    b.close()
