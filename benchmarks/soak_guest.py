"""The soak's real guest (``python -m benchmarks soak --guest``): a QEMU with a Linux
guest that allocates and frees memory in rounds for the whole run, attached to the
soaked daemon as the VM ``guest``, its balloon device behind a PCIe root port so the
schedule can unplug it and plug it back.

Its faults, each with balloon commands for the guest racing it through the control
socket (each either done or refused with words, never a crash):

``unplug``  ``device_del`` (the guest's driver lets go of the device, QEMU closes the
            balloon's backend channel), ``chardev-remove`` (the daemon sees the
            connection end), then ``chardev-add`` and ``device_add`` again, as
            ``migrate-finish`` does, and the guest's driver takes the new device.
``reset``   ``system_reset``: the guest reboots; QEMU stops the device and keeps the
            connection, and the rebooted guest's driver starts it again.

What must hold, checked as the run goes: QEMU runs; the guest's console shows no
OOM kill, panic, BUG or allocation stall; the guest's connection ends only inside an
unplug; while the device is plugged and no reset is under way, the guest's memory
keeps coming back (its reported bytes grow at least once every ``QUIET_LIMIT``
seconds: the guest frees memory every few seconds); after each replug, the guest's
reporting queue starts again within the soak's bound, and after each reset within
``BOOT_LIMIT`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from testbed.guestrun import Env, GuestSpec, attach_args, pump, qemu_args, stop_process
from vhost_user_balloon.daemon.commands.control import ControlError, ask
from vhost_user_balloon.daemon.commands.migrate import MigrateError, finish
from vhost_user_balloon.daemon.commands.qmp import Qmp, QmpError

if TYPE_CHECKING:
    from benchmarks.soak import Soak

NAME: Final = "guest"
DEVICE: Final = "vub0"
CHARDEV: Final = "vb"
BUS: Final = "rp1"
ROOT_PORT: Final = ["-device", f"pcie-root-port,id={BUS},chassis=1,slot=1"]
#: 1 GiB of RAM; rounds of 192 MiB allocated, held 2 s, freed, 3 s to report.
SPEC: Final = GuestSpec(
    mem_mib=1024, workload_mib=192, rounds=100_000, settle_s=3, idle_s=1,
    edits=(("config_size=16", f"config_size=16,bus={BUS},id={DEVICE}"),),
)  # fmt: skip
#: The automatic policy may take the guest down to this, no further (its workload
#: fits above it).
MIN_MEMORY: Final = "640M"
#: Seconds the guest may go plugged and reporting nothing before that is a violation.
QUIET_LIMIT: Final = 60.0
#: Seconds a boot of the guest may take (TCG on a busy 2-core host), to its driver's
#: reporting queue.
BOOT_LIMIT: Final = 180.0
#: What a guest's console must never show.
BAD_CONSOLE: Final = (
    "Out of memory", "Kernel panic", "BUG:", "Call Trace", "page allocation stall",
    "invoked oom-killer",
)  # fmt: skip
REPORTED: Final = "vhost_user_balloon_reported_bytes_total"


@dataclass
class RealGuest:
    """The QEMU, its monitor socket, and what the soak saw of the guest."""

    env: Env
    folder: Path
    qemu: subprocess.Popen[bytes] | None = None
    console: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    #: inside an unplug (from device_del to the reporting queue started again)
    unplugging: bool = False
    #: inside a reset (from system_reset to the reporting queue started again)
    resetting: bool = False
    #: when the device was last plugged (boot or replug) and its queue seen started
    plugged_at: float = 0.0
    #: the guest's reported bytes, and when they last grew
    reported: float = 0.0
    grew_at: float = 0.0
    #: disconnections of the guest's connection the daemon logged, seen so far
    disconnects: int = 0
    unplugs: int = 0
    resets: int = 0
    refused: list[str] = field(default_factory=list)

    @property
    def qmp_path(self) -> Path:
        return self.folder / "qmp.sock"

    def config_entry(self, socket_path: Path) -> str:
        return (f'[[vm]]\nname = "{NAME}"\nsocket = "{socket_path}"\n'
                f'min_memory = "{MIN_MEMORY}"\n\n')  # fmt: skip

    def boot(self, socket_path: Path) -> None:
        attach = attach_args("vhost-user-balloon", socket=self.env.inside(socket_path), mem="1G")
        qmp = ["-qmp", f"unix:{self.env.inside(self.qmp_path)},server=on,wait=off"]
        self.qemu = subprocess.Popen(
            self.env.command(qemu_args(SPEC, self.env, [*ROOT_PORT, *qmp, *attach])),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        pump(self.qemu.stdout, self.console.append)
        pump(self.qemu.stderr, self.stderr.append)

    def stop(self) -> None:
        stop_process(self.qemu, signal.SIGTERM, 5)

    def bad_console(self) -> str | None:
        for line in list(self.console):
            if any(bad in line for bad in BAD_CONSOLE):
                return line
        return None


def reporting_started_since(soak: Soak, t: float) -> bool:
    return any(
        r.get("vm") == NAME and r.get("role") == "reporting" and r["seen"] >= t
        for r in soak.log_events("queue_started")
    )


async def attach_guest(soak: Soak, guest: RealGuest) -> None:
    """Boot the guest and wait until its driver has started the reporting queue."""
    booted = soak.now()
    guest.boot(soak.socket_of(NAME))
    await wait_reporting(soak, guest, booted)
    guest.plugged_at = guest.grew_at = soak.now()
    # The test bed runs QEMU with -no-reboot; the ``reset`` fault wants a reboot.
    await trio.to_thread.run_sync(_qmp, guest, "set-action", {"reboot": "reset"})
    soak.event("start", "the real guest's reporting queue started")


async def wait_reporting(soak: Soak, guest: RealGuest, since: float) -> None:
    """Until the guest's driver has started its reporting queue after ``since``."""
    with trio.fail_after(BOOT_LIMIT):
        while not reporting_started_since(soak, since):
            check_alive(soak, guest)
            await trio.sleep(0.2)


def _qmp(guest: RealGuest, command: str, arguments: dict[str, Any]) -> None:
    with Qmp(str(guest.qmp_path)) as qmp:
        qmp.command(command, **arguments)


def check_alive(soak: Soak, guest: RealGuest) -> None:
    assert guest.qemu is not None
    if guest.qemu.poll() is not None:
        soak.fail(f"the guest's QEMU exited ({guest.qemu.returncode}): {guest.stderr[-5:]}")
    if (line := guest.bad_console()) is not None:
        soak.fail(f"the guest's console: {line!r}")


def guest_ends(soak: Soak) -> list[dict[str, Any]]:
    """The guest's connection ends the daemon logged (a handover to the next daemon
    is not one: the connection goes on)."""
    return [r for r in soak.log_events("frontend_disconnected")
            if r.get("vm") == NAME and not r.get("handed_over")]  # fmt: skip


async def guest_watch(soak: Soak, guest: RealGuest) -> None:
    """QEMU lives, the console is clean, the connection ends only in an unplug, and
    a plugged guest keeps getting memory back."""
    while True:
        check_alive(soak, guest)
        ends = guest_ends(soak)
        if len(ends) > guest.disconnects:
            if not guest.unplugging:
                soak.fail(f"the guest's connection ended outside an unplug: {ends[-1]}")
            guest.disconnects = len(ends)
        reported = soak.scrape.total(REPORTED, vm=NAME) if soak.scrape.families else 0.0
        if reported > guest.reported:
            guest.reported, guest.grew_at = reported, soak.now()
        quiet = soak.now() - max(guest.grew_at, guest.plugged_at)
        if not (guest.unplugging or guest.resetting) and quiet > QUIET_LIMIT:
            soak.fail(f"the guest was given nothing back for {quiet:.0f} s while plugged "
                      f"(reported {guest.reported / 2**20:.0f} MiB in all)")  # fmt: skip
        await trio.sleep(0.5)


async def unplug(soak: Soak, guest: RealGuest) -> None:
    """The device unplugged with balloon commands racing it, then plugged back."""
    guest.unplugging = True
    guest.unplugs += 1

    def device_del() -> None:
        with Qmp(str(guest.qmp_path)) as qmp:
            qmp.command("device_del", id=DEVICE)
            if qmp.wait_event("DEVICE_DELETED", 60, lambda d: d.get("device") == DEVICE) is None:
                raise QmpError(f"no DEVICE_DELETED for {DEVICE} within 60 s")

    soak.event("unplug", "device_del")
    try:
        await _racing_commands(soak, guest, device_del)
        _qmp(guest, "chardev-remove", {"id": CHARDEV})
        soak.event("unplug", "chardev-remove")
        await trio.sleep(soak.rng.uniform(0.0, 2.0))
        replugged = soak.now()

        def plug_back() -> None:  # as migrate-finish does
            with Qmp(str(guest.qmp_path)) as qmp:
                finish(qmp, guest.env.inside(soak.socket_of(NAME)), DEVICE, CHARDEV, BUS)

        await trio.to_thread.run_sync(plug_back)
    except (QmpError, MigrateError) as err:
        assert guest.qemu is not None
        status = guest.qemu.poll()
        soak.fail(f"unplugging the guest's balloon: {err} (QEMU "
                  f"{'running' if status is None else f'exited with {status}'}; its stderr "
                  f"ends with {guest.stderr[-5:]})")  # fmt: skip
    with trio.fail_after(soak.bound * 3):
        while not reporting_started_since(soak, replugged):
            await trio.sleep(0.2)
    guest.plugged_at = soak.now()
    guest.disconnects = len(guest_ends(soak))
    guest.unplugging = False
    soak.event("replugged", f"reporting again after {guest.plugged_at - replugged:.1f} s")


async def reset(soak: Soak, guest: RealGuest) -> None:
    """The guest rebooted with balloon commands racing the reset; its next driver
    starts the device again."""
    guest.resetting = True
    guest.resets += 1
    soak.event("reset", "system_reset")
    since = soak.now()
    try:
        await _racing_commands(soak, guest, lambda: _qmp(guest, "system_reset", {}))
    except QmpError as err:
        assert guest.qemu is not None
        soak.fail(f"resetting the guest: {err} (QEMU exit status {guest.qemu.poll()}; "
                  f"its stderr ends with {guest.stderr[-5:]})")  # fmt: skip
    await wait_reporting(soak, guest, since)
    guest.plugged_at = soak.now()
    guest.resetting = False
    soak.event("rebooted", f"reporting again after {guest.plugged_at - since:.1f} s")


async def _racing_commands(soak: Soak, guest: RealGuest, act: Callable[[], None]) -> None:
    """``act`` (in a thread) with one to four balloon commands for the guest sent
    within 1.5 s of each other beside it."""
    control = str(soak.folder / "control.sock")

    def command(size: int) -> None:
        request = {"vm": NAME, "target_bytes": size}
        try:
            ask(control, request)
        except ControlError as err:
            guest.refused.append(str(err))
            soak.event("balloon", f"{json.dumps(request)}: {err}")
        else:
            soak.event("balloon", json.dumps(request))

    async with _monitor_errors(), trio.open_nursery() as racing:
        racing.start_soon(trio.to_thread.run_sync, act)
        for _ in range(soak.rng.randint(1, 4)):
            await trio.sleep(soak.rng.uniform(0.0, 1.5))
            size = soak.rng.randrange(0, 64) * 2**20
            racing.start_soon(trio.to_thread.run_sync, command, size)


@contextlib.asynccontextmanager
async def _monitor_errors() -> AsyncIterator[None]:
    """A QMP error from the racing threads, out of their nursery's group."""
    try:
        yield
    except* (QmpError, MigrateError) as group:
        raise group.exceptions[0] from None


def figures(soak: Soak, guest: RealGuest) -> dict[str, Any]:
    targets = [r for r in soak.log_events("balloon_target_set") if r.get("vm") == NAME]
    at_start = [r for r in soak.log_events("balloon_target_told") if r.get("vm") == NAME]
    return {
        "unplugs": guest.unplugs,
        "resets": guest.resets,
        # balloon targets the daemon told QEMU of at once, those it kept until the
        # device started again (stopped: a reset, an unplug under way, a new device),
        # and the times it told QEMU at a start
        "targets_told": sum("told" not in r for r in targets),
        "targets_kept_until_start": sum(r.get("told") == "at_start" for r in targets),
        "told_at_start": len(at_start),
        "reported_mib": round(guest.reported / 2**20),
        "balloon_commands_refused": len(guest.refused),
        "refusals": sorted(set(guest.refused)),
    }


def environment() -> Env:
    """The provisioned QEMU and guest kernel; a clear error without them."""
    env = Env.load()
    if "6.1" not in env.kernels:
        raise SystemExit(f"soak --guest: no 6.1 guest kernel provisioned in {env.kernels}; "
                         "run scripts/setup")  # fmt: skip
    os.makedirs(env.qemu_root / "tmp", exist_ok=True)
    return env
