"""The message codec against QEMU 11.1.3's exact bytes, and against anything at all."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.golden import CAPTURE_NAMES, Record, load_capture
from vhost_user_balloon.protocol import (
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    REQUESTS,
    U64,
    Config,
    DeviceStateTransfer,
    Empty,
    FdCountError,
    Header,
    HeaderError,
    Inflight,
    IotlbMsg,
    LogArea,
    MemoryRegion,
    MemoryRegionMsg,
    MemoryTable,
    Message,
    MessageDecoder,
    PayloadError,
    Raw,
    Request,
    SharedObject,
    UnknownRequestError,
    VhostUserError,
    VringAddr,
    VringFile,
    VringState,
    encode_message,
    encode_reply,
)

ALL_RECORDS = [(name, r) for name in CAPTURE_NAMES for r in load_capture(name)]
FIRST_OF_EACH = {r.name: r for _, r in reversed(ALL_RECORDS)}


def fake_fds(n: int, start: int = 100) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def decode_whole(raw: bytes, fds: tuple[int, ...] = ()) -> Message:
    dec = MessageDecoder()
    dec.feed(raw, fds)
    msg = dec.next_message()
    assert msg is not None
    assert dec.next_message() is None
    return msg


def decode_bytewise(raw: bytes, fds: tuple[int, ...] = ()) -> Message:
    dec = MessageDecoder()
    msg = None
    for i, byte in enumerate(raw):
        assert dec.bytes_wanted() >= 1
        dec.feed(bytes([byte]), fds if i == 0 else ())
        msg = dec.next_message()
        if i < len(raw) - 1:
            assert msg is None
    assert msg is not None
    return msg


def test_the_captures_cover_every_request_qemu_sends() -> None:
    sent = {r.name for _, r in ALL_RECORDS}
    assert sent == {
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER",
        "SET_VRING_CALL", "SET_VRING_ERR", "SET_FEATURES", "SET_MEM_TABLE", "SET_VRING_NUM",
        "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_ENABLE",
        "GET_CONFIG", "SET_CONFIG", "GET_VRING_BASE",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(FIRST_OF_EACH))
def test_golden_vector_decodes_and_reencodes_byte_for_byte(name: str) -> None:
    record: Record = FIRST_OF_EACH[name]
    fds = fake_fds(record.nfds)
    for msg in (decode_whole(record.raw, fds), decode_bytewise(record.raw, fds)):
        assert msg.request.name == record.name
        assert msg.fds == fds
        assert msg.to_bytes() == record.raw


def test_every_captured_message_round_trips() -> None:
    for _, record in ALL_RECORDS:
        msg = decode_whole(record.raw, fake_fds(record.nfds))
        assert msg.to_bytes() == record.raw


def test_a_whole_capture_fed_as_one_stream_decodes_in_order() -> None:
    records = load_capture("qemu-11.1.3-reporting-stats-6.1.jsonl")
    dec = MessageDecoder()
    names = []
    for r in records:
        # Read exactly as the daemon does: header, then payload; fds with the header.
        dec.feed(r.raw[:12], fake_fds(r.nfds))
        dec.feed(r.raw[12:])
        msg = dec.next_message()
        assert msg is not None and len(msg.fds) == r.nfds
        names.append(msg.request.name)
    assert names == [r.name for r in records]
    assert not dec.in_message


def test_golden_decoded_values() -> None:
    table = decode_whole(FIRST_OF_EACH["SET_MEM_TABLE"].raw, fake_fds(1)).payload
    assert isinstance(table, MemoryTable)
    assert table.regions[0].guest_phys_addr == 0
    assert table.regions[0].memory_size == 2 << 30
    two = next(r for n, r in ALL_RECORDS if "two-regions" in n and r.name == "SET_MEM_TABLE")
    table2 = decode_whole(two.raw, fake_fds(2)).payload
    assert isinstance(table2, MemoryTable)
    assert [r.mmap_offset for r in table2.regions] == [0, 0x8000_0000]
    assert table2.regions[1].guest_phys_addr == 0x1_0000_0000
    call = decode_whole(FIRST_OF_EACH["SET_VRING_CALL"].raw, fake_fds(1))
    assert call.payload == VringFile(0, nofd=False) and call.need_reply
    cfg = decode_whole(FIRST_OF_EACH["GET_CONFIG"].raw).payload
    assert cfg == Config(0, 16, 0, bytes(16))


# -- every payload type both ways ---------------------------------------------------
PAYLOADS = [
    Empty(),
    U64(0x1_4000_0022),
    VringState(3, 64),
    VringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_24C0, 0x7F00_0000_2400, 0x1000),
    VringFile(4, nofd=True),
    VringFile(2, nofd=False),
    MemoryRegion(0x1000, 0x2000, 0x7F00_0000_0000, 0x3000),
    MemoryTable((MemoryRegion(0, 1 << 31, 0x7F00_0000_0000, 0),)),
    MemoryRegionMsg(MemoryRegion(0, 4096, 0x7F00_0000_0000, 0)),
    Config(4, 4, 0, b"\x01\x02\x03\x04"),
    LogArea(4096, 0),
    Inflight(8192, 0, 2, 64),
    Inflight(8192, 0, 2, 64, padding=0x0100_0000),  # found by scripts/fuzz: padding kept
    IotlbMsg(0x1000, 0x2000, 0x3000, 3, 2),
    IotlbMsg(0x1000, 0x2000, 0x3000, 3, 2, padding=b"\x01" * 6),
    DeviceStateTransfer(0, 0),
    SharedObject(bytes(range(16))),
    Raw(b"\x00\x01"),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_payload_round_trip(payload: object) -> None:
    data = payload.to_bytes()  # type: ignore[attr-defined]
    assert type(payload).from_bytes(data) == payload
    if type(payload).SIZE is not None:
        assert len(data) == type(payload).SIZE
        with pytest.raises(PayloadError) as err:
            type(payload).from_bytes(data + b"\0")
        assert err.value.reason == "bad_payload_size"


def test_replies_have_the_reply_bit_and_echo_the_request() -> None:
    raw = encode_reply(Request.GET_FEATURES, U64(0x1_4000_0022))
    assert raw == bytes.fromhex("010000000500000008000000") + struct.pack("=Q", 0x1_4000_0022)
    assert encode_reply(Request.SET_MEM_TABLE, U64(0))[4:8] == b"\x05\0\0\0"


def test_encode_message_sets_need_reply() -> None:
    raw = encode_message(Request.SET_VRING_CALL, VringFile(0, False), need_reply=True)
    assert raw == FIRST_OF_EACH["SET_VRING_CALL"].raw


# -- header and fd rules --------------------------------------------------------------
def header(request: int, flags: int = 1, size: int = 0) -> bytes:
    return struct.pack("=III", request, flags, size)


@pytest.mark.parametrize(
    ("flags", "size", "reason"),
    [
        (0, 0, "bad_version"),
        (2, 0, "bad_version"),
        (1 | 4, 0, "unexpected_reply"),
        (1 | 0x10, 0, "bad_flags"),
        (1, MAX_PAYLOAD_SIZE + 1, "oversized_message"),
    ],
)
def test_bad_headers_are_typed_errors_and_break_the_stream(
    flags: int, size: int, reason: str
) -> None:
    dec = MessageDecoder()
    dec.feed(header(Request.GET_FEATURES, flags, size), (7,))
    with pytest.raises(HeaderError) as err:
        dec.next_message()
    assert err.value.reason == reason
    assert err.value.fds == (7,)
    with pytest.raises(HeaderError) as again:
        dec.next_message()
    assert again.value.reason == "decoder_broken"


def test_unknown_request_keeps_the_connection_and_the_stream_stays_in_step() -> None:
    dec = MessageDecoder()
    dec.feed(header(999, 1 | 8, 4) + b"abcd", (5,))
    dec.feed(FIRST_OF_EACH["GET_FEATURES"].raw)
    with pytest.raises(UnknownRequestError) as err:
        dec.next_message()
    assert err.value.keeps_connection and err.value.fds == (5,)
    assert err.value.values["request"] == 999
    msg = dec.next_message()
    assert msg is not None and msg.request is Request.GET_FEATURES


@pytest.mark.parametrize(
    ("raw", "nfds"),
    [
        (FIRST_OF_EACH["SET_VRING_CALL"].raw, 0),
        (FIRST_OF_EACH["SET_VRING_CALL"].raw, 2),
        (encode_message(Request.SET_VRING_KICK, VringFile(0, nofd=True)), 1),
        (FIRST_OF_EACH["SET_MEM_TABLE"].raw, 2),
        (FIRST_OF_EACH["GET_FEATURES"].raw, 1),
        (encode_message(Request.SET_LOG_FD, Empty()), 0),
    ],
)
def test_fd_count_rules(raw: bytes, nfds: int) -> None:
    dec = MessageDecoder()
    dec.feed(raw, fake_fds(nfds))
    with pytest.raises(FdCountError) as err:
        dec.next_message()
    assert err.value.fds == fake_fds(nfds)


def test_too_many_fds_at_once() -> None:
    dec = MessageDecoder()
    dec.feed(FIRST_OF_EACH["GET_FEATURES"].raw, fake_fds(MAX_FDS + 1))
    with pytest.raises(FdCountError) as err:
        dec.next_message()
    assert err.value.reason == "too_many_fds" and len(err.value.fds) == MAX_FDS + 1


def test_rem_mem_reg_may_carry_one_fd_or_none() -> None:
    raw = encode_message(Request.REM_MEM_REG, PAYLOADS[8])
    assert decode_whole(raw, ()).fds == ()
    assert decode_whole(raw, (9,)).fds == (9,)


@pytest.mark.parametrize(
    ("payload_bytes", "reason"),
    [
        (struct.pack("=II", 0, 0), "bad_region_count"),
        (struct.pack("=II", 9, 0), "bad_region_count"),
        (struct.pack("=II", 2, 0) + bytes(32), "bad_payload_size"),
        (b"\0\0\0", "bad_payload_size"),
    ],
)
def test_bad_memory_tables(payload_bytes: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as err:
        MemoryTable.from_bytes(payload_bytes)
    assert err.value.reason == reason


def test_bad_config_payloads() -> None:
    with pytest.raises(PayloadError, match="shorter"):
        Config.from_bytes(b"\0" * 8)
    with pytest.raises(PayloadError) as err:
        Config.from_bytes(struct.pack("=III", 0, 257, 0) + bytes(257))
    assert err.value.reason == "bad_config_size"
    with pytest.raises(PayloadError):
        Config.from_bytes(struct.pack("=III", 0, 16, 0) + bytes(15))


def test_vring_file_rejects_reserved_bits() -> None:
    with pytest.raises(PayloadError) as err:
        VringFile.from_bytes(struct.pack("=Q", 1 << 9))
    assert err.value.reason == "bad_vring_file"


def test_header_round_trip_and_need_reply() -> None:
    h = Header.from_bytes(header(Request.SET_MEM_TABLE, 9, 40))
    assert h.need_reply and h.to_bytes() == header(Request.SET_MEM_TABLE, 9, 40)


def test_take_fds_hands_back_what_is_held() -> None:
    dec = MessageDecoder()
    dec.feed(b"\x01", (3, 4))
    assert dec.in_message
    assert dec.take_fds() == (3, 4)


def test_every_request_has_a_rule() -> None:
    assert set(REQUESTS) == set(Request)


# -- anything at all ----------------------------------------------------------------
@pytest.mark.fuzz
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=12),
    nfds=st.lists(st.integers(0, 10), max_size=12),
)
def test_arbitrary_bytes_give_messages_or_typed_errors(
    chunks: list[bytes], nfds: list[int]
) -> None:
    dec = MessageDecoder()
    fd = 1000
    fds_in, fds_out = 0, 0
    for i, chunk in enumerate(chunks):
        n = nfds[i] if i < len(nfds) else 0
        dec.feed(chunk, tuple(range(fd, fd + n)))
        fd += n
        fds_in += n
        while True:
            try:
                msg = dec.next_message()
            except VhostUserError as err:
                fds_out += len(err.fds)
                if isinstance(err, HeaderError):  # the stream is out of step: stop
                    fds_out += len(dec.take_fds())
                    assert fds_out == fds_in
                    return
                continue
            if msg is None:
                break
            fds_out += len(msg.fds)
    fds_out += len(dec.take_fds())
    assert fds_out == fds_in  # every fd comes back out exactly once


@pytest.mark.fuzz
@given(
    request=st.sampled_from(sorted(Request)),
    flags=st.sampled_from([1, 9]),
    body=st.binary(max_size=300),
    nfds=st.integers(0, 9),
)
def test_any_known_request_with_any_body(
    request: Request, flags: int, body: bytes, nfds: int
) -> None:
    raw = header(request, flags, len(body)) + body
    dec = MessageDecoder()
    dec.feed(raw, fake_fds(nfds))
    try:
        msg = dec.next_message()
    except VhostUserError as err:
        assert err.fds == fake_fds(nfds)
        return
    assert msg is not None
    assert msg.to_bytes() == raw
