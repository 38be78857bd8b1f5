"""Live migration between two libvirt hosts with README's commands, as written.

Two libvirt hosts on this machine (see tests/e2e_libvirt.py: each its own hostname,
host UUID, folders and loopback port), each with its own vhost-user-balloon daemon
serving /run/vhost-user-balloon of that host. A 1 GiB guest defined on host A from the
shipped XML fragment (socket path unchanged), allocating and freeing 256 MiB in rounds,
with a balloon target of 256 MiB set by hand. Then README's three blocks of "Live
migration under libvirt": the source block on A, the migration, the destination block
on B, each command run as written. Only what names the other host in README is this
machine's: ``qemu+ssh://host-b/system`` becomes B's loopback URI with QEMU's stream on
loopback too (``--migrateuri``, ``--listen-address``: libvirt refuses loopback
addresses in its own migration settings), and ``scp web1-target.json host-b:`` a copy
into B's folder. Then ``virsh destroy`` + ``virsh start`` on B (the persistent
definition keeps the balloon), a migration from B cancelled midway (``virsh
domjobabort``) and recovered with the destination block on B, and the migration back
from B to A.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.guestrun import Env, MiB, stop_process
from tests.daemon_helpers import Logs
from tests.e2e_helpers import reported, wait
from tests.e2e_libvirt import (
    QEMU_NS,
    SHIPPED_CONTROL,
    ConsoleFile,
    Libvirt,
    domain_xml,
    free_port,
    kvm_gid,
    migration_blocks,
    on_host,
    run_on_host,
    start_hosts,
)
from vhost_user_balloon.daemon.commands.control import ask

TARGET = 256 * MiB
#: rounds of 256 MiB allocated, held 2 s, freed, 15 s idle: memory keeps coming back
WORKLOAD = "vub.mib=256 vub.rounds=1000 vub.hold=2 vub.settle=15 vub.idle=3"
README_DEST = "qemu+ssh://host-b/system"
README_COPY = "scp web1-target.json host-b:"


@dataclass
class Host:
    """A libvirt host with its daemon, and the folder where its operator types."""

    libvirt: Libvirt
    daemon: subprocess.Popen[str]
    log: Logs
    work: Path
    url: str = ""
    migration_port: int = field(default_factory=free_port)

    @property
    def control(self) -> str:
        return str(self.libvirt.vub / "control.sock")

    def vm(self) -> dict[str, object]:
        return ask(self.control, {"vm": "web1"})

    def running(self) -> list[str]:
        return self.libvirt.virsh("list", "--name").stdout.split()


def start_daemon(libvirt: Libvirt, gid: int) -> tuple[subprocess.Popen[str], Logs]:
    """The host's daemon with README's socket settings, and ``--deflate-on-oom``:
    ``reclaim`` holds the guest at its floor for a few seconds, and this guest allocates
    256 MiB at any moment (measured without it: the guest, allocating while reclaim
    held it at 128 MiB available, panicked "System is deadlocked on memory")."""
    vub = libvirt.vub
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
         "--metrics-listen=127.0.0.1:0", f"--control-socket={vub / 'control.sock'}",
         f"--vm=web1={vub / 'web1.sock'}", f"--socket-group={gid}", "--socket-mode=0660",
         f"--allow-group={gid}", "--stats-interval=2", "--deflate-on-oom"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return daemon, Logs(daemon)


@pytest.fixture
def hosts(env: Env, rundir: Path) -> Iterator[tuple[Host, Host]]:
    assert (env.qemu_root / "usr/sbin/libvirtd").exists(), "run testbed/provision"
    os.chmod(rundir, 0o755)  # libvirt-qemu must reach the console file's folder
    libvirts = start_hosts(env.qemu_root, rundir, 2)
    gid = kvm_gid(env.qemu_root)
    made: list[Host] = []
    try:
        for lv in libvirts:
            daemon, log = start_daemon(lv, gid)
            work = rundir / f"{lv.name}-work"
            work.mkdir()
            made.append(Host(lv, daemon, log, work))
            made[-1].url = str(log.wait_for("daemon_ready")["metrics"])
        yield made[0], made[1]
    finally:
        for lv in libvirts:
            lv.close()
        for host in made:
            stop_process(host.daemon, signal.SIGTERM, 15)


def commands(block: str) -> list[str]:
    """A README block's commands, one by one (a line ending in a backslash goes on)."""
    return [c.strip() for c in re.split(r"(?<!\\)\n", block.strip()) if c.strip()]


def migration_to(block: str, dest: Host, *extra: str) -> str:
    """README's migration block aimed at ``dest`` on this machine (see the docstring)."""
    assert README_DEST in block and README_COPY in block, block
    uri = (f"{dest.libvirt.uri} --migrateuri tcp://127.0.0.1:{dest.migration_port} "
           f"--listen-address 127.0.0.1 {' '.join(extra)}")  # fmt: skip
    return block.replace(README_DEST, uri).replace(README_COPY, f"cp web1-target.json {dest.work}/")


def guest_ram(host: Host) -> int:
    """Host memory the domain's guest RAM holds on this host: the allocated blocks of
    its QEMU's memfd (read from QEMU's side: the daemon sees the file only while the
    balloon is plugged)."""
    pid = host.libvirt.qemu_pid("web1")
    files = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith("/memfd:") and (st := os.stat(fd)).st_size >= 512 * MiB:
                files[st.st_ino] = st.st_blocks * 512
    assert files, f"no guest RAM memfd in QEMU {pid}"
    return sum(files.values())


def check_definitions(src: Host) -> None:
    """What migrate-prepare wrote: a live definition libvirt's validator accepts, with
    the balloon's root port and without the balloon (the migration and the cold boot
    show the rest)."""
    live = src.work / "web1-dest.xml"
    done = src.libvirt.chroot("virt-xml-validate", inside(src, live), "domain", check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    args = [a.get("value", "") for a in ET.fromstring(live.read_text()).iter(f"{{{QEMU_NS}}}arg")]
    assert not [a for a in args if "vhost-user-test-device-pci" in a or "id=vb" in a], args
    assert any("pcie-root-port" in a for a in args), args
    kept = (src.work / "web1-persistent.xml").read_text()
    assert "vhost-user-test-device-pci" in kept and "<uuid>" in kept


def inside(host: Host, path: Path) -> str:
    return "/" + str(path.relative_to(host.libvirt.root))


def downtime_ms(host: Host) -> str:
    info = host.libvirt.virsh("domjobinfo", "web1", "--completed", check=False).stdout
    found = re.search(r"Total downtime:\s+(\d+)\s+ms", info)
    return found.group(1) if found else f"? ({info.strip()!r})"


#: what QEMU 11 says of every domain libvirt 11.3 starts, balloon or not
LIBVIRT_OWN = "warning: '-mon' is deprecated"


def qemu_errors(host: Host) -> list[str]:
    """What the domain's QEMU running on this host now wrote to its log (libvirt's log
    since its last "starting up"): errors and warnings, beyond the one libvirt's own
    command line causes."""
    text = host.libvirt.qemu_log("web1")
    lines = text[text.rindex("starting up") :].splitlines()
    return [line for line in lines if re.search(r"qemu-system-x86_64: |error|warning", line, re.I)
            and LIBVIRT_OWN not in line]  # fmt: skip


@dataclass
class Migration:
    """README's three blocks around one ``virsh migrate``, and what they took."""

    prepare_s: float = 0.0
    migrate_s: float = 0.0
    finish_s: float = 0.0
    downtime: str = ""
    resident_after: float = 0.0
    resident_reclaimed: float = 0.0


def migrate(src: Host, dest: Host, guest: ConsoleFile) -> Migration:
    source, middle, destination = migration_blocks()
    m = Migration()
    t = time.monotonic()
    run_on_host(source.replace(SHIPPED_CONTROL, src.control), src.work, src.libvirt)
    m.prepare_s = time.monotonic() - t
    check_definitions(src)
    t = time.monotonic()
    run_on_host(migration_to(middle, dest), src.work, src.libvirt)
    m.migrate_s = time.monotonic() - t
    m.downtime = downtime_ms(dest)
    m.resident_after = guest_ram(dest)
    assert "web1" in dest.running() and "web1" not in src.running()
    finish, reclaim = commands(destination.replace(SHIPPED_CONTROL, dest.control))
    t = time.monotonic()
    run_on_host(finish, dest.work, dest.libvirt)
    m.finish_s = time.monotonic() - t
    wait("the target in force on the destination", lambda: dest.vm()["actual_bytes"] == TARGET)
    run_on_host(reclaim, dest.work, dest.libvirt)
    m.resident_reclaimed = guest_ram(dest)
    # The guest goes on where it is now: the next round's freed memory comes back.
    given = reported(dest.url, "web1")
    freed = guest.count("VUB: freed round=")
    wait(f"a round freed on the destination: {guest.text()[-400:]}",
         lambda: guest.count("VUB: freed round=") > freed, 60)  # fmt: skip
    wait("its memory back", lambda: reported(dest.url, "web1") > given + 128 * MiB, 60)
    return m


def cancelled(src: Host, dest: Host, guest: ConsoleFile) -> tuple[int, int]:
    """README's source block, a migration slowed down (``--bandwidth``) and cancelled
    once the guest freed a round without its balloon, then README's destination block
    on the source. The guest RAM the source holds after the abort and after reclaim."""
    source, middle, destination = migration_blocks()
    run_on_host(source.replace(SHIPPED_CONTROL, src.control), src.work, src.libvirt)
    freed = guest.count("VUB: freed round=")
    slow = on_host(migration_to(middle, dest, "--bandwidth 4"), src.work, src.libvirt)
    wait("the migration under way", lambda: "Memory processed" in
         src.libvirt.virsh("domjobinfo", "web1", check=False).stdout, 60)  # fmt: skip
    # cancelled as the guest idles after freeing 256 MiB that nothing reports: the
    # source holds them until the balloon is back
    wait("a round freed while unplugged", lambda: guest.count("VUB: freed round=") > freed, 60)
    src.libvirt.virsh("domjobabort", "web1")
    out, err = slow.communicate(timeout=60)
    assert slow.returncode != 0 and "cancel" in err.lower(), (out, err)
    assert "web1" in src.running() and "web1" not in dest.running()
    grown = guest_ram(src)
    finish, reclaim = commands(destination.replace(SHIPPED_CONTROL, src.control))
    run_on_host(finish, src.work, src.libvirt)
    wait("the target back on the source", lambda: src.vm()["actual_bytes"] == TARGET)
    run_on_host(reclaim, src.work, src.libvirt)
    return grown, guest_ram(src)


def test_virsh_migrate_between_two_libvirt_hosts(
    env: Env, rundir: Path, hosts: tuple[Host, Host]
) -> None:
    a, b = hosts
    console = rundir / "console.log"
    guest = ConsoleFile(console)
    xml = domain_xml(env, env.inside(console), cmdline=WORKLOAD)  # the socket as shipped
    (rundir / "web1.xml").write_text(xml)
    a.libvirt.virsh("define", env.inside(rundir / "web1.xml"))
    a.libvirt.virsh("start", "web1")
    wait("the guest's driver bound on A", lambda: guest.booted() == 1, 120)
    a.log.wait_for("frontend_connected", timeout=60, vm="web1")
    subprocess.run([sys.executable, "-m", "vhost_user_balloon", "balloon", "web1", "256M",
                    f"--control-socket={a.control}"], check=True, timeout=30)  # fmt: skip
    wait("inflated on A", lambda: a.vm()["actual_bytes"] == TARGET)
    wait("a round freed on A", lambda: guest.count("VUB: freed round=") >= 1, 120)

    # A -> B with README's blocks.
    there = migrate(a, b, guest)
    assert qemu_errors(b) == [], qemu_errors(b)

    # A cold boot on B: its persistent definition has the balloon, B's daemon serves it.
    connected = len(b.log.events("frontend_connected", vm="web1"))
    b.libvirt.virsh("destroy", "web1")
    b.libvirt.virsh("start", "web1")
    wait("the guest's driver bound on B", lambda: guest.booted() == 2, 120)
    b.log.wait_for("frontend_connected", count=connected + 1, timeout=60, vm="web1")
    wait("the kept target on B", lambda: b.vm()["actual_bytes"] == TARGET)

    # B -> A cancelled midway: the VM stays on B, its balloon comes back, and the RAM
    # its guest freed meanwhile (nothing reported it) is given back.
    grown, recovered = cancelled(b, a, guest)
    assert recovered < grown - 128 * MiB, (grown, recovered)

    # B -> A: back where it started.
    back = migrate(b, a, guest)
    assert qemu_errors(a) == [], qemu_errors(a)
    print(f"\nlibvirt A -> B: {report(there)}\ncancelled on B: guest RAM held {grown / MiB:.0f} "
          f"MiB after the abort, {recovered / MiB:.0f} MiB after reclaim\n"
          f"libvirt B -> A: {report(back)}")  # fmt: skip
    for host in (a, b):
        assert host.daemon.poll() is None
        assert not host.log.events("connection_closed_on_error")


def report(m: Migration) -> str:
    return (f"prepare (unplug) {m.prepare_s:.2f} s, virsh migrate {m.migrate_s:.1f} s, "
            f"downtime {m.downtime} ms, finish (replug) {m.finish_s:.2f} s; guest RAM held "
            f"{m.resident_after / MiB:.0f} MiB after, {m.resident_reclaimed / MiB:.0f} MiB "
            "after reclaim")  # fmt: skip
