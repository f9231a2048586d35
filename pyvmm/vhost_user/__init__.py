"""vhost-user: the protocol (``protocol``) and the VMM's front-end (``frontend``).

See docs/vhost-user-dax.md sections 1-2 for the protocol facts and
``frontend`` for the connection life cycle.
"""

from .frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    DEFAULT_TIMEOUT,
    BackendError,
    BackendGone,
    BackendTimeout,
    BackendUnavailable,
    FeatureNotNegotiated,
    MemoryRegion,
    RingAddressError,
    VhostUserError,
    VhostUserFrontend,
    guest_memory_regions,
    serve_backend_requests,
)
from .protocol import Channel, Message, PeerClosed, ProtocolError, decode, encode, recv_message, send_message

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES", "DEFAULT_TIMEOUT", "BackendError", "BackendGone", "BackendTimeout",
    "BackendUnavailable", "Channel", "FeatureNotNegotiated", "MemoryRegion", "Message", "PeerClosed",
    "ProtocolError", "RingAddressError", "VhostUserError", "VhostUserFrontend", "decode", "encode",
    "guest_memory_regions", "recv_message", "send_message", "serve_backend_requests",
]
