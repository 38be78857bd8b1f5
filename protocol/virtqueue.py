"""Split virtqueues (virtio 1.2 section 2.7): read the avail ring, walk chains, fill used.

Theory of operation: the guest owns every byte of the descriptor table and the avail
ring and may change them at any time, so nothing read from them is trusted. Every
range is checked against guest memory before it is touched, and each number read is
checked before it is used as an index:

* the three ring areas each lie wholly inside one region (``check_layout``, when the
  queue starts; they are then resolved once per memory table, not per access);
* the avail index may run ahead of ours by at most the queue size (2.7.13.3);
* a head and every ``next`` must be below the table size (2.7.5);
* a chain visits at most as many descriptors as its table holds: more means a loop;
* an indirect table (2.7.5.3) heads its chain, has no NEXT, a length that is a
  non-zero multiple of 16, lies inside one region, and holds no indirect descriptor;
* device-writable descriptors come after device-readable ones (2.7.4.2);
* the lengths of a chain add up to less than 2^32.

A buffer outside guest RAM is not fatal here: its descriptor comes back with
``location=None`` and the device decides (the balloon skips it and counts it).
Ring structures are little-endian (2.7: "le16", "le32", "le64").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag
from typing import NamedTuple

from .codes import MAX_QUEUE_SIZE
from .errors import (
    DescriptorError,
    LocalProtocolError,
    QueueError,
    RemoteProtocolError,
    RingError,
)
from .memory import Area, GuestMemory, InPlace, Location

__all__ = [
    "Chain",
    "DescFlag",
    "Descriptor",
    "Readable",
    "RingLayout",
    "SplitQueue",
    "check_queue_size",
    "need_event",
    "read_readable",
]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_U32_LIMIT = 1 << 32
#: virtio 1.2 2.7.7: VIRTQ_AVAIL_F_NO_INTERRUPT
_AVAIL_F_NO_INTERRUPT = 1


class DescFlag(IntFlag):
    """Descriptor flags (virtio 1.2 2.7.5)."""

    NEXT = 1  #: VIRTQ_DESC_F_NEXT: the chain continues at ``next``
    WRITE = 2  #: VIRTQ_DESC_F_WRITE: device-writable buffer
    INDIRECT = 4  #: VIRTQ_DESC_F_INDIRECT: the buffer is a table of descriptors


# Plain ints in the hot loop: IntFlag arithmetic costs a call per operation, and the
# complement of an IntFlag stays inside its members and would hide unknown bits.
_F_NEXT, _F_WRITE, _F_INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
_ALL_FLAGS = _F_NEXT | _F_WRITE | _F_INDIRECT
#: Descriptor tables up to this size are read whole, once per chain: one read instead of
#: one per descriptor, and a snapshot the guest cannot change halfway through the walk.
_SNAPSHOT_BYTES = 64 * 1024


class Descriptor(NamedTuple):
    """One buffer of a chain; ``location`` is None when it is not inside one region.
    (A named tuple: one is made per reported block.)"""

    addr: int
    length: int
    writable: bool
    location: Location | None


@dataclass(frozen=True, slots=True)
class Chain:
    """A descriptor chain taken from the avail ring, identified by its head index."""

    head: int
    descriptors: tuple[Descriptor, ...]

    @property
    def total_length(self) -> int:
        return sum(d.length for d in self.descriptors)


def check_queue_size(size: int) -> int:
    """A split ring's size must be a power of two from 1 to 32768 (virtio 1.2 2.7)."""
    if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise QueueError(
            f"queue size {size} is not a power of two from 1 to {MAX_QUEUE_SIZE}",
            reason="bad_queue_size",
            size=size,
        )
    return size


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 2.7.10: notify iff event_idx lies in [old_idx, new_idx) modulo 2^16."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where a split ring's three areas are (QEMU user addresses), and its size; each
    area aligned as virtio 1.2 2.7 requires, or ``QueueError``."""

    size: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        check_queue_size(self.size)
        for name, addr, align in (
            ("descriptor table", self.desc, 16),
            ("avail ring", self.avail, 2),
            ("used ring", self.used, 4),
        ):
            if addr % align:
                raise QueueError(
                    f"{name} address {addr:#x} is not {align}-byte aligned (virtio 1.2 2.7)",
                    reason="misaligned_ring",
                    ring=name,
                    addr=addr,
                )

    def extents(self, event_idx: bool) -> tuple[tuple[str, int, int], ...]:
        """(name, QEMU user address, length) of the three ring areas."""
        extra = 2 if event_idx else 0
        return (
            ("descriptor table", self.desc, 16 * self.size),
            ("avail ring", self.avail, 4 + 2 * self.size + extra),
            ("used ring", self.used, 4 + 8 * self.size + extra),
        )


# -- reading and writing one resolved area ----------------------------------------------
def _read(area: Area, offset: int, length: int) -> bytes:
    at = area.offset + offset
    if area.buffer is not None:
        return bytes(area.buffer[at : at + length])
    return area.access.read(at, length)


def _u16(area: Area, offset: int) -> int:
    if area.buffer is not None:
        return int(_U16.unpack_from(area.buffer, area.offset + offset)[0])
    return int(_U16.unpack(area.access.read(area.offset + offset, 2))[0])


def _write(area: Area, offset: int, data: bytes) -> None:
    at = area.offset + offset
    if area.buffer is not None:
        area.buffer[at : at + len(data)] = data
    else:
        area.access.write(at, data)


class SplitQueue:
    """Position and geometry of one split ring; guest memory is passed to each call,
    and the ring's areas are resolved in it the first time it is seen."""

    def __init__(
        self,
        layout: RingLayout,
        *,
        last_avail_idx: int = 0,
        indirect: bool = False,
        event_idx: bool = False,
    ) -> None:
        self.layout = layout
        self.size = layout.size
        self.indirect = indirect
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = 0
        self._signalled_used: int | None = None
        #: the memory the areas below were resolved in
        self._mem: GuestMemory | None = None
        self._desc = self._avail = self._used = Area(_NO_ACCESS, None, 0)

    # -- layout -----------------------------------------------------------------
    def check_layout(self, mem: GuestMemory) -> None:
        """``QueueError`` unless all three ring areas lie inside guest memory regions."""
        for name, addr, length in self.layout.extents(self.event_idx):
            if mem.find_uva(addr, length) is None:
                raise QueueError(
                    f"{name} at user address {addr:#x}+{length:#x} is not inside one "
                    "guest memory region",
                    reason="ring_outside_memory",
                    ring=name,
                    addr=addr,
                    length=length,
                )

    def _bind(self, mem: GuestMemory) -> None:
        """Resolve the three areas in ``mem`` (a new memory table: the session checked
        them against it before the daemon had it)."""
        if mem is self._mem:
            return
        self._desc, self._avail, self._used = (
            mem.area_uva(addr, length) for _, addr, length in self.layout.extents(self.event_idx)
        )
        self._mem = mem

    def load_used_index(self, mem: GuestMemory) -> None:
        """Resume from the used index the ring holds (0 on a fresh ring)."""
        self._bind(mem)
        self.used_idx = _u16(self._used, 2)

    def resume_from_used(self, mem: GuestMemory) -> int:
        """Take up a ring another process was serving, from the used index alone (its
        own next-avail index was not saved as it moved): every chain the guest made
        available and has not got back, whether the other process took it or not, is
        taken (again). This is exact for a device that completes chains in the order it
        takes them, as every balloon queue does; working on a chain twice is harmless
        here (discarding freed memory twice frees nothing more). Returns how many
        chains the guest is waiting for."""
        self.load_used_index(mem)
        self.last_avail_idx = self.used_idx
        return self.pending(mem)

    # -- avail side -------------------------------------------------------------
    def avail_idx(self, mem: GuestMemory) -> int:
        self._bind(mem)
        return _u16(self._avail, 2)

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the guest has made available that we have not taken."""
        pending = (self.avail_idx(mem) - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise RingError(
                f"avail index ran {pending} entries ahead of ours on a queue of {self.size}",
                reason="avail_index_jump",
                pending=pending,
                size=self.size,
            )
        return pending

    def pop(self, mem: GuestMemory) -> Chain | None:
        """Take the next available chain, or ``None`` if there is none."""
        if not self.pending(mem):
            return None
        head = _u16(self._avail, 4 + 2 * (self.last_avail_idx % self.size))
        if head >= self.size:
            raise RingError(
                f"avail ring offers head {head} on a queue of {self.size}",
                reason="head_out_of_range",
                head=head,
                size=self.size,
            )
        chain = Chain(head, self._walk(mem, head))
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # 2.7.10: tell the driver which avail index should kick us next.
            _write(self._used, 4 + 8 * self.size, _U16.pack(self.last_avail_idx))
        return chain

    def _table(self) -> tuple[InPlace | bytes, int]:
        """The descriptor table and where it starts in it: a snapshot, or (too big to
        copy, and in place) the ring itself, each descriptor read as it comes."""
        length = 16 * self.size
        if length <= _SNAPSHOT_BYTES or self._desc.buffer is None:
            return _read(self._desc, 0, length), 0
        return self._desc.buffer, self._desc.offset

    def _walk(self, mem: GuestMemory, head: int) -> tuple[Descriptor, ...]:
        # One loop on purpose: it is the hot path of every report, and each check stands
        # next to the read it guards.
        table, base = self._table()
        size, seen, index, total, writable_seen = self.size, 0, head, 0, False
        nested = False  # in an indirect table
        spans: list[tuple[int, int, bool]] = []
        while True:
            if seen >= size:
                raise DescriptorError(f"descriptor chain from head {head} visits more than "
                                      f"{size} descriptors: it loops", reason="chain_loop",
                                      head=head, limit=size)  # fmt: skip
            seen += 1
            addr, length, flags, nxt = _DESC.unpack_from(table, base + 16 * index)
            if flags & ~_ALL_FLAGS:
                raise DescriptorError(f"descriptor {index} has unknown flag bits {flags:#x}",
                                      reason="bad_descriptor_flags", index=index,
                                      flags=flags)  # fmt: skip
            if flags & _F_INDIRECT:
                at = "nested" if nested else "head" if seen == 1 else "inside"
                table, size = self._indirect(mem, index, (addr, length, flags), at), length // 16
                base, index, seen, nested = 0, 0, 0, True
                continue
            if length == 0:
                raise DescriptorError(f"descriptor {index} has length 0", reason="zero_length",
                                      index=index)  # fmt: skip
            writable = bool(flags & _F_WRITE)
            if writable_seen and not writable:
                raise DescriptorError(f"descriptor {index} is device-readable after a "
                                      "device-writable one (virtio 1.2 2.7.4.2)",
                                      reason="readable_after_writable", index=index)  # fmt: skip
            writable_seen, total = writable, total + length
            if total >= _U32_LIMIT:
                raise DescriptorError(f"descriptor chain from head {head} is {total} bytes "
                                      "long; the limit is 2^32 - 1", reason="chain_too_large",
                                      head=head, total=total)  # fmt: skip
            spans.append((addr, length, writable))
            if not flags & _F_NEXT:
                break
            if nxt >= size:
                raise DescriptorError(f"descriptor {index} points to next {nxt}, past the "
                                      f"table of {size}", reason="next_out_of_range",
                                      index=index, next=nxt, size=size)  # fmt: skip
            index = nxt
        places = mem.find_gpas([(a, n) for a, n, _ in spans])
        return tuple(map(Descriptor._make, ((*s, p) for s, p in zip(spans, places, strict=True))))

    def _indirect(self, mem: GuestMemory, index: int, desc: tuple[int, int, int], at: str) -> bytes:
        """The indirect table descriptor ``index`` names (``desc``: address, length,
        flags; ``at``: where it stands: "head" of its chain, "inside" it, or "nested"
        in an indirect table), read whole once it is checked."""
        addr, length, flags = desc

        def bad(why: str, reason: str) -> DescriptorError:
            return DescriptorError(
                f"indirect descriptor {index}: {why}", reason=reason, index=index, length=length
            )

        if not self.indirect:
            raise bad("VIRTIO_F_INDIRECT_DESC was not negotiated", "indirect_not_negotiated")
        if at == "nested":
            raise bad("indirect tables may not nest (virtio 1.2 2.7.5.3.1)", "nested_indirect")
        if at != "head":
            raise bad("an indirect table must head its chain", "indirect_not_head")
        if flags & _F_NEXT:
            raise bad("INDIRECT and NEXT set together (virtio 1.2 2.7.5.3.1)", "indirect_next")
        if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
            raise bad(
                f"table length {length} is not a non-zero multiple of 16 of at most "
                f"{MAX_QUEUE_SIZE} entries",
                "bad_indirect_length",
            )
        if mem.find_gpa(addr, length) is None:
            raise bad(
                f"table at {addr:#x}+{length:#x} is outside guest memory", "indirect_outside_memory"
            )
        return mem.read_gpa(addr, length)

    # -- used side --------------------------------------------------------------
    def push(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return a chain to the guest with ``written`` bytes written into it."""
        if not 0 <= head < self.size:
            raise LocalProtocolError(f"push of head {head} on a queue of {self.size}")
        self._bind(mem)
        _write(self._used, 4 + 8 * (self.used_idx % self.size), _USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is written before the index that publishes it (2.7.8.2); stores
        # from one thread are not reordered on x86, and mmap writes are plain stores.
        _write(self._used, 2, _U16.pack(self.used_idx))

    def should_notify(self, mem: GuestMemory) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last one."""
        self._bind(mem)
        if not self.event_idx:
            return not _u16(self._avail, 0) & _AVAIL_F_NO_INTERRUPT
        old = self._signalled_used
        self._signalled_used = self.used_idx
        if old is None:
            return True
        used_event = _u16(self._avail, 4 + 2 * self.size)
        return need_event(used_event, self.used_idx, old)

    def complete(self, mem: GuestMemory, head: int, written: int = 0) -> bool:
        """``push`` and ``should_notify``: hand a chain back; whether to interrupt."""
        self.push(mem, head, written)
        return self.should_notify(mem)


class _NoAccess:
    """The areas of a queue not resolved in any memory yet."""

    buffer = None

    def read(self, offset: int, length: int) -> bytes:
        raise LocalProtocolError("a ring accessed before its memory was given")

    def write(self, offset: int, data: bytes) -> None:
        raise LocalProtocolError("a ring accessed before its memory was given")


_NO_ACCESS = _NoAccess()


@dataclass(frozen=True, slots=True)
class Readable:
    """What a device-readable buffer must be: whole ``unit``-byte entries, at most
    ``limit`` bytes; ``what`` names it in errors, which are ``error`` with the reasons
    ``{prefix}_bad_length``, ``{prefix}_writable`` and ``{prefix}_outside_ram``."""

    what: str
    unit: int
    limit: int
    error: type[RemoteProtocolError]
    prefix: str


def read_readable(chain: Chain, mem: GuestMemory, rule: Readable) -> bytes:
    """The bytes of a device-readable buffer as ``rule`` says it must be, every part
    inside guest RAM, or ``rule.error``. The bytes are copied once, so the guest
    cannot change them under the caller."""
    total = chain.total_length
    if total > rule.limit or total % rule.unit:
        raise rule.error(
            f"{rule.what} of {total} bytes is not whole {rule.unit}-byte entries of at most "
            f"{rule.limit} bytes",
            reason=f"{rule.prefix}_bad_length",
            length=total,
        )
    data = bytearray()
    for i, d in enumerate(chain.descriptors):
        if d.writable:
            raise rule.error(
                f"{rule.what} part {i} is device-writable; it must be device-readable",
                reason=f"{rule.prefix}_writable",
                entry=i,
            )
        if d.location is None:
            raise rule.error(
                f"{rule.what} part {i} at {d.addr:#x}+{d.length:#x} is outside guest RAM",
                reason=f"{rule.prefix}_outside_ram",
                entry=i,
            )
        data += mem.read_gpa(d.addr, d.length)
    return bytes(data)
