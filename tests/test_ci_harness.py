"""pyvmm as a CI harness, with the default guest: honest exit statuses, --exec,
--share, pyvmm.testing and its pytest plugin.

Boots are expensive on PVM hosts (25-40 s), so each boot checks many things:

1. ``--exec`` with three ``--share``s (DAX, plain, read-only): the command's
   stdout and stderr are pyvmm's, apart from the kernel log, its status is
   pyvmm's, files go both ways, and no process, socket or temporary file is
   left (pyvmm runs with TMPDIR in the test's own directory);
2. a kernel panic (sysrq crash) exits 100 with the reason and the console tail;
3. a reboot before --exec's status arrived exits 101;
4. SIGTERM while the guest boots with a share: 143, nothing left behind;
5. ``Guest``: run() output and status, a command timeout that leaves the guest
   usable, check=True, console send/expect; a boot timeout's GuestTimeout
   carries the console tail and the registers;
6. examples/kernel-ci under ``pytest -n 2`` (session guests and guests restored
   per test from one shared snapshot), plus one failing test whose report shows
   the guest console.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus
from pyvmm.testing import Guest, GuestError, GuestTimeout, Share, VmmProcess

pytestmark = pytest.mark.boot

REPO = Path(__file__).resolve().parent.parent
BOOT = 300          # seconds for a boot and a short command


def leftovers(tmpdir: Path, marker: str) -> list[str]:
    """Files pyvmm left in its TMPDIR and processes whose command line names ``marker``."""
    files = [str(p) for p in tmpdir.iterdir()]
    procs = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return files + [line for line in procs.splitlines() if "pgrep" not in line]


def pyvmm_exec(tmp_path: Path, *args: str) -> tuple[VmmProcess, Path]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    return VmmProcess.pyvmm_run(*args, env={"TMPDIR": str(tmpdir)}, stdin=False), tmpdir


def pyvmm_to_exit(tmp_path: Path, *args: str) -> tuple[VmmProcess, Path, int]:
    """``pyvmm run ARGS`` (TMPDIR in the test's directory) until it exits by itself."""
    g, tmpdir = pyvmm_exec(tmp_path, *args)
    try:
        status = g.wait_exit(BOOT)
    finally:
        g.stop()
    return g, tmpdir, status


def test_exec_streams_status_and_shares(guest_image, tmp_path):
    dax, plain, ro = (tmp_path / n for n in ("daxshare", "plainshare", "roshare"))
    for d in (dax, plain, ro):
        d.mkdir()
        (d / "in.txt").write_text(f"host file in {d.name}\n")
    script = ("echo out-line; echo err-line >&2; "
              "cat /mnt/dax/in.txt /mnt/plain/in.txt /mnt/ro/in.txt; "
              "echo from-guest-dax > /mnt/dax/out.txt; echo from-guest-plain > /mnt/plain/out.txt; "
              "if echo x > /mnt/ro/out.txt; then echo ro-writable; fi; "
              "grep -c 'virtiofs.*dax=always' /proc/mounts; exit 7")
    g, tmpdir, status = pyvmm_to_exit(tmp_path, "--share", f"{dax},tag=dax,dax=on,cache_size=32M",
                                      "--share", f"{plain},tag=plain",
                                      "--share", f"{ro},tag=ro,readonly=on", "--exec", script)
    assert status == 7, g.report("wrong status")
    assert g.text == ("out-line\nhost file in daxshare\nhost file in plainshare\n"
                      "host file in roshare\n1\n"), g.report("stdout is not just the command's")
    assert "err-line" in g.stderr and "Read-only file system" in g.stderr
    assert "pyvmm-guest:" not in g.text   # the console (kernel log, /init) is not stdout
    assert (dax / "out.txt").read_text() == "from-guest-dax\n"
    assert (plain / "out.txt").read_text() == "from-guest-plain\n"
    assert not (ro / "out.txt").exists()
    assert leftovers(tmpdir, str(tmp_path)) == []


def test_kernel_panic_is_exit_100_with_the_console_tail(guest_image, tmp_path):
    g, tmpdir, status = pyvmm_to_exit(tmp_path, "--exec", "echo c > /proc/sysrq-trigger")
    assert status == ExitStatus.GUEST_PANIC, g.report("a panic must not exit 0")
    assert "pyvmm: guest kernel panic" in g.stderr
    assert "sysrq triggered crash" in g.stderr   # the console tail is on stderr
    assert leftovers(tmpdir, str(tmp_path)) == []


def test_reboot_before_the_status_is_exit_101(guest_image, tmp_path):
    g, _, status = pyvmm_to_exit(tmp_path, "--exec", "reboot -f")
    assert status == ExitStatus.GUEST_DIED, g.report("a guest that ends early must fail")
    assert "before the guest program's exit status arrived" in g.stderr


def test_sigterm_during_boot_leaves_nothing(guest_image, tmp_path):
    share = tmp_path / "sigterm-share"
    share.mkdir()
    g, tmpdir = pyvmm_exec(tmp_path, "--share", f"{share},dax=on", "--exec", "true")
    try:
        assert g.wait_until(lambda: b"pyvmm-virtiofsd pid" in g.errors.data, 60), g.report("no back-end")
        time.sleep(1)
        g.proc.send_signal(signal.SIGTERM)
        status = g.wait_exit(30)
    finally:
        g.stop()
    assert status == ExitStatus.SIGTERM
    deadline = time.monotonic() + 10   # the back-end sees its VMM go
    while leftovers(tmpdir, str(share)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(tmpdir, str(share)) == []


def test_guest_api(tmp_path, pyvmm_guest):
    share = tmp_path / "api-share"
    share.mkdir()
    (share / "hello.txt").write_text("hello\n")
    g = pyvmm_guest(shares={"s": Share(share, dax=True)})
    print(f"boot to ready: {g.boot_seconds:.1f} s")
    r = g.run("cat /mnt/s/hello.txt; echo oops >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, "hello\n", "oops\n")
    t = time.monotonic()
    g.run("true")
    print(f"one more Guest.run: {time.monotonic() - t:.2f} s")
    with pytest.raises(GuestTimeout) as timeout:
        g.run("echo started; sleep 600", timeout=3)
    assert "started" in str(timeout.value)
    assert g.run("echo still-here").stdout == "still-here\n"
    with pytest.raises(GuestError, match="exited with 3"):
        g.run("exit 3", check=True)
    g.send("echo typed-$((6*7))\n")
    g.expect(r"typed-42")


def test_boot_timeout_reports_console_and_registers(guest_image):
    # rdinit=/bin/sh: a shell instead of /init, so the guest never says it is ready and the
    # boot hangs however fast the host is; earlyprintk: the console has lines from the
    # kernel's first moments on
    g = Guest(boot_timeout=8, append=["rdinit=/bin/sh", "earlyprintk=ttyS0", "loglevel=7"])
    with pytest.raises(GuestTimeout) as failure:
        g.start()
    message = str(failure.value)
    assert "was not ready within 8 s" in message
    console = message.split("--- console (last lines):\n")[1].split("\n--- VMM stderr")[0]
    assert console.count("\n") >= 10 and "] " in console   # the console tail: kernel lines
    assert "vcpu0 registers:" in message         # SIGUSR2 made pyvmm dump them
    assert g.vmm.proc.returncode is not None     # and it was stopped


FAILING_TEST = '''
def test_fails_on_purpose(pyvmm_session_guest):
    pyvmm_session_guest.run("echo marker-$((40+2)) > /dev/console")
    assert pyvmm_session_guest.run("exit 1").returncode == 0
'''


def test_example_project_under_xdist(guest_image, tmp_path):
    example = tmp_path / "kernel-ci"
    shutil.copytree(REPO / "examples" / "kernel-ci", example)
    (example / "test_zz_fails.py").write_text(FAILING_TEST)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider"],
                       cwd=example, capture_output=True, text=True, timeout=900, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-5000:]
    assert "6 passed" in out and "1 failed" in out, out[-5000:]
    assert "pyvmm console" in out and "marker-42" in out, out[-5000:]
