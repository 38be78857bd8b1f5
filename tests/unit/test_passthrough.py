"""The passthrough check looks at a real process's open files.

No VFIO device exists on these machines, so the check is pointed at a marker of the
test's own (a file under a temporary folder instead of /dev/vfio/): the process it
reads, /proc/PID/fd, the readlink of each fd, and the rate limit are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from vhost_user_balloon.daemon.serving.passthrough import VFIO_MARKERS, PeerScans, PinWatch, scan


@pytest.fixture
def vfio(tmp_path: Path) -> Path:
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "12").write_text("")
    return tmp_path / "vfio"


class Holder:
    """A process that holds the marker file open, as QEMU would hold /dev/vfio/12,
    until told to close it."""

    def __init__(self, path: Path) -> None:
        code = (
            "import sys, time; f = open(sys.argv[1]); print(flush=True); sys.stdin.readline(); "
            "f.close(); print(flush=True); time.sleep(60)"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # opened

    def close_file(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holder(vfio: Path) -> Iterator[Holder]:
    h = Holder(vfio / "12")
    yield h
    h.end()


def test_a_process_holding_the_marker_is_found(vfio: Path, holder: Holder) -> None:
    found = scan(holder.pid, (f"{vfio}/",))
    assert found.devices == (str(vfio / "12"),) and found.unavailable is None
    exact = scan(holder.pid, (str(vfio / "12"),))  # a marker without "/" is a whole name
    assert exact.devices == (str(vfio / "12"),)
    assert scan(holder.pid, (str(vfio / "1"),)).devices == ()


def test_the_real_markers_find_nothing_in_a_process_without_vfio(
    holder: Holder,
) -> None:
    assert VFIO_MARKERS == ("/dev/vfio/", "/dev/iommu", "anon_inode:[vfio-device]")
    assert scan(holder.pid) == scan(holder.pid, VFIO_MARKERS)
    assert scan(holder.pid).devices == () and scan(holder.pid).unavailable is None


def test_why_a_check_cannot_be_made() -> None:
    assert "pid namespace" in str(scan(0).unavailable)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert "No such file" in str(scan(gone.pid).unavailable)
    # Another user's process (this one, seen by a child that became nobody) is not
    # readable without CAP_SYS_PTRACE.
    parent = os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(write_end, str(scan(parent).unavailable).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        why = f.read()
    os.waitpid(child, 0)
    assert "not readable" in why and "CAP_SYS_PTRACE" in why, why


def test_connections_of_one_process_share_its_looks(vfio: Path, holder: Holder) -> None:
    """256 VMs behind one frontend process must not mean 256 looks a second at its fds."""
    now = [100.0]
    scans = PeerScans((f"{vfio}/",), clock=lambda: now[0])
    watches = [PinWatch(f"vm{i}", holder.pid, scans) for i in range(3)]
    assert all(w.check() for w in watches)
    holder.close_file()
    assert all(w.check() for w in watches)  # the same look, under a second old
    now[0] += 1.0
    assert not any(w.check() for w in watches)


def test_a_watch_looks_again_at_most_once_a_second_and_logs_each_change(
    vfio: Path, holder: Holder
) -> None:
    now = [100.0]
    watch = PinWatch("vm", holder.pid, PeerScans((f"{vfio}/",), clock=lambda: now[0]))
    other = PinWatch("vm", holder.pid, PeerScans((f"{vfio}/x",), clock=lambda: now[0]))
    with structlog.testing.capture_logs() as logs:
        assert watch.check() and not other.check()
        holder.close_file()
        now[0] += 0.5
        assert watch.check()  # not looked at again yet
        now[0] += 0.6
        assert not watch.check()  # the device is gone
        holder.end()
        now[0] += 5
        assert not watch.check()  # the process is gone
        now[0] += 5
        assert not watch.check()
    events = [(e["event"], e.get("why", "")) for e in logs]
    assert events[:2] == [("passthrough_detected", ""), ("passthrough_gone", "")]
    assert events[2][0] == "passthrough_check_unavailable" and "No such file" in events[2][1]
    assert len(events) == 3  # nothing logged while nothing changes
