"""virtio-rng device model with a fake queue and real guest memory, no KVM."""

from __future__ import annotations

import pytest

from pyvmm.devices.virtio.queue import Buffer, ChainError, DescriptorChain, VirtqueueError
from pyvmm.devices.virtio.rng import MAX_REQUEST, VirtioRng
from pyvmm.memory import GuestMemory
from virtio_fakes import FakeQueue

MEM_SIZE = 4 << 20


@pytest.fixture
def env():
    mem = GuestMemory(MEM_SIZE)
    dev, q, notified, resets = VirtioRng(), FakeQueue(), [], []
    dev.needs_reset = lambda: resets.append(1)
    dev.activate(mem, [q], notified.append, 0)
    yield dev, mem, q, notified, resets
    mem.close()


def test_identity():
    dev = VirtioRng()
    assert dev.device_id == 4 and dev.num_queues == 1
    assert dev.device_features() == 0 and dev.config_bytes() == b""


def test_fills_buffers(env):
    dev, mem, q, notified, _ = env
    a, b = Buffer(0x10000, 100), Buffer(0x20000, 4000)
    q.add(DescriptorChain(3, [], [a, b]))
    dev.process_queue(0)
    assert q.used == [(3, 4100)] and notified == [0]
    got = mem.read(a.gpa, a.length) + mem.read(b.gpa, b.length)
    assert got != bytes(4100) and len(set(got)) > 100   # random, not a constant fill


def test_fresh_bytes_each_time(env):
    dev, mem, q, _, _ = env
    q.add(DescriptorChain(0, [], [Buffer(0x10000, 64)]))
    q.add(DescriptorChain(1, [], [Buffer(0x20000, 64)]))
    dev.process_queue(0)
    assert mem.read(0x10000, 64) != mem.read(0x20000, 64)


def test_request_is_capped(env):
    dev, mem, q, _, _ = env
    mem.write(0x100000, bytes(MAX_REQUEST + 4096))
    q.add(DescriptorChain(0, [], [Buffer(0x100000, MAX_REQUEST + 4096)]))
    dev.process_queue(0)
    assert q.used == [(0, MAX_REQUEST)]
    assert mem.read(0x100000 + MAX_REQUEST, 4096) == bytes(4096)   # untouched beyond the cap


def test_bad_chains_fail_alone(env):
    dev, mem, q, notified, resets = env
    q.add(DescriptorChain(0, [Buffer(0x10000, 16)], []))           # nothing writable
    q.add(DescriptorChain(1, [], [Buffer(MEM_SIZE + 4096, 64)]))   # outside guest RAM
    q.add(ChainError(2, "loop"))
    q.add(DescriptorChain(3, [], [Buffer(0x30000, 32)]))
    dev.process_queue(0)
    assert q.used == [(0, 0), (1, 0), (2, 0), (3, 32)]
    assert notified == [0] and resets == []


def test_broken_ring_needs_reset(env):
    dev, mem, q, notified, resets = env
    q.add(VirtqueueError("avail idx jumped"))
    dev.process_queue(0)
    assert resets == [1] and notified == []
    q.add(DescriptorChain(0, [], [Buffer(0x10000, 8)]))
    dev.process_queue(0)                       # left alone until reset
    assert q.used == []
    dev.reset()
    dev.activate(mem, [q], notified.append, 0)
    dev.process_queue(0)
    assert q.used == [(0, 8)]


def test_idle_and_inactive(env):
    dev, _, q, notified, _ = env
    dev.process_queue(0)
    assert notified == []
    VirtioRng().process_queue(0)               # never activated
