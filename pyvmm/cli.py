"""Command line: ``pyvmm run`` and ``pyvmm info`` (DESIGN.md "CLI contract").

Bad input is one clear line on stderr and exit status 2, never a traceback.
A guest that shuts down or reboots by itself ends with 0 (or the status it
wrote to the debug-exit port); a VMM-side failure dumps registers and ends
with 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, guest_build, kvm
from .boot.errors import KernelFormatError
from .cmdline import default_cmdline
from .console import Console, SerialSpecError
from .platform import detect_flavour, host_memory_bytes

if TYPE_CHECKING:
    from .vm import DiskConfig, FsConfig, MachineConfig

log = logging.getLogger("pyvmm")

MAX_CPUS = 8
DEFAULT_MEMORY = "256M"
MIN_MEMORY = 32 << 20
GUEST_DIR_ENV = "PYVMM_GUEST_DIR"


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm", description="A minimal KVM virtual machine monitor in Python.")
    p.add_argument("--log-level", default=os.environ.get("PYVMM_LOG", "warning"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="boot a guest")
    run.add_argument("--kernel", help="ELF vmlinux (PVH) or bzImage; default: guest/build/vmlinux")
    run.add_argument("--initramfs", help="uncompressed cpio; default: guest/build/initramfs.cpio")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--cmdline", help="replace the default kernel command line")
    run.add_argument("--append", action="append", default=[],
                     help="add words to the kernel command line")
    run.add_argument("--memory", default=DEFAULT_MEMORY, help="guest RAM, e.g. 512M or 1G")
    run.add_argument("--cpus", default="1", help=f"vCPUs, 1 to {MAX_CPUS}")
    run.add_argument("--serial", default="stdio", help="stdio, file=PATH or null")
    run.add_argument("--disk", action="append", default=[], metavar="path=FILE[,readonly=on]",
                     help="a virtio-blk disk on a raw image (repeatable)")
    run.add_argument("--fs", action="append", default=[],
                     metavar="tag=TAG,socket=PATH[,num_queues=N][,queue_size=N][,dax=on][,cache_size=SIZE]",
                     help="a virtio-fs share served by a vhost-user backend (repeatable)")
    run.add_argument("--rng", action="store_true", help="a virtio-rng device fed by os.urandom")
    run.add_argument("--console", metavar="socket=PATH|file=PATH|null",
                     help="a virtio-console (hvc0) with this host side")
    sub.add_parser("info", help="say what this host's KVM is and what follows from it")
    guest_build.add_parser(sub)
    return p


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


def machine_config(args: argparse.Namespace, flavour) -> "MachineConfig":
    from .vm import MachineConfig

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

    guest_dir = default_guest_dir()
    kernel_path = args.kernel or str(guest_dir / "vmlinux")
    initramfs_path = args.initramfs
    if args.kernel is None:
        if not Path(kernel_path).exists():
            raise UsageError(guest_build.no_guest_message())
        if initramfs_path is None and (guest_dir / "initramfs.cpio").exists():
            initramfs_path = str(guest_dir / "initramfs.cpio")
    kernel = _read_file(kernel_path, "kernel")
    initramfs = _read_file(initramfs_path, "initramfs") if initramfs_path else None
    disks = [parse_disk(spec) for spec in args.disk]
    shares = [parse_fs(spec) for spec in args.fs]
    if len({s.tag for s in shares}) != len(shares):
        raise UsageError("--fs tags must be different")
    if args.console is not None:
        kind, _, path = args.console.partition("=")
        if not (kind in ("socket", "file") and path or args.console == "null"):
            raise UsageError(f"--console must be socket=PATH, file=PATH or null, not {args.console!r}")
    cmdline = args.cmdline if args.cmdline is not None else default_cmdline(flavour)
    if args.append:
        cmdline = " ".join([cmdline, *args.append])
    return MachineConfig(kernel=kernel, initramfs=initramfs, cmdline=cmdline,
                         memory=memory, cpus=cpus, serial=args.serial, disks=disks,
                         rng=args.rng, console=args.console, shares=shares)


def parse_options(spec: str, what: str, known: set[str]) -> dict[str, str]:
    """``key=value,key=value`` (DESIGN.md CLI contract); unknown keys are errors."""
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
    from .vm import Machine

    flavour = detect_flavour()
    log.info("%s", flavour.summary)
    config = machine_config(args, flavour)
    try:
        console = Console(config.serial)
    except SerialSpecError as e:
        raise UsageError(str(e)) from None
    log.info("kernel command line: %s", config.cmdline)
    try:
        machine = Machine(config, flavour, console)
    except (KernelFormatError, ValueError) as e:  # a kernel or disk image we cannot use
        console.close()
        raise UsageError(str(e)) from None
    try:
        status = machine.run()
    finally:
        machine.close()
    if status and "\n" in machine.exit_reason:  # a VMM-side failure with a register dump
        sys.stderr.write(f"pyvmm: {machine.exit_reason}\n")
    return status


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
