"""The guest's busybox: guest/busybox_config.py (the configuration steps) and
guest/build-busybox.sh's cache key and failures.  Nothing here compiles busybox;
a test reads the real source only when the tarball is in the cache already."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pyvmm import guest_build

GUEST = Path(__file__).resolve().parent.parent / "guest"
TARBALL = "busybox_1.35.0.orig.tar.bz2"


def load_busybox_config():
    spec = importlib.util.spec_from_file_location("busybox_config", GUEST / "busybox_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["busybox_config"] = module
    spec.loader.exec_module(module)
    return module


busybox_config = load_busybox_config()

SOURCES = [
    "//applet:IF_TEST1(APPLET_NOFORK([,   test, BB_DIR_USR_BIN, BB_SUID_DROP, test))\n"
    "//applet:IF_TEST2(APPLET_NOFORK([[,  test, BB_DIR_USR_BIN, BB_SUID_DROP, test))\n"
    "//applet:IF_TEST(APPLET_NOFORK(test, test, BB_DIR_USR_BIN, BB_SUID_DROP, test))\n",
    "//applet:IF_ASH(APPLET(ash, BB_DIR_BIN, BB_SUID_DROP))\n"
    "//applet:IF_SH_IS_ASH(  APPLET_ODDNAME(sh,   ash, BB_DIR_BIN, BB_SUID_DROP, ash))\n",
    "//applet:IF_SH_IS_HUSH(  APPLET_ODDNAME(sh,   hush, BB_DIR_BIN, BB_SUID_DROP, hush))\n",
    "//applet:IF_LSMOD(IF_NOT_MODPROBE_SMALL(APPLET_NOEXEC(lsmod, lsmod, BB_DIR_SBIN, BB_SUID_DROP, lsmod)))\n"
    "//applet:IF_BB_SYSCTL(APPLET_ODDNAME(sysctl, sysctl, BB_DIR_SBIN, BB_SUID_DROP, sysctl))\n"
    "//config:config LSMOD\n",
]


def test_applet_symbols():
    symbols = busybox_config.applet_symbols_of(SOURCES)
    assert symbols == {"[": "TEST1", "[[": "TEST2", "test": "TEST", "ash": "ASH",
                       "sh": "SH_IS_ASH", "lsmod": "LSMOD", "sysctl": "BB_SYSCTL"}


def test_fragment_options_then_applets_once():
    symbols = busybox_config.applet_symbols_of(SOURCES)
    options = "# a comment\n\nCONFIG_STATIC=y\nCONFIG_FEATURE_EDITING_MAX_LEN=1024\nCONFIG_ASH=y\n"
    text = busybox_config.fragment(symbols, options, ["sh", "ash", "[", "sysctl", "["])
    assert text == ("CONFIG_STATIC=y\nCONFIG_FEATURE_EDITING_MAX_LEN=1024\nCONFIG_ASH=y\n"
                    "CONFIG_SH_IS_ASH=y\nCONFIG_TEST1=y\nCONFIG_BB_SYSCTL=y\n")
    with pytest.raises(busybox_config.UnknownApplet, match="no applet awk, vi"):
        busybox_config.fragment(symbols, options, ["sh", "awk", "vi"])
    with pytest.raises(ValueError, match="not a CONFIG_X=value line"):
        busybox_config.fragment(symbols, "STATIC=y\n", [])


def test_apply_prune_check():
    allno = ("CONFIG_HAVE_DOT_CONFIG=y\n# CONFIG_STATIC is not set\n# CONFIG_LS is not set\n"
             'CONFIG_BUSYBOX_EXEC_PATH="/proc/self/exe"\n# CONFIG_CAT is not set\n')
    wanted = "CONFIG_STATIC=y\nCONFIG_LS=y\nCONFIG_FEATURE_LS_WIDTH=y\n"
    applied = busybox_config.apply(allno, wanted)
    assert applied == ("CONFIG_HAVE_DOT_CONFIG=y\nCONFIG_STATIC=y\nCONFIG_LS=y\n"
                       'CONFIG_BUSYBOX_EXEC_PATH="/proc/self/exe"\n# CONFIG_CAT is not set\n'
                       "CONFIG_FEATURE_LS_WIDTH=y\n")              # new options at the end
    # oldconfig then turns on what appeared (its defaults); prune turns it off again
    after_oldconfig = applied + "CONFIG_FEATURE_LS_COLOR=y\nCONFIG_FEATURE_COPYBUF_KB=4\n"
    pruned = busybox_config.prune(after_oldconfig, wanted)
    assert "# CONFIG_FEATURE_LS_COLOR is not set\n" in pruned
    assert "# CONFIG_HAVE_DOT_CONFIG is not set\n" in pruned        # not wanted: off too
    assert "CONFIG_FEATURE_COPYBUF_KB=4\n" in pruned               # not a bool: kept
    assert busybox_config.missing(pruned, wanted) == []
    assert busybox_config.missing(allno, wanted) == ["CONFIG_STATIC=y", "CONFIG_LS=y",
                                                    "CONFIG_FEATURE_LS_WIDTH=y"]


def test_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(SOURCES):
        (src / f"a{i}.c").write_text(text)
    options = tmp_path / "options"
    options.write_text("CONFIG_STATIC=y\n")
    assert busybox_config.main(["fragment", str(src), str(options), "sh", "lsmod"]) == 0
    frag_text = capsys.readouterr().out
    assert frag_text == "CONFIG_STATIC=y\nCONFIG_SH_IS_ASH=y\nCONFIG_LSMOD=y\n"
    assert busybox_config.main(["fragment", str(src), str(options), "awk"]) == 2
    assert capsys.readouterr().err == "busybox_config: busybox has no applet awk\n"
    frag, config = tmp_path / "fragment", tmp_path / ".config"
    frag.write_text(frag_text)
    config.write_text("# CONFIG_STATIC is not set\nCONFIG_CAT=y\n")
    assert busybox_config.main(["check", str(config), str(frag)]) == 1
    assert "CONFIG_LSMOD=y did not stick" in capsys.readouterr().err
    assert busybox_config.main(["apply", str(config), str(frag)]) == 0
    assert busybox_config.main(["prune", str(config), str(frag)]) == 0
    assert config.read_text() == ("CONFIG_STATIC=y\n# CONFIG_CAT is not set\n"
                                  "CONFIG_SH_IS_ASH=y\nCONFIG_LSMOD=y\n")
    assert busybox_config.main(["check", str(config), str(frag)]) == 0
    assert busybox_config.main(["frob"]) == 2


def guest_applets() -> list[str]:
    out = subprocess.run(["bash", "-c", f'. {GUEST}/applets.sh; echo $required_applets $extra_applets'],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_the_real_source_has_every_applet(tmp_path):
    tarball = guest_build.cache_dir() / TARBALL
    if not tarball.is_file():
        pytest.skip(f"{tarball} is not there (`make guest` downloads it)")
    with tarfile.open(tarball) as tar:
        texts = [tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers()
                 if m.isfile() and m.name.endswith(".c")]
    symbols = busybox_config.applet_symbols_of(texts)
    options = (GUEST / "busybox.config").read_text()
    text = busybox_config.fragment(symbols, options, guest_applets())
    assert "CONFIG_SH_IS_ASH=y\n" in text and "CONFIG_TEST1=y\n" in text


# --- build-busybox.sh --------------------------------------------------------------------------
def copy_guest(tmp_path: Path) -> Path:
    guest = tmp_path / "guest"
    guest.mkdir()
    for name in ("build-busybox.sh", "common.sh", "applets.sh", "busybox.config", "busybox_config.py",
                 "malloc.c"):
        (guest / name).write_bytes((GUEST / name).read_bytes())
    return guest


def build_busybox(guest: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYVMM_T0"}
    env["PYVMM_CACHE"] = str(cache)
    return subprocess.run(["bash", str(guest / "build-busybox.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def test_key_follows_the_inputs(tmp_path):
    guest = copy_guest(tmp_path)
    cache = tmp_path / "cache"

    def key() -> str:
        p = build_busybox(guest, cache, "--print-key")
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    first = key()
    assert len(first) == 16 and key() == first
    with open(guest / "busybox.config", "a") as f:
        f.write("CONFIG_FEATURE_VI_UNDO=y\n")
    second = key()
    with open(guest / "applets.sh", "a") as f:
        f.write('extra_applets="$extra_applets vi"\n')
    assert len({first, second, key()}) == 3
    assert not cache.exists()          # --print-key builds and downloads nothing


def test_a_corrupt_tarball_fails_and_is_removed(tmp_path):
    guest = copy_guest(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / TARBALL).write_bytes(b"corrupt")
    p = build_busybox(guest, cache, str(tmp_path / "out" / "busybox"))
    if p.returncode == 3:
        pytest.skip(p.stderr.strip())          # the build tools are not installed
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"build-busybox: {cache / TARBALL}: sha256 mismatch "
                                     "(removed; the next build downloads it again)"]
    assert sorted(x.name for x in cache.iterdir()) == []   # no tarball, no .build left
    assert not (tmp_path / "out").exists()


def test_usage(tmp_path):
    p = build_busybox(GUEST, tmp_path / "cache")
    assert p.returncode == 2 and p.stderr.startswith("usage: ")
    p = build_busybox(GUEST, tmp_path / "cache", "--frob")
    assert p.returncode == 2
