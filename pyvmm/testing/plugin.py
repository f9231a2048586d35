"""pytest plugin for testing with pyvmm guests (entry point ``pytest11``: ``pyvmm``).

Fixtures:

* ``pyvmm_guest``: a factory, ``pyvmm_guest(shares=..., append=...)`` boots a
  ``Guest`` and stops it at the end of the test;
* ``pyvmm_session_guest``: one guest for the whole session (a boot takes tens
  of seconds on PVM hosts): tests share it, so they should not break it;
* ``pyvmm_guest_options``: the ``Guest`` keyword arguments of the session
  guest; override it in your conftest.py to give it shares or kernel words;
* ``pyvmm_snapshot``: a snapshot of a guest booted with those options, taken
  once per session (shared by xdist workers);
* ``pyvmm_fresh_guest``: a guest restored from that snapshot for each test:
  a clean guest per test for a fraction of a boot.

Options (also for your own fixtures through ``guest_options(config)``):
``--pyvmm-kernel``, ``--pyvmm-initramfs``, ``--pyvmm-memory``, ``--pyvmm-cpus``,
``--pyvmm-boot-timeout``.

Without a usable /dev/kvm the fixtures skip the test, or fail it when the
environment variable CI is true: a green CI run must mean the guests ran.
When a test that used a guest fails, its report gets a "pyvmm console"
section with the console's last lines.  Works under pytest-xdist (a session
guest per worker).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from .guest import BOOT_TIMEOUT, Guest

GUESTS = pytest.StashKey[list]()          # item -> guests it started
SESSION_GUEST = pytest.StashKey[Guest]()  # config -> the session guest, once booted
REPORT_LINES = 40


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm guests")
    group.addoption("--pyvmm-kernel", help="guest kernel (default: pyvmm's default guest)")
    group.addoption("--pyvmm-initramfs", help="guest initramfs (default: pyvmm's default guest)")
    group.addoption("--pyvmm-memory", default="256M", help="guest RAM (default 256M)")
    group.addoption("--pyvmm-cpus", type=int, default=1, help="guest vCPUs (default 1)")
    group.addoption("--pyvmm-boot-timeout", type=float, default=BOOT_TIMEOUT,
                    help=f"seconds a boot may take (default {BOOT_TIMEOUT:.0f})")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def kvm_problem(path: str = "/dev/kvm") -> str | None:
    if not os.path.exists(path):
        return f"{path} does not exist on this host"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not accessible to this user"
    return None


def require_kvm() -> None:
    """Skip (fail under CI) when this host cannot run guests."""
    problem = kvm_problem()
    if problem:
        if in_ci():
            pytest.fail(f"CI needs this test to run, but {problem}")
        pytest.skip(problem)


def guest_options(config: pytest.Config) -> dict:
    """The ``Guest`` keyword arguments the command-line options ask for."""
    return {"kernel": config.getoption("pyvmm_kernel"),
            "initramfs": config.getoption("pyvmm_initramfs"),
            "memory": config.getoption("pyvmm_memory"),
            "cpus": config.getoption("pyvmm_cpus"),
            "boot_timeout": config.getoption("pyvmm_boot_timeout")}


@pytest.fixture
def pyvmm_guest(request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """``pyvmm_guest(**kwargs)`` boots a Guest (options as defaults); all stop after the test."""
    require_kvm()
    started: list[Guest] = request.node.stash.setdefault(GUESTS, [])

    def make(**kwargs) -> Guest:
        guest = Guest(**{**guest_options(request.config), **kwargs})
        started.append(guest)
        return guest.start()

    yield make
    for guest in started:
        guest.close()


@pytest.fixture(scope="session")
def pyvmm_guest_options(request: pytest.FixtureRequest) -> dict:
    """``Guest`` keyword arguments for ``pyvmm_session_guest`` (override to add shares)."""
    return guest_options(request.config)


@pytest.fixture(scope="session")
def pyvmm_session_guest(request: pytest.FixtureRequest, pyvmm_guest_options: dict) -> Iterator[Guest]:
    """One booted guest for the whole session (per xdist worker)."""
    require_kvm()
    guest = Guest(**pyvmm_guest_options)
    request.config.stash[SESSION_GUEST] = guest
    try:
        yield guest.start()
    finally:
        guest.close()


@pytest.fixture(scope="session")
def pyvmm_snapshot(tmp_path_factory: pytest.TempPathFactory, pyvmm_guest_options: dict) -> Path:
    """A snapshot of a guest booted with ``pyvmm_guest_options``, taken once: xdist
    workers share it (the first one takes it, under a lock)."""
    require_kvm()
    key = hashlib.sha256(json.dumps(pyvmm_guest_options, sort_keys=True, default=str).encode())
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent   # the directory all workers of this run share
    path = root / f"pyvmm-snapshot-{key.hexdigest()[:12]}"
    with open(root / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "snapshot.json").exists():
            Guest.snapshot(path, **pyvmm_guest_options)
    return path


@pytest.fixture
def pyvmm_fresh_guest(request: pytest.FixtureRequest, pyvmm_snapshot: Path,
                      pyvmm_guest_options: dict) -> Iterator[Guest]:
    """A guest restored from ``pyvmm_snapshot`` for this test alone."""
    options = {k: v for k, v in pyvmm_guest_options.items()
               if k in ("shares", "boot_timeout", "env", "python", "log_level")}
    guest = Guest.restore(pyvmm_snapshot, **options)
    request.node.stash.setdefault(GUESTS, []).append(guest)
    try:
        yield guest.start()
    finally:
        guest.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    guests = list(item.stash.get(GUESTS, []))
    session_guest = item.config.stash.get(SESSION_GUEST, None)
    if session_guest is not None and "pyvmm_session_guest" in getattr(item, "fixturenames", ()):
        guests.append(session_guest)
    for index, guest in enumerate(guests):
        if guest.vmm is None:
            continue
        name = "pyvmm console" + (f" (guest {index + 1})" if len(guests) > 1 else "")
        report.sections.append((name, "\n".join(guest.console_tail(REPORT_LINES))))
