"""Ask the C compiler about a kernel UAPI header: sizes, offsets, constants.

The structure mirrors (``pyvmm.kvm``, ``pyvmm.virtiofsd.fuse_abi``) are checked
against the headers the kernel ships: a test writes a small C program that
prints ``<kind> <key...> <value>`` lines, and ``probe`` compiles and runs it
and returns {"<kind> <key...>": value}.  Without gcc or the header the tests
FAIL: the image is supposed to have both (gcc, linux-libc-dev).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def probe(tmp_dir, header: str, program: str) -> dict[str, int]:
    name = os.path.basename(header).replace(".", "_")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail(f"gcc is not installed: it is needed to check against <{header}> "
                    "(apt-get install gcc linux-libc-dev)")
    if not os.path.exists(header):
        pytest.fail(f"{header} is missing: install linux-libc-dev")
    src, exe = tmp_dir / f"{name}.c", tmp_dir / name
    src.write_text(program)
    cc = subprocess.run([gcc, "-O0", "-w", "-o", str(exe), str(src)], capture_output=True, text=True)
    if cc.returncode != 0:
        pytest.fail(f"compiling the {os.path.basename(header)} probe failed:\n{cc.stderr[-3000:]}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        kind, *key, value = line.split()
        values[" ".join([kind, *key])] = int(value)
    return values
