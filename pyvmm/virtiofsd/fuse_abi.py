"""The FUSE wire format of <linux/fuse.h>, as ctypes structures and constants.

Over virtio-fs there is no /dev/fuse: each FUSE request travels in one virtqueue
descriptor chain.  The device-readable part is ``fuse_in_header`` (40 bytes)
followed by the opcode's arguments; the device-writable part receives
``fuse_out_header`` (16 bytes) followed by the opcode's reply.  Everything is
little-endian on x86-64, and every structure is padded to 8 bytes so that 32-bit
and 64-bit peers agree.

Names are exactly the header's, so ``grep FUSE_SETUPMAPPING include/uapi/linux/fuse.h``
finds each of them.  The header on this machine is FUSE 7.38 (Linux 6.1 guests
speak 7.37); where 7.38 changed a layout compatibly (``fuse_in_header.padding``
became ``total_extlen`` + ``padding``, only meaningful once extensions are
negotiated, which pyvmm never does) the newer spelling is used.
``tests/test_fuse_abi.py`` compiles a C program against the header and compares
every size, offset and constant below with what gcc says.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint16, c_uint32, c_uint64, sizeof

# --- version ("Version number of this interface") ---------------------------------------
FUSE_KERNEL_VERSION = 7
#: The highest minor version this server speaks (7.37 = Linux 6.1); the header's own
#: FUSE_KERNEL_MINOR_VERSION is whatever the installed header is (38 here).
SUPPORTED_MINOR_VERSION = 37

# --- "The node ID of the root inode" -------------------------------------------------------
FUSE_ROOT_ID = 1

# --- "Bitmasks for fuse_setattr_in.valid" ---------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# --- "Flags returned by the OPEN request" ------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# --- "INIT request/reply flags" ------------------------------------------------------------
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
# "bits 32..63 get shifted down 32 bits into the flags2 field" (valid with FUSE_INIT_EXT)
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_HAS_EXPIRE_ONLY = 1 << 35

# --- "Release flags" ---------------------------------------------------------------------
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1

# --- "Getattr flags" ---------------------------------------------------------------------
FUSE_GETATTR_FH = 1 << 0

# --- "Lock flags" ------------------------------------------------------------------------
FUSE_LK_FLOCK = 1 << 0

# --- "WRITE flags" -----------------------------------------------------------------------
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_WRITE_KILL_PRIV = FUSE_WRITE_KILL_SUIDGID   # "Obsolete alias"

# --- "Read flags" ------------------------------------------------------------------------
FUSE_READ_LOCKOWNER = 1 << 1

# --- "Fsync flags" -----------------------------------------------------------------------
FUSE_FSYNC_FDATASYNC = 1 << 0

# --- "fuse_attr flags" -------------------------------------------------------------------
FUSE_ATTR_SUBMOUNT = 1 << 0
FUSE_ATTR_DAX = 1 << 1

# --- "Open flags" ------------------------------------------------------------------------
FUSE_OPEN_KILL_SUIDGID = 1 << 0

# --- "setxattr flags" --------------------------------------------------------------------
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0

# --- enum fuse_opcode --------------------------------------------------------------------
FUSE_LOOKUP = 1
FUSE_FORGET = 2            # no reply
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_READLINK = 5
FUSE_SYMLINK = 6
FUSE_MKNOD = 8
FUSE_MKDIR = 9
FUSE_UNLINK = 10
FUSE_RMDIR = 11
FUSE_RENAME = 12
FUSE_LINK = 13
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_SETXATTR = 21
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_REMOVEXATTR = 24
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_GETLK = 31
FUSE_SETLK = 32
FUSE_SETLKW = 33
FUSE_ACCESS = 34
FUSE_CREATE = 35
FUSE_INTERRUPT = 36
FUSE_BMAP = 37
FUSE_DESTROY = 38
FUSE_IOCTL = 39
FUSE_POLL = 40
FUSE_NOTIFY_REPLY = 41
FUSE_BATCH_FORGET = 42     # no reply
FUSE_FALLOCATE = 43
FUSE_READDIRPLUS = 44
FUSE_RENAME2 = 45
FUSE_LSEEK = 46
FUSE_COPY_FILE_RANGE = 47
FUSE_SETUPMAPPING = 48
FUSE_REMOVEMAPPING = 49
FUSE_SYNCFS = 50
FUSE_TMPFILE = 51

#: opcode -> name, for log messages
OPCODE_NAMES = {globals()[name]: name for name in """
    FUSE_LOOKUP FUSE_FORGET FUSE_GETATTR FUSE_SETATTR FUSE_READLINK FUSE_SYMLINK FUSE_MKNOD
    FUSE_MKDIR FUSE_UNLINK FUSE_RMDIR FUSE_RENAME FUSE_LINK FUSE_OPEN FUSE_READ FUSE_WRITE
    FUSE_STATFS FUSE_RELEASE FUSE_FSYNC FUSE_SETXATTR FUSE_GETXATTR FUSE_LISTXATTR
    FUSE_REMOVEXATTR FUSE_FLUSH FUSE_INIT FUSE_OPENDIR FUSE_READDIR FUSE_RELEASEDIR
    FUSE_FSYNCDIR FUSE_GETLK FUSE_SETLK FUSE_SETLKW FUSE_ACCESS FUSE_CREATE FUSE_INTERRUPT
    FUSE_BMAP FUSE_DESTROY FUSE_IOCTL FUSE_POLL FUSE_NOTIFY_REPLY FUSE_BATCH_FORGET
    FUSE_FALLOCATE FUSE_READDIRPLUS FUSE_RENAME2 FUSE_LSEEK FUSE_COPY_FILE_RANGE
    FUSE_SETUPMAPPING FUSE_REMOVEMAPPING FUSE_SYNCFS FUSE_TMPFILE""".split()}

# --- compatibility sizes (older minors had shorter structures) -----------------------------
FUSE_MIN_READ_BUFFER = 8192
FUSE_COMPAT_ENTRY_OUT_SIZE = 120
FUSE_COMPAT_ATTR_OUT_SIZE = 96
FUSE_COMPAT_MKNOD_IN_SIZE = 8
FUSE_COMPAT_WRITE_IN_SIZE = 24
FUSE_COMPAT_STATFS_SIZE = 48
FUSE_COMPAT_SETXATTR_IN_SIZE = 8      # what is sent unless FUSE_SETXATTR_EXT was agreed
FUSE_COMPAT_INIT_OUT_SIZE = 8
FUSE_COMPAT_22_INIT_OUT_SIZE = 24

# --- DAX (FUSE 7.31) ----------------------------------------------------------------------
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1
#: PAGE_SIZE / sizeof(struct fuse_removemapping_one) with x86-64's 4 KiB pages.
FUSE_REMOVEMAPPING_MAX_ENTRY = 4096 // 16


class _Struct(ctypes.LittleEndianStructure):
    """Base of every wire structure: packed exactly as C lays it out (all fields
    are naturally aligned in <linux/fuse.h>, so no ``_pack_`` is needed)."""


def _check_size(struct: type, size: int) -> None:
    """Import-time guard: the ctypes layout must have the size <linux/fuse.h> gives."""
    if sizeof(struct) != size:
        raise AssertionError(f"{struct.__name__} is {sizeof(struct)} bytes, fuse.h says {size}")


# --- headers ------------------------------------------------------------------------------
class fuse_in_header(_Struct):
    _fields_ = [("len", c_uint32), ("opcode", c_uint32), ("unique", c_uint64),
                ("nodeid", c_uint64), ("uid", c_uint32), ("gid", c_uint32), ("pid", c_uint32),
                ("total_extlen", c_uint16), ("padding", c_uint16)]


_check_size(fuse_in_header, 40)


class fuse_out_header(_Struct):
    _fields_ = [("len", c_uint32), ("error", c_int32), ("unique", c_uint64)]


_check_size(fuse_out_header, 16)


# --- attributes and entries ---------------------------------------------------------------
class fuse_attr(_Struct):
    _fields_ = [("ino", c_uint64), ("size", c_uint64), ("blocks", c_uint64),
                ("atime", c_uint64), ("mtime", c_uint64), ("ctime", c_uint64),
                ("atimensec", c_uint32), ("mtimensec", c_uint32), ("ctimensec", c_uint32),
                ("mode", c_uint32), ("nlink", c_uint32), ("uid", c_uint32), ("gid", c_uint32),
                ("rdev", c_uint32), ("blksize", c_uint32), ("flags", c_uint32)]


_check_size(fuse_attr, 88)


class fuse_entry_out(_Struct):
    _fields_ = [("nodeid", c_uint64), ("generation", c_uint64), ("entry_valid", c_uint64),
                ("attr_valid", c_uint64), ("entry_valid_nsec", c_uint32),
                ("attr_valid_nsec", c_uint32), ("attr", fuse_attr)]


_check_size(fuse_entry_out, 128)


class fuse_attr_out(_Struct):
    _fields_ = [("attr_valid", c_uint64), ("attr_valid_nsec", c_uint32), ("dummy", c_uint32),
                ("attr", fuse_attr)]


_check_size(fuse_attr_out, 104)


class fuse_getattr_in(_Struct):
    _fields_ = [("getattr_flags", c_uint32), ("dummy", c_uint32), ("fh", c_uint64)]


_check_size(fuse_getattr_in, 16)


class fuse_setattr_in(_Struct):
    _fields_ = [("valid", c_uint32), ("padding", c_uint32), ("fh", c_uint64),
                ("size", c_uint64), ("lock_owner", c_uint64), ("atime", c_uint64),
                ("mtime", c_uint64), ("ctime", c_uint64), ("atimensec", c_uint32),
                ("mtimensec", c_uint32), ("ctimensec", c_uint32), ("mode", c_uint32),
                ("unused4", c_uint32), ("uid", c_uint32), ("gid", c_uint32),
                ("unused5", c_uint32)]


_check_size(fuse_setattr_in, 88)


# --- forget -------------------------------------------------------------------------------
class fuse_forget_in(_Struct):
    _fields_ = [("nlookup", c_uint64)]


_check_size(fuse_forget_in, 8)


class fuse_forget_one(_Struct):
    _fields_ = [("nodeid", c_uint64), ("nlookup", c_uint64)]


_check_size(fuse_forget_one, 16)


class fuse_batch_forget_in(_Struct):
    _fields_ = [("count", c_uint32), ("dummy", c_uint32)]


_check_size(fuse_batch_forget_in, 8)


# --- creating and naming --------------------------------------------------------------------
class fuse_mknod_in(_Struct):
    _fields_ = [("mode", c_uint32), ("rdev", c_uint32), ("umask", c_uint32),
                ("padding", c_uint32)]


_check_size(fuse_mknod_in, 16)


class fuse_mkdir_in(_Struct):
    _fields_ = [("mode", c_uint32), ("umask", c_uint32)]


_check_size(fuse_mkdir_in, 8)


class fuse_rename_in(_Struct):
    _fields_ = [("newdir", c_uint64)]


_check_size(fuse_rename_in, 8)


class fuse_rename2_in(_Struct):
    _fields_ = [("newdir", c_uint64), ("flags", c_uint32), ("padding", c_uint32)]


_check_size(fuse_rename2_in, 16)


class fuse_link_in(_Struct):
    _fields_ = [("oldnodeid", c_uint64)]


_check_size(fuse_link_in, 8)


# --- open files -------------------------------------------------------------------------
class fuse_open_in(_Struct):
    _fields_ = [("flags", c_uint32), ("open_flags", c_uint32)]


_check_size(fuse_open_in, 8)


class fuse_create_in(_Struct):
    _fields_ = [("flags", c_uint32), ("mode", c_uint32), ("umask", c_uint32),
                ("open_flags", c_uint32)]


_check_size(fuse_create_in, 16)


class fuse_open_out(_Struct):
    _fields_ = [("fh", c_uint64), ("open_flags", c_uint32), ("padding", c_uint32)]


_check_size(fuse_open_out, 16)


class fuse_release_in(_Struct):
    _fields_ = [("fh", c_uint64), ("flags", c_uint32), ("release_flags", c_uint32),
                ("lock_owner", c_uint64)]


_check_size(fuse_release_in, 24)


class fuse_flush_in(_Struct):
    _fields_ = [("fh", c_uint64), ("unused", c_uint32), ("padding", c_uint32),
                ("lock_owner", c_uint64)]


_check_size(fuse_flush_in, 24)


class fuse_read_in(_Struct):
    _fields_ = [("fh", c_uint64), ("offset", c_uint64), ("size", c_uint32),
                ("read_flags", c_uint32), ("lock_owner", c_uint64), ("flags", c_uint32),
                ("padding", c_uint32)]


_check_size(fuse_read_in, 40)


class fuse_write_in(_Struct):
    _fields_ = [("fh", c_uint64), ("offset", c_uint64), ("size", c_uint32),
                ("write_flags", c_uint32), ("lock_owner", c_uint64), ("flags", c_uint32),
                ("padding", c_uint32)]


_check_size(fuse_write_in, 40)


class fuse_write_out(_Struct):
    _fields_ = [("size", c_uint32), ("padding", c_uint32)]


_check_size(fuse_write_out, 8)


class fuse_fsync_in(_Struct):
    _fields_ = [("fh", c_uint64), ("fsync_flags", c_uint32), ("padding", c_uint32)]


_check_size(fuse_fsync_in, 16)


class fuse_fallocate_in(_Struct):
    _fields_ = [("fh", c_uint64), ("offset", c_uint64), ("length", c_uint64),
                ("mode", c_uint32), ("padding", c_uint32)]


_check_size(fuse_fallocate_in, 32)


class fuse_lseek_in(_Struct):
    _fields_ = [("fh", c_uint64), ("offset", c_uint64), ("whence", c_uint32),
                ("padding", c_uint32)]


_check_size(fuse_lseek_in, 24)


class fuse_lseek_out(_Struct):
    _fields_ = [("offset", c_uint64)]


_check_size(fuse_lseek_out, 8)


class fuse_copy_file_range_in(_Struct):
    _fields_ = [("fh_in", c_uint64), ("off_in", c_uint64), ("nodeid_out", c_uint64),
                ("fh_out", c_uint64), ("off_out", c_uint64), ("len", c_uint64),
                ("flags", c_uint64)]


_check_size(fuse_copy_file_range_in, 56)


# --- extended attributes --------------------------------------------------------------------
class fuse_setxattr_in(_Struct):
    """16 bytes since 7.33, but only the first FUSE_COMPAT_SETXATTR_IN_SIZE (8) are
    sent unless the server answered INIT with FUSE_SETXATTR_EXT."""
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("setxattr_flags", c_uint32),
                ("padding", c_uint32)]


_check_size(fuse_setxattr_in, 16)


class fuse_getxattr_in(_Struct):
    _fields_ = [("size", c_uint32), ("padding", c_uint32)]


_check_size(fuse_getxattr_in, 8)


class fuse_getxattr_out(_Struct):
    _fields_ = [("size", c_uint32), ("padding", c_uint32)]


_check_size(fuse_getxattr_out, 8)


class fuse_access_in(_Struct):
    _fields_ = [("mask", c_uint32), ("padding", c_uint32)]


_check_size(fuse_access_in, 8)


# --- file system ------------------------------------------------------------------------
class fuse_kstatfs(_Struct):
    _fields_ = [("blocks", c_uint64), ("bfree", c_uint64), ("bavail", c_uint64),
                ("files", c_uint64), ("ffree", c_uint64), ("bsize", c_uint32),
                ("namelen", c_uint32), ("frsize", c_uint32), ("padding", c_uint32),
                ("spare", c_uint32 * 6)]


_check_size(fuse_kstatfs, 80)


class fuse_statfs_out(_Struct):
    _fields_ = [("st", fuse_kstatfs)]


_check_size(fuse_statfs_out, 80)


class fuse_syncfs_in(_Struct):
    _fields_ = [("padding", c_uint64)]


_check_size(fuse_syncfs_in, 8)


# --- INIT -------------------------------------------------------------------------------
class fuse_init_in(_Struct):
    """64 bytes since 7.36 (Linux 6.1 sends all of them); older kernels sent the
    first 16 (major, minor, max_readahead, flags)."""
    _fields_ = [("major", c_uint32), ("minor", c_uint32), ("max_readahead", c_uint32),
                ("flags", c_uint32), ("flags2", c_uint32), ("unused", c_uint32 * 11)]


_check_size(fuse_init_in, 64)


class fuse_init_out(_Struct):
    _fields_ = [("major", c_uint32), ("minor", c_uint32), ("max_readahead", c_uint32),
                ("flags", c_uint32), ("max_background", c_uint16),
                ("congestion_threshold", c_uint16), ("max_write", c_uint32),
                ("time_gran", c_uint32), ("max_pages", c_uint16), ("map_alignment", c_uint16),
                ("flags2", c_uint32), ("unused", c_uint32 * 7)]


_check_size(fuse_init_out, 64)


# --- directories ------------------------------------------------------------------------
class fuse_dirent(_Struct):
    """Followed by ``namelen`` name bytes (no NUL), the record padded to 8 bytes
    (FUSE_DIRENT_ALIGN).  ``off`` is the offset of the *next* entry."""
    _fields_ = [("ino", c_uint64), ("off", c_uint64), ("namelen", c_uint32),
                ("type", c_uint32)]


_check_size(fuse_dirent, 24)


class fuse_direntplus(_Struct):
    _fields_ = [("entry_out", fuse_entry_out), ("dirent", fuse_dirent)]


_check_size(fuse_direntplus, 152)

#: offsetof(struct fuse_dirent, name): the name follows the fixed part directly
FUSE_NAME_OFFSET = sizeof(fuse_dirent)
#: offsetof(struct fuse_direntplus, dirent.name)
FUSE_NAME_OFFSET_DIRENTPLUS = sizeof(fuse_direntplus)


def FUSE_REC_ALIGN(x: int) -> int:
    """The header's macro: "Align variable length records to 64bit boundary"."""
    return (x + 7) & ~7


FUSE_DIRENT_ALIGN = FUSE_REC_ALIGN


# --- DAX structures -----------------------------------------------------------------------
class fuse_setupmapping_in(_Struct):
    _fields_ = [("fh", c_uint64), ("foffset", c_uint64), ("len", c_uint64),
                ("flags", c_uint64), ("moffset", c_uint64)]


_check_size(fuse_setupmapping_in, 40)


class fuse_removemapping_in(_Struct):
    """4 bytes, no padding: the fuse_removemapping_one array that follows starts at
    byte 44 of the request, not 8-byte aligned."""
    _fields_ = [("count", c_uint32)]


_check_size(fuse_removemapping_in, 4)


class fuse_removemapping_one(_Struct):
    _fields_ = [("moffset", c_uint64), ("len", c_uint64)]


_check_size(fuse_removemapping_one, 16)
