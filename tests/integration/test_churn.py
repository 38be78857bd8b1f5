"""Churn: what of the memory given back for reports the guest took again, per order
and window, read from the guest RAM file itself; bounded whatever the guest reports."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio

from tests.daemon_helpers import RunCommand, StartDaemon, attach, sample, sample_or_none
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.server import Daemon
from vhost_user_balloon.daemon.serving import churn
from vhost_user_balloon.daemon.serving.churn import ChurnSampler, data_bytes
from vhost_user_balloon.daemon.serving.discard import Punch


async def checked(daemon: Daemon, window: str) -> None:
    """Until the daemon's first churn check of ``window`` is counted."""
    labels = {"vm": "vm", "order": "9", "window": window}
    with trio.fail_after(10):
        while not sample_or_none(daemon, "churn_checked_bytes_total", **labels):
            await trio.sleep(0.05)


@pytest.mark.trio
async def test_a_block_written_again_counts_and_one_left_alone_does_not(
    start_daemon: StartDaemon,
    frontends: list[FakeFrontend],
    guests: list[GuestMemfd],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The windows shortened (their labels kept): 10 s and 60 s of a test are too long.
    monkeypatch.setattr(churn, "WINDOWS", (("10s", 0.5), ("60s", 3.0)))
    daemon = await start_daemon("vm")
    guest = GuestMemfd(32 * MiB)
    guests.append(guest)
    fe = await attach(str(daemon.vms[0].socket), guest, frontends)
    guest.populate(4 * MiB, 2 * MiB)
    guest.populate(8 * MiB, 2 * MiB)
    await fe.report(3, [(4 * MiB, 2 * MiB), (8 * MiB, 2 * MiB)])  # two order-9 blocks
    guest.populate(4 * MiB, MiB)  # the guest takes half of the first one again

    def series(name: str, window: str) -> float:
        return sample(daemon, name, vm="vm", order="9", window=window)

    await checked(daemon, "10s")
    assert series("churn_checked_bytes_total", "10s") == 4 * MiB
    assert series("churn_resident_bytes_total", "10s") == MiB
    # Between the windows the guest writes into the second block too.
    guest.populate(8 * MiB, MiB // 2)
    await checked(daemon, "60s")
    assert series("churn_checked_bytes_total", "60s") == 4 * MiB
    assert series("churn_resident_bytes_total", "60s") == MiB + MiB // 2
    assert series("churn_resident_bytes_total", "10s") == MiB  # counted once


def test_sampling_is_bounded_by_the_rate_whatever_is_reported(tmp_path: Path) -> None:
    now = [0.0]
    got: list[tuple[int, str, int, int]] = []
    sampler = ChurnSampler(
        lambda *a: got.append(a), windows=(("10s", 10.0),), rate=16, clock=lambda: now[0]
    )
    fd = os.memfd_create("ram")
    try:
        os.ftruncate(fd, 64 * MiB)
        blocks = [Punch(fd, i * 4096, 4096, 0) for i in range(1000)]
        sampler.punched(blocks)
        assert sampler.pending == 16  # the burst
        now[0] = 0.5
        sampler.punched(blocks)
        assert sampler.pending == 24  # eight more tokens in half a second
        sampler.punched([Punch(fd, 0, 4096)] * 10)  # huge-page RAM: never sampled
        assert sampler.pending == 24
        now[0] = 10.5
        sampler.check()
        assert sampler.pending == 0 and len(got) == 24
        assert all(r == (0, "10s", 4096, 0) for r in got)
    finally:
        os.close(fd)


def test_data_bytes_reads_the_file_and_refuses_another_one() -> None:
    fd, other = os.memfd_create("ram"), os.memfd_create("other")
    try:
        os.ftruncate(fd, 8 * MiB)
        os.pwrite(fd, b"x", 1 * MiB)
        os.pwrite(fd, b"x" * 8192, 3 * MiB - 4096)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        assert data_bytes(fd, ident, 0, 8 * MiB) == 4096 + 8192
        assert data_bytes(fd, ident, 3 * MiB, MiB) == 4096  # the part inside
        assert data_bytes(fd, ident, 4 * MiB, MiB) == 0
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # its own descriptor: no offset moved
        assert data_bytes(other, ident, 0, MiB) is None  # an fd number reused
    finally:
        os.close(fd)
        os.close(other)


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert found is not None
    return int(found.group(1))


@pytest.mark.trio
async def test_a_guest_reporting_without_pause_keeps_the_daemon_flat(
    run_command: RunCommand, tmp_path: Path, frontends: list[FakeFrontend]
) -> None:
    sock = tmp_path / "vm.sock"
    logs = run_command("--log-format=json", f"--vm=vm={sock}", "--metrics-listen=127.0.0.1:0")
    await trio.to_thread.run_sync(logs.wait_for, "daemon_ready")
    guest = GuestMemfd(64 * MiB)
    try:
        fe = await attach(str(sock), guest, frontends)
        blocks = [(i * 2 * MiB, 2 * MiB) for i in range(8, 24)]  # 16 blocks a report

        async def reports(n: int) -> None:
            for _ in range(n):
                await fe.report(3, blocks)

        await reports(1000)  # warmed up
        before = rss_kib(logs.proc.pid)
        await reports(10_000)
        after = rss_kib(logs.proc.pid)
        # 160,000 blocks given back; each one kept would be ~200 bytes: 30 MiB
        assert after - before < 4096, (before, after)
        print(f"\ndaemon RSS {before} -> {after} KiB over 10,000 reports of 16 blocks")
    finally:
        guest.close()
