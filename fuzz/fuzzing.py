"""What every fuzz target shares: a byte reader, bug checks, the atheris driver.

A target is a module in fuzz/ with

* ``fuzz_one(data: bytes) -> None``: one input.  The exceptions the code under
  test documents for bad input (``ChainError``, ``ProtocolError``, ...) are
  caught there; anything else escapes and is a crash.
* ``seeds() -> list[bytes]``: small inputs that reach the interesting paths,
  kept in fuzz/corpus/<target>/ (``python fuzz/fuzzing.py --write-seeds``);
* as its first statements, ``if __name__ == "__main__": fuzzing.run(__file__)``.

Targets never import atheris: tests/test_fuzz_corpus.py replays every corpus
through ``fuzz_one`` in ``make test``.  Only ``run`` (a target run as a
script) needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
import sys
import threading
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(FUZZ_DIR)
CORPUS_DIR = os.path.join(FUZZ_DIR, "corpus")
#: every target, by module name (fuzz/<name>.py, corpus in fuzz/corpus/<name>/)
TARGETS = ("virtqueue", "virtio_pci", "vhost_user_protocol", "virtiofsd_messages",
           "dax_requests", "fuse_server")

for _path in (REPO, os.path.join(REPO, "tests")):   # pyvmm, and the test fakes reused here
    if _path not in sys.path:
        sys.path.insert(0, _path)


class Input:
    """Reads typed values off a fuzz input; past its end every read gives zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __len__(self) -> int:
        return max(0, len(self.data) - self.pos)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def pick(self, choices):
        return choices[self.u8() % len(choices)]

    def blob(self, limit: int) -> bytes:
        """A length byte pair (u16, capped at ``limit``), then that many bytes."""
        return self.take(min(self.u16(), limit))


def pack(fmt: str, *values: int) -> bytes:
    """Seed helper: little-endian ``struct.pack``."""
    return struct.pack("<" + fmt, *values)


class _BugRecorder(logging.Handler):
    """Keeps the log records that carry an exception other than OSError: the code
    under test catches its own bugs and logs them (``log.exception``) instead of
    crashing, so for a fuzzer such a record is a crash."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.bugs: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and not isinstance(record.exc_info[1], OSError):
            self.bugs.append(record.exc_info[1])


_recorder = _BugRecorder()


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    _recorder.bugs.append(args.exc_value)


@contextmanager
def checked() -> Iterator[None]:
    """Wrap one input: a bug the code logged, or an exception that ended one of its
    threads, is raised here as AssertionError."""
    root, hook = logging.getLogger(), threading.excepthook
    root.addHandler(_recorder)
    threading.excepthook = _thread_failed
    _recorder.bugs.clear()
    try:
        yield
    finally:
        root.removeHandler(_recorder)
        threading.excepthook = hook
    if _recorder.bugs:
        bug = _recorder.bugs[0]
        _recorder.bugs.clear()
        raise AssertionError(f"the code under test logged a bug: {bug!r}") from bug


def load_target(name: str) -> ModuleType:
    """fuzz/<name>.py as a module (the tests import targets this way)."""
    spec = importlib.util.spec_from_file_location(f"pyvmm_fuzz_{name}",
                                                  os.path.join(FUZZ_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_files(name: str) -> list[str]:
    directory = os.path.join(CORPUS_DIR, name)
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory))


def write_seeds() -> None:
    """(Re)write fuzz/corpus/<target>/seed-NN from every target's ``seeds()``."""
    for name in TARGETS:
        directory = os.path.join(CORPUS_DIR, name)
        os.makedirs(directory, exist_ok=True)
        for i, seed in enumerate(load_target(name).seeds()):
            with open(os.path.join(directory, f"seed-{i:02d}"), "wb") as f:
                f.write(seed)


def run(path: str) -> None:
    """Fuzz the target in file ``path`` under atheris with this process's argv
    (libFuzzer flags such as ``-atheris_runs=N``, corpus directories); never
    returns.  A target's ``__main__`` calls it before anything imports pyvmm, so
    that pyvmm's modules (and only they) are instrumented as they are imported.
    Refusals are not printed: the code under test logs every one as a warning."""
    import atheris

    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger().addHandler(logging.NullHandler())   # no last-resort printing
    with atheris.instrument_imports(include=["pyvmm"]):
        target = load_target(os.path.splitext(os.path.basename(path))[0])
    atheris.Setup(sys.argv, target.fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-seeds"]:
        write_seeds()
    else:
        sys.exit(f"usage: {sys.argv[0]} --write-seeds")
