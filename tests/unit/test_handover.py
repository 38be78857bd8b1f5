"""The hand-over pieces on their own: saved-state slots, fd names, the keeper's books."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_user_balloon.daemon.handover import (
    STATE_SLOT_BYTES,
    FdStore,
    StateFile,
    VmKeeper,
    fd_name,
    parse_fd_name,
    stored_vms,
)
from vhost_user_balloon.daemon.syscalls import same_open_file
from vhost_user_balloon.daemon.systemd import Notifier


def test_state_survives_a_write_torn_in_the_middle() -> None:
    state = StateFile.create("web1")
    try:
        state.write({"n": 1})
        state.write({"n": 2})
        assert StateFile(state.fd).read() == {"n": 2}
        # The process dies halfway through writing record 3: its slot is garbage,
        # and the reader falls back to the other slot, record 2.
        slot = (state.seq + 1) % 2
        os.pwrite(state.fd, b"VUBS" + b"\xff" * 40, slot * STATE_SLOT_BYTES)
        assert StateFile(state.fd).read() == {"n": 2}
        # The next process goes on numbering after what it read.
        reader = StateFile(state.fd)
        assert reader.read() == {"n": 2}
        reader.write({"n": 3})
        assert StateFile(state.fd).read() == {"n": 3}
    finally:
        os.close(state.fd)


def test_an_empty_or_foreign_state_file_reads_as_none() -> None:
    fd = os.memfd_create("x")
    try:
        assert StateFile(fd).read() is None
        os.write(fd, b"not a state file at all" * 100)
        assert StateFile(fd).read() is None
    finally:
        os.close(fd)


def test_a_state_too_big_for_a_slot_is_refused() -> None:
    state = StateFile.create("web1")
    try:
        with pytest.raises(ValueError, match="does not fit"):
            state.write({"x": "y" * STATE_SLOT_BYTES})
    finally:
        os.close(state.fd)


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("vub.web1.conn", ("web1", "conn")),
        ("vub.db.eu-west.1.17", ("db.eu-west.1", "17")),  # VM names may have dots
        ("vub.web1.listen", ("web1", "listen")),
        ("web1", None),  # socket activation: the .socket unit's FileDescriptorName=
        ("vub.web1.other", None),
        ("vub..conn", None),
        ("vub.conn", None),
    ],
)
def test_fd_names(name: str, parsed: tuple[str, str] | None) -> None:
    assert parse_fd_name(name) == parsed
    if parsed is not None:
        assert fd_name(*parsed) == name


def test_stored_fds_are_sorted_by_vm_and_the_rest_left_for_socket_activation() -> None:
    inherited = {"vub.a.conn": 3, "vub.a.7": 4, "web2": 5, "vub.b.state": 6}
    stored = stored_vms(inherited)
    assert inherited == {"web2": 5}
    assert {vm: s.fds for vm, s in stored.items()} == {
        "a": {"vub.a.conn": 3, "vub.a.7": 4},
        "b": {"vub.b.state": 6},
    }
    assert stored["a"].take("conn") == 3 and stored["a"].take("state") is None


class Recorder:
    """The keeper's end of sd_notify, for the books: what was stored and removed."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        self.kept: dict[str, list[int]] = {}

    def read(self) -> list[str]:
        lines = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return lines
            text = data.decode()
            lines.append(text)
            fields = dict(f.partition("=")[::2] for f in text.split("\n"))
            fds = array.array("i")
            for _, _, payload in anc:
                fds.frombytes(payload)
            if "FDSTORE" in fields:
                self.kept.setdefault(fields["FDNAME"], []).extend(fds)
            if "FDSTOREREMOVE" in fields:
                for fd in self.kept.pop(fields["FDNAME"]):
                    os.close(fd)


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    r = Recorder(tmp_path / "notify")
    yield r
    for fds in r.kept.values():
        for fd in fds:
            os.close(fd)
    r.sock.close()


def test_one_open_file_sent_twice_is_stored_once(recorder: Recorder) -> None:
    """QEMU sends one memfd for both RAM regions of a big guest; systemd would keep
    only one copy, so the keeper's books must name it once."""
    keeper = VmKeeper.start(FdStore(recorder.notifier, enabled=True), "web1")
    memfd = os.memfd_create("ram")
    again = os.dup(memfd)  # what SCM_RIGHTS makes of the same fd sent twice
    other = os.eventfd(0)
    try:
        first = keeper.keep(memfd)
        assert keeper.keep(again) == first
        assert keeper.keep(other) != first
        keeper.save({"regions": [first]}, [first])  # `other` is no longer named
        recorder.read()
        assert set(recorder.kept) == {"vub.web1.state", first}
        assert same_open_file(recorder.kept[first][0], memfd)
        # A new process takes the books over and numbers new fds after the ones kept.
        successor = VmKeeper(keeper.store, "web1", StateFile(keeper.state.fd))
        for name, fds in recorder.kept.items():
            successor.adopt(name, os.dup(fds[0]))
        assert successor.keep(memfd) == first
        newer = successor.keep(other)
        recorder.read()
        assert newer != first and sorted(recorder.kept) == sorted([first, newer, "vub.web1.state"])
        successor.release_all()
        recorder.read()
        assert recorder.kept == {}
        keeper.close()
    finally:
        for fd in (memfd, again, other):
            os.close(fd)


def test_without_a_keeper_nothing_is_stored(tmp_path: Path) -> None:
    assert not FdStore(Notifier({}), enabled=True).enabled
    assert not FdStore(Notifier({"NOTIFY_SOCKET": str(tmp_path / "x")}), enabled=False).enabled
