"""libvirt as operators run it: a domain with qemu-config/libvirt-domain.xml merged in
as shipped (only the socket path replaced), started by libvirtd, attached to the daemon
with the socket settings README recommends.

libvirt 11.3 (trixie, beside QEMU 11) runs in the QEMU chroot, started by hand: no
systemd runs here. What the chroot needs and a host does not (not product settings):
/proc, /sys and /run mounted inside it; ``namespaces = [ ]`` in qemu.conf (``/`` of a
chroot is no mount point), no cgroup controllers (none are mounted in it) and no
security driver (no AppArmor inside it). libvirt runs QEMU as ``libvirt-qemu`` with
the chroot's ``kvm`` group as a supplementary group. This host has no ``kvm`` group of
its own, so the daemon is given that group by number: README's ``--socket-group kvm
--allow-group kvm`` with the name resolved the way it would be on a host with libvirt.
The domain is ``type='qemu'`` (TCG): KVM cannot run guests on these machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.guestrun import QEMU_CONFIG, Env, MiB, stop_process
from tests.daemon_helpers import Logs
from tests.e2e_helpers import metric, wait
from vhost_user_balloon.daemon.commands.control import ask

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
SHIPPED_SOCKET = "/run/vhost-user-balloon/web1.sock"
README = QEMU_CONFIG.parent / "README.md"
#: What the chroot's libvirt needs (see the module's docstring), appended to qemu.conf.
CHROOT_QEMU_CONF = 'namespaces = [ ]\ncgroup_controllers = [ ]\nsecurity_driver = "none"\n'


class Libvirt:
    """libvirtd and virtlogd in the QEMU chroot; ``virsh`` talks to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []
        for kind, where in (("proc", "proc"), ("sysfs", "sys"), ("tmpfs", "run")):
            path = root / where
            subprocess.run(["mount", "-t", kind, kind, str(path)], check=True)
            self.mounts.append(path)
        conf = root / "etc/libvirt/qemu.conf"
        if CHROOT_QEMU_CONF not in conf.read_text():
            with conf.open("a") as f:
                f.write(CHROOT_QEMU_CONF)
        self._chroot("sh", "-c", "mkdir -p /var/log/libvirt/qemu && virtlogd -d && libvirtd -d")
        deadline = time.monotonic() + 30
        while self.virsh("version", check=False).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd did not come up"
            time.sleep(0.5)

    def _chroot(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["chroot", str(self.root), *args], capture_output=True, text=True, check=check,
            timeout=120,
        )  # fmt: skip

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self._chroot("virsh", "-q", "-c", "qemu:///system", *args, check=False)
        assert not check or done.returncode == 0, done
        return done

    def close(self) -> None:
        for name in self.virsh("list", "--all", "--name", check=False).stdout.split():
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)
        for pidfile in ("libvirtd.pid", "virtlogd.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((self.root / "run" / pidfile).read_text()), signal.SIGTERM)
        time.sleep(1)
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def libvirt(env: Env) -> Iterator[Libvirt]:
    assert env.qemu_root != Path("/"), "libvirt is provisioned in the QEMU chroot"
    assert (env.qemu_root / "usr/sbin/libvirtd").exists(), "run testbed/provision"
    lv = Libvirt(env.qemu_root)
    try:
        yield lv
    finally:
        lv.close()


def domain_xml(env: Env, socket: str, console: str) -> str:
    """A q35 domain of the kind virt-install writes, booting the test kernel, with the
    shipped fragment merged in. Only the socket path in the fragment is changed."""
    ET.register_namespace("qemu", QEMU_NS)
    fragment = ET.parse(QEMU_CONFIG / "libvirt-domain.xml").getroot()
    images = env.kernels["6.1"]
    dom = ET.fromstring(f"""<domain type='qemu'>
      <name>web1</name><memory unit='MiB'>1024</memory><vcpu>1</vcpu>
      <features><acpi/><apic/></features>
      <os><type arch='x86_64' machine='q35'>hvm</type>
        <kernel>{env.inside(images["kernel"])}</kernel>
        <initrd>{env.inside(images["initrd"])}</initrd>
        <cmdline>console=ttyS0 quiet vub.mib=512 vub.settle=3600 vub.idle=3</cmdline></os>
      <devices>
        <controller type='pci' index='0' model='pcie-root'/>
        <serial type='file'><source path='{console}' append='on'/></serial>
      </devices></domain>""")
    devices = dom.find("devices")
    assert devices is not None
    for part in fragment:
        if part.tag == "devices":
            devices.extend(list(part))
        else:
            dom.append(part)
    args = list(dom.iter(f"{{{QEMU_NS}}}arg"))
    replaced = [a for a in args if SHIPPED_SOCKET in str(a.get("value"))]
    assert len(replaced) == 1
    replaced[0].set("value", str(replaced[0].get("value")).replace(SHIPPED_SOCKET, socket))
    return ET.tostring(dom, encoding="unicode")


def migration_blocks() -> list[str]:
    """The ```sh blocks of README's "Live migration under libvirt": source, the
    migration itself, destination."""
    text = README.read_text()
    section = text[text.index("#### Live migration under libvirt") :]
    section = section[: section.index("\n#", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 3, blocks
    return blocks


#: README's paths for the control socket (the VM socket: SHIPPED_SOCKET).
SHIPPED_CONTROL = "/run/vhost-user-balloon/control.sock"


def run_on_host(script: str, cwd: Path, root: Path) -> None:
    """README commands as an operator types them on the host: vhost-user-balloon from
    this checkout, virsh the chroot's (a two-line wrapper: no virsh on this host)."""
    tools = cwd / "bin"
    tools.mkdir(exist_ok=True)
    (tools / "virsh").write_text(f'#!/bin/sh\nexec chroot {root} virsh "$@"\n')
    (tools / "virsh").chmod(0o755)
    path = f"{tools}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    done = subprocess.run(["sh", "-ec", script], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PATH": path}, timeout=180, check=False)  # fmt: skip
    assert done.returncode == 0, f"{script}\nstdout: {done.stdout}\nstderr: {done.stderr}"


class ConsoleFile:
    """The guest's serial console, which libvirt writes to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def count(self, prefix: str) -> int:
        return self.text().count(prefix)

    def booted(self) -> int:
        """How many times the guest's balloon driver bound."""
        return len(re.findall(r"VUB: balloon features=[01]{8}", self.text()))


def readme_migration_blocks_in_place(libvirt: Libvirt, env: Env, rundir: Path, log: Logs) -> None:
    """README's source and destination blocks under libvirt, as they are, on this one
    domain (only the paths of this test's sockets put in); the VM has a 128 MiB target
    set by hand."""
    sock, ctl = rundir / "web1.sock", rundir / "control.sock"
    source, _, destination = migration_blocks()
    run_on_host(source.replace(SHIPPED_CONTROL, str(ctl)), rundir, env.qemu_root)
    log.wait_for("frontend_disconnected", count=2, timeout=30, vm="web1")
    assert not ask(str(ctl), {"vm": "web1"})["attached"]
    check_definitions(libvirt, env, rundir)
    carried = json.loads((rundir / "web1-target.json").read_text())
    assert (carried["target_bytes"], carried["pinned"]) == (128 * MiB, True)
    run_on_host(destination.replace(SHIPPED_CONTROL, str(ctl))
                .replace(SHIPPED_SOCKET, env.inside(sock)), rundir, env.qemu_root)  # fmt: skip
    log.wait_for("frontend_connected", count=3, timeout=30, vm="web1")
    # The guest bound the new device: it takes the carried target into its balloon.
    wait("the target on the plugged device",
         lambda: ask(str(ctl), {"vm": "web1"})["actual_bytes"] == 128 * MiB)  # fmt: skip


def check_definitions(libvirt: Libvirt, env: Env, rundir: Path) -> None:
    """What migrate-prepare wrote: a live definition libvirt's validator accepts, with
    the root port and without the balloon; a persistent one libvirt defines, the
    balloon kept."""
    live, persistent = rundir / "web1-dest.xml", rundir / "web1-persistent.xml"
    done = libvirt._chroot("virt-xml-validate", env.inside(live), "domain", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    args = [a.get("value", "") for a in ET.fromstring(live.read_text()).iter(f"{{{QEMU_NS}}}arg")]
    assert not [a for a in args if "vhost-user-test-device-pci" in a or "id=vb" in a], args
    assert any("pcie-root-port" in a for a in args), args
    libvirt.virsh("define", env.inside(persistent))  # the same domain, UUID and all
    kept = libvirt.virsh("dumpxml", "--inactive", "web1").stdout
    assert "vhost-user-test-device-pci" in kept


def kvm_gid(root: Path) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        name, _, gid, _ = line.split(":", 3)
        if name == "kvm":
            return int(gid)
    raise AssertionError("no kvm group in the chroot")


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
        (rundir / "web1.xml").write_text(domain_xml(env, env.inside(sock), env.inside(console)))
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

        readme_migration_blocks_in_place(libvirt, env, rundir, log)

        qemu_log = (env.qemu_root / "var/log/libvirt/qemu/web1.log").read_text()
        assert "tainted: custom-argv" in qemu_log  # README says so
        print(f"\nlibvirt: resident peak {peak / MiB:.0f} MiB, {low / MiB:.0f} MiB after the free")
        assert not log.events("connection_refused")
        assert not log.events("connection_closed_on_error") and daemon.poll() is None
    finally:
        libvirt.virsh("destroy", "web1", check=False)
        stop_process(daemon, signal.SIGTERM, 15)
