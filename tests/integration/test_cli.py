"""The installed command as a user runs it: options, logs, /metrics over HTTP, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.daemon_helpers import RunCommand, free_port, scrape
from tests.frontend import FakeFrontend, GuestMemfd, MiB

COMMAND = [sys.executable, "-m", "vhost_user_balloon"]


def test_serves_reports_metrics_and_stops_cleanly_on_sigterm(
    run_command: RunCommand, tmp_path: Path
) -> None:
    sock = tmp_path / "web1.sock"
    port = free_port()
    d = run_command(f"--vm=web1={sock}", f"--metrics-listen=127.0.0.1:{port}")
    ready = d.wait_for("daemon_ready")
    assert ready["vms"] == ["web1"] and ready["level"] == "info"
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    assert 'vhost_user_balloon_connected{vm="web1"} 0.0' in scrape(port)

    async def guest_session() -> None:
        guest = GuestMemfd(32 * MiB)
        fe = await FakeFrontend.connect(str(sock), guest)
        await fe.handshake()
        await fe.start()
        guest.populate(4 * MiB, 4 * MiB)
        await fe.report(3, [(4 * MiB, 4 * MiB)])
        text = await trio.to_thread.run_sync(scrape, port)
        table = subprocess.run(
            [*COMMAND, "status", f"--metrics-listen=127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = next(line for line in table.splitlines() if line.startswith("web1"))
        assert "attached" in row and "stats,reporting,v1" in row and "10:4M" in row, table
        assert 'vhost_user_balloon_reported_bytes_total{order="10",vm="web1"} 4.194304e+06' in text
        assert 'vhost_user_balloon_guest_ram_bytes{vm="web1"} 3.3554432e+07' in text
        assert "vhost_user_balloon_build_info{version=" in text
        await fe.aclose()
        guest.close()

    trio.run(guest_session)
    d.wait_for("frontend_disconnected")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0
    assert not sock.exists()
    events = [r["event"] for r in d.lines]
    assert "queue_started" in events and "memory_table_set" in events


def test_bad_options_fail_fast_with_a_message(run_command: RunCommand, tmp_path: Path) -> None:
    d = run_command("--vm", "web1")
    assert d.proc.wait(timeout=10) == 2
    assert "expected NAME=SOCKET_PATH" in d.proc.stderr.read()
    d = run_command("--vm", f"a={tmp_path}/nodir/a.sock")
    assert d.proc.wait(timeout=10) == 2
    assert "does not exist" in d.proc.stderr.read()
    d = run_command("--vm", f"a={tmp_path}/a.sock", "--metrics-listen", "nowhere")
    assert d.proc.wait(timeout=10) == 2
    assert "HOST:PORT" in d.proc.stderr.read()


def test_a_socket_in_use_is_not_stolen(run_command: RunCommand, tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(path))
    holder.listen(1)
    try:
        d = run_command("--vm", f"busy={path}", "--metrics-listen", "none")
        assert d.proc.wait(timeout=10) == 1
        assert "in use by a running process" in d.proc.stderr.read()
    finally:
        holder.close()
    # Left behind by a dead daemon: replaced.
    d = run_command("--vm", f"busy={path}", "--metrics-listen", "none")
    d.wait_for("daemon_ready")
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=10) == 0


def test_config_file(run_command: RunCommand, tmp_path: Path) -> None:
    conf = tmp_path / "vub.toml"
    conf.write_text(
        'metrics_listen = "none"\nlog_level = "debug"\n'
        f'[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\n'
        f'[[vm]]\nname = "b"\nsocket = "{tmp_path}/b.sock"\ndiscard = false\n'
    )
    d = run_command("--config", str(conf))
    assert d.wait_for("daemon_ready")["vms"] == ["a", "b"]
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0
    conf.write_text(f'discard = "false"\n[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\n')
    d = run_command("--config", str(conf))
    assert d.proc.wait(timeout=10) == 2
    assert "discard = 'false' is a string; expected true or false" in d.proc.stderr.read()
    conf.write_text('[[vm]]\nname = "a"\nsockt = "/x"\n')
    d = run_command("--config", str(conf))
    assert d.proc.wait(timeout=10) == 2
    assert "needs name" in d.proc.stderr.read()


def test_sighup_adds_and_removes_vms_without_touching_the_others(
    run_command: RunCommand, tmp_path: Path
) -> None:
    conf = tmp_path / "vub.toml"

    def write(*names: str) -> None:
        conf.write_text(
            'metrics_listen = "none"\n'
            + "".join(f'[[vm]]\nname = "{n}"\nsocket = "{tmp_path}/{n}.sock"\n' for n in names)
        )

    write("a", "b")
    d = run_command("--config", str(conf))
    d.wait_for("daemon_ready")

    async def scenario() -> None:
        guest = GuestMemfd(16 * MiB)
        b = await FakeFrontend.connect(str(tmp_path / "b.sock"), guest)
        await b.handshake()
        await b.start()
        write("a", "c")
        d.proc.send_signal(signal.SIGHUP)
        done = await trio.to_thread.run_sync(d.wait_for, "config_reloaded")
        assert done["added"] == ["c"] and done["removed"] == ["b"]
        assert done["still_attached"] == ["b"]
        assert not (tmp_path / "b.sock").exists() and (tmp_path / "a.sock").exists()
        await b.report(3, [(4 * MiB, 2 * MiB)])  # b's QEMU keeps its connection
        c_guest = GuestMemfd(16 * MiB)
        c = await FakeFrontend.connect(str(tmp_path / "c.sock"), c_guest)
        await c.handshake()
        await c.start()
        await c.report(3, [(4 * MiB, 2 * MiB)])
        conf.write_text("[[vm]]\nname = 'x'\n")  # broken: the running config stays
        d.proc.send_signal(signal.SIGHUP)
        failed = await trio.to_thread.run_sync(d.wait_for, "reload_failed")
        assert "needs name" in str(failed["error"])
        await c.report(3, [(6 * MiB, 2 * MiB)])
        for fe, g in ((b, guest), (c, c_guest)):
            await fe.aclose()
            g.close()

    trio.run(scenario)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0
