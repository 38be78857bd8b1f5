"""systemd's side of sd_notify and socket activation, played by the test.

No systemd runs as PID 1 on these machines, so the test is the service manager: it
listens on $NOTIFY_SOCKET for the daemon's datagrams, and it passes listening sockets
as fds 3, 4 with $LISTEN_FDS/$LISTEN_FDNAMES/$LISTEN_PID as sd_listen_fds(3) says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from frontend import FakeFrontend, GuestMemfd, MiB

DAEMON = [sys.executable, "-m", "vhost_user_balloon.daemon.cli"]


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
