"""The sdist and the wheel: what they carry, and a wheel that builds and boots its guest.

The sdist is built from a copy of this tree (setuptools writes pyvmm.egg-info
next to pyproject.toml: the clone stays clean) into which a fake guest/build/
and a stray .pyc are planted, so their absence from the sdist means something;
the wheel is built from the unpacked sdist, as ``python -m build`` does.
Building needs setuptools >= 77 (PEP 639 licence metadata): this interpreter's
when it has it (``make setup`` installs it), else a throw-away venv's from PyPI.
Everything lives in temporary directories removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

import pyvmm
from conftest import _missing
from pyvmm import guest_build

REPO = Path(__file__).resolve().parent.parent
SETUPTOOLS_MIN = (77,)
NAME = f"pyvmm-{pyvmm.__version__}"

# Guest sources both archives must carry, relative to guest/.
GUEST_FILES = ["kernel.config", "init.c", "malloc.c", "multicall.c", "build-kernel.sh", "build-initramfs.sh",
               "fetch-debian-kernel.sh", "common.sh", "kernel_key.py", "mkcpio.py",
               "build-busybox.sh", "applets.sh", "busybox.config", "busybox_config.py",
               "modules_order.py", "demo.sh", "rootfs/pyvmm-tests/boot-checks.sh"]
GUEST_GLOBS = ["patches/*.patch", "helpers/*.c", "helpers/*.h", "rootfs/**/*"]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                     ".hypothesis", "build", "dist", "results")


def expected_guest_files() -> set[str]:
    guest = REPO / "guest"
    names = set(GUEST_FILES)
    for pattern in GUEST_GLOBS:
        names |= {str(p.relative_to(guest)) for p in guest.glob(pattern) if p.is_file()}
    return names


def run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure shows its output."""
    try:
        p = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, argv))} did not finish within {timeout:.0f} s\n"
                    f"{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}", pytrace=False)
    return p


def check(p: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if p.returncode != 0:
        pytest.fail(f"{what} failed with status {p.returncode}\n--- stdout:\n{p.stdout[-4000:]}"
                    f"\n--- stderr:\n{p.stderr[-4000:]}", pytrace=False)
    return p


def setuptools_version(python: str) -> tuple[int, ...]:
    p = run([python, "-c", "import setuptools; print(setuptools.__version__)"], timeout=60)
    if p.returncode != 0:
        return ()
    return tuple(int(x) for x in p.stdout.strip().split(".")[:2] if x.isdigit())


def new_venv(where: Path, *packages: str) -> Path:
    """A venv at ``where`` with ``packages`` from PyPI; its python (skips or, under CI,
    fails when PyPI cannot be reached)."""
    check(run([sys.executable, "-m", "venv", where], timeout=180), "python -m venv")
    python = where / "bin" / "python"
    if packages:
        p = run([python, "-m", "pip", "install", "-q", *packages], timeout=600)
        if p.returncode != 0:
            _missing(f"pip install {' '.join(packages)} failed (no PyPI?): {p.stderr.strip()[-500:]}")
    return python


@pytest.fixture(scope="session")
def scratch():
    with tempfile.TemporaryDirectory(prefix="pyvmm-packaging-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def build_python(scratch) -> Path:
    if setuptools_version(sys.executable) >= SETUPTOOLS_MIN:
        return Path(sys.executable)
    return new_venv(scratch / "build-venv", "setuptools>=77")


def copy_source(copy: Path) -> Path:
    """This tree without its build products, plus a decoy guest/build/ and .pyc."""
    shutil.copytree(REPO, copy, ignore=COPY_IGNORE, symlinks=True)
    (copy / "guest" / "build").mkdir()
    (copy / "guest" / "build" / "vmlinux").write_bytes(b"decoy")
    (copy / "tests" / "__pycache__").mkdir()
    (copy / "tests" / "__pycache__" / "decoy.cpython-311.pyc").write_bytes(b"decoy")
    return copy


@pytest.fixture(scope="session")
def source_copy(scratch) -> Path:
    return copy_source(scratch / "src")


@pytest.fixture(scope="session")
def sdist(build_python, source_copy, scratch) -> Path:
    out = scratch / "dist"
    p = check(run([build_python, "-c", "import sys; from setuptools import build_meta as b; "
                   "print(b.build_sdist(sys.argv[1]))", out], timeout=300, cwd=source_copy),
              "building the sdist")
    return out / p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def wheel(build_python, sdist, scratch) -> Path:
    unpacked = scratch / "sdist"
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    out = scratch / "wheels"
    check(run([build_python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out,
               unpacked / NAME], timeout=300), "pip wheel")
    [whl] = out.glob("pyvmm-*.whl")
    return whl


@pytest.fixture(scope="session")
def wheel_from_tree(build_python, scratch) -> Path:
    """A wheel built straight from a clone (with a guest/build/ in it), as `pip wheel .` does."""
    tree = copy_source(scratch / "tree")
    out = scratch / "tree-wheels"
    check(run([build_python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out,
               tree], timeout=300), "pip wheel")
    [whl] = out.glob("pyvmm-*.whl")
    return whl


# --- what the archives carry -------------------------------------------------------------------
def test_sdist_contents(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(f"{NAME}/") for n in tar.getnames()}
    for name in ["LICENSE", "README.md", "Makefile", "MANIFEST.in", "pyproject.toml", "PKG-INFO",
                 "pyvmm/__init__.py", "pyvmm/guest_build.py", "tests/conftest.py",
                 "tests/test_guest_build.py", "tests/cheader.py", "bench/boot.py",
                 "fuzz/fuzzing.py", "fuzz/corpus/virtqueue/seed-00"]:
        assert name in names, name
    assert {f"guest/{n}" for n in expected_guest_files()} <= names
    assert not [n for n in names if n.startswith("guest/build/") or n == "guest/build"]
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert not [n for n in names if n.startswith((".git", ".venv", ".ci"))]


@pytest.mark.parametrize("which", ["wheel", "wheel_from_tree"])
def test_wheel_contents(which, request):
    with zipfile.ZipFile(request.getfixturevalue(which)) as z:
        names = set(z.namelist())
        metadata = z.read(f"{NAME}.dist-info/METADATA").decode()
        modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
    assert {f"pyvmm/_guest/{n}" for n in expected_guest_files()} <= names
    assert not [n for n in names if n.startswith("pyvmm/_guest/build/")]
    assert not [n for n in names if n.startswith(("tests/", "bench/", "guest/", "fuzz/"))]
    assert f"{NAME}.dist-info/licenses/LICENSE" in names
    assert {"pyvmm/cli.py", "pyvmm/guest_build.py", "pyvmm/pci/msix.py",
            "pyvmm/virtiofsd/cli.py"} <= names
    assert modes["pyvmm/_guest/build-kernel.sh"] & 0o111
    assert f"Version: {pyvmm.__version__}\n" in metadata
    assert "License-Expression: MIT\n" in metadata
    assert "Requires-Dist: pyelftools" in metadata


# --- a wheel in a fresh venv builds its guest and boots it ---------------------------------------
def cached_kernel_dir() -> Path:
    """The kernel `make guest` built (in the real cache), never written to by this test."""
    env = {**os.environ, "PYVMM_CACHE": str(guest_build.cache_dir())}
    p = run(["bash", REPO / "guest" / "build-kernel.sh", "--print-key"], timeout=60, env=env)
    if p.returncode != 0:
        _missing(f"no default kernel source: {p.stderr.strip()}")
    kernel = guest_build.cache_dir() / f"kernel-{p.stdout.strip()}"
    if not (kernel / "vmlinux").is_file():
        _missing(f"{kernel}/vmlinux is not built: run `make guest` first")
    return kernel


@pytest.mark.boot
def test_wheel_builds_and_boots_its_guest(kvm_host, wheel, scratch):
    kernel = cached_kernel_dir()
    python = new_venv(scratch / "venv", "pyelftools>=0.29")
    check(run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], timeout=300), "installing the wheel")
    bindir = python.parent
    for tool in ("pyvmm", "pyvmm-virtiofsd"):
        p = check(run([bindir / tool, "--version"], timeout=60), f"{tool} --version")
        assert p.stdout == f"pyvmm {pyvmm.__version__}\n"

    # A cache of our own that shares the real kernel (so only the initramfs is built);
    # the real cache is only read.
    cache = scratch / "cache"
    cache.mkdir()
    (cache / kernel.name).symlink_to(kernel, target_is_directory=True)
    home = scratch / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYVMM_GUEST_DIR", "PYTHONPATH", "PYVMM_LOG", "PYVMM_T0", "VIRTUAL_ENV")}
    env.update(PYVMM_CACHE=str(cache), HOME=str(home), PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    cwd = scratch   # not the clone: this pyvmm must find its guest in the cache

    p = check(run([bindir / "pyvmm", "guest", "build"], timeout=900, env=env, cwd=cwd), "pyvmm guest build")
    assert f"kernel {kernel.name.removeprefix('kernel-')} is cached" in p.stdout
    assert "done; boot it with: pyvmm run" in p.stdout
    built = cache / "guest"
    assert (built / "vmlinux").read_bytes() == (kernel / "vmlinux").read_bytes()
    assert (built / "initramfs.cpio").stat().st_size > 0

    p = run([bindir / "pyvmm", "run", "--exec", "uname -s"], timeout=300, env=env, cwd=cwd)
    assert p.returncode == 0, (f"pyvmm run ended with {p.returncode}\n--- stdout:\n{p.stdout[-4000:]}"
                               f"\n--- stderr:\n{p.stderr[-4000:]}")
    assert p.stdout == "Linux\n"
