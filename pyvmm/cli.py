"""Command line: ``pyvmm run`` and ``pyvmm info`` (docs/cli.md).

Bad input is one clear line on stderr and exit status 2, never a traceback.
Every way a guest can end has its own exit status (``pyvmm.status``): a guest
that shuts down by itself ends with 0, a guest program's status (``--exec``,
``pyvmm.run=``) is pyvmm's, a panic is 100, a guest that dies before its
program's status arrived is 101, a VMM-side failure dumps registers and is 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, guest_build, kvm
from .boot.errors import KernelFormatError
from .cliparse import Parser, UsageError
from .cmdline import BOOT_RAM, default_cmdline, deferred_memory_words
from .console import Console, SerialSpecError
from .platform import detect_flavour, host_memory_bytes
from .shares import TAG_RE, ShareConfig
from .status import EXIT_STATUS_TABLE, ExitStatus

if TYPE_CHECKING:
    from .snapshot.image import Snapshot
    from .trace import TraceSpec
    from .vm import DiskConfig, FsConfig, MachineConfig

log = logging.getLogger("pyvmm")

MAX_CPUS = 8
DEFAULT_MEMORY = "256M"
MIN_MEMORY = 32 << 20
GUEST_DIR_ENV = "PYVMM_GUEST_DIR"
AGENT_DEVICE = "hvc0"   # the agent's virtio-console is the first one the guest finds
TAIL_LINES = 25         # console lines on stderr when a guest panics, dies or times out


def default_guest_dir() -> Path:
    """$PYVMM_GUEST_DIR, a clone's guest/build/ or <cache>/guest/ (pyvmm.guest_build)."""
    return guest_build.default_guest_dir()


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``64K`` or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KkMmGgTt]?)(i?[Bb])?\s*", text)
    if not m:
        raise UsageError(f"bad size {text!r}: use e.g. 512M, 1G or a number of bytes")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return int(m.group(1)) << shift


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyvmm", description="A minimal KVM virtual machine monitor in Python.")
    p.add_argument("--log-level", default=os.environ.get("PYVMM_LOG", "warning"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    run = sub.add_parser("run", help="boot a guest", epilog=EXIT_STATUS_TABLE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--kernel", help="ELF vmlinux (PVH) or bzImage; default: the default guest's")
    run.add_argument("--initramfs", help="uncompressed cpio, or none; default: the default guest's "
                     "(also with --kernel)")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--cmdline", help="replace the default kernel command line")
    run.add_argument("--append", action="append", default=[],
                     help="add words to the kernel command line")
    run.add_argument("--memory", default=DEFAULT_MEMORY, help="guest RAM, e.g. 512M or 1G")
    run.add_argument("--memory-at-boot", action="store_true",
                     help=f"on a PVM host, have all RAM online before user space starts (by default "
                     f"a guest boots with {BOOT_RAM >> 20}M and its /init adds the rest right after "
                     "'ready'; see docs/pvm.md)")
    run.add_argument("--cpus", default="1", help=f"vCPUs, 1 to {MAX_CPUS}")
    run.add_argument("--disk", action="append", default=[], metavar="path=FILE[,readonly=on]",
                     help="a virtio-blk disk on a raw image (repeatable)")
    run.add_argument("--fs", action="append", default=[],
                     metavar="tag=TAG,socket=PATH[,num_queues=N][,queue_size=N][,dax=on][,cache_size=SIZE]",
                     help="a virtio-fs share served by a vhost-user backend (repeatable)")
    run.add_argument("--rng", action="store_true", help="a virtio-rng device fed by os.urandom")
    run.add_argument("--console", metavar="socket=PATH|file=PATH|null",
                     help="a virtio-console (hvc0, or hvc1 with the agent) with this host side")
    run.add_argument("--snapshot", metavar="DIR",
                     help="at the guest's snapshot point (its boot done, nothing mounted or run "
                     "yet) write the machine to DIR and exit 0")
    run.add_argument("--snapshot-and-continue", action="store_true",
                     help="with --snapshot: go on running after writing it")
    run.add_argument("--gdb", metavar="PORT|unix:PATH",
                     help="serve GDB's remote protocol on 127.0.0.1:PORT or a Unix socket; "
                     "the guest waits for the debugger before its first instruction")
    add_host_side_args(run)
    restore = sub.add_parser("restore", help="resume a guest from a snapshot directory",
                             epilog=EXIT_STATUS_TABLE,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_argument("dir", metavar="DIR", help="a directory written by pyvmm run --snapshot")
    restore.add_argument("--fs", action="append", default=[], metavar="tag=TAG,socket=PATH",
                         help="the vhost-user back-end for the snapshot's virtio-fs device TAG")
    restore.add_argument("--console", metavar="socket=PATH|file=PATH|null",
                         help="the host side of the snapshot's virtio-console (default null)")
    add_host_side_args(restore)
    sub.add_parser("info", help="say what this host's KVM is and what follows from it")
    guest_build.add_parser(sub)
    return p


def add_host_side_args(p: argparse.ArgumentParser) -> None:
    """Options that choose the host side of a guest: for a boot and for a restore alike."""
    p.add_argument("--serial", help="stdio, file=PATH or null; default stdio (null with --exec, "
                   "whose output is the command's)")
    p.add_argument("--share", action="append", default=[],
                   metavar="DIR[,tag=TAG][,dax=on][,cache_size=SIZE][,readonly=on]",
                   help="share a host directory at /mnt/TAG (default tag: the directory's name); "
                   "pyvmm starts pyvmm-virtiofsd for it (repeatable)")
    p.add_argument("--exec", metavar="CMD",
                   help="run CMD with /bin/sh -c in the guest: its stdout and stderr are "
                   "pyvmm's, its status is pyvmm's exit status")
    p.add_argument("--agent", metavar="socket=PATH",
                   help="serve the guest agent's protocol on a Unix socket (pyvmm.testing uses it)")
    p.add_argument("--timeout", metavar="SECONDS",
                   help="stop the guest after this long: exit 124, console tail and registers")
    p.add_argument("--trace", metavar="exits[=FILE][,FILTER]...",
                   help="one line per VM exit to FILE (default stderr); FILTER: io, mmio, fixup, "
                   "efault, other, port=N[-M], addr=N[-M], vcpu=N[-M] (docs/cli.md)")
    p.add_argument("--stats", action="store_true",
                   help="at the end, exit counts by reason, device, vCPU and virtqueue on stderr")
    p.add_argument("--profile", nargs="?", const="-", metavar="FILE",
                   help="sample each vCPU's RIP 1000 times a second; at the end, the guest "
                   "kernel functions that took the time, to FILE (default stderr)")


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


@dataclass
class RunPlan:
    """What ``pyvmm run`` will do: the machine, the shares to start, the command."""

    config: "MachineConfig"
    shares: list[ShareConfig] = field(default_factory=list)
    exec_command: str | None = None
    timeout: float | None = None
    gdb: str | None = None   # --gdb: where the GDB stub listens


def parse_cpus_memory(args: argparse.Namespace) -> tuple[int, int]:
    try:
        cpus = int(args.cpus)
    except ValueError:
        raise UsageError(f"--cpus must be a number from 1 to {MAX_CPUS}, not {args.cpus!r}") from None
    if not 1 <= cpus <= MAX_CPUS:
        raise UsageError(f"--cpus must be from 1 to {MAX_CPUS}, not {cpus}")
    memory = parse_size(args.memory)
    if memory < MIN_MEMORY:
        raise UsageError(f"--memory {args.memory} is too small: at least {MIN_MEMORY >> 20}M")
    if memory % 4096:
        raise UsageError(f"--memory {args.memory} is not a multiple of 4 KiB")
    host = host_memory_bytes()
    if host is not None and memory > host:
        raise UsageError(f"--memory {args.memory} is more than this host has ({host >> 20} MiB)")
    return cpus, memory


def kernel_file(args: argparse.Namespace) -> str:
    """--kernel, or the default guest's vmlinux."""
    return args.kernel or str(default_guest_dir() / "vmlinux")


def guest_files(args: argparse.Namespace) -> tuple[bytes, bytes | None]:
    """The kernel and initramfs: given, or the default guest's.  A custom --kernel
    without --initramfs still gets the default initramfs (without one Linux
    panics); ``--initramfs none`` boots without."""
    guest_dir = default_guest_dir()
    default_initramfs = guest_dir / "initramfs.cpio"
    kernel_path = kernel_file(args)
    if args.kernel is None and not Path(kernel_path).exists():
        raise UsageError(guest_build.no_guest_message())
    initramfs_path = args.initramfs
    if initramfs_path is None and default_initramfs.exists():
        initramfs_path = str(default_initramfs)
    if initramfs_path == "none":
        initramfs_path = None
    kernel = _read_file(kernel_path, "kernel")
    return kernel, _read_file(initramfs_path, "initramfs") if initramfs_path else None


def parse_timeout(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise UsageError(f"--timeout {text!r}: expected a number of seconds above 0")
    return value


def parse_agent(args: argparse.Namespace) -> str | None:
    if args.agent is None:
        return None
    kind, _, path = args.agent.partition("=")
    if kind != "socket" or not path:
        raise UsageError(f"--agent must be socket=PATH, not {args.agent!r}")
    return path


def check_console(spec: str | None) -> None:
    if spec is None:
        return
    kind, _, path = spec.partition("=")
    if not (kind in ("socket", "file") and path or spec == "null"):
        raise UsageError(f"--console must be socket=PATH, file=PATH or null, not {spec!r}")


def snapshot_target(path: str) -> str:
    """--snapshot DIR, checked before the boot rather than after it."""
    from .snapshot.image import SnapshotError, check_target

    try:
        return check_target(path)
    except SnapshotError as e:
        raise UsageError(f"--snapshot {e}") from None


def parse_trace_option(text: str | None) -> "TraceSpec | None":
    """--trace exits[=FILE][,FILTER]... (a bad one: one line, exit 2)."""
    from .trace import TraceSpecError, parse_trace

    try:
        return parse_trace(text) if text is not None else None
    except TraceSpecError as e:
        raise UsageError(str(e)) from None


def default_serial(args: argparse.Namespace) -> str:
    """--serial, else stdio; null with --exec (pyvmm's stdout is the command's)."""
    return args.serial or ("null" if args.exec is not None else "stdio")


def run_plan(args: argparse.Namespace, flavour) -> RunPlan:
    from .vm import MachineConfig

    cpus, memory = parse_cpus_memory(args)
    trace = parse_trace_option(args.trace)
    kernel, initramfs = guest_files(args)
    disks = [parse_disk(spec) for spec in args.disk]
    fs = [parse_fs(spec) for spec in args.fs]
    shares = [parse_share(spec) for spec in args.share]
    tags = [s.tag for s in fs] + [s.tag for s in shares]
    if len(set(tags)) != len(tags):
        raise UsageError("--fs and --share tags must be different")
    check_console(args.console)
    agent_socket = parse_agent(args)
    snapshot = snapshot_target(args.snapshot) if args.snapshot else None
    if args.snapshot_and_continue and snapshot is None:
        raise UsageError("--snapshot-and-continue needs --snapshot DIR")
    if snapshot and args.exec is not None and not args.snapshot_and_continue:
        raise UsageError("--snapshot ends the run at the snapshot point, before --exec could run: "
                         "add --snapshot-and-continue, or give --exec to `pyvmm restore`")
    cmdline = args.cmdline if args.cmdline is not None else default_cmdline(flavour)
    words = list(args.append)
    if args.cmdline is None and flavour.is_pvm and not args.memory_at_boot:
        words += deferred_memory_words(memory)   # struct pages cost ~2.9 s per GiB on PVM
    if args.exec is not None and any(w.startswith("pyvmm.run=") for a in words for w in a.split()):
        raise UsageError("--exec and pyvmm.run= both name a program to run: give one")
    # The agent: for --exec, for a client on --agent, and in every snapshot (after a
    # restore it is how the guest learns its shares, the time and fresh entropy).
    agent = args.exec is not None or agent_socket is not None or snapshot is not None
    share_words = [s.guest_word() for s in shares]
    if agent:
        words.append(f"pyvmm.agent={AGENT_DEVICE}")   # the shares come with the agent's CONFIG
    else:
        words += share_words
    if snapshot:
        words.append("pyvmm.snapshot=1")
    if words:
        cmdline = " ".join([cmdline, *words])
    run_mode = args.exec is not None or any(w.startswith("pyvmm.run=") for w in cmdline.split())
    serial = default_serial(args)
    config = MachineConfig(kernel=kernel, initramfs=initramfs, cmdline=cmdline,
                           memory=memory, cpus=cpus, serial=serial, disks=disks,
                           rng=args.rng, console=args.console,
                           # a --share's socket is known once launch() starts its back-end
                           shares=fs + [s.fs_config(socket_path="") for s in shares], run_mode=run_mode,
                           agent_words=" ".join(share_words) if agent else None,
                           agent_socket=agent_socket, snapshot_path=snapshot,
                           snapshot_continue=args.snapshot_and_continue,
                           trace=trace, stats=args.stats, profile=args.profile,
                           profile_symbols=kernel_file(args))
    if snapshot and args.gdb is not None:
        # a snapshot would keep GDB's int3 bytes, and both pause the vCPUs their own way
        raise UsageError("--gdb and --snapshot cannot be combined")
    return RunPlan(config, shares, args.exec, parse_timeout(args.timeout), parse_gdb(args.gdb))


def parse_gdb(text: str | None) -> str | None:
    if text is None:
        return None
    from .gdbstub import parse_address

    try:
        return parse_address(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def restore_plan(args: argparse.Namespace, flavour) -> tuple[RunPlan, "Snapshot"]:
    """``pyvmm restore DIR``: the machine the snapshot describes, with this run's host side."""
    from .snapshot import image
    from .snapshot.machine import check_host, machine_config

    trace = parse_trace_option(args.trace)
    try:
        snap = image.load(args.dir)
        check_host(snap, flavour)
    except image.SnapshotError as e:
        raise UsageError(str(e)) from None
    check_console(args.console)
    shares = [parse_share(spec) for spec in args.share]
    fs = {}
    for spec in args.fs:
        o = parse_options(spec, "--fs", {"tag", "socket"})
        if not o.get("tag") or not o.get("socket"):
            raise UsageError(f"--fs {spec!r} needs tag=TAG and socket=PATH")
        fs[o["tag"]] = o["socket"]
    try:
        config = machine_config(snap, shares, fs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config.serial = default_serial(args)
    config.console = args.console or ("null" if config.console else None)
    config.agent_socket = parse_agent(args)
    config.run_mode = args.exec is not None
    config.trace, config.stats, config.profile = trace, args.stats, args.profile
    return RunPlan(config, shares, args.exec, parse_timeout(args.timeout)), snap


def parse_options(spec: str, what: str, known: set[str]) -> dict[str, str]:
    """``key=value,key=value`` (docs/cli.md); unknown keys are errors."""
    options = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or key not in known or key in options:
            raise UsageError(f"{what} {spec!r}: expected {','.join(sorted(known))} as key=value")
        options[key] = value
    return options


def parse_fs(spec: str) -> "FsConfig":
    from .vm import FsConfig

    o = parse_options(spec, "--fs", {"tag", "socket", "num_queues", "queue_size", "dax", "cache_size"})
    if not o.get("tag") or not o.get("socket"):
        raise UsageError(f"--fs {spec!r} needs tag=TAG and socket=PATH")
    if len(o["tag"].encode()) > 36:
        raise UsageError(f"--fs tag {o['tag']!r} is longer than 36 bytes")
    try:
        num_queues = int(o.get("num_queues", "1"))
        queue_size = int(o.get("queue_size", "1024"))
    except ValueError:
        raise UsageError(f"--fs {spec!r}: num_queues and queue_size are numbers") from None
    if not 1 <= num_queues <= 64:
        raise UsageError("--fs num_queues must be from 1 to 64")
    if not 16 <= queue_size <= 32768 or queue_size & (queue_size - 1):
        raise UsageError("--fs queue_size must be a power of two from 16 to 32768")
    dax = o.get("dax", "off")
    if dax not in ("on", "off"):
        raise UsageError("--fs dax must be on or off")
    cache_size = parse_size(o.get("cache_size", "1G"))
    if cache_size < (2 << 20) or cache_size & (cache_size - 1):
        raise UsageError("--fs cache_size must be a power of two of at least 2M")
    return FsConfig(o["tag"], o["socket"], num_queues, queue_size, dax == "on", cache_size)


def parse_share(spec: str) -> ShareConfig:
    """``DIR[,tag=TAG][,dax=on][,cache_size=SIZE][,readonly=on]``."""
    path, _, rest = spec.partition(",")
    if not path:
        raise UsageError(f"--share {spec!r} needs a directory first")
    o = parse_options(rest, "--share", {"tag", "dax", "cache_size", "readonly"}) if rest else {}
    if not os.path.isdir(path):
        raise UsageError(f"--share: {path} is not a directory")
    tag = o.get("tag") or os.path.basename(os.path.abspath(path)) or "share"
    if not TAG_RE.fullmatch(tag):
        raise UsageError(f"--share tag {tag!r}: use 1 to 36 of A-Z a-z 0-9 . _ - (or give tag=)")
    for key in ("dax", "readonly"):
        if o.get(key, "off") not in ("on", "off"):
            raise UsageError(f"--share {key} must be on or off")
    cache_size = parse_size(o.get("cache_size", "256M"))
    if cache_size < (2 << 20) or cache_size & (cache_size - 1):
        raise UsageError("--share cache_size must be a power of two of at least 2M")
    return ShareConfig(os.path.abspath(path), tag, o.get("dax") == "on", cache_size,
                       o.get("readonly") == "on")


def parse_disk(spec: str) -> "DiskConfig":
    from .vm import DiskConfig

    options = parse_options(spec, "--disk", {"path", "readonly"})
    path = options.get("path")
    if not path:
        raise UsageError(f"--disk {spec!r} needs path=FILE")
    readonly = options.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise UsageError(f"--disk {spec!r}: readonly must be on or off")
    if not os.path.isfile(path):
        raise UsageError(f"--disk: {path} is not a file")
    if not os.access(path, os.R_OK | (0 if readonly == "on" else os.W_OK)):
        raise UsageError(f"--disk: {path} is not {'readable' if readonly == 'on' else 'writable'}")
    return DiskConfig(path, readonly == "on")


def cmd_info() -> int:
    flavour = detect_flavour()
    print(flavour.summary)
    try:
        k = kvm.Kvm()
    except kvm.KvmUnavailable as e:
        print(f"/dev/kvm: {e}")
        return 1
    caps = {name: k.check_extension(cap) for name, cap in kvm.REQUIRED_CAPS.items()}
    print(f"/dev/kvm: API version {kvm.KVM_API_VERSION}, max vCPUs "
          f"{k.check_extension(kvm.KVM_CAP_MAX_VCPUS)}, memory slots "
          f"{k.check_extension(kvm.KVM_CAP_NR_MEMSLOTS)}")
    missing = [n for n, v in caps.items() if v <= 0]
    print("required capabilities: " + ("all present" if not missing else "MISSING " + ", ".join(missing)))
    print("default command line: " + default_cmdline(flavour))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    flavour = detect_flavour()
    log.info("%s", flavour.summary)
    return launch(run_plan(args, flavour), flavour)


def cmd_restore(args: argparse.Namespace) -> int:
    flavour = detect_flavour()
    log.info("%s", flavour.summary)
    plan, snap = restore_plan(args, flavour)
    log.info("restoring %s (taken %s)", snap.path, snap.state.get("created"))
    return launch(plan, flavour, snap)


def launch(plan: RunPlan, flavour, snapshot: "Snapshot | None" = None) -> int:
    """Start the shares' back-ends, build the machine (from ``snapshot`` if given),
    run it, and clean everything up whatever happens."""
    import dataclasses

    from .shares import start_backend, stop_backends
    from .trace import TraceOutput, TraceSpecError
    from .vm import Machine

    config = plan.config
    try:
        console = Console(config.serial)
    except SerialSpecError as e:
        raise UsageError(str(e)) from None
    try:
        trace = TraceOutput(config.trace) if config.trace is not None else None
    except TraceSpecError as e:
        console.close()
        raise UsageError(str(e)) from None
    log.info("kernel command line: %s", config.cmdline)
    backends = []
    try:
        sockets = {}
        for share in plan.shares:
            backend = start_backend(share)
            backends.append(backend)
            sockets[share.tag] = backend.socket_path
        config.shares = [dataclasses.replace(f, socket=sockets[f.tag]) if not f.socket else f
                         for f in config.shares]
        try:
            machine = Machine(config, flavour, console, restore_from=snapshot, trace=trace)
        except (KernelFormatError, ValueError) as e:  # a kernel, disk or snapshot we cannot use
            raise UsageError(str(e)) from None
        stub = None
        try:
            if plan.exec_command is not None:
                start_exec(machine, plan.exec_command)
            if plan.gdb is not None:
                from .gdbstub import start_for

                stub = start_for(machine, plan.gdb)
            status = machine.run(plan.timeout)
            if config.stats:
                sys.stderr.write(machine.stats_report())
            if config.profile is not None:
                from .profile import write_profile

                write_profile(machine.profile_report(), None if config.profile == "-" else config.profile,
                              sys.stderr)
        finally:
            if stub is not None:
                stub.close()
            machine.close()
    except ValueError as e:   # a share's back-end did not start
        raise UsageError(str(e)) from None
    finally:
        console.close()
        if trace is not None:
            trace.close()
        stop_backends(backends)
    report_exit(machine, console, status)
    return status


def start_exec(machine, command: str) -> None:
    """--exec: a thread that runs ``command`` through the guest agent, copies its
    output to our stdout/stderr and ends the VM with its status."""
    from .agent import AgentClosed, AgentSession

    session = AgentSession(machine.agent.client_frame)
    machine.agent.connect_client(session.deliver)

    def run() -> None:
        try:
            result = session.run(command, stdout=_writer(sys.stdout), stderr=_writer(sys.stderr))
        except AgentClosed:
            return
        machine.program_exited(min(max(result.returncode, 0), 255))

    threading.Thread(target=run, name="exec", daemon=True).start()


def _writer(stream):
    fd = stream.fileno()

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except OSError:
                return

    return write


def report_exit(machine, console: Console, status: int) -> None:
    """One line with the reason when the status is pyvmm's verdict rather than the
    guest program's; the console's last lines when the guest crashed or hung."""
    if status == 0 or machine.exit_from_program:
        return
    sys.stderr.write(f"pyvmm: {machine.exit_reason}\n")
    if status in (ExitStatus.GUEST_PANIC, ExitStatus.GUEST_DIED, ExitStatus.TIMEOUT):
        lines = bytes(console.tail).decode(errors="replace").splitlines()[-TAIL_LINES:]
        sys.stderr.write("pyvmm: the guest console's last lines:\n"
                         + "".join(f"  | {line}\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                            format="pyvmm: %(levelname)s: %(name)s: %(message)s")
        if args.command == "info":
            return cmd_info()
        if args.command == "guest":
            return guest_build.run(args)
        if args.command is None:  # plain `pyvmm`: boot the default guest
            args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "run"])
        if args.command == "run":
            return cmd_run(args)
        if args.command == "restore":
            return cmd_restore(args)
        raise UsageError(f"unknown command {args.command}")
    except UsageError as e:
        sys.stderr.write(f"pyvmm: {e}\n")
        return 2
    except kvm.KvmUnavailable as e:
        sys.stderr.write(f"pyvmm: {e}\n")
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
