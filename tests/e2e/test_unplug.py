"""One VM's device hot-unplugged while a second VM runs on the same daemon.

The window of every unplug: ``device_del`` is done (QEMU sent DEVICE_DELETED and
closed the balloon's backend channel) and the chardev is not removed yet, so the
vhost-user connection is still there. A balloon command for that VM used to raise
BrokenPipeError out of the control handler and kill the daemon, and with it every
other VM's connection. Now it is refused with a message, and the other guest goes
on reporting and getting its memory back.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Logs
from guestrun import (
    Env,
    GuestSpec,
    MiB,
    attach_args,
    parse_metrics,
    pump,
    qemu_args,
    stop_process,
)

#: The unplugged VM's device sits behind a PCIe root port, as hot-pluggable devices do.
ROOT_PORT = "-device pcie-root-port,id=rp1,chassis=1,slot=1"


class Qmp:
    """A minimal QMP client: commands and the events seen so far."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._line()  # greeting
        self.command("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "QMP closed"
        return dict(json.loads(line))

    def command(self, name: str, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        while True:
            reply = self._line()
            if "event" in reply:
                self.events.append(reply)
                continue
            assert "error" not in reply, reply
            return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not any(e["event"] == name for e in self.events):
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(self._line())
            assert time.monotonic() < deadline, f"no {name} in {timeout} s: {self.events}"
        return next(e for e in self.events if e["event"] == name)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Console:
    """A guest's serial console, with the time each VUB: marker first appeared."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.markers: dict[str, float] = {}
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        pump(proc.stdout, self._line)
        pump(proc.stderr, self.stderr.append)

    def _line(self, line: str) -> None:
        at = line.find("VUB: ")
        if at >= 0:
            with self._cond:
                self.markers.setdefault(line[at + 5 :].strip().split(" mib=")[0], time.monotonic())
                self._cond.notify_all()

    def wait(self, marker: str, timeout: float) -> float:
        """When the first marker starting with ``marker`` appeared."""

        def seen() -> list[float]:
            return [t for text, t in self.markers.items() if text.startswith(marker)]

        with self._cond:
            ok = self._cond.wait_for(lambda: bool(seen()), timeout)
            assert ok, f"no {marker!r} from the guest: {sorted(self.markers)} {self.stderr}"
            return min(seen())


@pytest.fixture
def rundir(env: Env) -> Iterator[Path]:
    path = env.run_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        return parse_metrics(r.read().decode()).get(name, 0.0)


def reported(url: str, vm: str) -> float:
    return sum(
        metric(url, f'vhost_user_balloon_reported_bytes_total{{order="{o}",vm="{vm}"}}')
        for o in (9, 10)
    )


def assert_gets_memory_back(url: str, vm: str, guest: Console, *, after: float) -> None:
    """The guest's 512 MiB round starts after ``after``; what it frees is reported and
    leaves the host (the guest RAM file's allocated blocks, as the daemon exports them)."""
    resident = f'vhost_user_balloon_guest_ram_resident_bytes{{vm="{vm}"}}'
    assert guest.wait("alloc round=1", 60) > after, "the round ran too early"
    before = reported(url, vm)
    peak_at = guest.wait("allocated round=1", 60)
    peak = now = metric(url, resident)
    freed_at = guest.wait("freed round=1", 60)
    while time.monotonic() < freed_at + 60 and peak - now < 400 * MiB:
        time.sleep(0.5)
        now = metric(url, resident)
    print(
        f"\n{vm} VM: resident {peak / MiB:.0f} MiB after its allocation "
        f"({peak_at - after:.1f} s after the commands), {now / MiB:.0f} MiB "
        f"{time.monotonic() - freed_at:.1f} s after the free"
    )
    assert peak - now >= 400 * MiB, (peak / MiB, now / MiB)
    assert reported(url, vm) - before >= 400 * MiB


def test_a_balloon_command_during_an_unplug_harms_no_vm(env: Env, rundir: Path) -> None:
    ctl = rundir / "control.sock"
    socks = {"gone": rundir / "gone.sock", "other": rundir / "other.sock"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
         "--metrics-listen=127.0.0.1:0", f"--control-socket={ctl}",
         *(f"--vm={name}={path}" for name, path in socks.items())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Logs(daemon)
    qemus: list[subprocess.Popen[bytes]] = []
    qmp: Qmp | None = None

    def boot(name: str, spec: GuestSpec, extra: list[str]) -> Console:
        """A guest attached with qemu-config/vhost-user-balloon.args, ``extra`` first."""
        attach = attach_args("vhost-user-balloon", socket=env.inside(socks[name]), mem="1G")
        qemu = subprocess.Popen(
            env.command(qemu_args(spec, env, [*extra, *attach])),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        qemus.append(qemu)
        return Console(qemu)

    try:
        url = str(log.wait_for("daemon_ready")["metrics"])
        # The VM to unplug: its guest only sits there, its device behind a root port.
        gone = boot(
            "gone",
            GuestSpec(mem_mib=1024, rounds=0, idle_s=600,
                      edits=(("config_size=16", "config_size=16,bus=rp1,id=vub0"),)),
            [*ROOT_PORT.split(" ", 1),
             "-qmp", f"unix:{env.inside(rundir / 'qmp.sock')},server=on,wait=off"],
        )  # fmt: skip
        # The other VM runs a 512 MiB round that starts after the unplug and the commands.
        other = boot("other", GuestSpec(mem_mib=1024, workload_mib=512, idle_s=25, settle_s=30), [])
        gone.wait("balloon features", 60)
        log.wait_for("queue_started", timeout=60, vm="gone", role="reporting")
        other.wait("balloon features", 60)
        log.wait_for("queue_started", timeout=60, vm="other", role="reporting")

        qmp = Qmp(rundir / "qmp.sock")
        qmp.command("device_del", id="vub0")
        qmp.wait_event("DEVICE_DELETED", 30)
        commands = []
        for size in ("128M", "0"):
            done = subprocess.run(
                [sys.executable, "-m", "vhost_user_balloon", "balloon", "gone", size,
                 f"--control-socket={ctl}"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            commands.append(time.monotonic())
            assert done.returncode == 1, done
            assert "closed the balloon's backend channel" in done.stderr, done.stderr
        assert daemon.poll() is None, "the daemon died"

        # The other guest allocates and frees after the commands, and gets it back.
        assert_gets_memory_back(url, "other", other, after=commands[-1])

        # The unplugged VM's connection is still served until its chardev goes.
        assert "gone" not in {r.get("vm") for r in log.events("frontend_disconnected")}
        qmp.command("chardev-remove", id="vb")
        log.wait_for("frontend_disconnected", timeout=30, vm="gone")
        assert daemon.poll() is None
        assert not log.events("connection_crashed") and not log.events("control_request_crashed")
        assert {r["error"] for r in log.events("control_request") if not r["ok"]} == {
            "VM gone: QEMU has closed the balloon's backend channel (is the device being "
            "unplugged?); the guest cannot be told about a new balloon size"
        }
        assert all(q.poll() is None for q in qemus), [c.stderr for c in (gone, other)]
        assert gone.stderr == [] and other.stderr == [], (gone.stderr, other.stderr)
    finally:
        if qmp is not None:
            qmp.close()
        for q in qemus:
            stop_process(q, signal.SIGTERM, 5)
        stop_process(daemon, signal.SIGTERM, 15)
