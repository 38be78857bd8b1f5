"""Keeping VM connections alive across a restart of this process.

Theory of operation. Everything a connection needs lives in file descriptors (the
vhost-user socket, guest RAM files, kick/call/err eventfds, the backend channel) plus
a little protocol state. Each of those fds is also handed to a *keeper* that outlives
this process: systemd's file descriptor store, or the ``vhost-user-balloon supervise``
process, which speaks the same protocol (sd_notify ``FDSTORE=1``/``FDSTOREREMOVE=1``
with ``FDNAME=``; the fds come back as ``LISTEN_FDS``/``LISTEN_FDNAMES``). While the
keeper holds a copy, QEMU sees no hang-up when this process dies, however it dies.

The protocol state of each VM is JSON in a memfd that is itself in the store: two
slots written alternately, each with a sequence number and a CRC, so a process killed
in the middle of a write leaves the previous state readable.

Names: ``vub.<vm>.conn`` (the connection), ``vub.<vm>.state``, ``vub.<vm>.listen``
(the VM's listening socket) and ``vub.<vm>.<n>`` for the rest; the state says which
numbered name is which region or vring fd. A new fd is stored before the state that
names it is written, and an old one is removed only after, so the saved state only
ever names fds the keeper holds. One open file sent twice (QEMU sends one memfd for
both RAM regions of a big guest) is stored once: systemd would drop the second copy.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from ..linux.fds import close_fds
from ..linux.syscalls import same_open_file
from ..linux.systemd import FdStore

__all__ = [
    "STATE_SLOT_BYTES",
    "KeptVm",
    "StateFile",
    "VmKeeper",
    "kept_vms",
]

log = structlog.get_logger()

#: Bytes per state slot; a VM's state is ~3 KiB with 32 RAM regions.
STATE_SLOT_BYTES: Final = 64 * 1024
#: magic, sequence number, JSON length, CRC-32 of the JSON
_SLOT_HEADER: Final = struct.Struct("<4sQII")
_MAGIC: Final = b"VUBS"
_PREFIX: Final = "vub."
_NUMBERED: Final = re.compile(r"[0-9]+")
#: Names with a fixed meaning; every other stored fd has a number.
FIXED_KINDS: Final = ("conn", "state", "listen", "metrics")
#: Not a VM (no VM name has an "@"): the daemon's own stored fds, e.g. the saved totals.
DAEMON: Final = "@daemon"
#: Bytes per slot of the saved metric totals (~5 KiB per VM; a memfd holds only what
#: is written).
TOTALS_SLOT_BYTES: Final = 4 * 1024 * 1024


def fd_name(vm: str, kind: str | int) -> str:
    return f"{_PREFIX}{vm}.{kind}"


def parse_fd_name(name: str) -> tuple[str, str] | None:
    """``(vm, kind)`` for one of our names, ``None`` for any other (socket activation)."""
    if not name.startswith(_PREFIX):
        return None
    vm, sep, kind = name[len(_PREFIX) :].rpartition(".")
    if not sep or not vm or not (kind in FIXED_KINDS or _NUMBERED.fullmatch(kind)):
        return None
    return vm, kind


class StateFile:
    """A VM's saved state: a memfd with two alternately written, checksummed slots."""

    def __init__(self, fd: int, seq: int = 0, slot_bytes: int = STATE_SLOT_BYTES) -> None:
        self.fd = fd
        self.seq = seq
        self.slot_bytes = slot_bytes

    @classmethod
    def create(cls, vm: str, slot_bytes: int = STATE_SLOT_BYTES) -> StateFile:
        fd = os.memfd_create(f"vhost-user-balloon-state-{vm}", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * slot_bytes)
        return cls(fd, slot_bytes=slot_bytes)

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_json(json.dumps(record, separators=(",", ":")))

    def write_json(self, text: str) -> None:
        """Save a record already written as JSON text (a JSON object)."""
        data = text.encode()
        if len(data) > self.slot_bytes - _SLOT_HEADER.size:
            raise ValueError(f"a state of {len(data)} bytes does not fit a state slot")
        self.seq += 1
        header = _SLOT_HEADER.pack(_MAGIC, self.seq, len(data), zlib.crc32(data))
        os.pwrite(self.fd, header + data, (self.seq % 2) * self.slot_bytes)

    def read(self) -> dict[str, Any] | None:
        """The newest intact record, or ``None`` if neither slot holds one."""
        best: tuple[int, bytes] | None = None
        for slot in range(2):
            raw = os.pread(self.fd, self.slot_bytes, slot * self.slot_bytes)
            if len(raw) < _SLOT_HEADER.size:
                continue
            magic, seq, length, crc = _SLOT_HEADER.unpack_from(raw)
            data = raw[_SLOT_HEADER.size : _SLOT_HEADER.size + length]
            if magic != _MAGIC or len(data) != length or zlib.crc32(data) != crc:
                continue
            if best is None or seq > best[0]:
                best = (seq, data)
        if best is None:
            return None
        self.seq = best[0]
        record = json.loads(best[1])
        return record if isinstance(record, dict) else None


class VmKeeper:
    """The fds one VM has in the store, by name, each with a reference copy of ours."""

    def __init__(self, store: FdStore, vm: str, state: StateFile) -> None:
        self.store = store
        self.vm = vm
        self.state = state
        #: name -> our own copy of the fd the keeper holds under that name
        self.stored: dict[str, int] = {}
        #: the connection's fd number -> the name it was last found under (a hint,
        #: checked before use: fd numbers are reused)
        self._hint: dict[int, str] = {}
        self._next = 0

    @classmethod
    def start(cls, store: FdStore, vm: str) -> VmKeeper:
        """The keeper of a new connection, with a new state file. The state is written
        through the reference copy kept beside the keeper's (``stored``), as an adopted
        connection's is: one fd for it, let go of with the others."""
        state = StateFile.create(vm)
        keeper = cls(store, vm, state)
        try:
            keeper.put_fixed("state", state.fd)
        finally:
            close_fds([state.fd])
        state.fd = keeper.stored[fd_name(vm, "state")]
        return keeper

    def add_kept(self, name: str, fd: int) -> None:
        """An fd the keeper already holds (passed to us at start)."""
        self.stored[name] = fd
        parsed = parse_fd_name(name)
        if parsed is not None and _NUMBERED.fullmatch(parsed[1]):
            self._next = max(self._next, int(parsed[1]) + 1)

    def put_fixed(self, kind: str, fd: int) -> None:
        name = fd_name(self.vm, kind)
        if name not in self.stored:
            self._store(name, fd)

    def _store(self, name: str, fd: int) -> None:
        """Hand the keeper a copy of ``fd`` under ``name``; keep our reference copy."""
        ref = os.dup(fd)
        try:
            self.store.put(name, ref)
        except BaseException:
            close_fds([ref])
            raise
        self.stored[name] = ref

    def keep(self, fd: int) -> str:
        """The name the keeper holds this open file under, storing it if new."""
        hint = self._hint.get(fd)
        if hint is not None and hint in self.stored and same_open_file(fd, self.stored[hint]):
            return hint
        for name, ref in self.stored.items():
            if same_open_file(fd, ref):
                self._hint[fd] = name
                return name
        name = fd_name(self.vm, self._next)
        self._next += 1
        self._store(name, fd)
        self._hint[fd] = name
        return name

    def save(self, record: Mapping[str, Any], live: Iterable[str]) -> None:
        """Write the state, then let go of every numbered fd it no longer names."""
        self.state.write(record)
        keep = set(live)
        for name in list(self.stored):
            parsed = parse_fd_name(name)
            if parsed is not None and parsed[1] in FIXED_KINDS:
                continue
            if name not in keep:
                self.release(name)

    def release(self, name: str) -> None:
        ref = self.stored.pop(name, None)
        if ref is not None:
            self.store.drop(name)
            close_fds([ref])

    def release_all(self) -> None:
        """The VM is gone for good: the keeper lets go of everything (QEMU sees EOF)."""
        for name in list(self.stored):
            self.release(name)

    def close(self) -> None:
        """This process stops; the keeper keeps everything."""
        close_fds(self.stored.values())
        self.stored.clear()


@dataclass
class KeptVm:
    """What the keeper passed us for one VM at start."""

    vm: str
    fds: dict[str, int] = field(default_factory=dict)

    def get(self, kind: str) -> int | None:
        """The fd stored under this kind of name (it stays in ``fds``)."""
        return self.fds.get(fd_name(self.vm, kind))


def kept_vms(inherited: dict[str, int]) -> dict[str, KeptVm]:
    """Take our names out of ``inherited`` (the rest are socket activation), by VM."""
    out: dict[str, KeptVm] = {}
    for name in list(inherited):
        parsed = parse_fd_name(name)
        if parsed is None:
            continue
        vm = parsed[0]
        out.setdefault(vm, KeptVm(vm)).fds[name] = inherited.pop(name)
    return out
