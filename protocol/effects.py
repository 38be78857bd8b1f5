"""What a session asks its owner to do after a message: map memory, watch fds, run queues.

The session decides; the daemon acts. Each effect names exactly what changes, and
every fd in an effect now belongs to the daemon. Fds of a message that no effect
names are the daemon's to close at once (see ``Outcome.kept_fds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .balloon import QueueRole
from .memory import GuestMemory
from .payloads import MemoryRegion
from .virtqueue import SplitQueue

__all__ = [
    "AddRegion",
    "BalloonChanged",
    "Effect",
    "EnableQueue",
    "FdKind",
    "FeaturesSet",
    "Notice",
    "Outcome",
    "RemoveRegion",
    "ResetDevice",
    "SetBackendChannel",
    "SetMemory",
    "SetVringFd",
    "StartQueue",
    "StopQueue",
]


class FdKind(Enum):
    """Which of a queue's eventfds (vhost-user.rst SET_VRING_KICK/CALL/ERR)."""

    KICK = "kick"
    CALL = "call"
    ERR = "err"


@dataclass(frozen=True, slots=True)
class SetMemory:
    """Replace the whole memory table: map ``fds[i]`` for ``memory.regions[i]``."""

    memory: GuestMemory
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AddRegion:
    """Map one more region (ADD_MEM_REG); ``memory`` is the table that results."""

    region: MemoryRegion
    fd: int
    memory: GuestMemory


@dataclass(frozen=True, slots=True)
class RemoveRegion:
    """Unmap one region (REM_MEM_REG); ``memory`` is the table that results (or None)."""

    region: MemoryRegion
    memory: GuestMemory | None


@dataclass(frozen=True, slots=True)
class SetBackendChannel:
    """The socket for messages the backend starts (config changes); close the old one."""

    fd: int


@dataclass(frozen=True, slots=True)
class SetVringFd:
    """A queue's kick, call or err eventfd changed; close the previous one."""

    index: int
    kind: FdKind
    fd: int | None


@dataclass(frozen=True, slots=True)
class StartQueue:
    """A queue has its rings and kick fd: serve it while it is enabled."""

    index: int
    role: QueueRole | None
    queue: SplitQueue


@dataclass(frozen=True, slots=True)
class StopQueue:
    """A queue stopped (GET_VRING_BASE or reset). Its kick and call fds are closed."""

    index: int


@dataclass(frozen=True, slots=True)
class EnableQueue:
    """SET_VRING_ENABLE: process the queue (True) or leave it alone (False)."""

    index: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class ResetDevice:
    """The frontend reset the device: drop memory and every queue fd. With
    ``new_device``, QEMU realized a new device on the same connection (``device_del``
    then ``device_add`` on one chardev): the old device's backend channel is gone too,
    and the new one sends its own."""

    new_device: bool = False


@dataclass(frozen=True, slots=True)
class FeaturesSet:
    """The virtio feature bits the guest driver accepted (0 after a reset). Bit 30,
    vhost-user's protocol-features bit, is between QEMU and us: the guest never sees it
    and it is not here."""

    guest_features: int


@dataclass(frozen=True, slots=True)
class BalloonChanged:
    """The balloon config changed: what we ask the guest to give up, and what it says
    the balloon holds now, both in 4 KiB pages."""

    target_pages: int
    actual_pages: int


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should see in the log that is not an error."""

    event: str
    message: str


Effect = (
    SetMemory
    | AddRegion
    | RemoveRegion
    | SetVringFd
    | SetBackendChannel
    | StartQueue
    | StopQueue
    | EnableQueue
    | ResetDevice
    | FeaturesSet
    | BalloonChanged
    | Notice
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The reply to send (if any) and the effects to carry out, in order."""

    reply: bytes | None = None
    effects: tuple[Effect, ...] = ()

    def kept_fds(self) -> frozenset[int]:
        """The fds the effects hand to the daemon; any other fd of the message is closed."""
        kept: set[int] = set()
        for e in self.effects:
            if isinstance(e, SetMemory):
                kept.update(e.fds)
            elif isinstance(e, AddRegion | SetVringFd | SetBackendChannel) and e.fd is not None:
                kept.add(e.fd)
        return frozenset(kept)
