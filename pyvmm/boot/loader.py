"""Pick the boot path for a kernel file: ELF vmlinux (PVH) or bzImage."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KernelFormatError
from .pvh import is_elf, load_pvh, parse_elf_kernel


@dataclass(frozen=True)
class BootEntry:
    mode: str      # "protected32" (PVH) or "long64" (Linux boot protocol)
    rip: int
    rbx: int = 0   # PVH: hvm_start_info
    rsi: int = 0   # boot protocol: zero page


def load_kernel(mem, image: bytes, cmdline: bytes, initrd: bytes | None, ram_size: int) -> BootEntry:
    """Load ``image`` and what it needs into guest RAM; KernelFormatError if it is no kernel."""
    if is_elf(image):
        boot = load_pvh(mem, parse_elf_kernel(image), cmdline, initrd, ram_size)
        return BootEntry("protected32", boot.entry32, rbx=boot.start_info)
    if len(image) > 0x206 and image[0x202:0x206] == b"HdrS":
        from .bzimage import load_bzimage
        entry = load_bzimage(mem, image, cmdline, initrd, ram_size)
        return BootEntry("long64", entry.rip, rsi=entry.rsi)
    raise KernelFormatError("the kernel is neither an ELF vmlinux nor a bzImage")
