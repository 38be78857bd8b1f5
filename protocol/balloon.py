"""The virtio-balloon device model (virtio 1.2 section 5.5), without I/O.

What the balloon offers, what its 16-byte config space holds, which queue does what
once features are negotiated, and what a free page report means: a list of
guest-physical blocks, each ``4096 << order`` bytes and naturally aligned, that the
guest promises not to touch until we hand the report back.

Queue numbering (measured on Debian 6.1 and 6.12 guests, docs/facts.md section 2): queues are
numbered densely over the negotiated features: inflate 0, deflate 1, then stats (if
STATS_VQ), free page hint (if FREE_PAGE_HINT), reporting (if REPORTING). The spec text
gives fixed numbers (reporting = 4), which no Linux guest uses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntFlag
from types import MappingProxyType
from typing import Final, NamedTuple

from .codes import VirtioFeature
from .errors import LocalProtocolError, PayloadError, ReportError
from .memory import GuestMemory, Location
from .virtqueue import Chain, Readable, read_readable

__all__ = [
    "CONFIG_SIZE",
    "DEFAULT_FEATURES",
    "GUEST_PAGE_SIZE",
    "MAX_PFN_BYTES",
    "MAX_REPORT_ORDER",
    "QEMU_DEVICE",
    "VIRTIO_ID_BALLOON",
    "BalloonConfig",
    "BalloonDevice",
    "BalloonFeature",
    "QueueRole",
    "ReportedRange",
    "balloon_pages",
    "qemu_device_option",
    "queue_layout",
    "report_ranges",
]

#: Size of struct virtio_balloon_config (virtio 1.2 5.5.4); QEMU's config_size must match.
CONFIG_SIZE = 16
#: VIRTIO_BALLOON_PFN_SHIFT: the balloon counts in 4 KiB pages whatever the guest uses.
GUEST_PAGE_SIZE = 4096
#: Largest report block we accept: 4096 << 19 = 2 GiB, above any guest's MAX_PAGE_ORDER.
#: It also bounds the ``order`` metric label.
MAX_REPORT_ORDER = 19

_CONFIG = struct.Struct("<IIII")
_PFN = struct.Struct("<I")
#: Largest inflate/deflate page array we read: Linux sends at most 256 frame numbers
#: (VIRTIO_BALLOON_ARRAY_PFNS_MAX, 1 KiB); this bounds what a guest can make us copy.
MAX_PFN_BYTES = 4096
_PAGE_ARRAY = Readable("page array", _PFN.size, MAX_PFN_BYTES, ReportError, "pfn")


class BalloonFeature(IntFlag):
    """Feature bits of the balloon device (virtio 1.2 5.5.3)."""

    MUST_TELL_HOST = 1 << 0  #: VIRTIO_BALLOON_F_MUST_TELL_HOST
    STATS_VQ = 1 << 1  #: VIRTIO_BALLOON_F_STATS_VQ
    DEFLATE_ON_OOM = 1 << 2  #: VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    FREE_PAGE_HINT = 1 << 3  #: VIRTIO_BALLOON_F_FREE_PAGE_HINT
    PAGE_POISON = 1 << 4  #: VIRTIO_BALLOON_F_PAGE_POISON
    REPORTING = 1 << 5  #: VIRTIO_BALLOON_F_REPORTING


#: What we offer by default: free page reporting; the stats queue (its buffer is held);
#: page poison, so guests that poison or zero freed pages keep reporting (docs/facts.md section 2).
#: VERSION_1 and PROTOCOL_FEATURES are required by QEMU's generic device (measured).
DEFAULT_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | BalloonFeature.STATS_VQ
    | BalloonFeature.PAGE_POISON
    | BalloonFeature.REPORTING
)


class QueueRole(Enum):
    """What a balloon virtqueue is for."""

    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE_HINT = "free_page_hint"
    REPORTING = "reporting"


#: VIRTIO_ID_BALLOON (virtio 1.2 5: device types).
VIRTIO_ID_BALLOON = 5
#: The properties QEMU's generic vhost-user device (QEMU >= 10.2) needs to be this
#: balloon: every attach line and libvirt snippet shipped, the migration commands and
#: the errors that tell users what to write come from here (tests check the files).
#: ``num_vqs`` covers every queue a balloon can have (the guest numbers them densely
#: over its features); ``config_size`` must be the balloon config's 16 bytes (with 0,
#: QEMU forwards no config access and the guest inflates over all its memory).
QEMU_DEVICE: Final = MappingProxyType({
    "driver": "vhost-user-test-device-pci",
    "virtio-id": VIRTIO_ID_BALLOON,
    "num_vqs": len(QueueRole),
    "config_size": CONFIG_SIZE,
})  # fmt: skip


def qemu_device_option(**where: str) -> str:
    """The ``-device`` option's value, key=value: the driver, then ``where`` (``id``,
    ``bus``, ``chardev``, in the order given), then the balloon's properties."""
    driver, *rest = QEMU_DEVICE.items()
    parts = [str(driver[1]), *(f"{k}={v}" for k, v in where.items())]
    return ",".join(parts + [f"{k}={v}" for k, v in rest])


def queue_layout(features: int) -> tuple[QueueRole, ...]:
    """The role of each queue index for the negotiated ``features`` (dense numbering)."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    for bit, role in (
        (BalloonFeature.STATS_VQ, QueueRole.STATS),
        (BalloonFeature.FREE_PAGE_HINT, QueueRole.FREE_PAGE_HINT),
        (BalloonFeature.REPORTING, QueueRole.REPORTING),
    ):
        if features & bit:
            roles.append(role)
    return tuple(roles)


@dataclass(slots=True)
class BalloonConfig:
    """struct virtio_balloon_config (virtio 1.2 5.5.4), little-endian."""

    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    @classmethod
    def from_bytes(cls, data: bytes) -> BalloonConfig:
        return cls(*_CONFIG.unpack(data))

    def to_bytes(self) -> bytes:
        return _CONFIG.pack(
            self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val
        )


class ReportedRange(NamedTuple):
    """One reported free block; ``location`` is None if it is not inside guest RAM.
    (A named tuple: one is made per reported block.)"""

    gpa: int
    length: int
    order: int
    location: Location | None


def report_ranges(chain: Chain) -> tuple[ReportedRange, ...]:
    """The blocks of a free page report, or ``ReportError`` if any entry is malformed.

    Linux (mm/page_reporting.c) reports device-writable entries of ``PAGE_SIZE <<
    order`` bytes at naturally aligned addresses. Anything else is not a report we
    understand, so none of it may be discarded.
    """
    out = []
    for i, d in enumerate(chain.descriptors):
        if not d.writable:
            raise ReportError(
                f"report entry {i} is device-readable; reports are device-writable buffers",
                reason="report_not_writable",
                entry=i,
            )
        length = d.length
        if length < GUEST_PAGE_SIZE or length & (length - 1):
            raise ReportError(
                f"report entry {i} is {length} bytes, not 4096 << order",
                reason="report_bad_length",
                entry=i,
                length=length,
            )
        order = length.bit_length() - 1 - 12
        if order > MAX_REPORT_ORDER:
            raise ReportError(
                f"report entry {i} is order {order}; the largest accepted is {MAX_REPORT_ORDER}",
                reason="report_bad_length",
                entry=i,
                length=length,
            )
        if d.addr % length:
            raise ReportError(
                f"report entry {i} at {d.addr:#x} is not aligned to its length {length:#x}",
                reason="report_unaligned",
                entry=i,
                addr=d.addr,
                length=length,
            )
        out.append(ReportedRange(d.addr, length, order, d.location))
    return tuple(out)


def balloon_pages(chain: Chain, mem: GuestMemory) -> tuple[ReportedRange, ...]:
    """The 4 KiB pages named by an inflate or deflate buffer: an array of le32 page
    frame numbers (virtio 1.2 5.5.6.1), device-readable, at most MAX_PFN_BYTES. Each
    page comes back as an order-0 range, ``location`` None if it is not in guest RAM."""
    data = read_readable(chain, mem, _PAGE_ARRAY)
    pages = [pfn * GUEST_PAGE_SIZE for (pfn,) in _PFN.iter_unpack(data)]
    places = mem.find_gpas([(gpa, GUEST_PAGE_SIZE) for gpa in pages])
    return tuple(
        ReportedRange(gpa, GUEST_PAGE_SIZE, 0, place)
        for gpa, place in zip(pages, places, strict=True)
    )


class BalloonDevice:
    """The device side of the balloon: offered features and config space."""

    def __init__(self, features: int = DEFAULT_FEATURES) -> None:
        self.features = int(features)
        self.config = BalloonConfig()

    def set_target(self, pages: int) -> None:
        """Ask the guest to give up ``pages`` 4 KiB pages (num_pages); the caller must
        then notify the guest of the config change."""
        if not 0 <= pages <= 0xFFFF_FFFF:
            raise LocalProtocolError(f"balloon target of {pages} pages does not fit le32")
        self.config.num_pages = pages

    @property
    def discard_allowed(self) -> bool:
        """QEMU's rule: a guest that poisons freed pages expects the pattern back."""
        return self.config.poison_val == 0

    def _check_access(self, offset: int, size: int) -> None:
        if offset + size > CONFIG_SIZE:
            raise PayloadError(
                f"config access at offset {offset} of {size} bytes goes past the "
                f"{CONFIG_SIZE}-byte balloon config (set config_size=16 on the QEMU device)",
                reason="bad_config_access",
                offset=offset,
                size=size,
            )

    def read_config(self, offset: int, size: int) -> bytes:
        self._check_access(offset, size)
        return self.config.to_bytes()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Apply a driver write. Only ``actual`` and ``poison_val`` are the driver's."""
        self._check_access(offset, len(data))
        merged = bytearray(self.config.to_bytes())
        merged[offset : offset + len(data)] = data
        written = BalloonConfig.from_bytes(bytes(merged))
        self.config.actual = written.actual
        self.config.poison_val = written.poison_val
