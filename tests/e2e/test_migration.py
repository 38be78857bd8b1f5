"""Live migration of a VM with the balloon, as README's procedure does it, between two
real QEMUs on this machine (unix-socket migration) attached to one daemon.

The source is started with qemu-config/vhost-user-balloon-migratable.args as shipped;
the destination with the same options minus the balloon's chardev and device (they
come back with migrate-finish) and ``-incoming defer``. The guest's workload runs
across it: a 512 MiB round before the migration and one after it on the destination.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.guestrun import Env, GuestSpec, MiB, attach_args, stop_process
from tests.daemon_helpers import Logs
from tests.e2e_helpers import Console, assert_gets_memory_back, metric, start_guest
from vhost_user_balloon.daemon.commands.control import ask
from vhost_user_balloon.daemon.commands.qmp import Qmp

TARGET = 64 * MiB
#: What the guest keeps available while reclaim has its balloon inflated: this guest
#: idles in between its rounds, so little is enough (the command's default is 128M).
FLOOR = "32M"


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "vhost_user_balloon", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done
    return done


def wait_status(ctl: Path, ok: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = ask(str(ctl), {"vm": "mig"})
        if ok(status):
            return status
        assert time.monotonic() < deadline, f"{what}: {status}"
        time.sleep(0.25)


def migrate(source: Path, dest: Path, uri: str) -> dict[str, Any]:
    """Migrate from the QEMU at QMP socket ``source`` to the one waiting at ``dest``
    (-incoming defer), and quit the source; query-migrate's last answer. Each QMP
    session is opened only for this: a QMP socket serves one client at a time, and
    the commands under test need theirs."""
    with Qmp(str(dest), timeout=30) as dst, Qmp(str(source), timeout=30) as src:
        dst.command("migrate-incoming", uri=uri)
        began = time.monotonic()
        src.command("migrate", uri=uri)
        while (info := src.command("query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() - began < 300, info
            time.sleep(0.2)
        assert info["status"] == "completed", info
        assert dst.command("query-status")["status"] == "running"
        src.command("quit")
    return dict(info)


class Rig:
    """One daemon serving VM ``mig``, and the QEMUs started for it."""

    def __init__(self, env: Env, rundir: Path) -> None:
        self.env, self.rundir = env, rundir
        self.ctl, self.sock = rundir / "control.sock", rundir / "mig.sock"
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
             "--metrics-listen=127.0.0.1:0", f"--control-socket={self.ctl}",
             f"--vm=mig={self.sock}", "--stats-interval=2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log = Logs(self.daemon)
        self.url = str(self.log.wait_for("daemon_ready")["metrics"])
        self.qemus: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, spec: GuestSpec, args: list[str]) -> Console:
        """A QEMU with a QMP socket at RUNDIR/NAME-qmp.sock."""
        qmp_path = self.rundir / f"{name}-qmp.sock"
        qmp = ["-qmp", f"unix:{self.env.inside(qmp_path)},server=on,wait=off"]
        console = start_guest(self.env, spec, [*args, *qmp], self.qemus)
        qemu = self.qemus[-1]
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert time.monotonic() < deadline and qemu.poll() is None, console.stderr
            time.sleep(0.1)
        return console

    def status(self) -> dict[str, Any]:
        return ask(str(self.ctl), {"vm": "mig"})

    def connected(self) -> float:
        return metric(self.url, 'vhost_user_balloon_connected{vm="mig"}')

    def close(self) -> None:
        for p in self.qemus:
            stop_process(p, signal.SIGTERM, 5)
        stop_process(self.daemon, signal.SIGTERM, 15)


@pytest.fixture
def rig(env: Env, rundir: Path) -> Iterator[Rig]:
    made = Rig(env, rundir)
    try:
        yield made
    finally:
        made.close()


def test_a_vm_migrates_with_its_balloon_and_gets_its_memory_back(env: Env, rig: Rig) -> None:
    spec = GuestSpec(mem_mib=1024, workload_mib=512, rounds=2, idle_s=5, settle_s=80)
    attach = attach_args("vhost-user-balloon-migratable", socket=env.inside(rig.sock), mem="1G")
    # The destination: everything but the balloon's chardev and device.
    drop = {i for i, a in enumerate(attach) if a.startswith(("socket,id=vb", "vhost-user-test"))}
    kept = [a for i, a in enumerate(attach) if i not in drop and i + 1 not in drop]
    source = rig.start("source", spec, attach)
    dest = rig.start("dest", spec, [*kept, "-incoming", "defer"])
    source.wait("balloon features", 90)
    rig.log.wait_for("queue_started", timeout=60, vm="mig", role="reporting")
    commanded = time.monotonic()
    cli("balloon", "mig", "64M", f"--control-socket={rig.ctl}")
    wait_status(rig.ctl, lambda s: s["actual_bytes"] == TARGET, 60, "inflate to the target")

    # Before: round 1's memory comes back on the source.
    assert_gets_memory_back(rig.url, "mig", source, after=commanded)
    pre = rig.status()["resident_bytes"]

    # Source: the balloon leaves; the VM migrates.
    prepared = cli("migrate-prepare", f"--qmp={rig.rundir / 'source-qmp.sock'}")
    rig.log.wait_for("frontend_disconnected", timeout=30, vm="mig")
    assert not rig.status()["attached"] and rig.connected() == 0
    info = migrate(rig.rundir / "source-qmp.sock", rig.rundir / "dest-qmp.sock",
                   f"unix:{env.inside(rig.rundir / 'migration.sock')}")  # fmt: skip
    migrated = time.monotonic()

    # Destination: the balloon comes back with the target it had.
    cli("migrate-finish", f"--qmp={rig.rundir / 'dest-qmp.sock'}",
        f"--socket={env.inside(rig.sock)}", "--bus=rp1")  # fmt: skip
    attached = wait_status(
        rig.ctl, lambda s: s["attached"] and s["actual_bytes"] == TARGET, 60, "target re-applied"
    )
    back = time.monotonic() - migrated
    assert attached["target_bytes"] == TARGET and rig.connected() == 1
    assert len(rig.log.events("frontend_connected")) == 2

    # The migration left guest RAM resident on the destination; reclaim gives it back.
    started = time.monotonic()
    reclaimed = cli("reclaim", "mig", f"--control-socket={rig.ctl}", f"--floor={FLOOR}")
    after = rig.status()
    print(
        f"\nmigration: {info['total-time']} ms, downtime {info['downtime']} ms; "
        f"{prepared.stdout.strip()}; balloon back at its target {back:.1f} s after\n"
        f"resident: {pre / MiB:.0f} MiB before, {attached['resident_bytes'] / MiB:.0f} MiB "
        f"after the migration, {after['resident_bytes'] / MiB:.0f} MiB after reclaim "
        f"({time.monotonic() - started:.1f} s)\n{reclaimed.stdout.strip()}"
    )
    assert attached["resident_bytes"] - pre > 256 * MiB, "the migration left no bloat?"
    assert after["resident_bytes"] <= pre + 64 * MiB
    assert after["target_bytes"] == TARGET and after["actual_bytes"] == TARGET

    # The workload goes on on the destination, and its freed memory comes back.
    assert_gets_memory_back(rig.url, "mig", dest, after=started, round_=2, timeout=150)
    assert rig.daemon.poll() is None
    assert not rig.log.events("connection_crashed")
    assert not rig.log.events("connection_closed_on_error")
    assert dest.stderr == [], dest.stderr
