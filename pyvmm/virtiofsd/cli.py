"""``pyvmm-virtiofsd``: serve a host directory to one VMM over vhost-user.

    pyvmm-virtiofsd --socket-path PATH --shared-dir DIR
                    [--cache auto|always|never] [--sandbox namespace|chroot|none]
                    [--thread-pool-size N] [--readonly] [--log-level LEVEL]

It listens on PATH, serves exactly one front-end connection and exits 0 when
the front-end goes away.  Bad options: one line on stderr, exit 2.  A failure
to set up (socket in use, sandbox refused): one line, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import stat
import sys

from .. import __version__
from ..cliparse import Parser, UsageError
from ..heap import trim_heap
from .sandbox import SANDBOX_MODES, enter_sandbox

log = logging.getLogger("pyvmm-virtiofsd")

PROG = "pyvmm-virtiofsd"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="vhost-user virtio-fs back-end with DAX (FUSE in Python)")
    p.add_argument("--socket-path", required=True, help="vhost-user Unix socket to listen on")
    p.add_argument("--shared-dir", required=True, help="host directory to share")
    p.add_argument("--cache", choices=["auto", "always", "never"], default="auto",
                   help="guest caching of names, attributes and data (default auto)")
    p.add_argument("--sandbox", choices=SANDBOX_MODES, default=None,
                   help="namespace (default as root), chroot or none (default otherwise)")
    p.add_argument("--thread-pool-size", type=int, default=0, metavar="N",
                   help="threads serving requests; 0 (default) serves them on the queue thread")
    p.add_argument("--readonly", action="store_true", help="refuse every write with EROFS")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warn", "warning", "error", "off"])
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not 0 <= args.thread_pool_size <= 1024:
        raise UsageError(f"--thread-pool-size {args.thread_pool_size}: expected 0 to 1024")
    if not os.path.isdir(args.shared_dir):
        raise UsageError(f"--shared-dir {args.shared_dir}: not a directory")
    parent = os.path.dirname(os.path.abspath(args.socket_path))
    if not os.path.isdir(parent):
        raise UsageError(f"--socket-path {args.socket_path}: directory {parent} does not exist")
    if len(os.fsencode(os.path.abspath(args.socket_path))) > 107:
        raise UsageError(f"--socket-path {args.socket_path}: longer than a Unix socket path may be")
    if args.sandbox is None:
        args.sandbox = "namespace" if os.geteuid() == 0 else "none"
    return args


def _setup_logging(level: str) -> None:
    if level == "off":
        logging.disable(logging.CRITICAL)
        return
    level = {"warn": "warning"}.get(level, level)
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format=f"{PROG}[%(process)d] %(levelname)s %(name)s: %(message)s")


SO_ACCEPTCON = 0x10000   # /proc/net/unix "Flags": the socket is listening


def _is_listening(path: str) -> bool:
    """Whether some process listens on Unix socket ``path`` (from /proc/net/unix).

    Connecting to find out would not do: a back-end like this one serves the
    first connection it gets, and a probe would use it up.
    """
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return True   # cannot tell: do not remove somebody's socket
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & SO_ACCEPTCON:
            return True
    return False


def listen(path: str) -> socket.socket:
    """Bind and listen on ``path``; a stale socket file (nobody listening) is replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket")
        if _is_listening(path):
            raise OSError(f"{path} is in use by another back-end")
        os.unlink(path)   # stale: left by a back-end that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


def _raise_fd_limit() -> None:
    """Every inode the guest looks up is an open fd: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _import_server() -> None:
    """The server's modules, imported after the sandbox's fork, before its root changes:
    the parent that only waits for the server never holds them (a few MiB of RSS)."""
    from . import passthrough, server, vhost  # noqa: F401


def run(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    sock_path = os.path.abspath(args.socket_path)
    listener = listen(sock_path)
    sock_dir = os.open(os.path.dirname(sock_path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # May fork (see sandbox.py); _import_server runs in the process that serves.
        sandbox = enter_sandbox(args.sandbox, args.shared_dir, _import_server)
        from .passthrough import Passthrough   # (imported by _import_server already)
        from .server import FuseServer
        from .vhost import VhostUserFsBackend

        fs = Passthrough(sandbox.root, cache=args.cache, readonly=args.readonly,
                         proc_self_fd=sandbox.proc_self_fd)
        server = FuseServer(fs)
        log.info("serving %s%s on %s (cache=%s, sandbox=%s, thread pool %d)",
                 args.shared_dir, " read-only" if args.readonly else "", sock_path,
                 args.cache, args.sandbox, args.thread_pool_size)
        conn, _ = listener.accept()
    finally:
        listener.close()
        try:   # one connection only: the socket file goes (through the pre-sandbox dir fd)
            os.unlink(os.path.basename(sock_path), dir_fd=sock_dir)
        except OSError:
            pass
        os.close(sock_dir)
    log.info("front-end connected")
    trim_heap()   # what compiling the server's modules freed
    try:
        VhostUserFsBackend(conn, server, args.thread_pool_size).serve()
    finally:
        conn.close()
        fs.close()
    log.info("front-end gone: exiting")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return run(args)
    except OSError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
