"""Snapshot and restore of a pyvmm virtual machine: saving a paused guest to files
and bringing it back in a new process."""
