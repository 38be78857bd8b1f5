"""Split virtqueues (virtio 1.2 section 2.7): read the avail ring, walk chains, fill used.

Theory of operation: the guest owns every byte of the descriptor table and the avail
ring and may change them at any time, so nothing read from them is trusted. Each
read goes through ``GuestMemory`` (which checks the range) and each number read is
checked before it is used as an index:

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

from .codes import MAX_QUEUE_SIZE
from .errors import (
    DescriptorError,
    LocalProtocolError,
    QueueError,
    RemoteProtocolError,
    RingError,
)
from .memory import GuestMemory, Location

__all__ = [
    "Chain",
    "DescFlag",
    "Descriptor",
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


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One buffer of a chain; ``location`` is None when it is not inside one region."""

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


class SplitQueue:
    """Position and geometry of one split ring; guest memory is passed to each call."""

    def __init__(
        self,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        last_avail_idx: int = 0,
        indirect: bool = False,
        event_idx: bool = False,
    ) -> None:
        self.size = check_queue_size(size)
        for name, addr, align in (
            ("descriptor table", desc_addr, 16),
            ("avail ring", avail_addr, 2),
            ("used ring", used_addr, 4),
        ):
            if addr % align:
                raise QueueError(
                    f"{name} address {addr:#x} is not {align}-byte aligned (virtio 1.2 2.7)",
                    reason="misaligned_ring",
                    ring=name,
                    addr=addr,
                )
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.indirect = indirect
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = 0
        self._signalled_used: int | None = None

    # -- layout -----------------------------------------------------------------
    def ring_extents(self) -> tuple[tuple[str, int, int], ...]:
        """(name, QEMU user address, length) of the three ring areas."""
        extra = 2 if self.event_idx else 0
        return (
            ("descriptor table", self.desc_addr, 16 * self.size),
            ("avail ring", self.avail_addr, 4 + 2 * self.size + extra),
            ("used ring", self.used_addr, 4 + 8 * self.size + extra),
        )

    def check_layout(self, mem: GuestMemory) -> None:
        """``QueueError`` unless all three ring areas lie inside guest memory regions."""
        for name, addr, length in self.ring_extents():
            if mem.find_uva(addr, length) is None:
                raise QueueError(
                    f"{name} at user address {addr:#x}+{length:#x} is not inside one "
                    "guest memory region",
                    reason="ring_outside_memory",
                    ring=name,
                    addr=addr,
                    length=length,
                )

    def load_used_index(self, mem: GuestMemory) -> None:
        """Resume from the used index the ring holds (0 on a fresh ring)."""
        self.used_idx = _U16.unpack(mem.read_uva(self.used_addr + 2, 2))[0]

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
        return int(_U16.unpack(mem.read_uva(self.avail_addr + 2, 2))[0])

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
        slot = self.avail_addr + 4 + 2 * (self.last_avail_idx % self.size)
        head = _U16.unpack(mem.read_uva(slot, 2))[0]
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
            avail_event = self.used_addr + 4 + 8 * self.size
            mem.write_uva(avail_event, _U16.pack(self.last_avail_idx))
        return chain

    def _walk(self, mem: GuestMemory, head: int) -> tuple[Descriptor, ...]:
        # One loop on purpose (longer than our usual functions): it is the hot path of
        # every report, and each check stands next to the read it guards.
        table_gpa: int | None = None  # None: the ring's own table, by user address
        table_size = self.size
        # The descriptor table read once (a snapshot the guest cannot change halfway),
        # or None: too big to copy, each descriptor is read from the ring as it comes.
        table: bytes | None = None
        if 16 * table_size <= _SNAPSHOT_BYTES:
            table = mem.read_uva(self.desc_addr, 16 * table_size)
        index = head
        seen = 0
        out: list[Descriptor] = []
        total = 0
        writable_seen = False
        while True:
            if seen >= table_size:
                raise DescriptorError(
                    f"descriptor chain from head {head} visits more than {table_size} "
                    "descriptors: it loops",
                    reason="chain_loop",
                    head=head,
                    limit=table_size,
                )
            seen += 1
            if table is not None:
                addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            else:
                addr, length, flags, nxt = _DESC.unpack(
                    mem.read_uva(self.desc_addr + 16 * index, 16)
                )
            if flags & ~_ALL_FLAGS:
                raise DescriptorError(
                    f"descriptor {index} has unknown flag bits {flags:#x}",
                    reason="bad_descriptor_flags",
                    index=index,
                    flags=flags,
                )
            if flags & _F_INDIRECT:
                table_gpa, table_size = self._indirect(
                    mem,
                    addr,
                    length,
                    flags=flags,
                    index=index,
                    first=seen == 1,
                    nested=table_gpa is not None,
                )
                # The whole indirect table, once: in guest RAM, checked by _indirect.
                table = mem.read_gpa(table_gpa, 16 * table_size)
                index, seen = 0, 0
                continue
            if length == 0:
                raise DescriptorError(
                    f"descriptor {index} has length 0", reason="zero_length", index=index
                )
            writable = bool(flags & _F_WRITE)
            if writable_seen and not writable:
                raise DescriptorError(
                    f"descriptor {index} is device-readable after a device-writable one "
                    "(virtio 1.2 2.7.4.2)",
                    reason="readable_after_writable",
                    index=index,
                )
            writable_seen = writable
            total += length
            if total >= _U32_LIMIT:
                raise DescriptorError(
                    f"descriptor chain from head {head} is {total} bytes long; "
                    "the limit is 2^32 - 1",
                    reason="chain_too_large",
                    head=head,
                    total=total,
                )
            out.append(Descriptor(addr, length, writable, mem.find_gpa(addr, length)))
            if not flags & _F_NEXT:
                return tuple(out)
            if nxt >= table_size:
                raise DescriptorError(
                    f"descriptor {index} points to next {nxt}, past the table of {table_size}",
                    reason="next_out_of_range",
                    index=index,
                    next=nxt,
                    size=table_size,
                )
            index = nxt

    def _indirect(
        self,
        mem: GuestMemory,
        addr: int,
        length: int,
        *,
        flags: int,
        index: int,
        first: bool,
        nested: bool,
    ) -> tuple[int, int]:
        def bad(why: str, reason: str) -> DescriptorError:
            return DescriptorError(
                f"indirect descriptor {index}: {why}", reason=reason, index=index, length=length
            )

        if not self.indirect:
            raise bad("VIRTIO_F_INDIRECT_DESC was not negotiated", "indirect_not_negotiated")
        if nested:
            raise bad("indirect tables may not nest (virtio 1.2 2.7.5.3.1)", "nested_indirect")
        if not first:
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
        return addr, length // 16

    # -- used side --------------------------------------------------------------
    def push(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return a chain to the guest with ``written`` bytes written into it."""
        if not 0 <= head < self.size:
            raise LocalProtocolError(f"push of head {head} on a queue of {self.size}")
        slot = self.used_addr + 4 + 8 * (self.used_idx % self.size)
        mem.write_uva(slot, _USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is written before the index that publishes it (2.7.8.2); stores
        # from one thread are not reordered on x86, and mmap writes are plain stores.
        mem.write_uva(self.used_addr + 2, _U16.pack(self.used_idx))

    def should_notify(self, mem: GuestMemory) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last one."""
        if not self.event_idx:
            flags = _U16.unpack(mem.read_uva(self.avail_addr, 2))[0]
            return not flags & _AVAIL_F_NO_INTERRUPT
        old = self._signalled_used
        self._signalled_used = self.used_idx
        if old is None:
            return True
        used_event = _U16.unpack(mem.read_uva(self.avail_addr + 4 + 2 * self.size, 2))[0]
        return need_event(used_event, self.used_idx, old)


def read_readable(
    chain: Chain,
    mem: GuestMemory,
    *,
    what: str,
    unit: int,
    limit: int,
    error: type[RemoteProtocolError],
    prefix: str,
) -> bytes:
    """The bytes of a device-readable buffer made of whole ``unit``-byte entries, at most
    ``limit`` bytes, every part inside guest RAM. Otherwise ``error`` with the reason
    ``{prefix}_bad_length``, ``{prefix}_writable`` or ``{prefix}_outside_ram``. The bytes
    are copied once, so the guest cannot change them under the caller."""
    total = chain.total_length
    if total > limit or total % unit:
        raise error(
            f"{what} of {total} bytes is not whole {unit}-byte entries of at most {limit} bytes",
            reason=f"{prefix}_bad_length",
            length=total,
        )
    data = bytearray()
    for i, d in enumerate(chain.descriptors):
        if d.writable:
            raise error(
                f"{what} part {i} is device-writable; it must be device-readable",
                reason=f"{prefix}_writable",
                entry=i,
            )
        if d.location is None:
            raise error(
                f"{what} part {i} at {d.addr:#x}+{d.length:#x} is outside guest RAM",
                reason=f"{prefix}_outside_ram",
                entry=i,
            )
        data += mem.read_gpa(d.addr, d.length)
    return bytes(data)
