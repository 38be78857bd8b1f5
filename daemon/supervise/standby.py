"""A daemon process started before it is needed, so that a restart costs no start-up.

Theory of operation. Most of a restart's gap is a new interpreter importing the
daemon (~0.3 s on two cores); taking the connections up costs a few milliseconds.
So the keeper (``vhost-user-balloon supervise``) starts the next daemon ahead of
time: the same command, with ``$VUB_STANDBY_FD`` naming one end of a
``SOCK_SEQPACKET`` socket pair. That process imports everything, parses its options
and waits. When the serving daemon is gone the keeper sends the standby the fds it
keeps, with their names, exactly what a fresh process would get as ``LISTEN_FDS``;
the standby goes on from there as if started by the keeper at that moment (reading
its configuration file then, not earlier).

The messages, keeper to standby: ``fds`` + one name per line, with those fds
attached (at most :data:`FDS_PER_MESSAGE` each), as many as needed, then ``go``.
Standby to keeper: ``armed`` once imported (only informative: fds sent earlier wait
in the socket). A standby whose keeper goes away (end of file) exits quietly.

This module is imported by the keeper too, which imports nothing else of the daemon.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Final

from ..linux.fds import close_fds, send_fds, take_fds

__all__ = ["ENV", "FDS_PER_MESSAGE", "Handoff", "hand_fds", "wait_for_fds"]

#: The environment variable naming the standby's end of the socket pair.
ENV: Final = "VUB_STANDBY_FD"
#: Fds per message: the kernel takes at most 253 (SCM_MAX_FD) in one.
FDS_PER_MESSAGE: Final = 250
ARMED: Final = b"armed"
_FDS: Final = b"fds"
_GO: Final = b"go"
#: Bytes a message of names may take: FDS_PER_MESSAGE names of up to 250 bytes.
_MAX_MESSAGE: Final = FDS_PER_MESSAGE * 256 + 16
_ANCBUF: Final = socket.CMSG_SPACE(FDS_PER_MESSAGE * 4)


class Handoff(Exception):
    """The keeper's messages made no sense (a bug on one side or the other)."""


def hand_fds(sock: socket.socket, kept: Sequence[tuple[str, int]]) -> None:
    """Keeper side: give the standby copies of ``kept`` (name, fd), then ``go``."""
    for start in range(0, len(kept), FDS_PER_MESSAGE):
        part = kept[start : start + FDS_PER_MESSAGE]
        text = b"\n".join([_FDS, *(name.encode() for name, _ in part)])
        send_fds(sock, text, [fd for _, fd in part])
    sock.send(_GO)


def wait_for_fds(fd: int) -> dict[str, int] | None:
    """Standby side: say ``armed``, then wait for the keeper's fds, by name, as
    :func:`vhost_user_balloon.daemon.linux.systemd.listen_fds` would give them; ``None`` if
    the keeper went away first."""
    got: dict[str, int] = {}
    with socket.socket(fileno=fd) as sock:
        # The keeper may have sent everything and closed its end already (it does not
        # wait for a standby that is still starting): what it sent is still there.
        with contextlib.suppress(OSError):
            sock.send(ARMED)
        while True:
            try:
                data, ancdata, _, _ = sock.recvmsg(_MAX_MESSAGE, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                data, ancdata = b"", []
            fds = take_fds(ancdata)
            if not data:
                close_fds([*fds, *got.values()])
                return None
            if data == _GO and not fds:
                return got
            kind, *names = data.split(b"\n")
            if kind != _FDS or len(names) != len(fds):
                close_fds([*fds, *got.values()])
                raise Handoff(f"unexpected message from the keeper: {data[:40]!r}, {len(fds)} fds")
            for name, received in zip(names, fds, strict=True):
                previous = got.pop(name.decode(errors="replace"), None)
                if previous is not None:
                    close_fds([previous])  # one fd per name, as listen_fds keeps them
                got[name.decode(errors="replace")] = received
