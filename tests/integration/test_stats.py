"""The statistics queue: the guest's numbers become Prometheus metrics, fresh ones are
asked for every stats_interval, and a malformed buffer is refused without harm."""

from __future__ import annotations

import struct

import trio

from tests.daemon_helpers import StartDaemon, one_guest, sample, sample_or_none
from tests.frontend import FakeFrontend, GuestMemfd, MiB

STATS_AT = 8 * MiB  # where the test guest keeps its stats buffer


def post_stats(
    fe: FakeFrontend, guest: GuestMemfd, pairs: list[tuple[int, int]], raw: bytes | None = None
) -> None:
    data = raw if raw is not None else b"".join(struct.pack("<HQ", t, v) for t, v in pairs)
    guest.ram.write(STATS_AT, data)
    fe.rings[2].add_chain([(STATS_AT, len(data), False)])
    fe.kick(2)


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_guest_stats_become_metrics_and_are_refreshed(
    start_daemon: StartDaemon, frontends: list[FakeFrontend], guests: list[GuestMemfd]
) -> None:
    daemon, guest, fe = await one_guest(
        start_daemon, guests, frontends, "vm", 32 * MiB, stats_interval=0.2
    )
    post_stats(fe, guest, [(4, 900 * MiB), (5, 2048 * MiB), (2, 17), (99, 7)])
    await wait_for(lambda: sample_or_none(daemon, "guest_memory_free_bytes", vm="vm") == 900 * MiB)
    assert sample(daemon, "guest_memory_total_bytes", vm="vm") == 2048 * MiB
    assert sample(daemon, "guest_major_faults_total", vm="vm") == 17
    assert sample(daemon, "guest_stat", vm="vm", tag="99") == 7  # unknown tags are kept
    assert sample(daemon, "guest_stats_age_seconds", vm="vm") < 1
    # The daemon hands the buffer back after stats_interval: the guest is asked again.
    await fe.wait_call(2, timeout=5)
    assert fe.rings[2].take_used() == [(0, 0)]
    post_stats(fe, guest, [(4, 300 * MiB), (5, 2048 * MiB)])
    await wait_for(lambda: sample_or_none(daemon, "guest_memory_free_bytes", vm="vm") == 300 * MiB)
    await fe.aclose()
    frontends.remove(fe)
    await wait_for(lambda: "vm" not in daemon.connections)
    # Gone with the guest: no stale numbers for a VM that is not attached.
    assert (
        daemon.metrics.registry.get_sample_value(
            "vhost_user_balloon_guest_memory_free_bytes", {"vm": "vm"}
        )
        is None
    )


async def test_malformed_stats_are_refused_and_reporting_goes_on(
    start_daemon: StartDaemon, frontends: list[FakeFrontend], guests: list[GuestMemfd]
) -> None:
    daemon, guest, fe = await one_guest(
        start_daemon, guests, frontends, "odd", 32 * MiB, stats_interval=0
    )
    post_stats(fe, guest, [], raw=bytes(15))  # not whole 10-byte entries
    await wait_for(
        lambda: (
            sample_or_none(daemon, "protocol_errors_total", vm="odd", reason="stats_bad_length")
            == 1
        )
    )
    assert fe.rings[2].used_idx() == 0  # held, not bounced back for the guest to spin on
    await fe.report(3, [(4 * MiB, 2 * MiB)])
    assert "odd" in daemon.connections
