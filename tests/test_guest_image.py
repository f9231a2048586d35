"""Tests for the guest image tools under guest/: mkcpio.py, the test helpers,
modules_order.py, build-initramfs.sh and /init (in a user-namespace sandbox).

gcc, cpio and busybox-static are CI prerequisites: a test that needs one of
them fails with a clear message when it is missing, it does not skip.
"""
from __future__ import annotations

import importlib.util
import lzma
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guest"


def load_module(name: str):
    """Import guest/NAME.py (guest/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, GUEST / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


mkcpio = load_module("mkcpio")
modules_order = load_module("modules_order")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: apt-get install {package}")
    return path


# ---------------------------------------------------------------------------
# An independent newc reader (cpio(5) "New ASCII Format"), used to check mkcpio.


@dataclass
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes
    header_offset: int
    data_offset: int


def read_newc(blob: bytes) -> list[Member]:
    """Parse every member up to and including TRAILER!!!, checking alignment."""
    members = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"member at unaligned offset {pos}"
        assert blob[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(blob[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        (ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize,
         check) = fields
        assert check == 0
        name_start = pos + 110
        name = blob[name_start:name_start + namesize]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        data_start = name_start + namesize
        data_start += (-data_start) % 4
        assert blob[name_start + namesize:data_start] == b"\0" * (data_start - name_start - namesize)
        data = blob[data_start:data_start + size]
        end = data_start + size
        pad_end = end + (-end) % 4
        assert blob[end:pad_end] == b"\0" * (pad_end - end), "data padding not NUL"
        members.append(Member(name[:-1].decode(), ino, mode, uid, gid, nlink, mtime,
                              (rmaj, rmin), data, pos, data_start))
        pos = pad_end
        if members[-1].name == "TRAILER!!!":
            assert pos == len(blob), "bytes after the trailer"
            return members


def sample_entries(tmp: Path) -> list:
    E = mkcpio.Entry
    return [
        E("/init", stat.S_IFREG | 0o755, data=b"#!/bin/sh\necho hi\n"),
        E("bin/busybox", stat.S_IFREG | 0o755, data=b"\x7fELF" + bytes(range(256)) * 3),
        E("bin/sh", stat.S_IFLNK | 0o777, data=b"busybox"),
        E("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        E("tmp", stat.S_IFDIR | 0o1777),
        E("a/b/c/deep", stat.S_IFREG | 0o644, data=b"x"),  # parents added automatically
        E("empty", stat.S_IFREG | 0o644),
    ]


EXPECTED_NAMES = ["a", "a/b", "a/b/c", "a/b/c/deep", "bin", "bin/busybox", "bin/sh",
                  "dev", "dev/console", "empty", "init", "tmp"]


def test_mkcpio_round_trip(tmp_path):
    blob = mkcpio.archive_bytes(sample_entries(tmp_path), mtime=1234)
    members = read_newc(blob)
    assert [m.name for m in members] == EXPECTED_NAMES + ["TRAILER!!!"]
    by_name = {m.name: m for m in members}
    assert by_name["init"].data == b"#!/bin/sh\necho hi\n"
    assert by_name["init"].mode == stat.S_IFREG | 0o755
    assert by_name["bin/busybox"].data.startswith(b"\x7fELF")
    assert by_name["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert by_name["bin/sh"].data == b"busybox"
    assert by_name["a/b"].mode == stat.S_IFDIR | 0o755
    assert by_name["a/b"].nlink == 2
    assert by_name["tmp"].mode == stat.S_IFDIR | 0o1777
    assert by_name["empty"].data == b""
    body = [m for m in members if m.name != "TRAILER!!!"]
    assert all(m.mtime == 1234 and m.uid == 0 and m.gid == 0 for m in body)
    assert sorted(m.ino for m in body) == list(range(1, len(body) + 1))
    assert all(m.data_offset % 4 == 0 for m in members)


def test_mkcpio_device_node(tmp_path):
    members = read_newc(mkcpio.archive_bytes(sample_entries(tmp_path)))
    console = next(m for m in members if m.name == "dev/console")
    assert stat.S_ISCHR(console.mode)
    assert stat.S_IMODE(console.mode) == 0o600
    assert console.rdev == (5, 1)
    assert console.data == b""


def test_mkcpio_header_layout():
    entry = mkcpio.Entry("ab", stat.S_IFREG | 0o644, data=b"12345")
    raw = mkcpio.member(entry, ino=7, mtime=0)
    # 110-byte header + "ab\0" = 113, padded to 116; 5 data bytes padded to 8.
    assert raw[:6] == b"070701"
    assert raw[6:14] == b"00000007"
    assert raw[14:22] == b"000081A4"  # S_IFREG | 0644
    assert raw[54:62] == b"00000005"  # c_filesize
    assert raw[94:102] == b"00000003"  # c_namesize includes the NUL
    assert raw[110:116] == b"ab\0\0\0\0"
    assert raw[116:] == b"12345\0\0\0"
    assert len(raw) == 124


def test_mkcpio_is_reproducible(tmp_path):
    entries = sample_entries(tmp_path)
    assert mkcpio.archive_bytes(entries) == mkcpio.archive_bytes(list(reversed(entries)))


def test_mkcpio_rejects_bad_input():
    E = mkcpio.Entry
    with pytest.raises(ValueError):
        mkcpio.archive_bytes([E("x", stat.S_IFDIR | 0o755), E("/x", stat.S_IFDIR | 0o755)])
    with pytest.raises(ValueError):
        mkcpio.archive_bytes([E("../etc/passwd", stat.S_IFREG | 0o644)])
    with pytest.raises(ValueError):
        mkcpio.parse_list("nod /dev/x 0600 0 0 q 1 2\n", Path("."))
    with pytest.raises(ValueError):
        mkcpio.parse_list("frobnicate /x\n", Path("."))


def test_mkcpio_cli_and_gnu_cpio(tmp_path):
    cpio = need("cpio", "cpio")
    (tmp_path / "hello").write_bytes(b"hello world\n")
    listing = tmp_path / "list"
    listing.write_text(
        "# comment\n"
        "dir /bin 0755 0 0\n"
        "file /bin/hello hello 0644 0 0\n"
        "slink /bin/sh busybox 0777 0 0\n"
        "nod /dev/console 0600 0 0 c 5 1\n"
        "\n"
        "dir /tmp 1777 0 0\n"
    )
    out = tmp_path / "out.cpio"
    assert mkcpio.main([str(listing), str(out)]) == 0
    names = subprocess.run([cpio, "-t", "--quiet"], input=out.read_bytes(),
                           capture_output=True, check=True).stdout.decode().split()
    assert names == ["bin", "bin/hello", "bin/sh", "dev", "dev/console", "tmp"]
    verbose = subprocess.run([cpio, "-tv", "--quiet"], input=out.read_bytes(),
                             capture_output=True, check=True).stdout.decode()
    console = next(line for line in verbose.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert "bin/sh -> busybox" in verbose
    hello = subprocess.run([cpio, "-i", "--quiet", "--to-stdout", "bin/hello"],
                           input=out.read_bytes(), capture_output=True, check=True)
    assert hello.stdout == b"hello world\n"


# ---------------------------------------------------------------------------
# Test helpers: pattern and mmapread, built for the host.

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def splitmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def py_pattern(size: int, seed: int, offset: int = 0) -> bytes:
    """The documented pattern: word i = splitmix64(seed + (i + 1) * golden), LE."""
    first = offset // 8
    words = (size + 7) // 8
    raw = b"".join(splitmix((seed + (first + i + 1) * GOLDEN) & MASK).to_bytes(8, "little")
                   for i in range(words))
    return raw[:size]


def py_fnv64w(data: bytes) -> int:
    """FNV-1a 64 over little-endian 64-bit words, then the tail bytes one by one."""
    h = 0xCBF29CE484222325
    whole = len(data) - len(data) % 8
    for w in memoryview(data[:whole]).cast("Q"):
        h = ((h ^ w) * 0x100000001B3) & MASK
    for b in data[whole:]:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> Path:
    gcc = need("gcc", "gcc libc6-dev")
    out = tmp_path_factory.mktemp("helpers")
    for name in ("pattern", "mmapread"):
        subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out / name),
                        str(GUEST / "helpers" / f"{name}.c")], check=True)
    return out


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


def test_pattern_matches_documented_generator(helpers, tmp_path):
    f = tmp_path / "small"
    assert run(helpers / "pattern", "write", f, "4099", "42").returncode == 0
    assert f.read_bytes() == py_pattern(4099, 42)
    assert run(helpers / "pattern", "check", f, "4099", "42").returncode == 0
    assert run(helpers / "pattern", "check", f, "4099", "43").returncode == 1


def test_pattern_write_check_sum_large(helpers, tmp_path):
    f = tmp_path / "big"
    size = 3 * 1024 * 1024 + 5  # several 1 MiB chunks and a ragged tail
    assert run(helpers / "pattern", "write", f, size, "0x1234").returncode == 0
    data = f.read_bytes()
    assert len(data) == size
    assert data[2 * 1024 * 1024:2 * 1024 * 1024 + 64] == py_pattern(64, 0x1234, 2 * 1024 * 1024)
    assert run(helpers / "pattern", "check", f, size, "0x1234").returncode == 0
    summed = run(helpers / "pattern", "sum", f)
    assert summed.returncode == 0
    assert summed.stdout == f"{py_fnv64w(data):016x} {size}\n"
    mapped = run(helpers / "mmapread", f)
    assert mapped.returncode == 0
    words = mapped.stdout.split()
    assert words[:2] == summed.stdout.split() and words[3] == "MB/s"
    float(words[2])


def test_pattern_detects_corruption_and_size(helpers, tmp_path):
    f = tmp_path / "f"
    assert run(helpers / "pattern", "write", f, "2M", "7").returncode == 0
    assert f.stat().st_size == 2 * 1024 * 1024
    with open(f, "r+b") as fh:
        fh.seek(1_500_001)
        old = fh.read(1)
        fh.seek(1_500_001)
        fh.write(bytes([old[0] ^ 1]))
    bad = run(helpers / "pattern", "check", f, "2M", "7")
    assert bad.returncode == 1 and "offset 1500001" in bad.stderr
    assert run(helpers / "pattern", "write", f, "100", "7").returncode == 0
    assert run(helpers / "pattern", "check", f, "99", "7").returncode == 1
    assert run(helpers / "pattern", "check", f, "101", "7").returncode == 1
    assert run(helpers / "pattern", "check", tmp_path / "missing", "1", "7").returncode == 1


def test_pattern_usage_and_empty_files(helpers, tmp_path):
    assert run(helpers / "pattern").returncode == 2
    assert run(helpers / "pattern", "write", tmp_path / "x", "12Q", "1").returncode == 2
    assert run(helpers / "pattern", "frob", tmp_path / "x", "1", "1").returncode == 2
    empty = tmp_path / "empty"
    assert run(helpers / "pattern", "write", empty, "0", "1").returncode == 0
    assert run(helpers / "pattern", "check", empty, "0", "1").returncode == 0
    assert run(helpers / "pattern", "sum", empty).stdout == "cbf29ce484222325 0\n"
    assert run(helpers / "mmapread", empty).stdout.startswith("cbf29ce484222325 0 ")


# ---------------------------------------------------------------------------
# modules_order.py (Debian stock kernel modules)

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/fs/fuse/fuse.ko.xz:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko.xz kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
"""


def test_modules_load_order():
    deps = modules_order.parse_modules_dep(MODULES_DEP)
    order = modules_order.load_order(["virtiofs", "virtio_pci", "virtio_rng", "8250"], deps,
                                     {"8250"})
    names = [modules_order.module_name(p) for p in order]
    assert sorted(names) == sorted(set(names))
    for module, needs in deps.items():
        if module in names:
            for dep in needs[1]:
                assert names.index(modules_order.module_name(dep)) < names.index(module)
    assert names[-1] == "virtio_rng"
    with pytest.raises(ValueError):
        modules_order.load_order(["nosuch"], deps, set())
    cyclic = modules_order.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ValueError):
        modules_order.load_order(["a"], cyclic, set())


def test_modules_collect_decompresses(tmp_path):
    moddir = tmp_path / "lib/modules/6.1.0-test"
    (moddir / "kernel/fs/fuse").mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/fs/fuse/fuse.ko.xz:\nkernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko.xz\n")
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    (moddir / "kernel/fs/fuse/fuse.ko.xz").write_bytes(lzma.compress(b"FUSE MODULE"))
    (moddir / "kernel/fs/fuse/virtiofs.ko").write_bytes(b"VIRTIOFS MODULE")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.ko").write_bytes(b"old")
    assert modules_order.main([str(moddir), str(out), "virtiofs", "virtio"]) == 0
    assert (out / "load-order").read_text() == "fuse.ko\nvirtiofs.ko\n"
    assert (out / "fuse.ko").read_bytes() == b"FUSE MODULE"
    assert not (out / "stale.ko").exists()


# ---------------------------------------------------------------------------
# build-initramfs.sh and /init


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory) -> Path:
    need("gcc", "gcc libc6-dev")
    if not (os.access("/bin/busybox", os.X_OK)):
        pytest.fail("/bin/busybox not found: apt-get install busybox-static")
    out = tmp_path_factory.mktemp("initramfs") / "initramfs.cpio"
    mods = out.parent / "mods"
    mods.mkdir()
    (mods / "load-order").write_text("first.ko\nsecond.ko\n")
    (mods / "first.ko").write_bytes(b"not really a module")
    (mods / "second.ko").write_bytes(b"")
    res = run(GUEST / "build-initramfs.sh", out, "--modules", mods)
    assert res.returncode == 0, res.stderr
    return out


def test_build_initramfs_contents(initramfs):
    members = {m.name: m for m in read_newc(initramfs.read_bytes())}
    for name in ("init", "bin/busybox", "bin/pattern", "bin/mmapread", "proc", "sys", "mnt", "demo.sh",
                 "lib/modules/load-order", "lib/modules/first.ko"):
        assert name in members, name
    assert members["dev/console"].rdev == (5, 1)
    assert stat.S_ISCHR(members["dev/console"].mode)
    assert members["tmp"].mode == stat.S_IFDIR | 0o1777
    # A standalone busybox (ours, or Debian's): links only for what is run by path,
    # and one for each helper of guest/helpers/ to the program that holds them all.
    helpers = {f"bin/{c.stem}" for c in (GUEST / "helpers").glob("*.c")}
    assert {name for name, m in members.items() if stat.S_ISLNK(m.mode)} == {
        "bin/sh", "bin/env", "sbin", "usr/bin", "usr/sbin"} | helpers
    assert members["bin/sh"].data == members["bin/env"].data == b"busybox"
    assert {members[h].data for h in helpers} == {b"pyvmm-helpers"}
    multicall = members["bin/pyvmm-helpers"].data
    assert multicall.startswith(b"\x7fELF") and not has_interpreter(multicall)
    assert members["usr/bin"].data == b"../bin"        # so #!/usr/bin/env finds bin/env
    init = members["init"].data
    assert init.startswith(b"\x7fELF") and b"pyvmm-guest: " in init
    assert {m.mtime for m in members.values() if m.name != "TRAILER!!!"} == {0}
    assert not has_interpreter(init), "/init must be statically linked"


# A "busybox" whose shell is not standalone: its sh is the host's /bin/sh (dash),
# which finds no cat without PATH.  A script: readelf sees no ELF, so no interpreter.
FAKE_BUSYBOX = """#!/bin/sh
case "$1" in
    --list) for a in {applets}; do echo "$a"; done ;;
    sh) shift; exec /bin/sh "$@" ;;
    *) exit 1 ;;
esac
"""


def applet_lists() -> tuple[list[str], list[str]]:
    """guest/applets.sh's required_applets and extra_applets."""
    out = subprocess.run(["bash", "-c", f'. {GUEST}/applets.sh; echo $required_applets; '
                          'echo $extra_applets'], capture_output=True, text=True, check=True)
    required, extra = out.stdout.splitlines()
    return required.split(), extra.split()


def build_with_busybox(tmp_path: Path, busybox: Path | None, guest: Path = GUEST,
                       **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "initramfs.cpio"
    full_env = {k: v for k, v in os.environ.items() if k not in ("BUSYBOX", "PYVMM_T0")}
    if busybox is not None:
        full_env["BUSYBOX"] = str(busybox)
    full_env.update(env)
    res = run(guest / "build-initramfs.sh", out, env=full_env)
    members = {m.name: m for m in read_newc(out.read_bytes())} if res.returncode == 0 else {}
    return res, members


def links(members: dict) -> set[str]:
    """The applet links in /bin (the helpers' links point at pyvmm-helpers instead)."""
    return {name for name, m in members.items()
            if stat.S_ISLNK(m.mode) and m.name.startswith("bin/") and m.data == b"busybox"}


def test_build_initramfs_links_every_applet_without_a_standalone_shell(tmp_path):
    required, extra = applet_lists()
    fake = tmp_path / "busybox"
    fake.write_text(FAKE_BUSYBOX.format(applets=" ".join(f"'{a}'" for a in required + extra[:3])))
    fake.chmod(0o755)
    res, members = build_with_busybox(tmp_path, fake)
    assert res.returncode == 0, res.stderr
    assert f"{fake}'s shell is not standalone: linking every applet in /bin" in res.stdout
    assert links(members) == {f"bin/{a}" for a in required + extra[:3]}
    assert members["bin/busybox"].data == fake.read_bytes()


def test_build_initramfs_links_sh_and_env_with_a_standalone_shell(tmp_path):
    if not os.access("/bin/busybox", os.X_OK):
        pytest.fail("/bin/busybox not found: apt-get install busybox-static")
    res, members = build_with_busybox(tmp_path, Path("/bin/busybox"))   # Debian's is standalone
    assert res.returncode == 0, res.stderr
    assert "not standalone" not in res.stdout
    assert links(members) == {"bin/sh", "bin/env"}


def build_with_new_helper(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    """build-initramfs.sh of a copy of guest/ that has one more helper, helpers/NAME.c."""
    if not os.access("/bin/busybox", os.X_OK):
        pytest.fail("/bin/busybox not found: apt-get install busybox-static")
    guest = tmp_path / "guest"
    shutil.copytree(GUEST, guest, ignore=shutil.ignore_patterns("build"))
    (guest / "helpers" / f"{name}.c").write_text("int main(void) { return 0; }\n")
    res, _ = build_with_busybox(tmp_path, Path("/bin/busybox"), guest=guest)
    return res


def test_build_initramfs_needs_every_helper_in_the_multicall_table(tmp_path):
    """A new guest/helpers/NAME.c that guest/multicall.c does not list stops the build:
    its link would run nothing."""
    res = build_with_new_helper(tmp_path, "newtool")
    assert res.returncode == 1
    assert "guest/multicall.c does not list the helper newtool (guest/helpers/newtool.c)" in res.stderr


@pytest.mark.parametrize("name", ["bad-name", "9lives"])
def test_build_initramfs_needs_helper_names_that_are_c_identifiers(tmp_path, name):
    """A helper's main() becomes NAME_main: a name that is no C identifier stops the build."""
    res = build_with_new_helper(tmp_path, name)
    assert res.returncode == 1
    assert f"guest/helpers/{name}.c: a helper's name must be a C identifier" in res.stderr


def test_multicall_runs_a_helper_by_its_name_or_its_first_argument(initramfs, tmp_path):
    bindir = initramfs.parent / "initramfs.root" / "bin"
    assert run(bindir / "pattern", "write", tmp_path / "f", "100", "5").returncode == 0
    by_name = run(bindir / "pattern", "sum", tmp_path / "f")
    by_arg = run(bindir / "pyvmm-helpers", "pattern", "sum", tmp_path / "f")
    assert by_name.returncode == by_arg.returncode == 0 and by_name.stdout == by_arg.stdout
    nothing = run(bindir / "pyvmm-helpers")
    assert nothing.returncode == 127 and "NAME is one of: blkbench daxtool" in nothing.stderr


def test_build_initramfs_needs_the_required_applets(tmp_path):
    required, _ = applet_lists()
    fake = tmp_path / "busybox"
    fake.write_text(FAKE_BUSYBOX.format(applets=" ".join(f"'{a}'" for a in required if a != "mount")))
    fake.chmod(0o755)
    res, _ = build_with_busybox(tmp_path, fake)
    assert res.returncode == 1 and "busybox lacks the applet 'mount'" in res.stderr


def test_build_initramfs_falls_back_to_debians_busybox(tmp_path):
    """No BUSYBOX and build-busybox.sh fails (here: a corrupt source tarball in the
    cache, so nothing is downloaded): one warning line, Debian's busybox, a guest."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "busybox_1.35.0.orig.tar.bz2").write_bytes(b"not the busybox source")
    res, members = build_with_busybox(tmp_path, None, PYVMM_CACHE=str(cache))
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        "guest: warning: no small busybox (build-busybox: "
        f"{cache}/busybox_1.35.0.orig.tar.bz2: sha256 mismatch (removed; the next build "
        "downloads it again)); using Debian's /bin/busybox instead: a 2 MB bigger "
        "initramfs, a slower guest boot"]
    assert members["bin/busybox"].data == Path("/bin/busybox").read_bytes()
    assert not (cache / "busybox_1.35.0.orig.tar.bz2").exists()


def has_interpreter(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF has a PT_INTERP program header (dynamic)."""
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    types = [int.from_bytes(elf[phoff + i * phentsize:phoff + i * phentsize + 4], "little")
             for i in range(phnum)]
    assert types, "no program headers"
    return 3 in types  # PT_INTERP


def test_build_initramfs_is_incremental(initramfs):
    before = initramfs.stat()
    mods = initramfs.parent / "mods"
    res = run(GUEST / "build-initramfs.sh", initramfs, "--modules", mods)
    assert res.returncode == 0 and "up to date" in res.stdout
    # Inputs hash changed but the archive is identical: OUT is left alone.
    Path(f"{initramfs}.inputs").write_text("stale\n")
    res = run(GUEST / "build-initramfs.sh", initramfs, "--modules", mods)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stdout + res.stderr
    after = initramfs.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def extract(members: list[Member], dest: Path) -> None:
    """Unpack an archive without device nodes (no privileges needed)."""
    for m in members:
        path = dest / m.name
        if m.name == "TRAILER!!!" or stat.S_ISCHR(m.mode):
            continue
        if stat.S_ISDIR(m.mode):
            path.mkdir(exist_ok=True)
        elif stat.S_ISLNK(m.mode):
            path.symlink_to(m.data.decode())
        else:
            path.write_bytes(m.data)
            path.chmod(stat.S_IMODE(m.mode))


def sandboxed_init(root: Path, *words: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run /init as PID 1 of new user+PID+mount+net namespaces, chrooted in `root`.

    In a user namespace /init cannot mount devtmpfs, create or open /dev/port,
    or reboot the host: reboot() there only ends the PID namespace (SIGHUP)."""
    cmd = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--net",
           "chroot", str(root), "/init", *words]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=20)


def ended_by_reboot(res: subprocess.CompletedProcess) -> bool:
    """reboot() in a PID namespace kills its init with SIGHUP; unshare passes it on."""
    return res.returncode in (-1, 128 + 1)


@pytest.fixture(scope="module")
def guest_root(initramfs, tmp_path_factory) -> Path:
    need("unshare", "util-linux")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    root = tmp_path_factory.mktemp("root")
    extract(read_newc(initramfs.read_bytes()), root)
    (root / "t.sh").write_text('echo "script on $(uname -s) pid $$"; exit 7\n')
    return root


def test_init_runs_script_and_reports_exit(guest_root):
    res = sandboxed_init(guest_root, "pyvmm.run=/t.sh", "pyvmm.share=../bad", "pyvmm.debug=1")
    lines = res.stdout.splitlines()
    assert "pyvmm-guest: ready" in lines
    assert "pyvmm-guest: mount ../bad failed: bad tag" in lines
    assert "pyvmm-guest: module first.ko failed: " in res.stdout  # not a real module
    assert any(line.startswith("script on Linux pid ") for line in lines)
    assert lines.index("pyvmm-guest: ready") < lines.index("pyvmm-guest: exit 7")
    assert "pyvmm-guest: debug: " in res.stdout
    assert ended_by_reboot(res)


def test_init_interactive_shell_then_reboot(guest_root):
    res = sandboxed_init(guest_root, stdin='echo "shell $PATH $HOME $TERM"; exit 3\n')
    lines = res.stdout.splitlines()
    assert "pyvmm-guest: ready" in lines
    assert "shell /bin:/sbin / linux" in lines
    assert not any("exit" in line for line in lines if line.startswith("pyvmm-guest"))
    assert ended_by_reboot(res)


def test_init_memory_words(guest_root):
    """pyvmm.memory=: bad words are refused and reported; a good one makes /init probe
    each 128 MiB block (here, in a sandbox, the probe fails and says so).  With
    pyvmm.snapshot=1 the probing happens before the snapshot point, so in order."""
    bad = ["pyvmm.memory=", "pyvmm.memory=0x10000000", "pyvmm.memory=0x1000+0x10000000",
           "pyvmm.memory=0x10000000+0x1000", "pyvmm.memory=0x10000000+0x10000000,",
           "pyvmm.memory=" + ",".join(["0x10000000+0x8000000"] * 5)]
    res = sandboxed_init(guest_root, "pyvmm.run=/t.sh", *bad)
    for word in bad:
        assert f"pyvmm-guest: bad memory word: {word}" in res.stdout.splitlines()
    assert "cannot add" not in res.stdout
    res = sandboxed_init(guest_root, "pyvmm.run=/t.sh", "pyvmm.snapshot=1",
                         "pyvmm.memory=0x10000000+0x10000000,0x100000000+0x8000000")
    lines = res.stdout.splitlines()
    failed = [i for i, line in enumerate(lines)
              if line.startswith("pyvmm-guest: memory: cannot add the block at 0x10000000: ")]
    assert len(failed) == 1 and failed[0] < lines.index("pyvmm-guest: ready")   # then it stops
    assert "pyvmm-guest: exit 7" in lines and ended_by_reboot(res)
