"""A service manager's end of sd_notify (systemd's, or ``supervise``'s), played by a test.

It reads as systemd does, at once and beside the daemon (in a thread: the kernel queues
only 10 datagrams before the sender blocks), records every datagram with its sender's
pid and the fds it carried, and keeps an fd store by name as systemd does:
``FDSTORE=1`` + ``FDNAME=`` adds, ``FDSTOREREMOVE=1`` + ``FDNAME=`` closes and forgets.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from vhost_user_balloon.daemon.linux.fds import close_fds, take_fds
from vhost_user_balloon.daemon.linux.peer import CREDENTIALS_SPACE, sender_credentials
from vhost_user_balloon.daemon.linux.systemd import Notifier

_ANCBUF = socket.CMSG_SPACE(253 * 4) + CREDENTIALS_SPACE


@dataclass(frozen=True)
class Datagram:
    """One notification: its sender (None if it sent no credentials), its text, and how
    many fds it carried (the fds themselves are the store's, or closed)."""

    pid: int | None
    text: str
    nfds: int

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.split("\n") if line)


class ServiceManager:
    """The notify socket at ``path``; ``notifier`` is what a daemon in this process is
    given to reach it (a daemon in another process gets ``NOTIFY_SOCKET=path``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        self.got: list[Datagram] = []
        #: the fd store: name -> the fds stored under it, oldest first
        self.kept: dict[str, list[int]] = {}
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            with contextlib.suppress(OSError, ValueError):
                select.select([self.sock], [], [], 0.05)
            self.sync()

    def sync(self) -> list[Datagram]:
        """Read what has been sent and not read yet (a send that returned is in the
        socket or read already); the datagrams read now."""
        new: list[Datagram] = []
        with self._cond:
            while not self._closed:
                try:
                    data, anc, _, _ = self.sock.recvmsg(4096, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
                except (BlockingIOError, OSError):
                    break
                new.append(self._record(data.decode(), anc))
            self._cond.notify_all()
        return new

    def _record(self, text: str, anc: list[tuple[int, int, bytes]]) -> Datagram:
        sender = sender_credentials(anc)
        fds = take_fds(anc)
        got = Datagram(None if sender is None else sender.pid, text, len(fds))
        fields = got.fields
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            self.kept.setdefault(name, []).extend(fds)
        else:
            close_fds(fds)
        if fields.get("FDSTOREREMOVE") == "1":
            close_fds(self.kept.pop(name, []))
        self.got.append(got)
        return got

    def texts(self) -> list[str]:
        with self._cond:
            return [d.text for d in self.got]

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in d.text for d in self.got)

    def until(self, text: str, count: int = 1, limit: float = 15.0) -> None:
        """Wait until ``count`` datagrams contain ``text``."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.count(text) >= count, limit), (
                text, [d.text for d in self.got])  # fmt: skip

    def names(self) -> set[str]:
        self.sync()
        with self._cond:
            return set(self.kept)

    def crash_copy(self) -> dict[str, int]:
        """What the store holds the instant the daemon dies, as a next process is given
        it: one fd per name (the daemon never stores two under one name)."""
        self.sync()
        with self._cond:
            assert all(len(fds) == 1 for fds in self.kept.values()), self.kept
            return {name: os.dup(fds[0]) for name, fds in self.kept.items()}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            close_fds(fd for fds in self.kept.values() for fd in fds)
            self.kept.clear()
            self.sock.close()
