"""A balloon target set while the guest's driver has the device stopped.

A reset of the VM (``system_reset``, a reboot, the driver unbound, the first step of an
unplug) stops the device: QEMU's vhost-user-base device is then without its virtio
device until a driver starts it again, and a config-change message on the backend
channel in that time makes QEMU 11.1.3 dereference it and die of SIGSEGV. The daemon
keeps such a target in the config space, where the next driver reads it when it
probes; QEMU is not told. Before that, a balloon command (or the automatic policy)
during a guest's reboot killed the VM.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from testbed.guestrun import Env, GuestSpec, MiB, attach_args
from tests.daemon_helpers import Logs
from tests.e2e_helpers import metric, start_guest, stop_all, wait
from vhost_user_balloon.daemon.commands.qmp import Qmp


def test_a_target_set_during_a_reset_waits_for_the_next_driver(env: Env, rundir: Path) -> None:
    ctl, sock, qmp_sock = rundir / "control.sock", rundir / "vm.sock", rundir / "qmp.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
         "--metrics-listen=127.0.0.1:0", f"--control-socket={ctl}", f"--vm=vm={sock}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Logs(daemon)
    qemus: list[subprocess.Popen[bytes]] = []
    qmp: Qmp | None = None
    try:
        url = str(log.wait_for("daemon_ready")["metrics"])
        guest = start_guest(
            env,
            GuestSpec(mem_mib=1024, rounds=0, idle_s=600),
            ["-qmp", f"unix:{env.inside(qmp_sock)},server=on,wait=off",
             *attach_args("vhost-user-balloon", socket=env.inside(sock), mem="1G")],
            qemus,
        )  # fmt: skip
        guest.wait("balloon features", 90)
        log.wait_for("queue_started", timeout=60, vm="vm", role="reporting")

        qmp = Qmp(str(qmp_sock))
        qmp.command("set-action", reboot="reset")  # the test bed runs QEMU with -no-reboot
        qmp.command("system_reset")
        # The reset stops the queues; the rebooting guest has no driver for a while.
        log.wait_for("queue_stopped", timeout=30, vm="vm", role="reporting")
        done = subprocess.run(
            [sys.executable, "-m", "vhost_user_balloon", "balloon", "vm", "256M",
             f"--control-socket={ctl}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done
        time.sleep(2)  # QEMU died within 0.1 s of the message when it was sent
        assert qemus[0].poll() is None, f"QEMU exited with {qemus[0].returncode}: {guest.stderr}"
        told = log.wait_for("balloon_target_set", vm="vm")
        assert told.get("told") == "at_driver_start", told

        # The guest comes back; its new driver reads the target and inflates to it.
        log.wait_for("queue_started", count=2, timeout=120, vm="vm", role="reporting")
        actual = 'vhost_user_balloon_actual_bytes{vm="vm"}'
        wait("the balloon at its target", lambda: metric(url, actual) >= 256 * MiB, 120)
        print(f"\nballoon at {metric(url, actual) / MiB:.0f} MiB after the reboot")
        # Told now: the driver runs again, so the next target goes to QEMU at once.
        done = subprocess.run(
            [sys.executable, "-m", "vhost_user_balloon", "balloon", "vm", "128M",
             f"--control-socket={ctl}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done
        wait("the balloon at the new target", lambda: metric(url, actual) <= 128 * MiB, 60)
        assert log.wait_for("balloon_target_set", count=2, vm="vm").get("told") is None
        assert qemus[0].poll() is None
        assert guest.stderr == [], guest.stderr
        assert not log.events("connection_crashed")
    finally:
        if qmp is not None:
            qmp.close()
        stop_all(qemus, daemon)
