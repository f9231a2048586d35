"""GDB itself (/usr/bin/gdb) on the default guest through `pyvmm run --gdb`.

The guest waits for the debugger before its first instruction; GDB stops it
at start_kernel with a hardware breakpoint (paging is still off at the PVH
entry, so an int3 cannot be placed at a kernel virtual address yet), then at
rest_init with a software one, and kills it.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvmm.testing import VmmProcess

pytestmark = pytest.mark.boot


def test_gdb_stops_at_start_kernel_and_rest_init(guest_image, tmp_path):
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    sock = tmp_path / "gdb.sock"
    vmm = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs",
                               guest_image["initramfs"], "--gdb", f"unix:{sock}",
                               "--timeout", "300", stdin=False)
    try:
        assert vmm.wait_until(sock.exists, 30), vmm.report("the stub never listened")
        out = subprocess.run(
            [gdb, "-nx", "-batch", "-ex", f"target remote {sock}", "-ex", "hbreak start_kernel",
             "-ex", "continue", "-ex", "info registers rip", "-ex", "delete",
             "-ex", "break rest_init", "-ex", "continue", "-ex", "bt 2", "-ex", "kill",
             guest_image["kernel"]],
            capture_output=True, text=True, timeout=240)
        print(out.stdout)
        assert "in start_kernel ()" in out.stdout, out.stdout + out.stderr
        assert "<start_kernel>" in out.stdout
        assert "in rest_init ()" in out.stdout and "arch_call_rest_init" in out.stdout
        assert vmm.wait_exit(30) == 0, vmm.report("pyvmm did not end after gdb's kill")
    finally:
        vmm.stop()
