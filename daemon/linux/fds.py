"""File descriptors as they come off a unix socket, and closing the ones we own."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterable, Sequence

__all__ = ["close_fds", "send_fds", "take_fds"]


def close_fds(fds: Iterable[int]) -> None:
    """Close fds we own, ignoring ones already gone (teardown must not stop halfway)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def send_fds(
    sock: socket.socket, data: bytes, fds: Sequence[int], address: str | None = None
) -> None:
    """Send ``data`` with copies of ``fds`` attached (SCM_RIGHTS; at most 253), to
    ``address`` if the socket is not connected."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    if address is None:
        sock.sendmsg([data], rights)
    else:
        sock.sendmsg([data], rights, 0, address)


def take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message carried (now ours to close)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds
