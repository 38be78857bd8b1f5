"""Frontends other than QEMU, played with the message sequences their sources send.

Neither crosvm nor Cloud Hypervisor runs on these machines (both need KVM, and this
/dev/kvm cannot run guests), so a frontend here sends what their vhost-user frontend
code sends, in its order, over a real socket with a real memfd and eventfds:

- crosvm (``devices/src/virtio/vhost_user_frontend/mod.rs``): SET_OWNER first, the
  protocol features it allows (CONFIG, MQ, BACKEND_REQ, REPLY_ACK without ever
  setting NEED_REPLY), the backend channel, then GET_QUEUE_NUM: without MQ it gives a
  balloon 2 queues and the guest has no reporting queue. Config reads carry the
  WRITABLE flag. Each activated queue: NUM, ADDR, BASE, CALL, KICK, ENABLE; a reset
  disables each and asks GET_VRING_BASE.
- Cloud Hypervisor's generic device (``virtio-devices/src/vhost_user/
  generic_vhost_user.rs``, ``vu_common_ctrl.rs``): SET_OWNER first, then NEED_REPLY on
  every message once REPLY_ACK is negotiated; it refuses the device if GET_QUEUE_NUM is
  below the number of queue sizes it was given. At activation: SET_FEATURES, the
  memory table, SET_VRING_NUM for every queue, ADDR/BASE/CALL/KICK per queue, ENABLE
  for every queue, and only then the backend channel. Hot-plugged memory is an
  ADD_MEM_REG; a reset only disables the queues.
"""

from __future__ import annotations

import socket
import struct

import pytest

from tests.daemon_helpers import StartDaemon, connect, sample, samples
from tests.fakes import DriverRing
from tests.frontend import QEMU_FEATURES, FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.protocol import (
    U64,
    Config,
    Empty,
    MemoryTable,
    ProtocolFeature,
    Request,
    VringFile,
    VringState,
)

pytestmark = pytest.mark.trio

PROTOCOL_FEATURES_BIT = 1 << 30
CROSVM_ALLOWS = (
    ProtocolFeature.CONFIG
    | ProtocolFeature.MQ
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.DEVICE_STATE
    | ProtocolFeature.REPLY_ACK
)
CLOUD_HYPERVISOR_ALLOWS = (
    ProtocolFeature.CONFIG
    | ProtocolFeature.MQ
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.DEVICE_STATE
    | ProtocolFeature.BACKEND_REQ
)
#: The queues a guest with the daemon's default features activates.
ACTIVE_QUEUES = (0, 1, 2, 3)
#: VhostUserConfigFlags::WRITABLE
WRITABLE = 1


def u64(reply: bytes | None) -> int:
    assert reply is not None
    return int(struct.unpack("=Q", reply)[0])


async def negotiate(fe: FakeFrontend, allows: int, *, need_reply: bool) -> int:
    """SET_OWNER first, then features and protocol features, as both send them."""
    await fe.request(Request.SET_OWNER)
    offered = u64(await fe.request(Request.GET_FEATURES, expect_reply=True))
    assert offered & PROTOCOL_FEATURES_BIT
    theirs = u64(await fe.request(Request.GET_PROTOCOL_FEATURES, expect_reply=True))
    acked = allows & theirs
    await fe.request(Request.SET_PROTOCOL_FEATURES, U64(acked))
    assert acked & ProtocolFeature.MQ and acked & ProtocolFeature.CONFIG
    return u64(await fe.request(Request.GET_QUEUE_NUM, need_reply=need_reply, expect_reply=True))


async def set_up_ring(fe: FakeFrontend, i: int, *, need_reply: bool) -> None:
    ring = fe.rings[i]
    await fe.request(Request.SET_VRING_ADDR, ring.vring_addr(), need_reply=need_reply)
    await fe.request(Request.SET_VRING_BASE, VringState(i, 0), need_reply=need_reply)
    await fe.request(
        Request.SET_VRING_CALL, VringFile(i, False), [fe.fds[i].call], need_reply=need_reply
    )
    await fe.request(
        Request.SET_VRING_KICK, VringFile(i, False), [fe.fds[i].kick], need_reply=need_reply
    )


def make_rings(fe: FakeFrontend, guest: GuestMemfd) -> None:
    for i in ACTIVE_QUEUES:
        fe.rings[i] = DriverRing(guest.ram, 0x1000 + i * 0x2000, 64, index=i)


async def gives_memory_back(fe: FakeFrontend, guest: GuestMemfd, gpa: int = 4 * MiB) -> None:
    guest.populate(gpa, 4 * MiB)
    before = guest.allocated()
    await fe.report(3, [(gpa, 2 * MiB), (gpa + 2 * MiB, 2 * MiB)])
    assert before - guest.allocated() == 4 * MiB


async def test_crosvm_sequence(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("crosvm")
    guest = GuestMemfd(32 * MiB)
    guests.append(guest)
    fe = await connect(str(daemon.vms[0].socket), guest, frontends)
    queues = await negotiate(fe, CROSVM_ALLOWS, need_reply=False)
    assert queues == 5  # more than the 4 the guest uses: every queue a balloon can have
    backend, _ = socket.socketpair()
    await fe.request(Request.SET_BACKEND_REQ_FD, Empty(), [backend.fileno()])
    backend.close()
    # The guest reads the config while it probes (crosvm sets WRITABLE on reads).
    config = await fe.request(Request.GET_CONFIG, Config(0, 16, WRITABLE, bytes(16)),
                              expect_reply=True)  # fmt: skip
    assert config is not None and config[12:] == bytes(16)
    await fe.request(Request.SET_FEATURES, U64(QEMU_FEATURES))
    await fe.request(Request.SET_MEM_TABLE, MemoryTable(guest.memory_regions()), [guest.fd])
    make_rings(fe, guest)
    for i in ACTIVE_QUEUES:
        await fe.request(Request.SET_VRING_NUM, VringState(i, 64))
        await set_up_ring(fe, i, need_reply=False)
        await fe.request(Request.SET_VRING_ENABLE, VringState(i, 1))
    await gives_memory_back(fe, guest)
    # A reset (sleep, reboot): every queue disabled, then its base asked for.
    for i in ACTIVE_QUEUES:
        await fe.request(Request.SET_VRING_ENABLE, VringState(i, 0))
    for i in ACTIVE_QUEUES:
        base = await fe.request(Request.GET_VRING_BASE, VringState(i, 0), expect_reply=True)
        assert base is not None and struct.unpack("=II", base) == (i, 1 if i == 3 else 0)
    assert samples(daemon, "protocol_errors_total", vm="crosvm") == {}  # none of any reason
    assert sample(daemon, "connected", vm="crosvm") == 1


async def test_cloud_hypervisor_generic_device_sequence(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    daemon = await start_daemon("ch")
    guest = GuestMemfd(64 * MiB, [(0, 32 * MiB, 0), (1 << 32, 32 * MiB, 32 * MiB)])
    guests.append(guest)
    fe = await connect(str(daemon.vms[0].socket), guest, frontends)
    # From here on every message asks for a reply (REPLY_ACK negotiated).
    queues = await negotiate(fe, CLOUD_HYPERVISOR_ALLOWS, need_reply=True)
    assert queues >= 5  # --generic-vhost-user ...,queue_sizes=[64,64,64,64,64] is accepted
    config = await fe.request(Request.GET_CONFIG, Config(0, 16, 0, bytes(16)), need_reply=True)
    assert config is not None and config[12:] == bytes(16)
    await fe.ack(Request.SET_FEATURES, U64(QEMU_FEATURES))
    first = guest.memory_regions()[:1]
    await fe.ack(Request.SET_MEM_TABLE, MemoryTable(first), [guest.fd])
    make_rings(fe, guest)
    for i in ACTIVE_QUEUES:
        await fe.ack(Request.SET_VRING_NUM, VringState(i, 64))
    for i in ACTIVE_QUEUES:
        await set_up_ring(fe, i, need_reply=True)
    for i in ACTIVE_QUEUES:
        await fe.ack(Request.SET_VRING_ENABLE, VringState(i, 1))
    backend, _ = socket.socketpair()
    await fe.ack(Request.SET_BACKEND_REQ_FD, Empty(), [backend.fileno()])
    backend.close()
    await gives_memory_back(fe, guest)
    # Memory hot-plugged with `ch-remote resize --memory`: one more region.
    await fe.add_region(1)
    await gives_memory_back(fe, guest, gpa=(1 << 32) + 4 * MiB)
    # A reset only disables the queues; the next activation starts them again.
    for i in ACTIVE_QUEUES:
        await fe.ack(Request.SET_VRING_ENABLE, VringState(i, 0))
    assert samples(daemon, "protocol_errors_total", vm="ch") == {}  # none of any reason
    assert sample(daemon, "connected", vm="ch") == 1
