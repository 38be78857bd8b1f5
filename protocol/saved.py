"""A session's state as a typed record, and its JSON form for another process.

``Session.export_state`` gives a ``SavedSession``; ``Session.restore`` takes one.
``to_json`` / ``from_json`` carry it across a process boundary (a restart of the
daemon under a keeper). ``from_json`` trusts nothing: every number must be a whole
number in its field's range, every name one we know, or it raises
``LocalProtocolError`` naming the field.

Format 2 names every field. Format 1 (the first release with hand-over) wrote the
balloon config, memory regions and ring addresses as positional lists; it is still
read, so a daemon can be upgraded in place from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .balloon import BalloonConfig
from .codes import MAX_QUEUES
from .errors import LocalProtocolError
from .payloads import MemoryRegion, VringAddr
from .requests import QueueState, SessionState

__all__ = ["SAVED_FORMAT", "SavedSession", "SavedVring"]

#: Version of the JSON form written now.
SAVED_FORMAT: Final = 2
_READABLE: Final = (1, 2)
_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_E = TypeVar("_E", SessionState, QueueState)
_CONFIG_FIELDS: Final = ("num_pages", "actual", "free_page_hint_cmd_id", "poison_val")
_REGION_FIELDS: Final = ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset")
_ADDR_FIELDS: Final = (
    "flags", "desc_user_addr", "used_user_addr", "avail_user_addr", "log_guest_addr"
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SavedVring:
    """What the frontend told us about one queue, and where serving it got to."""

    index: int
    state: QueueState
    size: int | None
    #: next avail index to serve (for a started queue: how far this process got)
    base: int
    addr: VringAddr | None
    enabled: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state.value,
            "size": self.size,
            "base": self.base,
            "addr": None if self.addr is None else _named(self.addr, _ADDR_FIELDS),
            "enabled": self.enabled,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> SavedVring:
        item = _object(data, where)
        index = _whole(item, "index", MAX_QUEUES - 1, where)
        size = item.get("size")
        addr = item.get("addr")
        return cls(
            index=index,
            state=_enum(QueueState, item, "state", where),
            size=None if size is None else _whole(item, "size", _U32, where),
            base=_whole(item, "base", _U16, where),
            addr=None
            if addr is None
            else VringAddr(index, *_numbers(addr, _ADDR_FIELDS, _U64, f"{where}.addr")),
            enabled=item.get("enabled") is True,
        )


@dataclass(frozen=True, slots=True)
class SavedSession:
    """Everything another process needs to go on serving a connection, except the fds
    (the connection, one per region in ``memory`` order, each vring's kick/call/err),
    which travel beside it."""

    state: SessionState
    features: int
    protocol_features: int
    offered_protocol_features: int
    device_features: int
    config: BalloonConfig
    memory: tuple[MemoryRegion, ...] | None
    queues: int
    vrings: tuple[SavedVring, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SAVED_FORMAT,
            "state": self.state.value,
            "features": self.features,
            "protocol_features": self.protocol_features,
            "offered_protocol_features": self.offered_protocol_features,
            "device_features": self.device_features,
            "config": _named(self.config, _CONFIG_FIELDS),
            "memory": None
            if self.memory is None
            else [_named(r, _REGION_FIELDS) for r in self.memory],
            "queues": self.queues,
            "vrings": [v.to_json() for v in self.vrings],
        }

    @classmethod
    def from_json(cls, data: object) -> SavedSession:
        """A saved session, every value checked (``LocalProtocolError`` if not)."""
        top = _object(data, "session")
        if top.get("version") not in _READABLE:
            raise LocalProtocolError(
                f"saved session format {top.get('version')!r}; this daemon reads "
                f"{' and '.join(map(str, _READABLE))}"
            )
        memory = top.get("memory")
        vrings = top.get("vrings")
        if memory is not None and not isinstance(memory, list):
            raise LocalProtocolError(f"saved session: memory {memory!r} is not a list")
        if not isinstance(vrings, list):
            raise LocalProtocolError(f"saved session: vrings {vrings!r} is not a list")
        return cls(
            state=_enum(SessionState, top, "state", "session"),
            features=_whole(top, "features", _U64, "session"),
            protocol_features=_whole(top, "protocol_features", _U64, "session"),
            offered_protocol_features=_whole(top, "offered_protocol_features", _U64, "session"),
            device_features=_whole(top, "device_features", _U64, "session"),
            config=BalloonConfig(*_numbers(top.get("config"), _CONFIG_FIELDS, _U32, "config")),
            memory=None
            if memory is None
            else tuple(
                MemoryRegion(*_numbers(r, _REGION_FIELDS, _U64, f"memory[{i}]"))
                for i, r in enumerate(memory)
            ),
            queues=_whole(top, "queues", MAX_QUEUES, "session"),
            vrings=tuple(SavedVring.from_json(v, f"vrings[{i}]") for i, v in enumerate(vrings)),
        )


def _named(record: object, fields: tuple[str, ...]) -> dict[str, int]:
    return {name: getattr(record, name) for name in fields}


def _object(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise LocalProtocolError(f"saved {where}: {data!r} is not an object")
    return data


def _whole(data: Mapping[str, Any], key: str, most: int, where: str) -> int:
    """A saved number: an int (not a bool, not a float) from 0 to ``most``."""
    value = data.get(key)
    if type(value) is not int or not 0 <= value <= most:
        raise LocalProtocolError(
            f"saved {where}.{key}: {value!r} is not a whole number from 0 to {most:#x}"
        )
    return value


def _numbers(data: object, fields: tuple[str, ...], most: int, where: str) -> list[int]:
    """The named numbers of a record: an object (format 2) or a list in field order
    (format 1)."""
    if isinstance(data, list) and len(data) == len(fields):
        data = dict(zip(fields, data, strict=True))
    item = _object(data, where)
    return [_whole(item, name, most, where) for name in fields]


def _enum(kind: type[_E], data: Mapping[str, Any], key: str, where: str) -> _E:
    try:
        return kind(data.get(key))
    except ValueError:
        raise LocalProtocolError(
            f"saved {where}.{key}: {data.get(key)!r} is not one of "
            f"{', '.join(str(m.value) for m in kind)}"
        ) from None
