"""The serial console's host side: where guest output goes, where input comes from.

Output goes to stdout, a file, or nowhere.  Input comes from stdin in a
thread; when stdin is a terminal it is put in raw mode (restored on exit) and
the escape Ctrl-A x quits the VMM, Ctrl-A Ctrl-A sends a literal Ctrl-A.
"""

from __future__ import annotations

import logging
import os
import sys
import termios
import threading
import tty
from typing import Callable

log = logging.getLogger(__name__)

ESCAPE = 0x01        # Ctrl-A
ESCAPE_QUIT = b"x"


class SerialSpecError(ValueError):
    pass


class Console:
    """Host end of the guest's serial port.

    ``spec`` is ``stdio``, ``file=PATH`` or ``null`` (docs/cli.md).
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._fd: int | None = None
        self._own_fd = False
        self._saved_termios = None
        self.tail = bytearray()        # the last TAIL_MAX bytes, for error reports
        if spec == "stdio":
            self._fd = sys.stdout.fileno()
        elif spec.startswith("file="):
            path = spec[5:]
            if not path:
                raise SerialSpecError("--serial file= needs a path")
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise SerialSpecError(f"--serial: cannot open {path}: {e.strerror}") from None
            self._own_fd = True
        elif spec != "null":
            raise SerialSpecError(f"--serial must be stdio, file=PATH or null, not {spec!r}")

    TAIL_MAX = 16384

    def write(self, data: bytes) -> None:
        """Guest output (called from vCPU threads)."""
        self.tail += data
        if len(self.tail) > self.TAIL_MAX:
            del self.tail[:len(self.tail) - self.TAIL_MAX]
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:  # a closed pipe must not take the VM down
            self._fd = None

    def start_input(self, receive: Callable[[bytes], None], quit: Callable[[], None]) -> None:
        """Feed stdin to ``receive`` from a daemon thread (stdio mode only)."""
        if self.spec != "stdio":
            return
        fd = sys.stdin.fileno() if sys.stdin else -1
        if fd < 0:
            return
        if os.isatty(fd):
            self._saved_termios = (fd, termios.tcgetattr(fd))
            tty.setraw(fd)
        t = threading.Thread(target=self._input_loop, args=(fd, receive, quit),
                             name="console-input", daemon=True)
        t.start()

    def _input_loop(self, fd: int, receive: Callable[[bytes], None], quit: Callable[[], None]) -> None:
        interactive = os.isatty(fd)
        pending_escape = False
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return  # EOF: the guest keeps running without input
            if not interactive:
                receive(data)
                continue
            out = bytearray()
            for b in data:
                if pending_escape:
                    pending_escape = False
                    if bytes([b]) == ESCAPE_QUIT:
                        if out:
                            receive(bytes(out))
                        quit()
                        return
                    out.append(b)  # Ctrl-A Ctrl-A (or any other key) goes through
                elif b == ESCAPE:
                    pending_escape = True
                else:
                    out.append(b)
            if out:
                receive(bytes(out))

    def close(self) -> None:
        """Restore the terminal and close a log file."""
        if self._saved_termios is not None:
            fd, attrs = self._saved_termios
            try:
                termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
            except termios.error:
                pass
            self._saved_termios = None
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SocketPort:
    """Host end of a virtio-console port: a Unix socket the VMM listens on.

    One client at a time; guest output written while no client is connected
    is kept (up to ``BACKLOG_MAX`` bytes, oldest dropped first and counted in
    the log) and sent when one connects.
    """

    BACKLOG_MAX = 1 << 20

    def __init__(self, path: str) -> None:
        import socket

        self.path = path
        try:
            if os.path.exists(path):
                os.unlink(path)
            self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._server.bind(path)
            self._server.listen(1)
        except OSError as e:
            raise SerialSpecError(f"--console socket={path}: {e.strerror}") from None
        self._client = None
        self._pending = bytearray()
        self._dropped = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Guest output (device worker thread)."""
        with self._lock:
            if self._client is not None:
                try:
                    self._client.sendall(data)
                    return
                except OSError:
                    self._client = None
            self._pending += data
            if len(self._pending) > self.BACKLOG_MAX:
                extra = len(self._pending) - self.BACKLOG_MAX
                del self._pending[:extra]
                self._dropped += extra
                log.warning("console socket: no client, %d bytes of guest output dropped", self._dropped)

    def start(self, receive: Callable[[bytes], None]) -> None:
        threading.Thread(target=self._serve, args=(receive,), name="console-socket", daemon=True).start()

    def _serve(self, receive: Callable[[bytes], None]) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._client = client
                if self._pending:
                    try:
                        client.sendall(bytes(self._pending))
                        self._pending.clear()
                    except OSError:
                        self._client = None
                        continue
            while True:
                try:
                    data = client.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break
                receive(data)
            with self._lock:
                self._client = None
            client.close()

    def close(self) -> None:
        self._server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
