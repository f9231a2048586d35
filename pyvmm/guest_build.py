"""``pyvmm guest build``, and where pyvmm finds a guest image.

The guest sources (kernel config, patches, /init, helpers, build scripts) are
the top-level ``guest/`` directory of a clone; a wheel carries the same files
as ``pyvmm/_guest/``.  ``pyvmm guest build`` runs their scripts and builds into
a per-user cache (see :func:`cache_dir`):

    <cache>/kernel-KEY/vmlinux   the kernel, keyed by its source, config and
                                 patches (guest/kernel_key.py has the rule)
    <cache>/guest/               vmlinux + initramfs.cpio (--kernel default), or
                                 debian/ + initramfs-debian.cpio (--kernel debian)

``pyvmm run`` without --kernel takes the first of :func:`guest_dir_candidates`
that holds a ``vmlinux``.  Exit statuses of ``pyvmm guest build``: 0 built,
2 bad input (one line on stderr), 1 missing tools (one line naming the Debian
packages) or a failed build.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("pyvmm.guest")

CACHE_ENV = "PYVMM_CACHE"
GUEST_DIR_ENV = "PYVMM_GUEST_DIR"
ROOT_CACHE = Path("/var/cache/pyvmm")
KERNELS = ("default", "debian")

# Exit statuses of the guest/ scripts (guest/common.sh).
SCRIPT_BAD_INPUT = 2
SCRIPT_MISSING_TOOLS = 3


# --- where things are -------------------------------------------------------------------------
def cache_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """``$PYVMM_CACHE``; else /var/cache/pyvmm for root; else ``$XDG_CACHE_HOME/pyvmm``
    (``~/.cache/pyvmm`` when XDG_CACHE_HOME is unset, empty or relative)."""
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    if euid == 0:
        return ROOT_CACHE
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "pyvmm"
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".cache" / "pyvmm"


def source_checkout(package_dir: Path | None = None) -> Path | None:
    """The clone pyvmm runs from (its top directory), or None for an installed pyvmm."""
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    top = package_dir.parent
    if (top / "pyproject.toml").is_file() and (top / "guest" / "build-kernel.sh").is_file():
        return top
    return None


def guest_sources(package_dir: Path | None = None) -> Path:
    """The directory with the guest build scripts: a clone's guest/, or the wheel's pyvmm/_guest/."""
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    checkout = source_checkout(package_dir)
    if checkout is not None:
        return checkout / "guest"
    return package_dir / "_guest"


def guest_dir_candidates(environ: Mapping[str, str] | None = None, euid: int | None = None,
                         checkout: Path | None = None) -> list[Path]:
    """Where ``pyvmm run`` looks for a guest, in order: $PYVMM_GUEST_DIR alone when it is
    set; else a clone's guest/build/ (when pyvmm runs from a clone), then <cache>/guest/."""
    environ = os.environ if environ is None else environ
    if environ.get(GUEST_DIR_ENV):
        return [Path(environ[GUEST_DIR_ENV])]
    candidates = [] if checkout is None else [checkout / "guest" / "build"]
    return [*candidates, cache_dir(environ, euid) / "guest"]


def find_guest_dir(environ: Mapping[str, str] | None = None, euid: int | None = None,
                   checkout: Path | None = None) -> Path | None:
    """The first candidate directory holding a ``vmlinux``, or None."""
    for candidate in guest_dir_candidates(environ, euid, checkout):
        if (candidate / "vmlinux").is_file():
            return candidate
    return None


def default_guest_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The guest ``pyvmm run`` boots, or (none built yet) the directory it would use."""
    checkout = source_checkout()
    found = find_guest_dir(environ, checkout=checkout)
    return found if found is not None else guest_dir_candidates(environ, checkout=checkout)[-1]


def no_guest_message(environ: Mapping[str, str] | None = None) -> str:
    """The one line ``pyvmm run`` prints when no candidate has a guest."""
    environ = os.environ if environ is None else environ
    where = f" in {environ[GUEST_DIR_ENV]} ({GUEST_DIR_ENV})" if environ.get(GUEST_DIR_ENV) else ""
    return (f'no guest image{where}: run "pyvmm guest build" (or "make guest" in a clone), '
            "or give --kernel")


# --- the command line -------------------------------------------------------------------------
class BuildInputError(Exception):
    """Bad ``pyvmm guest build`` input: one line, exit 2."""


@dataclass(frozen=True)
class Step:
    """One guest/ script run: its arguments after the script path."""
    script: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class BuildPlan:
    kernel: str
    out: Path
    cache: Path
    source: Path | None
    checks: tuple[Step, ...]
    steps: tuple[Step, ...]
    boot_hint: str


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``guest build`` to the ``pyvmm`` sub-commands (errors raise the parent's kind)."""
    guest = subparsers.add_parser("guest", help="build the guest image (kernel + initramfs)")
    actions = guest.add_subparsers(dest="guest_command", metavar="build")
    actions.required = True
    build = actions.add_parser(
        "build", help="build the guest into the per-user cache",
        description="Build the guest kernel and initramfs from the guest sources pyvmm carries, "
                    f"into <cache>/guest/ (<cache>: ${CACHE_ENV}, else /var/cache/pyvmm for root, "
                    "else ~/.cache/pyvmm); `pyvmm run` finds it there.")
    build.add_argument("--kernel", choices=KERNELS, default="default",
                       help="default: Linux 6.1 built with guest/kernel.config (a few minutes "
                            "the first time); debian: Debian 12's stock kernel and its modules")
    build.add_argument("--source", metavar="DIR|TARBALL",
                       help="build the default kernel from this Linux 6.1 tree or tarball "
                            "(default: /usr/src/linux-source-6.1.tar.xz)")
    build.add_argument("--out", metavar="DIR", help="put the guest here instead of <cache>/guest")


def load_kernel_key(sources: Path) -> ModuleType:
    """guest/kernel_key.py (the cache-key rule and the --source check) as a module."""
    spec = importlib.util.spec_from_file_location("pyvmm_guest_kernel_key", sources / "kernel_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_source(source: str, sources: Path) -> Path:
    """The --source as an absolute path; BuildInputError when it is no Linux 6.1 source
    (a tarball's version is checked once it is unpacked)."""
    path = Path(source).absolute()
    kernel_key = load_kernel_key(sources)
    try:
        kernel_key.check_source(path)
    except kernel_key.SourceError as e:
        raise BuildInputError(f"--source: {e}") from None
    return path


def plan_build(args: argparse.Namespace, sources: Path,
               environ: Mapping[str, str] | None = None) -> BuildPlan:
    """Check the arguments and say what to run; BuildInputError for bad input."""
    environ = os.environ if environ is None else environ
    if args.source is not None and args.kernel != "default":
        raise BuildInputError("--source builds the default kernel: not with --kernel debian")
    source = None if args.source is None else check_source(args.source, sources)
    cache = cache_dir(environ).absolute()
    out = Path(args.out).absolute() if args.out else cache / "guest"
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"--out {args.out} is not a directory")
    if args.kernel == "debian":
        return BuildPlan(
            "debian", out, cache, None,
            checks=(Step("build-initramfs.sh", ("--check",)),),
            steps=(Step("fetch-debian-kernel.sh", (str(out / "debian"),)),
                   Step("build-initramfs.sh", (str(out / "initramfs-debian.cpio"),
                                               "--modules", str(out / "debian" / "modules")))),
            boot_hint=f"pyvmm run --kernel {out / 'debian' / 'bzImage'} "
                      f"--initramfs {out / 'initramfs-debian.cpio'}")
    source_args = () if source is None else ("--source", str(source))
    return BuildPlan(
        "default", out, cache, source,
        checks=(Step("build-kernel.sh", (*source_args, "--check")),
                Step("build-initramfs.sh", ("--check",))),
        steps=(Step("build-kernel.sh", (*source_args, str(out / "vmlinux"))),
               Step("build-initramfs.sh", (str(out / "initramfs.cpio"),))),
        boot_hint=boot_hint(out, environ))


def boot_hint(out: Path, environ: Mapping[str, str]) -> str:
    """How to boot a default guest built into ``out``: plain ``pyvmm run`` when its
    lookup (:func:`guest_dir_candidates`) will reach ``out`` first."""
    for candidate in guest_dir_candidates(environ, checkout=source_checkout()):
        if candidate == out:
            return "pyvmm run"
        if (candidate / "vmlinux").is_file():
            break
    return f"{GUEST_DIR_ENV}={out} pyvmm run"


def progress(t0: int, message: str) -> None:
    """A user-facing progress line in the scripts' format (guest/common.sh)."""
    elapsed = int(time.time() - t0)
    print(f"guest: [{elapsed // 60}:{elapsed % 60:02d}] {message}", flush=True)


def script_env(plan: BuildPlan, t0: int, environ: Mapping[str, str]) -> dict[str, str]:
    return {**environ, CACHE_ENV: str(plan.cache), "PYVMM_T0": str(t0),
            "PYTHON": sys.executable}


def run_step(sources: Path, step: Step, env: dict[str, str]) -> int:
    """Run one guest script with the terminal as its output; its exit status."""
    argv = ["bash", str(sources / step.script), *step.args]
    log.debug("running %s", " ".join(argv))
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL).returncode


def step_failure(step: Step, status: int) -> int:
    """Our exit status for a script that failed (the scripts print their own one line
    for bad input and missing tools)."""
    if status == SCRIPT_BAD_INPUT:
        return 2
    if status != SCRIPT_MISSING_TOOLS:
        reason = f"signal {-status}" if status < 0 else f"status {status}"
        sys.stderr.write(f"pyvmm: guest build failed: {step.script} ended with {reason}\n")
    return 1


def execute(plan: BuildPlan, sources: Path, environ: Mapping[str, str]) -> int:
    t0 = int(time.time())   # whole seconds, as the scripts see it
    env = script_env(plan, t0, environ)
    for step in plan.checks:
        status = run_step(sources, step, env)
        if status:
            return step_failure(step, status)
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.stderr.write(f"pyvmm: cannot create {plan.out}: {e.strerror}\n")
        return 1
    progress(t0, f"building the {plan.kernel} guest into {plan.out} (cache: {plan.cache})")
    for step in plan.steps:
        status = run_step(sources, step, env)
        if status:
            return step_failure(step, status)
    progress(t0, f"done; boot it with: {plan.boot_hint}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``pyvmm guest build``: 0 built, 2 bad input, 1 missing tools or a failed build."""
    sources = guest_sources()
    if not (sources / "build-kernel.sh").is_file():
        sys.stderr.write(f"pyvmm: the guest sources are missing ({sources}): reinstall pyvmm\n")
        return 1
    try:
        plan = plan_build(args, sources)
    except BuildInputError as e:
        sys.stderr.write(f"pyvmm: {e}\n")
        return 2
    try:
        return execute(plan, sources, os.environ)
    except KeyboardInterrupt:
        sys.stderr.write("pyvmm: guest build interrupted\n")
        return 130
