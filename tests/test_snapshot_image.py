"""The snapshot directory (pyvmm.snapshot.image) and the machine shape checks
(pyvmm.snapshot.machine), without KVM."""

from __future__ import annotations

import json
import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import __version__
from pyvmm.memory import GuestMemory, copy_data
from pyvmm.platform import Flavour
from pyvmm.shares import ShareConfig
from pyvmm.snapshot import image
from pyvmm.snapshot.image import SnapshotError
from pyvmm.snapshot.machine import check_host, machine_config

MiB = 1 << 20
PVM = Flavour("pvm", "kvm_pvm", "test")


def machine(memory: int = 4 * MiB, **changes) -> dict:
    return {"memory": memory, "cpus": 1, "cmdline": "console=ttyS0", "disks": [],
            "fs": [{"tag": "data", "num_queues": 1, "queue_size": 1024, "dax": True,
                    "cache_size": 32 * MiB}],
            "rng": False, "console": False, "agent": True, **changes}


def state(memory: int = 4 * MiB) -> dict:
    return {"format": image.FORMAT, "version": image.FORMAT_VERSION, "pyvmm_version": __version__,
            "created": image.now_iso(), "host": {"flavour": "pvm", "kvm_module": "kvm_pvm",
                                                  "cpu": "test", "machine": os.uname().machine},
            "machine": machine(memory), "kvm": {"vm": {}, "vcpus": []}, "devices": {}}


def ram(size: int = 4 * MiB) -> bytearray:
    data = bytearray(size)
    data[0:5] = b"hello"
    data[3 * MiB + 4096:3 * MiB + 4100] = b"tail"
    return data


def test_write_then_load_round_trip_sparse(tmp_path):
    path = tmp_path / "snap"
    image.write(str(path), state(), memoryview(ram()))
    assert sorted(os.listdir(path)) == [image.MEMORY_FILE, image.STATE_FILE]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".snap.tmp")]
    st = os.stat(path / image.MEMORY_FILE)
    assert st.st_size == 4 * MiB and st.st_blocks * 512 <= 64 * 1024   # holes for zero pages
    snap = image.load(str(path))
    assert snap.machine["memory"] == 4 * MiB
    with open(snap.memory_path, "rb") as f:
        assert f.read() == bytes(ram())


def test_write_refuses_an_existing_snapshot_but_takes_an_empty_dir(tmp_path):
    path = tmp_path / "snap"
    path.mkdir()
    image.write(str(path), state(), memoryview(ram()))   # an empty directory is fine
    with pytest.raises(SnapshotError, match="exists"):
        image.write(str(path), state(), memoryview(ram()))


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image.json, "dump", boom)
    with pytest.raises(OSError):
        image.write(str(tmp_path / "snap"), state(), memoryview(ram()))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def snap(tmp_path):
    path = tmp_path / "snap"
    image.write(str(path), state(), memoryview(ram()))
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update(format="other"), "not a pyvmm snapshot"),
    (lambda s: s.update(version=2), "format version"),
    (lambda s: s.update(pyvmm_version="9.9"), "written by pyvmm 9.9"),
    (lambda s: s.pop("kvm"), "incomplete"),
    (lambda s: s["memory"].update(size=8 * MiB), "memory size"),
    (lambda s: s["memory"].update(samples={}), "samples"),
])
def test_load_refuses_bad_state(snap, edit, words):
    s = json.loads((snap / image.STATE_FILE).read_text())
    edit(s)
    (snap / image.STATE_FILE).write_text(json.dumps(s))
    with pytest.raises(SnapshotError, match=words):
        image.load(str(snap))


def test_load_refuses_bad_files(snap, tmp_path):
    with pytest.raises(SnapshotError, match="not a snapshot directory"):
        image.load(str(tmp_path / "nothing"))
    with open(snap / image.MEMORY_FILE, "r+b") as f:
        f.write(b"changed")
    with pytest.raises(SnapshotError, match="does not match"):
        image.load(str(snap))
    os.truncate(snap / image.MEMORY_FILE, MiB)
    with pytest.raises(SnapshotError, match="truncated"):
        image.load(str(snap))
    (snap / image.STATE_FILE).write_text("{not json")
    with pytest.raises(SnapshotError, match="corrupt"):
        image.load(str(snap))
    (snap / image.STATE_FILE).unlink()
    with pytest.raises(SnapshotError, match="not a \\(complete\\)"):
        image.load(str(snap))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_garbage_state_is_one_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("g")
    (path / image.STATE_FILE).write_bytes(data)
    with pytest.raises(SnapshotError):
        image.load(str(path))


def test_memory_from_snapshot_private_and_shared(snap):
    for shared in (False, True):
        mem = GuestMemory.from_snapshot(str(snap / image.MEMORY_FILE), 4 * MiB, shared=shared)
        try:
            assert mem.read(0, 5) == b"hello" and mem.private is (not shared)
            mem.write(0, b"HELLO")      # the guest writes: never into the snapshot
        finally:
            mem.close()
    with open(snap / image.MEMORY_FILE, "rb") as f:
        assert f.read(5) == b"hello"


def test_copy_data_copies_extents_only(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(5 * MiB)
        f.write(b"x" * 4096)
    dest = mmap.mmap(-1, 8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert copy_data(fd, dest, 8 * MiB) <= 1 * MiB
    finally:
        os.close(fd)
    assert dest[5 * MiB:5 * MiB + 4096] == b"x" * 4096 and dest[0:4096] == bytes(4096)


# --- the machine a snapshot describes --------------------------------------------------------
def loaded(tmp_path, **changes):
    s = state()
    s["machine"].update(changes)
    path = tmp_path / "snap"
    image.write(str(path), s, memoryview(ram()))
    return image.load(str(path))


def test_machine_config_takes_the_shares_of_this_run(tmp_path):
    snap = loaded(tmp_path)
    share = ShareConfig(str(tmp_path), "data", dax=True)
    config = machine_config(snap, [share], {})
    assert config.memory == 4 * MiB and config.cpus == 1
    assert [(f.tag, f.dax, f.cache_size) for f in config.shares] == [("data", True, 32 * MiB)]
    assert config.agent_words == "pyvmm.share=data:dax"
    config = machine_config(snap, [], {"data": "/run/vfs.sock"})
    assert config.shares[0].socket == "/run/vfs.sock" and config.agent_words == ""


@pytest.mark.parametrize("shares, fs, words", [
    ([], {}, "give it a back-end"),
    ([ShareConfig("/tmp", "other")], {"data": "/x"}, "no virtio-fs device 'other'"),
    ([ShareConfig("/tmp", "data")], {"data": "/x"}, "not both"),
])
def test_machine_config_refuses_shares_that_do_not_fit(tmp_path, shares, fs, words):
    with pytest.raises(ValueError, match=words):
        machine_config(loaded(tmp_path), shares, fs)


@pytest.mark.parametrize("changes, words", [
    ({"cpus": 0}, "machine.cpus: 0 is not in 1..64"), ({"cpus": "1"}, "machine.cpus: expected an integer"),
    ({"agent": False}, "no agent"),
    ({"disks": [{"path": "/no/such/disk", "readonly": False}]}, "does not exist"),
    ({"fs": [{"tag": "data"}]}, "machine.fs\\[0\\]: missing num_queues"),
])
def test_machine_config_checks_the_shape(tmp_path, changes, words):
    with pytest.raises(ValueError, match=words):
        machine_config(loaded(tmp_path, **changes), [ShareConfig("/tmp", "data")], {})


def test_check_host_refuses_another_flavour(snap):
    s = image.load(str(snap))
    check_host(s, PVM)
    with pytest.raises(SnapshotError, match="hardware"):
        check_host(s, Flavour("hardware", "kvm_intel", "test"))
