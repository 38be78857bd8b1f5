"""Who may connect: socket permissions and group, peer credentials, the socket directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
from daemon_helpers import sample
from frontend import FakeFrontend, GuestMemfd, MiB

from vhost_user_balloon.daemon import Daemon, Metrics, StartupError, VmSpec
from vhost_user_balloon.daemon.config import Access


async def start(nursery: trio.Nursery, tmp_path: Path, access: Access) -> Daemon:
    daemon = Daemon([VmSpec("vm", tmp_path / "vm.sock")], metrics=Metrics(), access=access)
    await nursery.start(daemon.run)
    return daemon


async def test_peers_outside_the_allow_list_are_refused_and_counted(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    me = os.getuid()
    daemon = await start(nursery, tmp_path, Access(allow_uids=frozenset({me + 4242})))
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
        nursery, tmp_path, Access(allow_uids=frozenset({4242}), allow_gids=frozenset({os.getgid()}))
    )
    guest = GuestMemfd(16 * MiB)
    fe = await FakeFrontend.connect(str(daemon.vms[0].socket), guest)
    try:
        await fe.handshake()
        await fe.start()
        await fe.report(3, [(4 * MiB, 2 * MiB)])
    finally:
        await fe.aclose()
        guest.close()


async def test_socket_mode_and_group(nursery: trio.Nursery, tmp_path: Path) -> None:
    gid = 100 if os.getgid() != 100 else 101
    daemon = await start(nursery, tmp_path, Access(socket_mode=0o660, socket_gid=gid))
    st = os.stat(daemon.vms[0].socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid


async def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    daemon = Daemon([VmSpec("vm", shared / "vm.sock")], metrics=Metrics())
    with pytest.raises(StartupError, match="writable by other users"):
        await daemon.run()
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others cannot remove our socket
    daemon = Daemon([VmSpec("vm", sticky / "vm.sock")], metrics=Metrics())
    with trio.move_on_after(0.2):
        await daemon.run()
