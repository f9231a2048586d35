"""What the FUSE server needs from the transport to serve DAX requests.

FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING (FUSE 7.31) ask the server to map file
ranges into the device's DAX window.  Over vhost-user the server cannot do it
itself: the window lives in the VMM, so the transport sends a map/unmap request
on the back-end request channel and waits for the VMM's ack
(``vhost.BackendChannelMapper``).  Tests use an in-process fake.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class DaxMapper(Protocol):
    """Maps file ranges into the DAX window; every method raises OSError on failure."""

    #: log2 of the alignment the window needs for file and window offsets
    #: (fuse_init_out.map_alignment); 12 = page granular.
    map_alignment: int

    def setup_mapping(self, fd: int, fd_offset: int, window_offset: int, length: int,
                      writable: bool) -> None:
        """Map ``length`` bytes of ``fd`` from ``fd_offset`` at ``window_offset``.

        ``fd`` stays the caller's (the mapping keeps its own reference to the file).
        A range that exactly matches an existing mapping replaces it (the guest's
        read -> write upgrade).
        """
        ...

    def remove_mapping(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Unmap each (window_offset, length) range; the window reads zeros there again."""
        ...
