"""A hostile or broken frontend, over a real socket: each case gets a typed error, a log
line naming it, a protocol_errors_total{reason} increment, and that connection alone
closed. Every fd it sent is closed; another VM on the same daemon keeps reporting."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence

import pytest
import trio

from tests.daemon_helpers import StartDaemon, sample, wait_disconnected
from tests.frontend import FakeFrontend, GuestMemfd, MiB, region_uva
from vhost_user_balloon.daemon.serving import framing
from vhost_user_balloon.protocol import (
    REQUESTS,
    U64,
    MemoryRegion,
    MemoryTable,
    Request,
    VringAddr,
    VringFile,
    VringState,
    encode_message,
)

Send = tuple[bytes, Sequence[int]]
Build = Callable[[GuestMemfd, list[int]], list[Send]]


def raw(request: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("=III", request, flags, len(payload)) + payload


def msg(request: Request, payload: object, need_reply: bool = False) -> bytes:
    return encode_message(request, payload, need_reply=need_reply)  # type: ignore[arg-type]


def eventfd(fds: list[int]) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    fds.append(fd)
    return fd


def table(*regions: MemoryRegion) -> bytes:
    return msg(Request.SET_MEM_TABLE, MemoryTable(regions), need_reply=True)


REGION = MemoryRegion(0, 16 * MiB, region_uva(0), 0)

#: (case, prelude, build, reason). prelude: "none" (fresh connection), "owned" (QEMU's
#: handshake done), "memory" (and a memory table set).
CASES: list[tuple[str, str, Build, str]] = [
    ("oversized", "none", lambda g, f: [(raw(1, 1, b"") [:8] + struct.pack("=I", 5000), [])],
     "oversized_message"),
    ("bad_version", "none", lambda g, f: [(raw(1, 2, b""), [])], "bad_version"),
    ("reply_bit", "none", lambda g, f: [(raw(1, 5, b""), [])], "unexpected_reply"),
    ("reserved_flags", "none", lambda g, f: [(raw(1, 0x81, b""), [])], "bad_flags"),
    ("fd_with_get_features", "none",
     lambda g, f: [(raw(1, 1, b""), [eventfd(f), eventfd(f)])], "bad_fd_count"),
    ("table_without_fds", "owned", lambda g, f: [(table(REGION), [])], "bad_fd_count"),
    ("fd_despite_nofd_bit", "owned",
     lambda g, f: [(msg(Request.SET_VRING_CALL, VringFile(0, True)), [eventfd(f)])],
     "bad_fd_count"),
    ("far_too_many_fds", "none",
     lambda g, f: [(raw(1, 1, b""), [eventfd(f) for _ in range(12)])], "too_many_fds"),
    ("device_request_before_owner", "none", lambda g, f: [(table(REGION), [g.fd])],
     "unexpected_request"),
    ("handshake_while_running", "memory",
     lambda g, f: [(msg(Request.SET_VRING_NUM, VringState(0, 64)), []),
                   (msg(Request.SET_VRING_ADDR, VringAddr(0, 0, region_uva(0),
                                                          region_uva(0x2000),
                                                          region_uva(0x1000), 0)), []),
                   (msg(Request.SET_VRING_KICK, VringFile(0, False)), [eventfd(f)]),
                   (msg(Request.SET_PROTOCOL_FEATURES, U64(0x208)), [])],
     "handshake_while_running"),
    ("unoffered_features", "owned", lambda g, f: [(msg(Request.SET_FEATURES, U64(1 << 3)), [])],
     "unoffered_features"),
    ("ring_before_memory", "owned",
     lambda g, f: [(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, 0, 0, 0, 0)), [])],
     "ring_before_memory"),
    ("kick_before_address", "memory",
     lambda g, f: [(msg(Request.SET_VRING_KICK, VringFile(0, False)), [eventfd(f)])],
     "kick_before_setup"),
    ("queue_index_out_of_range", "owned",
     lambda g, f: [(msg(Request.SET_VRING_NUM, VringState(200, 64)), [])], "bad_queue_index"),
    ("ring_size_0", "owned", lambda g, f: [(msg(Request.SET_VRING_NUM, VringState(0, 0)), [])],
     "bad_queue_size"),
    ("ring_size_not_power_of_2", "owned",
     lambda g, f: [(msg(Request.SET_VRING_NUM, VringState(0, 48)), [])], "bad_queue_size"),
    ("ring_size_too_big", "owned",
     lambda g, f: [(msg(Request.SET_VRING_NUM, VringState(0, 65536)), [])], "bad_queue_size"),
    ("misaligned_ring", "memory",
     lambda g, f: [(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, region_uva(0x1008),
                                                          region_uva(0x2000),
                                                          region_uva(0x3000), 0)), [])],
     "misaligned_ring"),
    ("ring_outside_every_region", "memory",
     lambda g, f: [(msg(Request.SET_VRING_NUM, VringState(0, 64)), []),
                   (msg(Request.SET_VRING_ADDR, VringAddr(0, 0, region_uva(1 << 30),
                                                          region_uva(1 << 30),
                                                          region_uva(1 << 30), 0)), []),
                   (msg(Request.SET_VRING_KICK, VringFile(0, False)), [eventfd(f)])],
     "ring_outside_memory"),
    ("zero_size_region", "owned", lambda g, f: [(table(MemoryRegion(0, 0, region_uva(0), 0)),
                                                 [g.fd])], "empty_region"),
    ("overlapping_regions", "owned",
     lambda g, f: [(table(REGION, MemoryRegion(MiB, MiB, region_uva(64 * MiB), 0)),
                    [g.fd, g.fd])], "region_overlap"),
    ("address_overflow", "owned",
     lambda g, f: [(table(MemoryRegion((1 << 64) - MiB, 2 * MiB, region_uva(0), 0)), [g.fd])],
     "region_overflow"),
    ("too_many_regions", "owned",
     lambda g, f: [(table(*[MemoryRegion(i * MiB, MiB, region_uva(i * MiB), 0)
                            for i in range(9)]), [g.fd] * 8)], "bad_region_count"),
    ("region_beyond_its_file", "owned",
     lambda g, f: [(table(MemoryRegion(0, 64 * MiB, region_uva(0), 0)), [g.fd])],
     "region_beyond_file"),
    ("region_fd_not_a_file", "owned", lambda g, f: [(table(REGION), [eventfd(f)])],
     "region_not_a_file"),
    ("bad_config_access", "owned",
     lambda g, f: [(raw(Request.GET_CONFIG, 1, struct.pack("=III", 8, 16, 0) + bytes(16)), [])],
     "bad_config_access"),
]  # fmt: skip


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def run_case(
    start_daemon: StartDaemon,
    prelude: str,
    sends: Build,
    reason: str,
    capsys: pytest.CaptureFixture[str],
    *,
    close_after: bool = False,
) -> None:
    daemon = await start_daemon("hostile", "bystander")
    guest, other = GuestMemfd(16 * MiB), GuestMemfd(16 * MiB)
    bystander = await FakeFrontend.connect(str(daemon.vms[1].socket), other)
    try:
        await bystander.handshake()
        await bystander.start()
        await bystander.report(3, [(4 * MiB, 2 * MiB)])
        baseline = open_fds()
        fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
        if prelude in ("owned", "memory"):
            await fe.handshake()
        if prelude == "memory":
            await fe.ack(Request.SET_MEM_TABLE, MemoryTable(guest.memory_regions()), [guest.fd])
        ours: list[int] = []
        for data, fds in sends(guest, ours):
            try:
                await fe.send_raw(data, fds)
            except OSError:
                break  # the daemon already hung up
        for fd in ours:
            os.close(fd)
        if close_after:
            fe.sock.close()
        await wait_disconnected(daemon, "hostile")
        await fe.aclose()
        assert open_fds() == baseline  # every fd the hostile peer sent was closed
        assert sample(daemon, "protocol_errors_total", vm="hostile", reason=reason) == 1
        assert sample(daemon, "connected", vm="hostile") == 0
        out = capsys.readouterr().out
        assert "connection_closed_on_error" in out and reason in out
        await bystander.report(3, [(6 * MiB, 2 * MiB)])  # the other VM never noticed
        assert sample(daemon, "reports_total", vm="bystander") == 2
    finally:
        await bystander.aclose()
        guest.close()
        other.close()


@pytest.mark.parametrize(("case", "prelude", "sends", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_hostile_message(
    start_daemon: StartDaemon,
    capsys: pytest.CaptureFixture[str],
    case: str,
    prelude: str,
    sends: Build,
    reason: str,
) -> None:
    await run_case(start_daemon, prelude, sends, reason, capsys)


FIXED_SIZE = sorted(r for r, rule in REQUESTS.items() if rule.payload.SIZE is not None)


@pytest.mark.parametrize("request_", FIXED_SIZE, ids=[r.name for r in FIXED_SIZE])
async def test_every_request_with_a_wrong_payload_size(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str], request_: Request
) -> None:
    size = REQUESTS[request_].payload.SIZE
    assert size is not None
    rule = REQUESTS[request_].fds
    nfds = rule[0] if rule is not None else 1

    def sends(g: GuestMemfd, f: list[int]) -> list[Send]:
        return [(raw(request_, 1, bytes(size + 3)), [eventfd(f) for _ in range(nfds)])]

    await run_case(start_daemon, "owned", sends, "bad_payload_size", capsys)


async def test_a_connection_closed_mid_message(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_case(
        start_daemon,
        "owned",
        lambda g, f: [(raw(1, 1, b"")[:7], [])],
        "truncated_message",
        capsys,
        close_after=True,
    )


async def test_half_a_header_then_silence(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(framing, "MESSAGE_TIMEOUT_S", 0.3)  # 10 s in production
    await run_case(
        start_daemon, "owned", lambda g, f: [(raw(1, 1, b"")[:6], [])], "message_timeout", capsys
    )


async def test_unknown_request_is_answered_with_a_failure_and_the_session_goes_on(
    start_daemon: StartDaemon,
) -> None:
    daemon = await start_daemon("curious")
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake()
        fd = os.eventfd(0)
        await fe.send_raw(raw(99, 9, b"abcd"), [fd])
        os.close(fd)
        head = await fe.recv_exact(12)
        assert struct.unpack("=III", head) == (99, 5, 8)
        assert await fe.recv_exact(8) == struct.pack("=Q", 1)
        await fe.start()
        await fe.report(3, [(4 * MiB, 2 * MiB)])
        assert sample(daemon, "protocol_errors_total", vm="curious", reason="unknown_request") == 1
    finally:
        await fe.aclose()
        guest.close()


async def test_an_idle_peer_is_left_alone(start_daemon: StartDaemon) -> None:
    # Between messages QEMU may be silent for days; only a message started and not
    # finished times out.
    daemon = await start_daemon("quiet")
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake()
        with trio.move_on_after(0.5):
            await wait_disconnected(daemon, "quiet", timeout=1)
        assert "quiet" in daemon.connections
    finally:
        await fe.aclose()
        guest.close()
