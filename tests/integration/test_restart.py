"""Restarts without the frontend noticing: the real supervisor and daemon processes,
``kill -9``, a planned restart, and the connection still the same socket throughout.

The frontend is the Python fake (the real-QEMU proof is in tests/e2e): it can look
at the ring and at the socket byte by byte, which QEMU cannot show us.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon_helpers import Logs, RunCommand, attach, free_port, scrape, settings_for
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from tests.service_manager import ServiceManager
from vhost_user_balloon.daemon.config import VmSpec
from vhost_user_balloon.daemon.handover.store import (
    STATE_SLOT_BYTES,
    KeptVm,
    StateFile,
    kept_vms,
)
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.server import Daemon, Inherited
from vhost_user_balloon.daemon.serving.connection import VmConnection
from vhost_user_balloon.daemon.serving.framing import FrontendStream
from vhost_user_balloon.protocol import Config, Request, VringFile, encode_message

SUPERVISE = [sys.executable, "-m", "vhost_user_balloon", "supervise"]
REPORTED = 'vhost_user_balloon_reported_bytes_total{order="10",vm="web1"}'


async def give_back(fe: FakeFrontend, gpa: int) -> None:
    """Populate 4 MiB, report it, check exactly that came back."""
    before = fe.guest.allocated()
    fe.guest.populate(gpa, 4 * MiB)
    await fe.report(3, [(gpa, 4 * MiB)])
    assert fe.guest.allocated() == before


async def kill_9(fe: FakeFrontend, config: bytes, logs: Logs, port: int) -> None:
    """kill -9 the daemon with a report the guest posted but never kicked: only the
    next process, reading the ring as it takes the connection up, can serve it."""
    # Prometheus scrapes (4 MiB reported so far): the totals are saved as it does.
    assert f"{REPORTED} 4.194304e+06" in await trio.to_thread.run_sync(scrape, port)
    await give_back(fe, 24 * MiB)  # counted after the last scrape: lost with the kill
    before = fe.guest.allocated()
    fe.guest.populate(12 * MiB, 4 * MiB)
    head = fe.rings[3].add_chain([(12 * MiB, 4 * MiB, True)])
    os.kill(logs.wait_for("daemon_started")["pid"], signal.SIGKILL)
    await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
    await fe.wait_call(3)
    assert (head, 0) in fe.rings[3].take_used()
    assert fe.guest.allocated() == before
    # the log lines may reach this test after the call does
    await trio.to_thread.run_sync(lambda: logs.wait_for("queue_resumed", count=4))
    resumed = {r["queue"]: r["outstanding"] for r in logs.events("queue_resumed")}
    assert resumed == {0: 0, 1: 0, 2: 0, 3: 1}, resumed
    # The session went on: config and reports over the very same socket.
    assert await fe.get_config() == config
    await give_back(fe, 16 * MiB)
    text = await trio.to_thread.run_sync(scrape, port)
    assert 'vhost_user_balloon_connected{vm="web1"} 1.0' in text
    # Counters go on from what Prometheus last saw (4 MiB), plus the report posted
    # before the kill and the one after: never less than a scrape showed.
    assert f"{REPORTED} 1.2582912e+07" in text
    assert 'vhost_user_balloon_connections_adopted_total{vm="web1"} 1.0' in text
    assert "vhost_user_balloon_start_time_seconds " in text


async def planned_restart(fe: FakeFrontend, config: bytes, logs: Logs, port: int) -> None:
    """SIGUSR2 to the supervisor: the daemon hands over and a new one takes up."""
    logs.proc.send_signal(signal.SIGUSR2)
    await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted", 2)
    await give_back(fe, 20 * MiB)
    assert await fe.get_config() == config
    # A clean stop saves the totals exactly: 12 MiB before, 4 MiB since.
    assert f"{REPORTED} 1.6777216e+07" in await trio.to_thread.run_sync(scrape, port)
    stopped = logs.events("frontend_disconnected")
    assert [r["why"] for r in stopped] == ["shutdown"] and stopped[0]["handed_over"]


def test_kill_9_and_a_planned_restart_keep_the_connection(
    run_command: RunCommand, tmp_path: Path
) -> None:
    sock = tmp_path / "web1.sock"
    port = free_port()
    logs = run_command(
        "supervise", "--log-format=json", f"--vm=web1={sock}", f"--metrics-listen=127.0.0.1:{port}"
    )
    logs.wait_for("daemon_ready")

    async def frontend() -> None:
        guest = GuestMemfd(64 * MiB)
        fe = await FakeFrontend.connect(str(sock), guest)
        try:
            await fe.handshake()
            await fe.start()
            config = await fe.get_config()
            await give_back(fe, 8 * MiB)
            await kill_9(fe, config, logs, port)
            await planned_restart(fe, config, logs, port)
            # Stopping the supervisor ends the connection for real.
            logs.proc.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: logs.proc.wait(10)) == 0
            with trio.fail_after(5):
                assert await fe.sock.recv(1) == b""
        finally:
            await fe.aclose()
            guest.close()

    trio.run(frontend)
    pids = [r["pid"] for r in logs.events("daemon_started")]
    assert len(pids) == 3 and len(set(pids)) == 3
    exits = logs.events("daemon_exited")
    assert [r["how"] for r in exits] == ["killed by SIGKILL"]


# -- a process dying in the middle of a message ---------------------------------------
class Crash:
    """A daemon in this process that 'dies' the first time one of its connection
    methods is called (optionally: with arguments that ``when`` accepts): the keeper's
    holdings are copied at that instant, and the process never gets any further."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, mp: pytest.MonkeyPatch) -> None:
        #: systemd's fd store, played by the test in this process: it keeps what the
        #: daemon stores and can hand a copy of everything to a second daemon
        self.keeper = ServiceManager(tmp_path / "notify")
        self.nursery, self.mp = nursery, mp
        self.vm = VmSpec("web1", tmp_path / "web1.sock")
        self.dead, self.buried = trio.Event(), trio.Event()
        self.copy: dict[str, int] = {}

    def daemon(self, kept: dict[str, KeptVm] | None = None) -> Daemon:
        inherited = Inherited(kept=kept or {}, fd_store=True, notifier=self.keeper.notifier)
        return Daemon(settings_for([self.vm]), metrics=Metrics(), inherited=inherited)

    async def start_first(self) -> None:
        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                await self.daemon().run(task_status=task_status)
            except* _Gone:
                pass  # died in a synchronous method: the whole process stops there

        await self.nursery.start(run)

    def arm(self, method: str, when: Any = lambda *args: True, on: type = VmConnection) -> None:
        """Die in ``on.method`` (a method of the connection, or of its ``FrontendStream``)."""
        real = getattr(on, method)

        async def dies(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if self.dead.is_set() or not when(*args):
                return await real(conn, *args, **kwargs)
            self.copy.update(self.keeper.crash_copy())
            self.dead.set()
            self.mp.setattr(on, method, real)
            await self.buried.wait()  # gone: it does nothing more until the test ends
            return None

        def sync_dies(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if self.dead.is_set() or not when(*args):
                return real(conn, *args, **kwargs)
            self.copy.update(self.keeper.crash_copy())
            self.dead.set()
            self.mp.setattr(on, method, real)
            raise _Gone

        is_async = inspect.iscoroutinefunction(real)
        self.mp.setattr(on, method, dies if is_async else sync_dies)

    async def successor(self) -> Daemon:
        """The next process, started from what the keeper held when the first died."""
        with trio.fail_after(5):
            await self.dead.wait()
        second = self.daemon(kept_vms(self.copy))
        await self.nursery.start(second.run)
        return second

    def bury(self) -> None:
        self.buried.set()
        self.keeper.close()


class _Gone(BaseException):
    """Stops a 'dead' process's task in a synchronous method (it never returns)."""


@pytest.fixture
async def crash(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Crash]:
    c = Crash(tmp_path, nursery, monkeypatch)
    yield c
    c.bury()


@pytest.mark.parametrize("dies_in", ["consume", "send"])
async def test_a_reply_owed_by_a_dead_process_is_sent_once(
    crash: Crash, guests: list[GuestMemfd], frontends: list[FakeFrontend], dies_in: str
) -> None:
    """The daemon has applied GET_CONFIG and saved that it owes the reply, then dies
    before taking the message out of the socket (``consume``) or before sending the
    reply (``send``). The next process sends the reply, exactly once."""
    await crash.start_first()
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    fe = await attach(str(crash.vm.socket), guest, frontends)
    config = await fe.get_config()
    crash.arm(dies_in, on=FrontendStream)
    await fe.send_raw(encode_message(Request.GET_CONFIG, Config(0, 16, 0, bytes(16))))
    second = await crash.successor()
    with trio.fail_after(5):
        head = await fe.recv_exact(12)
        assert struct.unpack("=III", head) == (Request.GET_CONFIG, 0x5, 12 + 16)
        assert (await fe.recv_exact(12 + 16))[12:] == config
    # Exactly once: the next reply on the socket answers the next request (request()
    # checks the reply's request code).
    assert await fe.request(Request.GET_FEATURES, expect_reply=True) is not None
    assert list(second.connections) == ["web1"]
    fe.sock.close()


async def test_a_message_the_dead_process_never_saved_is_applied_by_the_next(
    crash: Crash, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    """SET_VRING_CALL with a new eventfd: the first process applies it, stores the fd,
    and dies before saving its state. The message is still in the socket (it was only
    peeked), so the next process applies it (fd and all) and acknowledges it; the fd
    the dead process stored but never named is let go."""
    await crash.start_first()
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    fe = await attach(str(crash.vm.socket), guest, frontends)
    crash.arm("_save", when=lambda owed: owed is not None)
    new_call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    old_call, fe.fds[3].call = fe.fds[3].call, new_call
    await fe.send_raw(
        encode_message(Request.SET_VRING_CALL, VringFile(3, False), need_reply=True), [new_call]
    )
    second = await crash.successor()
    with trio.fail_after(5):
        head = await fe.recv_exact(12)
        assert struct.unpack("=III", head) == (Request.SET_VRING_CALL, 0x5, 8)
        assert await fe.recv_exact(8) == struct.pack("=Q", 0)
    before = guest.allocated()
    guest.populate(8 * MiB, 4 * MiB)
    await fe.report(3, [(8 * MiB, 4 * MiB)])  # the interrupt comes on the new eventfd
    assert guest.allocated() == before
    os.close(old_call)
    conn = second.connections["web1"]
    keeper = conn.handover.keeper
    assert keeper is not None
    # No orphan left: the keeper holds the listening socket, the daemon's metric
    # totals and the connection's fds.
    assert crash.keeper.names() == {"vub.web1.listen", "vub.@daemon.metrics", *keeper.stored}


async def die_owing_a_reply(
    crash: Crash, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    """The first process, one VM attached, dies having applied a GET_CONFIG and
    before saving that it owes the reply."""
    await crash.start_first()
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    fe = await attach(str(crash.vm.socket), guest, frontends)
    crash.arm("_save", when=lambda owed: owed is not None)
    await fe.send_raw(encode_message(Request.GET_CONFIG, Config(0, 16, 0, bytes(16))))
    with trio.fail_after(5):
        await crash.dead.wait()


async def test_a_connection_whose_state_is_lost_is_closed_and_the_rest_go_on(
    crash: Crash, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    """The saved state is unreadable (both slots overwritten): that VM cannot be taken
    up, so its fds are let go (its QEMU sees the end, as without a keeper) with an
    error that says so; the daemon starts and serves new connections."""
    await die_owing_a_reply(crash, guests, frontends)
    os.pwrite(crash.copy["vub.web1.state"], b"\0" * (2 * STATE_SLOT_BYTES), 0)
    second = await crash.successor()
    crash.buried.set()  # the first process is really gone now: its copies close
    with trio.fail_after(5):
        while "web1" in second.connections:
            await trio.sleep(0.01)
        assert crash.keeper.names() == {"vub.web1.listen", "vub.@daemon.metrics"}
    # A new QEMU can attach to the same socket, served by the new process.
    fe2 = await attach(str(crash.vm.socket), GuestMemfd(16 * MiB), frontends)
    guests.append(fe2.guest)
    assert await fe2.get_config()


async def test_a_saved_state_that_cannot_be_restored_leaves_no_fd_behind(
    crash: Crash, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    """The saved state is intact but describes a session that cannot be restored (a
    ring past the device's queues): that VM is let go as with a lost state, and the
    new process holds none of its fds (its connection's socket and state file stayed
    open in the daemon, served by nothing, before)."""
    await die_owing_a_reply(crash, guests, frontends)
    state = StateFile(crash.copy["vub.web1.state"])
    record = state.read()
    assert record is not None and record["session"]["vrings"]
    record["session"]["vrings"][0]["index"] = 9  # a valid number, past the saved queues
    record["session"]["queues"] = 5
    state.write(record)
    second = await crash.successor()
    crash.buried.set()  # the first process is really gone now: its copies close
    with trio.fail_after(5):
        while crash.keeper.names() != {"vub.web1.listen", "vub.@daemon.metrics"}:
            await trio.sleep(0.01)
    assert "web1" not in second.connections
    await trio.sleep(0.1)
    assert _state_files() == 0


def _state_files() -> int:
    """This process's open fds on a VM's state memfd."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += "vhost-user-balloon-state-web1" in os.readlink(f"/proc/self/fd/{fd}")
    return count


async def test_connections_that_end_leave_no_fd_behind_under_a_keeper(crash: Crash) -> None:
    """Under a keeper each new connection gets a state file; when the connection ends
    for good, the keeper and the daemon let go of it with the rest. (The chaos soak,
    seed 3, found the daemon's first copy left open: a memfd per ended connection, so
    per reconnect, hostile peer or unplug.)"""
    await crash.start_first()
    baseline: set[str] = set()
    for i in range(6):
        if i == 1:  # after one report: the discard pool keeps the eventfd it made
            baseline = set(os.listdir("/proc/self/fd"))
        guest = GuestMemfd(16 * MiB)
        fe = await FakeFrontend.connect(str(crash.vm.socket), guest)
        await fe.handshake()
        await fe.start()
        guest.populate(4 * MiB, 2 * MiB)
        await fe.report(3, [(4 * MiB, 2 * MiB)])
        await fe.aclose()
        guest.close()
        with trio.fail_after(5):  # the connection let go: the keeper holds the rest
            while crash.keeper.names() != {"vub.web1.listen", "vub.@daemon.metrics"}:
                await trio.sleep(0.01)
    await trio.sleep(0.1)  # the daemon's side of the teardown
    assert set(os.listdir("/proc/self/fd")) == baseline


def test_a_daemon_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """Nothing to keep and never ready: restarting would only repeat the error, so the
    supervisor exits with the daemon's status (2: a bad option)."""
    done = subprocess.run(
        [*SUPERVISE, "--log-format=json", f"--vm=web1={tmp_path / 'missing' / 'web1.sock'}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done
    assert "web1" in done.stderr  # the daemon's own message says what is wrong
    events = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert events == ["daemon_started", "daemon_failed_to_start"], events


def test_supervise_never_imports_code_from_its_working_directory(tmp_path: Path) -> None:
    """Started from a source checkout (with a regular install), the daemon must run the
    installed package, not the checkout's: a ``vhost_user_balloon`` folder in the
    working directory that fails on import stands in for the checkout."""
    decoy = tmp_path / "vhost_user_balloon"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('imported from the working directory')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('imported from the working directory')\n")
    command = Path(sys.executable).with_name("vhost-user-balloon")  # the entry point
    proc = subprocess.Popen(
        [command, "supervise", "--log-format=json", "--metrics-listen=none",
         f"--vm=web1={tmp_path / 'web1.sock'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        logs = Logs(proc)
        logs.wait_for("daemon_ready")
        assert not logs.events("daemon_failed_to_start")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "working directory" not in err, err


def test_supervise_help_explains_the_signals() -> None:
    done = subprocess.run([*SUPERVISE, "--help"], check=True, capture_output=True, text=True)
    assert done.returncode == 0 and "SIGUSR2" in done.stdout and "restart" in done.stdout


def test_every_vm_is_taken_up_after_a_kill(run_command: RunCommand, tmp_path: Path) -> None:
    """Two VMs attached, one of them with a report posted and not yet kicked: after
    kill -9 both go on, each with its own memory and rings."""
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    logs = run_command(
        "supervise",
        "--log-format=json",
        *(f"--vm={s.stem}={s}" for s in socks),
        "--metrics-listen=none",
    )
    logs.wait_for("daemon_ready")

    async def frontends() -> None:
        guests = [GuestMemfd(32 * MiB), GuestMemfd(32 * MiB)]
        fes = [await FakeFrontend.connect(str(s), g) for s, g in zip(socks, guests, strict=True)]
        try:
            for fe in fes:
                await fe.handshake()
                await fe.start()
            before = guests[0].allocated()
            guests[0].populate(8 * MiB, 4 * MiB)
            head = fes[0].rings[3].add_chain([(8 * MiB, 4 * MiB, True)])
            os.kill(logs.wait_for("daemon_started")["pid"], signal.SIGKILL)
            await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted", 2)
            await fes[0].wait_call(3)
            assert (head, 0) in fes[0].rings[3].take_used()
            assert guests[0].allocated() == before
            await give_back(fes[1], 12 * MiB)
            await give_back(fes[0], 16 * MiB)
            assert sorted(r["vm"] for r in logs.events("frontend_adopted")) == ["a", "b"]
            # Killed before any scrape: the totals saved at start are there to go on from.
            assert logs.events("metrics_carried_over")
            assert not logs.events("metrics_not_carried_over")
        finally:
            for fe in fes:
                await fe.aclose()
            for g in guests:
                g.close()

    trio.run(frontends)
