"""Guest RAM on 2 MiB huge pages (hugetlbfs): only whole huge pages are given back.

A hole in a hugetlbfs file can only be punched in whole huge pages; a report of
smaller blocks frees nothing and is counted as ``unaligned``. The test reserves
huge pages for itself (these machines can: docs/facts.md section 3) and gives them back.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon_helpers import StartDaemon, attach, sample, sample_or_none
from tests.frontend import PAGE, FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.serving import discard

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
PAGES = 24  # 48 MiB


def free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    raise AssertionError("no HugePages_Free in /proc/meminfo")


@pytest.fixture
def huge_pages() -> Iterator[None]:
    old = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(str(old + PAGES))
    try:
        assert free_huge_pages() >= PAGES, "could not reserve 2 MiB huge pages"
        yield
    finally:
        NR_HUGEPAGES.write_text(str(old))


async def test_only_whole_huge_pages_are_discarded(
    huge_pages: None,
    start_daemon: StartDaemon,
    frontends: list[FakeFrontend],
    guests: list[GuestMemfd],
) -> None:
    daemon = await start_daemon("huge")
    guest = GuestMemfd(32 * MiB, hugetlb=True)
    guests.append(guest)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    frontends.append(fe)
    await fe.handshake()
    await fe.start()
    guest.populate(4 * MiB, 16 * MiB)
    free_before, allocated_before = free_huge_pages(), guest.allocated()
    # Sixteen 4 KiB blocks inside one huge page: nothing can be freed.
    await fe.report(3, [(8 * MiB + i * PAGE, PAGE) for i in range(16)])
    assert guest.allocated() == allocated_before
    assert sample(daemon, "discard_skipped_bytes_total", vm="huge", reason="unaligned") == 16 * PAGE
    # A 2 MiB block and a 4 MiB block: three whole huge pages come back.
    await fe.report(3, [(4 * MiB, 2 * MiB), (12 * MiB, 4 * MiB)])
    assert allocated_before - guest.allocated() == 6 * MiB
    assert free_huge_pages() - free_before == 3
    assert sample(daemon, "discarded_bytes_total", vm="huge") == 6 * MiB


async def test_unsealed_huge_page_ram_truncated_under_load_costs_only_that_vm(
    huge_pages: None,
    start_daemon: StartDaemon,
    frontends: list[FakeFrontend],
    guests: list[GuestMemfd],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hugetlbfs RAM (memory-backend-file on /dev/hugepages) is never sealed. Touching a
    mapping past the end of a truncated file raises SIGBUS, which would end this very
    process (the daemon runs in it). The frontend truncates the file while the daemon
    is serving a report (inside its discard), with another VM reporting all along."""
    daemon = await start_daemon("huge", "bystander")
    huge, other = GuestMemfd(32 * MiB, hugetlb=True, sealed=False), GuestMemfd(32 * MiB)
    guests += [huge, other]
    fe = await attach(str(daemon.vms[0].socket), huge, frontends)
    ok = await attach(str(daemon.vms[1].socket), other, frontends)
    huge.populate(4 * MiB, 8 * MiB)
    before = huge.allocated()
    await fe.report(3, [(4 * MiB, 2 * MiB)])  # rings read through /proc/self/mem work
    assert before - huge.allocated() == 2 * MiB

    execute = discard.execute
    truncated = threading.Event()  # set in the daemon's discard thread
    huge_fd = daemon.connections["huge"].memory.regions[0].fd  # the daemon's own copy

    def truncate_then_execute(plan: Any, *args: Any) -> Any:
        if any(p.fd == huge_fd for p in plan.punches) and not truncated.is_set():
            os.ftruncate(huge.fd, 0)  # the rings and the reported pages are gone
            truncated.set()
        return execute(plan, *args)

    monkeypatch.setattr(discard, "execute", truncate_then_execute)

    async def bystander_load() -> None:
        for _ in range(30):
            other.populate(8 * MiB, 2 * MiB)
            await ok.report(3, [(8 * MiB, 2 * MiB)])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bystander_load)
        await trio.sleep(0.03)
        # Three reports posted with no await between them: once the daemon serves one,
        # the file is truncated, and this process writing the ring after that would
        # take the SIGBUS itself.
        for _ in range(3):
            fe.rings[3].add_chain([(6 * MiB, 2 * MiB, True)])
        fe.kick(3)
        with trio.fail_after(5):
            assert await trio.to_thread.run_sync(truncated.wait, 5)
            while not sample_or_none(
                daemon, "protocol_errors_total", vm="huge", reason="region_truncated"
            ):
                await trio.sleep(0.01)
    # The daemon is alive; the other VM was served throughout and still is.
    other.populate(8 * MiB, 2 * MiB)
    await ok.report(3, [(8 * MiB, 2 * MiB)])
    assert sample(daemon, "reports_total", vm="bystander") == 31
    assert sample(daemon, "connected", vm="bystander") == 1
