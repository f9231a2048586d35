"""Which flavour of KVM this host has, and what follows from it.

* hardware: kvm_intel / kvm_amd (VMX/SVM): the guest kernel runs natively.
* pvm: kvm_pvm: guest user mode runs natively, guest kernel mode runs in KVM's
  instruction emulator (~2 M instructions/s), some instructions must be
  finished by the VMM, and the guest kernel needs our syscall fix-up patch
  (docs/pvm.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SYS_MODULE = "/sys/module"

# Words that hide what the PVM emulator cannot run at CPL0 (docs/pvm.md "CPUID");
# the guest reads the host's CPUID there whatever the VMM sets.
#   308 = SMAP (clac/stac), 151 = POPCNT, 297 = ERMS, 580 = FSRM
PVM_CMDLINE = "noxsave clearcpuid=308,151,297,580 mitigations=off"


@dataclass(frozen=True)
class Flavour:
    name: str      # "pvm", "hardware" or "unknown"
    module: str    # the kernel module behind /dev/kvm
    summary: str   # one line for logs and `pyvmm info`

    @property
    def is_pvm(self) -> bool:
        return self.name == "pvm"


def detect_flavour(sys_module: str = SYS_MODULE) -> Flavour:
    def loaded(name: str) -> bool:
        return os.path.isdir(os.path.join(sys_module, name))

    if loaded("kvm_pvm"):
        return Flavour("pvm", "kvm_pvm",
                       "KVM flavour: PVM (kvm_pvm): guest kernel code is emulated (~2 M instr/s), "
                       "user code native; int3/int1/INT n/fwait finished by pyvmm; "
                       "the guest kernel needs the PVM syscall patch")
    for module, vendor in (("kvm_intel", "VMX"), ("kvm_amd", "SVM")):
        if loaded(module):
            return Flavour("hardware", module,
                           f"KVM flavour: hardware ({module}, {vendor}): guest runs at native speed")
    return Flavour("unknown", "", "KVM flavour: unknown (no kvm_intel, kvm_amd or kvm_pvm module seen)")


def host_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
