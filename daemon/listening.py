"""The sockets the daemon listens on: one per VM, and the control socket.

A socket is bound before anything else starts, so a bad path fails at start-up with a
clear message rather than when QEMU first tries to connect. A stale socket file left
by a crashed daemon is replaced; one a live process still listens on is not; a
directory others could write to (without the sticky bit) is refused, since whoever
swaps our socket for theirs gets the guest's memory from QEMU. A socket can also come
ready-made: from systemd (socket activation) or from the process before this one,
through the keeper. Whoever created a socket file removes it, and only if it is still
the same file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from typing import Final

import trio

from .config import SocketAccess, VmSpec

__all__ = ["Listener", "StartupError", "bind", "inherited_listener"]

#: Pending connections per VM socket; QEMU connects once, anything else is refused.
_BACKLOG: Final = 4


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class Listener:
    """A listening socket for one VM (or the control socket), and whether its file is
    ours to remove when it closes."""

    def __init__(self, vm: VmSpec, sock: socket.socket, *, owned: bool = True) -> None:
        self.vm = vm
        self.sock = trio.socket.from_stdlib_socket(sock)
        #: False for a socket systemd or a keeper holds: its file stays
        self.owned = owned
        st = os.stat(vm.socket)
        self.identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        self.sock.close()
        if not self.owned:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.vm.socket)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.vm.socket)


def _check_directory(label: str, path: Path) -> None:
    """Refuse a directory where another user could swap our socket for theirs (QEMU
    would then hand guest memory to whoever listens there)."""
    st = os.stat(path.parent)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise StartupError(
            f"{label}: directory {path.parent} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit, so anyone "
            "there could replace the socket; use a directory only the daemon can write, "
            "such as /run/vhost-user-balloon (0755)"
        )


def _clear_stale(label: str, path: str) -> None:
    """Remove a socket file a dead daemon left; refuse anything else in the way."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise StartupError(
            f"{label}: {path} exists and is not a socket; move it away or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left behind by a daemon that died
    except OSError as err:
        raise StartupError(f"{label}: cannot check {path}: {err.strerror}") from None
    else:
        raise StartupError(
            f"{label}: {path} is in use by a running process; "
            "is another vhost-user-balloon serving this VM?"
        )
    finally:
        probe.close()


def bind(label: str, where: Path, access: SocketAccess) -> socket.socket:
    """A new listening socket at ``where``, with ``access``'s mode and group."""
    _check_directory(label, where)
    path = str(where)
    _clear_stale(label, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # never visible with wider permissions than 0600
    try:
        sock.bind(path)
        if access.gid is not None:
            os.chown(path, -1, access.gid)
        os.chmod(path, access.mode)
        sock.listen(_BACKLOG)
    except OSError as err:
        sock.close()
        raise StartupError(f"{label}: cannot listen on {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def inherited_listener(vm: VmSpec, fd: int) -> socket.socket:
    """A listening socket passed to this process for a VM (socket activation, or the
    keeper's copy from the process before)."""
    sock = socket.socket(fileno=fd)
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        sock.detach()
        raise StartupError(
            f"VM {vm.name}: the socket systemd passed (fd {fd}) is not a "
            "listening unix stream socket; use ListenStream=/path in the "
            ".socket unit"
        )
    return sock
