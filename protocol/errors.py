"""The one error tree of the protocol package.

Every problem found in bytes or numbers that crossed a boundary (from the frontend
over the socket, or from the guest through its rings) is raised as a leaf of
``VhostUserError``. Each leaf carries the offending values as attributes and a
stable ``reason`` slug that the daemon uses as a metric label, so the set of
reasons is bounded and documented here, in one place.

``RemoteProtocolError`` means the peer (QEMU or the guest) broke the protocol;
``ConfigurationError`` means the peer is misconfigured in a way a user must fix;
``LocalProtocolError`` means our own code asked for something invalid (a bug).
After any of them the session is broken, except where ``keeps_connection`` is
true: then the daemon answers the request with a failure and carries on.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ConfigurationError",
    "DescriptorError",
    "FdCountError",
    "HeaderError",
    "LocalProtocolError",
    "MemoryTableError",
    "PayloadError",
    "QueueError",
    "RemoteProtocolError",
    "ReportError",
    "RingError",
    "StateError",
    "StatsError",
    "UnknownRequestError",
    "UnsupportedRequestError",
    "VhostUserError",
]


class VhostUserError(Exception):
    """Root of every error the protocol package raises on purpose."""

    #: Stable slug for metrics and logs; leaves override it.
    reason: str = "protocol_error"
    #: True when the connection goes on after the request is answered with a failure.
    keeps_connection: bool = False

    def __init__(self, message: str, *, reason: str | None = None, **values: object) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        #: The offending values, for structured logs.
        self.values: dict[str, object] = values
        #: File descriptors that arrived with the failed message. The caller owns them
        #: and must close them: the protocol package never holds an fd it did not hand out.
        self.fds: tuple[int, ...] = ()
        #: Whether the rejected message asked for a reply (REPLY_ACK), when known.
        self.need_reply = False
        #: The rejected message's request code as sent (it may be one we do not know),
        #: when known; the failure reply echoes it.
        self.request_code: int | None = None

    def __str__(self) -> str:
        return str(self.args[0])


class LocalProtocolError(VhostUserError):
    """Our side asked for something the protocol does not allow (a bug in the caller)."""

    reason = "local_error"


class RemoteProtocolError(VhostUserError):
    """The frontend or the guest sent something the protocol does not allow."""

    reason = "remote_error"


class ConfigurationError(RemoteProtocolError):
    """The frontend is set up in a way that cannot work; the message says what to change."""

    reason = "misconfigured"


class HeaderError(RemoteProtocolError):
    """A message header with a bad version, flag bits or payload size."""

    reason = "bad_header"


class UnknownRequestError(RemoteProtocolError):
    """A request code this implementation does not know. The payload was skipped."""

    reason = "unknown_request"
    keeps_connection = True


class UnsupportedRequestError(RemoteProtocolError):
    """A known request for a feature we never offered; answered with a failure."""

    reason = "unsupported_request"
    keeps_connection = True


class PayloadError(RemoteProtocolError):
    """A payload whose size or content does not fit its request."""

    reason = "bad_payload"


class FdCountError(RemoteProtocolError):
    """Too many, too few or unexpected file descriptors with a message."""

    reason = "bad_fds"


class StateError(RemoteProtocolError):
    """A request that is not allowed in the session's (or the queue's) current state."""

    reason = "bad_state"


class MemoryTableError(RemoteProtocolError):
    """A memory table with empty, overlapping, overflowing or too many regions."""

    reason = "bad_memory_table"


class QueueError(RemoteProtocolError):
    """A virtqueue index, size or ring address the frontend may not use."""

    reason = "bad_queue"


class AddressError(RemoteProtocolError):
    """An address range that does not lie wholly inside one guest memory region."""

    reason = "bad_address"


class RingError(RemoteProtocolError):
    """The guest's avail or used ring is inconsistent (index jumps, heads out of range)."""

    reason = "bad_ring"


class DescriptorError(RingError):
    """A descriptor chain that breaks the virtio rules (loops, bad next, bad indirect)."""

    reason = "bad_descriptor"


class ReportError(RemoteProtocolError):
    """A free page report whose entries are not whole, naturally aligned page blocks."""

    reason = "bad_report"


class StatsError(RemoteProtocolError):
    """A statistics buffer that is not whole (tag, value) entries inside guest RAM."""

    reason = "bad_stats"
