"""Live migration with the balloon attached: ``migrate-prepare`` and ``migrate-finish``.

QEMU's generic vhost-user device cannot be migrated ("State blocked by non-migratable
device"), so the balloon leaves the VM before the migration and comes back after it
(docs/facts.md, "Live migration"):

- source, ``prepare``: ``device_del`` (the guest's driver lets go of the device, which
  deflates its balloon; QEMU sends DEVICE_DELETED), then ``chardev-remove`` (the
  daemon sees the connection end). The VM can migrate now.
- destination, after the migration, ``finish``: ``chardev-add`` (a connection to the
  daemon's socket for this VM) and ``device_add``. The daemon gives the new device's
  guest the balloon target it kept for the VM.
- then ``vhost-user-balloon reclaim`` (``reclaim``: a cancelled migration needs it on
  the source too) gives back the RAM the migration left resident.

Each step talks to QEMU through QMP; each failure is a ``MigrateError`` that says
which step failed and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Final

from vhost_user_balloon.protocol import QEMU_DEVICE

from .qmp import Qmp, QmpError

__all__ = ["DEVICE", "MigrateError", "finish", "finish_command", "prepare", "prepare_command"]

#: The device QEMU realizes for us (the shipped options, qemu-config/, say the same).
DEVICE: Final = dict(QEMU_DEVICE)


class MigrateError(Exception):
    """One step of the procedure failed; the text says which and what to do."""


def prepare(qmp_path: str, device: str, chardev: str, timeout: float) -> float:
    """Unplug the balloon device and remove its chardev on the source; the seconds
    the guest took to let go of the device."""
    with _qmp(qmp_path) as qmp:
        ids = _peripherals(qmp)
        if device not in ids:
            raise MigrateError(
                f"QEMU at {qmp_path} has no device with id {device!r} (devices with ids: "
                f"{', '.join(sorted(ids)) or 'none'}); give the balloon's -device an id, "
                f"e.g. id={device}, and put it behind a hot-pluggable port (bus=...)"
            )
        start = time.monotonic()
        try:
            qmp.command("device_del", id=device)
        except QmpError as err:
            if "in the process of unplug" not in str(err):
                raise MigrateError(f"unplugging {device}: {err}") from None
        event = qmp.wait_event("DEVICE_DELETED", timeout, lambda d: d.get("device") == device)
        if event is None:
            raise MigrateError(
                f"the guest has not let go of {device} within {timeout:g} s. device_del waits "
                "for the guest: its kernel must be running and handle PCI hot-unplug (on "
                "q35 the device must sit behind a pcie-root-port). QEMU may still finish it "
                "later; run migrate-prepare again to wait again"
            )
        took = time.monotonic() - start
        try:
            qmp.command("chardev-remove", id=chardev)
        except QmpError as err:
            raise MigrateError(
                f"{device} is unplugged, but its chardev {chardev!r} could not be removed: "
                f"{err}. Pass the chardev's id with --chardev"
            ) from None
        return took


def finish(qmp_path: str, socket_path: str, device: str, chardev: str, bus: str | None) -> None:
    """Attach the balloon again on the destination: a chardev to the daemon's socket,
    then the device. A device that cannot be added takes its chardev with it."""
    backend = {
        "type": "socket",
        "data": {"addr": {"type": "unix", "data": {"path": socket_path}}, "server": False},
    }
    with _qmp(qmp_path) as qmp:
        try:
            qmp.command("chardev-add", id=chardev, backend=backend)
        except QmpError as err:
            raise MigrateError(
                f"connecting QEMU to {socket_path}: {err}. Is the daemon running here "
                "and serving this VM on that socket?"
            ) from None
        properties: dict[str, Any] = {**DEVICE, "id": device, "chardev": chardev}
        if bus is not None:
            properties["bus"] = bus
        try:
            qmp.command("device_add", **properties)
        except QmpError as err:
            with contextlib.suppress(QmpError):
                qmp.command("chardev-remove", id=chardev)
            raise MigrateError(f"adding the balloon device: {err}") from None


def _qmp(path: str) -> Qmp:
    try:
        return Qmp(path)
    except QmpError as err:
        raise MigrateError(str(err)) from None


def _peripherals(qmp: Qmp) -> set[str]:
    try:
        listed = qmp.command("qom-list", path="/machine/peripheral")
    except QmpError as err:
        raise MigrateError(f"listing QEMU's devices: {err}") from None
    return {p["name"] for p in listed if str(p.get("type", "")).startswith("child<")}


# -- the commands ----------------------------------------------------------------------
PREPARE_HELP = """\
On the migration's source, before "migrate": unplug the balloon device (device_del,
then wait for the guest to let go of it: DEVICE_DELETED) and remove its chardev, so
that QEMU can migrate the VM. The device needs an id and a hot-pluggable slot: on q35,
  -device pcie-root-port,id=rp1,chassis=1,slot=1
  -device vhost-user-test-device-pci,id=vub0,bus=rp1,chardev=vb,...
Exit status 0 once the VM can migrate, 1 with the reason otherwise.
"""

FINISH_HELP = """\
On the migration's destination, once the migration has completed: connect QEMU to the
daemon's socket for this VM (chardev-add) and add the balloon device again
(device_add). The daemon gives the new device the balloon target it kept for the VM
(on another host: set it there with "vhost-user-balloon balloon"). Then run
"vhost-user-balloon reclaim VM" to give back the RAM the migration left resident.
Exit status 0 when done, 1 with the step that failed and why.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qmp",
        required=True,
        metavar="PATH",
        help="QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off)",
    )
    p.add_argument(
        "--device",
        default="vub0",
        metavar="ID",
        help="the balloon device's id (default: %(default)s)",
    )
    p.add_argument("--chardev", default="vb", metavar="ID",
                   help="its chardev's id (default: %(default)s)")  # fmt: skip


def prepare_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon migrate-prepare", description=PREPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _common(p)
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds for the guest to let go (default: %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        took = prepare(args.qmp, args.device, args.chardev, args.timeout)
    except MigrateError as err:
        print(f"vhost-user-balloon migrate-prepare: {err}", file=sys.stderr)
        return 1
    print(f"{args.device} unplugged ({took:.2f} s) and chardev {args.chardev} removed: "
          "the VM can migrate")  # fmt: skip
    return 0


def finish_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon migrate-finish", description=FINISH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _common(p)
    p.add_argument(
        "--socket", required=True, metavar="PATH", help="the daemon's socket for this VM"
    )
    p.add_argument("--bus", metavar="ID", help="where to plug the device, e.g. rp1")
    args = p.parse_args(argv)
    try:
        finish(args.qmp, args.socket, args.device, args.chardev, args.bus)
    except MigrateError as err:
        print(f"vhost-user-balloon migrate-finish: {err}", file=sys.stderr)
        return 1
    print(f"{args.device} added again, connected to {args.socket}")
    return 0
