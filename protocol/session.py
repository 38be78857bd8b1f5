"""The backend side of one vhost-user connection, as a state machine without I/O.

Theory of operation. ``Session.handle`` takes one decoded ``Message`` and returns an
``Outcome``: the reply bytes and the effects the daemon must carry out. What is
allowed when comes from the request's entry in ``REQUESTS`` (requests.py): the
session states it may arrive in and the state after it, the queue states it may
find its queue in, and the protocol feature it needs. A request in the wrong state
is a ``StateError`` naming the state and what was allowed. A known request that
needs a protocol feature we did not negotiate (or that no balloon uses) is an
``UnsupportedRequestError``: answered with a failure, and the connection goes on.

A ring starts when its kick fd arrives (vhost-user.rst "Starting and stopping rings")
and stops on GET_VRING_BASE, whose reply carries the next avail index. The daemon
must finish the work it took from a queue before it hands GET_VRING_BASE (or any
message that changes memory or queues) to the session, so that reply is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .balloon import (
    CONFIG_SIZE,
    BalloonConfig,
    BalloonDevice,
    QueueRole,
    qemu_device_option,
    queue_layout,
)
from .codes import MAX_QUEUES, ProtocolFeature, Request, VirtioFeature
from .effects import (
    AddRegion,
    BalloonChanged,
    Effect,
    EnableQueue,
    FdKind,
    FeaturesSet,
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
    MemoryTableError,
    PayloadError,
    QueueError,
    StateError,
    UnsupportedRequestError,
)
from .memory import GuestMemory
from .messages import Message, encode_reply
from .payloads import (
    U64,
    Config,
    MemoryRegionMsg,
    MemoryTable,
    Payload,
    VringAddr,
    VringFile,
    VringState,
)
from .requests import REQUESTS, QueueState, SessionState
from .saved import SavedSession, SavedVring
from .virtqueue import RingLayout, SplitQueue, check_queue_size

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "Session",
    "Vring",
]

#: CONFIG (the guest reads the balloon config through us; without it the guest sees
#: num_pages = 0xffffffff), REPLY_ACK (QEMU then waits for each fd message to land),
#: BACKEND_REQ (config-change notices), CONFIGURE_MEM_SLOTS (regions come and go one
#: at a time with ADD_MEM_REG / REM_MEM_REG, and more than SET_MEM_TABLE's 8 fit) and
#: MQ (GET_QUEUE_NUM: without it crosvm gives the device only 2 queues, no reporting).
DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.CONFIG
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.MQ
)
#: Regions we accept with CONFIGURE_MEM_SLOTS (our GET_MAX_MEM_SLOTS answer). QEMU
#: refuses a vhost backend with fewer than 509 slots once a memory device (virtio-mem
#: with dynamic-memslots=on) has sized itself by the slots there are; 509 is the most
#: it ever plans with. Each region is one mapping and one fd while it is mapped.
MAX_MEM_SLOTS = 509
#: vhost-user.rst SET_VRING_ADDR flags: bit 0, VHOST_VRING_F_LOG.
_VRING_ADDR_KNOWN_FLAGS = 1
#: Split rings keep a 16-bit avail index (virtio 1.2 2.7.6).
_MAX_VRING_BASE = 0xFFFF

CONFIG_MISSING_HELP = (
    "QEMU did not negotiate the vhost-user CONFIG protocol feature, so the guest would "
    "read num_pages=0xffffffff from a config space nobody serves and inflate the balloon "
    f"over all its memory. Give the QEMU device config_size={CONFIG_SIZE}: "
    f"-device {qemu_device_option(chardev='...')}"
)


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

    # -- public ------------------------------------------------------------------
    def handle(self, msg: Message) -> Outcome:
        """Apply one message. Raises a ``VhostUserError`` leaf if it is not acceptable."""
        spec = REQUESTS[msg.request]
        needed = spec.feature
        if spec.handler is None or (needed is not None and not self.protocol_features & needed):
            why = (
                f"needs protocol feature {needed.name}, which was not negotiated"
                if needed is not None
                else "is not used by a balloon backend"
            )
            raise UnsupportedRequestError(f"{msg.request.name} {why}", request=msg.request.name)
        next_state = spec.session.get(self.state)
        if next_state is None:
            allowed = sorted(r.name for r, s in REQUESTS.items() if self.state in s.session)
            raise StateError(
                f"{msg.request.name} is not allowed in session state {self.state.value} "
                f"(allowed: {', '.join(allowed)})",
                reason="unexpected_request",
                request=msg.request.name,
                state=self.state.value,
            )
        handler: Callable[[Message], Outcome] = getattr(self, spec.handler)
        outcome = handler(msg)
        self.state = next_state
        return outcome

    # -- hand-over ---------------------------------------------------------------
    def export_state(self) -> SavedSession:
        """What another process needs to go on serving this connection (the fds travel
        beside it). The receiving side rebuilds the session with ``Session.restore``
        and calls ``SplitQueue.resume_from_used`` on each started queue before
        serving it."""
        c = self.device.config
        return SavedSession(
            state=self.state,
            features=self.features,
            protocol_features=self.protocol_features,
            offered_protocol_features=self.offered_protocol_features,
            device_features=self.device.features,
            config=BalloonConfig(c.num_pages, c.actual, c.free_page_hint_cmd_id, c.poison_val),
            memory=None if self.memory is None else tuple(self.memory.regions),
            queues=len(self.vrings),
            vrings=tuple(
                SavedVring(
                    index=v.index,
                    state=v.state,
                    size=v.size,
                    base=v.queue.last_avail_idx if v.queue is not None else v.base,
                    addr=v.addr,
                    enabled=v.enabled,
                )
                for v in self.vrings
                if not (v.size is None and v.addr is None and not v.enabled and v.base == 0)
            ),
        )

    @classmethod
    def restore(cls, saved: SavedSession) -> Session:
        """A session in the state ``export_state`` described. The record may come from
        another process (``SavedSession.from_json`` checked its numbers); everything
        that depends on them together is checked again here (memory table, ring sizes
        and layouts)."""
        device = BalloonDevice(saved.device_features)
        device.config = BalloonConfig(
            saved.config.num_pages,
            saved.config.actual,
            saved.config.free_page_hint_cmd_id,
            saved.config.poison_val,
        )
        session = cls(
            device,
            protocol_features=saved.offered_protocol_features,
            max_queues=saved.queues,
        )
        session.state = saved.state
        session.features = saved.features
        session.protocol_features = saved.protocol_features
        session.layout = queue_layout(saved.features)
        if saved.memory is not None:
            session.memory = GuestMemory(saved.memory, limit=MAX_MEM_SLOTS)
        for item in saved.vrings:
            if item.index >= len(session.vrings):
                raise QueueError(
                    f"saved queue {item.index} does not exist on a device of "
                    f"{len(session.vrings)} queues",
                    reason="bad_queue_index",
                    index=item.index,
                    limit=len(session.vrings),
                )
            v = session.vrings[item.index]
            v.size = None if item.size is None else check_queue_size(item.size)
            v.base = item.base
            v.enabled = item.enabled
            v.addr = item.addr
            if item.state is QueueState.STARTED:
                session._start(v)
        return session

    def queue_role(self, index: int) -> QueueRole | None:
        """What queue ``index`` is for under the negotiated features (``None``: none)."""
        return self.layout[index] if index < len(self.layout) else None

    def failure_reply(self, request: int, need_reply: bool) -> bytes | None:
        """The REPLY_ACK failure for a request we rejected but can carry on after."""
        return encode_reply(request, U64(1)) if need_reply else None

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
        allowed = REQUESTS[msg.request].queue
        if allowed is None or vring.state not in allowed:
            raise StateError(
                f"{msg.request.name} is not allowed on queue {index} while it is "
                f"{vring.state.value}",
                reason="unexpected_queue_request",
                request=msg.request.name,
                index=index,
                state=vring.state.value,
            )
        return vring

    def _features_set(self) -> FeaturesSet:
        return FeaturesSet(self.features & ~VirtioFeature.PROTOCOL_FEATURES)

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
        value = _offered(msg, self.device.features, "unoffered_features")
        if self._started():
            raise StateError(
                "SET_FEATURES while queues are started",
                reason="features_while_running",
                started=[v.index for v in self._started()],
            )
        self.features = value
        self.layout = queue_layout(value)
        return self._ack(msg, self._features_set())

    def _get_queue_num(self, msg: Message) -> Outcome:
        # Every queue a balloon can have (the offered features use the first ones,
        # balloon.py): crosvm makes the device with this many queues, and Cloud
        # Hypervisor refuses a device given more queue sizes than this.
        return self._reply(msg, U64(len(QueueRole)))

    def _get_protocol_features(self, msg: Message) -> Outcome:
        return self._reply(msg, U64(self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> Outcome:
        value = _offered(msg, self.offered_protocol_features, "unoffered_protocol_features")
        if not value & ProtocolFeature.CONFIG:
            raise ConfigurationError(
                CONFIG_MISSING_HELP, reason="config_not_negotiated", protocol_features=value
            )
        effects = self._new_device() if self.state is SessionState.ACTIVE else []
        self.protocol_features = value
        return self._ack(msg, *effects)

    def _new_device(self) -> list[Effect]:
        """A new device on a connection that served one: QEMU unrealized the old one
        (``device_del``, which stops its queues and closes its backend channel) and
        realized another on the same chardev (``device_add``), whose handshake starts
        here. Nothing of the old device is kept but the balloon target: the new guest
        driver reads it at probe, and its balloon starts empty."""
        if self._started():
            raise StateError(
                "SET_PROTOCOL_FEATURES while queues are started: a new handshake on a "
                "connection whose device is still running",
                reason="handshake_while_running",
                started=[v.index for v in self._started()],
            )
        self._forget_device()
        self.device.config.actual = 0
        return [
            ResetDevice(new_device=True),
            self._features_set(),
            BalloonChanged(self.device.config.num_pages, 0),
        ]

    def _reset(self, msg: Message) -> Outcome:
        effects: list[Effect] = []
        for v in self._started():
            effects += self._stop(v)
        self._forget_device()
        effects += [ResetDevice(), self._features_set()]
        return self._ack(msg, *effects)

    def _forget_device(self) -> None:
        """What a reset and a new device both start from: no memory, no features, no
        queue set up (the balloon's config stays)."""
        self.memory = None
        self.features = 0
        self.layout = queue_layout(0)
        self.vrings = [Vring(i) for i in range(len(self.vrings))]

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
        RingLayout(1, addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
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
        addr = vring.addr
        layout = RingLayout(
            vring.size, addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr
        )
        queue = SplitQueue(
            layout,
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
        config = self.device.config
        return self._ack(msg, BalloonChanged(config.num_pages, config.actual))


def _offered(msg: Message, offered: int, reason: str) -> int:
    """The feature bits a SET_FEATURES or SET_PROTOCOL_FEATURES acks, all of them
    offered (a bit never offered is a ``PayloadError``)."""
    assert isinstance(msg.payload, U64)
    value = msg.payload.value
    extra = value & ~offered
    if extra:
        raise PayloadError(
            f"{msg.request.name} acks bits {extra:#x} that were never offered "
            f"(offered {offered:#x})",
            reason=reason,
            features=value,
            offered=offered,
        )
    return value
