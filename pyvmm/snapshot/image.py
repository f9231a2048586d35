"""A snapshot directory: what it holds, how it is written, how it is checked.

::

    DIR/snapshot.json   the machine as data (format, versions, host, shape, state)
    DIR/memory.bin      guest RAM, byte for byte (sparse: all-zero pages are holes)

``snapshot.json`` (format "pyvmm-snapshot", version ``FORMAT_VERSION``)::

    {"format", "version", "pyvmm_version", "created",
     "host":    {"flavour", "kvm_module", "cpu"},          # where it was taken
     "machine": {"memory", "cpus", "cmdline", "disks", "fs", "rng",
                 "console", "agent"},                       # what the guest enumerated
     "memory":  {"file", "size", "samples"},                # RAM file check
     "kvm":     {"vm": VmState, "vcpus": [VcpuState]},      # pyvmm.snapshot.kvm_state
     "devices": {...}}                                      # each device's save_state()

Writing goes to a sibling directory with a temporary name that is renamed to
DIR at the very end, so a crash never leaves something that looks like a
complete snapshot.  Reading treats every byte as untrusted: ``load`` raises
``SnapshotError`` (one line, for the CLI's exit 2) for a missing, truncated,
corrupt or foreign snapshot, and never writes into DIR.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .. import __version__

FORMAT = "pyvmm-snapshot"
FORMAT_VERSION = 1
STATE_FILE = "snapshot.json"
MEMORY_FILE = "memory.bin"
PAGE = 4096
SAMPLES = 64                 # pages hashed to recognise the RAM file (cheap at restore)
MAX_STATE_BYTES = 64 << 20   # a snapshot.json larger than this is not ours
ZERO_PAGE = bytes(PAGE)
CHUNK = 2 << 20


class SnapshotError(ValueError):
    """A snapshot that cannot be used; the message is one line."""


@dataclass
class Snapshot:
    """A loaded, checked snapshot: the parsed JSON and the RAM file's path."""

    path: str
    state: dict[str, Any]

    @property
    def memory_path(self) -> str:
        return os.path.join(self.path, MEMORY_FILE)

    @property
    def machine(self) -> dict[str, Any]:
        return self.state["machine"]


# --- writing ------------------------------------------------------------------------------
def write(path: str, state: dict[str, Any], ram: memoryview) -> None:
    """Write a snapshot of ``state`` and ``ram`` to ``path`` (which must not exist, or be
    an empty directory); atomically visible, all at once, under that name."""
    path = check_target(path)
    parent = os.path.dirname(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        samples = _write_memory(os.path.join(tmp, MEMORY_FILE), ram)
        state = {**state, "memory": {"file": MEMORY_FILE, "size": len(ram), "samples": samples}}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(path: str) -> str:
    """``path`` as absolute, if a snapshot may be written there: it does not exist (or
    is an empty directory) and its parent directory does; SnapshotError otherwise."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise SnapshotError(f"{path} exists and is not an empty directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise SnapshotError(f"{path}: directory {os.path.dirname(path)} does not exist")
    return path


def _write_memory(path: str, ram: memoryview) -> dict[str, str]:
    """Copy guest RAM into a sparse file (all-zero pages stay holes); returns the
    sample hashes that ``load`` checks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, len(ram))
        for start in range(0, len(ram), CHUNK):
            chunk = ram[start:start + CHUNK]
            if chunk == bytes(len(chunk)):
                continue
            for off in range(0, len(chunk), PAGE):
                page = chunk[off:off + PAGE]
                if page != ZERO_PAGE:
                    os.pwrite(fd, page, start + off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {str(off): _page_hash(ram[off:off + PAGE]) for off in sample_offsets(len(ram))}


def sample_offsets(size: int) -> list[int]:
    pages = size // PAGE
    return sorted({(i * pages // SAMPLES) * PAGE for i in range(SAMPLES)} | {size - PAGE})


def _page_hash(page) -> str:
    return hashlib.sha256(page).hexdigest()[:16]


# --- reading --------------------------------------------------------------------------------
def load(path: str) -> Snapshot:
    """Read and check a snapshot directory; SnapshotError when it cannot be used.
    Only reads: nothing in ``path`` is created or changed."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path):
        raise SnapshotError(f"{path} is not a snapshot directory")
    try:
        with open(state_path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        raise SnapshotError(f"{path} has no {STATE_FILE}: not a (complete) pyvmm snapshot") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {state_path}: {e.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise SnapshotError(f"{state_path} is larger than {MAX_STATE_BYTES >> 20} MiB: not a pyvmm snapshot")
    try:
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{state_path} is corrupt: {e}") from None
    _check_header(state, state_path)
    snap = Snapshot(path, state)
    _check_memory(snap)
    return snap


def _check_header(state: object, where: str) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SnapshotError(f"{where} is not a pyvmm snapshot")
    if state.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"{where}: snapshot format version {state.get('version')!r}; "
                            f"this pyvmm reads version {FORMAT_VERSION}")
    for key in ("pyvmm_version", "host", "machine", "memory", "kvm", "devices"):
        if key not in state:
            raise SnapshotError(f"{where} is incomplete: no {key!r}")
    if state["pyvmm_version"] != __version__:
        raise SnapshotError(f"{where} was written by pyvmm {state['pyvmm_version']}, "
                            f"this is pyvmm {__version__}")


def _check_memory(snap: Snapshot) -> None:
    memory = snap.state["memory"]
    if not isinstance(memory, dict) or memory.get("file") != MEMORY_FILE:
        raise SnapshotError(f"{snap.path}: bad memory section")
    size, samples = memory.get("size"), memory.get("samples")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % PAGE:
        raise SnapshotError(f"{snap.path}: bad memory size {size!r}")
    if size != snap.machine.get("memory"):
        raise SnapshotError(f"{snap.path}: memory size {size} is not the machine's {snap.machine.get('memory')!r}")
    try:
        actual = os.stat(snap.memory_path).st_size
    except OSError as e:
        raise SnapshotError(f"{snap.memory_path}: {e.strerror}") from None
    if actual != size:
        raise SnapshotError(f"{snap.memory_path} has {actual} bytes, the snapshot says {size}: "
                            "truncated or not this snapshot's")
    if not isinstance(samples, dict) or set(samples) != {str(o) for o in sample_offsets(size)}:
        raise SnapshotError(f"{snap.path}: bad memory samples")
    with open(snap.memory_path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        for off in sample_offsets(size):
            if _page_hash(m[off:off + PAGE]) != samples[str(off)]:
                raise SnapshotError(f"{snap.memory_path} does not match the snapshot "
                                    f"(page at {off:#x} differs): corrupt or replaced")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
