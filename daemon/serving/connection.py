"""One frontend connection (one VM): messages in, session, effects, queue tasks.

Theory of operation. ``FrontendStream`` (framing.py) hands over one message at a
time. Each goes to the sans-IO ``Session``; its effects are carried out here (map
memory, swap eventfds, start or stop queue tasks, update the VM's gauges), and only
then is the reply sent, so a REPLY_ACK means "done".

A request whose entry in ``REQUESTS`` says ``ring_lock`` is handled under
``ring_lock``, which a queue task holds while it serves a chain; config and feature
queries are not, so a vCPU waiting on GET_CONFIG never waits for a hole punch.

Every fd has one owner. Fds of a message belong to this connection until an
effect keeps them (then they live in ``memory``, ``_vring_fds`` or ``_backend``) or
they are closed at once; everything is closed in ``_teardown`` on every exit path.
A protocol error or an unexpected exception ends this connection only.

Surviving a restart (handover/records.py). With a keeper, each message is applied while it
is still in the socket (peeked), the state that includes it is saved with the reply
it owes, and only then is it taken out and answered. A process killed at any point
leaves either the message in the socket and the old state (the next process applies
it), or the new state and the reply still owed (the next process takes the message
out if it is still there and sends the reply). What is left: a kill in the
microseconds between sending a reply and saving that it was sent makes the next
process send it again. A message not sent in one piece (QEMU always sends one) is
read the ordinary way and is lost if the process dies while handling it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import structlog
import trio

from vhost_user_balloon.protocol import (
    GUEST_PAGE_SIZE,
    REQUESTS,
    AddRegion,
    BalloonChanged,
    BalloonDevice,
    Effect,
    EnableQueue,
    FdKind,
    FeaturesSet,
    Message,
    Notice,
    QueueRole,
    QueueState,
    RemoveRegion,
    ResetDevice,
    Session,
    SetBackendChannel,
    SetMemory,
    SetVringFd,
    SplitQueue,
    StartQueue,
    StopQueue,
    VhostUserError,
)

from ..handover.records import Adoptable, HandOver, LiveFds, OwedReply
from ..linux.fds import close_fds
from ..linux.peer import peer_credentials
from ..observing.metrics import Metrics
from ..observing.problems import report_problem
from .churn import ChurnSampler
from .discard import DiscardGate, DiscardPool
from .framing import BackendChannel, FrontendStream, PeerGone, Received
from .guestram import VmMemory
from .passthrough import PeerScans, PinWatch
from .queues import QueueContext, QueueRunner

__all__ = ["BalloonTargetError", "ConnectionOptions", "VmConnection", "VmView"]

log = structlog.get_logger()


_NO_CHANNEL: Final = (
    "QEMU opened no backend channel (BACKEND_REQ), so the guest cannot be told about a "
    "new balloon size"
)
_CHANNEL_CLOSED: Final = (
    "QEMU has closed the balloon's backend channel (is the device being unplugged?); "
    "the guest cannot be told about a new balloon size"
)


#: How long a balloon target waits for the messages QEMU sent before it to be handled.
_UNREAD_WAIT_S: Final = 1.0


class BalloonTargetError(Exception):
    """A balloon target cannot be passed to this VM's guest; the message says why."""


@dataclass(frozen=True, slots=True)
class VmView:
    """One attached VM as the rest of the daemon sees it (the control socket, the
    automatic policy, /metrics): sizes in bytes."""

    ram_bytes: int
    #: host memory the guest RAM files hold now (their allocated blocks)
    resident_bytes: int
    target_bytes: int
    actual_bytes: int
    #: virtio feature bits the guest driver accepted
    features: int
    #: the guest's latest statistics by tag (None: none yet) and their age in seconds
    guest_stats: Mapping[int, int] | None
    stats_age_s: float | None


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """What the daemon serves one VM's connection with (from the settings, by the
    server): how, and the parts every connection shares."""

    #: punch reported memory out of guest RAM (False: complete reports, free nothing)
    discard: bool
    #: worker threads punching holes, shared by every VM
    discard_pool: DiscardPool
    #: seconds between requests for fresh guest statistics (0: never ask again)
    stats_interval: float
    #: virtio feature bits offered to the guest
    features: int
    #: looks at QEMU's open files for passthrough devices, shared by the connections
    peer_scans: PeerScans
    metrics: Metrics
    #: balloon target in bytes by VM name, shared by the daemon's connections: what a
    #: VM was last asked for outlives its connection (a live migration unplugs the
    #: device and plugs a new one) and is given to the next one's guest
    targets: dict[str, int]


class VmConnection:
    """Serves one accepted frontend socket until EOF or a fatal error. ``handover``
    names the VM (and saves its state for the next process, with a keeper);
    ``session`` is an adopted connection's, restored."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        handover: HandOver,
        options: ConnectionOptions,
        session: Session | None = None,
    ) -> None:
        self.vm = vm = handover.vm
        self.stream = FrontendStream(sock)
        self.vm_metrics = options.metrics.for_vm(vm)
        self.session = session if session is not None else Session(BalloonDevice(options.features))
        self.device = self.session.device
        self.targets = options.targets
        if session is None:
            self.device.set_target(self.targets.get(vm, 0) // GUEST_PAGE_SIZE)
            self.vm_metrics.set_balloon(self.device.config.num_pages, 0)
        else:
            self.targets[vm] = self.device.config.num_pages * GUEST_PAGE_SIZE
        self.memory = VmMemory()
        #: whether QEMU holds a VFIO device, which forbids discarding
        self.passthrough = PinWatch(vm, peer_credentials(sock).pid, options.peer_scans)
        #: what of this VM's memory may be given back (``enabled``: the operator's switch)
        self.gate = DiscardGate(self.memory, self.device, self.passthrough, enabled=options.discard)
        self.ring_lock = trio.Lock()
        self.runners: dict[int, QueueRunner] = {}
        self._queues = QueueContext(
            self.vm_metrics, self.memory, self.gate, self.ring_lock, options.discard_pool,
            options.stats_interval, ChurnSampler(self.vm_metrics.record_churn),
        )  # fmt: skip
        self._vring_fds: dict[tuple[int, FdKind], int] = {}
        self._nursery: trio.Nursery | None = None
        #: the channel for messages we start (SET_BACKEND_REQ_FD)
        self._backend: BackendChannel | None = None
        #: why there is no channel, for a balloon command
        self._no_backend = _NO_CHANNEL
        #: saves our state for the next process (inactive without a keeper)
        self.handover = handover
        #: set when adopted from a keeper: what the process before left to finish
        self._adopted: Adoptable | None = None

    def view(self) -> VmView:
        """This VM now (a few fstat calls: the resident bytes are read afresh)."""
        config = self.device.config
        latest = self.vm_metrics.guest_stats()
        return VmView(
            ram_bytes=self.memory.ram_bytes,
            resident_bytes=self.memory.resident_bytes(),
            target_bytes=config.num_pages * GUEST_PAGE_SIZE,
            actual_bytes=config.actual * GUEST_PAGE_SIZE,
            features=self.session.features,
            guest_stats=None if latest is None else latest[0],
            stats_age_s=None if latest is None else latest[1],
        )

    # -- lifecycle ------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve until the frontend goes away; log why; always clean up."""
        structlog.contextvars.bind_contextvars(vm=self.vm)
        self.vm_metrics.set_connected(True)
        await trio.to_thread.run_sync(self.passthrough.check)
        log.info(
            "frontend_adopted" if self._adopted else "frontend_connected",
            peer_pid=self.passthrough.pid,
            passthrough_check="unavailable" if self.passthrough.last.unavailable else "ok",
        )
        why = "shutdown"  # unless the frontend or an error ends it first
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._begin()
                    await self._read_loop()
                    why = "frontend_closed"
                except PeerGone:
                    why = "frontend_closed"
                except VhostUserError as err:
                    why = "protocol_error"
                    report_problem(
                        self.vm_metrics, "connection_closed_on_error", err, level="error"
                    )
                finally:
                    nursery.cancel_scope.cancel()
        except* Exception as group:
            # (except*: an error that comes with a cancellation is still logged, and
            # the cancellation still goes on.)
            why = "internal_error"
            self.vm_metrics.protocol_error("internal_error")
            for problem in group.exceptions:
                log.error("connection_crashed", error=repr(problem), exc_info=problem)
        finally:
            kept = why == "shutdown" and self.handover.active
            self._teardown(keep=kept)
            # handed_over: the keeper holds the connection now. Whether it keeps it is
            # the keeper's: systemd empties the store on "systemctl stop" and keeps it
            # across "systemctl restart"; supervise keeps it unless it is stopping too.
            log.info("frontend_disconnected", why=why, handed_over=kept)

    async def _begin(self) -> None:
        if self._adopted is not None:
            await self._resume(self._adopted)
            self._adopted = None
        elif self.handover.active:
            self.handover.start(self.stream.fileno())
            self._save(None)

    def _teardown(self, *, keep: bool = False) -> None:
        """Close everything. With ``keep``, the keeper goes on holding the connection
        for the next process; otherwise it lets go too and QEMU sees the end."""
        self.handover.close(keep=keep)
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        for runner in self.runners.values():
            runner.cancel_scope.cancel()
        self.runners.clear()
        for fd in self._vring_fds.values():
            trio.lowlevel.notify_closing(fd)
        close_fds(self._vring_fds.values())
        self._vring_fds.clear()
        self.memory.close()
        self.stream.close()
        self.vm_metrics.detached()

    # -- hand-over --------------------------------------------------------------------
    def _save(self, owed: OwedReply | None, *, changed: bool = True) -> None:
        """Write this connection's state for the next process, with the reply it owes.
        Without ``changed`` (nothing but ``owed`` differs) the last record is written
        again with it."""
        if not changed:
            self.handover.save_owed(owed)
        elif self.handover.active:
            fds = LiveFds(
                regions=tuple(m.fd for m in self.memory.by_index),
                vrings=dict(self._vring_fds),
                backend=None if self._backend is None else self._backend.fileno(),
            )
            self.handover.save(self.session.export_state(), fds, owed)

    @classmethod
    def adopt(cls, stored: Adoptable, options: ConnectionOptions) -> VmConnection:
        """Adopt a connection a previous process served (``records.check_kept`` checked
        what the keeper passed). On failure every fd is closed and the keeper told to
        let go; the error says why."""
        record = stored.record
        try:
            session = Session.restore(record.session)
            sock = trio.socket.from_stdlib_socket(stored.sock)
            conn = cls(sock, HandOver(record.vm, stored.keeper), options, session)
        except BaseException:
            # (The chaos soak, seed 12, ended on a daemon holding a VM's state memfd and
            # two sockets that no connection served: this path left them open.)
            stored.sock.close()
            HandOver(record.vm, stored.keeper).close(keep=False)
            raise
        try:
            if session.memory is not None:
                dups = [stored.dup(name) for name in record.regions]
                try:
                    conn.memory.replace(session.memory, dups)
                except BaseException:
                    close_fds(dups)
                    raise
            for v in record.vrings:
                conn._set_vring_fd(v.index, v.kind, stored.dup(v.name))
            if record.backend is not None:
                conn._backend = BackendChannel(stored.dup(record.backend))
        except BaseException:
            conn._teardown()
            raise
        conn._adopted = stored
        conn.vm_metrics.set_features(session.features)
        conn.vm_metrics.set_balloon(conn.device.config.num_pages, conn.device.config.actual)
        return conn

    async def _resume(self, stored: Adoptable) -> None:
        """Finish what the previous process left: the reply it owed, then every started
        queue from where the guest's used ring says it got to."""
        owed = stored.record.owed
        if owed is not None:
            # Still at the head of the socket, or already taken out? (Nothing to read
            # means taken: QEMU sends nothing more while it waits for a reply.)
            still_there = await self.stream.at_head(owed.message)
            if still_there:
                await self.stream.consume(len(owed.message))
            if owed.reply:
                await self.stream.send(owed.reply)
            log.info(
                "owed_reply_sent" if owed.reply else "owed_message_done",
                message_taken_out_now=still_there,
            )
        # Also lets go of fds stored by a process that died before naming them.
        self._save(None)
        mem = self.memory.memory
        for v in self.session.vrings:
            if v.state is not QueueState.STARTED or v.queue is None or mem is None:
                continue
            role = self.session.queue_role(v.index)
            waiting = v.queue.resume_from_used(mem)
            if role is None:
                continue  # a queue outside the layout is left alone
            runner = await self._start_runner(v.index, role, v.queue, enabled=v.enabled)
            log.info("queue_resumed", queue=v.index, role=role.value, outstanding=waiting)
            done = v.queue.used_idx
            async with self.ring_lock:
                await runner.service()
            if v.queue.used_idx == done:
                # The last process may have handed chains back without the interrupt
                # (a spare one is harmless: the guest finds nothing new).
                runner.signal_call()

    # -- handling -------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            incoming = await self.stream.receive()
            if incoming is None:
                return
            if isinstance(incoming, Received):
                await self._dispatch(incoming.message, incoming.raw)
            else:
                err = incoming.error
                await self._finish(
                    incoming.raw,
                    self._refusal(err, err.request_code, err.need_reply),
                    changed=False,
                )

    async def _dispatch(self, msg: Message, raw: bytes) -> None:
        spec = REQUESTS[msg.request]
        lock = self.ring_lock if spec.ring_lock else contextlib.nullcontext()
        reply: bytes | None
        async with lock:
            try:
                outcome = self.session.handle(msg)
            except VhostUserError as err:
                close_fds(msg.fds)
                if not err.keeps_connection:
                    raise
                reply = self._refusal(err, msg.request, msg.need_reply)
            else:
                kept = outcome.kept_fds()
                close_fds(fd for fd in msg.fds if fd not in kept)
                for effect in outcome.effects:
                    await self._apply(effect)
                reply = outcome.reply
        await self._finish(raw, reply, changed=spec.saved)

    def _refusal(self, err: VhostUserError, request: int | None, need_reply: bool) -> bytes | None:
        """Log and count a request we refuse but carry on after; its failure reply."""
        report_problem(self.vm_metrics, "request_refused", err)
        return self.session.failure_reply(request or 0, need_reply)

    async def _finish(self, raw: bytes, reply: bytes | None, *, changed: bool) -> None:
        """Save what the message changed with the reply it owes, take it out of the
        socket (if peeked), answer, and save that nothing is owed. Not cancellable:
        a stop in the middle would leave QEMU waiting."""
        with trio.CancelScope(shield=True):
            self._save(OwedReply(raw, reply), changed=changed)
            if raw:
                await self.stream.consume(len(raw))
            if reply is not None:
                await self.stream.send(reply)
            self._save(None, changed=False)

    async def _apply(self, effect: Effect) -> None:
        match effect:
            case SetMemory() | AddRegion() | RemoveRegion():
                self._apply_memory(effect)
            case SetVringFd(index=index, kind=kind, fd=fd):
                self._set_vring_fd(index, kind, fd)
            case StartQueue():
                await self._start_queue(effect)
            case StopQueue(index=index):
                self._stop_runner(index)
            case EnableQueue(index=index, enabled=enabled):
                await self._enable(index, enabled)
            case ResetDevice(new_device=new_device):
                self._reset_device(new_device=new_device)
            case FeaturesSet(guest_features=bits):
                self.vm_metrics.set_features(bits)
            case BalloonChanged(target_pages=target, actual_pages=actual):
                self.vm_metrics.set_balloon(target, actual)
            case Notice(event=event, message=message):
                log.warning(event, message=message)
            case SetBackendChannel(fd=fd):
                self._set_backend(fd)

    def _apply_memory(self, effect: SetMemory | AddRegion | RemoveRegion) -> None:
        """Map or unmap guest RAM; the fds an effect brings are closed if that fails."""
        match effect:
            case SetMemory(memory=memory, fds=fds):
                try:
                    self.memory.replace(memory, fds)
                except BaseException:
                    close_fds(fds)
                    raise
                log.info(
                    "memory_table_set", regions=len(memory.regions), ram_bytes=memory.total_size
                )
            case AddRegion(region=region, fd=fd, memory=memory):
                try:
                    self.memory.add(region, fd, memory)
                except BaseException:
                    close_fds([fd])
                    raise
                log.info(
                    "memory_region_added", gpa=region.guest_phys_addr, size=region.memory_size,
                    regions=len(memory.regions), ram_bytes=memory.total_size,
                )  # fmt: skip
            case RemoveRegion(region=region, memory=memory):
                self.memory.remove(region, memory)
                log.info(
                    "memory_region_removed", gpa=region.guest_phys_addr, size=region.memory_size,
                    regions=0 if memory is None else len(memory.regions),
                    ram_bytes=0 if memory is None else memory.total_size,
                )  # fmt: skip

    async def _start_queue(self, effect: StartQueue) -> None:
        assert self.memory.memory is not None
        effect.queue.load_used_index(self.memory.memory)
        if effect.role is not None:  # a queue outside the layout is left alone
            await self._start_runner(effect.index, effect.role, effect.queue, enabled=False)
            log.info(
                "queue_started", queue=effect.index, role=effect.role.value, size=effect.queue.size
            )

    def _reset_device(self, *, new_device: bool) -> None:
        for index in list(self.runners):
            self._stop_runner(index)
        for index, kind in list(self._vring_fds):
            self._set_vring_fd(index, kind, None)
        self.memory.close()
        if new_device and self._backend is not None:
            self._backend.close()
            self._backend = None
        log.info("device_reset", new_device=new_device)

    def _set_backend(self, fd: int) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = BackendChannel(fd)
        self._no_backend = _NO_CHANNEL

    async def _enable(self, index: int, enabled: bool) -> None:
        target = self.runners.get(index)
        if target is not None:
            target.enabled = enabled
            if enabled:
                await target.service()  # anything kicked before the enable
                if self.driver_running():
                    await self._tell_at_start()

    async def _tell_at_start(self) -> None:
        """The device runs again (its last queue enabled) with a target the balloon is
        not at: tell QEMU now. A driver that probes reads the target by itself, but one
        that goes on where it was (a VM resumed after a pause: QEMU stopped the device
        and starts it again) would not hear of a target set meanwhile."""
        config = self.device.config
        if self._backend is None or config.num_pages == config.actual:
            return
        try:
            await self._backend.config_changed()
        except PeerGone as err:
            self._channel_lost(str(err))
            return
        log.info("balloon_target_told", vm=self.vm, target_bytes=config.num_pages * GUEST_PAGE_SIZE)

    async def _start_runner(
        self, index: int, role: QueueRole, queue: SplitQueue, *, enabled: bool
    ) -> QueueRunner:
        """Start the task that serves a queue."""
        runner = QueueRunner(index, role, queue, self._queues)
        for kind in FdKind:
            runner.set_fd(kind, self._vring_fds.get((index, kind)))
        runner.enabled = enabled
        self.runners[index] = runner
        assert self._nursery is not None
        await self._nursery.start(runner.run)
        return runner

    def _stop_runner(self, index: int) -> None:
        stopped = self.runners.pop(index, None)
        if stopped is not None:
            stopped.cancel_scope.cancel()
            log.info(
                "queue_stopped",
                queue=index,
                role=stopped.role.value,
                last_avail_idx=stopped.queue.last_avail_idx,
            )

    async def set_target(self, nbytes: int) -> None:
        """Ask the guest to put ``nbytes`` into the balloon (0: give everything back).

        The new num_pages is in the config space at once; the config-change message
        on the backend channel makes QEMU raise a config interrupt, and the guest reads
        it and inflates or deflates. While no driver runs the device, the target waits
        in the config space for the next one. ``BalloonTargetError`` if QEMU cannot be
        told: no backend channel (BACKEND_REQ not negotiated), or QEMU closed it (the
        device is unplugged). Either way this VM's connection and every other VM go on."""
        await self._handled_what_qemu_sent()
        # From here to the decision nothing waits: no message of QEMU's comes between.
        if self._backend is not None and self._backend.closed_by_peer():
            self._channel_lost("closed by QEMU")
        if self._backend is None:
            raise BalloonTargetError(f"VM {self.vm}: {self._no_backend}")
        config = self.device.config
        before = config.num_pages
        self._set_pages(nbytes // GUEST_PAGE_SIZE)
        if not self.driver_running():
            # No guest driver runs the device (a device just added, a VM booting,
            # rebooting or paused, a driver unbound, an unplug under way): QEMU is told
            # when the device starts again (_tell_at_start). Told now, QEMU 11.1.3 dies
            # of SIGSEGV: between a stop and the next start its vhost-user device has
            # no virtio device, and the config-change handler uses it regardless.
            log.info("balloon_target_set", vm=self.vm, told="at_start",
                     target_bytes=config.num_pages * GUEST_PAGE_SIZE)  # fmt: skip
            return
        try:
            await self._backend.config_changed()
        except PeerGone as err:
            self._channel_lost(str(err))
            self._set_pages(before)  # not told, not kept: the command failed
            raise BalloonTargetError(f"VM {self.vm}: {_CHANNEL_CLOSED}") from None
        log.info("balloon_target_set", vm=self.vm, target_bytes=config.num_pages * GUEST_PAGE_SIZE)

    async def _handled_what_qemu_sent(self) -> None:
        """Wait (up to ``_UNREAD_WAIT_S``) until the messages QEMU has already sent
        are handled: the first of a stop (SET_VRING_ENABLE 0) may be among them, held
        behind a report's discards, and the device must not be told once it stops."""
        deadline = trio.current_time() + _UNREAD_WAIT_S
        while self.stream.has_unread() and trio.current_time() < deadline:
            await trio.sleep(0.001)

    def _channel_lost(self, error: str) -> None:
        log.warning("backend_channel_closed", vm=self.vm, error=error)
        if self._backend is not None:
            self._backend.close()
        self._backend = None
        self._no_backend = _CHANNEL_CLOSED

    def driver_running(self) -> bool:
        """Whether a guest driver runs the device now: QEMU has started its queues and
        enabled every one, and not begun to stop them (a stop disables them one by one
        first, each after the reply to the one before)."""
        runners = self.runners.values()
        return bool(runners) and all(runner.enabled for runner in runners)

    def _set_pages(self, pages: int) -> None:
        """The balloon target in the config space, the kept targets, the saved state
        and the gauges, together."""
        self.device.set_target(pages)
        self.targets[self.vm] = pages * GUEST_PAGE_SIZE
        self._save(None)
        self.vm_metrics.set_balloon(pages, self.device.config.actual)

    def _set_vring_fd(self, index: int, kind: FdKind, fd: int | None) -> None:
        old = self._vring_fds.pop((index, kind), None)
        if old is not None:
            # Wake a runner waiting on the old kick fd before the number can be reused:
            # it then waits on the one set below.
            trio.lowlevel.notify_closing(old)
            close_fds([old])
        if fd is not None:
            os.set_blocking(fd, False)
            self._vring_fds[(index, kind)] = fd
        runner = self.runners.get(index)
        if runner is not None:
            runner.set_fd(kind, fd)
