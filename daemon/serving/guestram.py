"""Guest RAM as this process holds it: one shared mapping and one fd per region.

Theory of operation: QEMU hands us one fd per RAM region (a memfd or a hugetlbfs
file) with SET_MEM_TABLE. We map ``memory_size`` bytes of it from ``mmap_offset``,
MAP_SHARED, so we see the guest's rings as the guest writes them. Before mapping we
check that the file really holds the whole range: touching a mapping past the end of
its file raises SIGBUS, which would kill every VM this daemon serves.

A frontend could shrink the file after that check. QEMU seals its memfds against
shrinking (memory-backend-memfd, seal=on by default), and then we read and write
through the mapping. A file without that seal is read and written with
pread/pwrite instead, which fail cleanly past the end of the file. Hugetlbfs files
(memory-backend-file on /dev/hugepages is never sealed) do not support write(), so
such a region is read and written through /proc/self/mem at its mapping's address:
the kernel resolves the access like a page fault, and a page past the end of the
file is an EIO for that read instead of a SIGBUS for the whole daemon. Either way a
shrunk file costs that VM its connection (``region_truncated``), nothing more.

The fd stays open beside the mapping: discards are ``fallocate`` calls on it, and
``resident_bytes`` reads its allocated blocks, which is how much host memory the
guest's RAM really takes.
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import functools
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from vhost_user_balloon.protocol import GuestMemory, MemoryRegion, MemoryTableError

from ..linux.fds import close_fds

__all__ = ["MappedRegion", "VmMemory"]

log = structlog.get_logger()


class RegionIo(enum.Enum):
    """How a region's bytes are read and written."""

    MAP = "map"  #: through the mapping: the file is sealed against shrinking
    FILE = "file"  #: pread/pwrite on the fd: unsealed, and the file system supports them
    PROC_MEM = "proc_mem"  #: pread/pwrite on /proc/self/mem: unsealed hugetlbfs


@functools.cache
def _proc_mem() -> int:
    """This process's memory as a file (opened once, kept for the process's life)."""
    return os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)


def _address(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts in this process's address space."""
    view = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # an exported buffer would keep the mmap from closing


def _seals(fd: int) -> int:
    """The file's seals (0 for files that cannot be sealed)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


def _checked_file(region: MemoryRegion, fd: int) -> os.stat_result:
    """The file behind a region: a regular file that holds the whole region (touching
    a mapping past the end of its file raises SIGBUS, which would kill every VM)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise MemoryTableError(
            f"memory region fd is not a regular file (mode {st.st_mode:#o}); guest RAM "
            "must be fd-backed and shared: memory-backend-memfd,share=on",
            reason="region_not_a_file",
        )
    end = region.mmap_offset + region.memory_size
    if st.st_size < end:
        raise MemoryTableError(
            f"memory region {region.guest_phys_addr:#x}+{region.memory_size:#x} needs "
            f"{end:#x} bytes of its file, which holds only {st.st_size:#x}",
            reason="region_beyond_file",
            file_size=st.st_size,
            needed=end,
        )
    return st


@dataclass(eq=False)
class MappedRegion:
    """One region mapped from its fd; implements ``protocol.MemoryAccess``."""

    region: MemoryRegion
    fd: int
    page_size: int
    file_id: tuple[int, int]
    _map: mmap.mmap
    #: how bytes are read and written (not through the map if the file may shrink)
    access: RegionIo = RegionIo.MAP
    #: the mapping's address, for RegionIo.PROC_MEM
    address: int = 0

    @classmethod
    def open(cls, region: MemoryRegion, fd: int) -> MappedRegion:
        """Map ``region`` from ``fd``. On failure the fd is left to the caller."""
        st = _checked_file(region, fd)
        page = max(st.st_blksize, mmap.PAGESIZE)
        if region.mmap_offset % page:
            raise MemoryTableError(
                f"memory region mmap_offset {region.mmap_offset:#x} is not a multiple of "
                f"the file's page size {page:#x}",
                reason="region_misaligned",
            )
        try:
            mapping = mmap.mmap(
                fd,
                region.memory_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=region.mmap_offset,
            )
        except OSError as err:
            raise MemoryTableError(
                f"cannot map memory region {region.guest_phys_addr:#x}+"
                f"{region.memory_size:#x}: {err.strerror}",
                reason="region_map_failed",
            ) from err
        if _seals(fd) & fcntl.F_SEAL_SHRINK:
            access, address = RegionIo.MAP, 0
        elif page == mmap.PAGESIZE:
            access, address = RegionIo.FILE, 0
        else:
            access, address = RegionIo.PROC_MEM, _address(mapping)
            log.info(
                "region_unsealed", gpa=region.guest_phys_addr, page_size=page,
                message="huge-page guest RAM not sealed against shrinking: read and "
                "written through /proc/self/mem, so that a truncation ends this VM's "
                "connection only",
            )  # fmt: skip
        return cls(region, fd, page, (st.st_dev, st.st_ino), mapping, access, address)

    @property
    def buffer(self) -> mmap.mmap | None:
        """The mapping, to be read and written in place, if the file cannot shrink."""
        return self._map if self.access is RegionIo.MAP else None

    def read(self, offset: int, length: int) -> bytes:
        if self.access is RegionIo.MAP:
            return self._map[offset : offset + length]
        fd, at = self._where(offset)
        try:
            data = os.pread(fd, length, at)
        except OSError as err:
            raise self._truncated(offset, length) from err
        if len(data) != length:
            raise self._truncated(offset, length)
        return data

    def write(self, offset: int, data: bytes) -> None:
        if self.access is RegionIo.MAP:
            self._map[offset : offset + len(data)] = data
            return
        fd, at = self._where(offset)
        try:
            written = os.pwrite(fd, data, at)
        except OSError as err:
            raise self._truncated(offset, len(data)) from err
        if written != len(data):
            raise self._truncated(offset, len(data))

    def _where(self, offset: int) -> tuple[int, int]:
        """The file and position that hold byte ``offset`` of the region."""
        if self.access is RegionIo.FILE:
            return self.fd, self.region.mmap_offset + offset
        return _proc_mem(), self.address + offset

    def _truncated(self, offset: int, length: int) -> MemoryTableError:
        return MemoryTableError(
            f"guest RAM file no longer holds region {self.region.guest_phys_addr:#x} "
            f"offset {offset:#x}+{length:#x}: the frontend shrank it",
            reason="region_truncated",
        )

    def close(self) -> None:
        self._map.close()
        close_fds([self.fd])


class VmMemory:
    """All regions of one VM: the checked ``GuestMemory`` plus the mappings behind it."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []
        #: ``regions`` in the order of ``memory.regions``.
        self.by_index: list[MappedRegion] = []
        self.memory: GuestMemory | None = None

    def replace(self, memory: GuestMemory, fds: Sequence[int]) -> None:
        """Map a whole new table; on failure nothing changes and ``fds`` stay the caller's."""
        mapped: list[MappedRegion] = []
        try:
            for region, fd in zip(memory.regions, fds, strict=True):
                mapped.append(MappedRegion.open(region, fd))
        except BaseException:
            for m in mapped:
                m._map.close()
            raise
        self.close()
        self.regions = mapped
        self._rebuild(memory)

    def add(self, region: MemoryRegion, fd: int, memory: GuestMemory) -> None:
        mapped = MappedRegion.open(region, fd)
        self.regions.append(mapped)
        self._rebuild(memory)

    def remove(self, region: MemoryRegion, memory: GuestMemory | None) -> None:
        for m in [m for m in self.regions if m.region == region]:
            m.close()
            self.regions.remove(m)
        self._rebuild(memory)

    def _rebuild(self, memory: GuestMemory | None) -> None:
        if memory is None:
            self.memory, self.by_index = None, []
            return
        by_region = {m.region: m for m in self.regions}
        self.by_index = [by_region[r] for r in memory.regions]
        self.memory = GuestMemory(memory.regions, self.by_index, limit=len(memory.regions))

    def backing(self, index: int) -> MappedRegion:
        """The mapping behind region ``index`` of ``memory`` (as a ``Location`` names it)."""
        return self.by_index[index]

    @property
    def ram_bytes(self) -> int:
        return sum(m.region.memory_size for m in self.regions)

    def resident_bytes(self) -> int:
        """Host memory the guest RAM files hold now (each file counted once)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for m in self.regions:
            if m.file_id in seen:
                continue
            seen.add(m.file_id)
            try:
                total += os.fstat(m.fd).st_blocks * 512
            except OSError:
                continue
        return total

    def close(self) -> None:
        for m in self.regions:
            m.close()
        self.regions = []
        self._rebuild(None)
