#!/usr/bin/env python3
"""Write an uncompressed "newc" cpio archive (the format Linux unpacks as initramfs).

No root privileges are needed: device nodes, owners and modes come from a text
list, not from the file system.  Output is reproducible: entries are sorted by
name, every mtime is the same fixed value, owners are 0:0 unless the list says
otherwise, and inode numbers are assigned in archive order.

Format (Linux Documentation/driver-api/early-userspace/buffer-format.rst and
cpio(5), "New ASCII Format"): each member is

    header   110 bytes: magic "070701" + 13 fields of 8 ASCII hex digits
    name     NUL-terminated; header+name padded with NULs to a multiple of 4
    data     c_filesize bytes; padded with NULs to a multiple of 4

and the archive ends with a member named "TRAILER!!!".

Input list, one entry per line ('#' starts a comment; NAME is the path inside
the archive, with or without a leading '/'):

    dir   NAME MODE UID GID
    file  NAME SOURCE MODE UID GID
    slink NAME TARGET MODE UID GID
    nod   NAME MODE UID GID c|b MAJOR MINOR

MODE is octal permission bits (e.g. 0755).  Missing parent directories are
added automatically (0755, root).  Usage:

    mkcpio.py [--mtime N] LIST OUT.cpio      (LIST may be '-' for stdin)
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

MAGIC = b"070701"
HEADER_LEN = 110  # 6 magic + 13 * 8 hex digits
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member.  `mode` includes the file type bits (S_IF*)."""

    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes = b""  # file contents, or the target of a symlink
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def nlink(self) -> int:
        # A directory has "." plus its entry in the parent; the kernel ignores it
        # for directories anyway, but cpio(1) expects the conventional value.
        return 2 if stat.S_ISDIR(self.mode) else 1


def pad4(length: int) -> int:
    """Number of NUL bytes needed to bring `length` to a multiple of 4."""
    return (-length) % 4


def normalize_name(name: str) -> str:
    """Archive names are relative ("bin/sh"), like the kernel's gen_init_cpio."""
    if ".." in name.split("/"):
        raise ValueError(f"bad archive name: {name!r}")
    clean = os.path.normpath("/" + name).lstrip("/")
    if not clean:
        raise ValueError(f"bad archive name: {name!r}")
    return clean


def header(entry: Entry, ino: int, mtime: int, name_size: int) -> bytes:
    """The 110-byte newc header; fields in order from cpio(5) 'New ASCII Format'."""
    fields = (
        ino,                # c_ino
        entry.mode,         # c_mode (type + permissions)
        entry.uid,          # c_uid
        entry.gid,          # c_gid
        entry.nlink,        # c_nlink
        mtime,              # c_mtime
        len(entry.data),    # c_filesize
        0,                  # c_devmajor (device holding the file: irrelevant)
        0,                  # c_devminor
        entry.rdev_major,   # c_rdevmajor (for character/block device nodes)
        entry.rdev_minor,   # c_rdevminor
        name_size,          # c_namesize, including the trailing NUL
        0,                  # c_check (only used by the "070702" CRC format)
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{entry.name}: header field {value} does not fit in 32 bits")
    out = MAGIC + b"".join(b"%08X" % value for value in fields)
    assert len(out) == HEADER_LEN
    return out


def member(entry: Entry, ino: int, mtime: int) -> bytes:
    """Header, padded name and padded data of one member."""
    name = entry.name.encode() + b"\0"
    head = header(entry, ino, mtime, len(name)) + name
    head += b"\0" * pad4(len(head))
    return head + entry.data + b"\0" * pad4(len(entry.data))


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Normalize names, add missing parent directories, sort by name, reject duplicates."""
    by_name: dict[str, Entry] = {}
    for entry in entries:
        name = normalize_name(entry.name)
        if name in by_name:
            raise ValueError(f"duplicate archive entry: {name}")
        by_name[name] = Entry(name, entry.mode, entry.uid, entry.gid, entry.data,
                              entry.rdev_major, entry.rdev_minor)
    for name in list(by_name):
        parent = os.path.dirname(name)
        while parent and parent not in by_name:
            by_name[parent] = Entry(parent, stat.S_IFDIR | 0o755)
            parent = os.path.dirname(parent)
    # Sorting puts every directory before its contents (a parent is a prefix).
    # Sort on path components so "a/b" comes right after "a", before "a-b".
    return [by_name[name] for name in sorted(by_name, key=lambda n: n.split("/"))]


def write_archive(entries: Iterable[Entry], out: BinaryIO, mtime: int = 0) -> None:
    """Write all entries (sorted, with parents) and the trailer to `out`."""
    ino = 0
    for ino, entry in enumerate(with_parents(entries), start=1):
        out.write(member(entry, ino, mtime))
    # The trailer is an ordinary member with an empty body (nlink 1 by convention).
    out.write(member(Entry(TRAILER, 0), 0, 0))


def archive_bytes(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    """Convenience wrapper: the whole archive as bytes."""
    import io

    buf = io.BytesIO()
    write_archive(entries, buf, mtime)
    return buf.getvalue()


def _ids(words: list[str], line_no: int) -> tuple[int, int, int]:
    """Parse MODE UID GID (mode octal)."""
    if len(words) != 3:
        raise ValueError(f"line {line_no}: expected MODE UID GID, got {words}")
    return int(words[0], 8), int(words[1]), int(words[2])


def parse_line(line: str, line_no: int, base: Path) -> Entry | None:
    """Turn one list line into an Entry (None for blank lines and comments)."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    kind, rest = words[0], words[1:]
    if kind == "dir" and len(rest) == 4:
        mode, uid, gid = _ids(rest[1:], line_no)
        return Entry(rest[0], stat.S_IFDIR | mode, uid, gid)
    if kind == "file" and len(rest) == 5:
        mode, uid, gid = _ids(rest[2:], line_no)
        return Entry(rest[0], stat.S_IFREG | mode, uid, gid, (base / rest[1]).read_bytes())
    if kind == "slink" and len(rest) == 5:
        mode, uid, gid = _ids(rest[2:], line_no)
        return Entry(rest[0], stat.S_IFLNK | mode, uid, gid, rest[1].encode())
    if kind == "nod" and len(rest) == 7:
        mode, uid, gid = _ids(rest[1:4], line_no)
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if rest[4] not in kinds:
            raise ValueError(f"line {line_no}: device type must be c or b")
        return Entry(rest[0], kinds[rest[4]] | mode, uid, gid, b"", int(rest[5]), int(rest[6]))
    raise ValueError(f"line {line_no}: cannot parse {line.strip()!r}")


def parse_list(text: str, base: Path) -> list[Entry]:
    """Parse a whole list; relative `file` sources are taken relative to `base`."""
    entries = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        entry = parse_line(line, line_no, base)
        if entry is not None:
            entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a newc cpio archive from a list")
    parser.add_argument("--mtime", type=int,
                        default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
                        help="mtime of every member (default $SOURCE_DATE_EPOCH or 0)")
    parser.add_argument("list", help="entry list, or - for stdin")
    parser.add_argument("out", help="output archive")
    args = parser.parse_args(argv)
    try:
        if args.list == "-":
            entries = parse_list(sys.stdin.read(), Path.cwd())
        else:
            path = Path(args.list)
            entries = parse_list(path.read_text(), path.parent)
        data = archive_bytes(entries, args.mtime)
    except (OSError, ValueError) as exc:
        print(f"mkcpio: {exc}", file=sys.stderr)
        return 1
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
