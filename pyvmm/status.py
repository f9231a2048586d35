"""pyvmm's exit statuses: one table for the CLI, its --help, the docs and the harness.

A CI job must never read 0 for a guest that crashed, so every way a guest can
end has its own status.  "Run mode" means the guest was asked to run something
(``--exec CMD`` or ``pyvmm.run=PATH``): then only the program's own status
counts, and a guest that ends before that status arrived has failed.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0               # the guest shut down or rebooted by itself (not in run mode)
    VMM_ERROR = 1        # pyvmm itself failed (registers dumped)
    USAGE = 2            # bad command-line input or a bad file
    GUEST_PANIC = 100    # the guest kernel panicked (pvpanic)
    GUEST_DIED = 101     # a triple fault, or in run mode: the guest ended before its status
    TIMEOUT = 124        # --timeout expired (as timeout(1) does)
    SIGINT = 130         # 128 + SIGINT
    SIGTERM = 143        # 128 + SIGTERM


EXIT_STATUS_TABLE = """\
exit status:
  N    run mode (--exec CMD, pyvmm.run=PATH): the guest program's own status
  0    the guest shut down or rebooted by itself (not in run mode); a snapshot was written
  1    pyvmm failed (the reason and the vCPUs' registers are on stderr)
  2    bad input (one line on stderr)
  100  the guest kernel panicked (the console's last lines are on stderr)
  101  the guest died: a triple fault, or in run mode a reboot, power-off or
       halt before the program's status arrived
  124  --timeout expired (console tail and registers on stderr)
  130  SIGINT, 143 SIGTERM"""
