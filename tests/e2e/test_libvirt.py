"""libvirt as operators run it: a domain with qemu-config/libvirt-domain.xml merged in
as shipped (only the socket path replaced), started by libvirtd, attached to the daemon
with the socket settings README recommends. How libvirt runs here: see
tests/e2e_libvirt.py; README's migration under libvirt: test_libvirt_migration.py.
The domain is ``type='qemu'`` (TCG): KVM cannot run guests on these machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.guestrun import Env, MiB, stop_process
from tests.daemon_helpers import Logs
from tests.e2e_helpers import metric, wait
from tests.e2e_libvirt import (
    ConsoleFile,
    Libvirt,
    domain_xml,
    kvm_gid,
)
from vhost_user_balloon.daemon.commands.control import ask

#: the guest allocates 512 MiB once and frees it
WORKLOAD = "vub.mib=512 vub.settle=3600 vub.idle=3"


@pytest.fixture
def libvirt(env: Env) -> Iterator[Libvirt]:
    assert env.qemu_root != Path("/"), "libvirt is provisioned in the QEMU chroot"
    assert (env.qemu_root / "usr/sbin/libvirtd").exists(), "run testbed/provision"
    lv = Libvirt(env.qemu_root)
    try:
        yield lv
    finally:
        lv.close()


def test_a_libvirt_domain_with_the_shipped_xml(env: Env, rundir: Path, libvirt: Libvirt) -> None:
    os.chmod(rundir, 0o755)  # libvirt-qemu must reach the socket
    sock, ctl, console = rundir / "web1.sock", rundir / "control.sock", rundir / "console.log"
    gid = str(kvm_gid(env.qemu_root))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
         "--metrics-listen=127.0.0.1:0", f"--control-socket={ctl}", f"--vm=web1={sock}",
         f"--socket-group={gid}", "--socket-mode=0660", f"--allow-group={gid}",
         "--stats-interval=2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Logs(daemon)

    guest = ConsoleFile(console)

    try:
        url = str(log.wait_for("daemon_ready")["metrics"])
        xml = domain_xml(env, env.inside(console), env.inside(sock), WORKLOAD)
        (rundir / "web1.xml").write_text(xml)
        libvirt.virsh("define", env.inside(rundir / "web1.xml"))
        libvirt.virsh("start", "web1")
        wait("the guest's driver bound", lambda: guest.booted() == 1)
        peer = log.wait_for("frontend_connected", timeout=60)
        assert peer["vm"] == "web1"

        # Reclaim: the guest's 512 MiB round is reported and leaves the host.
        resident = 'vhost_user_balloon_guest_ram_resident_bytes{vm="web1"}'
        # the peak once the guest says its 512 MiB are allocated (not while it allocates)
        wait("512 MiB allocated", lambda: guest.count("VUB: allocated round=1") == 1)
        peak = metric(url, resident)
        assert peak > 500 * MiB
        low = wait("the freed memory back", lambda: (r := metric(url, resident)) < peak - 400 * MiB
                   and r)  # fmt: skip
        # Stats: the guest's statistics arrive.
        available = wait("guest statistics", lambda: ask(str(ctl), {"vm": "web1"})["guest"])
        assert available["available_bytes"] > 400 * MiB

        # A balloon target, then destroy + start: a new QEMU, the same daemon and target.
        subprocess.run([sys.executable, "-m", "vhost_user_balloon", "balloon", "web1", "128M",
                        f"--control-socket={ctl}"], check=True, timeout=30)  # fmt: skip
        wait("inflated", lambda: ask(str(ctl), {"vm": "web1"})["actual_bytes"] == 128 * MiB)
        libvirt.virsh("destroy", "web1")
        log.wait_for("frontend_disconnected", timeout=30, vm="web1")
        libvirt.virsh("start", "web1")
        wait("the guest's driver bound again", lambda: guest.booted() == 2)
        wait("the kept target", lambda: ask(str(ctl), {"vm": "web1"})["actual_bytes"] == 128 * MiB)

        # Reboot (a hard reset: this guest has no ACPI daemon): the driver binds again
        # on the same connection and the guest keeps reporting.
        started = len(log.events("queue_started"))
        libvirt.virsh("reset", "web1")
        wait("the guest's driver bound after the reset", lambda: guest.booted() == 3)
        wait("queues after the reset", lambda: len(log.events("queue_started")) > started)
        wait("allocated after the reset", lambda: guest.count("VUB: allocated round=1") == 2, 120)
        wait("memory back after the reset", lambda: metric(url, resident) < peak - 300 * MiB)

        qemu_log = libvirt.qemu_log("web1")
        assert "tainted: custom-argv" in qemu_log  # README says so
        print(f"\nlibvirt: resident peak {peak / MiB:.0f} MiB, {low / MiB:.0f} MiB after the free")
        assert not log.events("connection_refused")
        assert not log.events("connection_closed_on_error") and daemon.poll() is None
    finally:
        libvirt.virsh("destroy", "web1", check=False)
        stop_process(daemon, signal.SIGTERM, 15)
