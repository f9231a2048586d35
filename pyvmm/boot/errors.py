"""Errors of the boot code."""


class KernelFormatError(ValueError):
    """A kernel, initramfs or command line that cannot be booted: one clear sentence."""
