"""The control socket, the operators' side: one request to a running daemon.

The daemon serves it (``--control-socket``, mode 0600); the wire format is one JSON
object per line each way, written out in ``vhost_user_balloon.daemon.control``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MAX_CONTROL_REQUEST", "ControlError", "ask"]

#: A control request is one short JSON line.
MAX_CONTROL_REQUEST: Final = 4096


class ControlError(Exception):
    """The daemon could not be asked, or refused; the text says why."""


def ask(path: str, request: Mapping[str, object], timeout: float = 10.0) -> dict[str, Any]:
    """One request to a running daemon's control socket (blocking); its answer if ok."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(dict(request)).encode() + b"\n")
            line = s.makefile("rb").readline(MAX_CONTROL_REQUEST * 4)
    except OSError as err:
        raise ControlError(f"{path}: {err}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        why = "closed the connection without an answer" if not line else f"answered {line[:200]!r}"
        raise ControlError(f"the daemon at {path} {why}; see its log") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise ControlError(str(reply.get("error") if isinstance(reply, dict) else reply))
    return reply
