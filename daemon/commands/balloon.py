"""``vhost-user-balloon balloon VM [SIZE]``: show or set a VM's balloon size."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..config import parse_size
from .control import ControlError, ask

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """vhost-user-balloon balloon VM [SIZE]: show or set a VM's balloon size."""
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon balloon",
        description="Show a VM's balloon, or set how much memory its guest gives up "
        "(SIZE 0 gives everything back). A size set while no guest driver runs the "
        "device (the VM booting, rebooting or paused) takes effect when it runs again. "
        "Talks to the daemon's --control-socket.",
    )
    p.add_argument("vm", help="the VM's name")
    p.add_argument("size", nargs="?", type=parse_size, help="balloon size: 512M, 2G, 0, ...")
    p.add_argument(
        "--control-socket", required=True, metavar="PATH", help="the daemon's control socket"
    )
    args = p.parse_args(argv)
    request: dict[str, object] = {"vm": args.vm}
    if args.size is not None:
        request["target_bytes"] = args.size
    try:
        reply = ask(args.control_socket, request)
    except ControlError as err:
        print(f"vhost-user-balloon balloon: {err}", file=sys.stderr)
        return 1
    print(
        f"{reply['vm']}: {'attached' if reply['attached'] else 'not attached'}, balloon "
        f"target {reply['target_bytes'] >> 20} MiB, actual {reply['actual_bytes'] >> 20} MiB"
    )
    return 0
