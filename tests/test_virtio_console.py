"""virtio-console device model with a fake queue and real guest memory, no KVM."""

from __future__ import annotations

import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.console import (BACKLOG_MAX, QUEUE_SIZE, RECEIVEQ0, TRANSMIT_MAX, TRANSMITQ0, VIRTIO_CONSOLE_F_EMERG_WRITE,
                                          VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE, VirtioConsole)
from pyvmm.devices.virtio.queue import Buffer, ChainError, DescriptorChain, VirtqueueError
from pyvmm.memory import GuestMemory
from virtio_fakes import FakeQueue

MEM_SIZE = 4 << 20


class Env:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.output: list[bytes] = []
        self.dev = VirtioConsole(self.output.append)
        self.rx, self.tx = FakeQueue(), FakeQueue()
        self.notified: list[int] = []
        self.resets = 0
        self.dev.needs_reset = self._needs_reset
        self.next_gpa = 0x10000
        self.next_head = 0
        self.posted: dict[int, list[Buffer]] = {}

    def _needs_reset(self) -> None:
        self.resets += 1

    def activate(self) -> None:
        self.dev.activate(self.mem, [self.rx, self.tx], self.notified.append, 0)

    def alloc(self, n: int) -> Buffer:
        gpa = self.next_gpa
        self.next_gpa += (n + 0xFF) & ~0xFF or 0x100
        assert self.next_gpa < MEM_SIZE
        return Buffer(gpa, n)

    def post_rx(self, *sizes: int, kick: bool = True) -> int:
        """The driver posts one receive chain of buffers of these sizes."""
        head, self.next_head = self.next_head, self.next_head + 1
        bufs = [self.alloc(n) for n in sizes]
        self.posted[head] = bufs
        self.rx.add(DescriptorChain(head, [], bufs))
        if kick:
            self.dev.process_queue(RECEIVEQ0)
        return head

    def received(self) -> bytes:
        """What the driver got, in used order, honouring each used length."""
        out = b""
        for head, n in self.rx.used:
            data = b"".join(self.mem.read(b.gpa, b.length) for b in self.posted[head])
            out += data[:n]
        return out

    def send(self, data: bytes, pieces: int = 1) -> int:
        head, self.next_head = self.next_head, self.next_head + 1
        step = max(1, -(-len(data) // pieces))
        bufs = []
        for i in range(0, len(data), step):
            b = self.alloc(len(data[i:i + step]))
            self.mem.write(b.gpa, data[i:i + step])
            bufs.append(b)
        self.tx.add(DescriptorChain(head, bufs, []))
        self.dev.process_queue(TRANSMITQ0)
        return head


@pytest.fixture
def mem():
    m = GuestMemory(MEM_SIZE)
    yield m
    m.close()


@pytest.fixture
def env(mem):
    e = Env(mem)
    e.activate()
    return e


def test_identity_features_config():
    dev = VirtioConsole(lambda b: None)
    assert dev.device_id == 3 and dev.num_queues == 2
    f = dev.device_features()
    assert f >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    assert not f >> VIRTIO_CONSOLE_F_SIZE & 1 and not f >> VIRTIO_CONSOLE_F_MULTIPORT & 1
    cfg = dev.config_bytes()
    assert len(cfg) == 12
    cols, rows, max_nr_ports, emerg_wr = struct.unpack("<HHII", cfg)
    assert (cols, rows, emerg_wr) == (0, 0, 0)
    # Linux fills every receiveq0 slot with a page while it probes: few slots, a cheap probe.
    assert dev.queue_max_size == QUEUE_SIZE == 32


def test_transmit(env):
    head = env.send(b"hello, world\n", pieces=3)
    assert b"".join(env.output) == b"hello, world\n"
    assert env.tx.used == [(head, 0)] and env.notified == [TRANSMITQ0]


def test_transmit_bad_chains_fail_alone(env):
    env.tx.add(DescriptorChain(40, [Buffer(MEM_SIZE + 4096, 10)], []))
    env.tx.add(ChainError(41))
    env.tx.add(DescriptorChain(42, [], [env.alloc(10)]))       # nothing readable
    env.send(b"ok")
    assert b"".join(env.output) == b"ok"
    assert [h for h, _ in env.tx.used] == [40, 41, 42, env.next_head - 1]
    assert env.resets == 0


def test_transmit_output_error_does_not_raise(mem):
    def broken(data):
        raise BrokenPipeError(32, "stdout closed")
    e = Env(mem)
    e.dev.out = broken
    e.activate()
    e.send(b"lost")
    assert len(e.tx.used) == 1


def test_transmit_is_copied_buffer_by_buffer_up_to_a_cap(env):
    """The descriptors of one chain may all point at the same guest pages, so its
    length stands for many times guest RAM: copy per buffer, at most TRANSMIT_MAX."""
    page = env.alloc(64 * 1024)
    env.mem.write(page.gpa, b"x" * page.length)
    env.tx.add(DescriptorChain(7, [page] * 200, []))          # "12.5 MiB" in a 4 MiB guest
    env.dev.process_queue(TRANSMITQ0)
    assert env.output and max(len(d) for d in env.output) <= page.length
    assert sum(len(d) for d in env.output) == TRANSMIT_MAX
    assert env.tx.used == [(7, 0)] and env.resets == 0


def test_backlog_is_bounded(env):
    """Host input for a guest that never reads (the agent answers every HELLO) is capped."""
    for _ in range(BACKLOG_MAX // (1 << 20) + 2):
        env.dev.receive(bytes(1 << 20))
    assert env.dev.pending() == BACKLOG_MAX
    env.post_rx(4)
    assert env.received() == bytes(4) and env.dev.pending() == BACKLOG_MAX - 4


def test_receive_into_posted_buffers(env):
    head = env.post_rx(16)
    env.dev.receive(b"abc")
    assert env.rx.used == [(head, 3)] and env.received() == b"abc"
    assert env.notified == [RECEIVEQ0]


def test_receive_before_buffers_is_delivered_later_in_order(env):
    env.dev.receive(b"one ")
    env.dev.receive(b"two ")
    env.dev.receive(b"three")
    assert env.rx.used == [] and env.dev.pending() == 13
    env.post_rx(5)                       # the kick delivers what fits
    assert env.received() == b"one t" and env.dev.pending() == 8
    env.post_rx(3, 2, kick=False)        # one chain of two buffers
    env.post_rx(64, kick=False)
    env.dev.process_queue(RECEIVEQ0)
    assert env.received() == b"one two three" and env.dev.pending() == 0
    assert len(env.rx.used) == 3
    env.post_rx(8)                       # posted while nothing waits: stays posted
    assert len(env.rx.used) == 3
    env.dev.receive(b"!")
    assert env.received() == b"one two three!"


def test_receive_before_activation(mem):
    e = Env(mem)
    e.dev.receive(b"early")
    e.dev.process_queue(RECEIVEQ0)       # not activated: nothing to deliver into
    e.post_rx(8, kick=False)
    e.activate()
    assert e.rx.used == []
    e.dev.process_queue(RECEIVEQ0)       # the transport's worker does this at start
    assert e.received() == b"early"


def test_backlog_survives_reset(env):
    env.dev.receive(b"typed")
    env.dev.reset()
    env.dev.receive(b" ahead")
    env.post_rx(32, kick=False)
    assert env.rx.used == []
    env.activate()
    env.dev.process_queue(RECEIVEQ0)
    assert env.received() == b"typed ahead"


def test_receive_bad_buffers_lose_nothing(env):
    env.dev.receive(b"0123456789")
    env.rx.add(ChainError(90))
    env.rx.add(DescriptorChain(91, [], [Buffer(MEM_SIZE + 4096, 4)]))      # outside RAM: nothing
    env.posted[91] = []
    good = env.alloc(3)
    env.rx.add(DescriptorChain(92, [], [good, Buffer(MEM_SIZE + 4096, 4)]))  # stops after 3 bytes
    env.posted[92] = [good]
    env.post_rx(64)
    assert env.rx.used[:3] == [(90, 0), (91, 0), (92, 3)]
    env.posted[90] = []
    assert env.received() == b"0123456789"
    assert env.resets == 0


def test_broken_receiveq_needs_reset(env):
    env.rx.add(VirtqueueError("ring gone"))
    env.dev.receive(b"x")
    assert env.resets == 1
    env.post_rx(8)
    assert env.rx.used == []             # left alone until reset
    env.dev.reset()
    env.activate()
    env.dev.process_queue(RECEIVEQ0)
    assert env.received() == b"x"


def test_broken_transmitq_needs_reset(env):
    env.tx.add(VirtqueueError("ring gone"))
    env.dev.process_queue(TRANSMITQ0)
    assert env.resets == 1
    env.send(b"later")
    assert env.output == []
    env.dev.reset()
    env.activate()
    env.dev.process_queue(TRANSMITQ0)
    assert env.output == [b"later"]


def test_emergency_write(mem):
    out = []
    dev = VirtioConsole(out.append)
    dev.config_write(8, struct.pack("<I", ord("A")))   # works before any set-up
    dev.config_write(8, b"B")
    dev.config_write(0, b"\x50\x00")                   # cols: read-only, ignored
    dev.config_write(9, b"C")                          # not the start of emerg_wr
    assert out == [b"A", b"B"]


def test_unknown_queue_index_is_ignored(env):
    env.dev.process_queue(7)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000),
       chunks=st.lists(st.integers(1, 400), max_size=40),
       steps=st.lists(st.tuples(st.booleans(), st.lists(st.integers(1, 300), min_size=1, max_size=4)),
                      max_size=40))
def test_chunked_receive_arrives_intact(mem, data, chunks, steps):
    """Random receive() chunks interleaved with random receive chains: every byte, in order."""
    e = Env(mem)
    e.activate()
    pos = 0
    chunk_iter = iter(chunks)
    for post, sizes in steps:
        if post:
            e.post_rx(*sizes, kick=bool(len(sizes) % 2))
        else:
            n = next(chunk_iter, 256)
            e.dev.receive(data[pos:pos + n])
            pos += n
    e.dev.receive(data[pos:])
    while e.dev.pending():
        e.post_rx(512)
    assert e.received() == data
    assert all(n > 0 for _, n in e.rx.used)   # no chain used up empty while bytes waited


def test_receive_from_another_thread(env):
    """Host input thread and the worker's kicks race; the lock keeps the stream whole."""
    data = bytes(range(256)) * 64
    def typist():
        for i in range(0, len(data), 37):
            env.dev.receive(data[i:i + 37])
    t = threading.Thread(target=typist)
    t.start()
    while t.is_alive() or env.dev.pending():
        env.post_rx(61)
    t.join()
    assert env.received() == data
