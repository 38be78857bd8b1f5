"""A small, blocking QMP client: what ``migrate-prepare``/``migrate-finish`` need.

QMP (QEMU's machine protocol, docs/interop/qmp-spec.rst) is one JSON object per line
over a unix socket: a greeting, ``qmp_capabilities``, then commands, each answered by
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``; events
(``{"event": ...}``) may arrive between them at any time and are kept for
``wait_event``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Qmp", "QmpError"]

#: A QMP line longer than this is not QEMU's.
_MAX_LINE = 1 << 20


class QmpError(Exception):
    """QEMU refused a command, or its monitor could not be reached; the text says which."""


class Qmp:
    """One QMP session. ``timeout`` bounds every wait for a line from QEMU."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as err:
            self._sock.close()
            raise QmpError(
                f"cannot reach QEMU's monitor at {path}: {err.strerror or err} (start QEMU "
                f"with -qmp unix:{path},server=on,wait=off)"
            ) from None
        self._reader = self._sock.makefile("rb")
        try:
            greeting = self._line()
        except TimeoutError:
            self.close()
            raise QmpError(
                f"{path}: no QMP greeting within {timeout:g} s (a QMP socket serves one "
                "client at a time: is something else connected to it?)"
            ) from None
        if "QMP" not in greeting:
            self.close()
            raise QmpError(f"{path} is not a QMP monitor (it said {str(greeting)[:120]})")
        self.command("qmp_capabilities")

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def command(self, name: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or ``QmpError`` with QEMU's words."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as err:
            raise QmpError(f"{self.path}: QEMU's monitor went away ({err})") from None
        while True:
            try:
                reply = self._line()
            except TimeoutError:
                raise QmpError(
                    f"{self.path}: QEMU did not answer {name} within {self.timeout:g} s"
                ) from None
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise QmpError(f"QEMU refused {name}: {desc}")
            elif "return" in reply:
                return reply["return"]

    def wait_device_gone(self, device: str, timeout: float) -> bool:
        """True once QEMU says it deleted ``device`` (DEVICE_DELETED) within ``timeout``."""
        return (
            self.wait_event("DEVICE_DELETED", timeout, lambda d: d.get("device") == device)
            is not None
        )

    def wait_event(
        self, name: str, timeout: float, match: Callable[[dict[str, Any]], bool] = lambda d: True
    ) -> dict[str, Any] | None:
        """The first event ``name`` whose data ``match`` accepts, seen before or within
        ``timeout`` seconds; None if none came."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("event") == name and match(event.get("data", {})):
                    self.events.remove(event)
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                line = self._line()
            except TimeoutError:
                return None
            if "event" in line:
                self.events.append(line)

    def _line(self) -> dict[str, Any]:
        try:
            data = self._reader.readline(_MAX_LINE)
        except TimeoutError:
            raise
        except OSError as err:
            raise QmpError(f"{self.path}: reading QEMU's monitor failed ({err})") from None
        if not data:
            raise QmpError(f"{self.path}: QEMU closed its monitor (has QEMU exited?)")
        try:
            value = json.loads(data)
        except ValueError:
            raise QmpError(f"{self.path}: not QMP: {data[:120]!r}") from None
        if not isinstance(value, dict):
            raise QmpError(f"{self.path}: not QMP: {data[:120]!r}")
        return value
