"""The default guest kernel command line, tuned for a fast boot.

Each word is here because it was measured to matter on our hosts
(docs/pvm.md "Boot-time savers") or because the guest
contract needs it.
"""

from __future__ import annotations

from .boot.e820 import ram_ranges
from .platform import PVM_CMDLINE, Flavour

#: RAM a PVM guest boots with; /init adds the rest once user space runs.
BOOT_RAM = 256 << 20
#: x86-64 memory block while boot RAM is below 64 GiB (probe_memory_block_size in
#: arch/x86/mm/init_64.c): the unit of /sys/devices/system/memory/probe.
MEMORY_BLOCK = 128 << 20

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

#: Words that only pay off where kernel code is emulated (docs/pvm.md "Boot-time savers").
PVM_BOOT_CMDLINE = " ".join([
    # Per-cpu areas from 4 KiB pages: the default embeds them in a 2 MiB unit that
    # memblock zeroes and then frees back, 0.9 s of emulated work per boot (1.24 s to 0.34 s).
    "percpu_alloc=page",
    # Keep the kernel's lock prefixes on a 1-vCPU guest.  Otherwise it rewrites each
    # of them to a no-op prefix, one text_poke() (a page-table switch and a TLB
    # flush) per site: 1.4 s of every boot here (15.3 s to 13.9 s, `pyvmm run
    # --profile` found it).  A locked instruction costs the emulator no more.
    "noreplace-smp",
    # Keep the initramfs's pages instead of freeing them once it is unpacked: Linux
    # fills each freed page with a poison byte first, 0.06 s for the default guest's
    # 0.7 MB here (`--profile`: free_reserved_area).  The pages stay reserved for the
    # guest's life: all of a large --initramfs (docs/cli.md).
    "retain_initrd",
])


def default_cmdline(flavour: Flavour) -> str:
    # No lpj=: under KVM the guest's kvmclock sets the delay loop's loops per jiffy
    # from the TSC frequency and the kernel's own HZ (kvm_get_preset_lpj), so the
    # delay loop is never calibrated; a value computed here would be wrong for any
    # kernel whose HZ differs from the default guest's.
    words = [BASE_CMDLINE]
    if flavour.is_pvm:
        words += [PVM_CMDLINE, PVM_BOOT_CMDLINE]
    return " ".join(words)


def deferred_memory_words(memory: int) -> list[str]:
    """Words that boot a guest of ``memory`` bytes with only its first ``BOOT_RAM``
    online and tell /init what to add once user space runs.

    On PVM the kernel's per-page set-up (struct pages, then freeing every page
    to the buddy allocator) runs in the instruction emulator at ~2.9 s per GiB;
    most of it never matters to a short command.  ``mem=`` makes the kernel drop
    the RAM above ``BOOT_RAM`` from its E820 map (pyvmm's map stays the whole
    truth), ``memhp_default_state=online`` onlines each block as it is probed,
    and ``pyvmm.memory=START+SIZE,...`` (the guest contract) lists the blocks.
    Nothing is deferred for a guest of ``BOOT_RAM`` or less, or whose size is not
    a whole number of memory blocks (a probe adds whole blocks only).
    """
    if memory <= BOOT_RAM or memory % MEMORY_BLOCK:
        return []
    later = []
    for gpa, size, _ in ram_ranges(memory):
        start, end = max(gpa, BOOT_RAM), gpa + size
        if end > start:
            later.append(f"{start:#x}+{end - start:#x}")
    return [f"mem={BOOT_RAM >> 20}M", "memhp_default_state=online", "pyvmm.memory=" + ",".join(later)]
