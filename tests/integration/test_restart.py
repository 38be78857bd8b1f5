"""Restarts without the frontend noticing: the real supervisor and daemon processes,
``kill -9``, a planned restart, and the connection still the same socket throughout.

The frontend is the Python fake (the real-QEMU proof is in tests/e2e): it can look
at the ring and at the socket byte by byte, which QEMU cannot show us.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import attach, free_port, scrape
from frontend import FakeFrontend, GuestMemfd, MiB

from vhost_user_balloon.daemon import Daemon, Metrics, VmSpec
from vhost_user_balloon.daemon.connection import VmConnection
from vhost_user_balloon.daemon.handover import stored_vms
from vhost_user_balloon.daemon.systemd import Notifier
from vhost_user_balloon.protocol import Config, Request, encode_message

SUPERVISE = [sys.executable, "-m", "vhost_user_balloon", "supervise"]


class Logs:
    """The JSON log lines of the supervisor and its daemons, read in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, event: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        """The ``count``-th line with this event."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.events(event)) >= count, timeout)
            assert ok, f"no {count} x {event} in {[r['event'] for r in self.lines]}"
            return self.events(event)[count - 1]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.lines if r["event"] == event]


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Logs:
        proc = subprocess.Popen(
            [*SUPERVISE, "--log-format=json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        procs.append(proc)
        return Logs(proc)

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            for child in _children(p.pid):
                os.kill(child, signal.SIGKILL)
        p.wait()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


async def give_back(fe: FakeFrontend, gpa: int) -> None:
    """Populate 4 MiB, report it, check exactly that came back."""
    before = fe.guest.allocated()
    fe.guest.populate(gpa, 4 * MiB)
    await fe.report(3, [(gpa, 4 * MiB)])
    assert fe.guest.allocated() == before


async def kill_9(fe: FakeFrontend, config: bytes, logs: Logs, port: int) -> None:
    """kill -9 the daemon with a report the guest posted but never kicked: only the
    next process, reading the ring as it takes the connection up, can serve it."""
    before = fe.guest.allocated()
    fe.guest.populate(12 * MiB, 4 * MiB)
    head = fe.rings[3].add_chain([(12 * MiB, 4 * MiB, True)])
    os.kill(logs.wait_for("daemon_started")["pid"], signal.SIGKILL)
    await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
    await fe.wait_call(3)
    assert (head, 0) in fe.rings[3].take_used()
    assert fe.guest.allocated() == before
    resumed = {r["queue"]: r["outstanding"] for r in logs.events("queue_resumed")}
    assert resumed == {0: 0, 1: 0, 2: 0, 3: 1}, resumed
    # The session went on: config and reports over the very same socket.
    assert await fe.get_config() == config
    await give_back(fe, 16 * MiB)
    text = await trio.to_thread.run_sync(scrape, port)
    assert 'vhost_user_balloon_connected{vm="web1"} 1.0' in text
    # Counters start again in the new process (a reset Prometheus handles): it served
    # the report posted before the kill and the one after.
    assert 'vhost_user_balloon_reported_bytes_total{order="10",vm="web1"} 8.388608e+06' in text


async def planned_restart(fe: FakeFrontend, config: bytes, logs: Logs) -> None:
    """SIGUSR2 to the supervisor: the daemon hands over and a new one takes up."""
    logs.proc.send_signal(signal.SIGUSR2)
    await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted", 2)
    await give_back(fe, 20 * MiB)
    assert await fe.get_config() == config
    stopped = logs.events("frontend_disconnected")
    assert [r["why"] for r in stopped] == ["shutdown"] and stopped[0]["kept"]


def test_kill_9_and_a_planned_restart_keep_the_connection(supervise: Any, tmp_path: Path) -> None:
    sock = tmp_path / "web1.sock"
    port = free_port()
    logs = supervise(f"--vm=web1={sock}", f"--metrics-listen=127.0.0.1:{port}")
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
            await planned_restart(fe, config, logs)
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
class CrashKeeper:
    """systemd's fd store, played by the test in this process: it keeps what the daemon
    stores and can hand a copy of everything to a second daemon, as after a crash."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.kept: dict[str, int] = {}

    def notifier(self) -> Notifier:
        return Notifier({"NOTIFY_SOCKET": str(self.path)})

    def collect(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except BlockingIOError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
            fds = array.array("i")
            for _, _, payload in anc:
                fds.frombytes(payload)
            if fields.get("FDSTORE") == "1":
                assert len(fds) == 1 and fields["FDNAME"] not in self.kept, fields
                self.kept[fields["FDNAME"]] = fds[0]
            elif fields.get("FDSTOREREMOVE") == "1":
                os.close(self.kept.pop(fields["FDNAME"]))

    async def serve(self) -> None:
        while True:  # read as systemd does: at once (the daemon's sends would block)
            await trio.lowlevel.wait_readable(self.sock)
            self.collect()

    def crash_copy(self) -> dict[str, int]:
        """What a keeper holds the instant the daemon dies."""
        self.collect()
        return {name: os.dup(fd) for name, fd in self.kept.items()}

    def close(self) -> None:
        for fd in self.kept.values():
            os.close(fd)
        self.sock.close()


@pytest.mark.parametrize("dies_in", ["_consume", "_send"])
async def test_a_reply_owed_by_a_dead_process_is_sent_once(
    tmp_path: Path,
    nursery: trio.Nursery,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    monkeypatch: pytest.MonkeyPatch,
    dies_in: str,
) -> None:
    """The daemon has applied GET_CONFIG and saved that it owes the reply, then dies
    before taking the message out of the socket (``_consume``) or before sending the
    reply (``_send``). The next process sends the reply, exactly once."""
    keeper = CrashKeeper(tmp_path / "notify")
    nursery.start_soon(keeper.serve)
    vm = VmSpec("web1", tmp_path / "web1.sock")
    first = Daemon([vm], metrics=Metrics(), notifier=keeper.notifier(), fd_store=True)
    await nursery.start(first.run)
    guest = GuestMemfd(16 * MiB)
    guests.append(guest)
    fe = await attach(str(vm.socket), guest, frontends)
    config = await fe.get_config()

    dead, buried = trio.Event(), trio.Event()
    copy: dict[str, int] = {}
    real = getattr(VmConnection, dies_in)

    async def dies(self: VmConnection, data: Any) -> None:
        if not dead.is_set():
            copy.update(keeper.crash_copy())
            dead.set()
            # This process is gone: it does nothing more until the test ends.
            await buried.wait()
            return
        await real(self, data)

    monkeypatch.setattr(VmConnection, dies_in, dies)
    await fe.send_raw(encode_message(Request.GET_CONFIG, Config(0, 16, 0, bytes(16))))
    await dead.wait()
    monkeypatch.setattr(VmConnection, dies_in, real)

    second = Daemon(
        [vm], metrics=Metrics(), notifier=keeper.notifier(), fd_store=True,
        stored=stored_vms(copy),
    )  # fmt: skip
    await nursery.start(second.run)
    with trio.fail_after(5):
        head = await fe.recv_exact(12)
        assert struct.unpack("=III", head) == (Request.GET_CONFIG, 0x5, 12 + 16)
        assert (await fe.recv_exact(12 + 16))[12:] == config
    # Exactly once: the next reply on the socket answers the next request (request()
    # checks the reply's request code), and the message was not applied twice.
    assert await fe.request(Request.GET_FEATURES, expect_reply=True) is not None
    assert list(second.connections) == ["web1"]
    fe.sock.close()
    buried.set()
    keeper.close()


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


def test_supervise_help_explains_the_signals() -> None:
    done = subprocess.run([*SUPERVISE, "--help"], check=True, capture_output=True, text=True)
    assert done.returncode == 0 and "SIGUSR2" in done.stdout and "restart" in done.stdout
