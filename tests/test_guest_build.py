"""``pyvmm guest build`` and where pyvmm finds its guest (pyvmm.guest_build), the
kernel cache key (guest/kernel_key.py), ``--version`` and the package list.

All fast: nothing here compiles a kernel.  The scripts run for real only where
they stop early (bad input, missing tools, a patch that does not apply).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import pyvmm
from pyvmm import cli, guest_build

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest"
DEBIAN_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")


def load_kernel_key():
    spec = importlib.util.spec_from_file_location("kernel_key", GUEST / "kernel_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kernel_key = load_kernel_key()


def run_pyvmm(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYVMM_LOG", "PYVMM_T0")}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=full_env, cwd=str(REPO), timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(p: subprocess.CompletedProcess | tuple, status: int, *words: str) -> str:
    rc, err = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    assert rc == status, (rc, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- the cache directory ---------------------------------------------------------------------
@pytest.mark.parametrize("environ, euid, expected", [
    ({"PYVMM_CACHE": "/srv/c", "HOME": "/home/u"}, 1000, "/srv/c"),
    ({"PYVMM_CACHE": "/srv/c"}, 0, "/srv/c"),
    ({"HOME": "/root"}, 0, "/var/cache/pyvmm"),
    ({"HOME": "/root", "XDG_CACHE_HOME": "/xdg"}, 0, "/var/cache/pyvmm"),
    ({"HOME": "/home/u"}, 1000, "/home/u/.cache/pyvmm"),
    ({"HOME": "/home/u", "XDG_CACHE_HOME": "/xdg"}, 1000, "/xdg/pyvmm"),
    ({"HOME": "/home/u", "XDG_CACHE_HOME": ""}, 1000, "/home/u/.cache/pyvmm"),
    ({"HOME": "/home/u", "XDG_CACHE_HOME": "rel/dir"}, 1000, "/home/u/.cache/pyvmm"),  # XDG: ignore relative
    ({"HOME": "/home/u", "PYVMM_CACHE": ""}, 1000, "/home/u/.cache/pyvmm"),
])
def test_cache_dir(environ, euid, expected):
    assert guest_build.cache_dir(environ, euid) == Path(expected)


def test_cache_dir_defaults_to_this_process(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    assert guest_build.cache_dir() == tmp_path


@pytest.mark.parametrize("euid, expected", [(0, "/var/cache/pyvmm"), (1000, "/home/u/.cache/pyvmm")])
def test_scripts_use_the_same_cache_rule(euid, expected, tmp_path):
    """guest/common.sh's default_cache agrees with cache_dir (id -u faked on PATH)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text(f"#!/bin/sh\necho {euid}\n")
    (fake / "id").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": "/home/u"}
    out = subprocess.run(["bash", "-c", f". {GUEST}/common.sh; default_cache"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == expected == str(guest_build.cache_dir(env, euid))


# --- where `pyvmm run` finds the guest ------------------------------------------------------
def make_guest(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "vmlinux").write_bytes(b"\x7fELF")
    return d


@pytest.fixture
def places(tmp_path):
    """A fake clone and a cache, with no guest in either yet."""
    clone = tmp_path / "clone"
    (clone / "guest").mkdir(parents=True)
    cache = tmp_path / "cache"
    return clone, cache, {"PYVMM_CACHE": str(cache), "HOME": str(tmp_path / "home")}


def test_lookup_env_wins_even_without_a_guest(places, tmp_path):
    clone, cache, environ = places
    make_guest(clone / "guest" / "build")
    make_guest(cache / "guest")
    environ["PYVMM_GUEST_DIR"] = str(tmp_path / "elsewhere")
    assert guest_build.guest_dir_candidates(environ, 0, clone) == [tmp_path / "elsewhere"]
    assert guest_build.find_guest_dir(environ, 0, clone) is None
    make_guest(tmp_path / "elsewhere")
    assert guest_build.find_guest_dir(environ, 0, clone) == tmp_path / "elsewhere"


def test_lookup_clone_before_cache(places):
    clone, cache, environ = places
    assert guest_build.guest_dir_candidates(environ, 0, clone) == [clone / "guest" / "build",
                                                                  cache / "guest"]
    make_guest(cache / "guest")
    assert guest_build.find_guest_dir(environ, 0, clone) == cache / "guest"
    make_guest(clone / "guest" / "build")
    assert guest_build.find_guest_dir(environ, 0, clone) == clone / "guest" / "build"


def test_lookup_clone_build_without_vmlinux_is_skipped(places):
    clone, cache, environ = places
    (clone / "guest" / "build" / "debian").mkdir(parents=True)   # only a KERNEL=debian build
    make_guest(cache / "guest")
    assert guest_build.find_guest_dir(environ, 0, clone) == cache / "guest"


def test_lookup_installed_uses_the_cache_only(places):
    clone, cache, environ = places
    make_guest(clone / "guest" / "build")
    assert guest_build.guest_dir_candidates(environ, 0, None) == [cache / "guest"]
    assert guest_build.find_guest_dir(environ, 0, None) is None
    make_guest(cache / "guest")
    assert guest_build.find_guest_dir(environ, 0, None) == cache / "guest"


def test_lookup_nothing_found_names_the_command(places, monkeypatch):
    clone, cache, environ = places
    monkeypatch.setattr(guest_build, "source_checkout", lambda package_dir=None: clone)
    assert guest_build.find_guest_dir(environ, 0, clone) is None
    assert guest_build.default_guest_dir(environ) == cache / "guest"   # where `guest build` puts it
    assert guest_build.no_guest_message(environ) == (
        'no guest image: run "pyvmm guest build" (or "make guest" in a clone), or give --kernel')
    environ["PYVMM_GUEST_DIR"] = "/nowhere"
    assert "in /nowhere (PYVMM_GUEST_DIR)" in guest_build.no_guest_message(environ)


def test_source_checkout_and_guest_sources(tmp_path):
    clone = tmp_path / "clone"
    (clone / "pyvmm").mkdir(parents=True)
    (clone / "guest").mkdir()
    (clone / "guest" / "build-kernel.sh").touch()
    (clone / "pyproject.toml").touch()
    assert guest_build.source_checkout(clone / "pyvmm") == clone
    assert guest_build.guest_sources(clone / "pyvmm") == clone / "guest"
    site = tmp_path / "site-packages"
    (site / "pyvmm" / "_guest").mkdir(parents=True)
    assert guest_build.source_checkout(site / "pyvmm") is None
    assert guest_build.guest_sources(site / "pyvmm") == site / "pyvmm" / "_guest"
    # this test suite runs from a clone
    assert guest_build.source_checkout() == REPO
    assert guest_build.guest_sources() == GUEST


def test_cli_uses_the_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_GUEST_DIR", str(tmp_path))
    assert cli.default_guest_dir() == tmp_path
    monkeypatch.delenv("PYVMM_GUEST_DIR")
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(guest_build, "source_checkout", lambda package_dir=None: None)
    assert cli.default_guest_dir() == tmp_path / "cache" / "guest"
    make_guest(tmp_path / "cache" / "guest")
    assert cli.default_guest_dir() == tmp_path / "cache" / "guest"


def test_run_without_any_guest(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("PYVMM_GUEST_DIR", raising=False)
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(guest_build, "source_checkout", lambda package_dir=None: None)
    rc = cli.main(["run"])
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ('pyvmm: no guest image: run "pyvmm guest build" (or "make guest" in a clone), '
                   "or give --kernel\n")
    assert rc == 2


# --- --version -------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["pyvmm", "pyvmm.virtiofsd"])
def test_version(module):
    p = run_pyvmm(module, "--version")
    assert (p.returncode, p.stdout, p.stderr) == (0, f"pyvmm {pyvmm.__version__}\n", "")


def test_version_is_single_sourced():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pyvmm.__version__"}
    assert all(part.isdigit() for part in pyvmm.__version__.split("."))


def test_package_list_is_complete():
    """pyproject.toml names every package (setuptools does not search): a new
    directory of modules under pyvmm/ must be added there."""
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(d.relative_to(REPO).parts) for d in (REPO / "pyvmm").rglob("*")
             if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))}
    assert set(setuptools_cfg["packages"]) == found | {"pyvmm", "pyvmm._guest"}
    assert setuptools_cfg["package-dir"] == {"pyvmm._guest": "guest"}


# --- `pyvmm guest build`: bad input ------------------------------------------------------------
def write_tree(d: Path, version: str = "6", patchlevel: str = "1", sublevel: str = "42",
               extra: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "Makefile").write_text(f"# SPDX-License-Identifier: GPL-2.0\nVERSION = {version}\n"
                                f"PATCHLEVEL = {patchlevel}\nSUBLEVEL = {sublevel}\n"
                                f"EXTRAVERSION ={extra}\nNAME = Test\n")
    (d / "init").mkdir(exist_ok=True)
    (d / "init" / "main.c").write_text("int main;\n")
    return d


def write_tarball(path: Path, top: str, **versions) -> Path:
    tree = write_tree(path.parent / f"{path.name}.tree" / top, **versions)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname=top)
    return path


@pytest.fixture
def guest_env(tmp_path, monkeypatch):
    """An empty cache of our own: a test never touches the real one."""
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("argv, words", [
    (["guest"], "required: build"),
    (["guest", "frob"], "invalid choice: 'frob'"),
    (["guest", "build", "--kernel", "tiny"], "invalid choice: 'tiny'"),
    (["guest", "build", "extra"], "unrecognized arguments: extra"),
    (["guest", "build", "--source"], "--source"),
    (["guest", "build", "--source", "/no/such/linux"], "--source: /no/such/linux does not exist"),
    (["guest", "build", "--source", "/dev/null"], "neither a directory nor a file"),
    (["guest", "build", "--kernel", "debian", "--source", "/tmp"], "not with --kernel debian"),
])
def test_guest_build_bad_arguments(capsys, guest_env, argv, words):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error((rc, err), 2, "pyvmm: ", words)


def test_guest_build_bad_sources(capsys, guest_env, tmp_path):
    cases = [
        (tmp_path, "has no Makefile: not a Linux source tree"),
        (write_tree(tmp_path / "linux-6.2", patchlevel="2"), "is Linux 6.2.42: the guest kernel needs Linux 6.1"),
        (write_tree(tmp_path / "linux-5.1", version="5"), "needs Linux 6.1"),
    ]
    not_tar = tmp_path / "linux.tar.xz"
    not_tar.write_bytes(b"this is no tar archive")
    cases.append((not_tar, "is not a tar archive"))
    for source, words in cases:
        rc = cli.main(["guest", "build", "--source", str(source)])
        out, err = capsys.readouterr()
        assert out == ""
        assert_one_line_error((rc, err), 2, "pyvmm: --source: ", words)
    assert not guest_env.exists()   # nothing was built, nothing was cached


def test_guest_build_out_is_a_file(capsys, guest_env, tmp_path):
    (tmp_path / "file").touch()
    rc = cli.main(["guest", "build", "--out", str(tmp_path / "file")])
    assert_one_line_error((rc, capsys.readouterr().err), 2, "--out", "is not a directory")


def test_guest_build_missing_tools(guest_env, tmp_path):
    """A missing tool: one line naming the Debian package, exit 1, before any build."""
    p = run_pyvmm("pyvmm", "guest", "build", "--out", str(tmp_path / "out"),
                  env={"BUSYBOX": str(tmp_path / "no-busybox"), "PYVMM_CACHE": str(guest_env)})
    line = assert_one_line_error(p, 1, "apt-get install --no-install-recommends")
    assert "busybox-static" in line or "linux-source-6.1" in line   # hosts without the tarball
    assert not (tmp_path / "out").exists()


def test_guest_build_tarball_of_another_version(guest_env, tmp_path):
    """A tarball is checked once unpacked: 6.2 is bad input (2), and the half-made build goes."""
    tarball = write_tarball(tmp_path / "linux-6.2.tar.gz", "linux-6.2", patchlevel="2")
    p = run_pyvmm("pyvmm", "guest", "build", "--source", str(tarball), "--out", str(tmp_path / "out"),
                  env={"PYVMM_CACHE": str(guest_env)})
    if p.returncode == 1 and "apt-get install" in p.stderr:
        pytest.skip(f"kernel build tools missing: {p.stderr.strip()}")
    assert_one_line_error(p, 2, "Linux 6.2.42", "needs Linux 6.1")
    assert "unpacking" in p.stdout
    assert list(guest_env.glob("kernel-*")) == []


def test_guest_build_failed_build(guest_env, tmp_path):
    """A 6.1 tarball our patches do not apply to: the build fails (1), the line says why,
    and nothing half-made stays in the cache."""
    tarball = write_tarball(tmp_path / "linux-6.1.tar.gz", "linux-6.1.42")
    p = run_pyvmm("pyvmm", "guest", "build", "--source", str(tarball), "--out", str(tmp_path / "out"),
                  env={"PYVMM_CACHE": str(guest_env)})
    if p.returncode == 1 and "apt-get install" in p.stderr:
        pytest.skip(f"kernel build tools missing: {p.stderr.strip()}")
    assert p.returncode == 1, p.stderr
    assert "does not apply" in p.stderr
    assert "pyvmm: guest build failed: build-kernel.sh ended with status 1" in p.stderr
    assert "Traceback" not in p.stderr
    assert list(guest_env.glob("kernel-*")) == []


def test_plan_default_and_debian(tmp_path):
    environ = {"PYVMM_CACHE": str(tmp_path / "cache")}
    parser = cli.build_parser()
    plan = guest_build.plan_build(parser.parse_args(["guest", "build"]), GUEST, environ)
    out = tmp_path / "cache" / "guest"
    assert (plan.out, plan.source) == (out, None)
    assert [(s.script, s.args) for s in plan.steps] == [
        ("build-kernel.sh", (str(out / "vmlinux"),)),
        ("build-initramfs.sh", (str(out / "initramfs.cpio"),))]
    tree = write_tree(tmp_path / "linux")
    plan = guest_build.plan_build(parser.parse_args(["guest", "build", "--source", str(tree),
                                                     "--out", str(tmp_path / "o")]), GUEST, environ)
    assert plan.steps[0].args == ("--source", str(tree), str(tmp_path / "o" / "vmlinux"))
    assert plan.checks[0].args == ("--source", str(tree), "--check")
    assert plan.boot_hint == f"PYVMM_GUEST_DIR={tmp_path / 'o'} pyvmm run"
    plan = guest_build.plan_build(parser.parse_args(["guest", "build", "--kernel", "debian"]),
                                  GUEST, environ)
    assert [s.script for s in plan.steps] == ["fetch-debian-kernel.sh", "build-initramfs.sh"]
    assert plan.steps[1].args == (str(out / "initramfs-debian.cpio"), "--modules",
                                  str(out / "debian" / "modules"))
    assert "--kernel" in plan.boot_hint and "--initramfs" in plan.boot_hint


# --- the kernel cache key --------------------------------------------------------------------
CONFIG = GUEST / "kernel.config"
PATCHES = sorted(GUEST.glob("patches/*.patch"))


def shell_key(tarball: Path) -> str:
    """The key as the first build-kernel.sh computed it, for tarballs."""
    script = ('(basename "$1"; stat -c %s "$1"; cat "$2" "${@:3}") | sha256sum | cut -c1-16')
    return subprocess.run(["bash", "-c", script, "key", str(tarball), str(CONFIG), *map(str, PATCHES)],
                          capture_output=True, text=True, check=True).stdout.strip()


def key(source: Path, config: Path = CONFIG, patches: list[Path] = PATCHES) -> str:
    return kernel_key.build_key(source, config, patches)


def test_tarball_key_is_the_earlier_formula(tmp_path):
    tarball = write_tarball(tmp_path / "linux-source-6.1.tar.gz", "linux-source-6.1")
    assert key(tarball) == shell_key(tarball)
    assert len(key(tarball)) == 16


def test_tarball_key_depends_on_name_and_size_only(tmp_path):
    a = write_tarball(tmp_path / "a" / "linux.tar.gz", "linux")
    copy = tmp_path / "b" / "linux.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    os.utime(copy, (1, 1))
    assert key(copy) == key(a)                     # another place, another mtime: same kernel
    renamed = tmp_path / "b" / "linux-copy.tar.gz"
    renamed.write_bytes(a.read_bytes())
    assert key(renamed) != key(a)
    bigger = tmp_path / "c" / "linux.tar.gz"
    bigger.parent.mkdir()
    bigger.write_bytes(a.read_bytes() + b"\0" * 512)
    assert key(bigger) != key(a)


def test_key_depends_on_config_and_patches(tmp_path):
    tarball = write_tarball(tmp_path / "linux.tar.gz", "linux")
    config = tmp_path / "kernel.config"
    config.write_bytes(CONFIG.read_bytes() + b"CONFIG_EXTRA=y\n")
    patch = tmp_path / "0002-extra.patch"
    patch.write_text("--- a/x\n+++ b/x\n")
    assert len({key(tarball), key(tarball, config), key(tarball, CONFIG, [*PATCHES, patch]),
                key(tarball, CONFIG, [])}) == 4


def test_directory_key(tmp_path):
    tree = write_tree(tmp_path / "linux")
    k = key(tree)
    assert key(tree) == k                           # stable
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert key(tree) == k                           # .git does not count
    main_c = tree / "init" / "main.c"
    os.utime(main_c, ns=(main_c.stat().st_atime_ns, main_c.stat().st_mtime_ns + 1))
    assert key(tree) != k                           # an edit deep in the tree (mtime)
    k = key(tree)
    (tree / "init" / "new.c").touch()
    assert key(tree) != k                           # a new file
    other = write_tree(tmp_path / "other" / "linux")
    assert key(other) != key(tree)                  # the same files elsewhere: another tree


def test_directory_and_tarball_keys_differ(tmp_path):
    tree = write_tree(tmp_path / "linux")
    tarball = write_tarball(tmp_path / "linux.tar.gz", "linux")
    assert key(tree) != key(tarball)
    assert kernel_key.source_identity(tree).startswith(b"dir\nVERSION = 6\nPATCHLEVEL = 1\n")


@pytest.mark.parametrize("versions, release", [
    ({}, "6.1.42"), ({"sublevel": "0", "extra": " -rc7"}, "6.1.0-rc7"),
])
def test_tree_release(tmp_path, versions, release):
    assert kernel_key.tree_release(write_tree(tmp_path / "linux", **versions)) == release


def test_script_and_module_agree_on_keys(tmp_path):
    tree = write_tree(tmp_path / "linux")
    env = {**os.environ, "PYVMM_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(GUEST / "build-kernel.sh"), "--source", str(tree), "--print-key"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert (p.returncode, p.stdout.strip()) == (0, key(tree)), p.stderr


@pytest.mark.skipif(not DEBIAN_TARBALL.exists(), reason=f"{DEBIAN_TARBALL} is not installed")
def test_explicit_debian_tarball_shares_the_default_cache(tmp_path):
    env = {**os.environ, "PYVMM_CACHE": str(tmp_path / "cache")}
    keys = [subprocess.run(["bash", str(GUEST / "build-kernel.sh"), *args, "--print-key"],
                           capture_output=True, text=True, env=env, timeout=60, check=True).stdout
            for args in ([], ["--source", str(DEBIAN_TARBALL)])]
    assert keys[0] == keys[1] == key(DEBIAN_TARBALL) + "\n"


# --- build-kernel.sh end to end, on a fake kernel tree (seconds, no compiler run) ---------------
FAKE_MAKEFILE = """\
VERSION = 6
PATCHLEVEL = 1
SUBLEVEL = 99
EXTRAVERSION = -fake
tinyconfig:
\techo CONFIG_TINY=y > .config
olddefconfig:
\ttest -f .config
vmlinux:
\ttest -f patched
\ttouch a.o b.o c.o
\tsleep 2.5
\tcp /bin/true vmlinux
mrproper:
\trm -f .config *.o vmlinux
"""
FAKE_PATCH = """\
--- /dev/null
+++ b/patched
@@ -0,0 +1 @@
+yes
"""


@pytest.fixture
def fake_guest(tmp_path) -> Path:
    """guest/'s kernel scripts with a config fragment and a patch for the fake tree."""
    guest = tmp_path / "guest"
    (guest / "patches").mkdir(parents=True)
    for name in ("build-kernel.sh", "common.sh", "kernel_key.py"):
        (guest / name).write_bytes((GUEST / name).read_bytes())
    (guest / "kernel.config").write_text("CONFIG_PYVMM_FAKE=y\n")
    (guest / "patches" / "0001-fake.patch").write_text(FAKE_PATCH)
    return guest


def fake_tree(d: Path) -> Path:
    (d / "scripts" / "kconfig").mkdir(parents=True)
    (d / "Makefile").write_text(FAKE_MAKEFILE)
    merge = d / "scripts" / "kconfig" / "merge_config.sh"
    merge.write_text('#!/bin/sh\ncat "$5" >> "$4"\n')     # -m -O DIR BASE FRAGMENT
    merge.chmod(0o755)
    return d


def build_kernel(guest: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYVMM_CACHE": str(cache), "PYVMM_TICK": "1"}
    env.pop("PYVMM_T0", None)
    p = subprocess.run(["bash", str(guest / "build-kernel.sh"), *args], capture_output=True,
                       text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    if p.returncode == 3:   # the script insists on the real kernel's build tools
        pytest.skip(p.stderr.strip())
    return p


def test_build_kernel_from_a_tree_then_from_the_cache(fake_guest, tmp_path):
    tree = fake_tree(tmp_path / "linux")
    (tree / ".config").write_text("stale\n")            # a used tree: cleaned in the copy only
    cache = tmp_path / "cache"
    p = build_kernel(fake_guest, cache, "--source", str(tree), str(tmp_path / "out" / "vmlinux"))
    assert p.returncode == 0, p.stdout + p.stderr
    k = kernel_key.build_key(tree, fake_guest / "kernel.config",
                             [fake_guest / "patches" / "0001-fake.patch"])
    lines = p.stdout.splitlines()
    assert all(line.startswith("guest: [0:") for line in lines), p.stdout
    for phase in (f"building kernel {k}", f"copying {tree}", "applied 1 patch(es)", "configuring",
                  "compiling the kernel (make -j", "compiling the kernel: 3 objects built",
                  "stripping vmlinux", f"kernel {k} -> {tmp_path / 'out' / 'vmlinux'}"):
        assert any(phase in line for line in lines), (phase, p.stdout)
    assert sorted(x.name for x in cache.iterdir()) == [f"kernel-{k}"]   # no .build left
    assert (cache / f"kernel-{k}" / "objects").read_text().strip() == "3"
    assert "CONFIG_PYVMM_FAKE=y" in (cache / f"kernel-{k}" / "config").read_text()
    assert (tmp_path / "out" / "vmlinux").read_bytes() == (cache / f"kernel-{k}" / "vmlinux").read_bytes()
    assert (tree / ".config").read_text() == "stale\n" and not (tree / "patched").exists()

    p = build_kernel(fake_guest, cache, "--source", str(tree), str(tmp_path / "again" / "vmlinux"))
    assert p.returncode == 0, p.stderr
    assert f"kernel {k} is cached" in p.stdout and "compiling" not in p.stdout


def test_build_kernel_from_a_tarball_estimates_from_the_last_build(fake_guest, tmp_path):
    cache = tmp_path / "cache"
    (cache / "kernel-0123456789abcdef").mkdir(parents=True)
    (cache / "kernel-0123456789abcdef" / "objects").write_text("850\n")
    tree = fake_tree(tmp_path / "src" / "linux-6.1.99")
    tarball = tmp_path / "linux-6.1.99.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname="linux-6.1.99")
    p = build_kernel(fake_guest, cache, "--source", str(tarball), str(tmp_path / "out" / "vmlinux"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"unpacking {tarball}" in p.stdout
    assert "compiling the kernel: 3 of ~850 objects built" in p.stdout
    assert not list(cache.glob("*.build"))
