"""The two systemd protocols the daemon speaks, implemented directly (no library).

* ``sd_notify`` (sd_notify(3)): datagrams to ``$NOTIFY_SOCKET``: ``READY=1`` once every
  VM socket listens, ``STATUS=`` lines as VMs come and go, ``WATCHDOG=1`` (the daemon
  pings at half of ``watchdog_seconds``), ``STOPPING=1`` on shutdown.
* The fd store (sd_notify ``FDSTORE=1``/``FDSTOREREMOVE=1`` with ``FDNAME=``): fds the
  manager keeps for the next process, which gets them as below.
* Socket activation (sd_listen_fds(3)): listening sockets passed as fds 3, 4, ... with
  ``$LISTEN_FDS``, ``$LISTEN_PID`` and ``$LISTEN_FDNAMES``; each name is a VM's name.

Outside systemd the environment variables are absent and all of this does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import structlog

from .fds import send_fds

__all__ = ["SD_LISTEN_FDS_START", "FdStore", "Notifier", "listen_fds"]

log = structlog.get_logger()

#: Seconds a notification may wait for room in the manager's socket queue (the kernel
#: queues only net.unix.max_dgram_qlen datagrams, 10 by default, until it reads them).
_NOTIFY_TIMEOUT_S = 5.0
#: The first fd systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, int]:
    """The listening sockets systemd passed us, by name; the variables are then removed
    so that no child process takes them as well."""
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    fds = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        os.set_inheritable(fd, False)
        fds[name] = fd
    return fds


class Notifier:
    """Sends sd_notify messages if systemd asked for them (``$NOTIFY_SOCKET``)."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # abstract namespace
        elif path.startswith("/"):
            self.address = path
        self.watchdog_seconds: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (pid is None or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(_NOTIFY_TIMEOUT_S)  # a manager that stops reading: give up
                s.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:
            log.warning("sd_notify_failed", error=str(err))

    def send_fds(self, lines: list[str], fds: list[int]) -> None:
        """A notification carrying fds (``FDSTORE=1``). Unlike the others this one must
        not be lost quietly: the caller's hand-over depends on it, so errors raise."""
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(_NOTIFY_TIMEOUT_S)  # a keeper that stops reading is an error
            send_fds(s, "\n".join(lines).encode(), fds, self.address)

    def store(self, name: str, fds: list[int]) -> None:
        """Hand copies of ``fds`` to the manager's fd store under ``name`` (errors raise:
        see ``send_fds``)."""
        self.send_fds(["FDSTORE=1", f"FDNAME={name}"], fds)

    def remove(self, name: str) -> None:
        """Let the fd store close every fd stored under ``name``."""
        self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")


class FdStore:
    """The service manager's fd store (systemd's, or ``supervise``'s), through sd_notify:
    what the daemon hands over so that it outlives the process. ``enabled`` is False
    outside a keeper, and then nothing is stored."""

    def __init__(self, notifier: Notifier, *, enabled: bool) -> None:
        self.notifier = notifier
        self.enabled = enabled and notifier.enabled

    def put(self, name: str, fd: int) -> None:
        self.notifier.store(name, [fd])

    def drop(self, name: str) -> None:
        self.notifier.remove(name)
