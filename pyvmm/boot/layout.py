"""Guest-physical memory layout of a pyvmm x86-64 machine.

Everything the VMM writes into guest RAM before the first KVM_RUN lives at a
fixed address named here, so the loaders, the table builders and the docs
agree.  Low memory (below 1 MiB) follows the PC conventions Linux expects.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Low memory, all inside the first 640 KiB of RAM.
GDT_ADDR = 0x500             # boot GDT (null, code64, data, code32, tss)
PVH_START_INFO_ADDR = 0x6000  # struct hvm_start_info + modlist + memmap
ZERO_PAGE_ADDR = 0x7000      # struct boot_params for the Linux boot protocol
PML4_ADDR = 0x9000           # identity page tables for the 64-bit entry:
PDPTE_ADDR = 0xA000          #   PML4, one PDPT and four PDs of 2 MiB pages
PDE_ADDR = 0xB000            #   cover the first 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 4096           # bytes, NUL included; Linux x86 takes up to 2048
BOOT_STACK_ADDR = 0x8FF0     # initial RSP/ESP for the boot CPU

EBDA_START = 0x9FC00         # last KiB of base memory: the MP table lives here
MPTABLE_ADDR = EBDA_START
BASE_MEMORY_END = 0xA0000    # 640 KiB: end of conventional memory
BIOS_ROM_START = 0xF0000     # reserved system BIOS area: the $PIR table (pirq.py)
HIGH_MEMORY_START = 0x100000  # 1 MiB: bzImage protected-mode kernel goes here

# The 32-bit MMIO hole: RAM never overlaps it; PCI 32-bit BARs, the IOAPIC
# (0xfec00000) and the LAPIC (0xfee00000) live in it.
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
IOAPIC_ADDR = 0xFEC00000
PCI_MMIO32_START = MMIO_HOLE_START   # 32-bit BARs: [3 GiB, IOAPIC)
PCI_MMIO32_END = 0xFEC00000
PCI_MMIO64_SIZE = 64 * GiB          # 64-bit BARs: a window above RAM
LAPIC_ADDR = 0xFEE00000

# KVM needs three pages for the TSS and one for the EPT identity map
# (VMX only) somewhere in the guest-physical space that is not RAM.
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000

# Port I/O: the guest contract's debug-exit port (cf. QEMU's isa-debug-exit)
# and its snapshot point (docs/guest-contract.md).
DEBUG_EXIT_PORT = 0x501
SNAPSHOT_PORT = 0x502
