"""One VM's device hot-unplugged while a second VM runs on the same daemon.

The window of every unplug: ``device_del`` is done (QEMU sent DEVICE_DELETED and
closed the balloon's backend channel) and the chardev is not removed yet, so the
vhost-user connection is still there. A balloon command for that VM used to raise
BrokenPipeError out of the control handler and kill the daemon, and with it every
other VM's connection. Now it is refused with a message, and the other guest goes
on reporting and getting its memory back.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from testbed.guestrun import (
    Env,
    GuestSpec,
    attach_args,
)
from tests.daemon_helpers import Logs
from tests.e2e_helpers import Console, assert_gets_memory_back, start_guest, stop_all
from vhost_user_balloon.daemon.commands.qmp import Qmp

#: The unplugged VM's device sits behind a PCIe root port, as hot-pluggable devices do.
ROOT_PORT = "-device pcie-root-port,id=rp1,chassis=1,slot=1"


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
        return start_guest(env, spec, [*extra, *attach], qemus)

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

        qmp = Qmp(str(rundir / "qmp.sock"))
        qmp.command("device_del", id="vub0")
        assert qmp.wait_event("DEVICE_DELETED", 30, lambda d: d.get("device") == "vub0")
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
        stop_all(qemus, daemon)
