"""pyvmm as a test harness: boot a guest, run commands in it, share directories.

Public API (typed, no global state, usable from any thread and from several
processes at once)::

    Guest(kernel=None, initramfs=None, memory="256M", cpus=1,
          shares={"tag": "/host/dir" | Share(path, dax=True, readonly=False)},
          append=(), boot_timeout=300)          # a context manager
    Guest.run(cmd, timeout=120, check=False) -> Result(returncode, stdout, stderr)
    Guest.expect(regex, timeout) / Guest.send(text)   # the serial console
    GuestError > GuestTimeout, GuestPanic, GuestDied  # with console tail + registers
    VmmProcess                                 # any VMM process, watched

The pytest plugin (``pyvmm.testing.plugin``, registered as ``pytest11``)
gives the fixtures ``pyvmm_guest`` (a factory) and ``pyvmm_session_guest``;
see docs/testing.md.
"""

from ..agent import Result
from .guest import Guest, Share
from .process import GuestDied, GuestError, GuestPanic, GuestTimeout, VmmProcess

__all__ = ["Guest", "Share", "Result", "VmmProcess",
           "GuestError", "GuestTimeout", "GuestPanic", "GuestDied"]
