"""Restarts without the frontend noticing: the real supervisor and daemon processes,
``kill -9``, a planned restart, and the connection still the same socket throughout.

The frontend is the Python fake (the real-QEMU proof is in tests/e2e): it can look
at the ring and at the socket byte by byte, which QEMU cannot show us.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import free_port, scrape
from frontend import FakeFrontend, GuestMemfd, MiB

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


def test_kill_9_and_a_planned_restart_keep_the_connection(supervise: Any, tmp_path: Path) -> None:
    sock = tmp_path / "web1.sock"
    port = free_port()
    logs = supervise(f"--vm=web1={sock}", f"--metrics-listen=127.0.0.1:{port}")
    logs.wait_for("daemon_ready")
    first = logs.wait_for("daemon_started")["pid"]

    async def kill_9(fe: FakeFrontend, config: bytes) -> None:
        # A report the guest posted but the daemon never saw (no kick): only the
        # next process, reading the ring as it takes the connection up, can serve it.
        before = fe.guest.allocated()
        fe.guest.populate(12 * MiB, 4 * MiB)
        head = fe.rings[3].add_chain([(12 * MiB, 4 * MiB, True)])
        os.kill(first, signal.SIGKILL)
        await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
        await fe.wait_call(3)
        assert (head, 0) in fe.rings[3].take_used()
        assert fe.guest.allocated() == before
        resumed = {r["queue"]: r["retaken"] for r in logs.events("queue_resumed")}
        assert set(resumed) == {0, 1, 2, 3}, resumed
        # The session went on: config and reports over the very same socket.
        assert await fe.get_config() == config
        await give_back(fe, 16 * MiB)
        text = await trio.to_thread.run_sync(scrape, port)
        assert 'vhost_user_balloon_connected{vm="web1"} 1.0' in text
        # Counters start again in the new process (a reset Prometheus handles): it
        # served the report posted before the kill and the one after.
        reported = 'vhost_user_balloon_reported_bytes_total{order="10",vm="web1"} 8.388608e+06'
        assert reported in text

    async def planned_restart(fe: FakeFrontend, config: bytes) -> None:
        logs.proc.send_signal(signal.SIGUSR2)
        await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted", 2)
        await give_back(fe, 20 * MiB)
        assert await fe.get_config() == config
        stopped = logs.events("frontend_disconnected")
        assert [r["why"] for r in stopped] == ["shutdown"] and stopped[0]["kept"]

    async def frontend() -> None:
        guest = GuestMemfd(64 * MiB)
        fe = await FakeFrontend.connect(str(sock), guest)
        try:
            await fe.handshake()
            await fe.start()
            config = await fe.get_config()
            await give_back(fe, 8 * MiB)
            await kill_9(fe, config)
            await planned_restart(fe, config)
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
