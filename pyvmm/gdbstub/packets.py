"""GDB remote serial protocol packets: ``$payload#cc``, acks, escapes, Ctrl-C.

GDB manual, appendix E "GDB Remote Serial Protocol", E.1 "Overview" (framing,
checksums, the escape byte) and E.8 "Interrupts" (0x03).  Pure functions and
an incremental reader, so that the framing is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

PACKET_SIZE = 0x4000        # what qSupported announces: the largest packet we accept
INTERRUPT = 0x03            # E.8 "Interrupts": Ctrl-C while the target runs
ESCAPE = 0x7D               # '}': the next byte is XORed with 0x20
ESCAPED = frozenset(b"#$}*")


def checksum(payload: bytes) -> int:
    """The sum of the payload bytes modulo 256 (as sent, i.e. escaped)."""
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in ESCAPED:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data of a packet; a trailing lone '}' is dropped."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is not None:
                out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cc`` with the payload escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


@dataclass(frozen=True)
class Event:
    """What ``PacketReader`` found: kind is packet, ack, nack, interrupt or bad (a
    checksum mismatch or an overlong packet: answer with a nack)."""

    kind: str
    payload: bytes = b""


class PacketReader:
    """Incremental parser of what GDB sends: acks, Ctrl-C and ``$...#cc`` packets.

    Bytes between packets other than '+', '-' and 0x03 are ignored.  A packet
    longer than PACKET_SIZE is dropped whole (a "bad" event) without being kept."""

    def __init__(self) -> None:
        self._body: bytearray | None = None   # inside $...: the escaped payload so far
        self._sum: bytearray | None = None    # after '#': checksum digits so far
        self._overlong = False

    def feed(self, data: bytes) -> list[Event]:
        events = []
        for b in data:
            if self._sum is not None:
                self._sum.append(b)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is not None:
                if b == ord("#"):
                    self._sum = bytearray()
                elif len(self._body) < PACKET_SIZE:
                    self._body.append(b)
                else:
                    self._overlong = True
            elif b == ord("$"):
                self._body = bytearray()
            elif b == ord("+"):
                events.append(Event("ack"))
            elif b == ord("-"):
                events.append(Event("nack"))
            elif b == INTERRUPT:
                events.append(Event("interrupt"))
        return events

    def _finish(self) -> Event:
        body, digits, overlong = bytes(self._body), bytes(self._sum), self._overlong
        self._body = self._sum = None
        self._overlong = False
        try:
            ok = int(digits, 16) == checksum(body) and not overlong
        except ValueError:
            ok = False
        return Event("packet", unescape(body)) if ok else Event("bad")

