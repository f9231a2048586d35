#!/usr/bin/env python3
"""The cache key of a guest kernel build, and the check of a --source.

A built kernel is cached as <cache>/kernel-<KEY>/vmlinux, where KEY is the
first 16 hex digits of a SHA-256 over what the build depends on:

  source, a tarball   its file name and size in bytes, each on a line
                      (the same formula as the first build-kernel.sh, so
                      Debian's /usr/src/linux-source-6.1.tar.xz keeps its key,
                      wherever a copy of it lies and whatever its mtime)
  source, a directory "dir", the Makefile's VERSION/PATCHLEVEL/SUBLEVEL/
                      EXTRAVERSION lines, the directory's real path, and a
                      digest of the relative path, size and mtime of every
                      file in it (.git excepted): an edit anywhere is a new key
  then                guest/kernel.config and every guest/patches/*.patch, in
                      the order the build applies them

A directory key starts from "dir" and a tarball key from a file name, so a
tree and a tarball never share a key; two tarballs share one only when they
have the same name and the same size.

Usage:
  kernel_key.py key SOURCE CONFIG [PATCH...]   print the key
  kernel_key.py check SOURCE                   print "Linux X.Y.Z" for a 6.1
                                               tree; a tarball is checked after
                                               unpacking
Exit status 2 and one line on stderr when SOURCE is not a Linux 6.1 tree or a
tar archive.  Standard library only: build-kernel.sh runs it with any python3.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
from pathlib import Path

KEY_DIGITS = 16
WANTED_RELEASE = (6, 1)
VERSION_FIELDS = ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION")


class SourceError(ValueError):
    """SOURCE is not something a Linux 6.1 kernel can be built from."""


def makefile_versions(tree: Path) -> dict[str, str]:
    """The VERSION, PATCHLEVEL, SUBLEVEL and EXTRAVERSION of a kernel tree's Makefile."""
    try:
        text = (tree / "Makefile").read_text(errors="replace")
    except FileNotFoundError:
        raise SourceError(f"{tree} has no Makefile: not a Linux source tree") from None
    except OSError as e:
        raise SourceError(f"cannot read {tree}/Makefile: {e.strerror}") from None
    fields = {}
    for name in VERSION_FIELDS:
        m = re.search(rf"^{name}\s*=[ \t]*(\S*)[ \t]*$", text, re.MULTILINE)
        if m is None and name != "EXTRAVERSION":
            raise SourceError(f"{tree}/Makefile has no {name} line: not a Linux source tree")
        fields[name] = m.group(1) if m else ""
    return fields


def tree_release(tree: Path) -> str:
    """``6.1.192`` (plus EXTRAVERSION) for a Linux 6.1 tree; SourceError for anything else."""
    v = makefile_versions(tree)
    release = f"{v['VERSION']}.{v['PATCHLEVEL']}.{v['SUBLEVEL']}{v['EXTRAVERSION']}"
    if (v["VERSION"], v["PATCHLEVEL"]) != tuple(str(n) for n in WANTED_RELEASE):
        raise SourceError(f"{tree} is Linux {release}: the guest kernel needs Linux 6.1")
    return release


def check_source(source: Path) -> str:
    """What SOURCE is, for a progress line; SourceError when it cannot be a 6.1 source."""
    if source.is_dir():
        return f"Linux {tree_release(source)} in {source}"
    if not source.exists():
        raise SourceError(f"{source} does not exist")
    if not source.is_file():
        raise SourceError(f"{source} is neither a directory nor a file")
    try:
        is_tar = tarfile.is_tarfile(source)
    except OSError as e:
        raise SourceError(f"cannot read {source}: {e.strerror}") from None
    if not is_tar and not source.name.endswith((".tar.zst", ".tzst")):  # zstd: GNU tar reads it
        raise SourceError(f"{source} is not a tar archive (nor a directory)")
    return f"tarball {source}"


def tree_digest(tree: Path) -> str:
    """SHA-256 of every file's relative path, size and mtime under ``tree`` (.git skipped)."""
    h = hashlib.sha256()
    for top, dirs, files in os.walk(tree):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            h.update(f"{os.path.relpath(path, tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                errors="surrogateescape"))
    return h.hexdigest()


def source_identity(source: Path) -> bytes:
    """The bytes that name the source in the key (see the module docstring)."""
    if source.is_dir():
        v = makefile_versions(source)
        lines = ["dir", *(f"{k} = {v[k]}" for k in VERSION_FIELDS),
                 str(source.resolve()), tree_digest(source)]
        return ("\n".join(lines) + "\n").encode(errors="surrogateescape")
    return f"{source.name}\n{source.stat().st_size}\n".encode(errors="surrogateescape")


def build_key(source: Path, config: Path, patches: list[Path]) -> str:
    """The cache key of a kernel built from ``source`` with ``config`` and ``patches``."""
    h = hashlib.sha256(source_identity(source))
    for part in (config, *patches):
        h.update(part.read_bytes())
    return h.hexdigest()[:KEY_DIGITS]


def main(argv: list[str]) -> int:
    try:
        if len(argv) >= 3 and argv[0] == "key":
            source = Path(argv[1])
            check_source(source)
            print(build_key(source, Path(argv[2]), [Path(p) for p in argv[3:]]))
            return 0
        if len(argv) == 2 and argv[0] == "check":
            print(check_source(Path(argv[1])))
            return 0
    except SourceError as e:
        sys.stderr.write(f"guest: --source: {e}\n")
        return 2
    sys.stderr.write("usage: kernel_key.py key SOURCE CONFIG [PATCH...] | check SOURCE\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
