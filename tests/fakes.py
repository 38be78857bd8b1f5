"""Test doubles that play the guest driver's side of the rings, over any byte buffer.

``GuestRam`` is guest-physical memory made of regions backed by bytearrays (unit
tests) or by an mmap of a memfd (integration tests, where the daemon maps the same
memfd). ``DriverRing`` writes descriptors and the avail ring the way Linux's
virtio_ring does, and reads back the used ring.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vhost_user_balloon.protocol import GuestMemory, MemoryRegion, RingLayout, VringAddr

#: Where test regions appear in "QEMU's" address space: user address = gpa + this.
UVA_BASE = 0x7F00_0000_0000

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Buffer(Protocol):
    def __getitem__(self, index: slice, /) -> bytes | bytearray: ...
    def __setitem__(self, index: slice, value: bytes, /) -> None: ...
    def __len__(self) -> int: ...


class ByteRegion:
    """``MemoryAccess`` over a bytearray or an mmap; ``in_place``: offered as its
    ``buffer`` (as the daemon's sealed mappings are), or not (an unsealed file's)."""

    def __init__(self, buf: Buffer, *, in_place: bool = True) -> None:
        self.buf = buf
        self.buffer = buf if in_place else None

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset : offset + len(data)] = data


@dataclass
class RamRegion:
    gpa: int
    buf: Buffer
    mmap_offset: int = 0

    @property
    def size(self) -> int:
        return len(self.buf)

    def to_region(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, UVA_BASE + self.gpa, self.mmap_offset)


class GuestRam:
    """Guest-physical memory over a few buffers."""

    def __init__(self, regions: Sequence[RamRegion]) -> None:
        self.regions = list(regions)

    @classmethod
    def flat(cls, size: int) -> GuestRam:
        return cls([RamRegion(0, bytearray(size))])

    def _find(self, gpa: int, length: int) -> tuple[RamRegion, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r, gpa - r.gpa
        raise AssertionError(f"test wrote outside its own RAM: {gpa:#x}+{length:#x}")

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._find(gpa, len(data))
        r.buf[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._find(gpa, length)
        return bytes(r.buf[off : off + length])

    def memory_regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(r.to_region() for r in self.regions)

    def guest_memory(self, *, in_place: bool = True) -> GuestMemory:
        """The memory as the daemon sees it: its bytes in place (a sealed memfd's
        mapping), or only through read and write (an unsealed file's)."""
        regions = [ByteRegion(r.buf, in_place=in_place) for r in self.regions]
        return GuestMemory(self.memory_regions(), regions)


class DriverRing:
    """The driver side of one split ring living in ``ram`` at ``base`` (guest physical)."""

    def __init__(self, ram: GuestRam, base: int, size: int, *, index: int = 0) -> None:
        self.ram, self.size, self.index = ram, size, index
        self.desc = base
        self.avail = base + 16 * size
        # Linux aligns the used ring; 64 bytes is what QEMU 11 showed us.
        self.used = (self.avail + 6 + 2 * size + 63) // 64 * 64
        self.end = self.used + 6 + 8 * size
        self.avail_idx = 0
        self.next_free = 0
        self.used_seen = 0
        for gpa in range(base, self.end, 4096):
            self.ram.write(gpa, bytes(min(4096, self.end - gpa)))

    def vring_addr(self) -> VringAddr:
        return VringAddr(
            self.index, 0, UVA_BASE + self.desc, UVA_BASE + self.used, UVA_BASE + self.avail, 0
        )

    def layout(self) -> RingLayout:
        """Where QEMU would tell the device this ring is."""
        return RingLayout(
            self.size, UVA_BASE + self.desc, UVA_BASE + self.avail, UVA_BASE + self.used
        )

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        slot = self.avail + 4 + 2 * (self.avail_idx % self.size)
        self.ram.write(slot, _U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, _U16.pack(self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.ram.write(self.avail + 2, _U16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, _U16.pack(flags))

    def add_chain(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Write a direct chain of (gpa, length, device-writable) and make it available."""
        n = len(buffers)
        ids = [(self.next_free + k) % self.size for k in range(n)]
        self.next_free = (self.next_free + n) % self.size
        for k, (gpa, length, writable) in enumerate(buffers):
            flags = (F_WRITE if writable else 0) | (F_NEXT if k + 1 < n else 0)
            self.write_desc(ids[k], gpa, length, flags, ids[k + 1] if k + 1 < n else 0)
        self.publish(ids[0])
        return ids[0]

    def add_indirect(self, table_gpa: int, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Write an indirect table at ``table_gpa`` and a head descriptor pointing to it."""
        n = len(buffers)
        for k, (gpa, length, writable) in enumerate(buffers):
            flags = (F_WRITE if writable else 0) | (F_NEXT if k + 1 < n else 0)
            self.ram.write(table_gpa + 16 * k, _DESC.pack(gpa, length, flags, k + 1))
        head = self.next_free
        self.next_free = (self.next_free + 1) % self.size
        self.write_desc(head, table_gpa, 16 * n, F_INDIRECT)
        self.publish(head)
        return head

    def used_idx(self) -> int:
        return int(_U16.unpack(self.ram.read(self.used + 2, 2))[0])

    def used_elem(self, i: int) -> tuple[int, int]:
        head, length = _USED.unpack(self.ram.read(self.used + 4 + 8 * (i % self.size), 8))
        return head, length

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements published since the last call."""
        out = []
        while self.used_seen != self.used_idx():
            out.append(self.used_elem(self.used_seen))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out
