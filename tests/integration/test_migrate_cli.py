"""migrate-prepare and migrate-finish against a scripted QMP server, for the failures a
real QEMU gives only by accident: a guest that never lets go of the device, a device
without an id, a daemon that is not listening. (The procedure that works is proven
with two real QEMUs in tests/e2e/test_migration.py.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon_helpers import StartDaemon, settings_for
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from tests.integration.test_balloon import control
from vhost_user_balloon.__main__ import main
from vhost_user_balloon.daemon.commands.virsh import QEMU_NS
from vhost_user_balloon.daemon.config import VmSpec
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.server import Daemon

#: command name -> what the fake QEMU answers: a return value, or (error text,)
Script = dict[str, Any]


class FakeQmp:
    """A QMP server that answers from a script and records the commands it got."""

    def __init__(
        self, path: Path, script: Script, events: Callable[[str], list[dict[str, Any]]]
    ) -> None:
        self.script, self.events = script, events
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                request = json.loads(line)
                name = request["execute"]
                self.got.append((name, request.get("arguments", {})))
                answer = self.script.get(name, {})
                if isinstance(answer, tuple):
                    reply = {"error": {"class": "GenericError", "desc": answer[0]}}
                else:
                    reply = {"return": answer}
                for event in self.events(name):
                    f.write(json.dumps(event).encode() + b"\n")
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def qmp(tmp_path: Path) -> Iterator[Callable[..., FakeQmp]]:
    made: list[FakeQmp] = []

    def make(
        script: Script, events: Callable[[str], list[dict[str, Any]]] = lambda n: []
    ) -> FakeQmp:
        made.append(FakeQmp(tmp_path / "qmp.sock", script, events))
        return made[-1]

    yield make
    for m in made:
        m.close()


PERIPHERALS = [{"name": "rp1", "type": "child<pcie-root-port>"},
               {"name": "vub0", "type": "child<vhost-user-test-device-pci>"},
               {"name": "type", "type": "string"}]  # fmt: skip


def deleted(name: str) -> list[dict[str, Any]]:
    if name != "device_del":
        return []
    path = "/machine/peripheral/vub0"
    return [
        {"event": "DEVICE_DELETED", "data": {"path": f"{path}/virtio-backend"}},
        {"event": "DEVICE_DELETED", "data": {"device": "vub0", "path": path}},
    ]


def test_prepare_unplugs_then_removes_the_chardev(
    qmp: Callable[..., FakeQmp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = qmp({"qom-list": PERIPHERALS}, deleted)
    assert main(["migrate-prepare", f"--qmp={tmp_path / 'qmp.sock'}"]) == 0
    assert [name for name, _ in fake.got] == [
        "qmp_capabilities", "qom-list", "device_del", "chardev-remove"]  # fmt: skip
    assert fake.got[2][1] == {"id": "vub0"} and fake.got[3][1] == {"id": "vb"}
    assert "the VM can migrate" in capsys.readouterr().out


def test_prepare_names_a_device_it_cannot_find(
    qmp: Callable[..., FakeQmp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = qmp({"qom-list": PERIPHERALS})
    assert main(["migrate-prepare", f"--qmp={tmp_path / 'qmp.sock'}", "--device=balloon"]) == 1
    err = capsys.readouterr().err
    assert "no device with id 'balloon' (devices with ids: rp1, vub0)" in err
    assert "device_del" not in [name for name, _ in fake.got]


def test_prepare_gives_up_on_a_guest_that_does_not_let_go(
    qmp: Callable[..., FakeQmp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = qmp({"qom-list": PERIPHERALS})  # no DEVICE_DELETED ever
    assert main(["migrate-prepare", f"--qmp={tmp_path / 'qmp.sock'}", "--timeout=0.5"]) == 1
    err = capsys.readouterr().err
    assert "has not let go of vub0 within 0.5 s" in err and "pcie-root-port" in err
    assert "chardev-remove" not in [name for name, _ in fake.got]  # still attached


def test_prepare_without_a_monitor_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate-prepare", f"--qmp={tmp_path / 'none.sock'}"]) == 1
    assert "-qmp unix:" in capsys.readouterr().err


def test_finish_adds_chardev_and_device_and_cleans_up_when_the_device_fails(
    qmp: Callable[..., FakeQmp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = qmp({"device_add": ("Bus 'rp9' not found",)})
    code = main(["migrate-finish", f"--qmp={tmp_path / 'qmp.sock'}", "--socket=/run/x.sock",
                 "--bus=rp9"])  # fmt: skip
    assert code == 1
    assert "adding the balloon device: QEMU refused device_add: Bus 'rp9' not found" in (
        capsys.readouterr().err
    )
    names = [name for name, _ in fake.got]
    assert names == ["qmp_capabilities", "chardev-add", "device_add", "chardev-remove"]
    chardev, device = fake.got[1][1], fake.got[2][1]
    assert chardev["backend"]["data"]["addr"]["data"]["path"] == "/run/x.sock"
    assert device == {"driver": "vhost-user-test-device-pci", "virtio-id": 5, "num_vqs": 5,
                      "config_size": 16, "id": "vub0", "chardev": "vb", "bus": "rp9"}  # fmt: skip


def test_finish_when_the_daemon_is_not_listening(
    qmp: Callable[..., FakeQmp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qmp({"chardev-add": ("Failed to connect to '/run/x.sock': No such file or directory",)})
    assert main(["migrate-finish", f"--qmp={tmp_path / 'qmp.sock'}", "--socket=/run/x.sock"]) == 1
    assert "Is the daemon running here" in capsys.readouterr().err


def test_reclaim_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reclaim", "web1", f"--control-socket={tmp_path / 'none.sock'}"]) == 1
    assert "asking the daemon" in capsys.readouterr().err


# -- under libvirt: QMP through virsh ---------------------------------------------------
#: virsh as far as qemu-monitor-command goes, for the failures and the exact calls; the
#: real libvirt runs the same commands in tests/e2e/test_libvirt.py.
FAKE_VIRSH = """\
#!/usr/bin/env python3
import json, pathlib, sys
here = pathlib.Path(__file__).parent
args = sys.argv[1:]
if "dumpxml" in args:
    with (here / "calls.jsonl").open("a") as f:
        f.write(json.dumps({"argv": args, "request": {"execute": "dumpxml"}}) + "\\n")
    sys.exit(print((here / "domain.xml").read_text(), end=""))
domain, request = args[-2], json.loads(args[-1])
with (here / "calls.jsonl").open("a") as f:
    f.write(json.dumps({"argv": args, "request": request}) + "\\n")
if domain != "web1":
    sys.exit(print("error: failed to get domain '%s'" % domain, file=sys.stderr) or 1)
name, gone = request["execute"], here / "deleted"
if name == "qom-list":
    devices = [{"name": "rp1", "type": "child<pcie-root-port>"}]
    if not gone.exists():
        devices.append({"name": "vub0", "type": "child<vhost-user-test-device-pci>"})
    reply = {"return": devices}
elif name == "device_add" and request["arguments"].get("bus") == "rp9":
    reply = {"error": {"class": "GenericError", "desc": "Bus 'rp9' not found"}}
else:
    if name == "device_del":
        gone.write_text("")
    reply = {"return": {}}
print(json.dumps({**reply, "id": "libvirt-7"}))
"""


@pytest.fixture
def virsh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict[str, Any]]]:
    """A virsh on PATH; returns what it was asked, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "virsh").write_text(FAKE_VIRSH)
    (bin_dir / "virsh").chmod(0o755)
    # the domain as libvirt would dump it: the shipped parts, a name and a UUID
    shipped = (Path(__file__).resolve().parents[2] / "qemu-config/libvirt-domain.xml").read_text()
    head = "<name>web1</name><uuid>5c8b3b4e-1111-4222-8333-944455556666</uuid>"
    (bin_dir / "domain.xml").write_text(
        shipped.replace("<memoryBacking>", head + "<memoryBacking>")
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def calls() -> list[dict[str, Any]]:
        path = bin_dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return calls


def test_prepare_and_finish_through_libvirt(
    virsh: Callable[[], list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate-prepare", "--libvirt=web1", "--connect=qemu:///system"]) == 0
    asked = [c["request"]["execute"] for c in virsh()]
    assert asked[:3] == ["query-status", "qom-list", "device_del"]
    assert asked[-1] == "chardev-remove" and set(asked[3:-1]) == {"qom-list"}
    assert virsh()[0]["argv"][:4] == ["-q", "-c", "qemu:///system", "qemu-monitor-command"]
    assert "the VM can migrate" in capsys.readouterr().out
    assert main(["migrate-finish", "--libvirt=web1", "--socket=/run/x.sock", "--bus=rp9"]) == 1
    assert "QEMU refused device_add: Bus 'rp9' not found" in capsys.readouterr().err
    assert [c["request"]["execute"] for c in virsh()][-3:] == [
        "chardev-add", "device_add", "chardev-remove"]  # fmt: skip


def test_a_domain_libvirt_does_not_know_is_named(
    virsh: Callable[[], list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate-prepare", "--libvirt=nope"]) == 1
    assert "virsh qemu-monitor-command nope query-status: failed to get domain 'nope'" in (
        capsys.readouterr().err
    )


def test_prepare_needs_one_monitor(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["migrate-prepare", "--qmp=/x.sock", "--libvirt=web1"])
    assert "not allowed with argument" in capsys.readouterr().err


# -- the balloon target travels with the VM ------------------------------------------------
async def attach_with_channel(
    path: Path, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> socket.socket:
    """A frontend as QEMU is after device_add, with a guest of its own (both closed
    with the fixtures): with the backend channel balloon commands go through; QEMU's
    end of it."""
    guest = GuestMemfd(32 * MiB)
    guests.append(guest)
    ours, theirs = socket.socketpair()
    fe = await FakeFrontend.connect(str(path), guest)
    frontends.append(fe)
    await fe.handshake(protocol=0x228, backend_fd=theirs.fileno())
    theirs.close()
    await fe.start()
    return ours


async def test_the_target_set_by_hand_travels_to_the_destination_daemon(
    start_daemon: StartDaemon, nursery: trio.Nursery, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
) -> None:  # fmt: skip
    # Host A: the VM with a target set by hand (pinned).
    a_ctl, b_ctl = tmp_path / "a-control.sock", tmp_path / "b-control.sock"
    source = await start_daemon("web1", control_socket=a_ctl)
    qa = await attach_with_channel(source.vms[0].socket, guests, frontends)
    assert (await control(a_ctl, {"vm": "web1", "target_bytes": 8 * MiB}))["pinned"]
    FakeQmp(tmp_path / "a-qmp.sock", {"qom-list": PERIPHERALS}, deleted)
    code = await trio.to_thread.run_sync(main, [
        "migrate-prepare", f"--qmp={tmp_path / 'a-qmp.sock'}", f"--control-socket={a_ctl}",
        "--vm=web1"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0 and "the VM can migrate" in printed.err
    # (the daemons, in this process, log to stdout too)
    (line,) = [line for line in printed.out.splitlines() if line.startswith('{"vm"')]
    record = json.loads(line)
    assert (record["vm"], record["target_bytes"], record["pinned"]) == ("web1", 8 * MiB, True)
    (tmp_path / "web1-target.json").write_text(line)

    # Host B: its own daemon; the device comes back (the test's frontend plays QEMU
    # connecting after device_add), then the target is set there.
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    dest = Daemon(settings_for([VmSpec("web1", b_dir / "web1.sock")], control_socket=b_ctl),
                  metrics=Metrics())  # fmt: skip
    await nursery.start(dest.run)
    FakeQmp(tmp_path / "b-qmp.sock", {}, lambda name: [])
    finishing = trio.Event()
    result: list[int] = []

    async def finish_it() -> None:
        result.append(await trio.to_thread.run_sync(main, [
            "migrate-finish", f"--qmp={tmp_path / 'b-qmp.sock'}",
            f"--socket={b_dir / 'web1.sock'}", f"--control-socket={b_ctl}", "--vm=web1",
            f"--target-from={tmp_path / 'web1-target.json'}"]))  # fmt: skip
        finishing.set()

    nursery.start_soon(finish_it)
    await trio.sleep(0.5)  # finish is waiting for the daemon to serve the VM
    qb = await attach_with_channel(b_dir / "web1.sock", guests, frontends)
    with trio.fail_after(10):
        await finishing.wait()
    assert result == [0]
    status = await control(b_ctl, {"vm": "web1"})
    assert (status["target_bytes"], status["pinned"]) == (8 * MiB, True)
    assert "balloon target 8388608 bytes set" in capsys.readouterr().out
    qa.close()
    qb.close()


def test_a_target_the_policy_set_is_left_to_the_destination(
    qmp: Callable[..., FakeQmp], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qmp({})
    again = FakeQmp(tmp_path / "again.sock", {}, lambda name: [])
    record = tmp_path / "web1-target.json"
    record.write_text('{"vm": "web1", "target_bytes": 134217728, "pinned": false}')
    # no daemon at the control socket: finish would fail if it tried to set the target
    assert main(["migrate-finish", f"--qmp={tmp_path / 'qmp.sock'}", "--socket=/run/x.sock",
                 f"--control-socket={tmp_path / 'none.sock'}", "--vm=web1",
                 f"--target-from={record}"]) == 0  # fmt: skip
    assert "target" not in capsys.readouterr().out
    record.write_text("not json")
    assert main(["migrate-finish", f"--qmp={tmp_path / 'again.sock'}", "--socket=/run/x.sock",
                 f"--control-socket={tmp_path / 'none.sock'}", "--vm=web1",
                 f"--target-from={record}"]) == 1  # fmt: skip
    assert "not what migrate-prepare printed" in capsys.readouterr().err
    assert again.got == []  # the file is read before QEMU is touched
    again.close()


def test_prepare_writes_the_destination_definitions_before_unplugging(
    virsh: Callable[[], list[dict[str, Any]]], tmp_path: Path
) -> None:
    live, persistent = tmp_path / "web1-dest.xml", tmp_path / "web1-persistent.xml"
    assert main(["migrate-prepare", "--libvirt=web1", f"--dest-xml={live}",
                 f"--persistent-xml={persistent}"]) == 0  # fmt: skip
    calls = virsh()
    dumps = [c["argv"] for c in calls if c["request"]["execute"] == "dumpxml"]
    assert [a[a.index("dumpxml") :] for a in dumps] == [
        ["dumpxml", "--migratable", "web1"],
        ["dumpxml", "--inactive", "--migratable", "web1"],
    ]
    order = [c["request"]["execute"] for c in calls]
    assert order.index("dumpxml") < order.index("device_del")
    root = ET.fromstring(live.read_text())
    args = [a.get("value", "") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[0] == "-device" and json.loads(args[1])["driver"] == "pcie-root-port"
    assert len(args) == 2  # the balloon's -chardev and -device gone, its root port kept
    assert root.findtext("name") == "web1" and root.get("type") == "kvm"
    # the persistent one as libvirt gave it: the balloon and the UUID kept
    assert "vhost-user-test-device-pci" in persistent.read_text()
    assert "5c8b3b4e-1111-4222-8333-944455556666" in persistent.read_text()


def test_definitions_need_libvirt_and_the_shipped_attachment(
    virsh: Callable[[], list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["migrate-prepare", "--qmp=/x.sock", "--dest-xml=/tmp/x.xml"])
    assert "--dest-xml and --persistent-xml need --libvirt DOMAIN" in capsys.readouterr().err
    # a device id the domain does not use: said, and nothing unplugged
    code = main(["migrate-prepare", "--libvirt=web1", "--device=balloon0",
                 f"--dest-xml={tmp_path / 'd.xml'}"])  # fmt: skip
    assert code == 1
    assert "no -device with id balloon0" in capsys.readouterr().err
    assert "device_del" not in [c["request"]["execute"] for c in virsh()]
