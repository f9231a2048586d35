"""A GDB stub: ``pyvmm run --gdb PORT`` (docs/gdb.md).

GDB talks the remote serial protocol (GDB manual, appendix E "GDB Remote
Serial Protocol") over TCP or a Unix socket:

* ``packets``: the framing (``$payload#cc``, acks, escapes, Ctrl-C);
* ``registers``: GDB's i386:x86-64 register layout from KVM's structures;
* ``debugger``: ``GuestDebugger``, what the vCPU threads report to
  (breakpoints, steps, stops) and how the guest is paused and resumed;
* ``server``: ``GdbStub``, the socket and the packets, in its own thread.
"""

from .server import GdbStub, parse_address, start_for

__all__ = ["GdbStub", "parse_address", "start_for"]
