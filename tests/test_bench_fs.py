"""bench.fs without a boot: the module imports (it did not, after bench.boot lost
signal_group) and its process-group helper tolerates a group that is gone."""

from __future__ import annotations

import signal
import subprocess
import sys

from bench import fs


def test_bench_fs_imports_and_parses_its_arguments():
    args = fs.parse_args(["--setups", "pyvmm-dax"])
    assert args.setups == "pyvmm-dax"


def test_signal_group_of_an_ended_process_is_quiet():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    fs.signal_group(proc, signal.SIGKILL)
