"""The guest's memory as the backend sees it: regions, address translation, access.

Two address spaces reach us: *guest physical* addresses (in descriptors the guest
writes) and QEMU *user* addresses (in SET_VRING_ADDR). Each region maps a slice of
both onto a slice of its fd starting at ``mmap_offset``. Theory of operation: every
address the guest or QEMU gives us is checked here, as a *range*, before anything
reads, writes or discards it; a range must lie wholly inside one region, so no
arithmetic downstream can step past the end of a mapping or into another file.

``GuestMemory`` does no I/O itself: reads and writes go through ``MemoryAccess``
objects, one per region, which the daemon implements over mmap and tests implement
over a bytearray. A region whose bytes may be read and written in place offers them
as ``buffer``: the ring code then resolves its areas once (``area_uva``) and reads them
with ``struct.unpack_from``, without a lookup or a copy per access.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple, Protocol

from .codes import MAX_REGIONS
from .errors import AddressError, LocalProtocolError, MemoryTableError
from .payloads import MemoryRegion

__all__ = [
    "U64_LIMIT",
    "Area",
    "GuestMemory",
    "InPlace",
    "Location",
    "MemoryAccess",
    "validate_regions",
]

#: Addresses and sizes are u64; an end beyond this wrapped around.
U64_LIMIT = 1 << 64
_GPA = "guest physical"
_UVA = "user"


class InPlace(Protocol):
    """Bytes read and written in place (a bytearray, a shared mapping): sliced, or
    with ``struct.unpack_from`` and ``pack_into``."""

    def __buffer__(self, flags: int, /) -> memoryview: ...

    def __getitem__(self, index: slice, /) -> bytes | bytearray: ...

    def __setitem__(self, index: slice, value: bytes, /) -> None: ...


class MemoryAccess(Protocol):
    """Byte access to one region, by offset from the region's start."""

    #: the region's bytes, to be read and written in place, or None: only ``read`` and
    #: ``write`` may be used (a file that may shrink under us)
    @property
    def buffer(self) -> InPlace | None: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class Location(NamedTuple):
    """Where a checked range lies: region index, offset in the region, offset in its fd.
    (A named tuple, not a frozen dataclass: one is made per reported block, and a tuple
    costs a third of it.)"""

    region: int
    offset: int
    file_offset: int


class Area(NamedTuple):
    """A checked range of one region, resolved once for repeated access: the region's
    access, its bytes in place (or None) and the range's offset in the region."""

    access: MemoryAccess
    buffer: InPlace | None
    offset: int


def _overlaps(spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    spans = sorted(spans)
    for (start_a, end_a), (start_b, end_b) in pairwise(spans):
        if start_b < end_a:
            return (start_a, end_b)
    return None


def validate_regions(
    regions: Sequence[MemoryRegion], *, limit: int = MAX_REGIONS
) -> tuple[MemoryRegion, ...]:
    """Check a memory table: 1..limit regions, none empty, none wrapping, none overlapping."""
    if not 1 <= len(regions) <= limit:
        raise MemoryTableError(
            f"memory table has {len(regions)} regions; 1 to {limit} are allowed",
            reason="bad_region_count",
            nregions=len(regions),
            limit=limit,
        )
    for i, r in enumerate(regions):
        if r.memory_size == 0:
            raise MemoryTableError(f"memory region {i} has size 0", reason="empty_region", region=i)
        for name, start in (
            ("guest_phys_addr", r.guest_phys_addr),
            ("userspace_addr", r.userspace_addr),
            ("mmap_offset", r.mmap_offset),
        ):
            if start + r.memory_size > U64_LIMIT:
                raise MemoryTableError(
                    f"memory region {i}: {name} {start:#x} + size {r.memory_size:#x} "
                    "overflows 64 bits",
                    reason="region_overflow",
                    region=i,
                    field=name,
                    start=start,
                    size=r.memory_size,
                )
    for name, spans in (
        (_GPA, [(r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions]),
        (_UVA, [(r.userspace_addr, r.userspace_addr + r.memory_size) for r in regions]),
    ):
        clash = _overlaps(spans)
        if clash is not None:
            raise MemoryTableError(
                f"memory regions overlap in {name} address space around "
                f"{clash[0]:#x}-{clash[1]:#x}",
                reason="region_overlap",
                space=name,
                start=clash[0],
                end=clash[1],
            )
    return tuple(regions)


class _SpaceIndex:
    """Region starts in one address space, ascending, and the region index of each."""

    __slots__ = ("order", "starts")

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.starts = [start for start, _ in pairs]
        self.order = [i for _, i in pairs]


class GuestMemory:
    """A validated memory table plus, optionally, access to each region's bytes."""

    def __init__(
        self,
        regions: Sequence[MemoryRegion],
        backings: Sequence[MemoryAccess] = (),
        *,
        limit: int = MAX_REGIONS,
    ) -> None:
        self.regions = validate_regions(regions, limit=limit)
        if backings and len(backings) != len(self.regions):
            raise LocalProtocolError(f"{len(backings)} backings for {len(self.regions)} regions")
        self._backings = tuple(backings)
        # Regions never overlap, so the only one that can hold an address is the last
        # that starts at or below it: a binary search per space, not a scan of up to
        # MAX_MEM_SLOTS regions for every descriptor.
        self._index = {
            _GPA: _SpaceIndex(sorted((r.guest_phys_addr, i) for i, r in enumerate(self.regions))),
            _UVA: _SpaceIndex(sorted((r.userspace_addr, i) for i, r in enumerate(self.regions))),
        }

    @property
    def total_size(self) -> int:
        return sum(r.memory_size for r in self.regions)

    def _find(self, addr: int, length: int, space: str) -> Location | None:
        index = self._index[space]
        at = bisect_right(index.starts, addr) - 1
        if at < 0:
            return None
        i = index.order[at]
        r = self.regions[i]
        offset = addr - index.starts[at]
        if offset + length > r.memory_size:
            return None
        return Location(i, offset, r.mmap_offset + offset)

    def _locate(self, addr: int, length: int, space: str) -> Location:
        if length <= 0:
            raise AddressError(f"empty {space} range at {addr:#x}", reason="empty_range", addr=addr)
        loc = self._find(addr, length, space)
        if loc is None:
            raise AddressError(
                f"{space} range {addr:#x}+{length:#x} does not lie wholly inside one memory region",
                reason="outside_memory",
                space=space,
                addr=addr,
                length=length,
            )
        return loc

    def find_gpa(self, gpa: int, length: int) -> Location | None:
        """Where a non-empty guest-physical range lies, or None if not inside one region."""
        return self._find(gpa, length, _GPA) if length > 0 else None

    def find_gpas(self, spans: Sequence[tuple[int, int]]) -> list[Location | None]:
        """``find_gpa`` of each (address, length): a chain's buffers, found at once. A
        span in the region of the one before is found without a search (a report's
        blocks mostly lie in one region)."""
        out: list[Location | None] = []
        last: MemoryRegion | None = None
        at = 0
        for gpa, length in spans:
            if last is not None and length > 0 and last.guest_phys_addr <= gpa:
                offset = gpa - last.guest_phys_addr
                if offset + length <= last.memory_size:
                    out.append(Location(at, offset, last.mmap_offset + offset))
                    continue
            found = self.find_gpa(gpa, length)
            if found is not None:
                at, last = found.region, self.regions[found.region]
            out.append(found)
        return out

    def find_uva(self, uva: int, length: int) -> Location | None:
        """Where a non-empty QEMU user-address range lies, or None if not inside one region."""
        return self._find(uva, length, _UVA) if length > 0 else None

    def locate_gpa(self, gpa: int, length: int) -> Location:
        """Where a guest-physical range lies; ``AddressError`` unless inside one region."""
        return self._locate(gpa, length, _GPA)

    def locate_uva(self, uva: int, length: int) -> Location:
        """Where a QEMU user-address range lies; ``AddressError`` unless inside one region."""
        return self._locate(uva, length, _UVA)

    def _backing(self, loc: Location) -> MemoryAccess:
        if not self._backings:
            raise LocalProtocolError("this GuestMemory has no access to region bytes")
        return self._backings[loc.region]

    def read_gpa(self, gpa: int, length: int) -> bytes:
        loc = self.locate_gpa(gpa, length)
        return self._backing(loc).read(loc.offset, length)

    def area_uva(self, uva: int, length: int) -> Area:
        """A user-address range resolved once (``AddressError`` unless inside one region),
        for the ring code to access again and again."""
        loc = self.locate_uva(uva, length)
        access = self._backing(loc)
        return Area(access, access.buffer, loc.offset)

    def read_uva(self, uva: int, length: int) -> bytes:
        loc = self.locate_uva(uva, length)
        return self._backing(loc).read(loc.offset, length)

    def write_uva(self, uva: int, data: bytes) -> None:
        loc = self.locate_uva(uva, len(data))
        self._backing(loc).write(loc.offset, data)
