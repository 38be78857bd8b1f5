"""Inflate and deflate: the daemon sets a target through the control socket, tells QEMU
over the backend channel, and frees the pages the guest puts into the balloon."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.daemon_helpers import StartDaemon, sample, wait_disconnected
from tests.frontend import PAGE, FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.commands.balloon import main as balloon_command
from vhost_user_balloon.daemon.server import Daemon
from vhost_user_balloon.protocol import U64, Config, Request, VringState, encode_message

PFNS_AT = 12 * MiB  # where the test guest writes its page frame arrays


async def control(path: Path, request: dict[str, object]) -> dict[str, object]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    await sock.send(json.dumps(request).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = await sock.recv(4096)
        assert chunk
        data += chunk
    sock.close()
    return dict(json.loads(data))


def post_pfns(fe: FakeFrontend, guest: GuestMemfd, queue: int, pfns: list[int]) -> None:
    """Like Linux: arrays of at most 256 frame numbers, one buffer each."""
    for i in range(0, len(pfns), 256):
        chunk = pfns[i : i + 256]
        at = PFNS_AT + 4 * i
        guest.ram.write(at, struct.pack(f"<{len(chunk)}I", *chunk))
        fe.rings[queue].add_chain([(at, 4 * len(chunk), False)])
    fe.kick(queue)


async def config_change(qemus: socket.socket) -> bool:
    """QEMU's end of the backend channel got CONFIG_CHANGE_MSG (read in a thread: the
    daemon runs in this event loop)."""
    message = await trio.to_thread.run_sync(qemus.recv, 12)
    return struct.unpack("=III", message) == (2, 1, 0)


def config_changes(qemus: socket.socket) -> int:
    """How many CONFIG_CHANGE_MSG QEMU's end of the backend channel holds now (read
    without waiting: the daemon runs in this event loop, between our awaits)."""
    timeout, data = qemus.gettimeout(), b""
    qemus.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while chunk := qemus.recv(4096):
            data += chunk
    qemus.settimeout(timeout)
    messages = [data[i : i + 12] for i in range(0, len(data), 12)]
    assert all(struct.unpack("=III", m) == (2, 1, 0) for m in messages), data
    return len(messages)


async def test_inflate_frees_the_guests_pages_and_deflate_gives_them_back(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    ctl = tmp_path / "control.sock"
    daemon = await start_daemon("vm", control_socket=ctl)
    assert ctl.stat().st_mode & 0o777 == 0o600
    guest = GuestMemfd(32 * MiB)
    ours, qemus = socket.socketpair()  # QEMU's backend channel: it keeps one end
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake(protocol=0x228, backend_fd=ours.fileno())
        ours.close()
        await fe.start()
        assert (await control(ctl, {"vm": "vm"}))["target_bytes"] == 0

        reply = await control(ctl, {"vm": "vm", "target_bytes": 2 * MiB})
        assert reply["ok"] and reply["target_bytes"] == 2 * MiB
        qemus.settimeout(5)
        assert await config_change(qemus)  # CONFIG_CHANGE_MSG
        num_pages = struct.unpack("<I", (await fe.get_config())[:4])[0]
        assert num_pages == 512

        # The guest gives up 512 pages, populated, with a canary page right after.
        guest.populate(16 * MiB, 2 * MiB + PAGE)
        guest.populate(PFNS_AT, 2 * PAGE)  # the page frame arrays live here
        before = guest.allocated()
        post_pfns(fe, guest, 0, [(16 * MiB) // PAGE + i for i in range(512)])
        # Two buffers, a call each; two calls may come before one read of the eventfd.
        with trio.fail_after(5):
            while fe.rings[0].used_idx() < 2:
                await fe.wait_call(0)
        assert fe.rings[0].used_idx() == 2
        assert before - guest.allocated() == 2 * MiB
        assert guest.file_page_present(18 * MiB)  # the canary
        await fe.ack(Request.SET_CONFIG, Config(0, 16, 0, struct.pack("<IIII", 512, 512, 0, 0)))
        assert sample(daemon, "actual_bytes", vm="vm") == 2 * MiB
        assert sample(daemon, "balloon_inflated_bytes_total", vm="vm") == 2 * MiB
        assert sample(daemon, "target_bytes", vm="vm") == 2 * MiB

        # Deflate: back to 0; the pages simply come back when the guest touches them.
        await control(ctl, {"vm": "vm", "target_bytes": 0})
        assert await config_change(qemus)
        post_pfns(fe, guest, 1, [(16 * MiB) // PAGE + i for i in range(512)])
        with trio.fail_after(5):
            while fe.rings[1].used_idx() < 2:
                await trio.sleep(0.01)
        assert sample(daemon, "balloon_deflated_bytes_total", vm="vm") == 2 * MiB

        bad = await control(ctl, {"vm": "nope", "target_bytes": 1})
        assert not bad["ok"] and "no VM named" in str(bad["error"])
        bad = await control(ctl, {"vm": "vm", "target_bytes": -1})
        assert not bad["ok"]
    finally:
        await fe.aclose()
        qemus.close()
        guest.close()


async def test_without_a_backend_channel_the_target_is_refused(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    ctl = tmp_path / "control.sock"
    daemon = await start_daemon("vm", control_socket=ctl)
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake()  # QEMU that did not negotiate BACKEND_REQ
        await fe.start()
        reply = await control(ctl, {"vm": "vm", "target_bytes": MiB})
        assert not reply["ok"] and "backend channel" in str(reply["error"])
        assert (await control(ctl, {"vm": "vm"}))["target_bytes"] == 0
    finally:
        await fe.aclose()
        guest.close()


async def test_a_balloon_target_for_an_unplugged_device_fails_alone(
    start_daemon: StartDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QEMU closes the backend channel when the device is unplugged (device_del) but the
    vhost-user socket stays until chardev-remove. A balloon command in that window is
    refused with a message that says why; the daemon, this VM's connection and the
    other VM go on (it used to kill the whole daemon with BrokenPipeError)."""
    ctl = tmp_path / "control.sock"
    daemon = await start_daemon("gone", "other", control_socket=ctl)
    frontends: list[FakeFrontend] = []
    channels: list[socket.socket] = []
    guests = [GuestMemfd(16 * MiB), GuestMemfd(16 * MiB)]
    try:
        for vm, guest in zip(daemon.vms, guests, strict=True):
            ours, qemus = socket.socketpair()
            fe = await FakeFrontend.connect(str(vm.socket), guest)
            frontends.append(fe)
            await fe.handshake(protocol=0x228, backend_fd=ours.fileno())
            ours.close()
            await fe.start()
            channels.append(qemus)
        channels[0].close()  # device_del: QEMU's end of the channel is gone

        reply = await control(ctl, {"vm": "gone", "target_bytes": 128 * MiB})
        assert not reply["ok"] and "closed the balloon's backend channel" in str(reply["error"])
        # The command line prints the daemon's words.
        code = await trio.to_thread.run_sync(
            balloon_command, ["gone", "64M", f"--control-socket={ctl}"]
        )
        assert code == 1
        assert "backend channel" in capsys.readouterr().err

        # This VM's connection goes on: its guest still reads its config.
        assert len(await frontends[0].get_config()) == 16
        # The other VM is untouched: targets and reports work as before.
        assert (await control(ctl, {"vm": "other", "target_bytes": 2 * MiB}))["ok"]
        channels[1].settimeout(5)
        assert struct.unpack("=III", channels[1].recv(12)) == (2, 1, 0)
        guests[1].populate(8 * MiB, 2 * MiB)
        before = guests[1].allocated()
        await frontends[1].report(3, [(8 * MiB, 2 * MiB)])
        assert before - guests[1].allocated() == 2 * MiB
        assert set(daemon.connections) == {"gone", "other"}
    finally:
        for fe in frontends:
            await fe.aclose()
        for c in channels:
            c.close()
        for g in guests:
            g.close()


@contextlib.asynccontextmanager
async def vm_with_channel(
    start_daemon: StartDaemon, ctl: Path
) -> AsyncIterator[tuple[Daemon, FakeFrontend, socket.socket]]:
    """A daemon serving the VM ``vm`` with a control socket at ``ctl``, and a frontend
    that has done QEMU's handshake with a backend channel; QEMU's end of the channel
    (timeout 5 s). No queue started."""
    daemon = await start_daemon("vm", control_socket=ctl)
    guest = GuestMemfd(16 * MiB)
    ours, qemus = socket.socketpair()
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    qemus.settimeout(5)
    try:
        await fe.handshake(protocol=0x228, backend_fd=ours.fileno())
        ours.close()
        yield daemon, fe, qemus
    finally:
        await fe.aclose()
        qemus.close()
        guest.close()


async def test_a_target_for_a_device_no_driver_started_is_kept_for_the_driver(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A device just added (migrate-finish, a replug, a VM booting): QEMU has connected,
    no guest driver has started it. A target set now goes into the config space,
    and QEMU is told when the device starts: told before, QEMU 11.1.3 dies of SIGSEGV
    (its device has no virtio device before a driver starts it)."""
    ctl = tmp_path / "control.sock"
    async with vm_with_channel(start_daemon, ctl) as (_, fe, qemus):
        reply = await control(ctl, {"vm": "vm", "target_bytes": 4 * MiB})
        assert reply["ok"] and reply["pinned"]
        assert config_changes(qemus) == 0  # nothing sent to QEMU
        await fe.start()
        assert config_changes(qemus) == 1  # told once the device runs
        assert num_pages(await fe.get_config()) == (4 * MiB // 4096, 0)
        # Started: the next target is told at once, as always.
        assert (await control(ctl, {"vm": "vm", "target_bytes": 2 * MiB}))["ok"]
        qemus.settimeout(5)
        assert await config_change(qemus)


async def test_a_target_while_the_driver_has_stopped_the_device_waits_for_the_next(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The guest's driver stops the device (a reboot, the driver unbound, the first step
    of an unplug): QEMU disables every queue, then takes their bases. From the first
    disable until a driver starts the device again, a config change on the backend
    channel makes QEMU 11.1.3 die of SIGSEGV (a guest rebooting while its target
    changed killed the VM; found by the soak with a real guest). So a target set then
    waits in the config space and QEMU hears of it when the device starts again;
    once QEMU has closed the channel (the unplug done), it is refused as before."""
    ctl = tmp_path / "control.sock"
    async with vm_with_channel(start_daemon, ctl) as (_, fe, qemus):
        await fe.start()
        assert config_changes(qemus) == 0  # started at its target (none): no word
        assert (await control(ctl, {"vm": "vm", "target_bytes": 2 * MiB}))["ok"]
        assert await config_change(qemus)  # running: told at once

        # The stop's first step: the queues disabled, their bases not taken yet.
        for i in range(len(fe.fds)):
            await fe.ack(Request.SET_VRING_ENABLE, VringState(i, 0))
        assert (await control(ctl, {"vm": "vm", "target_bytes": 4 * MiB}))["ok"]
        await fe.stop()  # the bases taken: stopped
        assert (await control(ctl, {"vm": "vm", "target_bytes": 6 * MiB}))["ok"]
        assert config_changes(qemus) == 0  # not a word to QEMU while stopped

        # The device starts again (a rebooted guest's driver, or a paused VM resumed:
        # that driver would not read the config by itself): told once, the last target.
        await fe.start()
        assert config_changes(qemus) == 1
        assert num_pages(await fe.get_config()) == (6 * MiB // 4096, 0)
        assert (await control(ctl, {"vm": "vm", "target_bytes": 2 * MiB}))["ok"]
        qemus.settimeout(5)
        assert await config_change(qemus)  # running again: told again

        # An unplug done: the driver let go of the device and QEMU closed the channel.
        # Refused with words, and the failed command changes nothing.
        await fe.stop()
        qemus.close()
        reply = await control(ctl, {"vm": "vm", "target_bytes": 8 * MiB})
        assert not reply["ok"] and "closed the balloon's backend channel" in str(reply["error"])
        assert num_pages(await fe.get_config()) == (2 * MiB // 4096, 0)


async def test_a_stop_qemu_has_sent_is_handled_before_a_target_is_told(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A guest's reset can come while a queue holds the ring lock (a report's blocks
    being punched): QEMU's first stop message then waits in the socket. A target set
    in that time waits for it to be handled, and then waits for the next start instead
    of being told to a device that is stopping."""
    ctl = tmp_path / "control.sock"
    async with vm_with_channel(start_daemon, ctl) as (daemon, fe, qemus):
        await fe.start()
        lock = daemon.connections["vm"].ring_lock
        await lock.acquire()  # a queue busy with a report's discards
        disable = encode_message(Request.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
        await fe.send_raw(disable)  # the stop's first message, held behind the lock
        replies: list[dict[str, object]] = []

        async def command() -> None:
            replies.append(await control(ctl, {"vm": "vm", "target_bytes": 4 * MiB}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(command)
            await trio.sleep(0.2)
            assert replies == []  # waiting for QEMU's message to be handled
            lock.release()
        assert replies[0]["ok"]
        assert struct.unpack("=IIIQ", await fe.recv_exact(20))[3] == 0  # the disable's ack
        assert config_changes(qemus) == 0  # the stopping device was not told
        assert num_pages(await fe.get_config()) == (4 * MiB // 4096, 0)


def num_pages(config: bytes) -> tuple[int, int]:
    """(num_pages, actual) of a balloon config space."""
    return struct.unpack("<II", config[:8])


async def test_the_target_outlives_the_device_and_the_connection(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """What a live migration does: the device is unplugged (its queues stopped, its
    backend channel closed) and a new one realized, first on the same connection
    (device_del + device_add), then on a new one (chardev-remove, a new QEMU). Each new
    device is a fresh session, and its guest reads the target set before."""
    ctl = tmp_path / "control.sock"
    daemon = await start_daemon("vm", control_socket=ctl)
    guest = GuestMemfd(32 * MiB)
    channels = [socket.socketpair() for _ in range(3)]
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake(protocol=0x228, backend_fd=channels[0][0].fileno())
        await fe.start()
        assert (await control(ctl, {"vm": "vm", "target_bytes": 4 * MiB}))["ok"]
        await fe.ack(Request.SET_CONFIG, Config(0, 16, 0, struct.pack("<IIII", 1024, 1024, 0, 0)))

        # device_del: the guest's reset stops the queues, QEMU closes the channel ...
        await fe.stop()
        channels[0][1].close()
        # ... device_add on the same chardev: a new handshake on this connection.
        await fe.handshake(protocol=0x228, backend_fd=channels[1][0].fileno())
        await fe.start()
        assert num_pages(await fe.get_config()) == (1024, 0)
        assert sample(daemon, "actual_bytes", vm="vm") == 0
        guest.populate(16 * MiB, 2 * MiB)
        before = guest.allocated()
        await fe.report(3, [(16 * MiB, 2 * MiB)])
        assert before - guest.allocated() == 2 * MiB
        assert (await control(ctl, {"vm": "vm", "target_bytes": 8 * MiB}))["ok"]
        channels[1][1].settimeout(5)
        assert struct.unpack("=III", channels[1][1].recv(12)) == (2, 1, 0)  # the new channel

        # chardev-remove, and a new QEMU (a migration's destination) connects.
        await fe.aclose()
        await wait_disconnected(daemon, "vm")
        reply = await control(ctl, {"vm": "vm"})
        assert not reply["attached"]
        fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
        await fe.handshake(protocol=0x228, backend_fd=channels[2][0].fileno())
        await fe.start()
        assert num_pages(await fe.get_config()) == (2048, 0)
        assert (await control(ctl, {"vm": "vm"}))["target_bytes"] == 8 * MiB
        assert sample(daemon, "target_bytes", vm="vm") == 8 * MiB
    finally:
        await fe.aclose()
        for a, b in channels:
            a.close()
            b.close()
        guest.close()


async def test_a_new_handshake_while_queues_run_is_a_protocol_error(
    start_daemon: StartDaemon,
) -> None:
    daemon = await start_daemon("vm")
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake()
        await fe.start()
        await fe.request(Request.SET_PROTOCOL_FEATURES, U64(0x208))
        await wait_disconnected(daemon, "vm")
        assert (
            sample(daemon, "protocol_errors_total", vm="vm", reason="handshake_while_running") == 1
        )
    finally:
        await fe.aclose()
        guest.close()
