"""Test doubles shared by the virtio device model tests."""

from __future__ import annotations


class FakeQueue:
    """What a device sees of a Virtqueue: pop / push / should_interrupt."""

    def __init__(self) -> None:
        self.items: list = []          # DescriptorChain, or an exception pop() raises
        self.used: list[tuple[int, int]] = []

    def add(self, item) -> None:
        self.items.append(item)

    def pop(self):
        if not self.items:
            return None
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def push(self, head: int, written: int) -> None:
        self.used.append((head, written))

    def should_interrupt(self) -> bool:
        return True
