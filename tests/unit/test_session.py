"""The session state machine, driven by QEMU 11.1.3's real handshakes and by bad peers."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes import DriverRing, GuestRam
from tests.golden import load_capture
from vhost_user_balloon.protocol import (
    DEFAULT_PROTOCOL_FEATURES,
    REQUESTS,
    U64,
    BalloonChanged,
    BalloonFeature,
    Config,
    ConfigurationError,
    Effect,
    Empty,
    EnableQueue,
    FdKind,
    FeaturesSet,
    LocalProtocolError,
    MemoryRegion,
    MemoryRegionMsg,
    MemoryTable,
    MemoryTableError,
    Message,
    MessageDecoder,
    Notice,
    PayloadError,
    ProtocolFeature,
    QueueError,
    QueueRole,
    Request,
    ResetDevice,
    SavedSession,
    Session,
    SessionState,
    SetMemory,
    SetVringFd,
    StartQueue,
    StateError,
    StopQueue,
    UnsupportedRequestError,
    VhostUserError,
    VirtioFeature,
    VringAddr,
    VringFile,
    VringState,
    encode_reply,
)
from vhost_user_balloon.protocol.effects import AddRegion, RemoveRegion


def replay(
    name: str, session: Session | None = None
) -> tuple[Session, list[Effect], list[tuple[str, bytes | None]]]:
    session = session or Session()
    effects: list[Effect] = []
    replies: list[tuple[str, bytes | None]] = []
    fd = 100
    for record in load_capture(name):
        dec = MessageDecoder()
        dec.feed(record.raw, tuple(range(fd, fd + record.nfds)))
        fd += record.nfds
        msg = dec.next_message()
        assert msg is not None
        out = session.handle(msg)
        assert out.kept_fds() == set(msg.fds), record.name  # every fd is handed on
        effects.extend(out.effects)
        replies.append((record.name, out.reply))
    return session, effects, replies


def started(effects: list[Effect]) -> dict[int, QueueRole | None]:
    return {e.index: e.role for e in effects if isinstance(e, StartQueue)}


@pytest.mark.parametrize(
    ("capture", "reporting_index", "roles"),
    [
        ("qemu-11.1.3-reporting-only-6.12.jsonl", 2,
         {0: QueueRole.INFLATE, 1: QueueRole.DEFLATE, 2: QueueRole.REPORTING}),
        ("qemu-11.1.3-reporting-stats-6.1.jsonl", 3,
         {0: QueueRole.INFLATE, 1: QueueRole.DEFLATE, 2: QueueRole.STATS,
          3: QueueRole.REPORTING}),
    ],
)  # fmt: skip
def test_qemu_handshake_starts_reporting_at_the_dense_index(
    capture: str, reporting_index: int, roles: dict[int, QueueRole]
) -> None:
    records = load_capture(capture)
    # Stop before the poweroff so the queues are still running.
    cut = next(i for i, r in enumerate(records) if r.name == "GET_CONFIG") + 1
    session = Session()
    effects: list[Effect] = []
    fd = 100
    for r in records[:cut]:
        dec = MessageDecoder()
        dec.feed(r.raw, tuple(range(fd, fd + r.nfds)))
        fd += r.nfds
        msg = dec.next_message()
        assert msg is not None
        effects += session.handle(msg).effects
    assert session.state is SessionState.ACTIVE
    assert started(effects) == roles
    assert session.layout.index(QueueRole.REPORTING) == reporting_index
    v = session.vrings[reporting_index]
    assert v.queue is not None and v.enabled and v.queue.size == 64
    assert not [e for e in effects if isinstance(e, Notice)]


def test_full_capture_replies_and_poweroff() -> None:
    session, effects, replies = replay("qemu-11.1.3-reporting-stats-6.1.jsonl")
    device_features = session.device.features
    by_name = {}
    for name, reply in replies:
        by_name.setdefault(name, []).append(reply)
    assert by_name["GET_FEATURES"][0] == encode_reply(Request.GET_FEATURES, U64(device_features))
    assert by_name["GET_PROTOCOL_FEATURES"][0] == encode_reply(
        Request.GET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES)
    )
    # NEED_REPLY messages are acked with 0, the others get no reply.
    assert set(by_name["SET_VRING_CALL"]) == {encode_reply(Request.SET_VRING_CALL, U64(0))}
    assert set(by_name["SET_VRING_NUM"]) == {None}
    assert by_name["GET_CONFIG"][0] == encode_reply(Request.GET_CONFIG, Config(0, 16, 0, bytes(16)))
    # Poweroff: every started queue stops and its base comes back.
    stops = [e.index for e in effects if isinstance(e, StopQueue)]
    assert stops == [0, 1, 2, 3]
    bases = by_name["GET_VRING_BASE"]
    assert all(b is not None and len(b) == 20 for b in bases)
    assert session.features == 0x1_4000_0022


def test_driver_reload_restarts_with_a_new_memory_table() -> None:
    _, effects, _ = replay("qemu-11.1.3-driver-reload-6.1.jsonl")
    assert sum(isinstance(e, SetMemory) for e in effects) == 2
    assert [e.index for e in effects if isinstance(e, StartQueue)] == [0, 1, 2, 3] * 2


def test_two_regions_second_with_mmap_offset() -> None:
    _, effects, _ = replay("qemu-11.1.3-two-regions-4g-6.1.jsonl")
    mem = next(e for e in effects if isinstance(e, SetMemory))
    assert len(mem.fds) == 2
    assert mem.memory.regions[1].mmap_offset == 0x8000_0000
    assert mem.memory.locate_gpa(0x1_0000_0000, 4096).file_offset == 0x8000_0000


def test_poison_value_arrives_before_features() -> None:
    session, _, _ = replay("qemu-11.1.3-poison-init-on-free-6.12.jsonl")
    assert session.device.config.poison_val == 0 and session.device.discard_allowed
    assert session.features & BalloonFeature.PAGE_POISON


def test_config_size_0_is_refused_with_an_actionable_error() -> None:
    with pytest.raises(ConfigurationError) as err:
        replay("qemu-11.1.3-config-size-0-6.1.jsonl")
    assert "config_size=16" in str(err.value)
    assert err.value.reason == "config_not_negotiated"


# -- hand-made sequences ------------------------------------------------------------------
def msg(
    request: Request, payload: object = None, fds: tuple[int, ...] = (), need_reply: bool = True
) -> Message:
    return Message(request, 1 | (8 if need_reply else 0), payload or Empty(), fds)  # type: ignore[arg-type]


REGION = MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
UVA = REGION.userspace_addr


def active(features: int = 0x1_4000_0022, protocol: int = 0x208) -> Session:
    s = Session(protocol_features=0x208 | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    s.handle(msg(Request.SET_PROTOCOL_FEATURES, U64(protocol)))
    s.handle(msg(Request.SET_OWNER))
    s.handle(msg(Request.SET_FEATURES, U64(features)))
    return s


def with_memory(s: Session) -> Session:
    s.handle(msg(Request.SET_MEM_TABLE, MemoryTable((REGION,)), (50,)))
    return s


def ring(index: int, desc: int = 0x1000, avail: int = 0x1400, used: int = 0x1500) -> Message:
    return msg(Request.SET_VRING_ADDR, VringAddr(index, 0, UVA + desc, UVA + used, UVA + avail, 0))


def start(s: Session, index: int, size: int = 64) -> list[Effect]:
    s.handle(msg(Request.SET_VRING_NUM, VringState(index, size)))
    s.handle(ring(index))
    return list(
        s.handle(msg(Request.SET_VRING_KICK, VringFile(index, False), (60 + index,))).effects
    )


def test_owner_first_order_also_works() -> None:
    s = Session()
    s.handle(msg(Request.SET_OWNER))
    assert s.state is SessionState.OWNED
    s.handle(msg(Request.SET_PROTOCOL_FEATURES, U64(0x208)))
    assert s.state is SessionState.ACTIVE


def test_device_request_before_handshake_names_state_and_request() -> None:
    with pytest.raises(StateError) as err:
        Session().handle(msg(Request.SET_MEM_TABLE, MemoryTable((REGION,)), (5,)))
    assert "SET_MEM_TABLE" in str(err.value) and "connected" in str(err.value)


def test_unoffered_features_are_refused() -> None:
    s = active()
    with pytest.raises(PayloadError) as err:
        s.handle(msg(Request.SET_FEATURES, U64(1 << 3)))
    assert err.value.reason == "unoffered_features"
    with pytest.raises(PayloadError):
        Session().handle(msg(Request.SET_PROTOCOL_FEATURES, U64(1 << 1 | 0x208)))  # LOG_SHMFD


def test_unsupported_and_unnegotiated_requests_keep_the_connection() -> None:
    s = active()
    with pytest.raises(UnsupportedRequestError) as err:
        s.handle(msg(Request.GET_QUEUE_NUM))
    assert err.value.keeps_connection
    plain = Session()
    plain.handle(msg(Request.SET_PROTOCOL_FEATURES, U64(0x208)))
    plain.handle(msg(Request.SET_OWNER))
    with pytest.raises(UnsupportedRequestError, match="CONFIGURE_MEM_SLOTS"):
        plain.handle(msg(Request.GET_MAX_MEM_SLOTS))
    assert s.failure_reply(Request.GET_QUEUE_NUM, True) == encode_reply(17, U64(1))
    assert s.failure_reply(Request.GET_QUEUE_NUM, False) is None


def test_ring_before_memory_and_kick_before_setup() -> None:
    s = active()
    with pytest.raises(StateError) as err:
        s.handle(ring(0))
    assert err.value.reason == "ring_before_memory"
    with_memory(s)
    with pytest.raises(StateError) as err2:
        s.handle(msg(Request.SET_VRING_KICK, VringFile(0, False), (7,)))
    assert err2.value.reason == "kick_before_setup"
    assert "SET_VRING_NUM" in str(err2.value)


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_bad_queue_sizes(size: int) -> None:
    with pytest.raises(QueueError) as err:
        active().handle(msg(Request.SET_VRING_NUM, VringState(0, size)))
    assert err.value.reason == "bad_queue_size"


def test_queue_index_out_of_range() -> None:
    with pytest.raises(QueueError) as err:
        active().handle(msg(Request.SET_VRING_CALL, VringFile(200, False), (8,)))
    assert err.value.reason == "bad_queue_index"


def test_misaligned_and_outside_rings() -> None:
    s = with_memory(active())
    with pytest.raises(QueueError) as err:
        s.handle(ring(0, desc=0x1008))
    assert err.value.reason == "misaligned_ring"
    s.handle(msg(Request.SET_VRING_NUM, VringState(0, 64)))
    s.handle(ring(0, used=(1 << 20) - 8))
    with pytest.raises(QueueError) as err2:
        s.handle(msg(Request.SET_VRING_KICK, VringFile(0, False), (9,)))
    assert err2.value.reason == "ring_outside_memory"
    with pytest.raises(PayloadError):
        s.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 2, UVA, UVA, UVA, 0)))


def test_started_ring_cannot_be_resized_and_stops_on_get_base() -> None:
    s = with_memory(active())
    effects = start(s, 3)
    assert StartQueue(3, QueueRole.REPORTING, s.vrings[3].queue) in effects  # type: ignore[arg-type]
    with pytest.raises(StateError) as err:
        s.handle(msg(Request.SET_VRING_NUM, VringState(3, 32)))
    assert "started" in str(err.value)
    # A second kick only swaps the fd.
    again = s.handle(msg(Request.SET_VRING_KICK, VringFile(3, False), (90,))).effects
    assert again == (SetVringFd(3, FdKind.KICK, 90),)
    q = s.vrings[3].queue
    assert q is not None
    q.last_avail_idx = 7
    out = s.handle(msg(Request.GET_VRING_BASE, VringState(3, 0)))
    assert out.reply == encode_reply(Request.GET_VRING_BASE, VringState(3, 7))
    assert StopQueue(3) in out.effects
    assert SetVringFd(3, FdKind.KICK, None) in out.effects


def test_enable_before_kick_is_replayed_at_start_and_bad_values_refused() -> None:
    s = with_memory(active())
    s.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1)))
    assert EnableQueue(0, True) in start(s, 0)
    with pytest.raises(PayloadError):
        s.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 2)))


def test_queue_outside_layout_is_noticed() -> None:
    s = with_memory(active(features=0x1_4000_0020))  # REPORTING only: 3 queues
    effects = start(s, 4)
    assert any(isinstance(e, Notice) and e.event == "queue_outside_layout" for e in effects)
    assert StartQueue(4, None, s.vrings[4].queue) in effects  # type: ignore[arg-type]


def test_vring_base_must_fit_16_bits_and_kick_needs_an_fd() -> None:
    s = with_memory(active())
    with pytest.raises(QueueError):
        s.handle(msg(Request.SET_VRING_BASE, VringState(0, 1 << 16)))
    with pytest.raises(UnsupportedRequestError, match="polled"):
        s.handle(msg(Request.SET_VRING_KICK, VringFile(0, True)))
    out = s.handle(msg(Request.SET_VRING_CALL, VringFile(0, True)))
    assert out.effects == (SetVringFd(0, FdKind.CALL, None),)


def test_features_cannot_change_while_running() -> None:
    s = with_memory(active())
    start(s, 0)
    with pytest.raises(StateError):
        s.handle(msg(Request.SET_FEATURES, U64(0x1_4000_0022)))


def test_memory_table_errors_and_rechecks() -> None:
    s = active()
    overlapping = MemoryTable((REGION, MemoryRegion(0x800, 4096, 0x7F10_0000_0000, 0)))
    with pytest.raises(MemoryTableError) as err:
        s.handle(msg(Request.SET_MEM_TABLE, overlapping, (1, 2)))
    assert err.value.reason == "region_overlap"
    with_memory(s)
    start(s, 0)
    moved = MemoryRegion(0, 1 << 20, 0x7E00_0000_0000, 0)
    with pytest.raises(QueueError):  # the started ring no longer maps
        s.handle(msg(Request.SET_MEM_TABLE, MemoryTable((moved,)), (3,)))


def test_add_and_remove_regions() -> None:
    s = active(protocol=0x208 | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    # 509: fewer and QEMU refuses the backend beside virtio-mem with dynamic-memslots=on
    assert s.handle(msg(Request.GET_MAX_MEM_SLOTS)).reply == encode_reply(36, U64(509))
    out = s.handle(msg(Request.ADD_MEM_REG, MemoryRegionMsg(REGION), (11,)))
    assert out.effects[0] == AddRegion(REGION, 11, s.memory)  # type: ignore[arg-type]
    second = MemoryRegion(1 << 20, 1 << 20, UVA + (1 << 20), 0)
    s.handle(msg(Request.ADD_MEM_REG, MemoryRegionMsg(second), (12,)))
    assert s.memory is not None and len(s.memory.regions) == 2
    out = s.handle(msg(Request.REM_MEM_REG, MemoryRegionMsg(second), (13,)))
    assert out.effects == (RemoveRegion(second, s.memory),)
    assert out.kept_fds() == frozenset()  # the removal's fd is for the daemon to close
    with pytest.raises(MemoryTableError):
        s.handle(msg(Request.REM_MEM_REG, MemoryRegionMsg(second)))
    start(s, 0)
    with pytest.raises(MemoryTableError) as err:
        s.handle(msg(Request.REM_MEM_REG, MemoryRegionMsg(REGION)))
    assert err.value.reason == "memory_in_use"


def test_config_space_reads_and_driver_writes() -> None:
    s = active()
    s.device.config.num_pages = 0x1234
    out = s.handle(msg(Request.GET_CONFIG, Config(0, 16, 0, bytes(16)), need_reply=False))
    assert out.reply is not None and out.reply[12 + 12 : 12 + 16] == struct.pack("<I", 0x1234)
    s.handle(msg(Request.SET_CONFIG, Config(0, 16, 0, struct.pack("<IIII", 9, 5, 9, 0xAA))))
    assert s.device.config.num_pages == 0x1234  # not the driver's to write
    assert s.device.config.actual == 5 and s.device.config.poison_val == 0xAA
    assert not s.device.discard_allowed
    with pytest.raises(PayloadError) as err:
        s.handle(msg(Request.GET_CONFIG, Config(8, 16, 0, bytes(16))))
    assert "config_size=16" in str(err.value)


def test_reset_owner_drops_everything() -> None:
    s = with_memory(active())
    start(s, 0)
    out = s.handle(msg(Request.RESET_OWNER))
    assert StopQueue(0) in out.effects and ResetDevice() in out.effects
    assert s.memory is None and s.state is SessionState.NEGOTIATED


def test_a_new_device_on_the_same_connection_is_a_fresh_session() -> None:
    # device_del stops the queues (GET_VRING_BASE); device_add on the same chardev
    # starts the handshake again. The balloon target stays; the new balloon is empty.
    s = with_memory(active())
    start(s, 3)
    s.device.config.num_pages, s.device.config.actual = 4096, 4096
    with pytest.raises(StateError) as err:
        s.handle(msg(Request.SET_PROTOCOL_FEATURES, U64(0x208)))
    assert err.value.reason == "handshake_while_running"
    s.handle(msg(Request.GET_VRING_BASE, VringState(3, 0)))
    out = s.handle(msg(Request.SET_PROTOCOL_FEATURES, U64(0x208)))
    assert out.effects == (
        ResetDevice(new_device=True), FeaturesSet(0), BalloonChanged(4096, 0))  # fmt: skip
    assert s.state is SessionState.NEGOTIATED and s.memory is None and s.features == 0
    assert all(v.size is None and v.addr is None for v in s.vrings)
    s.handle(msg(Request.SET_OWNER))
    s.handle(msg(Request.SET_FEATURES, U64(0x1_4000_0022)))
    with_memory(s)
    effects = start(s, 3)
    assert StartQueue(3, QueueRole.REPORTING, s.vrings[3].queue) in effects  # type: ignore[arg-type]
    assert s.device.config.num_pages == 4096


def test_layout_follows_features() -> None:
    s = active(features=int(VirtioFeature.VERSION_1 | BalloonFeature.REPORTING))
    assert s.layout == (QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.REPORTING)


# -- anything at all ----------------------------------------------------------------------
SESSION_REQUESTS = sorted(REQUESTS)


@pytest.mark.fuzz
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(SESSION_REQUESTS),
            st.booleans(),
            st.one_of(
                st.binary(max_size=80),
                st.builds(
                    lambda i, n: struct.pack("=II", i, n),
                    st.integers(0, 20),
                    st.sampled_from([0, 1, 2, 3, 64, 256, 1 << 15, 1 << 16]),
                ),
                st.builds(lambda v: struct.pack("=Q", v), st.integers(0, (1 << 64) - 1)),
            ),
            st.integers(0, 3),
        ),
        max_size=40,
    ),
    prefix=st.booleans(),
)
def test_any_message_sequence_gives_effects_or_typed_errors(
    steps: list[tuple[Request, bool, bytes, int]], prefix: bool
) -> None:
    """After any sequence of messages, in any state, the session either accepts a message
    or raises a typed error; it never raises anything else, and every fd it keeps
    came with the message that handed it over."""
    session = Session(protocol_features=0x208 | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    if prefix:  # start from a real handshake with memory, so deeper states are reached
        for name in ("SET_PROTOCOL_FEATURES", "SET_OWNER", "SET_FEATURES", "SET_MEM_TABLE"):
            r = next(
                r for r in load_capture("qemu-11.1.3-reporting-stats-6.1.jsonl") if r.name == name
            )
            dec = MessageDecoder()
            dec.feed(r.raw, tuple(range(500, 500 + r.nfds)))
            m = dec.next_message()
            assert m is not None
            session.handle(m)
    fd = 1000
    for request, need_reply, body, nfds in steps:
        dec = MessageDecoder()
        flags = 1 | (8 if need_reply else 0)
        fds = tuple(range(fd, fd + nfds))
        fd += nfds
        dec.feed(struct.pack("=III", request, flags, len(body)) + body, fds)
        try:
            m = dec.next_message()
            assert m is not None
            out = session.handle(m)
        except VhostUserError:
            continue
        assert out.kept_fds() <= set(fds)
        if m.need_reply or request in (Request.GET_FEATURES, Request.GET_VRING_BASE):
            assert out.reply is not None


# -- hand-over to another process (restart without QEMU noticing, issue 9) ---------------
def started_session() -> Session:
    records = load_capture("qemu-11.1.3-reporting-stats-6.1.jsonl")
    cut = next(i for i, r in enumerate(records) if r.name == "GET_CONFIG") + 1
    session = Session()
    for r in records[:cut]:
        dec = MessageDecoder()
        dec.feed(r.raw, tuple(range(100, 100 + r.nfds)))
        m = dec.next_message()
        assert m is not None
        session.handle(m)
    return session


def test_exported_state_restores_the_same_session() -> None:
    session = started_session()
    session.device.config.poison_val = 0
    q = session.vrings[3].queue
    assert q is not None
    q.last_avail_idx = 42
    # crosses a process boundary
    state = json.loads(json.dumps(session.export_state().to_json()))
    restored = Session.restore(SavedSession.from_json(state))
    assert restored.export_state() == session.export_state()
    assert restored.state is SessionState.ACTIVE and restored.features == 0x1_4000_0022
    assert [v.index for v in restored.vrings if v.queue is not None] == [0, 1, 2, 3]
    out = restored.handle(msg(Request.GET_VRING_BASE, VringState(3, 0)))
    assert out.reply == encode_reply(Request.GET_VRING_BASE, VringState(3, 42))
    # and the restored session goes on: QEMU's next driver start works as usual
    assert restored.handle(msg(Request.SET_VRING_NUM, VringState(3, 64))).reply is not None


def test_a_chain_taken_but_not_completed_is_taken_again_after_a_restore() -> None:
    ram = GuestRam.flat(4 << 20)
    drv = DriverRing(ram, 0x1000, 64, index=3)
    s = active()
    s.handle(msg(Request.SET_MEM_TABLE, MemoryTable(ram.memory_regions()), (50,)))
    s.handle(msg(Request.SET_VRING_NUM, VringState(3, 64)))
    s.handle(msg(Request.SET_VRING_ADDR, drv.vring_addr()))
    s.handle(msg(Request.SET_VRING_KICK, VringFile(3, False), (61,)))
    mem = ram.guest_memory()
    saved = s.export_state()  # saved at set-up; the ring moves on without a new save
    queue = s.vrings[3].queue
    assert queue is not None
    done = drv.add_chain([(2 << 20, 2 << 20, True)])
    chain = queue.pop(mem)
    assert chain is not None
    queue.push(mem, chain.head, 0)
    in_flight = drv.add_chain([(3 << 20, 1 << 20, True)])
    assert queue.pop(mem) is not None  # taken... and the process dies here
    never_seen = drv.add_chain([(4 << 20, 1 << 20, True)])
    restored = Session.restore(saved)
    again_queue = restored.vrings[3].queue
    assert again_queue is not None
    assert again_queue.resume_from_used(mem) == 2
    again = again_queue.pop(mem)
    assert again is not None and again.head == in_flight != done
    then = again_queue.pop(mem)
    assert then is not None and then.head == never_seen
    assert again_queue.pop(mem) is None


@pytest.mark.parametrize(
    "breakage",
    [
        lambda st: st.update(version=99),
        lambda st: st.pop("features"),
        lambda st: st.update(state="dancing"),
        lambda st: st["vrings"].append({"index": 500}),
        lambda st: st["vrings"][0].update(size=3),
    ],
)
def test_a_damaged_state_is_refused(breakage: object) -> None:
    state = started_session().export_state().to_json()
    breakage(state)  # type: ignore[operator]
    with pytest.raises((LocalProtocolError, QueueError)):
        Session.restore(SavedSession.from_json(state))


def _paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in a JSON tree where a value can be swapped."""
    out: list[tuple[object, ...]] = [prefix] if prefix else []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        out += _paths(child, (*prefix, key))
    return out


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


@pytest.mark.fuzz
@given(st.data())
def test_any_damage_to_a_saved_state_is_refused_or_restored_never_a_crash(
    data: st.DataObject,
) -> None:
    """The state crosses a process boundary (the keeper); a restore of a damaged one
    raises a protocol error or gives a session that re-checked every value."""
    state = json.loads(json.dumps(started_session().export_state().to_json()))
    path = data.draw(st.sampled_from(_paths(state)))
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(_JSON_VALUES)
    try:
        restored = Session.restore(SavedSession.from_json(state))
    except VhostUserError:
        return
    for v in restored.vrings:
        assert v.size is None or 1 <= v.size <= 32768


def test_format_1_states_written_by_the_previous_release_are_read() -> None:
    """An upgrade in place hands over state written in format 1 (positional lists for
    the config, the regions and the ring addresses); the new process reads it."""
    session = started_session()
    session.device.config.num_pages = 1234
    new = json.loads(json.dumps(session.export_state().to_json()))
    old = {
        **new,
        "version": 1,
        "config": list(new["config"].values()),
        "memory": [list(r.values()) for r in new["memory"]],
        "vrings": [
            {**v, "addr": None if v["addr"] is None else list(v["addr"].values())}
            for v in new["vrings"]
        ],
    }
    assert isinstance(old["config"][0], int) and isinstance(old["memory"][0], list)
    restored = Session.restore(SavedSession.from_json(old))
    assert restored.export_state() == session.export_state()
    assert restored.device.config.num_pages == 1234


def test_every_request_with_a_handler_names_a_method_of_the_session() -> None:
    """REQUESTS is the one place a request is described; its handler must exist."""
    session = Session()
    for request, spec in REQUESTS.items():
        if spec.handler is not None:
            assert callable(getattr(session, spec.handler)), request
            assert spec.session, f"{request.name} is served but allowed in no state"
        else:
            assert not spec.session and spec.queue is None, request


def test_features_and_balloon_changes_come_out_as_effects() -> None:
    """The daemon's gauges follow these effects, not the request type."""
    s = active()
    offered = s.device.features
    out = s.handle(msg(Request.SET_FEATURES, U64(offered), need_reply=True))
    assert FeaturesSet(offered & ~VirtioFeature.PROTOCOL_FEATURES) in out.effects
    assert offered & VirtioFeature.PROTOCOL_FEATURES  # offered to QEMU, never to the guest
    actual = struct.pack("<I", 77)
    out = s.handle(msg(Request.SET_CONFIG, Config(4, 4, 0, actual)))
    assert BalloonChanged(0, 77) in out.effects


def test_get_queue_num_answers_every_queue_a_balloon_can_have_once_mq_is_negotiated() -> None:
    """Offered by default (crosvm needs it for more than 2 queues): without MQ
    negotiated it is refused and the connection goes on; with MQ it is answered
    before SET_OWNER."""
    assert DEFAULT_PROTOCOL_FEATURES & ProtocolFeature.MQ
    s = Session()
    with pytest.raises(UnsupportedRequestError, match="MQ"):
        s.handle(msg(Request.GET_QUEUE_NUM))
    s = Session()
    s.handle(msg(Request.SET_PROTOCOL_FEATURES, U64(DEFAULT_PROTOCOL_FEATURES)))
    assert s.state is SessionState.NEGOTIATED
    out = s.handle(msg(Request.GET_QUEUE_NUM))
    # inflate, deflate, stats, free page hint, reporting
    assert out.reply == encode_reply(Request.GET_QUEUE_NUM, U64(5))
