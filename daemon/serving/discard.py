"""From reported guest ranges to freed host memory: whether each may be given back, and
the holes that give it back.

Theory of operation. ``DiscardGate`` is the one place that decides whether a reported
block (or a page the guest put into the balloon) may be punched out of guest RAM, and
counts what is not under one reason (the ``reason`` metric label):

``outside_ram``  the walker found it outside every region, or across a region's end
``inhibited``    the operator said no (--no-discard, ``discard = false``)
``poison``       the guest poisons freed pages and expects the pattern back (QEMU's rule)
``unaligned``    the part that is not whole pages of the RAM file (4 KiB for a memfd,
                 2 MiB for hugetlbfs)
``vfio``         QEMU holds a passthrough device: guest RAM is pinned for DMA
``error``        fallocate failed

Planning turns each block into a hole at ``mmap_offset + (gpa - guest_phys_addr)`` of
the region's fd, clamped to the region and shrunk to whole pages of the file. The
passthrough check (a look at QEMU's open files, at most once a second) is made only if
there is something to punch. A file shrunk under us costs nothing here: its ring reads
fail first (``region_truncated`` ends that queue, guestram.py), and a hole past a
file's end frees nothing and hurts nothing. Punching makes blocking syscalls (cffi
releases the GIL), so it runs in a worker thread (``DiscardPool``), lowered in priority:
the event loop, which answers vCPUs waiting on GET_CONFIG, must win the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import outcome
import trio

from vhost_user_balloon.protocol import GUEST_PAGE_SIZE, BalloonDevice, ReportedRange

from ..linux.fds import close_fds
from ..linux.syscalls import punch_holes
from .guestram import VmMemory
from .passthrough import PinWatch

__all__ = [
    "DISCARD_NICE",
    "DiscardGate",
    "DiscardPlan",
    "DiscardPool",
    "DiscardResult",
    "Punch",
    "execute",
]

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


class Punch(NamedTuple):
    """One ``fallocate(PUNCH_HOLE)`` to make."""

    fd: int
    offset: int
    length: int
    #: the order of the reported block it gives back (-1: not one the churn sampler
    #: can check, on huge-page RAM)
    order: int = -1


@dataclass(slots=True)
class DiscardPlan:
    punches: list[Punch] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class DiscardResult:
    discarded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[OSError] = field(default_factory=list)
    #: the holes punched (those that failed left out)
    punched: Sequence[Punch] = ()


class DiscardGate:
    """One VM's discards: what may be given back, and the giving."""

    def __init__(
        self, memory: VmMemory, device: BalloonDevice, passthrough: PinWatch, *, enabled: bool
    ) -> None:
        self.memory = memory
        self.device = device
        self.passthrough = passthrough
        #: the operator's switch (--no-discard; a SIGHUP may change it, for the next report)
        self.enabled = enabled

    def plan(self, ranges: Sequence[ReportedRange]) -> DiscardPlan:
        """The holes that give ``ranges`` back, and what is skipped, by reason (but
        ``vfio`` and ``error``: see ``carry_out``)."""
        plan = DiscardPlan()
        blocked = None if self.enabled else "inhibited"
        if blocked is None and not self.device.discard_allowed:
            blocked = "poison"
        regions = self.memory.by_index
        for r in ranges:
            if r.location is None:
                plan.skipped["outside_ram"] += r.length
                continue
            if blocked is not None:
                plan.skipped[blocked] += r.length
                continue
            m = regions[r.location.region]
            start = r.location.file_offset
            end = min(start + r.length, m.region.mmap_offset + m.region.memory_size)
            page = m.page_size
            first = -(-start // page) * page
            punched = max(end // page * page - first, 0)
            if punched:
                order = r.order if page == GUEST_PAGE_SIZE else -1
                plan.punches.append(Punch(m.fd, first, punched, order))
            if r.length - punched:
                plan.skipped["unaligned"] += r.length - punched
        return plan

    def carry_out(self, plan: DiscardPlan) -> DiscardResult:
        """Punch the plan's holes, unless guest RAM is pinned (blocking: in a worker
        thread, as is the passthrough check, made only if there is something to punch)."""
        if plan.punches and self.passthrough.check():  # VFIO: guest RAM is pinned
            pinned = sum(p.length for p in plan.punches)
            return DiscardResult(skipped=plan.skipped + Counter(vfio=pinned))
        return execute(plan)

    def give_back(self, ranges: Sequence[ReportedRange]) -> DiscardResult:
        """``plan`` and ``carry_out`` (blocking: in a worker thread)."""
        return self.carry_out(self.plan(ranges))


def execute(plan: DiscardPlan) -> DiscardResult:
    """Make the plan's punches (blocking: call from a worker thread, which it lowers to
    DISCARD_NICE). Tests hold or slow discards here."""
    _lower_priority()
    result = DiscardResult(skipped=Counter(plan.skipped))
    failed = punch_holes(plan.punches)
    for index, err in failed:
        result.skipped["error"] += plan.punches[index].length
        result.errors.append(err)
    result.discarded = sum(p.length for p in plan.punches) - result.skipped["error"]
    if failed:
        bad = {index for index, _ in failed}
        result.punched = [p for i, p in enumerate(plan.punches) if i not in bad]
    else:
        result.punched = plan.punches
    return result


class DiscardPool:
    """Threads that punch holes, shared by every VM, fed through one queue.

    ``run`` hands a job to the first free thread and waits on an eventfd of its own,
    which the thread writes when the job is done. That round trip is ~50 us on the
    test machines against ~155 us for ``trio.to_thread.run_sync`` (``benchmarks parts``),
    and it is paid on every report. The wait is shielded: a job always runs to its end
    (a discard takes milliseconds). Eventfds are kept for the next caller rather than
    closed (as many as there were callers at once): a job may still be writing its
    eventfd when its caller has its result, and a later wake-up is harmless, as each
    caller waits until its own job's result is there.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._started = 0
        self._idle_eventfds: list[int] = []  # only touched by the event loop's thread

    def _start_threads(self) -> None:
        while self._started < self.threads:
            self._started += 1
            threading.Thread(
                target=self._work, name=f"vub-discard-{self._started}", daemon=True
            ).start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def close(self) -> None:
        """Let the threads end once the jobs before are done (call when no caller is
        left); a later ``run`` starts them again."""
        for _ in range(self._started):
            self._jobs.put(None)
        self._started = 0
        close_fds(self._idle_eventfds)
        self._idle_eventfds = []

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
