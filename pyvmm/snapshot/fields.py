"""Reading saved state back: the checks every ``restore_state`` shares.

A snapshot file is untrusted input.  Each helper here takes one value of a
JSON-decoded dict, checks its type and range, and returns it as the Python
value the caller needs, or raises ``ValueError`` naming the field by its
``path`` ("pci.slots[3].queues[0].size: expected ...").

The conventions of saved state (``kvm_state`` and every device model):

* register values, addresses, feature words and bit sets are hex strings
  ("0x1f"), read with ``hex_int``;
* counts, indexes, sizes, vector and slot numbers are plain JSON integers,
  read with ``uint``;
* byte strings are hex blobs ("801f0000"), read with ``blob``;
* dicts have exactly the keys the writer put there (``expect_keys``), lists
  have a bounded length (``items``).

Every length is checked before anything is allocated from it.  A device that
cannot be saved in its present state raises ``SaveRefused``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

HEX_RE = re.compile(r"-?0x[0-9a-fA-F]+\Z")
BLOB_RE = re.compile(r"[0-9a-fA-F]*\Z")


class SaveRefused(RuntimeError):
    """A device cannot be saved as it is (not quiesced, a DAX mapping, ...)."""


def describe(value: object) -> str:
    """A short description of a bad value for an error message."""
    if isinstance(value, (list, dict)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def expect_keys(data: object, keys: Iterable[str], path: str) -> dict:
    """``data`` is a dict with exactly ``keys``; returns it."""
    keys = list(keys)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object, got {describe(data)}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    unknown = sorted(str(k) for k in data if k not in keys)
    if unknown:
        raise ValueError(f"{path}: unknown {', '.join(unknown)}")
    return data


def hex_int(value: object, path: str, size: int = 8, signed: bool = False) -> int:
    """A hex string ("0x1f", "-0x1" when ``signed``) that fits in ``size`` bytes."""
    if not isinstance(value, str) or not HEX_RE.match(value):
        raise ValueError(f"{path}: expected a hex string like \"0x1f\", got {describe(value)}")
    n = int(value, 16)
    low, high = (-(1 << (8 * size - 1)), 1 << (8 * size - 1)) if signed else (0, 1 << (8 * size))
    if not low <= n < high:
        raise ValueError(f"{path}: {value} does not fit in {size} byte(s)")
    return n


def hex_bits(value: object, path: str, allowed: int, size: int = 1) -> int:
    """A hex bit set with no bit outside ``allowed``."""
    n = hex_int(value, path, size)
    if n & ~allowed:
        raise ValueError(f"{path}: bits {n & ~allowed:#x} of {value} are not defined here")
    return n


def integer(value: object, path: str, minimum: int, maximum: int) -> int:
    """A plain JSON integer in [minimum, maximum] (a bool is not an integer here)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path}: expected an integer, got {describe(value)}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{path}: {value} is not in {minimum}..{maximum}")
    return value


def uint(value: object, path: str, maximum: int) -> int:
    """A plain JSON integer in [0, maximum]."""
    return integer(value, path, 0, maximum)


def boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{path}: expected true or false, got {describe(value)}")
    return value


def text(value: object, path: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise ValueError(f"{path}: expected a string of at most {max_len} characters, "
                         f"got {describe(value)}")
    return value


def blob(value: object, path: str, size: int | None = None, max_size: int | None = None) -> bytes:
    """A hex blob of exactly ``size`` bytes, or of at most ``max_size``."""
    if not isinstance(value, str) or not BLOB_RE.match(value) or len(value) % 2:
        raise ValueError(f"{path}: expected a string of hex bytes, got {describe(value)}")
    n = len(value) // 2
    if size is not None and n != size:
        raise ValueError(f"{path}: expected {size} bytes, got {n}")
    if max_size is not None and n > max_size:
        raise ValueError(f"{path}: {n} bytes, at most {max_size} may be saved")
    return bytes.fromhex(value)


def items(value: object, path: str, max_len: int) -> list:
    """A JSON list of at most ``max_len`` items (the caller checks each one)."""
    if not isinstance(value, list) or len(value) > max_len:
        raise ValueError(f"{path}: expected a list of at most {max_len} items, got {describe(value)}")
    return value


def index_set(value: object, path: str, limit: int) -> frozenset[int]:
    """A sorted list of distinct integers below ``limit``."""
    got = [uint(v, f"{path}[{i}]", limit - 1) for i, v in enumerate(items(value, path, limit))]
    if got != sorted(set(got)):
        raise ValueError(f"{path}: expected distinct numbers in increasing order, got {got}")
    return frozenset(got)


def optional(parse: Callable[[object, str], Any], value: object, path: str) -> Any:
    """None for JSON null, else ``parse(value, path)``."""
    return None if value is None else parse(value, path)
