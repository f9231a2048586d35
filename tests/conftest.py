"""Shared test set-up: KVM availability and the default guest image.

Locally, tests that need /dev/kvm skip with the reason when it is missing.
Under CI (CI=true) a missing /dev/kvm or guest image FAILS them instead:
a green CI run must mean the boot tests really ran.
"""

from __future__ import annotations

import pytest

from pyvmm.cli import default_guest_dir
from pyvmm.platform import detect_flavour
from pyvmm.testing.plugin import in_ci, require_kvm


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI needs this test to run, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kvm_host() -> str:
    """The KVM flavour name; skips (fails under CI) without usable /dev/kvm."""
    require_kvm()
    return detect_flavour().name


@pytest.fixture(scope="session")
def guest_image(kvm_host) -> dict:
    """Paths of the default guest from `make guest`."""
    d = default_guest_dir()
    kernel, initramfs = d / "vmlinux", d / "initramfs.cpio"
    for p in (kernel, initramfs):
        if not p.exists():
            _missing(f"{p} is missing: run `make guest`")
    return {"kernel": str(kernel), "initramfs": str(initramfs), "flavour": kvm_host}


def pytest_report_header(config):
    f = detect_flavour()
    return [f.summary, f"guest image: {default_guest_dir()}"]
