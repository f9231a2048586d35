"""The host side of the guest agent: run commands in a booted guest, get their output.

The default guest's ``/init`` (guest/agent.c) serves a small framed protocol
on a virtio-console port when the kernel command line says
``pyvmm.agent=hvc0``.  Every frame is an 8-byte little-endian header
(``agent_frame_header``: type, flags, reserved, payload length) and at most
``AGENT_MAX_PAYLOAD`` bytes of payload.  One session::

    guest  HELLO   u32 version
    host   CONFIG  agent_config (wall clock, 64 bytes of entropy) + words
                   such as "pyvmm.share=data:dax" (the shares to mount)
    guest  READY   text: what failed while mounting ("" when nothing)
    host   EXEC    a command line for /bin/sh -c
    guest  STDOUT / STDERR chunks ... then EXIT (i32 status, 128+N for signal N)
    host   KILL    u32 signal for the running command's process group

Two pieces live here:

* ``AgentPort`` is the VMM's end of the agent's virtio-console: it answers
  HELLO with CONFIG itself (so a restored snapshot gets the host's clock and
  fresh entropy before anything runs), and relays every other frame between
  the guest and one client: ``pyvmm run --exec`` inside the VMM, or a
  program connected to ``--agent socket=PATH`` (``pyvmm.testing``).
* ``AgentSession`` is a client: ``wait_ready()`` then ``run(cmd)`` ->
  ``Result``.  ``connect()`` makes one over a Unix socket.

The guest is untrusted: a frame longer than the maximum, of an unknown type
or out of place is dropped with a log line, never an exception in the VMM.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

log = logging.getLogger(__name__)

AGENT_VERSION = 1
AGENT_MAX_PAYLOAD = 65536
AGENT_ENTROPY_BYTES = 64
AGENT_CONFIG_SET_CLOCK = 0x1
AGENT_CONFIG_ENTROPY = 0x2
PENDING_MAX = 1 << 20      # guest frames kept for a client that has not connected yet
KILL_GRACE = 5.0           # seconds to wait for EXIT after KILL


class FrameType(IntEnum):
    HELLO = 1
    CONFIG = 2
    READY = 3
    EXEC = 4
    STDOUT = 5
    STDERR = 6
    EXIT = 7
    KILL = 8
    ERROR = 9


FROM_GUEST = {FrameType.HELLO, FrameType.READY, FrameType.STDOUT, FrameType.STDERR,
              FrameType.EXIT, FrameType.ERROR}
FROM_CLIENT = {FrameType.EXEC, FrameType.KILL}


class agent_frame_header(ctypes.LittleEndianStructure):
    """guest/agent.h ``struct agent_frame_header``."""

    _pack_ = 1
    _fields_ = [("type", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("reserved", ctypes.c_uint16), ("length", ctypes.c_uint32)]


class agent_config(ctypes.LittleEndianStructure):
    """guest/agent.h ``struct agent_config``: the fixed part of a CONFIG payload."""

    _pack_ = 1
    _fields_ = [("realtime_sec", ctypes.c_uint64), ("realtime_nsec", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("entropy", ctypes.c_uint8 * AGENT_ENTROPY_BYTES)]


HEADER_SIZE = ctypes.sizeof(agent_frame_header)
assert HEADER_SIZE == 8
assert ctypes.sizeof(agent_config) == 80


class AgentProtocolError(ValueError):
    """Bytes that are not a valid frame stream."""


class AgentClosed(ConnectionError):
    """The session ended (the VMM or the guest went away)."""


class AgentTimeout(TimeoutError):
    """A wait ran out of time; ``result`` holds what a command had printed."""

    def __init__(self, message: str, result: "Result | None" = None) -> None:
        super().__init__(message)
        self.result = result


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    if len(payload) > AGENT_MAX_PAYLOAD:
        raise ValueError(f"agent frame payload of {len(payload)} bytes (max {AGENT_MAX_PAYLOAD})")
    return bytes(agent_frame_header(type=ftype, length=len(payload))) + payload


def config_payload(words: str, now_ns: int | None = None, entropy: bytes | None = None) -> bytes:
    """A CONFIG payload: the host's wall clock, fresh entropy, then the words."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    entropy = os.urandom(AGENT_ENTROPY_BYTES) if entropy is None else entropy
    c = agent_config(realtime_sec=now_ns // 1_000_000_000, realtime_nsec=now_ns % 1_000_000_000,
                     flags=AGENT_CONFIG_SET_CLOCK | AGENT_CONFIG_ENTROPY)
    ctypes.memmove(c.entropy, entropy, AGENT_ENTROPY_BYTES)
    return bytes(c) + words.encode()


class FrameDecoder:
    """Cuts a byte stream into (type, payload) frames; never buffers more than one frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The whole frames ``data`` completes; AgentProtocolError drops the buffer."""
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER_SIZE:
            header = agent_frame_header.from_buffer_copy(self._buf[:HEADER_SIZE])
            if header.length > AGENT_MAX_PAYLOAD:
                self._buf.clear()
                raise AgentProtocolError(f"frame of {header.length} bytes (max {AGENT_MAX_PAYLOAD})")
            end = HEADER_SIZE + header.length
            if len(self._buf) < end:
                break
            frames.append((header.type, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return frames


# --- the VMM's end ---------------------------------------------------------------------------
class AgentPort:
    """The host side of the agent's virtio-console (VMM process).

    ``from_guest`` is the console device's output callback; ``attach`` gives
    it the device's ``receive``.  Frames from the guest go to the connected
    client (``connect_client``) or wait for one (at most ``PENDING_MAX``
    bytes); with ``socket_path`` a Unix socket accepts one client at a time.
    """

    def __init__(self, words: str = "", socket_path: str | None = None) -> None:
        self.words = words
        self.ready = threading.Event()
        self._ready_payload = b""
        self._decoder = FrameDecoder()
        self._to_guest: Callable[[bytes], None] | None = None
        self._client: Callable[[int, bytes], None] | None = None
        self._pending: deque[tuple[int, bytes]] = deque()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.socket_path = socket_path
        if socket_path is not None:
            self._server = _listen(socket_path)
            threading.Thread(target=self._serve_sockets, args=(self._server,), name="agent-socket",
                             daemon=True).start()

    def attach(self, to_guest: Callable[[bytes], None]) -> None:
        self._to_guest = to_guest

    # guest -> host
    def from_guest(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except AgentProtocolError as e:
            log.warning("agent: bad frame from the guest: %s", e)
            return
        for ftype, payload in frames:
            self._guest_frame(ftype, payload)

    def _guest_frame(self, ftype: int, payload: bytes) -> None:
        if ftype not in FROM_GUEST:
            log.warning("agent: unexpected frame type %d from the guest, dropped", ftype)
            return
        if ftype == FrameType.HELLO:
            self._send(FrameType.CONFIG, config_payload(self.words))
            return
        if ftype == FrameType.READY:
            self._ready_payload = payload
            self.ready.set()
            if payload:
                log.warning("agent: guest set-up: %s", payload.decode(errors="replace").strip())
        elif ftype == FrameType.ERROR:
            log.warning("agent: guest says: %s", payload.decode(errors="replace"))
        with self._lock:
            client = self._client
            if client is None:
                self._keep(ftype, payload)
                return
        client(ftype, payload)

    def _keep(self, ftype: int, payload: bytes) -> None:
        """Hold a frame for the next client (lock held); the oldest go first when full."""
        self._pending.append((ftype, payload))
        self._pending_bytes += len(payload)
        while self._pending_bytes > PENDING_MAX and len(self._pending) > 1:
            _, old = self._pending.popleft()
            self._pending_bytes -= len(old)
            log.warning("agent: no client: guest output dropped")

    # client -> guest
    def client_frame(self, ftype: int, payload: bytes) -> None:
        """A frame from the client: only EXEC and KILL go on to the guest."""
        if ftype not in FROM_CLIENT:
            log.warning("agent: client frame type %d refused", ftype)
            return
        self._send(ftype, payload)

    def _send(self, ftype: int, payload: bytes) -> None:
        if self._to_guest is not None:
            self._to_guest(encode_frame(ftype, payload))

    def connect_client(self, client: Callable[[int, bytes], None]) -> None:
        """Frames from the guest go to ``client`` from now on (what waited comes first).
        A client that connects after the guest was ready hears READY again."""
        with self._lock:
            pending, self._pending, self._pending_bytes = self._pending, deque(), 0
            if self.ready.is_set() and all(t != FrameType.READY for t, _ in pending):
                pending.appendleft((FrameType.READY, self._ready_payload))
            for ftype, payload in pending:
                client(ftype, payload)
            self._client = client

    def disconnect_client(self) -> None:
        with self._lock:
            self._client = None

    def _serve_sockets(self, server: socket.socket) -> None:
        # ``server``, not self._server: close() sets that to None from another thread,
        # and then accept() on the closed socket raises OSError and ends the loop.
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self._serve_one(conn)

    def _serve_one(self, conn: socket.socket) -> None:
        def to_client(ftype: int, payload: bytes) -> None:
            try:
                conn.sendall(encode_frame(ftype, payload))
            except OSError:
                pass

        self.connect_client(to_client)
        decoder = FrameDecoder()
        try:
            while data := conn.recv(65536):
                for ftype, payload in decoder.feed(data):
                    self.client_frame(ftype, payload)
        except (OSError, AgentProtocolError) as e:
            log.warning("agent: client connection: %s", e)
        finally:
            self.disconnect_client()
            conn.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass


def _listen(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if os.path.exists(path):
            os.unlink(path)
        server.bind(path)
        server.listen(1)
    except OSError as e:
        server.close()
        raise ValueError(f"--agent socket={path}: {e.strerror}") from None
    return server


# --- a client ----------------------------------------------------------------------------------
@dataclass
class Result:
    """What one command did: its status and everything it wrote."""

    returncode: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")

    def __repr__(self) -> str:
        return (f"Result(returncode={self.returncode}, stdout={_short(self.stdout)!r}, "
                f"stderr={_short(self.stderr)!r})")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class AgentSession:
    """A client of the agent: one command at a time.

    ``send_frame(type, payload)`` carries frames to the guest; whoever reads
    the guest's frames calls ``deliver`` (and ``close`` at the end).
    """

    def __init__(self, send_frame: Callable[[int, bytes], None]) -> None:
        self._send_frame = send_frame
        self._frames: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self._closed: str | None = None
        self._ready: str | None = None
        self._run_lock = threading.Lock()

    def deliver(self, ftype: int, payload: bytes) -> None:
        self._frames.put((ftype, payload))

    def close(self, reason: str = "the agent connection closed") -> None:
        if self._closed is None:
            self._closed = reason
        self._frames.put(None)

    def _next(self, deadline: float | None) -> tuple[int, bytes]:
        if self._closed is not None and self._frames.empty():
            raise AgentClosed(self._closed)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            frame = self._frames.get(timeout=timeout)
        except queue.Empty:
            raise AgentTimeout("timed out") from None
        if frame is None:
            self._frames.put(None)   # every later wait sees the end too
            raise AgentClosed(self._closed or "the agent connection closed")
        return frame

    def wait_ready(self, timeout: float | None = None) -> str:
        """Block until the guest said READY; returns its set-up complaints ("" when none)."""
        if self._ready is not None:
            return self._ready
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                ftype, payload = self._next(deadline)
            except AgentTimeout:
                raise AgentTimeout(f"the guest agent was not ready within {timeout:.0f} s") from None
            if ftype == FrameType.READY:
                self._ready = payload.decode(errors="replace")
                return self._ready

    def run(self, command: str, timeout: float | None = None,
            stdout: Callable[[bytes], None] | None = None,
            stderr: Callable[[bytes], None] | None = None) -> Result:
        """Run ``command`` with /bin/sh -c in the guest.

        Output goes to the ``stdout``/``stderr`` callbacks when given, else it
        is collected in the Result.  On ``timeout`` the command's process
        group gets SIGKILL and AgentTimeout carries what it printed.
        """
        payload = command.encode()
        if len(payload) > AGENT_MAX_PAYLOAD:
            raise ValueError(f"command of {len(payload)} bytes (max {AGENT_MAX_PAYLOAD})")
        with self._run_lock:
            self.wait_ready(timeout)   # a guest that never gets ready must not hang a run
            out, err = bytearray(), bytearray()
            sinks = {FrameType.STDOUT: stdout or out.extend, FrameType.STDERR: stderr or err.extend}
            self._send_frame(FrameType.EXEC, payload)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    ftype, data = self._next(deadline)
                except AgentTimeout:
                    status = self._kill_and_wait(sinks)
                    raise AgentTimeout(f"command {command!r} did not finish within {timeout:.0f} s",
                                       Result(status, bytes(out), bytes(err))) from None
                if ftype in sinks:
                    sinks[ftype](data)
                elif ftype == FrameType.EXIT and len(data) == 4:
                    return Result(int.from_bytes(data, "little", signed=True), bytes(out), bytes(err))
                elif ftype == FrameType.ERROR:
                    err.extend(b"pyvmm-agent: " + data + b"\n")

    def _kill_and_wait(self, sinks: dict) -> int:
        self._send_frame(FrameType.KILL, (9).to_bytes(4, "little"))
        deadline = time.monotonic() + KILL_GRACE
        while True:
            try:
                ftype, data = self._next(deadline)
            except (AgentTimeout, AgentClosed):
                return -1
            if ftype in sinks:
                sinks[ftype](data)
            elif ftype == FrameType.EXIT and len(data) == 4:
                return int.from_bytes(data, "little", signed=True)


class AgentConnection:
    """A client's Unix-socket connection to the VMM's ``--agent socket=PATH``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.session = AgentSession(self._send_frame)
        self._reader = threading.Thread(target=self._read, name="agent-client", daemon=True)
        self._reader.start()

    def _send_frame(self, ftype: int, payload: bytes) -> None:
        with self._lock:
            try:
                self._sock.sendall(encode_frame(ftype, payload))
            except OSError as e:
                raise AgentClosed(f"agent connection: {e.strerror or e}") from None

    def _read(self) -> None:
        decoder = FrameDecoder()
        try:
            while data := self._sock.recv(65536):
                for ftype, payload in decoder.feed(data):
                    self.session.deliver(ftype, payload)
        except (OSError, AgentProtocolError) as e:
            self.session.close(f"agent connection: {e}")
            return
        self.session.close("the VMM closed the agent connection")

    def close(self) -> None:
        """Hang up (shutdown first: a close alone does not wake our reader thread)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self._sock.close()


def connect(path: str, timeout: float = 10.0) -> AgentConnection:
    """A connection to the VMM's ``--agent socket=PATH`` (retried until ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return AgentConnection(sock)
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
