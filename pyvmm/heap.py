"""The process's C heap: give what it freed back to the kernel.

Python returns its own small-object arenas when they empty, but pages that
malloc freed inside its heap stay resident until ``malloc_trim``.  Compiling
modules (a clone with no .pyc files) and loading a 17 MB kernel leave a few MiB
of such pages; the VMM and pyvmm-virtiofsd call ``trim_heap`` once, when their
set-up is done.  No dataclasses, no typing here: pyvmm-virtiofsd's waiting
parent imports this module and should hold as little as possible.
"""

from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """glibc's ``malloc_trim(0)``; nothing where the C library has none (musl)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)
