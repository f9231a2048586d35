"""Snapshot and restore of a whole ``Machine``: the order of things.

Taking a snapshot (``take``), at the guest's snapshot point:

1. every vCPU thread parks out of KVM_RUN, its pending I/O completed
   (``VcpuThread.request_pause``; kvm_state.complete_pending_io);
2. every virtio device is quiesced: its worker stops, a vhost-user back-end's
   rings are stopped and their bases read back (GET_VRING_BASE);
3. the state is collected: KVM (``save_vm``, ``save_vcpu`` for each vCPU),
   each device's ``save_state()``, the machine's shape (what the guest
   enumerated: memory, vCPUs, disks, virtio-fs devices, rng, consoles), the
   host (KVM flavour, CPU);
4. ``image.write``: RAM and state into a temporary sibling directory, renamed
   to its name at the end.

Restoring (``restore``) into a ``Machine`` built from ``config_for`` (same
shape, new host side: back-ends, consoles): every part of the state is parsed
and checked first, so a bad snapshot is refused before anything is changed;
then the legacy devices, the PCI configuration (BAR mappings, ioeventfds and
the DAX window's memory slot follow), the virtio devices (MSI-X routes,
queues, re-activation with the new back-ends' rings at their saved bases),
the vCPUs (kvm_state's order), and the VM-wide KVM state last: the in-kernel
PICs, IOAPIC, PIT and kvmclock, right before the vCPUs run again.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import TYPE_CHECKING, Any

from .. import __version__
from . import image
from ..boot.layout import CMDLINE_MAX
from ..devices.virtio.fs import VIRTIO_FS_TAG_LEN
from .fields import boolean, expect_keys, integer, items, text
from .image import SnapshotError
from .kvm_state import (MAX_CPUID_ENTRIES, VcpuState, VmState, msr_indices, restore_vcpu, restore_vm,
                        save_vcpu, save_vm)

if TYPE_CHECKING:
    from ..platform import Flavour
    from ..vm import Machine, MachineConfig

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 10.0     # seconds for every vCPU to park
MAX_CPUS = 64
MAX_MEMORY = 1 << 48     # bytes: bounds for untrusted sizes, far above any real machine
MAX_DEVICES = 32         # disks or virtio-fs devices: one PCI bus has 32 slots
PATH_MAX = 4096
SHAPE_KEYS = ("memory", "cpus", "cmdline", "disks", "fs", "rng", "console", "agent")
LEGACY_DEVICES = ("serial", "rtc", "i8042")   # the PCI functions (pvpanic too) are in "pci"
# CPUID feature words a guest may have been told about: (leaf, subleaf, register).
FEATURE_WORDS = ((0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "ebx"), (0x7, 0, "ecx"),
                 (0x7, 0, "edx"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))


# --- the machine as data ---------------------------------------------------------------
def machine_shape(config: "MachineConfig") -> dict[str, Any]:
    """What the guest enumerated: it must be the same after a restore."""
    return {
        "memory": config.memory,
        "cpus": config.cpus,
        "cmdline": config.cmdline,
        "disks": [{"path": d.path, "readonly": d.readonly} for d in config.disks],
        "fs": [{"tag": f.tag, "num_queues": f.num_queues, "queue_size": f.queue_size,
                "dax": f.dax, "cache_size": f.cache_size} for f in config.shares],
        "rng": config.rng,
        "console": config.console is not None,
        "agent": config.agent_words is not None,
    }


def host_facts(flavour: "Flavour") -> dict[str, str]:
    return {"flavour": flavour.name, "kvm_module": flavour.module, "cpu": _cpu_model(),
            "machine": platform.machine()}


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --- taking one -----------------------------------------------------------------------------
def take(machine: "Machine", path: str) -> None:
    """Write ``machine`` to ``path`` at a moment when its guest is at the snapshot
    point (see the module docstring).  The vCPUs stay parked and the devices
    quiesced: the caller ends the VM or resumes them."""
    for t in machine.vcpus:
        t.request_pause()
    for t in machine.vcpus:
        if not t.paused.wait(PAUSE_TIMEOUT):
            raise SnapshotError(f"vcpu{t.vcpu.index} did not pause within {PAUSE_TIMEOUT:.0f} s")
    # Before the LAPICs, MSI-X and RAM are read: no device may complete a request
    # (and interrupt or write RAM) after that.
    machine.serial.quiesce()
    machine.pci.quiesce()
    indices = msr_indices(machine.kvm)
    state = {
        "format": image.FORMAT,
        "version": image.FORMAT_VERSION,
        "pyvmm_version": __version__,
        "created": image.now_iso(),
        "host": host_facts(machine.flavour),
        "machine": machine_shape(machine.config),
        "kvm": {"vm": save_vm(machine.vm).to_json(),
                "vcpus": [save_vcpu(t.vcpu, indices).to_json() for t in machine.vcpus]},
        "devices": {**{name: getattr(machine, name).save_state() for name in LEGACY_DEVICES},
                    "pci": machine.pci.save_state()},
    }
    ram = machine.memory.view_all()
    try:
        image.write(path, state, ram)
    finally:
        ram.release()


# --- restoring ---------------------------------------------------------------------------
def machine_config(snap: image.Snapshot, shares: list, fs_sockets: dict[str, str]) -> "MachineConfig":
    """The MachineConfig of ``snap``'s machine, with this run's host side: each saved
    virtio-fs device gets the back-end of the ``--share`` (a ShareConfig) or the
    ``--fs`` socket with its tag.  ValueError (one line) when they do not fit."""
    from ..vm import DiskConfig, FsConfig, MachineConfig

    m = expect_keys(snap.machine, SHAPE_KEYS, "machine")
    memory = integer(m["memory"], "machine.memory", 1, MAX_MEMORY)
    cpus = integer(m["cpus"], "machine.cpus", 1, MAX_CPUS)
    cmdline = text(m["cmdline"], "machine.cmdline", CMDLINE_MAX)
    rng, console = boolean(m["rng"], "machine.rng"), boolean(m["console"], "machine.console")
    if not boolean(m["agent"], "machine.agent"):
        raise SnapshotError(f"{snap.path}: the guest had no agent, so it cannot be resumed")
    disks = []
    for i, d in enumerate(items(m["disks"], "machine.disks", MAX_DEVICES)):
        where = f"machine.disks[{i}]"
        expect_keys(d, ("path", "readonly"), where)
        path = text(d["path"], f"{where}.path", PATH_MAX)
        if not os.path.isfile(path):
            raise SnapshotError(f"the snapshot's disk {path} does not exist")
        disks.append(DiskConfig(path, boolean(d["readonly"], f"{where}.readonly")))
    by_tag = {s.tag: s for s in shares}
    saved_tags = []
    devices = []
    for i, f in enumerate(items(m["fs"], "machine.fs", MAX_DEVICES)):
        where = f"machine.fs[{i}]"
        expect_keys(f, ("tag", "num_queues", "queue_size", "dax", "cache_size"), where)
        tag = text(f["tag"], f"{where}.tag", VIRTIO_FS_TAG_LEN)
        dax = boolean(f["dax"], f"{where}.dax")
        saved_tags.append(tag)
        share = by_tag.get(tag)
        if share is not None and tag in fs_sockets:
            raise ValueError(f"virtio-fs {tag}: give --share or --fs, not both")
        if share is None and tag not in fs_sockets:
            raise ValueError(f"the snapshot has a virtio-fs device {tag!r}: give it a back-end with "
                             f"--share DIR,tag={tag} or --fs tag={tag},socket=PATH")
        if share is not None and share.dax and not dax:
            raise ValueError(f"virtio-fs {tag}: dax=on, but the snapshot's device has no DAX window")
        devices.append(FsConfig(tag, fs_sockets.get(tag, ""),
                                integer(f["num_queues"], f"{where}.num_queues", 1, 64),
                                integer(f["queue_size"], f"{where}.queue_size", 1, 32768), dax,
                                integer(f["cache_size"], f"{where}.cache_size", 1, MAX_MEMORY)))
    extra = sorted((set(by_tag) | set(fs_sockets)) - set(saved_tags))
    if extra:
        raise ValueError(f"the snapshot has no virtio-fs device {', '.join(map(repr, extra))} "
                         f"(it has {', '.join(map(repr, saved_tags)) or 'none'}): devices are fixed "
                         "when the snapshot is taken")
    return MachineConfig(kernel=b"", cmdline=cmdline, memory=memory, cpus=cpus,
                         disks=disks, rng=rng, console="null" if console else None,
                         shares=devices, agent_words=" ".join(s.guest_word() for s in shares))


# Bits the guest itself turns on (CR4.OSXSAVE, CR4.PKE): not host features.
DYNAMIC_BITS = {(0x1, 0, "ecx"): 1 << 27, (0x7, 0, "ecx"): 1 << 4}


def check_host(snap: image.Snapshot, flavour: "Flavour") -> None:
    """Refuse a snapshot from another kind of host (SnapshotError, one line): another
    KVM flavour or architecture.  (CPU features are checked by ``restore`` against
    what this host's vCPUs really get.)"""
    host = snap.state["host"]
    if not isinstance(host, dict) or host.get("flavour") != flavour.name:
        raise SnapshotError(f"{snap.path} was taken on a {_get(host, 'flavour')} KVM host; "
                            f"this host's KVM is {flavour.name}")
    if host.get("machine") != platform.machine():
        raise SnapshotError(f"{snap.path} was taken on {_get(host, 'machine')}, this is {platform.machine()}")


def check_cpu_features(machine: "Machine", saved: list[VcpuState], snap: image.Snapshot) -> None:
    """Refuse vCPUs that were told of CPU features this host's vCPUs would not have.

    What a vCPU gets is read back from KVM (KVM_SET_CPUID2 with pyvmm's usual
    table, then KVM_GET_CPUID2): on PVM hosts KVM gives the guest the host's
    feature bits whatever KVM_GET_SUPPORTED_CPUID says, so only the vCPU itself
    tells the truth."""
    from ..boot.cpu import filter_cpuid

    supported = machine.kvm.supported_cpuid()
    for index, (t, state) in enumerate(zip(machine.vcpus, saved)):
        t.vcpu.set_cpuid2(filter_cpuid(supported, index, len(machine.vcpus)))
        here = {(e.function, e.index): e for e in t.vcpu.get_cpuid2(MAX_CPUID_ENTRIES)}
        for entry in state.cpuid:
            missing = _missing_features(entry, here)
            if missing:
                raise SnapshotError(f"{snap.path} needs CPU features this host does not offer "
                                    f"({missing}; taken on {_get(snap.state['host'], 'cpu')})")


def _get(d: object, key: str) -> str:
    return str(d.get(key, "?")) if isinstance(d, dict) else "?"


def _missing_features(entry: Any, here: dict) -> str:
    """Feature bits a saved CPUID entry sets that this host's vCPU would not have."""
    leaf, sub = entry.function, entry.index
    for word in FEATURE_WORDS:
        word_leaf, word_sub, reg = word
        if (leaf, sub) != (word_leaf, word_sub):
            continue
        saved = getattr(entry, reg)
        ours = here.get((leaf, sub))
        extra = saved & ~(getattr(ours, reg) if ours is not None else 0) & ~DYNAMIC_BITS.get(word, 0)
        if extra:
            return f"CPUID {leaf:#x}.{sub} {reg} bits {extra:#x}"
    return ""


def resume_devices(machine: "Machine") -> None:
    """After ``take`` with --snapshot-and-continue: the devices go on."""
    machine.serial.resume()
    machine.pci.resume()


def restore(machine: "Machine", snap: image.Snapshot) -> None:
    """Put a freshly built ``machine`` (see ``machine_config``) back into ``snap``'s state.

    Order: the vCPUs (their LAPICs) before any device can interrupt them; the
    legacy devices and the PCI functions (each checks all its state before it
    loads any) with the virtio devices left paused; then the devices resume
    (a resumed device may interrupt at once: the LAPICs are back); the VM-wide
    state (PICs, IOAPIC, PIT, kvmclock) last, just before the vCPUs run."""
    state = snap.state
    devices = state["devices"]
    kvm_saved = state["kvm"]
    if not isinstance(kvm_saved, dict) or not isinstance(devices, dict):
        raise SnapshotError(f"{snap.path}: no kvm or devices state")
    vm_state = VmState.from_json(kvm_saved.get("vm"))
    vcpus = kvm_saved.get("vcpus")
    if not isinstance(vcpus, list) or len(vcpus) != len(machine.vcpus):
        raise SnapshotError(f"{snap.path}: {len(vcpus) if isinstance(vcpus, list) else '?'} saved "
                            f"vCPUs for a machine of {len(machine.vcpus)}")
    vcpu_states = [VcpuState.from_json(v) for v in vcpus]
    check_cpu_features(machine, vcpu_states, snap)
    for t, vs in zip(machine.vcpus, vcpu_states):
        restore_vcpu(t.vcpu, vs)
    for name in LEGACY_DEVICES:
        getattr(machine, name).restore_state(devices.get(name), path=f"devices.{name}")
    machine.pci.restore_state(devices.get("pci"), path="devices.pci")
    machine.pci.resume()
    restore_vm(machine.vm, vm_state)   # kvmclock last, just before the vCPUs run
