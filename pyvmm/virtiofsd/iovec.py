"""Guest buffers as the FUSE server sees them: one byte stream over many pieces.

A virtio-fs request is one descriptor chain: a device-readable part (the FUSE
request) and a device-writable part (room for the reply).  The vhost-user
back-end turns each part into an ``IoVec``: a list of pieces in chain order.

* A RAM piece is a ``memoryview`` into the back-end's mapping of guest RAM, so
  READ and WRITE move file data with ``os.preadv``/``os.pwritev`` straight
  between the file and guest memory, with no Python copy.
* A ``Foreign`` piece is a guest-physical range that is not in the memory table
  the front-end sent: in practice a buffer inside the DAX window (the guest
  ``read()``s a file into a DAX ``mmap`` of another file).  Its bytes are only
  reachable through ``resolver``, which the back-end builds from the window
  mappings it made (see ``vhost.DaxMapper.resolve``).  Plain ``read``/``write``
  of such a piece raise ``ForeignBufferError`` (the FUSE headers never live
  there); file transfers go through the resolver.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence, Union


class Foreign(NamedTuple):
    """``length`` guest bytes at guest-physical ``gpa``, outside the memory table."""

    gpa: int
    length: int


class ForeignResolver(Protocol):
    """Moves bytes between a file and a foreign guest range (both ways).

    ``to_file``: guest bytes -> ``fd`` at ``file_offset``; else file -> guest.
    Returns the bytes moved (short at end of file); raises OSError.
    """

    def __call__(self, gpa: int, length: int, fd: int, file_offset: int,
                 to_file: bool) -> int: ...


class ForeignBufferError(OSError):
    """A request needs guest bytes that lie outside guest RAM and cannot be resolved."""

    def __init__(self, gpa: int, length: int) -> None:
        super().__init__(errno.EFAULT, f"guest buffer {gpa:#x}+{length:#x} is not in guest RAM")


Piece = Union[memoryview, Foreign]


def _piece_len(piece: Piece) -> int:
    return piece.length if isinstance(piece, Foreign) else len(piece)


class IoVec:
    """An ordered list of guest buffer pieces read or written as one stream."""

    def __init__(self, pieces: Sequence[Piece] = (),
                 resolver: ForeignResolver | None = None) -> None:
        self.pieces: list[Piece] = [p for p in pieces if _piece_len(p) > 0]
        self.resolver = resolver
        self.length = sum(_piece_len(p) for p in self.pieces)

    @classmethod
    def of(cls, *chunks: bytes | bytearray) -> "IoVec":
        """An IoVec over plain host buffers (tests, and the reply of a local request)."""
        return cls([memoryview(c if isinstance(c, bytearray) else bytearray(c)) for c in chunks])

    def __len__(self) -> int:
        return self.length

    def _walk(self, offset: int, size: int) -> Iterator[tuple[Piece, int, int]]:
        """(piece, start in piece, length) covering [offset, offset + size) clipped to the end."""
        if offset < 0 or size < 0:
            raise ValueError(f"bad iovec range {offset}+{size}")
        skip, left = offset, size
        for piece in self.pieces:
            if left <= 0:
                return
            plen = _piece_len(piece)
            if skip >= plen:
                skip -= plen
                continue
            n = min(plen - skip, left)
            yield piece, skip, n
            left -= n
            skip = 0

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer when the stream ends first)."""
        if size is None:
            size = max(0, self.length - offset)
        out = bytearray()
        for piece, start, n in self._walk(offset, size):
            if isinstance(piece, Foreign):
                raise ForeignBufferError(piece.gpa + start, n)
            out += piece[start:start + n]
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Scatter ``data`` from ``offset`` on; returns the bytes written (short at the end)."""
        src = memoryview(data).cast("B")
        done = 0
        for piece, start, n in self._walk(offset, len(src)):
            if isinstance(piece, Foreign):
                raise ForeignBufferError(piece.gpa + start, n)
            piece[start:start + n] = src[done:done + n]
            done += n
        return done

    def _transfer(self, fd: int, file_offset: int, offset: int, size: int, to_file: bool) -> int:
        """Move up to ``size`` stream bytes at ``offset`` to/from ``fd`` at ``file_offset``.

        Consecutive RAM pieces go in one preadv/pwritev; a foreign piece goes to the
        resolver.  Stops at the first short transfer (end of file, full disk).
        """
        total = 0
        batch: list[memoryview] = []

        def flush() -> bool:
            nonlocal total, batch
            if not batch:
                return True
            want = sum(len(b) for b in batch)
            call: Callable = os.pwritev if to_file else os.preadv
            got = call(fd, batch, file_offset + total)
            batch = []
            total += got
            return got == want

        for piece, start, n in self._walk(offset, size):
            if isinstance(piece, Foreign):
                if not flush():
                    return total
                if self.resolver is None:
                    raise ForeignBufferError(piece.gpa + start, n)
                got = self.resolver(piece.gpa + start, n, fd, file_offset + total, to_file)
                total += got
                if got < n:
                    return total
            else:
                batch.append(piece[start:start + n])
                if len(batch) >= 512:   # IOV_MAX is 1024
                    if not flush():
                        return total
        flush()
        return total

    def read_from_file(self, fd: int, file_offset: int, offset: int, size: int) -> int:
        """File -> stream: pread ``size`` bytes into the stream at ``offset``."""
        return self._transfer(fd, file_offset, offset, size, to_file=False)

    def write_to_file(self, fd: int, file_offset: int, offset: int, size: int) -> int:
        """Stream -> file: pwrite ``size`` stream bytes at ``offset`` into ``fd``."""
        return self._transfer(fd, file_offset, offset, size, to_file=True)
