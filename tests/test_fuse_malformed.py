"""Hypothesis against FuseServer: whatever the guest sends, the server answers sanely.

The properties, for every generated request:
* ``handle`` never raises;
* it returns 0 (no reply) or a used length of at least an out header that fits
  the reply area, and the out header says the same length, echoes ``unique``
  and carries 0 or a small negative errno (a header alone when it is an error);
* FORGET / BATCH_FORGET never write a single reply byte;
* nothing outside the shared directory changes (a sentinel directory next to
  the share, reachable from inside only through symlinks, is compared after
  every example);
* after DESTROY every descriptor the fuzzing opened is closed again;
* the server never logs an internal error (an exception other than OSError).

SYNCFS, FALLOCATE and COPY_FILE_RANGE are left out of the structured requests:
with random sizes they would make the host sync the disk, reserve gigabytes or
copy sparse gigabytes.  They still get raw random bytes.
"""

from __future__ import annotations

import errno
import logging
import os
from ctypes import sizeof

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuse_fakes import IN, OUT, LINUX_FLAGS, FakeDax, FuseClient, in_header, open_fds
from pyvmm.virtiofsd import fuse_abi as abi
from pyvmm.virtiofsd.iovec import IoVec
from pyvmm.virtiofsd.passthrough import Passthrough
from pyvmm.virtiofsd.server import FuseServer

FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

ARG_STRUCTS = {
    abi.FUSE_GETATTR: abi.fuse_getattr_in, abi.FUSE_SETATTR: abi.fuse_setattr_in,
    abi.FUSE_MKNOD: abi.fuse_mknod_in, abi.FUSE_MKDIR: abi.fuse_mkdir_in,
    abi.FUSE_RENAME: abi.fuse_rename_in, abi.FUSE_RENAME2: abi.fuse_rename2_in,
    abi.FUSE_LINK: abi.fuse_link_in, abi.FUSE_OPEN: abi.fuse_open_in,
    abi.FUSE_OPENDIR: abi.fuse_open_in, abi.FUSE_CREATE: abi.fuse_create_in,
    abi.FUSE_READ: abi.fuse_read_in, abi.FUSE_READDIR: abi.fuse_read_in,
    abi.FUSE_READDIRPLUS: abi.fuse_read_in, abi.FUSE_WRITE: abi.fuse_write_in,
    abi.FUSE_RELEASE: abi.fuse_release_in, abi.FUSE_RELEASEDIR: abi.fuse_release_in,
    abi.FUSE_FLUSH: abi.fuse_flush_in, abi.FUSE_FSYNC: abi.fuse_fsync_in,
    abi.FUSE_FSYNCDIR: abi.fuse_fsync_in, abi.FUSE_SETXATTR: abi.fuse_getxattr_in,
    abi.FUSE_GETXATTR: abi.fuse_getxattr_in, abi.FUSE_LISTXATTR: abi.fuse_getxattr_in,
    abi.FUSE_ACCESS: abi.fuse_access_in, abi.FUSE_LSEEK: abi.fuse_lseek_in,
    abi.FUSE_SETUPMAPPING: abi.fuse_setupmapping_in,
    abi.FUSE_REMOVEMAPPING: abi.fuse_removemapping_in, abi.FUSE_INIT: abi.fuse_init_in,
    abi.FUSE_FORGET: abi.fuse_forget_in, abi.FUSE_BATCH_FORGET: abi.fuse_batch_forget_in,
}
NAME_OPS = [abi.FUSE_LOOKUP, abi.FUSE_UNLINK, abi.FUSE_RMDIR, abi.FUSE_SYMLINK,
            abi.FUSE_REMOVEXATTR, abi.FUSE_READLINK, abi.FUSE_STATFS, abi.FUSE_DESTROY]
EXCLUDED = {abi.FUSE_SYNCFS, abi.FUSE_FALLOCATE, abi.FUSE_COPY_FILE_RANGE}
OPCODES = sorted(set(ARG_STRUCTS) | set(NAME_OPS))

names = st.one_of(
    st.sampled_from([b"file", b"dir", b"escape", b"abs", b"..", b".", b"", b"new", b"/",
                     b"../outside", b"/etc/passwd", b"dir/inner", b"a" * 300]),
    st.binary(max_size=20))
nodeids = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 2**64 - 1]), st.integers(0, 2**64 - 1))
u32 = st.integers(0, 2**32 - 1)


@st.composite
def struct_bytes(draw, cls):
    """A structure with every field random, biased to small and extreme values."""
    raw = bytearray(draw(st.binary(min_size=sizeof(cls), max_size=sizeof(cls))))
    obj = cls.from_buffer(raw)
    for fname, ftype, *_ in cls._fields_:
        if hasattr(ftype, "_length_") or not draw(st.booleans()):
            continue
        bits = sizeof(ftype) * 8
        value = draw(st.one_of(st.integers(0, 8), st.sampled_from([2**bits - 1, 2**(bits - 1),
                                                                   4096, 2 << 20, 1 << 20]),
                               st.integers(0, 2**bits - 1)))
        setattr(obj, fname, value)
    return bytes(raw)


@st.composite
def requests(draw):
    """A request with a plausible shape and implausible contents."""
    opcode = draw(st.sampled_from(OPCODES))
    args = b""
    cls = ARG_STRUCTS.get(opcode)
    if cls is not None:
        args = draw(struct_bytes(cls))
        if draw(st.booleans()):
            args = args[:draw(st.integers(0, len(args)))]       # cut short
    for _ in range(draw(st.integers(0, 2))):
        name = draw(names)
        args += name + (b"\0" if draw(st.integers(0, 4)) else b"")   # sometimes no NUL
    if opcode == abi.FUSE_REMOVEMAPPING:
        args += draw(st.binary(max_size=64))
    args += draw(st.binary(max_size=24))                         # data / garbage
    length = IN + len(args)
    length = draw(st.one_of(st.just(length), st.integers(0, length + 8), u32))
    header = in_header(opcode, length, nodeid=draw(nodeids), unique=draw(st.integers(0, 2**64 - 1)),
                       uid=draw(st.sampled_from([0, 1000, 2**32 - 1])),
                       gid=draw(st.sampled_from([0, 1000, 2**32 - 1])))
    trailing = draw(st.binary(max_size=16))
    return header + args + trailing


class _Errors(logging.Handler):
    """Collects ERROR records: the server logs at ERROR only for its own bugs (an
    exception that is not an OSError), never for a bad request."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def no_internal_errors():
    handler = _Errors()
    logger = logging.getLogger("pyvmm.virtiofsd")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == []


def make_env(tmp_path_factory, label: str):
    base = tmp_path_factory.mktemp(label)
    share, outside = base / "share", base / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not touch")
    (share / "file").write_bytes(b"0123456789" * 10)
    (share / "dir").mkdir()
    (share / "dir" / "inner").write_bytes(b"inner")
    os.symlink("../outside", share / "escape")
    os.symlink(str(outside / "secret"), share / "abs")
    baseline_fds = open_fds()
    fs = Passthrough(str(share))
    server = FuseServer(fs, dax=FakeDax())
    client = FuseClient(server)
    client.init(flags=LINUX_FLAGS | abi.FUSE_MAP_ALIGNMENT)
    for name in (b"file", b"dir", b"escape", b"abs"):      # node ids 2..5
        client.lookup(name)
    client.open(2)                                          # fh 1
    client.opendir(3)                                       # fh 2
    env = {"server": server, "client": client, "fs": fs, "share": share, "outside": outside,
           "baseline_fds": baseline_fds}
    return env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The share the fuzzing requests are let loose on (anything may happen inside)."""
    env = make_env(tmp_path_factory, "fuzz")
    yield env
    env["fs"].close()
    assert open_fds() == env["baseline_fds"]


@pytest.fixture
def calm(tmp_path_factory):
    """A share only well-understood requests touch, for tests that check results
    (function-scoped: hypothesis shares it between the examples of one test)."""
    env = make_env(tmp_path_factory, "calm")
    yield env
    env["fs"].close()


def outside_state(outside) -> list:
    return sorted((p.name, p.stat().st_mode, p.read_bytes()) for p in outside.iterdir())


def check_reply(data: bytes, reply: bytearray, used: int) -> None:
    assert isinstance(used, int) and 0 <= used <= len(reply)
    if used == 0:
        return
    assert used >= OUT
    out = abi.fuse_out_header.from_buffer_copy(reply)
    assert out.len == used
    assert out.unique == abi.fuse_in_header.from_buffer_copy(data).unique
    assert -512 < out.error <= 0
    if out.error:
        assert used == OUT


def serve(env, data: bytes, reply_size: int) -> tuple[bytearray, int]:
    reply = bytearray(reply_size)
    used = env["server"].handle(IoVec.of(data), IoVec.of(reply))
    check_reply(data, reply, used)
    return reply, used


def reinit_if_needed(env) -> None:
    if env["server"].session is None:
        env["client"].init(flags=LINUX_FLAGS | abi.FUSE_MAP_ALIGNMENT)


@FUZZ
@given(data=st.binary(max_size=300), reply_size=st.integers(0, 600))
@example(data=b"", reply_size=100)
@example(data=b"\x28" + bytes(38), reply_size=100)
@example(data=bytes(40), reply_size=0)
def test_random_bytes(env, data, reply_size):
    reinit_if_needed(env)
    before = outside_state(env["outside"])
    reply, used = serve(env, data, reply_size)
    if len(data) < IN:
        assert used == 0
    assert outside_state(env["outside"]) == before


@FUZZ
@given(data=requests(), reply_size=st.sampled_from([0, 8, 16, 17, 64, 143, 144, 160, 4096]))
def test_structured_requests(env, data, reply_size):
    reinit_if_needed(env)
    before = outside_state(env["outside"])
    reply, used = serve(env, data, reply_size)
    opcode = abi.fuse_in_header.from_buffer_copy(data).opcode
    if opcode in (abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET):
        assert used == 0 and reply == bytearray(reply_size)
    assert outside_state(env["outside"]) == before


@FUZZ
@given(opcode=st.integers(0, 2**32 - 1).filter(lambda o: o not in abi.OPCODE_NAMES),
       args=st.binary(max_size=64))
def test_unknown_opcodes_get_enosys(env, opcode, args):
    reinit_if_needed(env)
    data = in_header(opcode, IN + len(args)) + args
    reply, used = serve(env, data, 64)
    assert used == OUT
    assert abi.fuse_out_header.from_buffer_copy(reply).error == -errno.ENOSYS


@FUZZ
@given(name=st.binary(min_size=1, max_size=40).filter(lambda n: b"\0" not in n),
       opcode=st.sampled_from([abi.FUSE_LOOKUP, abi.FUSE_UNLINK, abi.FUSE_RMDIR,
                               abi.FUSE_REMOVEXATTR]))
def test_names_without_nul_are_einval(env, name, opcode):
    reinit_if_needed(env)
    data = in_header(opcode, IN + len(name)) + name
    reply, used = serve(env, data, 256)
    assert abi.fuse_out_header.from_buffer_copy(reply).error == -errno.EINVAL


@FUZZ
@given(before=st.binary(max_size=10).filter(lambda n: b"\0" not in n),
       after=st.binary(max_size=10).filter(lambda n: b"\0" not in n),
       opcode=st.sampled_from([abi.FUSE_LOOKUP, abi.FUSE_UNLINK, abi.FUSE_RMDIR,
                               abi.FUSE_MKDIR, abi.FUSE_SYMLINK]))
def test_names_with_a_slash_are_einval(env, before, after, opcode):
    reinit_if_needed(env)
    name = before + b"/" + after
    prefix = bytes(abi.fuse_mkdir_in(0o755)) if opcode == abi.FUSE_MKDIR else b""
    suffix = b"target\0" if opcode == abi.FUSE_SYMLINK else b""
    args = prefix + name + b"\0" + suffix
    reply, used = serve(env, in_header(opcode, IN + len(args)) + args, 256)
    assert abi.fuse_out_header.from_buffer_copy(reply).error == -errno.EINVAL


@FUZZ
@given(length=u32, extra=st.binary(max_size=64))
def test_header_len_beyond_the_bytes_present_is_einval(env, length, extra):
    reinit_if_needed(env)
    data = in_header(abi.FUSE_GETATTR, 0) + extra
    if IN <= length <= len(data):
        length = len(data) + 1
    data = in_header(abi.FUSE_GETATTR, length) + extra
    reply, used = serve(env, data, 64)
    assert used == OUT and abi.fuse_out_header.from_buffer_copy(reply).error == -errno.EINVAL


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=100))
def test_garbage_after_a_valid_request_is_ignored(calm, garbage):
    env = calm
    args = b"file\0"
    data = in_header(abi.FUSE_LOOKUP, IN + len(args)) + args + garbage
    reply, used = serve(env, data, 256)
    out = abi.fuse_out_header.from_buffer_copy(reply)
    assert out.error == 0 and used == OUT + sizeof(abi.fuse_entry_out)
    nodeid = abi.fuse_entry_out.from_buffer_copy(reply, OUT).nodeid
    env["client"].forget(nodeid, 1)


@FUZZ
@given(size=u32, offset=st.integers(0, 2**64 - 1), room=st.integers(0, 300))
def test_read_sizes(calm, size, offset, room):
    env = calm
    fh = env["client"].open(2).fh
    try:
        args = bytes(abi.fuse_read_in(fh=fh, offset=offset, size=size))
        data = in_header(abi.FUSE_READ, IN + len(args), nodeid=2) + args
        reply, used = serve(env, data, room)
        if used > OUT:
            content = (env["share"] / "file").read_bytes()
            assert bytes(reply[OUT:used]) == content[offset:offset + used - OUT]
            assert used - OUT <= min(size, room - OUT)
    finally:
        env["client"].release(2, fh)


@FUZZ
@given(count=u32, present=st.integers(0, 300))
def test_removemapping_counts(env, count, present):
    reinit_if_needed(env)
    args = bytes(abi.fuse_removemapping_in(count=count)) + bytes(abi.fuse_removemapping_one(
        0, 2 << 20)) * present
    reply, used = serve(env, in_header(abi.FUSE_REMOVEMAPPING, IN + len(args)) + args, 64)
    error = abi.fuse_out_header.from_buffer_copy(reply).error
    ok = count <= abi.FUSE_REMOVEMAPPING_MAX_ENTRY and count <= present
    assert error == (0 if ok else -errno.EINVAL)


def test_everything_is_released_after_destroy(env):
    """Runs last in this module: DESTROY closes every handle and inode the fuzzing made."""
    reinit_if_needed(env)
    env["client"].destroy()
    assert env["fs"].counts() == (1, 0)
    # the root fd and /proc/self/fd are all that stays open
    assert len(open_fds() - env["baseline_fds"]) == 2
