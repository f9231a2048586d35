"""examples/hello_kvm.py runs and prints every exit of its guest, in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello_kvm.py"


def test_hello_kvm_prints_each_exit(kvm_host):
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "KVM_EXIT_IO out port 0x3f8: b'4'",
        "KVM_EXIT_IO out port 0x3f8: b'\\n'",
        "KVM_EXIT_IO in port 0x3f8: answered b'K'",
        "KVM_EXIT_MMIO write 0xd0000000: b'K'",
        "KVM_EXIT_MMIO read 0xd0000004: answered b'!'",
        "KVM_EXIT_IO out port 0x3f8: b'!'",
        "KVM_EXIT_HLT at RIP 0x10019: done",
    ]


def test_each_step_names_its_api_section():
    text = EXAMPLE.read_text()
    for section in ("4.1 KVM_GET_API_VERSION", "4.2 KVM_CREATE_VM", "4.35 KVM_SET_USER_MEMORY_REGION",
                    "4.7 KVM_CREATE_VCPU", "4.5 KVM_GET_VCPU_MMAP_SIZE", "4.10 KVM_RUN",
                    "4.13/4.14 KVM_GET/SET_SREGS", "4.11/4.12 KVM_GET/SET_REGS"):
        assert section in text
    assert text.count("\n# ") >= 3 and "# Try this:" in text
