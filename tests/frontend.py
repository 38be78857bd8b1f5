"""A vhost-user frontend in Python that plays QEMU 11.1.3's part, for integration tests.

It talks to the real daemon over a real AF_UNIX socket, passes a real memfd as
guest RAM and real eventfds with SCM_RIGHTS, and follows the message sequence
measured from QEMU 11.1.3 (docs/facts.md section 1, tests/captures). The guest's side
of the rings is ``fakes.DriverRing`` writing into the same memfd the daemon maps.
It exists for speed and fault injection; the real QEMU is in tests/e2e.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from tests.fakes import UVA_BASE, DriverRing, GuestRam, RamRegion
from vhost_user_balloon.protocol import (
    U64,
    Config,
    Empty,
    MemoryRegion,
    MemoryRegionMsg,
    MemoryTable,
    Payload,
    Request,
    VringFile,
    VringState,
    encode_message,
)

MiB = 1 << 20
PAGE = 4096
#: What QEMU 11.1.3 acks with our default offer (reporting-stats capture + PAGE_POISON off).
QEMU_FEATURES = 0x1_4000_0022
QEMU_PROTOCOL = 0x208


class MmapSlice:
    """A window of an mmap that behaves like a bytearray (without pinning the mmap)."""

    def __init__(self, m: mmap.mmap, offset: int, size: int) -> None:
        self.m, self.offset, self.size = m, offset, size

    def _abs(self, index: slice) -> slice:
        start, stop, _ = index.indices(self.size)
        return slice(self.offset + start, self.offset + stop)

    def __getitem__(self, index: slice) -> bytes:
        return self.m[self._abs(index)]

    def __setitem__(self, index: slice, value: bytes) -> None:
        self.m[self._abs(index)] = value

    def __len__(self) -> int:
        return self.size


class GuestMemfd:
    """Guest RAM: one memfd mapped here; regions are slices of it at given gpas."""

    def __init__(
        self,
        size: int,
        layout: Sequence[tuple[int, int, int]] | None = None,
        *,
        sealed: bool = True,
        hugetlb: bool = False,
    ) -> None:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if hugetlb else 0)
        self.fd = os.memfd_create("guest-ram", flags)
        os.ftruncate(self.fd, size)
        if sealed:  # as QEMU's memory-backend-memfd does by default
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        #: (gpa, size, file offset) of each region; default: one region of all of it
        self.layout = list(layout or [(0, size, 0)])
        regions = []
        for gpa, rsize, off in self.layout:
            regions.append(RamRegion(gpa, MmapSlice(self.map, off, rsize), off))
        self.ram = GuestRam(regions)

    def memory_regions(self) -> tuple[MemoryRegion, ...]:
        return self.ram.memory_regions()

    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def populate(self, gpa: int, length: int, byte: int = 0xA5) -> None:
        self.ram.write(gpa, bytes([byte]) * length)

    def file_page_present(self, file_offset: int) -> bool:
        """Whether one page of the file holds data (SEEK_DATA lands on it)."""
        try:
            return os.lseek(self.fd, file_offset, os.SEEK_DATA) == file_offset
        except OSError:
            return False

    def close(self) -> None:
        self.ram.regions.clear()
        self.map.close()
        os.close(self.fd)


@dataclass
class QueueFds:
    kick: int = field(default_factory=lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    call: int = field(default_factory=lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    err: int = field(default_factory=lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


class FakeFrontend:
    """QEMU's side of one vhost-user connection."""

    def __init__(self, sock: trio.socket.SocketType, guest: GuestMemfd, num_vqs: int = 5) -> None:
        self.sock = sock
        self.guest = guest
        self.fds = [QueueFds() for _ in range(num_vqs)]
        self.rings: dict[int, DriverRing] = {}

    @classmethod
    async def connect(cls, path: str, guest: GuestMemfd, num_vqs: int = 5) -> FakeFrontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock, guest, num_vqs)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = await self.sock.sendmsg([data], anc if fds else [])
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    async def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"daemon closed the connection ({len(buf)}/{n} bytes read)")
            buf += chunk
        return buf

    async def request(
        self,
        request: Request,
        payload: Payload | None = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        expect_reply: bool = False,
    ) -> bytes | None:
        """Send one message; return the reply payload if one is expected."""
        await self.send_raw(encode_message(request, payload or Empty(), need_reply=need_reply), fds)
        if not (need_reply or expect_reply):
            return None
        head = await self.recv_exact(12)
        req, flags, size = struct.unpack("=III", head)
        assert req == request and flags == 0x5, (req, flags)
        return await self.recv_exact(size)

    async def ack(
        self, request: Request, payload: Payload | None = None, fds: Sequence[int] = ()
    ) -> None:
        reply = await self.request(request, payload, fds, need_reply=True)
        assert reply == struct.pack("=Q", 0), f"{request.name} failed: {reply!r}"

    async def handshake(self, protocol: int = QEMU_PROTOCOL, backend_fd: int | None = None) -> int:
        """QEMU's first exchange; returns the features the backend offered. With
        ``backend_fd`` (and BACKEND_REQ in ``protocol``), the backend channel is set up
        where QEMU does it: after the protocol features, before SET_OWNER."""
        offered = await self.request(Request.GET_FEATURES, expect_reply=True)
        assert offered is not None
        await self.request(Request.GET_PROTOCOL_FEATURES, expect_reply=True)
        await self.request(Request.SET_PROTOCOL_FEATURES, U64(protocol))
        if backend_fd is not None:
            await self.ack(Request.SET_BACKEND_REQ_FD, Empty(), [backend_fd])
        await self.request(Request.SET_OWNER)
        await self.request(Request.GET_FEATURES, expect_reply=True)
        for i, q in enumerate(self.fds):
            await self.ack(Request.SET_VRING_CALL, VringFile(i, False), [q.call])
            await self.ack(Request.SET_VRING_ERR, VringFile(i, False), [q.err])
        return int(struct.unpack("=Q", offered)[0])

    async def start(
        self,
        features: int = QEMU_FEATURES,
        queues: Sequence[int] = (0, 1, 2, 3),
        ring_base: int = 0x1000,
        size: int = 64,
        *,
        mapped: int | None = None,
    ) -> None:
        """The guest's DRIVER_OK: features, memory table, rings, enable, config read.
        With ``mapped``, only the first ``mapped`` regions of the guest's layout are in
        the table (the others can come later with ``add_region``)."""
        await self.request(Request.SET_FEATURES, U64(features))
        regions = self.guest.memory_regions()[:mapped]
        await self.ack(Request.SET_MEM_TABLE, MemoryTable(regions), [self.guest.fd] * len(regions))
        for i in queues:
            ring = DriverRing(self.guest.ram, ring_base + i * 0x2000, size, index=i)
            self.rings[i] = ring
            await self.request(Request.SET_VRING_NUM, VringState(i, size))
            await self.request(Request.SET_VRING_BASE, VringState(i, 0))
            await self.request(Request.SET_VRING_ADDR, ring.vring_addr())
            await self.ack(Request.SET_VRING_KICK, VringFile(i, False), [self.fds[i].kick])
            await self.ack(Request.SET_VRING_CALL, VringFile(i, False), [self.fds[i].call])
        for i in range(len(self.fds)):
            await self.ack(Request.SET_VRING_ENABLE, VringState(i, 1))
        await self.get_config()

    async def get_config(self) -> bytes:
        reply = await self.request(
            Request.GET_CONFIG, Config(0, 16, 0, bytes(16)), expect_reply=True
        )
        assert reply is not None
        return reply[12:]

    async def stop(self) -> list[int]:
        """The guest's reset: disable all, then GET_VRING_BASE for each started queue."""
        for i in range(len(self.fds)):
            await self.ack(Request.SET_VRING_ENABLE, VringState(i, 0))
        bases = []
        for i in sorted(self.rings):
            reply = await self.request(Request.GET_VRING_BASE, VringState(i, 0), expect_reply=True)
            assert reply is not None
            bases.append(struct.unpack("=II", reply)[1])
        return bases

    async def add_region(self, i: int) -> None:
        """ADD_MEM_REG for region ``i`` of the guest's layout (CONFIGURE_MEM_SLOTS)."""
        region = self.guest.memory_regions()[i]
        await self.ack(Request.ADD_MEM_REG, MemoryRegionMsg(region), [self.guest.fd])

    async def remove_region(self, i: int) -> None:
        """REM_MEM_REG for region ``i`` of the guest's layout, as QEMU sends it (no fd)."""
        await self.ack(Request.REM_MEM_REG, MemoryRegionMsg(self.guest.memory_regions()[i]))

    def kick(self, index: int) -> None:
        os.eventfd_write(self.fds[index].kick, 1)

    async def wait_call(self, index: int, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            await trio.lowlevel.wait_readable(self.fds[index].call)
        os.eventfd_read(self.fds[index].call)

    async def report(
        self, index: int, blocks: Sequence[tuple[int, int]], timeout: float = 5.0
    ) -> list[tuple[int, int]]:
        """Post one free page report of (gpa, length) blocks, kick, wait for it back.
        Like a driver, an interrupt that brings nothing back is spurious: wait again."""
        ring = self.rings[index]
        head = ring.add_chain([(gpa, length, True) for gpa, length in blocks])
        self.kick(index)
        used: list[tuple[int, int]] = []
        with trio.fail_after(timeout):
            while not used:
                await self.wait_call(index, timeout)
                used = ring.take_used()
        assert (head, 0) in used, used
        return used

    async def aclose(self) -> None:
        self.sock.close()
        for q in self.fds:
            q.close()


def region_uva(gpa: int) -> int:
    return UVA_BASE + gpa
