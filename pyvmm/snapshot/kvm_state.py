"""The KVM-level state of a paused VM and of its vCPUs: save, restore, JSON.

What KVM keeps for a guest, besides guest RAM and the VMM's own device models:

* per vCPU (``VcpuState``): general registers, segment/control registers, FPU
  and the XSAVE area, XCRs, debug registers, the in-kernel local APIC, the MSRs
  of ``msr_indices``, the MP state, pending/injected events, the TSC frequency
  and the CPUID table;
* per VM (``VmState``): the in-kernel 8259 PICs, the IOAPIC, the PIT and
  kvmclock.

Saving: stop every vCPU thread (no KVM_RUN in progress), call
``complete_pending_io`` on each vCPU, then ``save_vcpu`` for each and
``save_vm``.  Restoring, into a new VM whose vCPUs have never run: create the
irqchip (and the PIT if the saved VM had one), register the memory slots with
the saved RAM in them, ``restore_vcpu`` for each vCPU, then ``restore_vm``
last (it sets kvmclock), then run.

``to_json``/``from_json`` give a dict a person can read; ``from_json`` treats
its input as untrusted and raises ``ValueError`` naming the first bad field.

Measured on a PVM host (kvm_pvm, Linux 6.18): every ioctl used here is
accepted, and a save -> restore -> save gives back the same state, except:

* the guest TSC: KVM_SET_MSRS takes MSR_IA32_TSC but the guest goes on reading
  the host's TSC, so a restored guest sees its TSC jump by the time it spent
  saved (kvmclock, restored with KVM_SET_CLOCK, does not jump);
* KVM_GET_FPU reports MXCSR as 0 whatever the guest set: the XSAVE area has
  the guest's value, so the FPU state alone is not enough.

The LAPIC timer goes on from its saved current count (KVM_SET_LAPIC re-arms it
from TMCCT: the first tick after a restore comes after the remaining count,
then one every period).  See tests/test_kvm_state_guest.py and the notes on
each function.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from dataclasses import dataclass
from typing import Any, Callable

from .. import kvm
from .fields import HEX_RE, blob, describe, expect_keys, hex_int, optional

log = logging.getLogger(__name__)

STATE_VERSION = 1

# --- MSRs whose restore order matters (Intel SDM vol. 4) -------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
# KVM_SET_MSRS (api.rst 4.19) writes the entries in the order given and stops at the
# first one it refuses.  The TSC goes after everything else and the TSC deadline after
# the TSC: the deadline is an absolute guest-TSC value that KVM turns into a host timer
# relative to the guest TSC at the moment of the write.
_MSRS_LAST = (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE)

MAX_MSRS_PER_IOCTL = 255      # KVM refuses KVM_GET/SET_MSRS with 256 or more (MAX_IO_MSRS)
MAX_CPUID_ENTRIES = 256
MAX_XSAVE_SIZE = 1 << 20      # a sanity bound for untrusted input; 4096 on today's hosts

MP_STATE_NAMES = {
    kvm.KVM_MP_STATE_RUNNABLE: "RUNNABLE",
    kvm.KVM_MP_STATE_UNINITIALIZED: "UNINITIALIZED",
    kvm.KVM_MP_STATE_INIT_RECEIVED: "INIT_RECEIVED",
    kvm.KVM_MP_STATE_HALTED: "HALTED",
    kvm.KVM_MP_STATE_SIPI_RECEIVED: "SIPI_RECEIVED",
}


# --- the state -------------------------------------------------------------------------
@dataclass(eq=False)
class VcpuState:
    """One vCPU, as the KVM ioctls give it.  Optional parts are None where the host
    lacks the capability (KVM_CAP_XSAVE, KVM_CAP_XCRS, KVM_CAP_DEBUGREGS,
    KVM_CAP_GET_TSC_KHZ)."""

    regs: kvm.kvm_regs
    sregs: kvm.kvm_sregs
    fpu: kvm.kvm_fpu
    xsave: bytes | None               # the whole KVM_GET_XSAVE(2) area, >= 4096 bytes
    xcrs: dict[int, int] | None       # XCR number -> value (XCR0 only, today)
    debugregs: kvm.kvm_debugregs | None
    lapic: kvm.kvm_lapic_state
    msrs: dict[int, int]              # MSR index -> value, in the order they were read
    mp_state: int                     # KVM_MP_STATE_*
    vcpu_events: kvm.kvm_vcpu_events
    tsc_khz: int | None
    cpuid: list[kvm.kvm_cpuid_entry2]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "regs": struct_to_json(self.regs),
            "sregs": struct_to_json(self.sregs),
            "fpu": struct_to_json(self.fpu),
            "xsave": None if self.xsave is None else {"bytes": len(self.xsave),
                                                      "area": self.xsave.hex()},
            "xcrs": None if self.xcrs is None else {hex(n): hex(v) for n, v in self.xcrs.items()},
            "debugregs": None if self.debugregs is None else struct_to_json(self.debugregs),
            "lapic": struct_to_json(self.lapic),
            "msrs": {hex(i): hex(v) for i, v in self.msrs.items()},
            "mp_state": MP_STATE_NAMES.get(self.mp_state, hex(self.mp_state)),
            "vcpu_events": struct_to_json(self.vcpu_events),
            "tsc_khz": self.tsc_khz,
            "cpuid": [struct_to_json(e) for e in self.cpuid],
        }

    @classmethod
    def from_json(cls, data: object) -> "VcpuState":
        """The state from ``to_json``'s dict; ValueError on anything missing,
        unknown, mistyped or of the wrong size."""
        path = "vcpu"
        expect_keys(data, ("version", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs",
                            "lapic", "msrs", "mp_state", "vcpu_events", "tsc_khz", "cpuid"), path)
        _expect_version(data["version"], path)
        return cls(
            regs=struct_from_json(kvm.kvm_regs, data["regs"], f"{path}.regs"),
            sregs=struct_from_json(kvm.kvm_sregs, data["sregs"], f"{path}.sregs"),
            fpu=struct_from_json(kvm.kvm_fpu, data["fpu"], f"{path}.fpu"),
            xsave=optional(_xsave_from_json, data["xsave"], f"{path}.xsave"),
            xcrs=optional(_xcrs_from_json, data["xcrs"], f"{path}.xcrs"),
            debugregs=optional(lambda d, p: struct_from_json(kvm.kvm_debugregs, d, p),
                                data["debugregs"], f"{path}.debugregs"),
            lapic=struct_from_json(kvm.kvm_lapic_state, data["lapic"], f"{path}.lapic"),
            msrs=_msrs_from_json(data["msrs"], f"{path}.msrs"),
            mp_state=_mp_state_from_json(data["mp_state"], f"{path}.mp_state"),
            vcpu_events=struct_from_json(kvm.kvm_vcpu_events, data["vcpu_events"],
                                         f"{path}.vcpu_events"),
            tsc_khz=optional(_positive_int, data["tsc_khz"], f"{path}.tsc_khz"),
            cpuid=_cpuid_from_json(data["cpuid"], f"{path}.cpuid"),
        )


@dataclass(eq=False)
class VmState:
    """The VM-wide in-kernel devices.  ``pit2`` is None for a VM without an in-kernel
    PIT (KVM_CREATE_PIT2 never called: KVM_GET_PIT2 says ENXIO)."""

    pic_master: kvm.kvm_pic_state
    pic_slave: kvm.kvm_pic_state
    ioapic: kvm.kvm_ioapic_state
    pit2: kvm.kvm_pit_state2 | None
    clock: kvm.kvm_clock_data

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "pic_master": struct_to_json(self.pic_master),
            "pic_slave": struct_to_json(self.pic_slave),
            "ioapic": struct_to_json(self.ioapic),
            "pit2": None if self.pit2 is None else struct_to_json(self.pit2),
            "clock": struct_to_json(self.clock),
        }

    @classmethod
    def from_json(cls, data: object) -> "VmState":
        path = "vm"
        expect_keys(data, ("version", "pic_master", "pic_slave", "ioapic", "pit2", "clock"), path)
        _expect_version(data["version"], path)
        return cls(
            pic_master=struct_from_json(kvm.kvm_pic_state, data["pic_master"], f"{path}.pic_master"),
            pic_slave=struct_from_json(kvm.kvm_pic_state, data["pic_slave"], f"{path}.pic_slave"),
            ioapic=struct_from_json(kvm.kvm_ioapic_state, data["ioapic"], f"{path}.ioapic"),
            pit2=optional(lambda d, p: struct_from_json(kvm.kvm_pit_state2, d, p),
                           data["pit2"], f"{path}.pit2"),
            clock=struct_from_json(kvm.kvm_clock_data, data["clock"], f"{path}.clock"),
        )


# --- vCPU: pending I/O, save, restore -------------------------------------------------------
def complete_pending_io(vcpu: kvm.Vcpu,
                        handle_exit: Callable[[kvm.kvm_run], None] | None = None) -> int:
    """Let KVM finish an instruction whose I/O the VMM has already served.

    After a KVM_EXIT_IO or KVM_EXIT_MMIO, the guest state is consistent only
    after the next KVM_RUN (api.rst 5 "The kvm_run structure", the note on
    KVM_EXIT_IO and KVM_EXIT_MMIO): an ``in`` or MMIO read puts the data into
    the register there, and the instruction's RIP update may happen there.
    KVM_RUN with ``immediate_exit = 1`` finishes that and then returns EINTR
    without running any further guest instruction.  Measured on PVM, where CPL0
    code is emulated: at the exit of an ``out`` (and of an MMIO write at CPL3)
    RIP is already past the instruction and this call leaves it there; at the
    exit of an ``in`` RIP is still at the ``in`` and AL is untouched, and this
    call stores the data and moves RIP past it.  (On VMX/SVM, KVM's fast path
    for ``out`` also moves RIP only at completion.)

    A string instruction may need more I/O to finish (KVM then exits again):
    ``handle_exit`` serves those exits; without it they raise RuntimeError.
    Returns how many such exits there were.  Must run on a vCPU that no other
    thread is running.
    """
    kvm_run = vcpu.kvm_run
    served = 0
    try:
        while True:
            kvm_run.immediate_exit = 1
            vcpu.run()
            if kvm_run.exit_reason == kvm.KVM_EXIT_INTR:
                return served
            if handle_exit is None or served >= 1024:
                name = kvm.EXIT_REASON_NAMES.get(kvm_run.exit_reason, str(kvm_run.exit_reason))
                raise RuntimeError(f"vcpu{vcpu.index}: finishing pending I/O ended in {name}")
            handle_exit(kvm_run)
            served += 1
    finally:
        kvm_run.immediate_exit = 0


def save_vcpu(vcpu: kvm.Vcpu, msr_indices: list[int]) -> VcpuState:
    """The state of a paused vCPU (after ``complete_pending_io``).

    Order: KVM_GET_MP_STATE first, because it lets KVM process pending INIT/SIPI
    events (kvm_apic_accept_events), which can change the LAPIC and the
    registers read afterwards; KVM_GET_LAPIC computes the current timer count
    (TMCCT) at the moment of the call; KVM_GET_VCPU_EVENTS last, so that any
    event state the other GETs fold in is included.
    """
    mp_state = vcpu.get_mp_state()
    vm = vcpu.vm
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    fpu = vcpu.get_fpu()
    xsave = _get_xsave(vcpu) if vm.check_extension(kvm.KVM_CAP_XSAVE) > 0 else None
    xcrs = _xcrs_dict(vcpu.get_xcrs()) if vm.check_extension(kvm.KVM_CAP_XCRS) > 0 else None
    debugregs = vcpu.get_debugregs() if vm.check_extension(kvm.KVM_CAP_DEBUGREGS) > 0 else None
    lapic = vcpu.get_lapic()
    tsc_khz = vcpu.get_tsc_khz() if vm.check_extension(kvm.KVM_CAP_GET_TSC_KHZ) > 0 else None
    cpuid = vcpu.get_cpuid2(MAX_CPUID_ENTRIES)
    msrs = _get_msrs(vcpu, msr_indices)
    events = vcpu.get_vcpu_events()
    return VcpuState(regs=regs, sregs=sregs, fpu=fpu, xsave=xsave, xcrs=xcrs,
                     debugregs=debugregs, lapic=lapic, msrs=msrs, mp_state=mp_state,
                     vcpu_events=events, tsc_khz=tsc_khz or None, cpuid=cpuid)


def restore_vcpu(vcpu: kvm.Vcpu, state: VcpuState) -> None:
    """Load ``state`` into a vCPU that has never run.

    Preconditions: the VM's irqchip exists, and the memory slots hold the saved
    RAM (enabling MSRs such as MSR_KVM_ASYNC_PF_EN or the kvmclock MSRs makes KVM
    look up the guest-physical address they name).  The order, and why:

    1. KVM_SET_CPUID2: KVM checks MSR values, XCR0 and the XSAVE components
       against the guest's CPUID, and refuses a new CPUID once the vCPU has run.
    2. KVM_SET_TSC_KHZ (only if the rate differs): before MSR_IA32_TSC, so that the
       TSC value is set at its final rate.
    3. KVM_SET_SREGS: CR0/CR4/EFER (paging mode) and the APIC base MSR, which
       selects xAPIC or x2APIC and so the register layout KVM_SET_LAPIC reads.
    4. KVM_SET_REGS.  It drops a pending exception, and SET_SREGS queues the
       interrupt of its interrupt_bitmap: both come before KVM_SET_VCPU_EVENTS,
       which holds the complete event state.
    5. KVM_SET_FPU, then KVM_SET_XSAVE (a superset of the FPU state, so it has the
       last word), then KVM_SET_XCRS.  Measured on PVM: KVM_GET_FPU reports MXCSR
       as 0 whatever the guest set; only the XSAVE area carries it.
    6. KVM_SET_DEBUGREGS.
    7. KVM_SET_LAPIC: after SET_SREGS (APIC base), before the MSRs: KVM only
       accepts MSR_IA32_TSC_DEADLINE while the LAPIC timer is in TSC-deadline
       mode (it drops the write otherwise).  KVM re-arms the LAPIC timer here,
       from the saved current count (TMCCT).
    8. KVM_SET_MSRS, MSR_IA32_TSC last but one and MSR_IA32_TSC_DEADLINE last
       (see ``_MSRS_LAST``).
    9. KVM_SET_MP_STATE: after SET_SREGS, which may itself mark a BSP sitting at the
       reset vector RUNNABLE, and after the LAPIC (HALTED and INIT_RECEIVED only
       mean something with the in-kernel LAPIC in place).
    10. KVM_SET_VCPU_EVENTS last: the injected/pending exception, interrupt and NMI,
        the interrupt shadow, SMM and a latched INIT, which the SETs above reset.
    """
    if state.cpuid:
        vcpu.set_cpuid2(state.cpuid)
    _restore_tsc_khz(vcpu, state.tsc_khz)
    vcpu.set_sregs(state.sregs)
    vcpu.set_regs(state.regs)
    vcpu.set_fpu(state.fpu)
    if state.xsave is not None:
        vcpu.set_xsave(state.xsave)
    if state.xcrs is not None:
        vcpu.set_xcrs(_kvm_xcrs(state.xcrs))
    if state.debugregs is not None:
        vcpu.set_debugregs(state.debugregs)
    vcpu.set_lapic(state.lapic)
    _set_msrs(vcpu, _msr_restore_order(state.msrs))
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_vcpu_events(state.vcpu_events)


def mark_paused(vcpu: kvm.Vcpu) -> bool:
    """KVM_KVMCLOCK_CTRL (api.rst 4.70): tell a guest that uses kvmclock that the host
    paused this vCPU (its soft-lockup watchdog then ignores the gap).  Call between
    restore and resume.  False when the guest has not enabled kvmclock (EINVAL)."""
    try:
        vcpu.kvmclock_ctrl()
    except kvm.KvmError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


def _get_xsave(vcpu: kvm.Vcpu) -> bytes:
    size = vcpu.vm.xsave_size()
    if size > kvm.XSAVE_LEGACY_SIZE:
        return vcpu.get_xsave2(size)
    return bytes(vcpu.get_xsave())


def _xcrs_dict(x: kvm.kvm_xcrs) -> dict[int, int]:
    return {x.xcrs[i].xcr: x.xcrs[i].value for i in range(min(x.nr_xcrs, kvm.KVM_MAX_XCRS))}


def _kvm_xcrs(xcrs: dict[int, int]) -> kvm.kvm_xcrs:
    x = kvm.kvm_xcrs(nr_xcrs=len(xcrs))
    for i, (n, v) in enumerate(xcrs.items()):
        x.xcrs[i].xcr = n
        x.xcrs[i].value = v
    return x


def _get_msrs(vcpu: kvm.Vcpu, indices: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for start in range(0, len(indices), MAX_MSRS_PER_IOCTL):
        chunk = indices[start:start + MAX_MSRS_PER_IOCTL]
        got = vcpu.get_msrs(chunk)
        if len(got) != len(chunk):
            raise kvm.KvmError(errno.EINVAL, f"vcpu{vcpu.index}: KVM_GET_MSRS read {len(got)} of "
                                             f"{len(chunk)} MSRs, refused {chunk[len(got)]:#x}")
        out.update(got)
    return out


def _set_msrs(vcpu: kvm.Vcpu, msrs: dict[int, int]) -> None:
    items = list(msrs.items())
    for start in range(0, len(items), MAX_MSRS_PER_IOCTL):
        chunk = dict(items[start:start + MAX_MSRS_PER_IOCTL])
        n = vcpu.set_msrs(chunk)
        if n != len(chunk):
            index, value = list(chunk.items())[n]
            raise kvm.KvmError(errno.EINVAL, f"vcpu{vcpu.index}: KVM_SET_MSRS refused MSR "
                                             f"{index:#x} = {value:#x}")


def _msr_restore_order(msrs: dict[int, int]) -> dict[int, int]:
    ordered = {i: v for i, v in msrs.items() if i not in _MSRS_LAST}
    ordered.update((i, msrs[i]) for i in _MSRS_LAST if i in msrs)
    return ordered


def _restore_tsc_khz(vcpu: kvm.Vcpu, khz: int | None) -> None:
    """KVM_SET_TSC_KHZ only when the saved rate is not this vCPU's rate already:
    without TSC scaling (KVM_CAP_TSC_CONTROL 0) KVM accepts only a rate within its
    tolerance of the host's, or a higher one that it then emulates by catch-up."""
    if khz is None or vcpu.vm.check_extension(kvm.KVM_CAP_GET_TSC_KHZ) <= 0:
        return
    here = vcpu.get_tsc_khz()
    if here == khz:
        return
    log.info("vcpu%d: TSC %d kHz in the snapshot, %d kHz here: setting it", vcpu.index, khz, here)
    try:
        vcpu.set_tsc_khz(khz)
    except kvm.KvmError as e:
        raise kvm.KvmError(e.errno, f"vcpu{vcpu.index}: KVM_SET_TSC_KHZ {khz} refused ({e.strerror}): "
                                    f"this host's TSC runs at {here} kHz and KVM cannot scale "
                                    "it down (KVM_CAP_TSC_CONTROL)") from None


# --- VM: save, restore ------------------------------------------------------------------
def save_vm(vm: kvm.Vm) -> VmState:
    """The in-kernel PICs, IOAPIC, PIT (if any) and kvmclock of a paused VM."""
    pit2 = None
    try:
        pit2 = vm.get_pit2()
    except kvm.KvmError as e:
        if e.errno != errno.ENXIO:     # ENXIO: no in-kernel PIT was created
            raise
    return VmState(
        pic_master=kvm.kvm_pic_state.from_buffer_copy(vm.get_irqchip(kvm.KVM_IRQCHIP_PIC_MASTER).chip.pic),
        pic_slave=kvm.kvm_pic_state.from_buffer_copy(vm.get_irqchip(kvm.KVM_IRQCHIP_PIC_SLAVE).chip.pic),
        ioapic=kvm.kvm_ioapic_state.from_buffer_copy(vm.get_irqchip(kvm.KVM_IRQCHIP_IOAPIC).chip.ioapic),
        pit2=pit2,
        clock=vm.get_clock())


def restore_vm(vm: kvm.Vm, state: VmState) -> None:
    """Load ``state`` into a new VM, after ``restore_vcpu`` of every vCPU and just
    before they run.

    The irqchips and the PIT first; KVM_SET_PIT2 reloads each channel's count from
    now (the time already elapsed in the current period is not kept).  KVM_SET_CLOCK
    last, with no flags: kvmclock goes on from the saved value at that instant,
    so the guest sees no time pass while it was saved (KVM_CLOCK_REALTIME would
    add the wall-clock time since the save instead), and the time the restore
    itself takes is not counted either.  KVM refreshes every vCPU's pvclock page
    before it next runs, whichever of this and the kvmclock MSRs came first.
    On PVM the guest TSC is the host's whatever restore_vcpu wrote, so the TSC
    jumps where kvmclock does not (see the module note).
    """
    for chip_id, pic in ((kvm.KVM_IRQCHIP_PIC_MASTER, state.pic_master),
                         (kvm.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave)):
        chip = kvm.kvm_irqchip(chip_id=chip_id)
        chip.chip.pic = pic
        vm.set_irqchip(chip)
    chip = kvm.kvm_irqchip(chip_id=kvm.KVM_IRQCHIP_IOAPIC)
    chip.chip.ioapic = state.ioapic
    vm.set_irqchip(chip)
    if state.pit2 is not None:
        vm.set_pit2(state.pit2)
    vm.set_clock(kvm.kvm_clock_data(clock=state.clock.clock))


# --- which MSRs to save ---------------------------------------------------------------------
def msr_indices(kvm_dev: kvm.Kvm, cpuid: list[kvm.kvm_cpuid_entry2] | None = None) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that a vCPU with ``cpuid`` can read and
    have written back, probed one by one on a scratch VM.

    ``cpuid`` defaults to what pyvmm gives its vCPUs (``boot.cpu.filter_cpuid``):
    whether KVM accepts an MSR can depend on the guest's CPUID.

    Dropped on this host: none.  On the PVM host measured (kvm_pvm, Linux 6.18,
    AMD EPYC) KVM lists 40 MSRs (SYSENTER/SYSCALL MSRs, TSC, PAT, the kvmclock
    and other KVM PV MSRs 0x4b564d00-07, TSC_ADJUST, TSC_DEADLINE, MISC_ENABLE,
    MCG, ARCH_CAPABILITIES, PERF_CAPABILITIES, a few AMD MSRs...) and every one
    reads and writes back, with pyvmm's CPUID, with KVM's whole supported CPUID,
    and with no CPUID set, on a fresh vCPU and on one that has run.  The probe
    stays because that is not true of every host (MSRs of a PMU or of a feature
    the guest's CPUID lacks can be listed and still refused).
    """
    if cpuid is None:
        from ..boot.cpu import filter_cpuid

        cpuid = filter_cpuid(kvm_dev.supported_cpuid(), 0, 1)
    listed = kvm_dev.msr_index_list()
    vm = kvm_dev.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid2(cpuid)
            kept = [index for index in listed if _msr_round_trips(vcpu, index)]
        finally:
            vcpu.close()
    finally:
        vm.close()
    dropped = [hex(i) for i in listed if i not in kept]
    if dropped:
        log.info("MSRs listed by KVM but not readable and writable here: %s", ", ".join(dropped))
    return kept


def _msr_round_trips(vcpu: kvm.Vcpu, index: int) -> bool:
    try:
        got = vcpu.get_msrs([index])
        return len(got) == 1 and vcpu.set_msrs(got) == 1
    except kvm.KvmError:
        return False


# --- JSON: ctypes structures <-> dicts -----------------------------------------------------
# Padding and reserved fields are left out (zero on the way back).  Integers are hex
# strings ("0x1f80"), byte arrays are hex blobs ("801f0000..."), arrays of anything
# else are lists, nested structures are dicts.  A union of one member (an IOAPIC
# redirection entry) stands for that member.
_SKIPPED_FIELDS = frozenset({"pad", "pad0", "pad1", "pad2", "padding", "padding1", "reserved"})
_BYTE_TYPES = (ctypes.c_uint8, ctypes.c_char)


def _fields(cls: type) -> list[tuple[str, type]]:
    return [(name, ftype) for name, ftype, *_ in cls._fields_ if name not in _SKIPPED_FIELDS]


def _is_compound(ftype: type) -> bool:
    return isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union))


def _single_member_union(ftype: type) -> bool:
    return issubclass(ftype, ctypes.Union) and len(ftype._fields_) == 1


def struct_to_json(obj: ctypes.Structure | ctypes.Union) -> Any:
    """A ctypes structure as a JSON-able dict (see the rules above)."""
    cls = type(obj)
    if _single_member_union(cls):
        name, ftype = cls._fields_[0][:2]
        return _value_to_json(getattr(obj, name), ftype)
    return {name: _value_to_json(getattr(obj, name), ftype) for name, ftype in _fields(cls)}


def _value_to_json(value: Any, ftype: type) -> Any:
    if _is_compound(ftype):
        return struct_to_json(value)
    if issubclass(ftype, ctypes.Array):
        if ftype._type_ in _BYTE_TYPES:
            return bytes(value).hex()
        return [_value_to_json(value[i], ftype._type_) for i in range(ftype._length_)]
    return hex(value)


def struct_from_json(cls: type, data: object, path: str) -> Any:
    """``cls`` built from ``struct_to_json``'s output; ValueError naming ``path``."""
    obj = cls()
    if _single_member_union(cls):
        name, ftype = cls._fields_[0][:2]
        setattr(obj, name, _value_from_json(ftype, data, path))
        return obj
    fields = _fields(cls)
    expect_keys(data, [name for name, _ in fields], path)
    for name, ftype in fields:
        setattr(obj, name, _value_from_json(ftype, data[name], f"{path}.{name}"))
    return obj


def _value_from_json(ftype: type, value: object, path: str) -> Any:
    if _is_compound(ftype):
        return struct_from_json(ftype, value, path)
    if issubclass(ftype, ctypes.Array):
        if ftype._type_ in _BYTE_TYPES:
            return ftype.from_buffer_copy(blob(value, path, ftype._length_))
        if not isinstance(value, list) or len(value) != ftype._length_:
            raise ValueError(f"{path}: expected a list of {ftype._length_} items, "
                             f"got {describe(value)}")
        return ftype(*(_value_from_json(ftype._type_, v, f"{path}[{i}]") for i, v in enumerate(value)))
    return hex_int(value, path, ctypes.sizeof(ftype), ftype(-1).value < 0)


def _expect_version(value: object, path: str) -> None:
    if value != STATE_VERSION or isinstance(value, bool):
        raise ValueError(f"{path}.version: expected {STATE_VERSION}, got {describe(value)}")


def _positive_int(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < (1 << 32):
        raise ValueError(f"{path}: expected a positive 32-bit integer or null, got {describe(value)}")
    return value


def _xsave_from_json(value: object, path: str) -> bytes:
    expect_keys(value, ("bytes", "area"), path)
    size = value["bytes"]
    if (not isinstance(size, int) or isinstance(size, bool) or size % 4
            or not kvm.XSAVE_LEGACY_SIZE <= size <= MAX_XSAVE_SIZE):
        raise ValueError(f"{path}.bytes: expected a multiple of 4 from {kvm.XSAVE_LEGACY_SIZE} "
                         f"to {MAX_XSAVE_SIZE}, got {describe(size)}")
    return blob(value["area"], f"{path}.area", size)


def _xcrs_from_json(value: object, path: str) -> dict[int, int]:
    if not isinstance(value, dict) or len(value) > kvm.KVM_MAX_XCRS:
        raise ValueError(f"{path}: expected an object of at most {kvm.KVM_MAX_XCRS} XCRs, "
                         f"got {describe(value)}")
    return {hex_int(n, f"{path} key {n!r}", 4): hex_int(v, f"{path}[{n!r}]", 8)
            for n, v in value.items()}


def _msrs_from_json(value: object, path: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected an object of MSR index -> value, got {describe(value)}")
    return {hex_int(i, f"{path} key {i!r}", 4): hex_int(v, f"{path}[{i!r}]", 8)
            for i, v in value.items()}


def _mp_state_from_json(value: object, path: str) -> int:
    by_name = {name: n for n, name in MP_STATE_NAMES.items()}
    if isinstance(value, str) and value in by_name:
        return by_name[value]
    if isinstance(value, str) and HEX_RE.match(value):
        return hex_int(value, path, 4)
    raise ValueError(f"{path}: expected one of {', '.join(by_name)} or a hex number, "
                     f"got {describe(value)}")


def _cpuid_from_json(value: object, path: str) -> list[kvm.kvm_cpuid_entry2]:
    if not isinstance(value, list) or len(value) > MAX_CPUID_ENTRIES:
        raise ValueError(f"{path}: expected a list of at most {MAX_CPUID_ENTRIES} entries, "
                         f"got {describe(value)}")
    return [struct_from_json(kvm.kvm_cpuid_entry2, e, f"{path}[{i}]") for i, e in enumerate(value)]
