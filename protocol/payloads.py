"""Payload layouts of vhost-user messages, byte for byte.

vhost-user messages are in the host's native byte order (vhost-user.rst "Message
Specification"); every layout here is a precompiled ``struct.Struct`` with ``=``
(native order, no padding), so the bytes are exactly what QEMU writes.
Each payload is a frozen, slotted dataclass with ``from_bytes`` and ``to_bytes``;
``from_bytes`` checks the size and every field that has a rule of its own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .codes import MAX_CONFIG_SIZE, MAX_QUEUES, MAX_REGIONS
from .errors import PayloadError

__all__ = [
    "U64",
    "Config",
    "DeviceStateTransfer",
    "Empty",
    "Inflight",
    "IotlbMsg",
    "LogArea",
    "MemoryRegion",
    "MemoryRegionMsg",
    "MemoryTable",
    "Payload",
    "Raw",
    "SharedObject",
    "VringAddr",
    "VringFile",
    "VringState",
]

_U64 = struct.Struct("=Q")
_U32X2 = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")
_TABLE_HEAD = struct.Struct("=II")
_CONFIG_HEAD = struct.Struct("=III")
_LOG = struct.Struct("=QQ")
# struct vhost_user_inflight is {u64, u64, u16, u16}; as a C struct it is padded to 24.
# The padding is kept, so that what we decode re-encodes to the same bytes.
_INFLIGHT = struct.Struct("=QQHHI")
# struct vhost_iotlb_msg {u64 iova, size, uaddr; u8 perm, type;} is padded to 32.
_IOTLB = struct.Struct("=QQQBB6s")

#: vhost-user.rst "Vring descriptor index for ring addressing": bits 0-7 index, bit 8 no fd.
_VRING_IDX_MASK = 0xFF
_VRING_NOFD = 1 << 8


def _check_size(cls_name: str, data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise PayloadError(
            f"{cls_name} payload is {len(data)} bytes, expected {expected}",
            reason="bad_payload_size",
            payload=cls_name,
            size=len(data),
            expected=expected,
        )


class Payload:
    """Base of all payloads: a fixed ``SIZE`` or ``None`` when the size is variable."""

    __slots__ = ()
    SIZE: ClassVar[int | None] = None

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_bytes(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No payload (GET_FEATURES, SET_OWNER, ...)."""

    SIZE: ClassVar[int | None] = 0

    @classmethod
    def from_bytes(cls, data: bytes) -> Empty:
        _check_size("Empty", data, 0)
        return cls()

    def to_bytes(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single u64: features, protocol features, status, REPLY_ACK results."""

    value: int
    SIZE: ClassVar[int | None] = 8

    @classmethod
    def from_bytes(cls, data: bytes) -> U64:
        _check_size("U64", data, 8)
        return cls(_U64.unpack(data)[0])

    def to_bytes(self) -> bytes:
        return _U64.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """``struct vhost_vring_state``: a queue index and a number (size, base, enable)."""

    index: int
    num: int
    SIZE: ClassVar[int | None] = 8

    @classmethod
    def from_bytes(cls, data: bytes) -> VringState:
        _check_size("VringState", data, 8)
        index, num = _U32X2.unpack(data)
        return cls(index, num)

    def to_bytes(self) -> bytes:
        return _U32X2.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """``struct vhost_vring_addr``: ring addresses in QEMU's *user* address space."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    SIZE: ClassVar[int | None] = 40

    @classmethod
    def from_bytes(cls, data: bytes) -> VringAddr:
        _check_size("VringAddr", data, 40)
        return cls(*_ADDR.unpack(data))

    def to_bytes(self) -> bytes:
        return _ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True, slots=True)
class VringFile(Payload):
    """The u64 of SET_VRING_KICK/CALL/ERR: queue index in bits 0-7, bit 8 = no fd."""

    index: int
    nofd: bool
    SIZE: ClassVar[int | None] = 8

    @classmethod
    def from_bytes(cls, data: bytes) -> VringFile:
        _check_size("VringFile", data, 8)
        (value,) = _U64.unpack(data)
        if value & ~(_VRING_IDX_MASK | _VRING_NOFD):
            raise PayloadError(
                f"vring fd payload {value:#x} sets bits other than the index (0-7) "
                "and the no-fd flag (8)",
                reason="bad_vring_file",
                value=value,
            )
        return cls(value & _VRING_IDX_MASK, bool(value & _VRING_NOFD))

    def to_bytes(self) -> bytes:
        return _U64.pack(self.index | (_VRING_NOFD if self.nofd else 0))


@dataclass(frozen=True, slots=True)
class MemoryRegion(Payload):
    """One guest RAM region: where it is for the guest, for QEMU, and in its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int | None] = 32

    @classmethod
    def from_bytes(cls, data: bytes) -> MemoryRegion:
        _check_size("MemoryRegion", data, 32)
        return cls(*_REGION.unpack(data))

    def to_bytes(self) -> bytes:
        return _REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: ``nregions`` u32, padding u32, then the regions (one fd each)."""

    regions: tuple[MemoryRegion, ...]
    padding: int = 0

    @classmethod
    def from_bytes(cls, data: bytes) -> MemoryTable:
        if len(data) < _TABLE_HEAD.size:
            raise PayloadError(
                f"memory table payload is {len(data)} bytes, shorter than its 8-byte head",
                reason="bad_payload_size",
                payload="MemoryTable",
                size=len(data),
            )
        nregions, padding = _TABLE_HEAD.unpack_from(data)
        if not 1 <= nregions <= MAX_REGIONS:
            raise PayloadError(
                f"memory table has {nregions} regions; 1 to {MAX_REGIONS} are allowed",
                reason="bad_region_count",
                nregions=nregions,
                limit=MAX_REGIONS,
            )
        _check_size("MemoryTable", data, _TABLE_HEAD.size + nregions * _REGION.size)
        regions = tuple(
            MemoryRegion(*_REGION.unpack_from(data, _TABLE_HEAD.size + i * _REGION.size))
            for i in range(nregions)
        )
        return cls(regions, padding)

    def to_bytes(self) -> bytes:
        head = _TABLE_HEAD.pack(len(self.regions), self.padding)
        return head + b"".join(r.to_bytes() for r in self.regions)


@dataclass(frozen=True, slots=True)
class MemoryRegionMsg(Payload):
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemoryRegion
    padding: int = 0
    SIZE: ClassVar[int | None] = 40

    @classmethod
    def from_bytes(cls, data: bytes) -> MemoryRegionMsg:
        _check_size("MemoryRegionMsg", data, 40)
        (padding,) = _U64.unpack_from(data)
        return cls(MemoryRegion(*_REGION.unpack_from(data, 8)), padding)

    def to_bytes(self) -> bytes:
        return _U64.pack(self.padding) + self.region.to_bytes()


@dataclass(frozen=True, slots=True)
class Config(Payload):
    """GET_CONFIG / SET_CONFIG: offset, size, flags, then ``size`` bytes of config space."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Config:
        if len(data) < _CONFIG_HEAD.size:
            raise PayloadError(
                f"config payload is {len(data)} bytes, shorter than its 12-byte head",
                reason="bad_payload_size",
                payload="Config",
                size=len(data),
            )
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise PayloadError(
                f"config access of {size} bytes exceeds the {MAX_CONFIG_SIZE}-byte limit",
                reason="bad_config_size",
                size=size,
                limit=MAX_CONFIG_SIZE,
            )
        _check_size("Config", data, _CONFIG_HEAD.size + size)
        return cls(offset, size, flags, bytes(data[_CONFIG_HEAD.size :]))

    def to_bytes(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True, slots=True)
class LogArea(Payload):
    """SET_LOG_BASE: size and offset of the dirty log in the attached fd."""

    mmap_size: int
    mmap_offset: int
    SIZE: ClassVar[int | None] = 16

    @classmethod
    def from_bytes(cls, data: bytes) -> LogArea:
        _check_size("LogArea", data, 16)
        return cls(*_LOG.unpack(data))

    def to_bytes(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class Inflight(Payload):
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD: the shared in-flight tracking area."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    padding: int = 0
    SIZE: ClassVar[int | None] = 24

    @classmethod
    def from_bytes(cls, data: bytes) -> Inflight:
        _check_size("Inflight", data, 24)
        return cls(*_INFLIGHT.unpack(data))

    def to_bytes(self) -> bytes:
        return _INFLIGHT.pack(
            self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size, self.padding
        )


@dataclass(frozen=True, slots=True)
class IotlbMsg(Payload):
    """IOTLB_MSG: ``struct vhost_iotlb_msg``."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    padding: bytes = bytes(6)
    SIZE: ClassVar[int | None] = 32

    @classmethod
    def from_bytes(cls, data: bytes) -> IotlbMsg:
        _check_size("IotlbMsg", data, 32)
        return cls(*_IOTLB.unpack(data))

    def to_bytes(self) -> bytes:
        return _IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type, self.padding)


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Payload):
    """SET_DEVICE_STATE_FD: transfer direction and migration phase."""

    direction: int
    phase: int
    SIZE: ClassVar[int | None] = 8

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceStateTransfer:
        _check_size("DeviceStateTransfer", data, 8)
        return cls(*_U32X2.unpack(data))

    def to_bytes(self) -> bytes:
        return _U32X2.pack(self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """GET_SHARED_OBJECT: a 16-byte UUID."""

    uuid: bytes
    SIZE: ClassVar[int | None] = 16

    @classmethod
    def from_bytes(cls, data: bytes) -> SharedObject:
        _check_size("SharedObject", data, 16)
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        return self.uuid


@dataclass(frozen=True, slots=True)
class Raw(Payload):
    """Bytes of a request whose layout we do not interpret (crypto sessions)."""

    data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Raw:
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        return self.data


assert MAX_QUEUES <= _VRING_IDX_MASK + 1, "queue indexes must fit the vring-file index bits"
