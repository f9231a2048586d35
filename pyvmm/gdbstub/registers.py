"""GDB's register layout for i386:x86-64, from and to KVM's structures.

The order and sizes are those of GDB's own target descriptions
(gdb/features/i386/64bit-core.xml, 64bit-sse.xml, 64bit-segments.xml), which
GDB uses when the stub's ``target.xml`` names only the architecture.
"""

from __future__ import annotations

import struct

from .. import kvm

GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
# (name, size): 64bit-core (GPRs, rip, eflags, segments, st0-7, x87 control),
# 64bit-sse (xmm0-15, mxcsr), 64bit-segments (fs_base, gs_base)
REGISTERS = ([(n, 8) for n in GPR_ORDER] + [("eflags", 4)] + [(n, 4) for n in SEGMENTS]
             + [(f"st{i}", 10) for i in range(8)] + [(n, 4) for n in FPU_CONTROL]
             + [(f"xmm{i}", 16) for i in range(16)] + [("mxcsr", 4), ("fs_base", 8), ("gs_base", 8)])
REGISTER_INDEX = {name: i for i, (name, _) in enumerate(REGISTERS)}
G_PACKET_SIZE = sum(size for _, size in REGISTERS)
WRITABLE = GPR_ORDER + ("eflags",)   # what G and P change; the rest needs its own ioctl
TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
              b"<target><architecture>i386:x86-64</architecture></target>")


def register_values(regs: kvm.kvm_regs, sregs: kvm.kvm_sregs, fpu: kvm.kvm_fpu) -> list[bytes]:
    """Every register of REGISTERS, little-endian, from KVM's structures."""
    out = [struct.pack("<Q", getattr(regs, n)) for n in GPR_ORDER]
    out.append(struct.pack("<I", regs.rflags & 0xFFFFFFFF))
    out += [struct.pack("<I", getattr(sregs, n).selector) for n in SEGMENTS]
    out += [bytes(fpu.fpr[i])[:10] for i in range(8)]
    # KVM has the abridged tag (1 bit a register, 1 = in use, FXSAVE format); GDB
    # wants the full word (2 bits a register, 3 = empty).
    ftag = sum((0 if fpu.ftwx >> i & 1 else 3) << (2 * i) for i in range(8))
    out += [struct.pack("<I", v & 0xFFFFFFFF) for v in (
        fpu.fcw, fpu.fsw, ftag, 0, fpu.last_ip, 0, fpu.last_dp, fpu.last_opcode)]
    out += [bytes(fpu.xmm[i]) for i in range(16)]
    out.append(struct.pack("<I", fpu.mxcsr))
    out += [struct.pack("<Q", sregs.fs.base), struct.pack("<Q", sregs.gs.base)]
    return out


def set_register(regs: kvm.kvm_regs, name: str, value: bytes) -> bool:
    """Put one of WRITABLE into ``regs``; False for a register the stub does not write."""
    if name not in WRITABLE:
        return False
    if name == "eflags":
        regs.rflags = (regs.rflags & ~0xFFFFFFFF) | struct.unpack("<I", value[:4])[0]
    else:
        setattr(regs, name, struct.unpack("<Q", value[:8])[0])
    return True

