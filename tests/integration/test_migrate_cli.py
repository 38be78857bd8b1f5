"""migrate-prepare and migrate-finish against a scripted QMP server, for the failures a
real QEMU gives only by accident: a guest that never lets go of the device, a device
without an id, a daemon that is not listening. (The procedure that works is proven
with two real QEMUs in tests/e2e/test_migration.py.)"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhost_user_balloon.__main__ import main

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
