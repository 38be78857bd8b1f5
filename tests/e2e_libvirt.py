"""libvirt hosts for the e2e tests: libvirtd and virtlogd of the QEMU chroot (libvirt
11.3, trixie's, beside QEMU 11), each host in its own mount and UTS namespace.

No systemd runs here, so libvirtd is started by hand. What a chroot needs and a host
does not (not product settings): /proc, /sys and /run mounted inside it;
``namespaces = [ ]`` in qemu.conf (``/`` of a chroot is no mount point), no cgroup
controllers (none are mounted in it) and no security driver (no AppArmor inside it).
libvirt runs QEMU as ``libvirt-qemu`` with the chroot's ``kvm`` group as a supplementary
group. This host has no ``kvm`` group of its own, so the daemon is given that group by
number: README's ``--socket-group kvm --allow-group kvm`` with the name resolved the way
it would be on a host with libvirt.

Two hosts on one machine, for live migration (libvirt refuses to migrate to a host with
its own hostname or host UUID): each has its own hostname (UTS namespace), its own
``host_uuid``, its own configuration, state, log and cache folders and its own /run
(bind mounts and a tmpfs in its mount namespace), and its libvirtd listens on its own
loopback TCP port. Each host's /run/vhost-user-balloon is a folder of the test: the
daemon that serves that host listens there, and the domain XML keeps the shipped socket
path. ``virsh`` and README's commands reach a host through a wrapper that enters its
namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from testbed.guestrun import QEMU_CONFIG, Env

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
SHIPPED_SOCKET = "/run/vhost-user-balloon/web1.sock"
#: README's path for the control socket
SHIPPED_CONTROL = "/run/vhost-user-balloon/control.sock"
README = QEMU_CONFIG.parent / "README.md"
#: What the chroot's libvirt needs (see the module's docstring), appended to qemu.conf.
CHROOT_QEMU_CONF = 'namespaces = [ ]\ncgroup_controllers = [ ]\nsecurity_driver = "none"\n'
#: A host's own copies of these folders of the chroot.
PER_HOST = ("etc/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt")


class Libvirt:
    """One libvirt host: libvirtd and virtlogd in the QEMU chroot, in a mount and UTS
    namespace of their own, held by a process that waits; ``virsh`` talks to them.

    With ``folder``, the host has its own copies of the chroot's libvirt folders there,
    its /run/vhost-user-balloon is ``folder/vub``, and libvirtd listens on 127.0.0.1
    ``port`` (TCP, no authentication: loopback of a test machine)."""

    def __init__(self, root: Path, name: str = "host-a", folder: Path | None = None,
                 port: int = 0) -> None:  # fmt: skip
        self.root, self.name, self.folder, self.port = root, name, folder, port
        kinds = (("proc", "proc"), ("sysfs", "sys"), ("tmpfs", "run"))
        mounts = [f"mount -t {kind} {kind} {root / where}" for kind, where in kinds]
        start = "mkdir -p /var/log/libvirt/qemu && virtlogd -d && libvirtd -d"
        if folder is None:
            conf = root / "etc/libvirt/qemu.conf"
        else:
            self._own_folders(folder)
            mounts += [f"mount --bind {folder / d} {root / d}" for d in PER_HOST]
            mounts += [f"mkdir -p {root}/run/vhost-user-balloon",
                       f"mount --bind {self.vub} {root}/run/vhost-user-balloon"]  # fmt: skip
            conf = folder / "etc/libvirt/qemu.conf"
            start += " --listen"
        if CHROOT_QEMU_CONF not in conf.read_text():
            with conf.open("a") as f:
                f.write(CHROOT_QEMU_CONF)
        script = "\n".join([f"hostname {name}", *mounts, f"chroot {root} sh -ec '{start}'",
                            "echo ready", "exec sleep infinity"])  # fmt: skip
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-ec", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        assert line == "ready\n", (line, self.holder.stderr.read() if self.holder.stderr else "")
        deadline = time.monotonic() + 30
        while self.virsh("version", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"libvirtd of {name} did not come up"
            time.sleep(0.5)

    @property
    def vub(self) -> Path:
        """This host's /run/vhost-user-balloon, as the host (outside) sees it."""
        assert self.folder is not None
        return self.folder / "vub"

    @property
    def uri(self) -> str:
        """How another host's virsh reaches this one."""
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    def _own_folders(self, folder: Path) -> None:
        for d in PER_HOST:  # owners kept (libvirt-qemu's folders), logs not
            (folder / d).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(self.root / d), str(folder / d)], check=True)
        for old in (folder / "var/log/libvirt").rglob("*.log"):
            old.unlink()
        self.vub.mkdir(parents=True)
        os.chmod(self.vub, 0o755)  # libvirt-qemu must reach the sockets
        with (folder / "etc/libvirt/libvirtd.conf").open("a") as f:
            f.write(f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "127.0.0.1"\n'
                    f'tcp_port = "{self.port}"\nauth_tcp = "none"\n'
                    f'host_uuid = "{uuid.uuid4()}"\n')  # fmt: skip

    def enter(self) -> list[str]:
        """The command prefix that runs a program of the chroot on this host."""
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--uts",
                "chroot", str(self.root)]  # fmt: skip

    def chroot(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.enter(), *args], capture_output=True, text=True,
                              check=check, timeout=180)  # fmt: skip

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self.chroot("virsh", "-q", "-c", "qemu:///system", *args, check=False)
        assert not check or done.returncode == 0, done
        return done

    def virsh_wrapper(self, tools: Path) -> None:
        """``tools/virsh``: this host's virsh, run in the caller's folder (which must
        be inside the chroot), as an operator's shell on this host would run it."""
        tools.mkdir(parents=True, exist_ok=True)
        enter = " ".join(self.enter())
        (tools / "virsh").write_text(
            f'#!/bin/sh\nhere=$(pwd)\nexec {enter} sh -c \'cd "$0" && exec virsh "$@"\' '
            f'"${{here#{self.root}}}" "$@"\n'
        )  # fmt: skip
        (tools / "virsh").chmod(0o755)

    @property
    def run(self) -> Path:
        """This host's /run, as the machine sees it (through the holder's root)."""
        return Path(f"/proc/{self.holder.pid}/root") / str(self.root).lstrip("/") / "run"

    def qemu_pid(self, domain: str) -> int:
        """The domain's QEMU, from libvirt's pid file in this host's /run."""
        return int((self.run / f"libvirt/qemu/{domain}.pid").read_text())

    def qemu_log(self, domain: str) -> str:
        path = (self.folder or self.root) / f"var/log/libvirt/qemu/{domain}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for name in self.virsh("list", "--all", "--name", check=False).stdout.split():
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)
        for pidfile in ("libvirtd.pid", "virtlogd.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((self.run / pidfile).read_text()), signal.SIGTERM)
        time.sleep(1)
        self.holder.kill()  # its namespace's mounts go with the last process in it
        self.holder.wait()


def start_hosts(root: Path, folder: Path, count: int) -> list[Libvirt]:
    """``count`` libvirt hosts (host-a, host-b, ...), each with its own folder and port."""
    hosts: list[Libvirt] = []
    try:
        for i in range(count):
            name = f"host-{chr(ord('a') + i)}"
            hosts.append(Libvirt(root, name, folder / name, port=free_port()))
    except BaseException:
        for host in hosts:
            host.close()
        raise
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def domain_xml(env: Env, console: str, sock: str | None = None, cmdline: str = "") -> str:
    """A q35 domain of the kind virt-install writes, booting the test kernel, with the
    shipped fragment merged in. Only the socket path in the fragment may be changed."""
    ET.register_namespace("qemu", QEMU_NS)
    fragment = ET.parse(QEMU_CONFIG / "libvirt-domain.xml").getroot()
    images = env.kernels["6.1"]
    dom = ET.fromstring(f"""<domain type='qemu'>
      <name>web1</name><memory unit='MiB'>1024</memory><vcpu>1</vcpu>
      <features><acpi/><apic/></features>
      <os><type arch='x86_64' machine='q35'>hvm</type>
        <kernel>{env.inside(images["kernel"])}</kernel>
        <initrd>{env.inside(images["initrd"])}</initrd>
        <cmdline>console=ttyS0 quiet {cmdline}</cmdline></os>
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
    shipped = [a for a in args if SHIPPED_SOCKET in str(a.get("value"))]
    assert len(shipped) == 1
    if sock is not None:
        shipped[0].set("value", str(shipped[0].get("value")).replace(SHIPPED_SOCKET, sock))
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


def on_host(script: str, cwd: Path, host: Libvirt) -> subprocess.Popen[str]:
    """README commands as an operator types them on a host, started: vhost-user-balloon
    from this checkout, virsh that host's (a wrapper: no virsh on this machine)."""
    host.virsh_wrapper(cwd / "bin")
    path = f"{cwd / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.Popen(["sh", "-ec", script], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PATH": path})  # fmt: skip


def run_on_host(script: str, cwd: Path, host: Libvirt) -> str:
    """The same, run to its end, which must be a success; what it printed."""
    proc = on_host(script, cwd, host)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{script}\nstdout: {out}\nstderr: {err}"
    return out


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


def kvm_gid(root: Path) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        name, _, gid, _ = line.split(":", 3)
        if name == "kvm":
            return int(gid)
    raise AssertionError("no kvm group in the chroot")
