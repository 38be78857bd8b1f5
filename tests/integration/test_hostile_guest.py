"""A hostile guest writes anything it likes into its rings. Whatever it writes, the daemon
discards only inside ranges a report legitimately names: populated canary memory
around and between the RAM regions (file ranges that belong to no region) and every
unreported byte stay allocated. A malformed report is completed untouched; a broken
ring stops that queue and signals its error eventfd."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from testbed.guestrun import allocated_between
from tests.daemon_helpers import StartDaemon, sample
from tests.fakes import F_INDIRECT, F_NEXT, F_WRITE, DriverRing
from tests.frontend import PAGE, FakeFrontend, GuestMemfd, MiB

GiB = 1 << 30
# File layout of the guest RAM memfd: canary | region 0 | canary | region 1 | canary
LAYOUT = [(0, 18 * MiB, 4 * MiB), (GiB, 16 * MiB, 26 * MiB)]
CANARIES = [(0, 4 * MiB), (22 * MiB, 4 * MiB), (42 * MiB, 4 * MiB)]
FILE_SIZE = 46 * MiB


def chain(blocks: list[tuple[int, int]], flags: int = F_WRITE) -> Callable[[DriverRing], None]:
    def build(ring: DriverRing) -> None:
        for i, (gpa, length) in enumerate(blocks):
            more = F_NEXT if i + 1 < len(blocks) else 0
            ring.write_desc(i, gpa, length, flags | more, i + 1)
        ring.publish(0)

    return build


def raw_descs(
    *descs: tuple[int, int, int, int], avail_idx: int | None = None
) -> Callable[[DriverRing], None]:
    def build(ring: DriverRing) -> None:
        for i, d in enumerate(descs):
            ring.write_desc(i, *d)
        ring.publish(0)
        if avail_idx is not None:
            ring.set_avail_idx(avail_idx)

    return build


#: (case, ring content, "completed" or "stopped", bytes legitimately discarded, reason)
CASES = [
    ("legit_block_at_the_end_of_region_0", chain([(16 * MiB, 2 * MiB)]), "completed",
     2 * MiB, None),
    ("outside_ram_in_the_gap", chain([(512 * MiB, 2 * MiB)]), "completed", 0, None),
    ("crossing_the_end_of_region_0", chain([(16 * MiB, 4 * MiB)]), "completed", 0, None),
    ("past_the_end_of_region_1", chain([(GiB + 16 * MiB, 4 * MiB)]), "completed", 0, None),
    ("a_2_gib_block_over_everything", chain([(0, 1 << 31)]), "completed", 0, None),
    ("legit_and_outside_mixed", chain([(GiB + 4 * MiB, 4 * MiB), (2 * GiB, 4 * MiB)]),
     "completed", 4 * MiB, None),
    ("odd_length", chain([(4 * MiB, 3 * PAGE)]), "completed", 0, "report_bad_length"),
    ("unaligned_block", chain([(MiB, 2 * MiB)]), "completed", 0, "report_unaligned"),
    ("device_readable_entry", chain([(4 * MiB, 2 * MiB)], flags=0), "completed", 0,
     "report_not_writable"),
    ("legit_then_unaligned_in_one_report", chain([(4 * MiB, 2 * MiB), (7 * MiB, 2 * MiB)]),
     "completed", 0, "report_unaligned"),
    ("zero_length", raw_descs((4 * MiB, 0, F_WRITE, 0)), "stopped", 0, "zero_length"),
    ("loop", raw_descs((4 * MiB, 2 * MiB, F_WRITE | F_NEXT, 1),
                       (6 * MiB, 2 * MiB, F_WRITE | F_NEXT, 0)), "stopped", 0, "chain_loop"),
    ("next_out_of_range", raw_descs((4 * MiB, 2 * MiB, F_WRITE | F_NEXT, 64)), "stopped", 0,
     "next_out_of_range"),
    ("indirect_not_negotiated", raw_descs((8 * MiB, 64, F_INDIRECT, 0)), "stopped", 0,
     "indirect_not_negotiated"),
    ("avail_index_jump", raw_descs((4 * MiB, 2 * MiB, F_WRITE, 0), avail_idx=500), "stopped", 0,
     "avail_index_jump"),
    ("head_out_of_range", lambda ring: (ring.publish(64),), "stopped", 0, "head_out_of_range"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "build", "outcome", "legit", "reason"), CASES, ids=[c[0] for c in CASES]
)
async def test_hostile_ring_content(
    start_daemon: StartDaemon,
    case: str,
    build: Callable[[DriverRing], None],
    outcome: str,
    legit: int,
    reason: str | None,
) -> None:
    daemon = await start_daemon("guest", "neighbour")
    guest = GuestMemfd(FILE_SIZE, LAYOUT)
    neighbour_ram = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    neighbour = await FakeFrontend.connect(str(daemon.vms[1].socket), neighbour_ram)
    try:
        guest.map[:] = b"\xa5" * FILE_SIZE  # everything populated, canaries included
        await fe.handshake()
        await fe.start()  # writes the rings (zeroed) into region 0
        await neighbour.handshake()
        await neighbour.start()
        before = guest.allocated()
        ring = fe.rings[3]
        build(ring)
        fe.kick(3)
        with trio.fail_after(5):
            if outcome == "completed":
                await fe.wait_call(3)
                assert ring.take_used() == [(0, 0)]
            else:
                await trio.lowlevel.wait_readable(fe.fds[3].err)
        await trio.sleep(0.05)  # nothing more may happen after the answer
        for start, length in CANARIES:
            assert allocated_between(guest.fd, start, start + length) == length, (start, case)
        assert before - guest.allocated() == legit
        if reason is not None:
            assert sample(daemon, "protocol_errors_total", vm="guest", reason=reason) == 1
        await neighbour.report(3, [(4 * MiB, 2 * MiB)])  # the other VM is not disturbed
    finally:
        await fe.aclose()
        await neighbour.aclose()
        guest.close()
        neighbour_ram.close()


async def test_a_flooding_guest_does_not_starve_another(
    start_daemon: StartDaemon, frontends: list[FakeFrontend], guests: list[GuestMemfd]
) -> None:
    """One VM keeps 40 reports of 32 x 2 MiB in flight; another VM's single report is
    served while the flood is still going, not after it (reports take turns)."""
    daemon = await start_daemon("flood", "quiet")
    flood_ram, quiet_ram = GuestMemfd(128 * MiB), GuestMemfd(16 * MiB)
    guests += [flood_ram, quiet_ram]
    flood = await FakeFrontend.connect(str(daemon.vms[0].socket), flood_ram)
    quiet = await FakeFrontend.connect(str(daemon.vms[1].socket), quiet_ram)
    frontends += [flood, quiet]
    for fe in (flood, quiet):
        await fe.handshake()
        await fe.start()
    ring = flood.rings[3]
    total = 40
    blocks = [(64 * MiB + i * 2 * MiB, 2 * MiB) for i in range(32)]

    async def keep_flooding() -> None:
        posted = 0
        while posted < total:
            if (posted - ring.used_idx()) & 0xFFFF < 2:  # two reports in flight at a time
                flood_ram.map[64 * MiB : 128 * MiB] = b"\x5a" * (64 * MiB)
                ring.add_chain([(gpa, n, True) for gpa, n in blocks])
                flood.kick(3)
                posted += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_flooding)
        with trio.fail_after(10):
            while ring.used_idx() < 3:
                await trio.sleep(0.001)
        await quiet.report(3, [(4 * MiB, 2 * MiB)])
        served_during = ring.used_idx()
    print(f"quiet report served after {served_during} of {total} flood reports")
    assert served_during < total, "the quiet VM waited for the whole flood"
    assert sample(daemon, "reports_total", vm="quiet") == 1
