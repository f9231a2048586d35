"""bench/exit.py's guest and both of its drivers, with a small N (counts only, no timing)."""

from __future__ import annotations

import shutil

import pytest

from bench import exit as exitbench

pytestmark = pytest.mark.kvm

N = 50


def test_pyvmm_dispatch_counts_every_exit(kvm_host):
    """The guest's three loops through VcpuThread and the buses: N port-I/O writes,
    then N MMIO writes, each phase ended by a mark, nothing else."""
    phases = exitbench.run_pyvmm(N, timeout=30)
    assert [(p.name, p.pio, p.mmio, p.other) for p in phases] == [
        ("loop", 0, 0, 0), ("pio", N, 0, 0), ("mmio", 0, N, 0)]
    exitbench.check_counts("pyvmm", phases, N)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_driver_runs_the_saved_guest(kvm_host, tmp_path):
    """The guest pyvmm saves (RAM image, sregs, regs, CPUID) runs in exitloop.c with
    the same exits."""
    exe = exitbench.build_c(tmp_path)
    exitbench.save_guest(N, tmp_path)
    phases = exitbench.run_c(exe, tmp_path, timeout=30)
    assert [(p.name, p.pio, p.mmio) for p in phases] == [("loop", 0, 0), ("pio", N, 0), ("mmio", 0, N)]
    assert all(p.ns > 0 and p.cpu_ns > 0 for p in phases)


def test_wrong_counts_are_an_error():
    phases = [exitbench.Phase("loop", 1, 1, 0, 0, 0), exitbench.Phase("pio", 1, 1, N - 1, 0, 0),
              exitbench.Phase("mmio", 1, 1, 0, N, 0)]
    with pytest.raises(RuntimeError, match="exit counts"):
        exitbench.check_counts("c", phases, N)
