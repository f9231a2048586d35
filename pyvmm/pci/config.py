"""PCI configuration space of one function (PCI Local Bus Spec 3.0, 6.1-6.8).

256 bytes with three masks that say what the guest may do to each bit:
``writable`` bits take the written value, ``w1c`` bits are cleared by
writing 1 (status register errors), everything else is read-only.  BARs are
writable only in their address bits above the BAR's size, which makes the
sizing protocol (write all ones, read back ~(size-1) | flags) fall out of
the masks.  Capabilities are linked from offset 0x34 in the order added.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..snapshot.fields import blob, expect_keys

CONFIG_SPACE_SIZE = 256

# Type 0 header offsets (6.1)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_NUM_BARS = 6

# Command register bits (6.2.2)
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
COMMAND_WRITABLE = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                    | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)

# Status register bits (6.2.3)
PCI_STATUS_CAP_LIST = 0x10
PCI_STATUS_W1C = 0xF900  # parity/abort/SERR error bits, cleared by writing 1

# BAR flag bits (6.2.5.1)
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

PCI_HEADER_TYPE_NORMAL = 0
CAP_START = 0x40

# What names a function; a snapshot of another function is refused by these first.
IDENTITY_FIELDS = (("vendor id", PCI_VENDOR_ID, 2), ("device id", PCI_DEVICE_ID, 2),
                   ("class code", PCI_CLASS_PROG, 3), ("revision", PCI_REVISION_ID, 1),
                   ("header type", PCI_HEADER_TYPE, 1),
                   ("subsystem vendor id", PCI_SUBSYSTEM_VENDOR_ID, 2),
                   ("subsystem id", PCI_SUBSYSTEM_ID, 2))


@dataclass(frozen=True)
class BarInfo:
    index: int
    size: int              # power of two, >= 16 (memory) / 4 (I/O)
    is64: bool = False
    prefetchable: bool = False
    io: bool = False

    @property
    def flags(self) -> int:
        if self.io:
            return PCI_BASE_ADDRESS_SPACE_IO
        return ((PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is64 else 0)
                | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0))


class PciConfigSpace:
    """Bytes plus masks; ``read``/``write`` take any offset and size 1/2/4."""

    def __init__(self, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 header_type: int = PCI_HEADER_TYPE_NORMAL) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.writable = bytearray(CONFIG_SPACE_SIZE)
        self.w1c = bytearray(CONFIG_SPACE_SIZE)
        self.bars: dict[int, BarInfo] = {}
        self._next_cap = CAP_START
        self._last_cap_next: int | None = None
        self.set_u16(PCI_VENDOR_ID, vendor_id)
        self.set_u16(PCI_DEVICE_ID, device_id)
        self.data[PCI_REVISION_ID] = revision
        self.data[PCI_CLASS_PROG] = class_code & 0xFF
        self.data[PCI_CLASS_DEVICE] = (class_code >> 8) & 0xFF
        self.data[PCI_CLASS_DEVICE + 1] = (class_code >> 16) & 0xFF
        self.data[PCI_HEADER_TYPE] = header_type
        self.set_u16(PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(PCI_SUBSYSTEM_ID, subsystem_id)
        self._set_mask(self.writable, PCI_COMMAND, COMMAND_WRITABLE, 2)
        self._set_mask(self.w1c, PCI_STATUS, PCI_STATUS_W1C, 2)
        self.writable[PCI_CACHE_LINE_SIZE] = 0xFF
        self.writable[PCI_LATENCY_TIMER] = 0xFF
        self.writable[PCI_INTERRUPT_LINE] = 0xFF

    # --- raw helpers (device side, no masks) -------------------------------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, value: int, size: int) -> None:
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_u16(self, offset: int, value: int) -> None:
        self.set(offset, value, 2)

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, value: int, size: int) -> None:
        mask[offset:offset + size] = value.to_bytes(size, "little")

    # --- BARs ---------------------------------------------------------------------------
    def add_bar(self, bar: BarInfo) -> None:
        if bar.size & (bar.size - 1) or bar.size < (4 if bar.io else 16):
            raise ValueError(f"BAR{bar.index}: size {bar.size:#x} is not a power of two >= 16")
        limit = PCI_NUM_BARS - (2 if bar.is64 else 1)
        lower_is_64 = (bar.index - 1) in self.bars and self.bars[bar.index - 1].is64
        upper_taken = bar.is64 and (bar.index + 1) in self.bars
        if not 0 <= bar.index <= limit or bar.index in self.bars or lower_is_64 or upper_taken:
            raise ValueError(f"BAR{bar.index} cannot be added here")
        off = PCI_BASE_ADDRESS_0 + 4 * bar.index
        self.bars[bar.index] = bar
        self.set(off, bar.flags, 4)
        address_mask = ~(bar.size - 1)
        flag_bits = 0x3 if bar.io else 0xF
        self._set_mask(self.writable, off, address_mask & 0xFFFFFFFF & ~flag_bits, 4)
        if bar.is64:
            self._set_mask(self.writable, off + 4, (address_mask >> 32) & 0xFFFFFFFF, 4)

    def bar_address(self, index: int) -> int:
        """The address the guest (or firmware) programmed into BAR ``index``."""
        bar = self.bars[index]
        off = PCI_BASE_ADDRESS_0 + 4 * index
        low = self.get(off, 4) & ~(0x3 if bar.io else 0xF)
        high = self.get(off + 4, 4) if bar.is64 else 0
        return (high << 32) | low

    def set_bar_address(self, index: int, address: int) -> None:
        bar = self.bars[index]
        off = PCI_BASE_ADDRESS_0 + 4 * index
        self.set(off, (address & 0xFFFFFFFF) | bar.flags, 4)
        if bar.is64:
            self.set(off + 4, address >> 32, 4)

    def bar_mid_sizing(self, index: int) -> bool:
        """True while a dword of the BAR holds the all-ones sizing pattern."""
        off = PCI_BASE_ADDRESS_0 + 4 * index
        for dword in ((off, off + 4) if self.bars[index].is64 else (off,)):
            mask = int.from_bytes(self.writable[dword:dword + 4], "little")
            if mask and self.get(dword, 4) & mask == mask:
                return True
        return False

    def bar_for_offset(self, offset: int) -> int | None:
        """Which BAR a config-space offset belongs to (either dword of a 64-bit BAR)."""
        if not PCI_BASE_ADDRESS_0 <= offset < PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS:
            return None
        index = (offset - PCI_BASE_ADDRESS_0) // 4
        if index in self.bars:
            return index
        if index - 1 in self.bars and self.bars[index - 1].is64:
            return index - 1
        return None

    # --- capabilities (6.7) ---------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (id, next, body...); returns its offset."""
        length = 2 + len(body)
        offset = self._next_cap
        if offset + length > CONFIG_SPACE_SIZE:
            raise ValueError("PCI capabilities do not fit in config space")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2:offset + length] = body
        if writable:
            self.writable[offset + 2:offset + 2 + len(writable)] = writable
        if self._last_cap_next is None:
            self.data[PCI_CAPABILITY_LIST] = offset
            self.set_u16(PCI_STATUS, self.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        else:
            self.data[self._last_cap_next] = offset
        self._last_cap_next = offset + 1
        self._next_cap = (offset + length + 3) & ~3
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(id, offset) of each capability, walked as a driver walks them."""
        caps = []
        seen = set()
        ptr = self.data[PCI_CAPABILITY_LIST] & ~3
        while ptr and ptr not in seen and ptr + 2 <= CONFIG_SPACE_SIZE:
            seen.add(ptr)
            caps.append((self.data[ptr], ptr))
            ptr = self.data[ptr + 1] & ~3
        return caps

    # --- guest accesses --------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size not in (1, 2, 4) or offset + size > CONFIG_SPACE_SIZE:
            return b"\xff" * max(size, 0)
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write through the masks (bytes outside the space are ignored)."""
        for i, value in enumerate(data):
            pos = offset + i
            if not 0 <= pos < CONFIG_SPACE_SIZE:
                continue
            wmask, cmask = self.writable[pos], self.w1c[pos]
            old = self.data[pos]
            self.data[pos] = ((old & ~wmask) | (value & wmask)) & ~(value & cmask) & 0xFF

    # --- snapshot --------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The 256 bytes.  The masks, BARs and capability layout come from construction."""
        return {"data": bytes(self.data).hex()}

    def parse_state(self, state: object, path: str) -> bytes:
        """The saved bytes, checked against this function: no read-only bit may differ
        from what construction put there (ids, class, BAR flags, capabilities)."""
        expect_keys(state, ("data",), path)
        data = blob(state["data"], f"{path}.data", CONFIG_SPACE_SIZE)
        for name, offset, size in IDENTITY_FIELDS:
            saved, here = int.from_bytes(data[offset:offset + size], "little"), self.get(offset, size)
            if saved != here:
                raise ValueError(f"{path}.data: {name} {saved:#0{2 + 2 * size}x} in the snapshot, "
                                 f"{here:#0{2 + 2 * size}x} here: not the same device")
        for pos in range(CONFIG_SPACE_SIZE):
            fixed = ~(self.writable[pos] | self.w1c[pos]) & 0xFF
            if (data[pos] ^ self.data[pos]) & fixed:
                raise ValueError(f"{path}.data: byte {pos:#04x} is {data[pos]:#04x}, its read-only "
                                 f"bits {fixed:#04x} must be as in {self.data[pos]:#04x}")
        return data

    def apply_state(self, data: bytes) -> None:
        self.data[:] = data

    def restore_state(self, state: dict, path: str = "pci config") -> None:
        self.apply_state(self.parse_state(state, path))
