"""The balloon's statistics queue (virtio 1.2 5.5.6.3): what the guest says about its memory.

The guest posts one device-readable buffer of ``struct virtio_balloon_stat`` entries
(tag le16, value le64: 10 bytes each, packed). The device keeps the buffer; handing it
back (used ring) asks the guest for fresh numbers, and the guest posts it again,
refilled. Every tag the guest sends is kept, known or not: a newer guest may send tags
this code has never heard of.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from .errors import StatsError
from .memory import GuestMemory
from .virtqueue import Chain, Readable, read_readable

__all__ = ["MAX_STATS_BYTES", "STAT_SIZE", "BalloonStat", "read_stats"]

#: One entry: tag le16 + value le64, packed (the struct is __attribute__((packed))).
STAT_SIZE = 10
#: Largest stats buffer we read. Linux sends 16 tags (160 bytes) today; this leaves room
#: for many more and bounds what a guest can make us copy (Firecracker PR #5794 is what
#: an unbounded stats length costs).
MAX_STATS_BYTES = 4096

_STAT = struct.Struct("<HQ")
_STATS_BUFFER = Readable("stats buffer", STAT_SIZE, MAX_STATS_BYTES, StatsError, "stats")


class BalloonStat(IntEnum):
    """Statistics tags (virtio 1.2 5.5.6.3, and QEMU's include/standard-headers)."""

    SWAP_IN = 0  #: VIRTIO_BALLOON_S_SWAP_IN: bytes swapped in
    SWAP_OUT = 1  #: VIRTIO_BALLOON_S_SWAP_OUT: bytes swapped out
    MAJFLT = 2  #: VIRTIO_BALLOON_S_MAJFLT: major page faults
    MINFLT = 3  #: VIRTIO_BALLOON_S_MINFLT: minor page faults
    MEMFREE = 4  #: VIRTIO_BALLOON_S_MEMFREE: free memory, bytes
    MEMTOT = 5  #: VIRTIO_BALLOON_S_MEMTOT: total memory, bytes
    AVAIL = 6  #: VIRTIO_BALLOON_S_AVAIL: available memory estimate, bytes
    CACHES = 7  #: VIRTIO_BALLOON_S_CACHES: disk caches, bytes
    HTLB_PGALLOC = 8  #: VIRTIO_BALLOON_S_HTLB_PGALLOC: hugetlb page allocations
    HTLB_PGFAIL = 9  #: VIRTIO_BALLOON_S_HTLB_PGFAIL: hugetlb allocation failures
    OOM_KILL = 10  #: VIRTIO_BALLOON_S_OOM_KILL: OOM killer invocations
    ALLOC_STALL = 11  #: VIRTIO_BALLOON_S_ALLOC_STALL: allocation stalls
    ASYNC_SCAN = 12  #: VIRTIO_BALLOON_S_ASYNC_SCAN: pages scanned by kswapd
    DIRECT_SCAN = 13  #: VIRTIO_BALLOON_S_DIRECT_SCAN: pages scanned directly
    ASYNC_RECLAIM = 14  #: VIRTIO_BALLOON_S_ASYNC_RECLAIM: pages reclaimed by kswapd
    DIRECT_RECLAIM = 15  #: VIRTIO_BALLOON_S_DIRECT_RECLAIM: pages reclaimed directly


def read_stats(chain: Chain, mem: GuestMemory) -> tuple[tuple[int, int], ...]:
    """The (tag, value) pairs in a stats buffer, or ``StatsError`` if it is malformed:
    a device-writable part, a part outside guest RAM, a length that is not whole
    entries, or more than MAX_STATS_BYTES."""
    data = read_readable(chain, mem, _STATS_BUFFER)
    return tuple(_STAT.unpack_from(data, off) for off in range(0, len(data), STAT_SIZE))
