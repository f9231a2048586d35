"""A sparse fake guest RAM for the boot-code tests (loaders, tables)."""

from __future__ import annotations

from pyvmm.boot.e820 import ram_ranges

PAGE = 4096


class FakeMemory:
    """Sparse guest RAM: a bytearray per touched page, writes bounds-checked
    against the guest-physical RAM ranges (so no 64 MiB buffers per test)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ranges = [(gpa, gpa + n) for gpa, n, _ in ram_ranges(size)]
        self.pages: dict[int, bytearray] = {}

    def _check(self, gpa: int, size: int) -> None:
        if not any(lo <= gpa and gpa + size <= hi for lo, hi in self.ranges):
            raise AssertionError(f"access outside guest RAM: {size} bytes at {gpa:#x}")

    def _chunks(self, gpa: int, size: int):
        """(page, offset in page, offset in the access, length) pieces."""
        done = 0
        while done < size:
            page, offset = divmod(gpa + done, PAGE)
            length = min(PAGE - offset, size - done)
            yield page, offset, done, length
            done += length

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        for page, offset, start, length in self._chunks(gpa, len(data)):
            buf = self.pages.setdefault(page, bytearray(PAGE))
            buf[offset:offset + length] = data[start:start + length]

    def read(self, gpa: int, size: int) -> bytes:
        self._check(gpa, size)
        out = bytearray(size)
        for page, offset, start, length in self._chunks(gpa, size):
            if page in self.pages:
                out[start:start + length] = self.pages[page][offset:offset + length]
        return bytes(out)
