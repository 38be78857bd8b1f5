"""The standby daemon that ``supervise`` starts ahead of need: real processes, real
signals, the fake frontend attached throughout (what QEMU would see)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.daemon_helpers import Logs, RunCommand, children
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.supervise import standby
from vhost_user_balloon.daemon.supervise.supervisor import Supervisor


def gone(pid: int) -> bool:
    """Exited and reaped (a zombie still counts as there: nobody waited for it)."""
    return not Path(f"/proc/{pid}").exists()


async def served(fe: FakeFrontend, gpa: int) -> None:
    """A report of 4 MiB of populated memory comes back, and the config is read."""
    before = fe.guest.allocated()
    fe.guest.populate(gpa, 4 * MiB)
    await fe.report(3, [(gpa, 4 * MiB)])
    assert fe.guest.allocated() == before
    assert await fe.get_config()


def supervise(run_command: RunCommand, sock: Path, *options: str) -> Logs:
    logs = run_command(
        "supervise", *options, "--log-format=json", f"--vm=web1={sock}", "--metrics-listen=none"
    )
    logs.wait_for("daemon_ready")
    return logs


async def attached(sock: Path) -> FakeFrontend:
    fe = await FakeFrontend.connect(str(sock), GuestMemfd(32 * MiB))
    await fe.handshake()
    await fe.start()
    return fe


def test_the_standby_takes_over_after_a_kill_and_a_planned_restart(
    run_command: RunCommand, tmp_path: Path
) -> None:
    """kill -9: the armed standby is handed the connection (no new process); SIGUSR2:
    the standby is replaced first (it may run older code) and the fresh one takes
    over. Each time a next standby is started once the new daemon is ready."""
    sock = tmp_path / "web1.sock"
    logs = supervise(run_command, sock)
    sup = logs.proc.pid

    async def frontend() -> None:
        fe = await attached(sock)
        try:
            await served(fe, 8 * MiB)
            first = logs.wait_for("daemon_started")["pid"]
            spare = logs.wait_for("standby_armed")["pid"]
            assert sorted(children(sup)) == sorted([first, spare])
            os.kill(first, signal.SIGKILL)
            took = await trio.to_thread.run_sync(logs.wait_for, "daemon_started", 2)
            assert took["pid"] == spare and took["standby"] is True
            await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
            await served(fe, 12 * MiB)
            # The next standby, started after the new daemon said it was ready.
            spare2 = (await trio.to_thread.run_sync(logs.wait_for, "standby_armed", 2))["pid"]
            assert spare2 not in (first, spare)
            logs.proc.send_signal(signal.SIGUSR2)
            took = await trio.to_thread.run_sync(logs.wait_for, "daemon_started", 3)
            fresh = logs.events("standby_started")[2]["pid"]
            assert took["pid"] == fresh and fresh != spare2
            await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted", 2)
            await served(fe, 16 * MiB)
            with trio.fail_after(10):
                while not (gone(spare2) and gone(spare)):  # the replaced one is reaped
                    await trio.sleep(0.05)
        finally:
            await fe.aclose()
            fe.guest.close()

    trio.run(frontend)
    assert [r["how"] for r in logs.events("daemon_exited")] == ["killed by SIGKILL"]
    assert not logs.events("standby_exited")


def test_a_standby_that_dies_is_replaced_later_and_restarts_go_on_without_it(
    run_command: RunCommand, tmp_path: Path
) -> None:
    sock = tmp_path / "web1.sock"
    logs = supervise(run_command, sock)

    async def frontend() -> None:
        fe = await attached(sock)
        try:
            spare = logs.wait_for("standby_armed")["pid"]
            os.kill(spare, signal.SIGKILL)
            died = await trio.to_thread.run_sync(logs.wait_for, "standby_exited")
            assert died["pid"] == spare and died["how"] == "killed by SIGKILL"
            assert died["next_in_s"] == 5.0
            # No standby now: the daemon after a kill is a new process, as before.
            os.kill(logs.wait_for("daemon_started")["pid"], signal.SIGKILL)
            took = await trio.to_thread.run_sync(logs.wait_for, "daemon_started", 2)
            assert "standby" not in took
            await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
            await served(fe, 8 * MiB)
        finally:
            await fe.aclose()
            fe.guest.close()

    trio.run(frontend)


def test_no_standby_and_no_orphan(run_command: RunCommand, tmp_path: Path) -> None:
    """--no-standby starts none; without it, stopping the supervisor stops the standby
    too, and so does the supervisor's sudden death (the standby sees its socket end)."""
    plain = supervise(run_command, tmp_path / "a.sock", "--no-standby")
    with_one = supervise(run_command, tmp_path / "b.sock")
    spare = with_one.wait_for("standby_armed")["pid"]
    assert len(children(plain.proc.pid)) == 1 and not plain.events("standby_started")
    plain.proc.send_signal(signal.SIGTERM)
    assert plain.proc.wait(10) == 0
    daemon = with_one.events("daemon_started")[0]["pid"]
    with_one.proc.kill()
    with_one.proc.wait(10)
    # Orphans are reaped by init (or the test's subreaper): wait for them to go.
    os.kill(daemon, signal.SIGTERM)  # the daemon itself is a keeper's business
    for _ in range(200):
        if gone(spare) or _zombie(spare):
            break
        time.sleep(0.05)
    assert gone(spare) or _zombie(spare), "the standby outlived its supervisor"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_supervisor_stop_takes_the_standby_with_it(run_command: RunCommand, tmp_path: Path) -> None:
    logs = supervise(run_command, tmp_path / "web1.sock")
    spare = logs.wait_for("standby_armed")["pid"]
    logs.proc.send_signal(signal.SIGTERM)
    assert logs.proc.wait(10) == 0
    assert gone(spare)  # reaped by the supervisor before it exited


# -- the hand-off itself ----------------------------------------------------------------
def test_handoff_carries_every_fd_with_its_name() -> None:
    """600 fds (three messages), each arriving as the same open file under its name."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(300)]
    kept = [(f"vub.vm{i}.{end}", fd) for i, pair in enumerate(pipes) for end, fd in enumerate(pair)]
    got: list[dict[str, int] | None] = []
    waiter = threading.Thread(target=lambda: got.append(standby.wait_for_fds(theirs.detach())))
    waiter.start()
    assert ours.recv(64) == standby.ARMED
    standby.hand_fds(ours, kept)
    waiter.join(10)
    given = got[0]
    assert given is not None and sorted(given) == sorted(name for name, _ in kept)
    for name, fd in kept:
        assert os.fstat(given[name]).st_ino == os.fstat(fd).st_ino
    for fd in [*given.values(), *(fd for _, fd in kept)]:
        os.close(fd)
    ours.close()


def test_a_standby_whose_keeper_goes_returns_none_and_nonsense_is_an_error() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    assert standby.wait_for_fds(theirs.detach()) is None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send(b"hello")
    with pytest.raises(standby.Handoff, match="hello"):
        standby.wait_for_fds(theirs.detach())
    ours.close()


def test_a_daemon_that_dies_during_a_planned_restart_is_followed_once(
    run_command: RunCommand, tmp_path: Path
) -> None:
    """SIGUSR2, and the daemon killed before the fresh standby is armed: that standby
    takes over (its fds wait in its socket) and is left alone; the planned restart is
    over, not stopped a second time."""
    sock = tmp_path / "web1.sock"
    logs = supervise(run_command, sock)

    async def frontend() -> None:
        fe = await attached(sock)
        try:
            logs.wait_for("standby_armed")
            first = logs.wait_for("daemon_started")["pid"]
            logs.proc.send_signal(signal.SIGUSR2)
            await trio.to_thread.run_sync(logs.wait_for, "standby_started", 2)
            os.kill(first, signal.SIGKILL)
            took = await trio.to_thread.run_sync(logs.wait_for, "daemon_started", 2)
            assert took["pid"] == logs.events("standby_started")[1]["pid"] and took["standby"]
            await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
            await trio.to_thread.run_sync(logs.wait_for, "standby_armed", 2, 20)  # the next
            await served(fe, 8 * MiB)
            assert len(logs.events("daemon_started")) == 2, logs.events("daemon_started")
            assert logs.events("daemon_exited") == [], logs.events("daemon_exited")
        finally:
            await fe.aclose()
            fe.guest.close()

    trio.run(frontend)


def test_a_standby_due_while_the_daemon_is_not_ready_is_not_waited_for() -> None:
    """The supervisor sleeps until the next thing it must do; a standby that is due
    while the daemon is not ready (restarting, failing) is not such a thing, else the
    loop would spin with a timeout of 0 until the daemon is ready."""
    sup = Supervisor(["/bin/true"])
    try:
        sup.standby_due = 0.0  # long past
        assert sup._standby_at() is None  # no daemon ready: nothing to wait for
        sup.ready = True
        assert sup._standby_at() == 0.0
        sup.stopping = True
        assert sup._standby_at() is None
    finally:
        sup._close()
