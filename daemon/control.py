"""The control socket: read and set each VM's balloon size.

A unix socket, mode 0600 whatever --socket-mode says: whoever can write to it can take
memory away from a guest. One JSON object per line in, one per line out:

    {"vm": "web1"}                              -> {"ok": true, "vm": "web1", "attached": true,
                                                    "target_bytes": 0, "actual_bytes": 0,
                                                    "ram_bytes": ..., "resident_bytes": ...,
                                                    "guest": {"available_bytes": ..., ...}}
    {"vm": "web1", "target_bytes": 536870912}   -> the same, after asking the guest; the
                                                   VM is pinned (the automatic policy
                                                   leaves it alone)
    {"vm": "web1", "release": true}             -> the same, unpinned
    anything else                               -> {"ok": false, "error": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog
import trio

from vhost_user_balloon.protocol import BalloonStat

from .commands.control import MAX_CONTROL_REQUEST
from .observing.http import receive_until
from .serving.connection import BalloonTargetError, VmConnection, VmView

__all__ = ["handle_request", "serve_control"]

log = structlog.get_logger()

_TIMEOUT_S: Final = 5.0


async def handle_request(
    line: bytes,
    vms: Callable[[], Mapping[str, VmConnection | None]],
    pins: set[str] | None = None,
) -> dict[str, Any]:
    """One request: its answer, ``{"ok": false, "error": ...}`` if it cannot be done."""
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "not a JSON object"}
    if not isinstance(request, dict) or not isinstance(request.get("vm"), str):
        return {"ok": False, "error": 'expected {"vm": NAME} or {"vm": NAME, "target_bytes": N}'}
    name = request["vm"]
    known = vms()
    if name not in known:
        return {"ok": False, "error": f"no VM named {name!r} (known: {', '.join(sorted(known))})"}
    conn = known[name]
    refused = await _apply(request, name, conn, pins)
    if refused is not None:
        return {"ok": False, "error": refused}
    return _status(name, conn, pins is not None and name in pins)


async def _apply(
    request: dict[str, Any], name: str, conn: VmConnection | None, pins: set[str] | None
) -> str | None:
    """Carry out what the request asks besides a status: a new target (the VM is then
    pinned: the automatic policy leaves it from now on) or a release; why not, or None."""
    if "target_bytes" in request:
        target = request["target_bytes"]
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            return "target_bytes must be a whole number >= 0"
        if conn is None:
            return f"VM {name} is not attached"
        try:
            await conn.set_target(target)
        except BalloonTargetError as err:
            return str(err)
        if pins is not None:
            pins.add(name)
    elif request.get("release") is True and pins is not None:
        pins.discard(name)
    return None


def _status(name: str, conn: VmConnection | None, pinned: bool) -> dict[str, Any]:
    if conn is None:
        return {"ok": True, "vm": name, "attached": False, "target_bytes": 0, "actual_bytes": 0,
                "pinned": pinned}  # fmt: skip
    view = conn.view()
    return {
        "ok": True,
        "vm": name,
        "attached": True,
        "target_bytes": view.target_bytes,
        "actual_bytes": view.actual_bytes,
        "pinned": pinned,
        "ram_bytes": view.ram_bytes,
        "resident_bytes": view.resident_bytes,
        "guest": _guest_memory(view),
    }


def _guest_memory(view: VmView) -> dict[str, float] | None:
    """What the guest last said of its memory (None: no statistics yet)."""
    if view.guest_stats is None or view.stats_age_s is None:
        return None
    out: dict[str, float] = {"age_seconds": round(view.stats_age_s, 3)}
    for key, tag in _GUEST_MEMORY.items():
        if tag in view.guest_stats:
            out[key] = view.guest_stats[tag]
    return out


#: The guest's statistics the control socket passes on (all in bytes).
_GUEST_MEMORY: Final = {
    "total_bytes": BalloonStat.MEMTOT,
    "free_bytes": BalloonStat.MEMFREE,
    "available_bytes": BalloonStat.AVAIL,
    "caches_bytes": BalloonStat.CACHES,
}


async def serve_control(
    listener: trio.SocketListener,
    vms: Callable[[], Mapping[str, VmConnection | None]],
    pins: set[str] | None = None,
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            data = await receive_until(stream, b"\n", MAX_CONTROL_REQUEST, _TIMEOUT_S)
            try:
                reply = await handle_request(data.split(b"\n", 1)[0], vms, pins)
            except Exception as err:
                log.error("control_request_crashed", error=repr(err), exc_info=err)
                reply = {"ok": False, "error": f"the daemon failed to carry this out: {err!r}"}
            log.info(
                "control_request",
                request=data[:200].decode(errors="replace").strip(),
                ok=reply["ok"],
                error=reply.get("error"),
            )
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handler, [listener])
