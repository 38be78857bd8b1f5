"""Whether a VM's QEMU holds a device that pins guest RAM for DMA (VFIO, iommufd).

Theory of operation: a guest with a passthrough device has its RAM pinned; the device
may write into any page at any time, through the page that was pinned. Punching a hole
in guest RAM then hands the guest a fresh page while the device keeps writing into the
old one: silent data corruption. QEMU's built-in balloon refuses to discard while such
a device exists. This daemon cannot look inside QEMU, so it looks at what QEMU holds
open: the peer's pid comes from the socket (SO_PEERCRED), and a QEMU using VFIO has a
VFIO container or group (``/dev/vfio/...``), an iommufd (``/dev/iommu``) or a VFIO
device fd (``anon_inode:[vfio-device]``) in ``/proc/PID/fd``.

The check runs when QEMU connects and again before a discard, at most once every
``RECHECK_SECONDS`` per QEMU process (a device can be hot-plugged), in the discard's
worker thread: a look is a readlink per open fd, which must not stall the event loop
when hundreds of VMs report. Connections from one process share its looks
(``PeerScans``). While it finds such an fd, reports and inflated pages are completed
without being discarded and counted under the reason ``vfio``. Each change is logged
once per VM. If the check cannot be made (the peer's pid is not visible, or
/proc/PID/fd is not readable: that needs QEMU's uid, or CAP_DAC_READ_SEARCH and
CAP_SYS_PTRACE), that is logged once and discarding goes on: ``--no-discard`` is for
what cannot be detected.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

__all__ = [
    "RECHECK_SECONDS",
    "VFIO_MARKERS",
    "PeerScans",
    "PinCheck",
    "PinWatch",
    "scan",
]

log = structlog.get_logger()

#: fd targets that mean a passthrough device: a prefix ends in "/", else an exact name.
VFIO_MARKERS = ("/dev/vfio/", "/dev/iommu", "anon_inode:[vfio-device]")
#: Most often a VM's fds are looked at while it reports.
RECHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PinCheck:
    """What one look at the peer's fds found."""

    #: the fd targets that mean a passthrough device (empty: none)
    devices: tuple[str, ...] = ()
    #: why the check could not be made (None: it was)
    unavailable: str | None = None


def _matches(target: str, markers: tuple[str, ...]) -> bool:
    return any(target.startswith(m) if m.endswith("/") else target == m for m in markers)


def scan(pid: int, markers: tuple[str, ...] = VFIO_MARKERS, proc: Path = Path("/proc")) -> PinCheck:
    """Look through process ``pid``'s open files for ``markers``."""
    if pid <= 0:
        return PinCheck(unavailable="the peer's pid is not visible from here (pid namespace)")
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        return PinCheck(
            unavailable=f"{fd_dir} is not readable: the daemon needs QEMU's uid, or "
            "CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE, to see QEMU's open files"
        )
    except OSError as err:
        return PinCheck(unavailable=f"{fd_dir}: {err.strerror}")
    found = set()
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed meanwhile
        if _matches(target, markers):
            found.add(target)
    return PinCheck(tuple(sorted(found)))


class PeerScans:
    """The latest look at each peer process's open files, at most ``RECHECK_SECONDS``
    old; shared by every connection of the daemon (thread-safe enough: two threads
    that both find a look stale both look)."""

    #: looks kept before the oldest are dropped (processes come and go)
    MAX_KEPT = 4096

    def __init__(
        self,
        markers: tuple[str, ...] = VFIO_MARKERS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.markers = markers
        self._clock = clock
        self._looks: dict[int, tuple[float, PinCheck]] = {}

    def get(self, pid: int) -> PinCheck:
        now = self._clock()
        look = self._looks.get(pid)
        if look is not None and now - look[0] < RECHECK_SECONDS:
            return look[1]
        found = scan(pid, self.markers)
        if len(self._looks) >= self.MAX_KEPT:
            self._looks = {p: v for p, v in self._looks.items() if now - v[0] < RECHECK_SECONDS}
        self._looks[pid] = (now, found)
        return found


class PinWatch:
    """One VM's passthrough check: the latest look at its QEMU, and a log line each
    time what it finds changes."""

    def __init__(self, vm: str, pid: int, scans: PeerScans) -> None:
        self.vm = vm
        self.pid = pid
        self.scans = scans
        self.last = PinCheck()

    @property
    def pinned(self) -> bool:
        """Whether guest RAM is pinned, as of the last check (without checking)."""
        return bool(self.last.devices)

    def check(self) -> bool:
        """Whether guest RAM is pinned now (a fresh look if the last is stale). Blocking
        syscalls: call it from a worker thread, or once (at connect)."""
        found = self.scans.get(self.pid)
        if found != self.last:
            self._log_change(found)
        self.last = found
        return self.pinned

    def _log_change(self, found: PinCheck) -> None:
        before = self.last
        if found.unavailable is not None:
            if found.unavailable != before.unavailable:
                log.warning(
                    "passthrough_check_unavailable", vm=self.vm, peer_pid=self.pid,
                    why=found.unavailable,
                    message="a VFIO device in this VM would not be noticed: use "
                    "--no-discard (or discard = false) for VMs with passthrough devices",
                )  # fmt: skip
        elif found.devices and not before.devices:
            log.warning(
                "passthrough_detected", vm=self.vm, peer_pid=self.pid, devices=list(found.devices),
                message="guest RAM is pinned for DMA: reports are completed without "
                "discarding (counted as reason=vfio)",
            )  # fmt: skip
        elif before.devices and not found.devices:
            log.info("passthrough_gone", vm=self.vm, peer_pid=self.pid)
