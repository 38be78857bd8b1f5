"""Churn: of the memory given back for free page reports, how much the guest takes
again soon after.

A block given back that the guest uses again is faulted in and zeroed by the host a
second time, for nothing: that is what reporting costs. The daemon knows every range
it punched, so it samples them: at most ``SAMPLES_PER_S`` ranges a second per VM (a
token bucket: a guest reporting 1 GiB/s costs the same as one reporting 16 blocks a
second, and at most ``SAMPLES_PER_S`` times the longest window are ever pending).
Once each window (10 s, 60 s) has passed since a sampled range was punched, the RAM
file is asked which of its bytes hold data again (``lseek`` ``SEEK_DATA`` and
``SEEK_HOLE`` on a descriptor of the daemon's own, opened through /proc/self/fd, so
the file position QEMU shares with the daemon's copy is not moved): a page the guest
wrote after it was punched is allocated again (swapped out still counts). A range
punched again before its check counts as not taken, so churn is a lower bound.

Only reports are sampled, not inflated pages (those stay out until the balloon
deflates), and only 4 KiB-page RAM (hugetlbfs files say every byte is data). What
was pending when the connection ends is dropped.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from .discard import Punch

__all__ = ["SAMPLES_PER_S", "WINDOWS", "ChurnSampler", "data_bytes"]

#: each window's label (as /metrics shows it) and its length in seconds
WINDOWS: Final = (("10s", 10.0), ("60s", 60.0))
#: ranges sampled per second per VM, at most (and the burst allowed)
SAMPLES_PER_S: Final = 16.0

#: ``record(order, window, checked_bytes, resident_bytes)``
Record = Callable[[int, str, int, int], None]


@dataclass(slots=True)
class _Sample:
    fd: int
    file: tuple[int, int]  #: (st_dev, st_ino) when sampled: the fd may be reused since
    offset: int
    length: int
    order: int
    punched_at: float


class ChurnSampler:
    """One VM's sampled punches and their checks. ``punched`` is called in a discard
    thread (one at a time: the reporting queue's), ``check`` in the event loop; they
    share only deques (appends and pops are atomic)."""

    def __init__(
        self,
        record: Record,
        windows: tuple[tuple[str, float], ...] | None = None,
        rate: float = SAMPLES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record, self.rate, self._clock = record, rate, clock
        self.windows = WINDOWS if windows is None else windows  # (tests shorten them)
        self._pending: list[deque[_Sample]] = [deque() for _ in self.windows]
        self._tokens = rate
        self._last = clock()

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._pending)

    def punched(self, punches: Iterable[Punch]) -> None:
        """Holes just punched for a report: sample what the rate allows."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now
        for p in punches:
            if p.order < 0:
                continue
            if self._tokens < 1:
                return
            self._tokens -= 1
            try:
                st = os.fstat(p.fd)
            except OSError:
                continue
            self._pending[0].append(
                _Sample(p.fd, (st.st_dev, st.st_ino), p.offset, p.length, p.order, now)
            )

    def check(self) -> None:
        """Check every sample whose window has passed; it goes on to the next window."""
        now = self._clock()
        for i, (label, seconds) in enumerate(self.windows):
            queue = self._pending[i]
            while queue and queue[0].punched_at + seconds <= now:
                s = queue.popleft()
                resident = data_bytes(s.fd, s.file, s.offset, s.length)
                if resident is None:  # the region or the connection is gone
                    continue
                self._record(s.order, label, s.length, resident)
                if i + 1 < len(self.windows):
                    self._pending[i + 1].append(s)


def data_bytes(fd: int, file: tuple[int, int], offset: int, length: int) -> int | None:
    """The bytes of ``[offset, offset + length)`` that hold data in the file open as
    ``fd``, if it still is the file ``file`` (None if not)."""
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(own)
        if (st.st_dev, st.st_ino) != file:
            return None
        end, pos, total = offset + length, offset, 0
        while pos < end:
            try:
                data = os.lseek(own, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= end:
                break
            hole = os.lseek(own, data, os.SEEK_HOLE)
            total += min(hole, end) - data
            pos = hole
        return total
    except OSError:
        return None
    finally:
        os.close(own)
