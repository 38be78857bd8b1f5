"""The backend side of one vhost-user connection, as a state machine without I/O.

Theory of operation. ``Session.handle`` takes one decoded ``Message`` and returns an
``Outcome``: the reply bytes and the effects the daemon must carry out. Two tables
decide what is allowed:

* ``SESSION_TRANSITIONS``: ``(state, request) -> next state`` for the connection as a
  whole. QEMU 11 sends GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
  SET_OWNER, then device requests; other frontends own the device first, so both
  orders lead to ACTIVE, where the device requests live.
* ``QUEUE_TRANSITIONS``: ``(queue state, request) -> next queue state`` for each vring.
  A ring's size, base and addresses are fixed while it is started.

A miss in either table is a ``StateError`` naming the state and the request. A known
request that needs a protocol feature we did not negotiate (or that no balloon
uses) is an ``UnsupportedRequestError``: recoverable, answered with a failure.

A ring starts when its kick fd arrives (vhost-user.rst "Starting and stopping rings")
and stops on GET_VRING_BASE, whose reply carries the next avail index. The daemon
must finish the work it took from a queue before it hands GET_VRING_BASE (or any
message that changes memory or queues) to the session, so that reply is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from .balloon import BalloonDevice, QueueRole, queue_layout
from .codes import MAX_QUEUES, ProtocolFeature, Request, VirtioFeature
from .effects import (
    AddRegion,
    Effect,
    EnableQueue,
    FdKind,
    Notice,
    Outcome,
    RemoveRegion,
    ResetDevice,
    SetBackendChannel,
    SetMemory,
    SetVringFd,
    StartQueue,
    StopQueue,
)
from .errors import (
    ConfigurationError,
    LocalProtocolError,
    MemoryTableError,
    PayloadError,
    QueueError,
    StateError,
    UnsupportedRequestError,
    VhostUserError,
)
from .memory import GuestMemory
from .messages import Message, encode_reply
from .payloads import (
    U64,
    Config,
    MemoryRegion,
    MemoryRegionMsg,
    MemoryTable,
    Payload,
    VringAddr,
    VringFile,
    VringState,
)
from .virtqueue import SplitQueue, check_queue_size

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "QUEUE_TRANSITIONS",
    "SESSION_TRANSITIONS",
    "STATE_VERSION",
    "QueueState",
    "Session",
    "SessionState",
    "Vring",
]

#: Version of the ``export_state`` format.
STATE_VERSION = 1
#: CONFIG (the guest reads the balloon config through us; without it the guest sees
#: num_pages = 0xffffffff) and REPLY_ACK (QEMU then waits for each fd message to land).
DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
)
#: Regions we accept with CONFIGURE_MEM_SLOTS: RAM blocks plus hot-plugged DIMMs;
#: each is one mapping and one fd held open for as long as the guest runs.
MAX_MEM_SLOTS = 32
#: vhost-user.rst SET_VRING_ADDR flags: bit 0, VHOST_VRING_F_LOG.
_VRING_ADDR_KNOWN_FLAGS = 1
#: Split rings keep a 16-bit avail index (virtio 1.2 2.7.6).
_MAX_VRING_BASE = 0xFFFF

CONFIG_MISSING_HELP = (
    "QEMU did not negotiate the vhost-user CONFIG protocol feature, so the guest would "
    "read num_pages=0xffffffff from a config space nobody serves and inflate the balloon "
    "over all its memory. Give the QEMU device config_size=16: "
    "-device vhost-user-test-device-pci,chardev=...,virtio-id=5,num_vqs=5,config_size=16"
)


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


_ANY_TIME = (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES)
#: Requests that configure and drive the device once the handshake is done.
_DEVICE_REQUESTS = (
    Request.SET_FEATURES,
    Request.SET_MEM_TABLE,
    Request.SET_VRING_NUM,
    Request.SET_VRING_ADDR,
    Request.SET_VRING_BASE,
    Request.GET_VRING_BASE,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_VRING_ENABLE,
    Request.GET_CONFIG,
    Request.SET_CONFIG,
    Request.GET_MAX_MEM_SLOTS,
    Request.ADD_MEM_REG,
    Request.REM_MEM_REG,
)

SESSION_TRANSITIONS: Final[dict[tuple[SessionState, Request], SessionState]] = {
    **{(s, r): s for s in SessionState for r in _ANY_TIME},
    (SessionState.CONNECTED, Request.SET_OWNER): SessionState.OWNED,
    (SessionState.NEGOTIATED, Request.SET_OWNER): SessionState.ACTIVE,
    (SessionState.CONNECTED, Request.SET_PROTOCOL_FEATURES): SessionState.NEGOTIATED,
    (SessionState.OWNED, Request.SET_PROTOCOL_FEATURES): SessionState.ACTIVE,
    **{(SessionState.ACTIVE, r): SessionState.ACTIVE for r in _DEVICE_REQUESTS},
    (SessionState.ACTIVE, Request.RESET_OWNER): SessionState.NEGOTIATED,
    # QEMU sets up the backend channel right after the protocol features, before SET_OWNER.
    (SessionState.NEGOTIATED, Request.SET_BACKEND_REQ_FD): SessionState.NEGOTIATED,
    (SessionState.ACTIVE, Request.SET_BACKEND_REQ_FD): SessionState.ACTIVE,
}

_IDLE, _STARTED = QueueState.IDLE, QueueState.STARTED
QUEUE_TRANSITIONS: Final[dict[tuple[QueueState, Request], QueueState]] = {
    (_IDLE, Request.SET_VRING_NUM): _IDLE,
    (_IDLE, Request.SET_VRING_BASE): _IDLE,
    (_IDLE, Request.SET_VRING_ADDR): _IDLE,
    (_IDLE, Request.SET_VRING_KICK): _STARTED,
    (_STARTED, Request.SET_VRING_KICK): _STARTED,
    (_IDLE, Request.GET_VRING_BASE): _IDLE,
    (_STARTED, Request.GET_VRING_BASE): _IDLE,
    **{
        (s, r): s
        for s in QueueState
        for r in (Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_VRING_ENABLE)
    },
}

#: Requests that only make sense with a protocol feature; we answer them only if it
#: was negotiated. Any request in neither table is one no balloon backend serves.
_NEEDS_FEATURE: Final[dict[Request, ProtocolFeature]] = {
    Request.GET_CONFIG: ProtocolFeature.CONFIG,
    Request.SET_CONFIG: ProtocolFeature.CONFIG,
    Request.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    Request.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
}


@dataclass(slots=True)
class Vring:
    """What the frontend told us about one queue."""

    index: int
    state: QueueState = QueueState.IDLE
    size: int | None = None
    base: int = 0
    addr: VringAddr | None = None
    enabled: bool = False
    queue: SplitQueue | None = None


class Session:
    """One connection's protocol state; ``handle`` one message at a time."""

    def __init__(
        self,
        device: BalloonDevice | None = None,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_queues: int = MAX_QUEUES,
    ) -> None:
        self.device = device if device is not None else BalloonDevice()
        self.offered_protocol_features = int(protocol_features)
        self.state = SessionState.CONNECTED
        self.features = 0
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.vrings = [Vring(i) for i in range(max_queues)]
        self.layout: tuple[QueueRole, ...] = queue_layout(0)
        self._handlers: dict[Request, Callable[[Message], Outcome]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._ack_only,
            Request.RESET_OWNER: self._reset,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_fd,
            Request.SET_VRING_ERR: self._set_vring_fd,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.SET_CONFIG: self._set_config,
        }

    # -- public ------------------------------------------------------------------
    def handle(self, msg: Message) -> Outcome:
        """Apply one message. Raises a ``VhostUserError`` leaf if it is not acceptable."""
        needed = _NEEDS_FEATURE.get(msg.request)
        if msg.request not in self._handlers or (
            needed is not None and not self.protocol_features & needed
        ):
            why = (
                f"needs protocol feature {needed.name}, which was not negotiated"
                if needed is not None
                else "is not used by a balloon backend"
            )
            raise UnsupportedRequestError(f"{msg.request.name} {why}", request=msg.request.name)
        next_state = SESSION_TRANSITIONS.get((self.state, msg.request))
        if next_state is None:
            allowed = sorted(r.name for (s, r) in SESSION_TRANSITIONS if s is self.state)
            raise StateError(
                f"{msg.request.name} is not allowed in session state {self.state.value} "
                f"(allowed: {', '.join(allowed)})",
                reason="unexpected_request",
                request=msg.request.name,
                state=self.state.value,
            )
        outcome = self._handlers[msg.request](msg)
        self.state = next_state
        return outcome

    # -- hand-over ---------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """What another process needs to go on serving this connection, as JSON-able
        values (the fds travel beside it: the connection, one per region in ``memory``
        order, and each vring's kick/call/err). The receiving side rebuilds the session
        with ``Session.restore`` and calls ``SplitQueue.resume_from_used`` on each
        started queue before serving it."""
        vrings = []
        for v in self.vrings:
            if v.size is None and v.addr is None and not v.enabled and v.base == 0:
                continue
            vrings.append({
                "index": v.index,
                "state": v.state.value,
                "size": v.size,
                "base": v.queue.last_avail_idx if v.queue is not None else v.base,
                "addr": None if v.addr is None else [
                    v.addr.flags, v.addr.desc_user_addr, v.addr.used_user_addr,
                    v.addr.avail_user_addr, v.addr.log_guest_addr],
                "enabled": v.enabled,
            })  # fmt: skip
        c = self.device.config
        return {
            "version": STATE_VERSION,
            "state": self.state.value,
            "features": self.features,
            "protocol_features": self.protocol_features,
            "offered_protocol_features": self.offered_protocol_features,
            "device_features": self.device.features,
            "config": [c.num_pages, c.actual, c.free_page_hint_cmd_id, c.poison_val],
            "memory": None if self.memory is None else [
                [r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset]
                for r in self.memory.regions],
            "queues": len(self.vrings),
            "vrings": vrings,
        }  # fmt: skip

    @classmethod
    def restore(cls, state: Mapping[str, Any]) -> Session:
        """A session in the state ``export_state`` described, every value checked again:
        the state crossed a process boundary."""
        u32, u64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
        try:
            if state["version"] != STATE_VERSION:
                raise ValueError(f"state version {state['version']!r}, expected {STATE_VERSION}")
            device = BalloonDevice(_whole(state["device_features"], u64))
            config = state["config"]
            if not isinstance(config, list) or len(config) != 4:
                raise ValueError(f"config {config!r} is not 4 numbers")
            (
                device.config.num_pages,
                device.config.actual,
                device.config.free_page_hint_cmd_id,
                device.config.poison_val,
            ) = (_whole(x, u32) for x in config)
            session = cls(
                device,
                protocol_features=_whole(state["offered_protocol_features"], u64),
                max_queues=_whole(state["queues"], MAX_QUEUES),
            )
            session.state = SessionState(state["state"])
            session.features = _whole(state["features"], u64)
            session.protocol_features = _whole(state["protocol_features"], u64)
            session.layout = queue_layout(session.features)
            if state["memory"] is not None:
                session.memory = GuestMemory(
                    [MemoryRegion(*(_whole(x, u64) for x in r)) for r in state["memory"]],
                    limit=MAX_MEM_SLOTS,
                )
            for item in state["vrings"]:
                v = session.vrings[_whole(item["index"], MAX_QUEUES - 1)]
                size = item["size"]
                v.size = None if size is None else check_queue_size(_whole(size, u32))
                v.base = _whole(item["base"], _MAX_VRING_BASE)
                v.enabled = item["enabled"] is True
                if item["addr"] is not None:
                    v.addr = VringAddr(v.index, *(_whole(x, u64) for x in item["addr"]))
                if QueueState(item["state"]) is QueueState.STARTED:
                    session._start(v)
        except VhostUserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise LocalProtocolError(f"cannot restore a session from this state: {err!r}") from err
        return session

    def queue_role(self, index: int) -> QueueRole | None:
        """What queue ``index`` is for under the negotiated features (``None``: none)."""
        return self.layout[index] if index < len(self.layout) else None

    def failure_reply(self, request: int, need_reply: bool) -> bytes | None:
        """The REPLY_ACK failure for a request we rejected but can carry on after."""
        return encode_reply(request, U64(1)) if need_reply else None

    @property
    def queue_roles(self) -> dict[int, QueueRole]:
        return dict(enumerate(self.layout))

    # -- helpers -----------------------------------------------------------------
    def _reply(self, msg: Message, payload: Payload) -> Outcome:
        return Outcome(encode_reply(msg.request, payload))

    def _ack(self, msg: Message, *effects: Effect) -> Outcome:
        # vhost-user.rst REPLY_ACK: a request without a reply of its own is answered
        # with u64 0 when the frontend set NEED_REPLY.
        reply = encode_reply(msg.request, U64(0)) if msg.need_reply else None
        return Outcome(reply, effects)

    def _ack_only(self, msg: Message) -> Outcome:
        return self._ack(msg)

    def _vring(self, msg: Message, index: int) -> Vring:
        if index >= len(self.vrings):
            raise QueueError(
                f"{msg.request.name} names queue {index}; this backend has "
                f"{len(self.vrings)} queues (0 to {len(self.vrings) - 1})",
                reason="bad_queue_index",
                request=msg.request.name,
                index=index,
                limit=len(self.vrings),
            )
        vring = self.vrings[index]
        next_state = QUEUE_TRANSITIONS.get((vring.state, msg.request))
        if next_state is None:
            raise StateError(
                f"{msg.request.name} is not allowed on queue {index} while it is "
                f"{vring.state.value}",
                reason="unexpected_queue_request",
                request=msg.request.name,
                index=index,
                state=vring.state.value,
            )
        return vring

    def _started(self) -> list[Vring]:
        return [v for v in self.vrings if v.state is QueueState.STARTED]

    def _stop(self, vring: Vring) -> list[Effect]:
        if vring.queue is not None:
            vring.base = vring.queue.last_avail_idx
        vring.state = QueueState.IDLE
        vring.queue = None
        return [
            StopQueue(vring.index),
            SetVringFd(vring.index, FdKind.KICK, None),
            SetVringFd(vring.index, FdKind.CALL, None),
        ]

    def _recheck_rings(self, memory: GuestMemory | None) -> None:
        for v in self._started():
            assert v.queue is not None
            if memory is None:
                raise MemoryTableError(
                    f"memory was removed under started queue {v.index}",
                    reason="memory_in_use",
                    index=v.index,
                )
            v.queue.check_layout(memory)

    # -- negotiation --------------------------------------------------------------
    def _get_features(self, msg: Message) -> Outcome:
        return self._reply(msg, U64(self.device.features))

    def _set_features(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, U64)
        value = msg.payload.value
        extra = value & ~self.device.features
        if extra:
            raise PayloadError(
                f"SET_FEATURES acks bits {extra:#x} that were never offered "
                f"(offered {self.device.features:#x})",
                reason="unoffered_features",
                features=value,
                offered=self.device.features,
            )
        if self._started():
            raise StateError(
                "SET_FEATURES while queues are started",
                reason="features_while_running",
                started=[v.index for v in self._started()],
            )
        self.features = value
        self.layout = queue_layout(value)
        return self._ack(msg)

    def _get_protocol_features(self, msg: Message) -> Outcome:
        return self._reply(msg, U64(self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, U64)
        value = msg.payload.value
        extra = value & ~self.offered_protocol_features
        if extra:
            raise PayloadError(
                f"SET_PROTOCOL_FEATURES acks bits {extra:#x} that were never offered "
                f"(offered {self.offered_protocol_features:#x})",
                reason="unoffered_protocol_features",
                features=value,
                offered=self.offered_protocol_features,
            )
        if not value & ProtocolFeature.CONFIG:
            raise ConfigurationError(
                CONFIG_MISSING_HELP, reason="config_not_negotiated", protocol_features=value
            )
        self.protocol_features = value
        return self._ack(msg)

    def _reset(self, msg: Message) -> Outcome:
        effects: list[Effect] = []
        for v in self._started():
            effects += self._stop(v)
        self.memory = None
        self.features = 0
        self.layout = queue_layout(0)
        self.vrings = [Vring(i) for i in range(len(self.vrings))]
        effects.append(ResetDevice())
        return self._ack(msg, *effects)

    # -- memory ------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, MemoryTable)
        memory = GuestMemory(msg.payload.regions)
        self._recheck_rings(memory)
        self.memory = memory
        return self._ack(msg, SetMemory(memory, msg.fds))

    def _get_max_mem_slots(self, msg: Message) -> Outcome:
        return self._reply(msg, U64(MAX_MEM_SLOTS))

    def _add_mem_reg(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, MemoryRegionMsg)
        region = msg.payload.region
        existing = self.memory.regions if self.memory is not None else ()
        memory = GuestMemory((*existing, region), limit=MAX_MEM_SLOTS)
        self.memory = memory
        return self._ack(msg, AddRegion(region, msg.fds[0], memory))

    def _rem_mem_reg(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, MemoryRegionMsg)
        gone = msg.payload.region
        existing = self.memory.regions if self.memory is not None else ()
        # QEMU identifies the region by guest address, size and user address.
        match = [
            r
            for r in existing
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr)
            == (gone.guest_phys_addr, gone.memory_size, gone.userspace_addr)
        ]
        if not match:
            raise MemoryTableError(
                f"REM_MEM_REG names region {gone.guest_phys_addr:#x}+{gone.memory_size:#x}, "
                "which is not mapped",
                reason="no_such_region",
                gpa=gone.guest_phys_addr,
                size=gone.memory_size,
            )
        rest = tuple(r for r in existing if r is not match[0])
        memory = GuestMemory(rest, limit=MAX_MEM_SLOTS) if rest else None
        self._recheck_rings(memory)
        self.memory = memory
        return self._ack(msg, RemoveRegion(match[0], memory))

    # -- vrings ------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg, msg.payload.index)
        vring.size = check_queue_size(msg.payload.num)
        return self._ack(msg)

    def _set_vring_base(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg, msg.payload.index)
        if msg.payload.num > _MAX_VRING_BASE:
            raise QueueError(
                f"SET_VRING_BASE {msg.payload.num:#x} on queue {vring.index} does not fit "
                "a split ring's 16-bit index",
                reason="bad_vring_base",
                index=vring.index,
                base=msg.payload.num,
            )
        vring.base = msg.payload.num
        return self._ack(msg)

    def _set_vring_addr(self, msg: Message) -> Outcome:
        addr = msg.payload
        assert isinstance(addr, VringAddr)
        vring = self._vring(msg, addr.index)
        if self.memory is None:
            raise StateError(
                f"SET_VRING_ADDR for queue {vring.index} before any memory table",
                reason="ring_before_memory",
                index=vring.index,
            )
        if addr.flags & ~_VRING_ADDR_KNOWN_FLAGS:
            raise PayloadError(
                f"SET_VRING_ADDR flags {addr.flags:#x} set unknown bits",
                reason="bad_vring_addr_flags",
                flags=addr.flags,
            )
        # Checks alignment now; the extents are checked at start, when the size is known.
        SplitQueue(1, addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        vring.addr = addr
        return self._ack(msg)

    def _get_vring_base(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg, msg.payload.index)
        effects = self._stop(vring) if vring.state is QueueState.STARTED else []
        reply = encode_reply(msg.request, VringState(vring.index, vring.base))
        return Outcome(reply, tuple(effects))

    def _vring_file(self, msg: Message) -> tuple[Vring, int | None]:
        assert isinstance(msg.payload, VringFile)
        vring = self._vring(msg, msg.payload.index)
        return vring, (None if msg.payload.nofd else msg.fds[0])

    def _set_vring_fd(self, msg: Message) -> Outcome:
        vring, fd = self._vring_file(msg)
        kind = FdKind.CALL if msg.request is Request.SET_VRING_CALL else FdKind.ERR
        return self._ack(msg, SetVringFd(vring.index, kind, fd))

    def _set_vring_kick(self, msg: Message) -> Outcome:
        vring, fd = self._vring_file(msg)
        if fd is None:
            raise UnsupportedRequestError(
                f"SET_VRING_KICK without an fd asks queue {vring.index} to be polled; "
                "this backend only serves kick eventfds",
                request=msg.request.name,
                index=vring.index,
            )
        effects: list[Effect] = [SetVringFd(vring.index, FdKind.KICK, fd)]
        if vring.state is QueueState.IDLE:
            effects += self._start(vring)
        return self._ack(msg, *effects)

    def _start(self, vring: Vring) -> list[Effect]:
        missing = [
            what
            for what, absent in (
                ("SET_VRING_NUM", vring.size is None),
                ("SET_VRING_ADDR", vring.addr is None),
                ("SET_MEM_TABLE", self.memory is None),
            )
            if absent
        ]
        if missing:
            raise StateError(
                f"queue {vring.index} was kicked before {', '.join(missing)}",
                reason="kick_before_setup",
                index=vring.index,
                missing=missing,
            )
        assert vring.size is not None and vring.addr is not None and self.memory is not None
        queue = SplitQueue(
            vring.size,
            vring.addr.desc_user_addr,
            vring.addr.avail_user_addr,
            vring.addr.used_user_addr,
            last_avail_idx=vring.base,
            indirect=bool(self.features & VirtioFeature.RING_INDIRECT_DESC),
            event_idx=bool(self.features & VirtioFeature.RING_EVENT_IDX),
        )
        queue.check_layout(self.memory)
        vring.queue = queue
        vring.state = QueueState.STARTED
        role = self.queue_role(vring.index)
        effects: list[Effect] = [StartQueue(vring.index, role, queue)]
        if role is None:
            effects.append(
                Notice(
                    "queue_outside_layout",
                    f"the guest started queue {vring.index}, but the negotiated features "
                    f"{self.features:#x} give only {len(self.layout)} queues "
                    f"({', '.join(r.value for r in self.layout)}); the queue is ignored",
                )
            )
        if vring.enabled:
            effects.append(EnableQueue(vring.index, True))
        return effects

    def _set_vring_enable(self, msg: Message) -> Outcome:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg, msg.payload.index)
        if msg.payload.num not in (0, 1):
            raise PayloadError(
                f"SET_VRING_ENABLE {msg.payload.num} on queue {vring.index}; only 0 and 1 "
                "are defined",
                reason="bad_vring_enable",
                index=vring.index,
                value=msg.payload.num,
            )
        vring.enabled = bool(msg.payload.num)
        return self._ack(msg, EnableQueue(vring.index, vring.enabled))

    # -- backend channel -----------------------------------------------------------
    def _set_backend_req_fd(self, msg: Message) -> Outcome:
        return self._ack(msg, SetBackendChannel(msg.fds[0]))

    # -- config ------------------------------------------------------------------
    def _get_config(self, msg: Message) -> Outcome:
        cfg = msg.payload
        assert isinstance(cfg, Config)
        data = self.device.read_config(cfg.offset, cfg.size)
        return self._reply(msg, Config(cfg.offset, cfg.size, cfg.flags, data))

    def _set_config(self, msg: Message) -> Outcome:
        cfg = msg.payload
        assert isinstance(cfg, Config)
        self.device.write_config(cfg.offset, cfg.data)
        return self._ack(msg)


def _whole(value: object, most: int) -> int:
    """A saved number: an int (not a bool, not a float) from 0 to ``most``."""
    if type(value) is not int or not 0 <= value <= most:
        raise ValueError(f"{value!r} is not a whole number from 0 to {most:#x}")
    return value
