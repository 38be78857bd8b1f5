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
- ``reclaim`` (a command of its own: a cancelled migration needs it on the source):
  the migration read every page of guest RAM, which leaves the whole of it resident
  on both hosts, and the guest never reports again what it reported before.
  Inflating the balloon over the guest's available memory above a floor and
  deflating it again gives that back.

Each step talks to QEMU through QMP and to the daemon through its control socket; each
failure is a ``MigrateError`` that says which step failed and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from vhost_user_balloon.protocol import GUEST_PAGE_SIZE

from .config import parse_size
from .control import ControlError, ask
from .qmp import Qmp, QmpError

__all__ = [
    "DEVICE",
    "MigrateError",
    "Reclaimed",
    "finish",
    "finish_command",
    "prepare",
    "prepare_command",
    "reclaim",
    "reclaim_command",
]

#: The device QEMU realizes for us (the shipped options, qemu-config/).
DEVICE: Final = {
    "driver": "vhost-user-test-device-pci",
    "virtio-id": 5,
    "num_vqs": 5,
    "config_size": 16,
}
MiB: Final = 1 << 20
#: Available memory a guest keeps while ``reclaim`` has its balloon inflated.
DEFAULT_FLOOR: Final = 128 * MiB
#: Below this much to gain, reclaim does not inflate at all.
_WORTH_RECLAIMING: Final = 16 * MiB
#: The balloon is done moving when ``actual`` has not changed for this long.
_SETTLED_S: Final = 5.0
_POLL_S: Final = 0.25


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


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What ``reclaim`` did."""

    resident_before: int  #: host bytes the guest's RAM held when it started
    resident_after: int  #: ... and after the balloon went back to its target
    inflated_to: int  #: the balloon's largest size on the way (0: it did not inflate)
    seconds: float


def reclaim(
    control: str,
    vm: str,
    floor: int,
    timeout: float,
    say: Callable[[str], None] = lambda text: None,
) -> Reclaimed:
    """Give back the RAM a migration left resident: inflate the balloon over the
    guest's available memory above ``floor``, then back to the target it had."""
    start = time.monotonic()
    deadline = start + timeout
    status = _wait_status(
        control, vm, deadline, lambda s: s["attached"] and s.get("guest") is not None,
        "to attach and send its statistics",
    )  # fmt: skip
    kept = int(status["target_bytes"])
    status = _settle(control, vm, deadline, kept)
    before = int(status["resident_bytes"])
    available = int(status["guest"].get("available_bytes", 0))
    gain = available - floor
    if gain < _WORTH_RECLAIMING:
        say(f"{vm}: the guest has {available // MiB} MiB available, floor {floor // MiB} MiB: "
            "nothing to reclaim")  # fmt: skip
        return Reclaimed(before, before, 0, time.monotonic() - start)
    target = (int(status["actual_bytes"]) + gain) // GUEST_PAGE_SIZE * GUEST_PAGE_SIZE
    say(f"{vm}: {before // MiB} MiB resident; inflating the balloon to {target // MiB} MiB")
    _set_target(control, vm, target)
    try:
        inflated = int(_settle(control, vm, deadline, target)["actual_bytes"])
    finally:
        _set_target(control, vm, kept)  # whatever happened, not left inflated
    after = int(_settle(control, vm, deadline + _SETTLED_S * 4, kept)["resident_bytes"])
    took = time.monotonic() - start
    say(f"{vm}: the balloon reached {inflated // MiB} MiB and is back at {kept // MiB} MiB; "
        f"{after // MiB} MiB resident, {(before - after) // MiB} MiB given back "
        f"in {took:.1f} s")  # fmt: skip
    return Reclaimed(before, after, inflated, took)


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


def _ask(control: str, request: dict[str, object]) -> dict[str, Any]:
    try:
        return ask(control, request)
    except ControlError as err:
        raise MigrateError(f"asking the daemon: {err}") from None


def _set_target(control: str, vm: str, nbytes: int) -> None:
    _ask(control, {"vm": vm, "target_bytes": nbytes})


def _wait_status(
    control: str,
    vm: str,
    deadline: float,
    ready: Callable[[dict[str, Any]], bool],
    what: str,
) -> dict[str, Any]:
    while True:
        status = _ask(control, {"vm": vm})
        if ready(status):
            return status
        if time.monotonic() > deadline:
            raise MigrateError(f"VM {vm} did not get {what} in time (last: {status})")
        time.sleep(_POLL_S)


def _settle(control: str, vm: str, deadline: float, target: int) -> dict[str, Any]:
    """Wait until the balloon reaches ``target`` or stops moving (a guest that cannot
    give more is not forced); its last status."""
    last_actual, since = -1, time.monotonic()
    while True:
        status = _ask(control, {"vm": vm})
        if not status["attached"]:
            raise MigrateError(f"VM {vm} detached while its balloon was moving")
        actual = int(status["actual_bytes"])
        now = time.monotonic()
        if actual != last_actual:
            last_actual, since = actual, now
        if actual == target or now - since > _SETTLED_S or now > deadline:
            return status
        time.sleep(_POLL_S)


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

RECLAIM_HELP = """\
Give back guest RAM that is resident on the host although the guest is not using it,
as a live migration leaves it (on the destination, and on a source whose migration
was cancelled): the migration read every page, and the guest does not report again
what it reported before. The balloon is inflated over the guest's available memory
above --floor (page cache included, which the guest drops), then deflated back to its
target: the pages it held are given back and stay so until the guest uses them.
Waits for the VM to attach and send its statistics first. Exit status 0 when done.
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


def reclaim_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon reclaim", description=RECLAIM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("vm", help="the VM's name")
    p.add_argument(
        "--control-socket", required=True, metavar="PATH", help="the daemon's control socket"
    )
    p.add_argument(
        "--floor",
        type=parse_size,
        default=DEFAULT_FLOOR,
        metavar="SIZE",
        help="available memory the guest keeps while the balloon is inflated (default: 128M)",
    )
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds for the VM to attach and its balloon to move "
                   "(default: %(default)g)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        reclaim(args.control_socket, args.vm, args.floor, args.timeout, say=print)
    except MigrateError as err:
        print(f"vhost-user-balloon reclaim: {err}", file=sys.stderr)
        return 1
    return 0
