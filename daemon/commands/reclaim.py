"""``vhost-user-balloon reclaim VM``: give back guest RAM that a live migration left
resident on the host.

A migration reads every page of guest RAM, which leaves the whole of it resident on
both hosts (on the destination, and on a source whose migration was cancelled), and
the guest never reports again what it reported before. Inflating the balloon over the
guest's available memory above a floor and deflating it again gives that back. It
talks to the daemon through its control socket; each failure is a ``ReclaimError``
that says what to do.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from vhost_user_balloon.protocol import GUEST_PAGE_SIZE

from ..config import parse_size
from .control import ControlError, ask

__all__ = ["DEFAULT_FLOOR", "ReclaimError", "Reclaimed", "main", "reclaim"]

MiB: Final = 1 << 20
#: Available memory a guest keeps while ``reclaim`` has its balloon inflated.
DEFAULT_FLOOR: Final = 128 * MiB
#: Below this much to gain, reclaim does not inflate at all.
_WORTH_RECLAIMING: Final = 16 * MiB
#: The balloon is done moving when ``actual`` has not changed for this long.
_SETTLED_S: Final = 5.0
_POLL_S: Final = 0.25


class ReclaimError(Exception):
    """The daemon could not be asked, or the VM did not get there in time; the text
    says which."""


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


def _ask(control: str, request: dict[str, object]) -> dict[str, Any]:
    try:
        return ask(control, request)
    except ControlError as err:
        raise ReclaimError(f"asking the daemon: {err}") from None


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
            raise ReclaimError(f"VM {vm} did not get {what} in time (last: {status})")
        time.sleep(_POLL_S)


def _settle(control: str, vm: str, deadline: float, target: int) -> dict[str, Any]:
    """Wait until the balloon reaches ``target`` or stops moving (a guest that cannot
    give more is not forced); its last status."""
    last_actual, since = -1, time.monotonic()
    while True:
        status = _ask(control, {"vm": vm})
        if not status["attached"]:
            raise ReclaimError(f"VM {vm} detached while its balloon was moving")
        actual = int(status["actual_bytes"])
        now = time.monotonic()
        if actual != last_actual:
            last_actual, since = actual, now
        if actual == target or now - since > _SETTLED_S or now > deadline:
            return status
        time.sleep(_POLL_S)


RECLAIM_HELP = """\
Give back guest RAM that is resident on the host although the guest is not using it,
as a live migration leaves it (on the destination, and on a source whose migration
was cancelled): the migration read every page, and the guest does not report again
what it reported before. The balloon is inflated over the guest's available memory
above --floor (page cache included, which the guest drops), then deflated back to its
target: the pages it held are given back and stay so until the guest uses them.
Waits for the VM to attach and send its statistics first. Exit status 0 when done.
"""


def main(argv: list[str]) -> int:
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
    except ReclaimError as err:
        print(f"vhost-user-balloon reclaim: {err}", file=sys.stderr)
        return 1
    return 0
