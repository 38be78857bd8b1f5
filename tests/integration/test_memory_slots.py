"""Guest RAM that comes and goes one region at a time (CONFIGURE_MEM_SLOTS).

QEMU sends ADD_MEM_REG / REM_MEM_REG when a DIMM or a virtio-mem memslot is plugged or
unplugged (a real guest doing both is in tests/e2e/test_memory_hotplug.py). Here a
frontend plays those messages so that a report can be put in flight across a removal:
a removal waits for a discard already under way in that region, and a report that
names a region already removed is handed back without touching its memory.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import pytest
import trio

from tests.daemon_helpers import StartDaemon, connect, sample
from tests.frontend import QEMU_PROTOCOL, FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.serving import discard
from vhost_user_balloon.protocol import ProtocolFeature, Request

pytestmark = pytest.mark.trio

GiB = 1 << 30
#: Boot RAM at 0 and a plugged region at 4 GiB, both slices of one memfd (as virtio-mem
#: memslots are slices of its memory backend).
HIGH = 4 * GiB
LAYOUT = [(0, 16 * MiB, 0), (HIGH, 16 * MiB, 16 * MiB)]
PROTOCOL = QEMU_PROTOCOL | ProtocolFeature.CONFIGURE_MEM_SLOTS


async def plugged(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> tuple[Any, GuestMemfd, FakeFrontend]:
    """A started guest whose second region came by ADD_MEM_REG."""
    daemon = await start_daemon("vm")
    guest = GuestMemfd(32 * MiB, LAYOUT)
    guests.append(guest)
    fe = await connect(str(daemon.vms[0].socket), guest, frontends)
    offered = await fe.request(Request.GET_PROTOCOL_FEATURES, expect_reply=True)
    assert offered is not None
    assert struct.unpack("=Q", offered)[0] & ProtocolFeature.CONFIGURE_MEM_SLOTS
    await fe.handshake(PROTOCOL)
    # QEMU asks before SET_OWNER; fewer than 509 and it refuses virtio-mem beside us
    slots = await fe.request(Request.GET_MAX_MEM_SLOTS, expect_reply=True)
    assert slots == struct.pack("=Q", 509)
    await fe.start(mapped=1)
    await fe.add_region(1)
    return daemon, guest, fe


async def test_a_plugged_region_gives_memory_back_until_it_is_removed(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon, guest, fe = await plugged(start_daemon, guests, frontends)
    memory = daemon.connections["vm"].memory
    assert memory.ram_bytes == 32 * MiB and len(memory.regions) == 2

    guest.populate(HIGH, 4 * MiB)
    before = guest.allocated()
    await fe.report(3, [(HIGH, 2 * MiB), (HIGH + 2 * MiB, 2 * MiB)])
    assert before - guest.allocated() == 4 * MiB

    await fe.remove_region(1)
    assert memory.ram_bytes == 16 * MiB and len(memory.regions) == 1
    # The guest (wrongly) reports memory of the region that is gone, beside boot RAM.
    guest.populate(HIGH, 2 * MiB)
    guest.populate(8 * MiB, 2 * MiB)
    before = guest.allocated()
    await fe.report(3, [(HIGH, 2 * MiB), (8 * MiB, 2 * MiB)])
    assert before - guest.allocated() == 2 * MiB  # boot RAM only
    assert guest.file_page_present(16 * MiB)  # the removed region's page is untouched
    assert sample(daemon, "discard_skipped_bytes_total", vm="vm", reason="outside_ram") == 2 * MiB
    # The region can come back, and its memory is given back again.
    await fe.add_region(1)
    await fe.report(3, [(HIGH, 2 * MiB)])
    assert not guest.file_page_present(16 * MiB)
    assert sample(daemon, "connected", vm="vm") == 1


async def test_a_removal_waits_for_the_discard_under_way_in_its_region(
    start_daemon: StartDaemon,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon, guest, fe = await plugged(start_daemon, guests, frontends)
    begun, release = threading.Event(), threading.Event()
    execute = discard.execute

    def held_execute(*args: Any, **kwargs: Any) -> Any:
        begun.set()
        assert release.wait(10), "the test never let the discard go on"
        return execute(*args, **kwargs)

    monkeypatch.setattr(discard, "execute", held_execute)
    guest.populate(HIGH, 2 * MiB)
    ring = fe.rings[3]
    head = ring.add_chain([(HIGH, 2 * MiB, True)])
    fe.kick(3)
    await trio.to_thread.run_sync(begun.wait, 5)

    removed = trio.Event()

    async def remove() -> None:
        await fe.remove_region(1)
        removed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(remove)
        await trio.sleep(0.3)
        # The region is still mapped while its discard runs: REM_MEM_REG is not done.
        assert not removed.is_set()
        assert len(daemon.connections["vm"].memory.regions) == 2
        release.set()
    assert removed.is_set()
    assert not guest.file_page_present(16 * MiB)  # the discard finished first
    assert (head, 0) in ring.take_used()
    assert len(daemon.connections["vm"].memory.regions) == 1
