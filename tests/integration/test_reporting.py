"""The daemon gives reported guest memory back, exactly, over a real socket and memfd."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
import structlog
import trio

from tests.daemon_helpers import StartDaemon, attach, one_guest, sample, wait_disconnected
from tests.fakes import F_NEXT, F_WRITE
from tests.frontend import PAGE, FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.serving import discard
from vhost_user_balloon.daemon.serving.passthrough import RECHECK_SECONDS
from vhost_user_balloon.protocol import U64, Config, Request

pytestmark = pytest.mark.trio


async def test_report_frees_exactly_the_reported_populated_memory(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon, guest, fe = await one_guest(start_daemon, guests, frontends, "vm1", 64 * MiB)
    assert daemon.connections["vm1"].session.layout[3].value == "reporting"

    guest.populate(8 * MiB - PAGE, 8 * MiB + 2 * PAGE)  # the blocks plus a canary each side
    before = guest.allocated()
    resident_before = daemon.memory_snapshot()["vm1"].resident_bytes
    assert resident_before == before
    used = await fe.report(
        3, [(8 * MiB, 2 * MiB), (10 * MiB, 2 * MiB), (12 * MiB, 4 * MiB), (32 * MiB, 2 * MiB)]
    )  # the last one was never populated
    assert len(used) == 1
    assert before - guest.allocated() == 8 * MiB
    assert guest.file_page_present(8 * MiB - PAGE)  # canaries stay
    assert guest.file_page_present(16 * MiB)
    assert not guest.file_page_present(8 * MiB)
    assert guest.ram.read(12 * MiB, 8) == bytes(8)  # a freed page reads back as zeros
    assert daemon.memory_snapshot()["vm1"].resident_bytes == guest.allocated()

    assert sample(daemon, "reported_blocks_total", vm="vm1", order="9") == 3
    assert sample(daemon, "reported_blocks_total", vm="vm1", order="10") == 1
    assert sample(daemon, "reported_bytes_total", vm="vm1", order="9") == 6 * MiB
    assert sample(daemon, "reported_bytes_total", vm="vm1", order="10") == 4 * MiB
    assert sample(daemon, "discarded_bytes_total", vm="vm1") == 10 * MiB
    assert sample(daemon, "reports_total", vm="vm1") == 1
    assert sample(daemon, "report_entries_sum", vm="vm1") == 4
    assert sample(daemon, "report_service_seconds_count", vm="vm1") == 1
    assert sample(daemon, "connected", vm="vm1") == 1
    assert sample(daemon, "guest_ram_bytes", vm="vm1") == 64 * MiB

    # Stop like QEMU at poweroff: the reporting queue's base says one chain was taken.
    assert await fe.stop() == [0, 0, 0, 1]


async def test_two_regions_discard_at_the_right_file_offset(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("big")
    # Like a 4 GiB guest: region 1 sits at 4 GiB and at file offset 32 MiB.
    guest = GuestMemfd(64 * MiB, [(0, 32 * MiB, 0), (4 << 30, 32 * MiB, 32 * MiB)])
    guests.append(guest)
    fe = await attach(str(daemon.vms[0].socket), guest, frontends)
    guest.populate(8 * MiB, 2 * MiB)  # region 0, file offset 8 MiB
    guest.populate((4 << 30) + 8 * MiB, 2 * MiB)  # region 1, file offset 40 MiB
    before = guest.allocated()
    await fe.report(3, [((4 << 30) + 8 * MiB, 2 * MiB)])
    assert before - guest.allocated() == 2 * MiB
    assert not guest.file_page_present(40 * MiB)
    assert guest.file_page_present(8 * MiB)  # same offset in the other region: untouched


async def test_poison_value_keeps_memory_and_counts_it(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("poisoned")
    guest = GuestMemfd(32 * MiB)
    guests.append(guest)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    frontends.append(fe)
    await fe.handshake()
    # As captured: the guest writes poison_val before SET_FEATURES.
    await fe.ack(Request.SET_CONFIG, Config(0, 16, 0, struct.pack("<IIII", 0, 0, 0, 0xAA)))
    await fe.start(features=0x1_4000_0032)
    guest.populate(4 * MiB, 2 * MiB)
    before = guest.allocated()
    await fe.report(3, [(4 * MiB, 2 * MiB)])
    assert guest.allocated() == before
    assert sample(daemon, "discard_skipped_bytes_total", vm="poisoned", reason="poison") == 2 * MiB
    assert sample(daemon, "reported_bytes_total", vm="poisoned", order="9") == 2 * MiB


async def test_no_discard_completes_and_counts(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon, guest, fe = await one_guest(
        start_daemon, guests, frontends, "vfio", 32 * MiB, discard=False
    )
    guest.populate(4 * MiB, 2 * MiB)
    before = guest.allocated()
    await fe.report(3, [(4 * MiB, 2 * MiB)])
    assert guest.allocated() == before
    assert sample(daemon, "discard_skipped_bytes_total", vm="vfio", reason="inhibited") == 2 * MiB


async def test_a_passthrough_device_in_qemu_stops_discards_while_it_is_there(
    start_daemon: StartDaemon,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    tmp_path: Path,
) -> None:
    """No VFIO device exists here: the daemon is told that a file under the test's own
    folder stands for /dev/vfio/, and the frontend's process (this one) opens it, as
    QEMU opens /dev/vfio/N when a device is hot-plugged. The fd table read is real."""
    marker = tmp_path / "vfio" / "12"
    marker.parent.mkdir()
    marker.write_text("")
    daemon, guest, fe = await one_guest(
        start_daemon, guests, frontends, "vm", 32 * MiB, passthrough_markers=(f"{marker.parent}/",)
    )
    assert daemon.connections["vm"].passthrough.pid == os.getpid()

    async def report_and_measure() -> int:
        guest.populate(4 * MiB, 2 * MiB)
        before = guest.allocated()
        await fe.report(3, [(4 * MiB, 2 * MiB)])
        return before - guest.allocated()

    assert await report_and_measure() == 2 * MiB
    with marker.open() as device, structlog.testing.capture_logs() as logs:
        await trio.sleep(RECHECK_SECONDS)  # the next look at QEMU's fds sees it
        assert await report_and_measure() == 0
        assert await report_and_measure() == 0
        assert sample(daemon, "discard_skipped_bytes_total", vm="vm", reason="vfio") == 4 * MiB
        found = [e for e in logs if e["event"].startswith("passthrough")]
        assert [e["event"] for e in found] == ["passthrough_detected"]  # once, not per report
        assert found[0]["devices"] == [device.name]
    await trio.sleep(RECHECK_SECONDS)
    assert await report_and_measure() == 2 * MiB  # the device went away again


async def test_stats_buffer_is_held_and_reporting_goes_on(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    _, _, fe = await one_guest(start_daemon, guests, frontends, "stats", 32 * MiB)
    fe.rings[2].add_chain([(20 * MiB, 160, False)])  # the guest's stats buffer
    fe.kick(2)
    await trio.sleep(0.1)
    assert fe.rings[2].used_idx() == 0  # held, not returned
    await fe.report(3, [(4 * MiB, 2 * MiB)])
    assert fe.rings[2].used_idx() == 0


async def test_bad_report_entries_are_completed_not_discarded(
    start_daemon: StartDaemon,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon, guest, fe = await one_guest(start_daemon, guests, frontends, "odd", 32 * MiB)
    guest.populate(4 * MiB, 4 * MiB)
    before = guest.allocated()
    # Misaligned block: rejected whole, nothing freed, chain still completed.
    await fe.report(3, [(4 * MiB, 2 * MiB), (6 * MiB + PAGE, 2 * MiB)])
    assert guest.allocated() == before
    assert sample(daemon, "protocol_errors_total", vm="odd", reason="report_unaligned") == 1
    # Logged from the discard thread, with the VM it is about.
    rejected = [x for x in capsys.readouterr().out.splitlines() if "report_rejected" in x]
    assert len(rejected) == 1 and "vm=odd" in rejected[0], rejected
    # Outside guest RAM: skipped and counted; the rest of the report is freed.
    await fe.report(3, [(4 * MiB, 2 * MiB), (1 << 40, 2 * MiB)])
    assert before - guest.allocated() == 2 * MiB
    assert sample(daemon, "discard_skipped_bytes_total", vm="odd", reason="outside_ram") == 2 * MiB
    assert "odd" in daemon.connections


async def test_ring_loop_stops_that_queue_and_signals_err(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("loopy", "calm")
    g1, g2 = GuestMemfd(32 * MiB), GuestMemfd(32 * MiB)
    guests += [g1, g2]
    bad = await attach(str(daemon.vms[0].socket), g1, frontends)
    good = await attach(str(daemon.vms[1].socket), g2, frontends)
    ring = bad.rings[3]
    ring.write_desc(0, 4 * MiB, 2 * MiB, F_WRITE | F_NEXT, 1)
    ring.write_desc(1, 6 * MiB, 2 * MiB, F_WRITE | F_NEXT, 0)
    ring.publish(0)
    bad.kick(3)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(bad.fds[3].err)
    assert sample(daemon, "protocol_errors_total", vm="loopy", reason="chain_loop") == 1
    await good.report(3, [(4 * MiB, 2 * MiB)])
    assert sample(daemon, "reports_total", vm="calm") == 1


async def test_get_config_is_answered_and_features_offered(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("cfg")
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    frontends.append(fe)
    offered = await fe.handshake()
    assert offered & (1 << 32) and offered & (1 << 30) and offered & (1 << 5)
    assert await fe.get_config() == bytes(16)
    # A request we never offered: answered with a failure, the connection goes on.
    reply = await fe.request(Request.GET_QUEUE_NUM, need_reply=True)
    assert reply == struct.pack("=Q", 1)
    assert await fe.get_config() == bytes(16)
    assert sample(daemon, "protocol_errors_total", vm="cfg", reason="unsupported_request") == 1


async def test_config_size_0_is_refused(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("nocfg")
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    frontends.append(fe)
    await fe.request(Request.GET_FEATURES, expect_reply=True)
    await fe.request(Request.SET_PROTOCOL_FEATURES, U64(0x8))  # as QEMU with config_size=0
    await wait_disconnected(daemon, "nocfg")
    with pytest.raises((EOFError, OSError)):
        await fe.request(Request.GET_FEATURES, expect_reply=True)
    assert sample(daemon, "protocol_errors_total", vm="nocfg", reason="config_not_negotiated") == 1


async def test_a_garbage_sending_vm_is_cut_off_and_the_other_carries_on(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("good", "evil")
    g_good, g_evil = GuestMemfd(32 * MiB), GuestMemfd(16 * MiB)
    guests += [g_good, g_evil]
    good = await attach(str(daemon.vms[0].socket), g_good, frontends)
    evil = await FakeFrontend.connect(str(daemon.vms[1].socket), g_evil)
    frontends.append(evil)
    await evil.handshake()
    g_good.populate(4 * MiB, 2 * MiB)
    await good.report(3, [(4 * MiB, 2 * MiB)])
    await evil.send_raw(os.urandom(4) + struct.pack("=II", 0x1F, 0))  # reserved flag bits
    await wait_disconnected(daemon, "evil")
    assert sample(daemon, "protocol_errors_total", vm="evil", reason="bad_flags") == 1
    assert sample(daemon, "connected", vm="evil") == 0
    g_good.populate(6 * MiB, 2 * MiB)
    before = g_good.allocated()
    await good.report(3, [(6 * MiB, 2 * MiB)])
    assert before - g_good.allocated() == 2 * MiB
    # The evil VM's socket is ready for its next QEMU (a VM restart).
    again = await attach(str(daemon.vms[1].socket), g_evil, frontends)
    await again.report(3, [(4 * MiB, 2 * MiB)])


async def test_a_second_frontend_for_a_busy_vm_is_refused(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("solo")
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    await attach(str(daemon.vms[0].socket), guest, frontends)
    second = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    frontends.append(second)
    with pytest.raises((EOFError, OSError)):
        await second.request(Request.GET_FEATURES, expect_reply=True)
    assert "solo" in daemon.connections
    assert sample(daemon, "connections_refused_total", vm="solo", reason="vm_busy") == 1


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_no_fd_leaks_over_many_connections(
    start_daemon: StartDaemon, frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("cycle")
    path = str(daemon.vms[0].socket)
    baseline: set[str] = set()
    for i in range(26):
        if i == 1:  # after one report: the discard pool keeps the eventfd it made
            baseline = open_fds()
        guest = GuestMemfd(16 * MiB)
        fe = await FakeFrontend.connect(path, guest)
        await fe.handshake()
        await fe.start()
        guest.populate(4 * MiB, 2 * MiB)
        await fe.report(3, [(4 * MiB, 2 * MiB)])
        if i % 2:
            await fe.stop()
        if i % 5 == 4:  # a broken message on the way out
            await fe.send_raw(struct.pack("=III", 5, 9, 40) + bytes(40), [guest.fd] * 3)
        await fe.aclose()
        guest.close()
        await wait_disconnected(daemon, "cycle")
    assert open_fds() == baseline


async def test_get_config_is_answered_while_a_discard_is_in_progress(
    start_daemon: StartDaemon,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real punch of a few MiB is over before the test could ask anything, so the
    # discard is held in its worker thread until the test has its GET_CONFIG answer. If
    # GET_CONFIG waited for the discard, this would deadlock and fail_after would fire.
    entered, release = threading.Event(), threading.Event()
    real_execute = discard.execute

    def held_execute(plan: discard.DiscardPlan) -> discard.DiscardResult:
        entered.set()
        release.wait(10)
        return real_execute(plan)

    monkeypatch.setattr(discard, "execute", held_execute)
    daemon = await start_daemon("vcpu", "other")
    g1, g2 = GuestMemfd(32 * MiB), GuestMemfd(32 * MiB)
    guests += [g1, g2]
    fe = await attach(str(daemon.vms[0].socket), g1, frontends)
    other = await attach(str(daemon.vms[1].socket), g2, frontends)
    fe.rings[3].add_chain([(4 * MiB, 2 * MiB, True)])
    fe.kick(3)
    assert await trio.to_thread.run_sync(entered.wait, 5)
    with trio.fail_after(2):
        assert await fe.get_config() == bytes(16)  # this VM's vCPU is not held up
        assert await other.get_config() == bytes(16)  # nor is any other VM
    assert not release.is_set()
    release.set()
    await fe.wait_call(3)


async def test_an_unsealed_guest_ram_file_shrunk_under_us_does_not_crash_the_daemon(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    # A mapping past the end of its file raises SIGBUS, which would kill every VM the
    # daemon serves. An unsealed file is therefore accessed with pread/pwrite.
    daemon = await start_daemon("shrinker", "bystander")
    bad, good = GuestMemfd(32 * MiB, sealed=False), GuestMemfd(32 * MiB)
    guests += [bad, good]
    fe = await attach(str(daemon.vms[0].socket), bad, frontends)
    ok = await attach(str(daemon.vms[1].socket), good, frontends)
    bad.populate(4 * MiB, 2 * MiB)
    before = bad.allocated()
    await fe.report(3, [(4 * MiB, 2 * MiB)])  # works while the file is whole
    assert before - bad.allocated() == 2 * MiB
    fe.rings[3].add_chain([(6 * MiB, 2 * MiB, True)])
    os.ftruncate(bad.fd, 0)  # the rings are gone from under the daemon
    fe.kick(3)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(fe.fds[3].err)
    assert sample(daemon, "protocol_errors_total", vm="shrinker", reason="region_truncated") == 1
    await ok.report(3, [(4 * MiB, 2 * MiB)])
