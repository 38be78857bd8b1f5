"""Balloon targets set while no guest driver runs the device: a VM rebooting and a VM
paused.

A reset of the VM (``system_reset``, a reboot, the driver unbound, the first step of an
unplug) stops the device, and so does a pause (QMP ``stop``, ``virsh suspend``): QEMU's
vhost-user-base device is then without its virtio device until it starts again, and a
config-change message on the backend channel in that time makes QEMU 11.1.3
dereference it and die of SIGSEGV. So a balloon command (or the automatic policy)
during a guest's reboot or pause killed the VM. The daemon keeps such a target in the
config space and tells QEMU when the device starts again: a rebooted guest's driver
would read it at its probe anyway, a resumed one would not.
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


def test_targets_set_during_a_reboot_and_a_pause_reach_the_guest(env: Env, rundir: Path) -> None:
    ctl, sock, qmp_sock = rundir / "control.sock", rundir / "vm.sock", rundir / "qmp.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
         "--metrics-listen=127.0.0.1:0", f"--control-socket={ctl}", f"--vm=vm={sock}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Logs(daemon)
    qemus: list[subprocess.Popen[bytes]] = []
    qmp: Qmp | None = None

    def balloon(size: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "vhost_user_balloon", "balloon", "vm", size,
             f"--control-socket={ctl}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done

    def qemu_lives() -> None:
        time.sleep(2)  # QEMU died within 0.1 s of the message when it was sent
        assert qemus[0].poll() is None, f"QEMU exited with {qemus[0].returncode}: {guest.stderr}"

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
        actual = 'vhost_user_balloon_actual_bytes{vm="vm"}'

        # A reboot: the reset stops the queues; the guest has no driver for a while.
        qmp = Qmp(str(qmp_sock))
        qmp.command("set-action", reboot="reset")  # the test bed runs QEMU with -no-reboot
        qmp.command("system_reset")
        log.wait_for("queue_stopped", timeout=30, vm="vm", role="reporting")
        balloon("256M")
        qemu_lives()
        assert log.wait_for("balloon_target_set", vm="vm").get("told") == "at_start"
        # The guest comes back, and its new driver inflates to the target.
        log.wait_for("queue_started", count=2, timeout=120, vm="vm", role="reporting")
        wait("the balloon at its target", lambda: metric(url, actual) >= 256 * MiB, 120)
        print(f"\nballoon at {metric(url, actual) / MiB:.0f} MiB after the reboot")

        # A pause: QEMU stops the device and starts it again at `cont`; the driver goes
        # on where it was, so only the daemon's word at the start tells it.
        qmp.command("stop")
        log.wait_for("queue_stopped", count=2, timeout=30, vm="vm", role="reporting")
        balloon("64M")
        qemu_lives()
        assert log.wait_for("balloon_target_set", count=2, vm="vm").get("told") == "at_start"
        assert metric(url, actual) >= 256 * MiB  # paused: nothing moved
        qmp.command("cont")
        wait("the balloon at the paused target", lambda: metric(url, actual) <= 64 * MiB, 60)
        assert log.wait_for("balloon_target_told", count=2, vm="vm")

        # Running: the next target goes to QEMU at once.
        balloon("128M")
        wait("the balloon at the next target", lambda: metric(url, actual) >= 128 * MiB, 60)
        assert log.wait_for("balloon_target_set", count=3, vm="vm").get("told") is None
        assert qemus[0].poll() is None
        assert guest.stderr == [], guest.stderr
        assert not log.events("connection_crashed")
    finally:
        if qmp is not None:
            qmp.close()
        stop_all(qemus, daemon)
