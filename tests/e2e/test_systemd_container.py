"""The daemon under a real systemd: README's install and start commands run as they are
in a systemd 257 container, a real guest attached, and the service restarted, killed,
extended with a VM and stopped under it.

No systemd runs as PID 1 on these machines; Debian 12's systemd-nspawn boots the QEMU
chroot (trixie, with systemd 257, QEMU 11 and a Python toolchain from
testbed/provision) as a container. What the container needs here and a host does
not (not product settings): a cgroup of its own in both the cgroup2 and the
``name=systemd`` hierarchies of this host's hybrid layout, and
``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` (without it the container fails to set up
``/sys/fs/cgroup``); ``--system-call-filter=bpf`` (without it ``IPAddressDeny=`` is
silently not enforced); and pip trusting the CA bundle this host's network needs
(given as ``PIP_CERT``). The container shares the host's network, so pip reaches the
package registry and the test scrapes the daemon's metrics port directly.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.guestrun import QEMU_CONFIG, Env, GuestSpec, MiB, attach_args, qemu_args, stop_process
from tests.e2e_helpers import Console, metric, reported, wait

REPO = QEMU_CONFIG.parent
README = REPO / "README.md"
METRICS = "http://127.0.0.1:9584/metrics"  # systemd/config.toml's metrics_listen
#: What an install leaves in the tree: removed first, so that each run installs anew.
INSTALLED = (
    "opt/vhost-user-balloon", "usr/local/bin/vhost-user-balloon", "root/vub-src",
    "root/vub-host-ca.crt",
    "etc/systemd/system/vhost-user-balloon.service",
    "etc/systemd/system/vhost-user-balloon-vm@.socket",
    "etc/systemd/system/sockets.target.wants/vhost-user-balloon-vm@*.socket",
    "etc/systemd/system/multi-user.target.wants/vhost-user-balloon.service",
    "usr/lib/sysusers.d/vhost-user-balloon.conf", "etc/vhost-user-balloon",
)  # fmt: skip


def readme_blocks() -> list[str]:
    """The ```sh blocks of README's systemd section, in order."""
    text = README.read_text()
    section = text[text.index("## Running it under systemd") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


class Container:
    """The QEMU chroot booted with systemd as PID 1."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        hierarchies = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
        self.cgroups = [p / f"vub-ct-{os.getpid()}" for p in hierarchies if p.is_dir()]
        for group in self.cgroups:
            group.mkdir(exist_ok=True)
        enter = "".join(f"echo $$ > {g}/cgroup.procs; " for g in self.cgroups)
        self.nspawn = subprocess.Popen(
            ["sh", "-c", f"{enter}exec systemd-nspawn --register=no --keep-unit "
             f"--system-call-filter=bpf --console=passive --machine=vub-ct -D {root} -b"],
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
            stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        self.pid = 0
        while True:
            assert self.nspawn.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            found = children.read_text().split() if children.exists() else []
            if found:
                self.pid = int(found[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    break
            time.sleep(0.5)

    def command(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-a", "env", "-i",
                "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *args]  # fmt: skip

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        assert not check or done.returncode == 0, (
            f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done

    def journal(self, event: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines with ``event``, from this boot's journal (the
        tree keeps the journals of earlier runs)."""
        out = self.run("journalctl", "-b", "-u", "vhost-user-balloon.service", "-o", "cat",
                       "--no-pager").stdout  # fmt: skip
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("event") == event]

    def wait_journal(self, event: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.journal(event)) < count:
            assert time.monotonic() < deadline, (event, count, found)
            time.sleep(0.5)
        return found

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def close(self) -> None:
        self.nspawn.send_signal(signal.SIGTERM)  # an orderly shutdown of the container
        try:
            self.nspawn.wait(60)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait()
        for group in self.cgroups:  # with what the container's systemd made in it
            for path in [*sorted(group.rglob("*"), key=lambda p: -len(p.parts)), group]:
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()


@pytest.fixture
def container(env: Env, rundir: Path) -> Iterator[Container]:
    root = env.qemu_root
    assert root != Path("/") and (root / "usr/lib/systemd/systemd").exists(), (
        "run testbed/provision")  # fmt: skip
    assert shutil.which("systemd-nspawn"), "run testbed/provision (systemd-container)"
    for rel in INSTALLED:
        for path in root.glob(rel):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(root / "root/vub-src")], check=True)
    # (the container's /tmp is its own tmpfs: this goes beside the source)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "root/vub-host-ca.crt")
    made = Container(root, rundir / "container.log")
    try:
        yield made
    finally:
        made.close()


def start_guest(ct: Container, env: Env) -> tuple[subprocess.Popen[bytes], Console]:
    """A real guest for web1, its QEMU running as libvirt runs it: its own user, with
    group kvm on the side. Six rounds of 256 MiB, one every ~20 s."""
    spec = GuestSpec(mem_mib=1024, workload_mib=256, rounds=6, idle_s=3, settle_s=14)
    args = attach_args("vhost-user-balloon", socket="/run/vhost-user-balloon/web1.sock",
                       mem="1G")  # fmt: skip
    qemu = subprocess.Popen(
        ct.command("setpriv", "--reuid=libvirt-qemu", "--regid=libvirt-qemu", "--groups=kvm",
                   "--", env.qemu_binary, *qemu_args(spec, env, args)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    return qemu, Console(qemu)


def security_exposure(ct: Container) -> float:
    """systemd-analyze security of the running unit, on systemd 257."""
    security = ct.run("systemd-analyze", "security", "--no-pager",
                      "vhost-user-balloon.service", check=False).stdout  # fmt: skip
    line = next(x for x in security.splitlines() if "Overall exposure level" in x)
    print(f"\nsystemd 257: {line.strip()}")
    return float(line.split(":")[1].split()[0])


def handover_gap(ct: Container, n: int) -> float:
    """Seconds from the ``n``-th end of a daemon (its last log line: the supervisor's
    daemon_exited, or the daemon's own frontend_disconnected at a stop) to the VM
    taken up by the next one, from the journal's timestamps."""

    def at(record: dict[str, Any]) -> datetime.datetime:
        return datetime.datetime.fromisoformat(str(record["timestamp"]).rstrip("Z"))

    ends = [*ct.journal("daemon_exited"), *ct.journal("frontend_disconnected")]
    adopted = ct.journal("frontend_adopted")[n - 1]
    end = max((r for r in ends if at(r) <= at(adopted)), key=at)
    return round((at(adopted) - at(end)).total_seconds(), 3)


def standby_takes_over(ct: Container) -> None:
    """The daemon alone dies (kill -9 of the supervisor's child): its standby is
    handed the connection; systemd sees nothing (same main process, still active)."""
    spare = ct.wait_journal("standby_armed", 2)[-1]["pid"]
    main = ct.show("vhost-user-balloon.service", "MainPID")
    ct.run("sh", "-c", f"kill -9 {ct.journal('daemon_started')[-1]['pid']}")
    ct.wait_journal("frontend_adopted", 2)
    took = ct.journal("daemon_started")[-1]
    assert took["pid"] == spare and took["standby"], took
    assert ct.show("vhost-user-balloon.service", "MainPID") == main
    print(f"daemon killed, standby took over: VM waited {handover_gap(ct, 2)} s")
    ct.wait_journal("daemon_ready", 3)


def service_killed(ct: Container) -> None:
    """The whole service killed (supervisor, daemon, standby): Restart=on-failure, and
    the next start takes the VM up from systemd's store."""
    counted = reported(METRICS, "web1")
    ct.run("systemctl", "kill", "-s", "KILL", "vhost-user-balloon.service")
    ct.wait_journal("frontend_adopted", 3, timeout=60)
    ct.wait_journal("daemon_ready", 4)
    assert reported(METRICS, "web1") >= counted  # the counters carried over


def test_readme_install_under_systemd_257_with_a_real_guest(
    env: Env, rundir: Path, container: Container
) -> None:
    install, add_vm = readme_blocks()
    ct = container
    ct.run("sh", "-ec", f"export PIP_CERT=/root/vub-host-ca.crt; cd /root/vub-src; {install}",
           timeout=600)  # fmt: skip

    # Started as README says: ready, sockets made by systemd (root:kvm 0660), no guest yet.
    service = ct.show("vhost-user-balloon.service", "ActiveState", "StatusText", "Type")
    assert service == {"ActiveState": "active", "StatusText": "0 of 2 VMs attached",
                       "Type": "notify"}, service  # fmt: skip
    listing = ct.run("stat", "-c", "%U:%G %a", "/run/vhost-user-balloon/web1.sock").stdout
    assert listing.split() == ["root:kvm", "660"]
    assert sorted(ct.wait_journal("daemon_ready", 1)[0]["vms"]) == ["web1", "web2"]

    qemu, guest = start_guest(ct, env)
    try:
        guest.wait("balloon features", 90)
        wait("attached", lambda: ct.show("vhost-user-balloon.service", "StatusText")
             == {"StatusText": "1 of 2 VMs attached"})  # fmt: skip
        # The daemon (its own user) can see QEMU's (libvirt-qemu's) open files: it
        # would notice a VFIO device.
        assert ct.wait_journal("frontend_connected", 1)[0]["passthrough_check"] == "ok", (
            ct.journal("passthrough_check_unavailable"))  # fmt: skip

        def reports_go_on(after_round: int) -> None:
            """Round ``after_round`` + 1 runs after the event; its free is reported."""
            before = reported(METRICS, "web1")
            guest.wait(f"freed round={after_round + 1}", 120)
            wait("reports after the event", lambda: reported(METRICS, "web1") >= before + 200 * MiB)

        guest.wait("freed round=1", 90)
        reports_go_on(1)
        # systemctl restart: the connection goes through the fd store; QEMU sees nothing.
        ct.run("systemctl", "restart", "vhost-user-balloon.service")
        adopted = ct.wait_journal("frontend_adopted", 1)[-1]
        assert adopted["vm"] == "web1" and adopted["passthrough_check"] == "ok", adopted
        ct.wait_journal("daemon_ready", 2)  # the metrics port is served again
        stored = ct.show("vhost-user-balloon.service", "NFileDescriptorStore")
        assert int(stored["NFileDescriptorStore"]) > 10, stored
        reports_go_on(2)
        print(f"\nsystemctl restart: VM waited {handover_gap(ct, 1)} s")
        standby_takes_over(ct)
        reports_go_on(3)
        service_killed(ct)
        reports_go_on(4)
        # A VM added while web1 runs, as README says.
        ct.run("sh", "-ec", add_vm)
        ready = ct.wait_journal("daemon_ready", 5)[-1]
        assert sorted(ready["vms"]) == ["web1", "web2", "web3"]
        assert ct.wait_journal("frontend_adopted", 4)[-1]["vm"] == "web1"
        assert (
            ct.run("test", "-S", "/run/vhost-user-balloon/web3.sock", check=False).returncode == 0
        )
        reports_go_on(5)
        assert qemu.poll() is None and guest.stderr == [], guest.stderr
        assert metric(METRICS, 'vhost_user_balloon_connected{vm="web1"}') == 1

        assert security_exposure(ct) <= 2.0

        # systemctl stop: the daemon goes, the store is emptied, QEMU sees the end.
        ct.run("systemctl", "stop", "vhost-user-balloon.service")
        gone = ct.journal("frontend_disconnected")[-1]
        assert gone["why"] == "shutdown" and gone["handed_over"]
        stored = ct.show("vhost-user-balloon.service", "NFileDescriptorStore", "ActiveState")
        assert stored == {"NFileDescriptorStore": "0", "ActiveState": "inactive"}, stored
    finally:
        stop_process(qemu, signal.SIGTERM, 5)
