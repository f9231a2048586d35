#!/usr/bin/env python3
"""Collect kernel modules and their dependencies, in load order, for the initramfs.

Reads a module tree's modules.dep (written by `depmod`; format in
modules.dep(5): "path/to/mod.ko[.xz|.zst|.gz]: dep1.ko dep2.ko ...", paths
relative to /lib/modules/KVER), and copies the wanted modules plus everything
they depend on into OUTDIR as plain .ko files (decompressed here on the host so
the guest needs no decompressor), together with OUTDIR/load-order: one file
name per line, every module after its dependencies.  Modules that are built
into the kernel (modules.builtin) are skipped.  guest/init.c reads load-order.

Usage: modules_order.py MODDIR OUTDIR MODULE...
(MODDIR is lib/modules/KVER of an unpacked linux-image package.)
"""
from __future__ import annotations

import gzip
import lzma
import os
import subprocess
import sys
from pathlib import Path

COMPRESSED_SUFFIXES = (".xz", ".zst", ".gz")


def module_name(path: str) -> str:
    """'kernel/fs/fuse/virtiofs.ko.xz' -> 'virtiofs'; '-' and '_' are the same to the kernel."""
    base = os.path.basename(path)
    for suffix in COMPRESSED_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (its path, the paths it depends on), from modules.dep."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[module_name(path)] = (path.strip(), rest.split())
    return deps


def parse_builtin(text: str) -> set[str]:
    """Names of built-in modules, from modules.builtin (one path per line)."""
    return {module_name(line) for line in text.split() if line}


def load_order(wanted: list[str], deps: dict[str, tuple[str, list[str]]],
               builtin: set[str]) -> list[str]:
    """Paths of `wanted` modules and their dependencies, dependencies first.

    Depth-first post-order over the dependency graph; raises ValueError for an
    unknown module or a dependency cycle."""
    order: list[str] = []
    done: set[str] = set()
    active: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in active:
            raise ValueError(f"dependency cycle at {name}")
        if name not in deps:
            raise ValueError(f"module {name} not found in modules.dep")
        active.add(name)
        path, needs = deps[name]
        for dep in needs:
            visit(module_name(dep))
        active.discard(name)
        done.add(name)
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in builtin and name not in deps:
            continue
        visit(name)
    return order


def decompressed(path: Path) -> bytes:
    """Contents of a module file, decompressed if it is .ko.xz/.ko.gz/.ko.zst."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dcq", str(path)], check=True,
                               stdout=subprocess.PIPE).stdout
    return path.read_bytes()


def write_if_changed(path: Path, data: bytes) -> None:
    """Leave files with the right contents alone, so make sees no change."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def collect(moddir: Path, outdir: Path, wanted: list[str]) -> list[str]:
    """Fill outdir with the modules and load-order; returns the file names in order."""
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin_file = moddir / "modules.builtin"
    builtin = parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    names = []
    outdir.mkdir(parents=True, exist_ok=True)
    for rel in load_order(wanted, deps, builtin):
        name = module_name(rel) + ".ko"
        write_if_changed(outdir / name, decompressed(moddir / rel))
        names.append(name)
    for stale in outdir.glob("*.ko"):
        if stale.name not in names:
            stale.unlink()
    write_if_changed(outdir / "load-order", "".join(n + "\n" for n in names).encode())
    return names


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: modules_order.py MODDIR OUTDIR MODULE...", file=sys.stderr)
        return 2
    try:
        names = collect(Path(argv[0]), Path(argv[1]), argv[2:])
    except (OSError, ValueError, subprocess.CalledProcessError, lzma.LZMAError) as exc:
        print(f"modules_order: {exc}", file=sys.stderr)
        return 1
    print("modules: " + " ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
