"""systemd's side of sd_notify and socket activation, played by the test.

No systemd runs as PID 1 on these machines, so the test is the service manager: it
listens on $NOTIFY_SOCKET for the daemon's datagrams, and it passes listening sockets
as fds 3, 4 with $LISTEN_FDS/$LISTEN_FDNAMES/$LISTEN_PID as sd_listen_fds(3) says.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.daemon_helpers import Logs
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from tests.service_manager import ServiceManager

DAEMON = [sys.executable, "-m", "vhost_user_balloon"]


def messages(sock: socket.socket, until: str, limit: float = 10.0) -> list[str]:
    """Datagrams received until one contains ``until``."""
    sock.settimeout(limit)
    got = []
    while True:
        got.append(sock.recv(4096).decode())
        if until in got[-1]:
            return got


async def attach_and_report(path: Path) -> None:
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(path), guest)
    try:
        await fe.handshake()
        await fe.start()
        guest.populate(4 * MiB, 2 * MiB)
        before = guest.allocated()
        await fe.report(3, [(4 * MiB, 2 * MiB)])
        assert before - guest.allocated() == 2 * MiB
    finally:
        await fe.aclose()
        guest.close()


def test_sd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    vm_sock = tmp_path / "web1.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [*DAEMON, "--vm", f"web1={vm_sock}", "--metrics-listen", "none"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        ready = messages(notify, "READY=1")
        assert vm_sock.exists()  # ready means listening
        assert "STATUS=0 of 1 VMs attached" in ready[-1]
        assert sum("WATCHDOG=1" in m for m in messages(notify, "WATCHDOG=1")) >= 1
        pings = [m for m in messages(notify, "WATCHDOG=1") + messages(notify, "WATCHDOG=1")]
        assert len(pings) >= 2  # every 0.1 s: half the interval
        trio.run(attach_and_report, vm_sock)
        statuses = "".join(messages(notify, "STATUS=0 of 1"))
        assert "STATUS=1 of 1 VMs attached" in statuses
        proc.send_signal(signal.SIGTERM)
        assert "STATUS=stopping" in messages(notify, "STOPPING=1")[-1]
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_socket_activation_adopts_named_sockets_as_vms(tmp_path: Path) -> None:
    listeners = []
    for name in ("web1", "web2"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / f"{name}.sock"))
        s.listen(4)
        listeners.append(s)
    a, b = (s.fileno() for s in listeners)
    # fds 3 and 4 in the daemon, and LISTEN_PID its own pid: bash execs into it.
    script = (
        f"exec 3<&{a} 4<&{b}; LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web1:web2 "
        f"exec {' '.join(DAEMON)} --metrics-listen none --log-format json"
    )
    proc = subprocess.Popen(
        ["bash", "-c", script], pass_fds=(a, b), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "daemon_ready" and ready["vms"] == ["web1", "web2"]
        for s in listeners:
            s.close()  # the daemon holds its own copies now
        trio.run(attach_and_report, tmp_path / "web2.sock")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        events = [json.loads(line) for line in proc.stdout]
        assert {"event": "frontend_connected", "vm": "web2"}.items() <= next(
            e for e in events if e["event"] == "frontend_connected"
        ).items()
        # systemd's socket files are systemd's: left in place for the next start
        assert (tmp_path / "web1.sock").exists() and (tmp_path / "web2.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


UNITS = Path(__file__).resolve().parents[2] / "systemd"


def test_units_verify_and_are_hardened(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at the command of this install.
    command = Path(sys.executable).parent / "vhost-user-balloon"
    service = tmp_path / "vhost-user-balloon.service"
    service.write_text(
        (UNITS / "vhost-user-balloon.service")
        .read_text()
        .replace("/usr/local/bin/vhost-user-balloon", str(command))
    )
    socket_unit = tmp_path / "vhost-user-balloon-vm@.socket"
    socket_unit.write_text((UNITS / "vhost-user-balloon-vm@.socket").read_text())
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(service), str(socket_unit)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(service)],
        check=False,
        capture_output=True,
        text=True,
    )
    line = next(x for x in security.stdout.splitlines() if "Overall exposure level" in x)
    exposure = float(line.split(":")[1].split()[0])
    print(f"\n{line.strip()}")
    assert exposure <= 2.0, security.stdout


def test_supervise_under_systemd_passes_on_what_systemd_must_know(tmp_path: Path) -> None:
    """The unit runs `supervise`: systemd hears only from the supervisor (its main
    process), READY once, the daemon's watchdog pings and STATUS, every fd stored (so
    that it outlives the supervisor too), and no STOPPING when the daemon restarts."""
    manager = ServiceManager(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "web1.sock"))
    listener.listen(4)
    fd = listener.fileno()
    script = (
        f"exec 3<&{fd}; LISTEN_PID=$$ WATCHDOG_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web1 exec "
        f"{sys.executable} -m vhost_user_balloon supervise --metrics-listen=none "
        "--log-format=json"
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000",
           "FDSTORE": "512"}  # fmt: skip
    proc = subprocess.Popen(
        ["bash", "-c", script], pass_fds=(fd,), env=env, stdout=subprocess.PIPE, text=True
    )
    logs = Logs(proc)  # type: ignore[arg-type]
    try:
        listener.close()
        manager.until("READY=1")
        assert any("READY=1\nSTATUS=0 of 1 VMs attached" in t for t in manager.texts())
        manager.until("WATCHDOG=1")  # the daemon's ping, passed on

        async def frontend() -> None:
            fe = await FakeFrontend.connect(str(tmp_path / "web1.sock"), GuestMemfd(16 * MiB))
            try:
                await fe.handshake()
                await fe.start()
                await trio.to_thread.run_sync(manager.until, "FDNAME=vub.web1.conn")
                stored = [d.text for d in manager.got if d.nfds == 1 and "FDSTORE=1" in d.text]
                assert any("FDNAME=vub.web1.state" in t for t in stored), stored
                logs.wait_for("standby_armed")
                os.kill(logs.wait_for("daemon_started")["pid"], signal.SIGKILL)
                await trio.to_thread.run_sync(logs.wait_for, "frontend_adopted")
                fe.guest.populate(4 * MiB, 2 * MiB)
                before = fe.guest.allocated()
                await fe.report(3, [(4 * MiB, 2 * MiB)])
                assert before - fe.guest.allocated() == 2 * MiB
            finally:
                await fe.aclose()
                fe.guest.close()

        trio.run(frontend)
        pings = manager.count("WATCHDOG=1")
        manager.until("WATCHDOG=1", pings + 1)  # the next daemon pings too
        proc.send_signal(signal.SIGTERM)
        manager.until("STOPPING=1")
        assert proc.wait(10) == 0
        texts = manager.texts()
        assert sum("READY=1" in t for t in texts) == 1, texts
        assert sum("STOPPING=1" in t for t in texts) == 1, texts
        assert {d.pid for d in manager.got} == {proc.pid}
        assert logs.events("daemon_started")[1]["standby"] is True
    finally:
        if proc.poll() is None:
            proc.kill()
        manager.close()


@pytest.mark.parametrize("gap_s", [0.0, 0.002, 0.01, 0.05])
def test_a_stop_signal_that_comes_twice_is_still_a_clean_stop(tmp_path: Path, gap_s: float) -> None:
    """Under systemd's supervise unit a stop's SIGTERM reaches the daemon twice (from
    systemd, from the supervisor): the second, whenever it comes, changes nothing."""
    sock = tmp_path / "web1.sock"
    proc = subprocess.Popen(
        [*DAEMON, "--vm", f"web1={sock}", "--metrics-listen", "none"], stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap_s)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_supervise_stopped_as_systemd_stops_it_exits_0(tmp_path: Path) -> None:
    """systemd sends SIGTERM to every process of the service at once (KillMode=
    control-group): supervisor, daemon, standby. The stop is clean: exit status 0,
    else systemd would mark the service failed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "supervise", "--log-format=json",
         f"--vm=web1={tmp_path / 'web1.sock'}", "--metrics-listen=none"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    logs = Logs(proc)  # type: ignore[arg-type]
    try:
        logs.wait_for("standby_armed")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
