"""From reported guest ranges to freed host memory: plan, then punch holes.

Theory of operation. A report names guest-physical blocks; the walker has already
located each one wholly inside a region (or marked it outside RAM). Planning turns
each block into a hole to punch in the region's fd at ``mmap_offset + (gpa -
guest_phys_addr)``, clamped to the region and shrunk to whole pages of the file
(4 KiB for a memfd, 2 MiB for hugetlbfs). Whatever is not punched is counted under
one reason: ``outside_ram``, ``inhibited`` (the operator said no: --no-discard),
``vfio`` (QEMU holds a passthrough device: guest RAM is pinned), ``poison`` (the
guest wants its poison pattern back), ``unaligned`` or ``error`` (fallocate failed).
Executing the plan makes blocking syscalls, so it runs in a worker thread; cffi
releases the GIL, and the event loop stays free for other VMs and for the vCPUs
waiting on GET_CONFIG.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import outcome
import trio

from vhost_user_balloon.protocol import ReportedRange

from ..linux.syscalls import punch_hole
from .guestram import VmMemory

__all__ = [
    "DISCARD_NICE",
    "SKIP_REASONS",
    "DiscardPlan",
    "DiscardResult",
    "Punch",
    "execute",
    "plan_discards",
]

#: Every reason a reported byte may not be given back (the ``reason`` metric label).
SKIP_REASONS = ("poison", "inhibited", "vfio", "unaligned", "outside_ram", "error")
#: Nice value of the threads that punch holes: discarding is background work, while a
#: vCPU waits on every GET_CONFIG. On a busy host the event loop must win the CPU.
DISCARD_NICE = 10
_thread_state = threading.local()
_T = TypeVar("_T")


def _lower_priority() -> None:
    """Run this worker thread at DISCARD_NICE (Linux nice values are per thread)."""
    if getattr(_thread_state, "niced", False):
        return
    _thread_state.niced = True
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), DISCARD_NICE)
        )


@dataclass(frozen=True, slots=True)
class Punch:
    """One ``fallocate(PUNCH_HOLE)`` to make."""

    fd: int
    offset: int
    length: int


@dataclass(slots=True)
class DiscardPlan:
    punches: list[Punch] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class DiscardResult:
    discarded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[OSError] = field(default_factory=list)


def plan_discards(
    ranges: Iterable[ReportedRange], memory: VmMemory, *, poisoned: bool, blocked: str | None
) -> DiscardPlan:
    """The punches that give ``ranges`` back. ``blocked`` names why nothing may be
    discarded now (``inhibited``, ``vfio``), which is then the skip reason."""
    plan = DiscardPlan()
    for r in ranges:
        if r.location is None:
            plan.skipped["outside_ram"] += r.length
            continue
        if blocked is not None:
            plan.skipped[blocked] += r.length
            continue
        if poisoned:
            plan.skipped["poison"] += r.length
            continue
        m = memory.backing(r.location.region)
        start = r.location.file_offset
        end = min(start + r.length, m.region.mmap_offset + m.region.memory_size)
        page = m.page_size
        first = -(-start // page) * page
        last = end // page * page
        punched = max(last - first, 0)
        if punched:
            plan.punches.append(Punch(m.fd, first, punched))
        if r.length - punched:
            plan.skipped["unaligned"] += r.length - punched
    return plan


def execute(
    plan: DiscardPlan, punch: Callable[[int, int, int], None] = punch_hole
) -> DiscardResult:
    """Make the plan's punches (blocking: call from a worker thread, which it lowers to
    DISCARD_NICE)."""
    _lower_priority()
    result = DiscardResult(skipped=Counter(plan.skipped))
    for p in plan.punches:
        try:
            punch(p.fd, p.offset, p.length)
        except OSError as err:
            result.skipped["error"] += p.length
            result.errors.append(err)
        else:
            result.discarded += p.length
    return result


class DiscardPool:
    """Threads that punch holes, shared by every VM, fed through one queue.

    ``run`` hands a job to the first free thread and waits on an eventfd of its own,
    which the thread writes when the job is done. That round trip is ~50 us on the
    test machines against ~155 us for ``trio.to_thread.run_sync`` (``bench.py parts``),
    and it is paid on every report. The wait is shielded: a job always runs to its end
    (a discard takes milliseconds). Eventfds are kept for the next caller rather than
    closed (as many as there were callers at once): a job may still be writing its
    eventfd when its caller has its result, and a later wake-up is harmless, as each
    caller waits until its own job's result is there.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._started = 0
        self._idle_eventfds: list[int] = []  # only touched by the event loop's thread

    def _start_threads(self) -> None:
        while self._started < self.threads:
            self._started += 1
            threading.Thread(
                target=self._work, name=f"vub-discard-{self._started}", daemon=True
            ).start()

    def _work(self) -> None:
        while True:
            self._jobs.get()()

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in one of the pool's threads; its result, or its exception raised."""
        self._start_threads()
        if self._idle_eventfds:
            done = self._idle_eventfds.pop()
        else:
            done = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        result: list[outcome.Outcome[_T]] = []

        context = contextvars.copy_context()  # the caller's log context (its vm=)

        def job() -> None:
            try:
                result.append(context.run(outcome.capture, fn))
            finally:
                os.eventfd_write(done, 1)

        try:
            self._jobs.put(job)
            with trio.CancelScope(shield=True):
                while not result:
                    await trio.lowlevel.wait_readable(done)
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(done)
        finally:
            self._idle_eventfds.append(done)
        return result[0].unwrap()
