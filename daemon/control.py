"""The control socket: read and set each VM's balloon size.

A unix socket, mode 0600 whatever --socket-mode says: whoever can write to it can take
memory away from a guest. One JSON object per line in, one per line out:

    {"vm": "web1"}                              -> {"ok": true, "vm": "web1", "attached": true,
                                                    "target_bytes": 0, "actual_bytes": 0}
    {"vm": "web1", "target_bytes": 536870912}   -> the same, after asking the guest
    anything else                               -> {"ok": false, "error": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog
import trio

from vhost_user_balloon.protocol import GUEST_PAGE_SIZE

from .connection import BalloonTargetError, VmConnection
from .http import receive_until

__all__ = ["MAX_CONTROL_REQUEST", "handle_request", "serve_control"]

log = structlog.get_logger()

#: A control request is one short JSON line.
MAX_CONTROL_REQUEST: Final = 4096
_TIMEOUT_S: Final = 5.0


async def handle_request(
    line: bytes, vms: Callable[[], Mapping[str, VmConnection | None]]
) -> dict[str, Any]:
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
    if "target_bytes" in request:
        target = request["target_bytes"]
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            return {"ok": False, "error": "target_bytes must be a whole number >= 0"}
        if conn is None:
            return {"ok": False, "error": f"VM {name} is not attached"}
        try:
            await conn.set_target(target)
        except BalloonTargetError as err:
            return {"ok": False, "error": str(err)}
    config = conn.device.config if conn is not None else None
    return {
        "ok": True,
        "vm": name,
        "attached": conn is not None,
        "target_bytes": config.num_pages * GUEST_PAGE_SIZE if config else 0,
        "actual_bytes": config.actual * GUEST_PAGE_SIZE if config else 0,
    }


async def serve_control(
    listener: trio.SocketListener, vms: Callable[[], Mapping[str, VmConnection | None]]
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            data = await receive_until(stream, b"\n", MAX_CONTROL_REQUEST, _TIMEOUT_S)
            try:
                reply = await handle_request(data.split(b"\n", 1)[0], vms)
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
