"""What a running VMM and its back-end hold: no module a plain run does not use.

Each module costs resident memory for the whole run (its code objects, and a
shared library's pages: OpenSSL for hashlib is 3 MiB).  bench/boot.py
(``--rss-only``) measures the RSS itself; these tests keep the module sets from
growing back without a boot.  Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.boot import file_rss
from pyvmm.heap import trim_heap
from pyvmm.virtiofsd.sandbox import enter_sandbox

REPO = Path(__file__).resolve().parent.parent


def modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, env=env, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_a_vmm_with_a_share_loads_no_ssl_or_unused_device():
    # What `pyvmm run --share DIR` imports (cli.py imports the rest where it is used).
    # pyelftools (~2.4 MiB with the pdb it imports) reads the kernel in a child Python.
    loaded = modules_after("import pyvmm.cli, pyvmm.vm, pyvmm.shares, pyvmm.trace, pyvmm.agent, "
                           "pyvmm.boot.loader")
    unwanted = {"hashlib", "_hashlib", "pyvmm.devices.virtio.blk", "elftools", "pdb",
                "pyvmm.gdbstub", "pyvmm.snapshot.image", "pyvmm.snapshot.machine"}
    assert loaded & unwanted == set()


def test_parsing_either_command_line_leaves_shutil_out():
    # argparse imports shutil (and with it bz2, lzma, zlib: ~0.5 MiB) for the terminal's
    # width unless the formatter is given one (pyvmm.cliparse).
    loaded = modules_after("import pyvmm.cli, pyvmm.virtiofsd.cli\n"
                           "for cli in (pyvmm.cli, pyvmm.virtiofsd.cli):\n"
                           "    p = cli.build_parser(); p.format_help(); p.format_usage()\n"
                           "pyvmm.cli.build_parser().parse_args(['run', '--memory', '1G'])\n"
                           "pyvmm.virtiofsd.cli.build_parser().parse_args(['--socket-path', 's', "
                           "'--shared-dir', '.'])")
    assert loaded & {"shutil", "bz2", "lzma"} == set()


def test_loading_a_kernel_leaves_pyelftools_out_of_the_vmm():
    vmlinux = REPO / "guest" / "build" / "vmlinux"
    if not vmlinux.exists():
        pytest.skip(f"{vmlinux} is missing: run `make guest`")
    loaded = modules_after("from pyvmm.boot.loader import load_kernel\n"
                           "from pyvmm.memory import GuestMemory\n"
                           "mem = GuestMemory(256 << 20)\n"
                           f"load_kernel(mem, open({str(vmlinux)!r}, 'rb').read(), b'', None, 256 << 20)")
    assert "pyvmm.boot.pvh" in loaded and not any(m.startswith("elftools") for m in loaded)


def test_the_virtiofsd_process_that_only_waits_loads_no_server():
    # cli.py imports the server in enter_sandbox's ``prepare``, after the fork.
    # No dataclasses or typing either (with inspect, ast, dis: ~1.5 MiB).
    loaded = modules_after("import pyvmm.virtiofsd.cli")
    assert {m for m in loaded if m.startswith("pyvmm.")} == {
        "pyvmm.cliparse", "pyvmm.heap", "pyvmm.virtiofsd", "pyvmm.virtiofsd.cli",
        "pyvmm.virtiofsd.sandbox"}
    assert loaded & {"dataclasses", "typing", "inspect"} == set()


def test_the_virtiofsd_server_needs_no_kvm_no_front_end_and_no_dataclasses():
    # The server's records are NamedTuples and small classes: dataclasses imports
    # inspect, ast and dis (~0.6 MiB of the serving process).  The shared virtqueue
    # (pyvmm.devices.virtio.queue) and pyvmm.memory count here too.
    loaded = modules_after("import pyvmm.virtiofsd.passthrough, pyvmm.virtiofsd.server, "
                           "pyvmm.virtiofsd.vhost")
    assert loaded & {"pyvmm.kvm", "pyvmm.vhost_user.frontend"} == set()
    assert "pyvmm.devices.virtio.queue" in loaded
    assert loaded & {"dataclasses", "inspect", "ast", "dis"} == set()


def test_enter_sandbox_runs_prepare_in_the_process_that_serves(tmp_path):
    calls = []
    sandbox = enter_sandbox("none", str(tmp_path), lambda: calls.append(os.getpid()))
    os.close(sandbox.proc_self_fd)
    assert calls == [os.getpid()]


def test_prepare_runs_after_the_fork_into_the_pid_namespace(tmp_path):
    # Where the server's modules are imported: in the process that serves (PID 1 of
    # its namespace), before the shared directory becomes its root.
    if os.geteuid() != 0:
        pytest.skip("namespaces need root")
    probe = ("import os, sys\n"
             "from pyvmm.virtiofsd.sandbox import enter_sandbox\n"
             "seen = []\n"
             "enter_sandbox('namespace', sys.argv[1], lambda: seen.append((os.getpid(), "
             "os.path.exists(sys.argv[1]))))\n"
             "print(seen, os.path.exists(sys.argv[1]), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd="/", check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout == "[(1, True)] False\n", out.stderr


def test_trim_heap_returns_nothing_and_can_run_twice():
    assert trim_heap() is None
    trim_heap()


def test_file_rss_counts_the_touched_pages_of_one_file(tmp_path):
    # bench.boot's RssDaxFile: the shared file's pages in the VMM's DAX window.
    path = tmp_path / "shared"
    path.write_bytes(os.urandom(4 * mmap.PAGESIZE))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert file_rss(os.getpid(), str(path)) == 0
        assert m[0] is not None   # the kernel may map the cached pages around it too
        assert 0 < file_rss(os.getpid(), str(path)) <= 4 * mmap.PAGESIZE // 1024
    assert file_rss(os.getpid(), str(path)) == 0
