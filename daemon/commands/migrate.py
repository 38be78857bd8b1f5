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

Each step talks to QEMU through QMP: its socket (``--qmp``), or, under libvirt, which
holds the monitor, ``virsh qemu-monitor-command`` (``--libvirt DOMAIN``). Each failure
is a ``MigrateError`` that says which step failed and what to do.

The balloon target travels with the VM: ``prepare`` asks the source's daemon for it
and prints it as JSON; ``finish --target-from FILE`` (or ``--target SIZE``) sets it on
the destination's daemon once the device is back. A target the automatic policy set
is not carried (the destination's policy decides there); one set by hand is, and stays
pinned there as it was here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Final, Protocol

from vhost_user_balloon.protocol import QEMU_DEVICE

from ..config import parse_size
from .control import ControlError, ask
from .qmp import Qmp, QmpError
from .virsh import VirshMonitor, without_balloon

__all__ = ["DEVICE", "MigrateError", "finish", "finish_command", "prepare", "prepare_command"]

#: The device QEMU realizes for us (the shipped options, qemu-config/, say the same).
DEVICE: Final = dict(QEMU_DEVICE)


class MigrateError(Exception):
    """One step of the procedure failed; the text says which and what to do."""


class Monitor(Protocol):
    """QEMU's monitor, through its QMP socket or through libvirt."""

    def command(self, name: str, **arguments: Any) -> Any: ...

    def wait_device_gone(self, device: str, timeout: float) -> bool: ...

    def close(self) -> None: ...


def prepare(qmp: Monitor, device: str, chardev: str, timeout: float, where: str) -> float:
    """Unplug the balloon device and remove its chardev on the source (``where``:
    QEMU's monitor, as errors name it); the seconds the guest took to let go."""
    ids = _peripherals(qmp)
    if device not in ids:
        raise MigrateError(
            f"QEMU at {where} has no device with id {device!r} (devices with ids: "
            f"{', '.join(sorted(ids)) or 'none'}); give the balloon's -device an id, "
            f"e.g. id={device}, and put it behind a hot-pluggable port (bus=...)"
        )
    start = time.monotonic()
    try:
        qmp.command("device_del", id=device)
    except QmpError as err:
        if "in the process of unplug" not in str(err):
            raise MigrateError(f"unplugging {device}: {err}") from None
    if not qmp.wait_device_gone(device, timeout):
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


def finish(qmp: Monitor, socket_path: str, device: str, chardev: str, bus: str | None) -> None:
    """Attach the balloon again on the destination: a chardev to the daemon's socket,
    then the device. A device that cannot be added takes its chardev with it."""
    backend = {
        "type": "socket",
        "data": {"addr": {"type": "unix", "data": {"path": socket_path}}, "server": False},
    }
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


def target_of(control: str, vm: str) -> dict[str, Any]:
    """What the source's daemon says of the VM's balloon: ``{"vm", "target_bytes",
    "pinned"}`` (pinned: set by hand, carried; else the automatic policy's)."""
    try:
        status = ask(control, {"vm": vm})
    except ControlError as err:
        raise MigrateError(f"reading {vm}'s balloon target from the daemon: {err}") from None
    return {"vm": vm, "target_bytes": status["target_bytes"], "pinned": bool(status["pinned"])}


def set_target(control: str, vm: str, target: int, timeout: float) -> None:
    """Set the carried target on the destination's daemon, waiting (up to ``timeout``)
    for the device added back to be served there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ask(control, {"vm": vm, "target_bytes": target})
            return
        except ControlError as err:
            if time.monotonic() > deadline:
                raise MigrateError(
                    f"the device is back, but the daemon did not take {vm}'s balloon target "
                    f"of {target} bytes within {timeout:g} s: {err}. Set it with "
                    f"vhost-user-balloon balloon {vm} SIZE"
                ) from None
            time.sleep(0.2)


def carried(args: argparse.Namespace) -> int | None:
    """The target ``finish`` is to set: --target SIZE, or what --target-from's file
    (``prepare``'s output) says if it was set by hand; None: nothing to set."""
    if args.target is not None:
        return int(args.target)
    if args.target_from is None:
        return None
    try:
        record = json.loads(Path(args.target_from).read_text())
        target, pinned = int(record["target_bytes"]), bool(record["pinned"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MigrateError(
            f"--target-from {args.target_from}: not what migrate-prepare printed ({err})"
        ) from None
    return target if pinned else None


def write_definitions(monitor: VirshMonitor, args: argparse.Namespace) -> None:
    """The destination's live and persistent definitions (each only if asked for)."""
    try:
        if args.dest_xml:
            live = monitor.dumpxml("--migratable")
            Path(args.dest_xml).write_text(without_balloon(live, args.device, args.chardev))
        if args.persistent_xml:
            Path(args.persistent_xml).write_text(monitor.dumpxml("--inactive", "--migratable"))
    except QmpError as err:
        raise MigrateError(f"the destination's definitions: {err}") from None
    except OSError as err:
        raise MigrateError(f"writing the destination's definitions: {err}") from None


def _monitor(args: argparse.Namespace) -> Monitor:
    try:
        if args.libvirt is not None:
            return VirshMonitor(args.libvirt, args.connect)
        return Qmp(args.qmp)
    except QmpError as err:
        raise MigrateError(str(err)) from None


def _peripherals(qmp: Monitor) -> set[str]:
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
Under libvirt, which holds the monitor, give --libvirt DOMAIN instead of --qmp: the
same steps go through "virsh qemu-monitor-command".
With --control-socket, the VM's balloon target is read from this host's daemon first
and printed as JSON ({"vm", "target_bytes", "pinned"}): keep it for migrate-finish
--target-from on the destination.
With --libvirt, --dest-xml FILE writes the destination's live definition (the domain's
"dumpxml --migratable" without the balloon's -chardev and -device, its root port kept:
virsh migrate --xml FILE) and --persistent-xml FILE its persistent one ("dumpxml
--inactive --migratable", balloon and UUID kept: virsh migrate --persistent
--persistent-xml FILE), before anything is unplugged.
Exit status 0 once the VM can migrate, 1 with the reason otherwise.
"""

FINISH_HELP = """\
On the migration's destination, once the migration has completed: connect QEMU to the
daemon's socket for this VM (chardev-add) and add the balloon device again
(device_add). The daemon gives the new device the balloon target it kept for the VM
(on another host: set it there with "vhost-user-balloon balloon"). Then run
"vhost-user-balloon reclaim VM" to give back the RAM the migration left resident.
With --control-socket and --target-from FILE (what migrate-prepare printed on the
source) the target set by hand there is set here once the device is back (a target
the source's automatic policy set is left to this host's); --target SIZE sets one.
Exit status 0 when done, 1 with the step that failed and why.
"""


def _common(p: argparse.ArgumentParser) -> None:
    monitor = p.add_mutually_exclusive_group(required=True)
    monitor.add_argument(
        "--qmp", metavar="PATH", help="QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off)"
    )
    monitor.add_argument(
        "--libvirt", metavar="DOMAIN",
        help="a libvirt domain: QMP through virsh qemu-monitor-command",
    )  # fmt: skip
    p.add_argument("--connect", metavar="URI",
                   help="with --libvirt: the libvirt URI (default: virsh's)")  # fmt: skip
    p.add_argument("--control-socket", metavar="PATH",
                   help="this host's daemon's control socket (for the balloon target)")  # fmt: skip
    p.add_argument("--vm", metavar="NAME",
                   help="the VM's name at the daemon (default: the --libvirt domain)")  # fmt: skip
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
    p.add_argument("--dest-xml", metavar="FILE",
                   help="with --libvirt: write the destination's live definition here")  # fmt: skip
    p.add_argument("--persistent-xml", metavar="FILE",
                   help="with --libvirt: write its persistent definition here")  # fmt: skip
    args = p.parse_args(argv)
    vm = args.vm or args.libvirt
    if args.control_socket and not vm:
        p.error("--control-socket needs --vm NAME (or --libvirt DOMAIN)")
    if (args.dest_xml or args.persistent_xml) and not args.libvirt:
        p.error("--dest-xml and --persistent-xml need --libvirt DOMAIN")
    try:
        target = target_of(args.control_socket, vm) if args.control_socket else None
        monitor = _monitor(args)
        try:
            if isinstance(monitor, VirshMonitor):
                write_definitions(monitor, args)
            took = prepare(monitor, args.device, args.chardev, args.timeout,
                           args.qmp or f"libvirt domain {args.libvirt}")  # fmt: skip
        finally:
            monitor.close()
    except MigrateError as err:
        print(f"vhost-user-balloon migrate-prepare: {err}", file=sys.stderr)
        return 1
    message = (f"{args.device} unplugged ({took:.2f} s) and chardev {args.chardev} removed: "
               "the VM can migrate")  # fmt: skip
    if target is None:
        print(message)
    else:  # the JSON on stdout (for --target-from), the words apart
        print(message, file=sys.stderr)
        print(json.dumps({**target, "unplug_seconds": round(took, 3)}))
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
    carry = p.add_mutually_exclusive_group()
    carry.add_argument("--target-from", metavar="FILE",
                       help="what migrate-prepare printed on the source")  # fmt: skip
    carry.add_argument("--target", type=parse_size, metavar="SIZE",
                       help="a target to set once the device is back, e.g. 256M")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds for the daemon to serve the device again (default: "
                        "%(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    vm = args.vm or args.libvirt
    if (args.target is not None or args.target_from) and not (args.control_socket and vm):
        p.error("a target needs --control-socket and --vm NAME (or --libvirt DOMAIN)")
    try:
        target = carried(args)
        monitor = _monitor(args)
        try:
            finish(monitor, args.socket, args.device, args.chardev, args.bus)
        finally:
            monitor.close()
        if target is not None:
            set_target(args.control_socket, vm, target, args.timeout)
    except MigrateError as err:
        print(f"vhost-user-balloon migrate-finish: {err}", file=sys.stderr)
        return 1
    print(f"{args.device} added again, connected to {args.socket}"
          + ("" if target is None else f"; balloon target {target} bytes set"))  # fmt: skip
    return 0
