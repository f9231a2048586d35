"""Device lifecycle on the virtio PCI transport: a reset while the worker is busy,
a quiesce that times out, a dead back-end's take-over racing a reset, and a
slow vhost-user back-end at DRIVER_OK and reset.

The guest is ``virtio_guest.PciGuest``; the test thread plays the vCPU.
"""

from __future__ import annotations

import threading
import time

import pytest

from pyvmm.devices.virtio import pci as vp
from pyvmm.devices.virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET
from pyvmm.devices.virtio.fs import VirtioFs
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.snapshot.fields import SaveRefused
from pyvmm.vhost_user import protocol as vu
from test_devstate_virtio import fs
from test_vhost_user_frontend import FakeBackend
from virtio_guest import PciGuest

BUSY_WAIT = 10      # seconds a test lets a busy request wait for its release


class BusyRng(VirtioRng):
    """Its first request blocks until ``release``; records every request and
    whether the transport's worker was still serving when the model was reset."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.fills = 0
        self.pci: vp.VirtioPciDevice | None = None
        self.reset_under_live_worker: list[bool] = []

    def _fill(self, chain) -> int:
        self.fills += 1
        self.entered.set()
        assert self.release.wait(BUSY_WAIT)
        return super()._fill(chain)

    def reset(self) -> None:
        worker = self.pci._worker if self.pci is not None else None
        self.reset_under_live_worker.append(worker is not None and not worker.stopped.is_set())
        super().reset()


def busy_guest(chains: int) -> tuple[PciGuest, BusyRng]:
    """A guest whose worker is inside the first of ``chains`` requests."""
    model = BusyRng()
    g = PciGuest(model)
    model.pci = g.pci
    g.init_driver([0])
    for _ in range(chains):
        g.rings[0].add(in_=[g.buffer(16)])
    g.kick(0)
    assert model.entered.wait(5)
    return g, model


def wait_for_reset(g: PciGuest, timeout: float = 5.0) -> None:
    """What a driver does after writing 0: read device_status until it is 0."""
    deadline = time.monotonic() + timeout
    while g.rd(vp.DEVICE_STATUS, 1) != 0:
        assert time.monotonic() < deadline, "the reset did not finish"
        time.sleep(0.005)


def test_reset_while_the_worker_is_busy_returns_and_finishes_on_the_worker():
    g, model = busy_guest(chains=8)
    used = g.rings[0]
    g.wr(vp.DEVICE_STATUS, 0, 1)                     # the vCPU is not held by the request
    assert g.rd(vp.DEVICE_STATUS, 1) != 0             # the driver waits for 0 (2.4)
    assert model.reset_under_live_worker == []        # nothing reset under the worker
    g.wr(vp.DEVICE_STATUS, 1, 1)                      # ignored until the reset is done
    model.release.set()
    wait_for_reset(g)
    assert model.reset_under_live_worker == [False]
    assert model.fills == 1 and used.used_idx() == 1  # the chain in progress, no other
    assert g.pci._worker is None and not g.pci.queues[0].ready
    g.kick(0)                                         # the queue is not touched any more
    assert model.fills == 1 and used.used_idx() == 1
    g.init_driver([0])                                # and the device comes up again
    g.rings[0].add(in_=[g.buffer(16)])
    g.kick(0)
    g.wait_used(0, 1)
    g.close()


def test_a_worker_that_outlives_a_quiesce_gets_no_second_worker_beside_it(monkeypatch):
    monkeypatch.setattr(vp, "WORKER_STOP_TIMEOUT", 0.01)
    g, model = busy_guest(chains=3)
    old = g.pci._worker
    with pytest.raises(SaveRefused, match="did not stop"):
        g.pci.quiesce()
    g.pci.resume()
    assert g.pci._worker is old and not old.stopped.is_set()   # the successor waits
    model.release.set()
    g.wait_used(0, 3)                                 # ... and serves the rest
    new = g.pci._worker
    assert new is not old and old.stopped.is_set() and new.stop_fd != old.stop_fd
    g.close()


def test_a_dead_backends_take_over_waits_for_the_transport_and_skips_a_reset_device(tmp_path):
    model = fs(tmp_path, "a")
    g = PciGuest(model)
    g.init_driver([0, 1])
    assert g.pci._backend_running and g.pci._worker is None
    with g.pci._lock:                                 # a vCPU in the middle of a reset
        taking_over = threading.Thread(target=model._answer_for_dead_backend)
        taking_over.start()
        taking_over.join(0.2)
        assert g.pci._worker is None                  # the take-over waits for the lock
        g.wr(vp.DEVICE_STATUS, 0, 1)
    taking_over.join(5)
    assert not taking_over.is_alive()
    assert g.pci._worker is None and g.rd(vp.DEVICE_STATUS, 1) == 0
    g.close()
    model.close()


class SlowBackend(FakeBackend):
    """A vhost-user back-end that, once ``slow`` is set, answers every message
    ``delay`` seconds late: well inside the per-message timeout."""

    def __init__(self, path: str, delay: float) -> None:
        self.slow = threading.Event()
        self.delay = delay
        super().__init__(path)

    def default(self, msg) -> None:
        if self.slow.is_set():
            time.sleep(self.delay)
        super().default(msg)


def slow_fs(tmp_path, delay: float) -> tuple[SlowBackend, PciGuest]:
    path = str(tmp_path / "slow.sock")
    backend = SlowBackend(path, delay)
    return backend, PciGuest(VirtioFs("share", path, queue_size=16, operation_timeout=0.2))


def test_a_slow_backend_holds_driver_ok_for_one_budget_only(tmp_path):
    backend, g = slow_fs(tmp_path, delay=0.1)
    n = len(backend.messages)
    backend.slow.set()
    g.init_driver([0, 1])                    # 14 messages at 0.1 s: more than the 0.2 s budget
    assert len(backend.messages) - n < 14
    assert g.rd(vp.DEVICE_STATUS, 1) & VIRTIO_CONFIG_S_NEEDS_RESET
    g.close()
    backend.close()


def test_a_slow_backend_holds_a_reset_for_one_budget_only(tmp_path):
    backend, g = slow_fs(tmp_path, delay=0.1)
    g.init_driver([0, 1])
    assert g.pci._backend_running
    n = len(backend.messages)
    backend.slow.set()
    g.wr(vp.DEVICE_STATUS, 0, 1)             # 2 x (ENABLE 0, GET_VRING_BASE), RESET_DEVICE
    assert g.rd(vp.DEVICE_STATUS, 1) == 0
    assert len(backend.messages) - n < 5
    assert not {m.request for m in backend.messages[n:]} - {
        vu.VHOST_USER_SET_VRING_ENABLE, vu.VHOST_USER_GET_VRING_BASE, vu.VHOST_USER_RESET_DEVICE}
    g.close()
    backend.close()


def test_a_reset_after_the_backend_died_does_not_talk_to_it(tmp_path):
    """Once the back-end is gone, a reset (the driver's, or the VM stopping) has no
    one to tell: it must not send vhost-user messages into a broken socket."""
    backend, g = slow_fs(tmp_path, delay=0)
    model = g.pci.device
    g.init_driver([0, 1])
    calls = []
    model.frontend.reset_device = lambda: calls.append("reset_device")
    backend.close()                          # the back-end dies
    deadline = time.monotonic() + 10
    while not model._backend_gone and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model._backend_gone
    g.wr(vp.DEVICE_STATUS, 0, 1)
    assert g.rd(vp.DEVICE_STATUS, 1) == 0
    assert calls == [] and not model._started
    g.close()
