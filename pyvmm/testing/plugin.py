"""pytest plugin for testing with pyvmm guests (entry point ``pytest11``: ``pyvmm``).

Fixtures:

* ``pyvmm_guest``: a factory, ``pyvmm_guest(shares=..., append=...)`` boots a
  ``Guest`` and stops it at the end of the test;
* ``pyvmm_session_guest``: one guest for the whole session (a boot takes tens
  of seconds on PVM hosts): tests share it, so they should not break it;
* ``pyvmm_guest_options``: the ``Guest`` keyword arguments of the session
  guest; override it in your conftest.py to give it shares or kernel words.

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

import os
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
