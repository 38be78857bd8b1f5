"""Serving one virtqueue: wait for kicks, take chains, do the work, hand them back.

Theory of operation. A ``QueueRunner`` task sleeps on its kick eventfd (epoll via
trio, no polling). On a kick it takes the connection's ring lock and services the
ring: pop each available chain, do the device's work for it, push it to the used
ring, and signal the call eventfd if the guest wants an interrupt. The connection
hands a runner its kick, call and err eventfds as they are set (``set_fd``); a kick fd
replaced while the task waits on it wakes the task, which then waits on the new one.

The lock is what keeps GET_VRING_BASE honest: the connection takes the same lock
before handing any message that changes memory or queues to the session, so a
chain is never half done when the session stops a ring or QEMU unmaps memory.
Each chain's work is shielded from cancellation: the guest waits for every report
without a timeout, with up to 128 MiB isolated, so once taken a chain is always
completed, even on shutdown, even when a discard fails.

Free page reports, the hot path, are served whole in a discard thread, while the
task waits holding the lock (so nothing else touches the ring or the memory
meanwhile). One report, top to bottom (``_report``): take the chain (the walker
checks every descriptor, protocol/virtqueue.py), read it as a report
(protocol/balloon.py), give back what may be given back (``DiscardGate``, discard.py),
hand the buffer back, count it, interrupt the guest. The event loop only waits: the
guest has its buffer back before the loop wakes again, and the loop stays free for
vCPUs.

If the guest breaks the ring rules, the queue stops for good: the error is logged
and counted, the vring error eventfd is signalled, and the other queues and VMs
carry on.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass

import structlog
import trio

from vhost_user_balloon.protocol import (
    GUEST_PAGE_SIZE,
    Chain,
    FdKind,
    GuestMemory,
    QueueRole,
    RemoteProtocolError,
    ReportError,
    SplitQueue,
    StatsError,
    balloon_pages,
    read_stats,
    report_ranges,
)

from ..observing.metrics import VmMetrics
from ..observing.problems import report_problem
from .churn import ChurnSampler
from .discard import DiscardGate, DiscardPool, DiscardResult
from .guestram import VmMemory

__all__ = ["QueueContext", "QueueRunner"]

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class QueueContext:
    """What the queues of one VM's connection share."""

    vm_metrics: VmMetrics
    memory: VmMemory
    gate: DiscardGate
    #: held while a chain is served, and while the connection changes memory or queues
    ring_lock: trio.Lock
    #: the threads that punch holes (and serve reports), shared by every VM
    pool: DiscardPool
    #: seconds between requests for fresh guest statistics (0: never ask again)
    stats_interval: float
    #: samples the holes punched for reports, to see what the guest takes again
    churn: ChurnSampler


class QueueRunner:
    """One started queue of one VM."""

    def __init__(
        self, index: int, role: QueueRole, queue: SplitQueue, context: QueueContext
    ) -> None:
        self.index = index
        self.role = role
        self.queue = queue
        self.context = context
        self.enabled = False
        self.broken = False
        #: the queue's eventfds, as the connection last set them (it owns them)
        self.fds: dict[FdKind, int] = {}
        #: The stats buffer the guest posted; held until stats are wanted (handing it
        #: back is how the device asks for fresh statistics).
        self.held: Chain | None = None
        self.cancel_scope = trio.CancelScope()
        self.vm_metrics = context.vm_metrics

    def set_fd(self, kind: FdKind, fd: int | None) -> None:
        """A new kick, call or err eventfd (None: none any more)."""
        if fd is None:
            self.fds.pop(kind, None)
        else:
            self.fds[kind] = fd

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.cancel_scope:
            task_status.started()
            async with trio.open_nursery() as nursery:
                if self.role is QueueRole.STATS and self.context.stats_interval > 0:
                    nursery.start_soon(self._request_stats)
                if self.role is QueueRole.REPORTING:
                    nursery.start_soon(self._check_churn)
                await self._serve_kicks()
                nursery.cancel_scope.cancel()

    async def _serve_kicks(self) -> None:
        while not self.broken:
            fd = self.fds.get(FdKind.KICK)
            if fd is None:
                return
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                continue  # the kick fd was replaced; wait on the new one
            seen = time.perf_counter()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)  # a racing wakeup may have taken it; the ring tells
            async with self.context.ring_lock:
                await self.service(seen)

    async def service(self, seen: float | None = None) -> None:
        """Serve every available chain. The caller holds ``ring_lock``."""
        mem = self.context.memory.memory
        if not self.enabled or self.broken or mem is None:
            return
        seen = time.perf_counter() if seen is None else seen
        if self.role is QueueRole.REPORTING:
            await self._serve_reports(mem, seen)
            return
        while True:
            try:
                chain = self.queue.pop(mem)
            except RemoteProtocolError as err:
                self._fail(err)
                return
            if chain is None:
                return
            with trio.CancelScope(shield=True):
                try:
                    await self._serve_chain(chain, mem)
                except RemoteProtocolError as err:  # e.g. the RAM file shrank under us
                    self._fail(err)
                    return

    # -- free page reports ------------------------------------------------------------
    async def _serve_reports(self, mem: GuestMemory, seen: float) -> None:
        """Every available report, served in one trip to a discard thread (see the
        module's docstring)."""
        failed: list[RemoteProtocolError] = []

        def work() -> None:  # in a discard thread, while this task holds ring_lock
            while True:
                try:
                    chain = self.queue.pop(mem)
                    if chain is None:
                        return
                    self._report(chain, mem, seen)
                except RemoteProtocolError as err:  # the ring, or the RAM file shrank
                    failed.append(err)
                    return

        await self.context.pool.run(work)
        for err in failed:
            self._fail(err)

    def _report(self, chain: Chain, mem: GuestMemory, seen: float) -> None:
        """One report, start to end (blocking: in a discard thread). A malformed one is
        handed back untouched. It is counted before the guest is told (so that a
        scrape after the guest has its buffer back counts it)."""
        try:
            ranges = report_ranges(chain)
        except ReportError as err:
            self._reject("report_rejected", err)
            self._complete(chain, mem)
            return
        result = self.context.gate.give_back(ranges)
        self._log_failures(result)
        notify = self.queue.complete(mem, chain.head)
        service = time.perf_counter() - seen
        by_order: dict[int, tuple[int, int]] = {}
        for r in ranges:
            blocks, nbytes = by_order.get(r.order, (0, 0))
            by_order[r.order] = (blocks + 1, nbytes + r.length)
        self.vm_metrics.record_report(by_order, result.discarded, result.skipped, service)
        self.context.churn.punched(result.punched)
        if notify:
            self._signal(FdKind.CALL)
        log.debug(
            "report_served", queue=self.index, entries=len(ranges), orders=by_order,
            discarded_bytes=result.discarded, skipped=result.skipped,
            service_ms=round(service * 1000, 3),
        )  # fmt: skip

    # -- the other queues -------------------------------------------------------------
    async def _serve_chain(self, chain: Chain, mem: GuestMemory) -> None:
        if self.role is QueueRole.STATS:
            # Keep the guest's stats buffer: handing it back asks for fresh stats, which
            # _request_stats does every stats_interval. Give back an older one if a new
            # one comes.
            self._read_stats(chain, mem)
            older, self.held = self.held, chain
            if older is not None:
                self._complete(older, mem)
        elif self.role in (QueueRole.INFLATE, QueueRole.DEFLATE):
            await self._balloon(chain, mem)
        else:
            # Free page hints are not offered; a buffer is simply handed back.
            self._complete(chain, mem)

    async def _balloon(self, chain: Chain, mem: GuestMemory) -> None:
        """Inflate: the guest gave these pages up; free them on the host like reported
        memory (through the same gate). Deflate: the guest takes pages back; they are
        simply there again when it touches them (MUST_TELL_HOST is not offered). Either
        way the buffer goes back, malformed or not: the guest waits."""
        try:
            pages = balloon_pages(chain, mem)
        except ReportError as err:
            self._reject("balloon_pages_rejected", err)
            self._complete(chain, mem)
            return
        nbytes = len(pages) * GUEST_PAGE_SIZE
        if self.role is QueueRole.DEFLATE:
            self._complete(chain, mem)
            self.vm_metrics.record_deflate(nbytes)
            return
        gate = self.context.gate
        plan = gate.plan(pages)
        if plan.punches:  # a thread only if there is something to punch
            result = await self.context.pool.run(lambda: gate.carry_out(plan))
            self._log_failures(result)
        else:
            result = DiscardResult(skipped=Counter(plan.skipped))
        self._complete(chain, mem)
        self.vm_metrics.record_inflate(nbytes, result.discarded, result.skipped)

    def _read_stats(self, chain: Chain, mem: GuestMemory) -> None:
        try:
            stats = read_stats(chain, mem)
        except StatsError as err:
            # Held all the same: handing it back at once would invite the guest to spin.
            self._reject("stats_rejected", err)
            return
        self.vm_metrics.record_stats(stats)

    async def _check_churn(self) -> None:
        """Once a second, the churn checks that are due (a few syscalls each)."""
        while True:
            await trio.sleep(1.0)
            self.context.churn.check()

    async def _request_stats(self) -> None:
        """Every stats_interval, hand the held buffer back: the guest refills it."""
        while True:
            await trio.sleep(self.context.stats_interval)
            async with self.context.ring_lock:
                mem = self.context.memory.memory
                if self.held is not None and self.enabled and not self.broken and mem:
                    held, self.held = self.held, None
                    try:
                        self._complete(held, mem)
                    except RemoteProtocolError as err:
                        self._fail(err)

    # -- handing back, telling ----------------------------------------------------------
    def _complete(self, chain: Chain, mem: GuestMemory) -> None:
        if self.queue.complete(mem, chain.head):
            self._signal(FdKind.CALL)

    def signal_call(self) -> None:
        """Interrupt the guest (a spare one is harmless: it finds nothing new)."""
        self._signal(FdKind.CALL)

    def _signal(self, kind: FdKind) -> None:
        fd = self.fds.get(kind)
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError as err:
            log.warning(
                "eventfd_write_failed", queue=self.index, fd_kind=kind.value, error=str(err)
            )

    def _log_failures(self, result: DiscardResult) -> None:
        if result.errors:
            log.warning(
                "discard_failed",
                queue=self.index,
                error=str(result.errors[0]),
                failures=len(result.errors),
            )

    def _reject(self, event: str, err: RemoteProtocolError) -> None:
        """Log and count a buffer the guest got wrong."""
        report_problem(self.vm_metrics, event, err, queue=self.index)

    def _fail(self, err: RemoteProtocolError) -> None:
        self.broken = True
        report_problem(
            self.vm_metrics,
            "queue_failed",
            err,
            level="error",
            queue=self.index,
            role=self.role.value,
        )
        self._signal(FdKind.ERR)
