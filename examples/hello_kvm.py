#!/usr/bin/env python3
"""Hello, KVM: the sequence of LWN's "Using the KVM API" (2015), in Python.

Open /dev/kvm, create a VM with one memory slot and one vCPU, map the vCPU's
``kvm_run``, set its registers, run twelve instructions that do port I/O and
MMIO, print every exit, stop at ``hlt``.  It uses pyvmm.kvm (a ctypes mirror of
linux/kvm.h: each method is one ioctl), pyvmm.memory.GuestMemory (an mmap'ed
memfd) and one helper, pyvmm.boot.cpu.set_boot_regs, which writes a GDT and
identity page tables into guest RAM and fills the segment and control
registers for 64-bit long mode: the same call pyvmm makes for a Linux kernel.

Run it as root (or as a member of group kvm), from a clone:
    PYTHONPATH=. python3 examples/hello_kvm.py
Numbers like "4.7" are sections of the kernel's Documentation/virt/kvm/api.rst.
"""

from pyvmm import kvm
from pyvmm.boot import cpu
from pyvmm.memory import GuestMemory

RAM_SIZE = 2 << 20      # 2 MiB of guest RAM at guest-physical 0
CODE_ADDR = 0x10000     # below it: the GDT, page tables and stack set_boot_regs writes
SERIAL_PORT = 0x3F8     # any port would do: nothing is there but this loop
MMIO_ADDR = 0xD0000000  # no memory slot here, so every access is an exit

CODE = bytes.fromhex(
    "66baf803"      # mov $0x3f8, %dx
    "00d8"          # add %bl, %al          (2 + 2)
    "0430"          # add $'0', %al
    "ee"            # out %al, (%dx)        exit: port I/O out, "4"
    "b00a"          # mov $'\\n', %al
    "ee"            # out %al, (%dx)        exit: port I/O out, "\\n"
    "ec"            # in (%dx), %al         exit: port I/O in, we answer "K"
    "bb000000d0"    # mov $0xd0000000, %ebx
    "8803"          # mov %al, (%rbx)       exit: MMIO write of "K"
    "8a4304"        # mov 4(%rbx), %al      exit: MMIO read, we answer "!"
    "ee"            # out %al, (%dx)        exit: port I/O out, "!"
    "f4")           # hlt                   exit: HLT (no in-kernel irqchip here)


def main() -> None:
    # 4.1 KVM_GET_API_VERSION: Kvm() opens /dev/kvm and checks that it says 12.
    system = kvm.Kvm()
    # 4.2 KVM_CREATE_VM: a VM file descriptor, no memory and no vCPU yet.
    vm = system.create_vm()
    # 4.35 KVM_SET_USER_MEMORY_REGION: our mapping becomes guest-physical [0, 2 MiB).
    ram = GuestMemory(RAM_SIZE)
    ram.write(CODE_ADDR, CODE)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM_SIZE,
                              userspace_addr=ram.host_addr)
    # 4.7 KVM_CREATE_VCPU, then 4.5 KVM_GET_VCPU_MMAP_SIZE and an mmap of the vCPU fd:
    # the shared struct kvm_run (5. "The kvm_run structure") is vcpu.kvm_run.
    vcpu = vm.create_vcpu(0)
    # 4.13/4.14 KVM_GET/SET_SREGS and 4.11/4.12 KVM_GET/SET_REGS.  LWN's example stays in
    # real mode; we start where a 64-bit kernel starts, in long mode at CPL0:
    # set_boot_regs writes a GDT and identity page tables (4 GiB in 2 MiB pages) into
    # RAM and sets CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CR3, a 64-bit CS, RIP and RSP.
    # On a PVM host (docs/pvm.md) CPL0 code runs in KVM's instruction emulator, which
    # runs real mode and long mode but fails on a 32-bit protected-mode iret; pyvmm's
    # tiny test guests stay in long mode for that reason, and so does this example.
    cpu.set_boot_regs(vcpu, ram, "long64", CODE_ADDR)
    regs = vcpu.get_regs()
    regs.rax, regs.rbx = 2, 2
    vcpu.set_regs(regs)

    while True:
        # 4.10 KVM_RUN: runs the guest until it needs us; kvm_run.exit_reason says why.
        vcpu.run()
        run = vcpu.kvm_run
        if run.exit_reason == kvm.KVM_EXIT_IO:
            io = run.exit.io        # the bytes sit in kvm_run at io.data_offset
            data = vcpu.io_data()
            if io.direction == kvm.KVM_EXIT_IO_OUT:
                print(f"KVM_EXIT_IO out port {io.port:#x}: {bytes(data)!r}")
            else:
                data[0] = ord("K")  # what the guest's `in` reads
                print(f"KVM_EXIT_IO in port {io.port:#x}: answered b'K'")
        elif run.exit_reason == kvm.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            if mmio.is_write:
                print(f"KVM_EXIT_MMIO write {mmio.phys_addr:#x}: {bytes(mmio.data[:mmio.len])!r}")
            else:
                mmio.data[0] = ord("!")   # what the guest's load reads
                print(f"KVM_EXIT_MMIO read {mmio.phys_addr:#x}: answered b'!'")
        elif run.exit_reason == kvm.KVM_EXIT_HLT:
            print(f"KVM_EXIT_HLT at RIP {vcpu.get_regs().rip:#x}: done")
            break
        else:
            name = kvm.EXIT_REASON_NAMES.get(run.exit_reason, run.exit_reason)
            raise SystemExit(f"unexpected exit {name}")
    # The file descriptors (/dev/kvm, VM, vCPU, memfd) close when the process ends.


if __name__ == "__main__":
    main()

# Try this:
# 1. Single-step it: call vcpu.set_guest_debug(kvm.KVM_GUESTDBG_ENABLE |
#    kvm.KVM_GUESTDBG_SINGLESTEP) (4.87 KVM_SET_GUEST_DEBUG) before the loop and print
#    run.exit.debug.arch.pc on each KVM_EXIT_DEBUG: one exit per instruction, which
#    is what GDB's `stepi` does through `pyvmm run --gdb` (docs/gdb.md).  Count the
#    steps around an `out`, and give the loop a step limit: on a PVM host the step
#    goes on past the `hlt`.
# 2. Add a second memory slot at MMIO_ADDR (4.35 again, slot=1, another GuestMemory)
#    before the loop: the two MMIO exits disappear, the guest reads and writes RAM
#    there, and the last `out` prints what that RAM held.
# 3. Start in real mode, as LWN does: skip set_boot_regs, keep the fresh vCPU's sregs
#    but set cs.base = CODE_ADDR and cs.selector = CODE_ADDR >> 4, set rip = 0, and
#    assemble the code with `.code16` (GNU as, then objcopy -O binary): 16-bit
#    addresses cannot reach MMIO_ADDR, so pick an MMIO address below 1 MiB.
