"""Who may connect: socket permissions and group, peer credentials, the socket directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon_helpers import sample, samples, settings_for
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.config import VmSpec
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.server import Daemon, StartupError


async def start(nursery: trio.Nursery, tmp_path: Path, **access: Any) -> Daemon:
    """A daemon serving VM "vm" with these access settings (fields of Settings)."""
    daemon = Daemon(settings_for([VmSpec("vm", tmp_path / "vm.sock")], **access), metrics=Metrics())
    await nursery.start(daemon.run)
    return daemon


async def test_peers_outside_the_allow_list_are_refused_and_counted(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    me = os.getuid()
    daemon = await start(nursery, tmp_path, allow_uids=frozenset({me + 4242}))
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        with pytest.raises((EOFError, OSError)):
            await fe.handshake()
        assert sample(daemon, "connections_refused_total", vm="vm", reason="peer_not_allowed") == 1
        out = capsys.readouterr().out
        assert "connection_refused" in out and f"peer_uid={me}" in out
    finally:
        await fe.aclose()
        guest.close()


async def test_allowed_peers_by_uid_or_gid_get_in(nursery: trio.Nursery, tmp_path: Path) -> None:
    daemon = await start(
        nursery, tmp_path, allow_uids=frozenset({4242}), allow_gids=frozenset({os.getgid()})
    )
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake()
        await fe.start()
        await fe.report(3, [(4 * MiB, 2 * MiB)])
        assert sample(daemon, "reports_total", vm="vm") == 1
        assert samples(daemon, "connections_refused_total", vm="vm") == {}
    finally:
        await fe.aclose()
        guest.close()


async def test_socket_mode_and_group(nursery: trio.Nursery, tmp_path: Path) -> None:
    gid = 100 if os.getgid() != 100 else 101
    daemon = await start(nursery, tmp_path, socket_mode=0o660, socket_gid=gid)
    st = os.stat(daemon.vms[0].socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid


async def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    daemon = Daemon(settings_for([VmSpec("vm", shared / "vm.sock")]), metrics=Metrics())
    with pytest.raises(StartupError, match="writable by other users"):
        await daemon.run()
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others cannot remove our socket
    daemon = Daemon(settings_for([VmSpec("vm", sticky / "vm.sock")]), metrics=Metrics())
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)  # it starts: the socket is there, listening
        assert stat.S_ISSOCK(os.stat(sticky / "vm.sock").st_mode)
        nursery.cancel_scope.cancel()


_PEER = """
import os, socket, struct, sys
primary, extra, path = int(sys.argv[1]), [int(g) for g in sys.argv[2].split(",") if g], sys.argv[3]
os.setgroups(extra)
os.setgid(primary)
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.settimeout(5)
try:
    s.sendall(struct.pack("=III", 1, 1, 0))  # GET_FEATURES
    print("answered" if len(s.recv(20)) == 20 else "refused")
except (BrokenPipeError, ConnectionResetError):
    print("refused")
"""


def peer(primary: int, supplementary: list[int], path: Path) -> str:
    """A process of this primary group and these supplementary groups (like QEMU under
    libvirt: group libvirt-qemu, and kvm besides) asks for the features."""
    done = subprocess.run(
        [sys.executable, "-c", _PEER, str(primary), ",".join(map(str, supplementary)), str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout.strip()


async def test_a_supplementary_group_is_allowed_like_a_primary_one(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libvirt runs QEMU as libvirt-qemu:libvirt-qemu with kvm as a supplementary group;
    allow_groups = ["kvm"] must let it in (SO_PEERGROUPS), and nobody else."""
    kvm, qemu_group, other = 4711, 4712, 4713
    daemon = await start(nursery, tmp_path, allow_gids=frozenset({kvm}))
    path = daemon.vms[0].socket
    assert await trio.to_thread.run_sync(peer, qemu_group, [kvm], path) == "answered"
    assert await trio.to_thread.run_sync(peer, kvm, [], path) == "answered"
    assert await trio.to_thread.run_sync(peer, qemu_group, [other], path) == "refused"
    assert sample(daemon, "connections_refused_total", vm="vm", reason="peer_not_allowed") == 1
    assert "peer_groups=[4713]" in capsys.readouterr().out
