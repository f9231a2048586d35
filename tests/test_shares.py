"""--share's pieces (pyvmm.shares) without a guest."""

import os
import socket
import tempfile

import pytest

from pyvmm.shares import SUN_PATH_MAX, ShareConfig, remove_socket_dir, socket_dir, start_backend


def test_guest_words():
    assert ShareConfig("/d", "t").guest_word() == "pyvmm.share=t"
    assert ShareConfig("/d", "t", dax=True, readonly=True).guest_word() == "pyvmm.share=t:dax:ro"


def test_socket_dir_falls_back_to_tmp_when_tmpdir_is_too_deep(tmp_path, monkeypatch):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
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
        d = socket_dir("pyvmm-test-", "vhost-user.sock")
        assert os.path.dirname(d) == shallow
        os.rmdir(d)
    finally:
        os.rmdir(shallow)


def test_socket_dir_is_private_and_new_and_a_missing_tmpdir_means_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "gone"))
    a = socket_dir("pyvmm-test-", "s")
    b = socket_dir("pyvmm-test-", "s")
    try:
        assert os.path.dirname(a) == "/tmp" and a != b
        assert os.stat(a).st_mode & 0o777 == 0o700
    finally:
        os.rmdir(a)
        os.rmdir(b)


def test_remove_socket_dir_removes_the_socket_and_the_directory(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    d = socket_dir("p-", "s")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.join(d, "s"))
    remove_socket_dir(d)
    assert os.listdir(tmp_path) == []
    remove_socket_dir(d)   # already gone: nothing to say
    assert "cannot remove" not in caplog.text
    os.mkdir(d)
    os.mkdir(os.path.join(d, "deeper"))   # not what a socket directory holds
    remove_socket_dir(d)
    assert "cannot remove" in caplog.text


def test_a_backend_with_a_deep_tmpdir_starts_and_leaves_nothing(tmp_path, monkeypatch):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    shared = tmp_path / "shared"
    shared.mkdir()
    backend = start_backend(ShareConfig(str(shared), "t"), extra=("--sandbox", "none"))
    assert os.path.exists(backend.socket_path)
    backend.stop()
    assert not os.path.exists(backend.socket_dir)


def test_a_backend_that_cannot_start_is_one_error(tmp_path):
    with pytest.raises(ValueError, match="did not start"):
        start_backend(ShareConfig(str(tmp_path / "missing"), "t"))
