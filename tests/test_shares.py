"""--share's pieces (pyvmm.shares) without a guest."""

import os
import tempfile

import pytest

from pyvmm.shares import SUN_PATH_MAX, ShareConfig, socket_dir, start_backend


def test_guest_words():
    assert ShareConfig("/d", "t").guest_word() == "pyvmm.share=t"
    assert ShareConfig("/d", "t", dax=True, readonly=True).guest_word() == "pyvmm.share=t:dax:ro"


def test_socket_dir_falls_back_to_tmp_when_tmpdir_is_too_deep(tmp_path, monkeypatch):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr("tempfile.tempdir", None)
    d = socket_dir("pyvmm-test-", "vhost-user.sock")
    try:
        assert d.startswith("/tmp/pyvmm-test-")
        assert len(os.path.join(d, "vhost-user.sock")) <= SUN_PATH_MAX
        assert os.listdir(deep) == []   # nothing left where it did not fit
    finally:
        os.rmdir(d)
    shallow = tempfile.mkdtemp(prefix="s-", dir="/tmp")   # tmp_path may be too deep itself
    try:
        monkeypatch.setenv("TMPDIR", shallow)
        monkeypatch.setattr("tempfile.tempdir", None)   # tempfile caches what it found
        d = socket_dir("pyvmm-test-", "vhost-user.sock")
        assert os.path.dirname(d) == shallow
        os.rmdir(d)
    finally:
        os.rmdir(shallow)


def test_a_backend_with_a_deep_tmpdir_starts_and_leaves_nothing(tmp_path, monkeypatch):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr("tempfile.tempdir", None)
    shared = tmp_path / "shared"
    shared.mkdir()
    backend = start_backend(ShareConfig(str(shared), "t"), extra=("--sandbox", "none"))
    assert os.path.exists(backend.socket_path)
    backend.stop()
    assert not os.path.exists(backend.socket_dir)


def test_a_backend_that_cannot_start_is_one_error(tmp_path):
    with pytest.raises(ValueError, match="did not start"):
        start_backend(ShareConfig(str(tmp_path / "missing"), "t"))
