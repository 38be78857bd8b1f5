"""Guest RAM on 2 MiB huge pages (hugetlbfs): only whole huge pages are given back.

A hole in a hugetlbfs file can only be punched in whole huge pages; a report of
smaller blocks frees nothing and is counted as ``unaligned``. The test reserves
huge pages for itself (these machines can: docs/facts.md section 3) and gives them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import StartDaemon, sample
from frontend import PAGE, FakeFrontend, GuestMemfd, MiB

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
