"""What one connection saves for the next process, and how that process adopts it.

Theory of operation. With a keeper (store.py), a connection saves a
``ConnectionRecord`` after every change it applies and before it answers QEMU:
the session (``SavedSession``), which stored fd is which region, vring fd and
backend channel, and the reply it still owes for the message being handled. The
next process reads the newest record, checks every value again, and takes the
connection up (``check_kept``), or lets it go with a reason (``AdoptError``).

A keeper that stops answering (a supervisor that died) costs that VM its hand-over,
never its connection: the saver logs it once and goes on without it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import structlog

from vhost_user_balloon.protocol import FdKind, LocalProtocolError, SavedSession

from ..linux.systemd import FdStore
from .store import KeptVm, StateFile, VmKeeper

__all__ = [
    "RECORD_FORMAT",
    "AdoptError",
    "Adoptable",
    "ConnectionRecord",
    "HandOver",
    "LiveFds",
    "OwedReply",
    "VringFdName",
    "check_kept",
]

log = structlog.get_logger()

#: Version of the saved connection record (the session inside has its own).
RECORD_FORMAT: Final = 1


class AdoptError(Exception):
    """A kept connection cannot be adopted; the message says why."""


@dataclass(frozen=True, slots=True)
class OwedReply:
    """A message applied and saved but not yet answered."""

    #: the message's bytes while it may still be in the socket (peeked); ``b""`` if not
    message: bytes
    reply: bytes | None

    def to_json(self) -> dict[str, str | None]:
        return {
            "message": self.message.hex(),
            "reply": None if self.reply is None else self.reply.hex(),
        }

    @classmethod
    def from_json(cls, data: object) -> OwedReply:
        if not isinstance(data, dict):
            raise AdoptError(f"owed reply {data!r} is not an object")
        message, reply = data.get("message"), data.get("reply")
        if not isinstance(message, str) or not (reply is None or isinstance(reply, str)):
            raise AdoptError(f"owed reply {data!r} does not hold hex strings")
        try:
            return cls(bytes.fromhex(message), None if reply is None else bytes.fromhex(reply))
        except ValueError as err:
            raise AdoptError(f"owed reply {data!r}: {err}") from None


@dataclass(frozen=True, slots=True)
class VringFdName:
    """Which stored fd is a queue's kick, call or err eventfd."""

    index: int
    kind: FdKind
    name: str


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """One connection, as saved; fds by the names the keeper holds them under."""

    vm: str
    session: SavedSession
    regions: tuple[str, ...]
    vrings: tuple[VringFdName, ...]
    backend: str | None
    owed: OwedReply | None

    def fd_names(self) -> list[str]:
        return [
            *self.regions,
            *(v.name for v in self.vrings),
            *([self.backend] if self.backend else []),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "vm": self.vm,
            "session": self.session.to_json(),
            "regions": list(self.regions),
            "vrings": [[v.index, v.kind.value, v.name] for v in self.vrings],
            "backend": self.backend,
            "owed": None if self.owed is None else self.owed.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConnectionRecord:
        if data.get("format") != RECORD_FORMAT:
            raise AdoptError(
                f"its saved state is of format {data.get('format')!r}, not {RECORD_FORMAT}"
            )
        regions, vrings, backend = data.get("regions"), data.get("vrings"), data.get("backend")
        if not isinstance(regions, list) or not all(isinstance(n, str) for n in regions):
            raise AdoptError(f"saved regions {regions!r} are not fd names")
        if not isinstance(vrings, list):
            raise AdoptError(f"saved vrings {vrings!r} are not a list")
        if not (backend is None or isinstance(backend, str)):
            raise AdoptError(f"saved backend channel {backend!r} is not an fd name")
        owed = data.get("owed")
        return cls(
            vm=str(data.get("vm")),
            session=SavedSession.from_json(data.get("session")),
            regions=tuple(regions),
            vrings=tuple(_vring_name(v) for v in vrings),
            backend=backend,
            owed=None if owed is None else OwedReply.from_json(owed),
        )


def _vring_name(item: object) -> VringFdName:
    if not (isinstance(item, list) and len(item) == 3):
        raise AdoptError(f"saved vring fd {item!r} is not [index, kind, name]")
    index, kind, name = item
    if type(index) is not int or index < 0 or not isinstance(name, str):
        raise AdoptError(f"saved vring fd {item!r} is malformed")
    try:
        return VringFdName(index, FdKind(kind), name)
    except ValueError:
        raise AdoptError(f"saved vring fd {item!r} has an unknown kind") from None


@dataclass(frozen=True, slots=True)
class LiveFds:
    """The fds a connection holds now, by what they are for."""

    regions: tuple[int, ...]
    vrings: Mapping[tuple[int, FdKind], int]
    backend: int | None


class HandOver:
    """Saves one connection for the next process; every call is a no-op without a keeper."""

    def __init__(self, vm: str, keeper: VmKeeper | None) -> None:
        self.vm = vm
        self.keeper = keeper
        #: the last record saved (written again with a new ``owed`` when nothing else changed)
        self._record: ConnectionRecord | None = None

    @property
    def active(self) -> bool:
        return self.keeper is not None

    def start(self, conn_fd: int) -> None:
        """A new connection: store its socket (the state names the rest)."""
        self._guard(lambda keeper: keeper.put_fixed("conn", conn_fd))

    def save(self, session: SavedSession, fds: LiveFds, owed: OwedReply | None) -> None:
        """Write the whole state: called with every change applied and nothing of it
        sent to QEMU yet."""

        def write(keeper: VmKeeper) -> None:
            record = ConnectionRecord(
                vm=self.vm,
                session=session,
                regions=tuple(keeper.keep(fd) for fd in fds.regions),
                vrings=tuple(
                    VringFdName(i, kind, keeper.keep(fd)) for (i, kind), fd in fds.vrings.items()
                ),
                backend=None if fds.backend is None else keeper.keep(fds.backend),
                owed=owed,
            )
            self._record = record
            keeper.save(record.to_json(), record.fd_names())

        self._guard(write)

    def save_owed(self, owed: OwedReply | None) -> None:
        """Only what is owed changed: write the last record again with it."""
        record = self._record
        if record is not None:
            self._guard(lambda keeper: keeper.state.write(replace(record, owed=owed).to_json()))

    def close(self, *, keep: bool) -> None:
        """This process lets go. ``keep``: the keeper goes on holding the connection for
        the next process; otherwise it lets go too and QEMU sees the end."""
        keeper, self.keeper = self.keeper, None
        if keeper is None:
            return
        if keep:
            keeper.close()
            return
        try:
            keeper.release_all()
        except OSError as err:
            log.warning("handover_release_failed", error=str(err))
            keeper.close()

    def _guard(self, action: Callable[[VmKeeper], None]) -> None:
        keeper = self.keeper
        if keeper is None:
            return
        try:
            action(keeper)
        except (OSError, ValueError) as err:
            # The keeper is gone or the state does not fit: go on serving without a
            # hand-over rather than cut QEMU off (it cannot reconnect).
            log.error(
                "handover_disabled",
                error=str(err),
                message="this VM's connection is no longer kept across a restart of the daemon",
            )
            self.keeper = None
            keeper.close()


@dataclass(frozen=True, slots=True)
class Adoptable:
    """A connection the keeper passed us, checked and ready to be served again."""

    keeper: VmKeeper
    record: ConnectionRecord
    sock: socket.socket
    #: the stored fds by name (the keeper's; dup one before keeping it)
    fds: Mapping[str, int]

    def dup(self, name: str) -> int:
        try:
            return os.dup(self.fds[name])
        except KeyError:
            raise AdoptError(
                f"its saved state names fd {name!r}, which the keeper does not hold"
            ) from None


def check_kept(stored: KeptVm, store: FdStore) -> Adoptable:
    """Check what the keeper passed for one VM. On failure the keeper is told to let
    go of all of it (QEMU sees the end) and ``AdoptError`` says why."""
    state_fd, conn_fd = stored.get("state"), stored.get("conn")
    keeper = VmKeeper(store, stored.vm, StateFile(state_fd if state_fd is not None else -1))
    for name, fd in stored.fds.items():
        keeper.add_kept(name, fd)
    try:
        if state_fd is None or conn_fd is None:
            raise AdoptError("the keeper holds no saved state or no connection for it")
        data = keeper.state.read()
        if data is None:
            raise AdoptError("its saved state is unreadable")
        record = ConnectionRecord.from_json(data)
        sock = socket.socket(fileno=os.dup(conn_fd))
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise AdoptError(f"stored fd {conn_fd} is not a unix stream socket")
    except (AdoptError, LocalProtocolError, OSError, ValueError) as err:
        keeper.release_all()
        raise AdoptError(f"VM {stored.vm}: cannot adopt its connection: {err}") from err
    return Adoptable(keeper, record, sock, dict(stored.fds))
