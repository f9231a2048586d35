"""pyvmm: a minimal KVM virtual machine monitor written in Python."""

__version__ = "0.1.0"
