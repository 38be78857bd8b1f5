"""Every front-end request, described once: how it is framed, when it is allowed,
which handler serves it and what the daemon must do around it.

Theory of operation. ``REQUESTS`` is the only table of request rules. The codec
(messages.py) reads ``payload`` and ``fds``; the session (session.py) reads
``handler``, ``feature``, ``session`` and ``queue``; the daemon reads ``ring_lock``
and ``saved``. Adding a request is one entry here plus its handler method on
``Session`` (a test checks that every named handler exists).

The session states follow the handshake: QEMU 11 sends GET_FEATURES,
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, then SET_OWNER; other frontends own
the device first, so both orders lead to ACTIVE, where the device requests live.
A ring's size, base and addresses are fixed while it is started (vhost-user.rst
"Starting and stopping rings"); the handlers move a queue between IDLE and STARTED.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Final

from .codes import ProtocolFeature, Request
from .payloads import (
    U64,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    LogArea,
    MemoryRegionMsg,
    MemoryTable,
    Payload,
    Raw,
    SharedObject,
    VringAddr,
    VringFile,
    VringState,
)

__all__ = ["REQUESTS", "QueueState", "RequestSpec", "SessionState"]


class SessionState(Enum):
    """Where the connection is in the handshake."""

    CONNECTED = "connected"  #: nothing negotiated yet
    OWNED = "owned"  #: SET_OWNER seen, protocol features not yet
    NEGOTIATED = "negotiated"  #: protocol features set, no owner yet
    ACTIVE = "active"  #: both: device requests are allowed


class QueueState(Enum):
    """Whether a vring is being served."""

    IDLE = "idle"
    STARTED = "started"


_NEVER: Final[Mapping[SessionState, SessionState]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """Everything about one request. The defaults describe a request no balloon serves."""

    #: payload type (its ``SIZE``, or ``None`` for a variable size, is the size rule)
    payload: type[Payload]
    #: ``(min, max)`` fds; ``None``: the payload decides (one per memory region; a vring
    #: fd message carries none when its no-fd bit is set)
    fds: tuple[int, int] | None = (0, 0)
    #: name of the ``Session`` method that serves it; ``None``: refused as unsupported,
    #: and the connection goes on
    handler: str | None = None
    #: session state it is allowed in -> the state after it
    session: Mapping[SessionState, SessionState] = field(default_factory=lambda: _NEVER)
    #: queue states it is allowed in, for a request that names a queue
    queue: frozenset[QueueState] | None = None
    #: protocol feature that must have been negotiated first
    feature: ProtocolFeature | None = None
    #: touches memory or rings: waits until no queue is in the middle of a chain.
    #: False only for requests a vCPU may be waiting on that touch neither.
    ring_lock: bool = True
    #: changes what a hand-over saves (False: after it only the owed reply is saved)
    saved: bool = True


def _stay(*states: SessionState) -> Mapping[SessionState, SessionState]:
    return MappingProxyType({s: s for s in states})


_S = SessionState
_ANY_TIME: Final = _stay(*SessionState)
_ACTIVE: Final = _stay(_S.ACTIVE)
_IDLE: Final = frozenset({QueueState.IDLE})
_EITHER: Final = frozenset(QueueState)


def _device(  # noqa: PLR0913 - one keyword per field of RequestSpec, for the table below
    handler: str,
    payload: type[Payload],
    *,
    fds: tuple[int, int] | None = (0, 0),
    queue: frozenset[QueueState] | None = None,
    feature: ProtocolFeature | None = None,
    ring_lock: bool = True,
    saved: bool = True,
) -> RequestSpec:
    """A device request: allowed once the handshake is done."""
    return RequestSpec(payload, fds, handler, _ACTIVE, queue, feature, ring_lock, saved)


#: The rules of every front-end request (vhost-user.rst "Front-end message types").
REQUESTS: Final[Mapping[Request, RequestSpec]] = MappingProxyType({
    Request.GET_FEATURES: RequestSpec(
        Empty, handler="_get_features", session=_ANY_TIME, ring_lock=False, saved=False),
    Request.GET_PROTOCOL_FEATURES: RequestSpec(
        Empty, handler="_get_protocol_features", session=_ANY_TIME, ring_lock=False,
        saved=False),
    # In ACTIVE: a new device realized on this connection starts the handshake again.
    Request.SET_PROTOCOL_FEATURES: RequestSpec(
        U64, handler="_set_protocol_features",
        session=MappingProxyType(
            {_S.CONNECTED: _S.NEGOTIATED, _S.OWNED: _S.ACTIVE, _S.ACTIVE: _S.NEGOTIATED})),
    Request.SET_OWNER: RequestSpec(
        Empty, handler="_ack_only",
        session=MappingProxyType({_S.CONNECTED: _S.OWNED, _S.NEGOTIATED: _S.ACTIVE})),
    Request.RESET_OWNER: RequestSpec(
        Empty, handler="_reset", session=MappingProxyType({_S.ACTIVE: _S.NEGOTIATED})),
    # QEMU sets up the backend channel right after the protocol features, before SET_OWNER.
    Request.SET_BACKEND_REQ_FD: RequestSpec(
        Empty, (1, 1), handler="_set_backend_req_fd", session=_stay(_S.NEGOTIATED, _S.ACTIVE),
        feature=ProtocolFeature.BACKEND_REQ),
    # Asked right after the protocol features, before SET_OWNER, by frontends that
    # negotiated MQ (crosvm sizes the device by it).
    Request.GET_QUEUE_NUM: RequestSpec(
        Empty, handler="_get_queue_num", session=_stay(_S.NEGOTIATED, _S.ACTIVE),
        feature=ProtocolFeature.MQ, ring_lock=False, saved=False),
    Request.SET_FEATURES: _device("_set_features", U64),
    Request.SET_MEM_TABLE: _device("_set_mem_table", MemoryTable, fds=None),
    # QEMU asks right after the protocol features, before SET_OWNER (measured, 11.1).
    Request.GET_MAX_MEM_SLOTS: RequestSpec(
        Empty, handler="_get_max_mem_slots", session=_stay(_S.NEGOTIATED, _S.ACTIVE),
        feature=ProtocolFeature.CONFIGURE_MEM_SLOTS, ring_lock=False, saved=False),
    Request.ADD_MEM_REG: _device(
        "_add_mem_reg", MemoryRegionMsg, fds=(1, 1),
        feature=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    # QEMU may attach the region's fd to a removal; it is not used (libvhost-user closes it).
    Request.REM_MEM_REG: _device(
        "_rem_mem_reg", MemoryRegionMsg, fds=(0, 1),
        feature=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    Request.SET_VRING_NUM: _device("_set_vring_num", VringState, queue=_IDLE),
    Request.SET_VRING_BASE: _device("_set_vring_base", VringState, queue=_IDLE),
    Request.SET_VRING_ADDR: _device("_set_vring_addr", VringAddr, queue=_IDLE),
    Request.GET_VRING_BASE: _device("_get_vring_base", VringState, queue=_EITHER),
    Request.SET_VRING_KICK: _device("_set_vring_kick", VringFile, fds=None, queue=_EITHER),
    Request.SET_VRING_CALL: _device("_set_vring_fd", VringFile, fds=None, queue=_EITHER),
    Request.SET_VRING_ERR: _device("_set_vring_fd", VringFile, fds=None, queue=_EITHER),
    Request.SET_VRING_ENABLE: _device("_set_vring_enable", VringState, queue=_EITHER),
    # A vCPU waits on each config access: never behind a discard in progress.
    Request.GET_CONFIG: _device(
        "_get_config", Config, feature=ProtocolFeature.CONFIG, ring_lock=False, saved=False),
    Request.SET_CONFIG: _device(
        "_set_config", Config, feature=ProtocolFeature.CONFIG, ring_lock=False),
    # Known, framed and refused: no balloon backend uses them.
    Request.SET_LOG_BASE: RequestSpec(LogArea, (1, 1)),
    Request.SET_LOG_FD: RequestSpec(Empty, (1, 1)),
    Request.SEND_RARP: RequestSpec(U64),
    Request.NET_SET_MTU: RequestSpec(U64),
    Request.IOTLB_MSG: RequestSpec(IotlbMsg),
    Request.SET_VRING_ENDIAN: RequestSpec(VringState),
    Request.CREATE_CRYPTO_SESSION: RequestSpec(Raw),
    Request.CLOSE_CRYPTO_SESSION: RequestSpec(U64),
    Request.POSTCOPY_ADVISE: RequestSpec(Empty),
    Request.POSTCOPY_LISTEN: RequestSpec(Empty),
    Request.POSTCOPY_END: RequestSpec(Empty),
    Request.GET_INFLIGHT_FD: RequestSpec(Inflight),
    Request.SET_INFLIGHT_FD: RequestSpec(Inflight, (1, 1)),
    Request.GPU_SET_SOCKET: RequestSpec(Empty, (1, 1)),
    Request.RESET_DEVICE: RequestSpec(Empty),
    Request.VRING_KICK: RequestSpec(VringState),
    Request.SET_STATUS: RequestSpec(U64),
    Request.GET_STATUS: RequestSpec(Empty),
    Request.GET_SHARED_OBJECT: RequestSpec(SharedObject),
    Request.SET_DEVICE_STATE_FD: RequestSpec(DeviceStateTransfer, (1, 1)),
    Request.CHECK_DEVICE_STATE: RequestSpec(Empty),
})  # fmt: skip
