"""The default guest kernel command line, tuned for a fast boot.

Each word is here because it was measured to matter on our hosts
(docs/pvm.md "Boot-time savers") or because the guest
contract needs it.
"""

from __future__ import annotations

from .platform import PVM_CMDLINE, Flavour, host_tsc_mhz

GUEST_HZ = 100  # CONFIG_HZ of the default guest kernel (guest/kernel.config)

BASE_CMDLINE = " ".join([
    "console=ttyS0",        # the 16550A at 0x3f8
    "reboot=k",             # reboot through the i8042 (reboot=t would hit int3)
    "panic=-1",             # a panic reboots at once: the VMM exits instead of hanging
    "quiet",                # every console byte is a port-I/O exit
    "random.trust_cpu=on",  # -5 s: no waiting for entropy
    "rodata=off",           # -3.6 s on PVM
    "tsc=reliable",         # no clocksource watchdog
    # kvm-clock, not the TSC: KVM_SET_CLOCK carries it across a snapshot, while on PVM
    # the guest TSC is the host's and jumps by the time a snapshot waited, which made
    # a restored kernel catch up every missed tick (20 s for a 25-minute-old snapshot).
    "clocksource=kvm-clock",
    "no_timer_check",       # skip the IOAPIC timer check loop
    "i8042.noaux",
])


def default_cmdline(flavour: Flavour) -> str:
    words = [BASE_CMDLINE]
    mhz = host_tsc_mhz()
    if mhz:
        # Loops per jiffy for a TSC-based delay loop: skips delay calibration.
        words.append(f"lpj={int(mhz * 1_000_000 / GUEST_HZ)}")
    if flavour.is_pvm:
        words.append(PVM_CMDLINE)
    return " ".join(words)
