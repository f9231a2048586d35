"""Fuzz target: the device side of a split virtqueue (pyvmm/devices/virtio/queue.py).

The input lays out a queue in guest RAM (size, descriptors, some of them in an
indirect table, the available ring, EVENT_IDX on or off), then drives it like a
device and a racing driver would: pops, pushes of popped heads, interrupt
checks, kick toggles and new available indexes.  ``ChainError`` (complete the
chain, go on) and ``VirtqueueError`` (the ring is broken) are the documented
outcomes; anything else is a bug.  Invariants checked: buffers of a popped
chain lie in RAM, the used index advances by one per push.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing  # noqa: E402

if __name__ == "__main__":
    fuzzing.run(__file__)   # before pyvmm is imported: see fuzzing.run

from fuzzing import Input, checked, pack  # noqa: E402

from pyvmm.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,  # noqa: E402
                                        VIRTQ_DESC_F_WRITE, ChainError, Virtqueue,
                                        VirtqueueError)
from pyvmm.memory import GuestMemory  # noqa: E402

RAM = 2 << 20         # GuestMemory's smallest is a little over 1 MiB
AREA = 64 << 10       # what an input lays out and uses (rewritten each time)
DESC, AVAIL, USED, TABLE, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x8000
MAX_SIZE = 64
TABLE_ENTRIES = 64

_mem: GuestMemory | None = None


def _memory() -> GuestMemory:
    global _mem   # one memfd for the whole run: an input rewrites what it uses
    if _mem is None:
        _mem = GuestMemory(RAM)
    return _mem


def _descriptor(inp: Input) -> bytes:
    """One virtq_desc: mostly addresses and lengths that land in RAM, sometimes raw."""
    ctl = inp.u8()
    addr = inp.u64() if ctl & 1 else DATA + inp.u16() % (AREA - DATA)
    length = inp.u32() if ctl & 2 else inp.u8() * 16
    flags = (ctl >> 2) & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT)
    if flags & VIRTQ_DESC_F_INDIRECT and not ctl & 1:
        addr = TABLE + 16 * (inp.u8() % TABLE_ENTRIES)
    return pack("QIHH", addr, length, flags, inp.u8())


def fuzz_one(data: bytes) -> None:
    with checked():
        _run(Input(data))


def _run(inp: Input) -> None:
    mem = _memory()
    mem.write(0, bytes(AREA))
    size = 1 + inp.u8() % MAX_SIZE
    q = Virtqueue(mem, MAX_SIZE)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = size, DESC, AVAIL, USED
    q.event_idx = bool(inp.u8() & 1)
    q.check()
    q.ready = True
    mem.write(DESC, b"".join(_descriptor(inp) for _ in range(size)))
    mem.write(TABLE, b"".join(_descriptor(inp) for _ in range(inp.u8() % TABLE_ENTRIES)))
    mem.write(AVAIL, inp.take(4 + 2 * size + 2))
    popped: list = []
    while len(inp):
        op = inp.u8() % 7
        try:
            if op == 0:
                chain = q.pop()
                if chain is not None:
                    for b in chain.readable + chain.writable:
                        mem.translate(b.gpa, b.length)   # GuestMemoryError here is a bug
                    popped.append(chain)
            elif op == 1 and popped:
                chain = popped.pop(inp.u8() % len(popped))
                before = q.used_idx
                q.push(chain.head, chain.write(mem, inp.blob(64)))
                assert q.used_idx == (before + 1) & 0xFFFF
            elif op == 2:
                q.should_interrupt()
            elif op == 3:
                q.set_kicks_enabled(bool(inp.u8() & 1))
            elif op == 4:
                q.has_pending()
            elif op == 5:
                mem.write(AVAIL + 2, inp.take(2))      # the driver publishes more
            elif op == 6 and popped:
                popped[0].read(mem, inp.u8(), inp.u8())
        except ChainError as e:
            q.push(e.head, 0)
        except VirtqueueError:
            return


def seeds() -> list[bytes]:
    # queue of 4, no event idx: a 2-descriptor chain (readable, writable) at head 0,
    # then an indirect chain at head 2, avail idx 2; pop, push, pop, push, interrupt
    desc = (bytes([VIRTQ_DESC_F_NEXT << 2]) + pack("H", 0) + bytes([4]) + bytes([1])
            + bytes([VIRTQ_DESC_F_WRITE << 2]) + pack("H", 0x100) + bytes([4]) + bytes([0])
            + bytes([VIRTQ_DESC_F_INDIRECT << 2]) + bytes([0]) + bytes([2]) + bytes([0])
            + bytes([0]) + pack("H", 0) + bytes([1]) + bytes([0]))
    table = bytes([2]) + bytes([VIRTQ_DESC_F_NEXT << 2]) + pack("H", 0) + bytes([1]) + bytes([1]) \
        + bytes([VIRTQ_DESC_F_WRITE << 2]) + pack("H", 0x200) + bytes([2]) + bytes([0])
    avail = pack("HH", 0, 2) + pack("HHHH", 0, 2, 0, 0) + pack("H", 0)
    ops = bytes([0, 1, 0]) + pack("H", 3) + b"abc" + bytes([0, 1, 0]) + pack("H", 0) + bytes([2, 4])
    plain = bytes([3, 0]) + desc + table + avail + ops
    event = bytes([3, 1]) + desc + table + avail + ops + bytes([3, 1, 5]) + pack("H", 3) + bytes([0, 2])
    return [plain, event, bytes([0, 0]) + b"\xff" * 64]

