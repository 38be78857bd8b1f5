"""The automatic balloon policy inside the daemon, with fake frontends: targets follow
the budget through the real balloon path, a target set by hand pins the VM until
released, observe-only applies nothing. (The rules themselves: tests/unit/test_policy.py.)"""

from __future__ import annotations

import socket
import struct
from dataclasses import replace
from pathlib import Path

import trio
from prometheus_client import generate_latest

from tests.daemon_helpers import StartDaemon, sample, sample_or_none
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from tests.integration.test_balloon import control
from tests.integration.test_stats import post_stats, wait_for
from vhost_user_balloon.daemon.autoballoon.runner import AutoBalloonRunner
from vhost_user_balloon.daemon.commands.status import render
from vhost_user_balloon.daemon.config import AutoBalloon
from vhost_user_balloon.daemon.observing.metrics import PREFIX
from vhost_user_balloon.daemon.server import Daemon
from vhost_user_balloon.policy import HostView, PolicyConfig

BUDGET = 40 * MiB


def settings(observe_only: bool = False) -> AutoBalloon:
    return AutoBalloon(
        PolicyConfig(budget_bytes=BUDGET, interval_s=3600, step_bytes=8 * MiB,
                     max_reclaim_bytes=8 * MiB, margin_bytes=4 * MiB, min_free_bytes=4 * MiB,
                     min_free_percent=0),
        observe_only=observe_only,
    )  # fmt: skip


def runner_for(daemon: Daemon, observe_only: bool = False) -> AutoBalloonRunner:
    """The policy's loop over ``daemon``'s VMs, stepped by the test itself (the daemon
    runs none: its policy is off), blind to this machine's own memory pressure."""
    return AutoBalloonRunner(
        settings(observe_only), daemon.metrics.registry, lambda: daemon.connections,
        lambda: {vm.name: vm for vm in daemon.vms}, daemon.pins, host=HostView,
    )  # fmt: skip


async def attach(
    path: Path, guest: GuestMemfd, available: int, total: int
) -> tuple[FakeFrontend, socket.socket]:
    ours, qemus = socket.socketpair()
    fe = await FakeFrontend.connect(str(path), guest)
    await fe.handshake(protocol=0x228, backend_fd=ours.fileno())
    ours.close()
    await fe.start()
    guest.populate(16 * MiB, 30 * MiB)  # 30 MiB resident each (and the rings): over 40 MiB
    post_stats(fe, guest, [(6, available), (5, total)])  # MemAvailable, MemTotal
    qemus.settimeout(5)
    return fe, qemus


async def test_the_policy_inflates_the_guest_with_most_to_give_and_pins_hold(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    ctl = tmp_path / "control.sock"
    daemon = await start_daemon("a", "b", control_socket=ctl)
    runner = runner_for(daemon)
    guests = [GuestMemfd(64 * MiB), GuestMemfd(64 * MiB)]
    (fa, qa), (fb, qb) = [
        await attach(vm.socket, g, avail, total)
        for vm, g, (avail, total) in zip(
            daemon.vms, guests, ((40 * MiB, 48 * MiB), (30 * MiB, 40 * MiB)), strict=True
        )
    ]
    try:
        await wait_for(
            lambda: (sample_or_none(daemon, "guest_memory_available_bytes", vm="b") or 0) > 0
        )
        out = await runner.step()
        # 20 MiB over: a first (40 - 4 - 8 = 28 MiB reclaimable, of which 30 - 8 = 22
        # resident), at most 8 MiB (max_reclaim); then b (18 reclaimable, 20 resident)
        # the same.
        assert {d.vm: (d.target_bytes, d.reason) for d in out.decisions} == {
            "a": (8 * MiB, "over_budget"), "b": (8 * MiB, "over_budget")}  # fmt: skip
        assert struct.unpack("<I", (await fa.get_config())[:4])[0] == 8 * MiB // 4096
        assert struct.unpack("=III", qa.recv(12)) == (2, 1, 0)  # QEMU told of the change
        assert sample(daemon, "auto_balloon_decisions_total", vm="a", direction="inflate",
                      reason="over_budget") == 1  # fmt: skip
        assert 60 * MiB < sample(daemon, "auto_balloon_resident_bytes") < 61 * MiB
        assert sample(daemon, "auto_balloon_budget_bytes") == BUDGET
        assert sample(daemon, "auto_balloon_floor_bytes", vm="a") == 4 * MiB

        # b set by hand: pinned, the policy leaves it; released, it decides again.
        assert (await control(ctl, {"vm": "b", "target_bytes": 2 * MiB}))["pinned"]
        out = await runner.step()
        assert [(d.vm, d.reason) for d in out.decisions if d.vm == "b"] == [("b", "pinned")]
        # status shows each VM's balloon and why, from the one reason series per VM
        assert sample(daemon, "auto_balloon_reason", vm="b", reason="pinned") == 1
        gone = {"vm": "b", "reason": "over_budget"}
        assert (
            daemon.metrics.registry.get_sample_value(f"{PREFIX}_auto_balloon_reason", gone) is None
        )
        table = render(generate_latest(daemon.metrics.registry).decode())
        row = next(line for line in table.splitlines() if line.startswith("b "))
        assert "2M 1000 pinned" in " ".join(row.split()), table  # its shares: the default
        assert (await control(ctl, {"vm": "b"}))["target_bytes"] == 2 * MiB
        assert not (await control(ctl, {"vm": "b", "release": True}))["pinned"]
        out = await runner.step()
        assert [d.reason for d in out.decisions if d.vm == "b"] != ["pinned"]
    finally:
        for fe in (fa, fb):
            await fe.aclose()
        for c in (qa, qb):
            c.close()
        for g in guests:
            g.close()


async def test_observe_only_decides_and_applies_nothing(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon("a")
    runner = runner_for(daemon, observe_only=True)
    guest = GuestMemfd(64 * MiB)
    fe, qemus = await attach(daemon.vms[0].socket, guest, 40 * MiB, 48 * MiB)
    try:
        guest.populate(48 * MiB, 14 * MiB)  # 44 MiB resident, one VM
        await wait_for(
            lambda: (sample_or_none(daemon, "guest_memory_available_bytes", vm="a") or 0) > 0
        )
        out = await runner.step()
        # over by what the guest holds beyond the budget: all of it and the band's 4 MiB
        # in one decision, at most max_reclaim (8 MiB)
        assert [(d.vm, d.target_bytes) for d in out.decisions] == [
            ("a", min(out.resident_bytes - BUDGET + 4 * MiB, 8 * MiB))]  # fmt: skip
        assert sample(daemon, "auto_balloon_decisions_total", vm="a", direction="inflate",
                      reason="over_budget") == 1  # fmt: skip
        assert struct.unpack("<I", (await fe.get_config())[:4])[0] == 0  # not applied
        qemus.settimeout(0.2)
        with trio.fail_after(1):
            try:
                qemus.recv(12)
                raise AssertionError("QEMU was told of a change in observe-only mode")
            except TimeoutError:
                pass
    finally:
        await fe.aclose()
        qemus.close()
        guest.close()


async def test_the_policy_turned_off_and_on_again_by_a_reload(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """SIGHUP can turn the policy off and on again, as often as it likes. (The chaos
    soak, seed 7, found the second start registering the policy's series a second
    time: the daemon died with a duplicated-series error.)"""
    daemon = await start_daemon("a", auto_balloon=settings())
    on = daemon.settings
    for policy in (None, settings(), None, settings(observe_only=True)):
        daemon.reload(replace(on, auto_balloon=policy))
        budget = sample_or_none(daemon, "auto_balloon_budget_bytes")
        assert budget == (None if policy is None else BUDGET), policy
