"""A virtual machine: KVM VM, guest RAM, buses, devices, vCPUs and lifecycle.

``Machine`` wires the pieces together in the order a reader can follow:

1. open /dev/kvm, check the API and capabilities, create the VM;
2. the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT;
3. guest RAM (a memfd) and one KVM memory slot per RAM range;
4. the port-I/O and MMIO buses and the legacy devices on them (UART, i8042,
   RTC, the debug-exit port and the snapshot point);
5. the GSI router, the PCI root with its host bridge, the virtio-pci devices
   (the guest agent's console among them) and pvpanic-pci;
6. the kernel, initramfs, command line and MP table in guest RAM;
7. the vCPUs: CPUID, MSRs, FPU, LAPIC, and the boot CPU's entry registers;
8. ``run``: one thread per vCPU until the guest or the user ends it (or, at the
   guest's snapshot point with --snapshot, ``pyvmm.snapshot.machine.take``).

Built from a snapshot (``restore_from``), steps 6-7 are replaced by
``pyvmm.snapshot.machine.restore``: RAM comes from the snapshot's file and every
vCPU, device and in-kernel chip gets its saved state.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import kvm
from .agent import AgentPort
from .boot import cpu, layout
from .boot.mptable import write_mptable
from .boot.pirq import write_pirq_table
from .bus import Bus
from .console import Console, SocketPort
from .devices.debug_exit import DebugExit
from .devices.i8042 import I8042
from .devices.pvpanic import PVPANIC_CRASH_LOADED, PvPanic
from .devices.rtc import CmosRtc
from .devices.serial import Serial16550A
from .devices.snapshot_point import SnapshotPoint
from .devices.virtio.console import VirtioConsole
from .devices.virtio.dax_window import DaxWindows
from .devices.virtio.fs import VirtioFs
from .devices.virtio.pci import VirtioPciDevice
from .devices.virtio.rng import VirtioRng
from .heap import trim_heap
from .irq import GsiRouter
from .memory import GuestMemory, MemorySlots
from .pci.root import (HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR, PCI_CONFIG_ADDRESS,
                       PCI_CONFIG_IO_LEN, PciRoot)
from .platform import Flavour
from .status import ExitStatus
from .trace import (RunCounters, TraceOutput, TraceSpec, VcpuWatch, format_stats,
                    seconds_since_process_start)
from .vcpu import KICK_SIGNAL, VcpuThread, format_regs, install_kick_handler

if TYPE_CHECKING:
    from .boot.loader import BootEntry
    from .profile import GuestSampler
    from .snapshot.image import Snapshot

log = logging.getLogger(__name__)

COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
RTC_PORT = 0x70


@dataclass(frozen=True)
class DiskConfig:
    path: str
    readonly: bool = False


@dataclass(frozen=True)
class FsConfig:
    tag: str
    socket: str
    num_queues: int = 1
    queue_size: int = 1024
    dax: bool = False
    cache_size: int = 1 << 30


@dataclass
class MachineConfig:
    kernel: bytes
    cmdline: str
    memory: int
    cpus: int = 1
    initramfs: bytes | None = None
    serial: str = "stdio"
    disks: list[DiskConfig] = field(default_factory=list)
    rng: bool = False
    console: str | None = None   # virtio-console host side: socket=PATH, file=PATH or null
    shares: list[FsConfig] = field(default_factory=list)
    # Run mode: the guest was asked to run a program (--exec, pyvmm.run=), so it
    # must not end before that program's status arrives.
    run_mode: bool = False
    # The guest agent (pyvmm.agent): its console's CONFIG words, and a socket for a client.
    agent_words: str | None = None
    agent_socket: str | None = None
    # --snapshot DIR: at the guest's snapshot point, write the machine to DIR, then
    # stop (or go on with snapshot_continue).
    snapshot_path: str | None = None
    snapshot_continue: bool = False
    # Watching the VMM work (pyvmm.trace): --trace exits[=FILE][,FILTER]... (the caller
    # opens its output: Machine's ``trace``) and --stats.
    trace: TraceSpec | None = None
    stats: bool = False
    # --profile[=FILE] (pyvmm.profile): sample each vCPU's RIP; report to FILE ("-": stderr),
    # naming kernel functions from profile_symbols (the kernel file; None: raw addresses).
    profile: str | None = None
    profile_symbols: str | None = None


def pci_windows(ram_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The 32-bit BAR window in the MMIO hole and the 64-bit one above RAM."""
    ram_top = layout.MMIO_HOLE_END + max(0, ram_size - layout.MMIO_HOLE_START)
    start64 = (ram_top + layout.GiB - 1) & ~(layout.GiB - 1)
    return ((layout.PCI_MMIO32_START, layout.PCI_MMIO32_END),
            (start64, start64 + layout.PCI_MMIO64_SIZE))


class Machine:
    """``restore_from``: build the machine a snapshot describes (``config`` must come
    from it, see pyvmm.snapshot.machine) and put it back where it was, instead of
    loading a kernel."""

    def __init__(self, config: MachineConfig, flavour: Flavour, console: Console,
                 restore_from: "Snapshot | None" = None, trace: TraceOutput | None = None) -> None:
        self.config = config
        self.flavour = flavour
        self.console = console
        self.t_start = time.monotonic()
        self.t_first_run: float | None = None
        self.t_end: float | None = None
        self.age_at_first_run: float | None = None   # process start -> first KVM_RUN
        # Exits are counted for --stats and an info log, and traced to ``trace`` (--trace, the
        # caller opens and closes it); else the vCPU threads run the plain loop.
        self.trace = trace
        self.watching = config.stats or trace is not None or log.isEnabledFor(logging.INFO)
        self.stopping = threading.Event()
        self.exit_status: int | None = None
        self.exit_reason = ""
        self.exit_from_program = False
        self._exit_lock = threading.Lock()
        self._wake = threading.Event()                 # the run loop has work
        self._snapshot_requested = threading.Event()
        self.snapshot_seconds: float | None = None
        self.sampler: "GuestSampler | None" = None     # --profile

        self.kvm = kvm.Kvm()
        self.kvm.require(kvm.REQUIRED_CAPS)
        self.vm = self.kvm.create_vm()
        if self.vm.check_extension(kvm.KVM_CAP_EXIT_ON_EMULATION_FAILURE) > 0:
            # Instruction bytes come with every emulation failure: needed for the fix-ups.
            self.vm.enable_cap(kvm.KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2(kvm.KVM_PIT_SPEAKER_DUMMY)

        if restore_from is None:
            self.memory = GuestMemory(config.memory)
        else:   # a vhost-user back-end maps guest RAM too: then it must be a shared memfd
            self.memory = GuestMemory.from_snapshot(restore_from.memory_path, config.memory,
                                                    shared=bool(config.shares))
        self.slots = MemorySlots(self.vm, self.kvm.check_extension(kvm.KVM_CAP_NR_MEMSLOTS))
        for r in self.memory.ranges:
            self.slots.add(r.gpa, r.size, self.memory.host_addr + r.offset)

        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._add_legacy_devices()
        self.router = GsiRouter(self.vm)
        self.pci = PciRoot(self.mmio, *pci_windows(config.memory))
        self.pio.register(PCI_CONFIG_ADDRESS, PCI_CONFIG_IO_LEN, self.pci, "pci-config")
        self.console_port = None
        self.agent: AgentPort | None = None
        self._add_virtio_devices()
        self.pvpanic = PvPanic(self._guest_panicked)
        self.pci.add(self.pvpanic)

        if restore_from is None:
            from .boot.loader import load_kernel   # (not needed for a restore)

            entry = load_kernel(self.memory, config.kernel, config.cmdline.encode(),
                                config.initramfs, config.memory)
            # The images are in guest RAM now: holding their bytes for the VM's
            # lifetime would cost the VMM ~20 MiB of anonymous memory (vmlinux alone
            # is 17 MB).  The caller's config loses them too: nothing reads them again.
            config.kernel, config.initramfs = b"", None
            write_mptable(self.memory, config.cpus)
            write_pirq_table(self.memory, HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE)
            self.vcpus = self._create_vcpus(entry)
        else:
            from .snapshot.image import SnapshotError
            from .snapshot.machine import restore

            self.vcpus = self._create_vcpus(None)
            try:
                restore(self, restore_from)
            except (OSError, RuntimeError) as e:   # KVM or a back-end refused the saved state
                self.close()
                raise SnapshotError(f"{restore_from.path}: cannot be restored here: {e}") from None
            except BaseException:
                self.close()
                raise

    # --- construction ------------------------------------------------------------
    def _add_legacy_devices(self) -> None:
        # The UART's two callbacks: the bytes the guest transmits go to the console
        # (stdout, a file or nowhere), and its interrupt line to KVM_IRQ_LINE (_serial_irq).
        # Host input comes the other way, Console -> Serial16550A.receive (see run()).
        self.serial = Serial16550A(self.console.write, self._serial_irq)
        self.pio.register(COM1_PORT, 8, self.serial, "serial")
        self.i8042 = I8042(reset=lambda: self.guest_ended("guest reset (i8042)"))
        self.pio.register(I8042_DATA_PORT, 1, self.i8042.data_port, "i8042")
        self.pio.register(I8042_COMMAND_PORT, 1, self.i8042.command_port, "i8042")
        self.rtc = CmosRtc()
        low = min(self.config.memory, layout.MMIO_HOLE_START)
        self.rtc.set_memory_size(low, self.config.memory - low)
        self.pio.register(RTC_PORT, 2, self.rtc, "rtc")
        self.debug_exit = DebugExit(on_exit=self.program_exited)
        self.pio.register(layout.DEBUG_EXIT_PORT, 1, self.debug_exit, "debug-exit")
        self.snapshot_point = SnapshotPoint(self._snapshot_point_reached)
        self.pio.register(layout.SNAPSHOT_PORT, 1, self.snapshot_point, "snapshot-point")

    def _add_virtio_devices(self) -> None:
        def plug(device) -> None:
            self.pci.add(VirtioPciDevice(device, self.memory, self.vm, self.router))

        if self.config.disks:
            from .devices.virtio.blk import VirtioBlock   # (and hashlib, OpenSSL: only with --disk)
            for disk in self.config.disks:
                plug(VirtioBlock(disk.path, readonly=disk.readonly))
        windows = DaxWindows()   # every device's FS_IO may reach every DAX window
        for share in self.config.shares:
            plug(VirtioFs(share.tag, share.socket, share.num_queues, share.queue_size,
                          dax_window=share.cache_size if share.dax else None, slots=self.slots,
                          windows=windows))
        if self.config.rng:
            plug(VirtioRng())
        if self.config.agent_words is not None:
            # Before the user's console, so that the guest calls it hvc0 (pyvmm.agent=hvc0).
            self.agent = AgentPort(self.config.agent_words, self.config.agent_socket)
            device = VirtioConsole(self.agent.from_guest)
            self.agent.attach(device.receive)
            plug(device)
        if self.config.console is not None:
            spec = self.config.console
            if spec.startswith("socket="):
                self.console_port = SocketPort(spec[len("socket="):])
                device = VirtioConsole(self.console_port.write)
                self.console_port.start(device.receive)
            else:
                sink = Console(spec)  # file=PATH or null
                device = VirtioConsole(sink.write)
            plug(device)

    def _serial_irq(self, level: bool) -> None:
        self.vm.irq_line(COM1_IRQ, level)

    def _create_vcpus(self, entry: BootEntry | None) -> list[VcpuThread]:
        """The vCPUs, set up for ``entry`` (None: their state comes from a snapshot)."""
        supported = self.kvm.supported_cpuid()
        threads = []
        for index in range(self.config.cpus):
            vcpu = self.vm.create_vcpu(index)
            if entry is not None:
                cpu.configure_vcpu(vcpu, cpu.filter_cpuid(supported, index, self.config.cpus))
            if index == 0 and entry is not None:
                cpu.set_boot_regs(vcpu, self.memory, entry.mode, entry.rip, rbx=entry.rbx, rsi=entry.rsi)
            watch = VcpuWatch(vcpu, self.pio, self.mmio, self.trace) if self.watching else None
            threads.append(VcpuThread(vcpu, self.pio, self.mmio, self.request_exit, self.stopping,
                                      on_guest_end=self.guest_ended, watch=watch))
        return threads

    # --- snapshots ------------------------------------------------------------------
    def _snapshot_point_reached(self) -> None:
        """The guest wrote the snapshot port (vCPU thread): pause every vCPU; the run
        loop writes the snapshot once they are all parked."""
        if self.config.snapshot_path is None:
            log.info("the guest passed its snapshot point (no --snapshot: going on)")
            return
        if self._snapshot_requested.is_set() or self.snapshot_seconds is not None:
            return   # one snapshot per run
        for t in self.vcpus:
            t.request_pause()
        self._snapshot_requested.set()
        self._wake.set()

    def _take_snapshot(self) -> None:
        from .snapshot.machine import resume_devices, take

        t0 = time.monotonic()
        path = self.config.snapshot_path
        try:
            take(self, path)
        except Exception as e:
            log.debug("snapshot failed", exc_info=True)
            self.request_exit(ExitStatus.VMM_ERROR, f"snapshot to {path} failed: {e}")
            return
        self.snapshot_seconds = time.monotonic() - t0
        log.info("snapshot written to %s in %.3f s", path, self.snapshot_seconds)
        if not self.config.snapshot_continue:
            self.request_exit(ExitStatus.OK, f"snapshot written to {path}")
            return
        resume_devices(self)
        for t in self.vcpus:
            t.resume()

    # --- lifecycle ------------------------------------------------------------------
    def program_exited(self, status: int) -> None:
        """The guest program's status arrived (debug-exit port, or the agent for --exec)."""
        self.request_exit(status, f"guest program exit status {status}", from_program=True)

    def guest_ended(self, how: str) -> None:
        """The guest powered off, reset or halted by itself: 0, unless it still owed
        the status of the program it was asked to run."""
        if self.config.run_mode:
            self.request_exit(ExitStatus.GUEST_DIED, f"{how} before the guest program's exit "
                              "status arrived")
        else:
            self.request_exit(ExitStatus.OK, how)

    def _guest_panicked(self, event: int) -> None:
        kdump = " (a crash kernel is loaded)" if event & PVPANIC_CRASH_LOADED else ""
        self.request_exit(ExitStatus.GUEST_PANIC, f"guest kernel panic{kdump}")

    def request_exit(self, status: int, reason: str, from_program: bool = False) -> None:
        """End the VM with ``status`` (the first request wins); callable from any thread.

        ``from_program``: the status is the guest program's own (run mode), not
        a verdict of pyvmm's on how the guest ended."""
        with self._exit_lock:
            if self.exit_status is not None:
                return
            self.exit_status = status
            self.exit_reason = reason
            self.exit_from_program = from_program
            self.stopping.set()
            self._wake.set()
        (log.error if status and "\n" in reason else log.info)("stopping: %s", reason)
        current = threading.current_thread()
        for t in self.vcpus:
            if t.thread is not current:
                t.kick()

    def dump_registers(self) -> None:
        """Ask every vCPU thread to log its registers (they own their fds)."""
        for t in self.vcpus:
            t.request_dump()

    def _install_signals(self) -> dict:
        """SIGINT/SIGTERM end the VM, SIGUSR2 dumps registers: main thread only.
        KICK_SIGNAL must have a handler (its default kills the process)."""
        if threading.current_thread() is not threading.main_thread():
            if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
                raise RuntimeError("Machine.run() outside the main thread needs a handler for "
                                   f"{KICK_SIGNAL.name}: call pyvmm.vcpu.install_kick_handler() "
                                   "from the main thread first")
            return {}
        install_kick_handler()   # EINTR for KVM_RUN; it stays (a late kick must not kill us)
        previous = {}
        for sig, status in ((signal.SIGINT, ExitStatus.SIGINT), (signal.SIGTERM, ExitStatus.SIGTERM)):
            previous[sig] = signal.signal(
                sig, lambda s, _f, st=status: self.request_exit(st, f"{signal.Signals(s).name} received"))
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda *_: self.dump_registers())
        return previous

    def _timed_out(self, timeout: float) -> None:
        """--timeout: log every vCPU's registers, then stop with the timeout status."""
        self.dump_registers()
        time.sleep(0.5)   # the vCPU threads log their registers when kicked
        self.request_exit(ExitStatus.TIMEOUT, f"timeout: the guest ran for {timeout:g} s")

    def run(self, timeout: float | None = None) -> int:
        """Run until the guest or the user ends the VM (or ``timeout`` seconds pass);
        returns the exit status (pyvmm.status.ExitStatus)."""
        previous = self._install_signals()
        try:
            self.console.start_input(self.serial.receive,
                                     quit=lambda: self.request_exit(0, "Ctrl-A x pressed"))
            self.t_first_run = time.monotonic()
            if self.watching:
                self.age_at_first_run = seconds_since_process_start()
            log.debug("VMM start to first KVM_RUN: %.3f s", self.t_first_run - self.t_start)
            trim_heap()   # what compiling modules and loading the kernel freed, before the guest runs
            if self.config.profile is not None:
                from .profile import GuestSampler

                self.sampler = GuestSampler(self.vcpus, self.memory)
                self.sampler.start()
            for t in self.vcpus:
                t.start()
            deadline = None if timeout is None else self.t_first_run + timeout
            while not self.stopping.is_set():
                self._wake.wait(0.25)
                self._wake.clear()
                if self._snapshot_requested.is_set() and not self.stopping.is_set():
                    self._take_snapshot()
                    self._snapshot_requested.clear()
                if deadline is not None and time.monotonic() > deadline:
                    self._timed_out(timeout)
            for t in self.vcpus:
                t.kick()
            for t in self.vcpus:
                t.thread.join(timeout=5)
                if t.thread.is_alive():
                    log.warning("vcpu%d did not stop in time", t.vcpu.index)
            self.t_end = time.monotonic()
        finally:
            if self.sampler is not None:
                self.sampler.stop()
            self.console.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for bus in (self.pio, self.mmio):
            if bus.unclaimed:
                log.debug("%s: %d unclaimed accesses: %s", bus.name,
                          sum(bus.unclaimed.values()) + bus.unclaimed_elsewhere, ", ".join(
                    f"{addr:#x} x{n}" for addr, n in sorted(bus.unclaimed.items())))
        if self.watching and not self.config.stats:   # with --stats the CLI prints them
            log.info("exit statistics:\n%s", self.stats_report().rstrip("\n"))
        return self.exit_status if self.exit_status is not None else 1

    def profile_report(self) -> str:
        """The --profile report of the run (pyvmm.profile); after ``run``."""
        from .profile import KernelSymbols, format_profile

        samples = [t.samples for t in self.vcpus if t.samples is not None]
        path = self.config.profile_symbols
        symbols = KernelSymbols.from_elf(path) if path else KernelSymbols([])
        hz = self.sampler.hz if self.sampler is not None else 0
        return format_profile(samples, symbols, hz)

    def stats_report(self) -> str:
        """The --stats report of the run (pyvmm.trace.format_stats); after ``run``."""
        fixups: dict[str, int] = {}
        for t in self.vcpus:
            for k, v in t.fixups.items():
                fixups[k] = fixups.get(k, 0) + v
        queues = []
        for device in self.pci.devices.values():
            if isinstance(device, VirtioPciDevice):
                outside = device.device.external_datapath and not any(
                    c.wakeups for c in device.counters)   # (no successor worker took over)
                queues.append((device.name, None if outside else device.counters))
        first, end = self.t_first_run or self.t_start, self.t_end or time.monotonic()
        return format_stats(RunCounters(
            seconds=end - first, first_run=self.age_at_first_run, setup=first - self.t_start,
            watches=[t.watch for t in self.vcpus if t.watch is not None], fixups=fixups,
            memory_faults=[t.memory_faults for t in self.vcpus], buses=[self.pio, self.mmio],
            queues=queues))

    def close(self) -> None:
        self.pci.close()
        if self.console_port is not None:
            self.console_port.close()
        if self.agent is not None:
            self.agent.close()
        for t in self.vcpus:
            if not t.thread.is_alive():
                t.vcpu.close()
        self.memory.close()
        self.vm.close()
        self.kvm.close()


__all__ = ["Machine", "MachineConfig", "format_regs"]
