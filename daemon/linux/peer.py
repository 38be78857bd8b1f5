"""Who is at the other end of a unix socket: ``struct ucred`` (socket(7)), read with
SO_PEERCRED from a connected socket or from an SCM_CREDENTIALS message, and the peer's
supplementary groups (SO_PEERGROUPS, through ``syscalls``)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["CREDENTIALS_SPACE", "Credentials", "peer_credentials", "sender_credentials"]

#: struct ucred: pid, uid, gid
_UCRED: Final = struct.Struct("=iII")
#: Room for an SCM_CREDENTIALS message in a receive's ancillary buffer.
CREDENTIALS_SPACE: Final = socket.CMSG_SPACE(_UCRED.size)


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Credentials:
    """A process as the kernel saw it when it connected or sent (its pid is 0 if it
    lives in a pid namespace this process cannot see)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: _HasSockopt) -> Credentials:
    """The connecting process of a unix stream socket (SO_PEERCRED)."""
    return Credentials(
        *_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    )


def sender_credentials(ancdata: Iterable[tuple[int, int, bytes]]) -> Credentials | None:
    """The sender of a datagram received with SO_PASSCRED (its SCM_CREDENTIALS), or None
    if it carried none."""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return Credentials(*_UCRED.unpack(payload[: _UCRED.size]))
    return None
