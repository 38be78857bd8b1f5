"""One frontend connection (one VM): socket in, session, effects, queue tasks.

Theory of operation. The read loop takes exactly the bytes the decoder wants (the
12-byte header with its SCM_RIGHTS fds, then the payload), so fds always land on
the message they came with. Each message goes to the sans-IO ``Session``; its
effects are carried out here (map memory, swap eventfds, start or stop queue
tasks), and only then is the reply sent, so a REPLY_ACK means "done".

Messages that change memory or queues are handled under ``ring_lock``, which a
queue task holds while it serves a chain; config and feature queries are not, so
a vCPU waiting on GET_CONFIG never waits for a hole punch.

Every fd has one owner. Fds of a message belong to this connection until an
effect keeps them (then they live in ``memory`` or ``_vring_fds``) or they are
closed at once; everything is closed in ``_teardown`` on every exit path. A
protocol error or an unexpected exception ends this connection only.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from typing import Final

import structlog
import trio

from vhost_user_balloon.protocol import (
    DEFAULT_FEATURES,
    GUEST_PAGE_SIZE,
    MAX_FDS,
    AddRegion,
    BackendRequest,
    BalloonDevice,
    Effect,
    EnableQueue,
    FdCountError,
    FdKind,
    HeaderError,
    Message,
    MessageDecoder,
    Notice,
    RemoveRegion,
    Request,
    ResetDevice,
    Session,
    SetBackendChannel,
    SetMemory,
    SetVringFd,
    StartQueue,
    StopQueue,
    VhostUserError,
    encode_backend_request,
)

from .guestram import VmMemory, close_fds
from .metrics import Metrics
from .queues import QueueRunner

__all__ = ["LOCK_FREE_REQUESTS", "VmConnection"]

log = structlog.get_logger()

#: Requests that touch neither memory nor rings: answered at once, never behind a
#: discard in progress (GET_CONFIG holds a vCPU until we reply).
LOCK_FREE_REQUESTS: Final = frozenset(
    {Request.GET_CONFIG, Request.SET_CONFIG, Request.GET_FEATURES,
     Request.GET_PROTOCOL_FEATURES}
)  # fmt: skip
#: Room for more fds than any message may carry: the kernel silently closes fds that
#: do not fit, and we want to see (and refuse) a message that sent too many.
_ANCBUF: Final = socket.CMSG_SPACE(253 * 4)
#: How often the guest is asked for fresh statistics (QEMU's guest-stats-polling-interval
#: has no default; 5 s keeps the gauges current at a negligible cost to the guest).
DEFAULT_STATS_INTERVAL_S = 5.0
#: Seconds a started message may take to arrive whole. QEMU writes each message with
#: one sendmsg, so a peer that stops halfway is stuck or hostile. (An idle peer between
#: messages is normal and waits forever: a running VM may not talk for days.)
MESSAGE_TIMEOUT_S = 10.0


class VmConnection:
    """Serves one accepted frontend socket until EOF or a fatal error."""

    def __init__(
        self,
        vm: str,
        sock: trio.socket.SocketType,
        metrics: Metrics,
        *,
        discard: bool = True,
        discard_limiter: trio.CapacityLimiter | None = None,
        stats_interval: float = DEFAULT_STATS_INTERVAL_S,
        features: int = DEFAULT_FEATURES,
    ) -> None:
        self.vm = vm
        self.sock = sock
        #: seconds between requests for fresh guest statistics (0: never ask again)
        self.stats_interval = stats_interval
        self.metrics = metrics
        self.discard = discard
        self.discard_limiter = discard_limiter or trio.CapacityLimiter(2)
        self.device = BalloonDevice(features)
        self.session = Session(self.device)
        self.decoder = MessageDecoder()
        self.memory = VmMemory()
        self.ring_lock = trio.Lock()
        self.runners: dict[int, QueueRunner] = {}
        self._vring_fds: dict[tuple[int, FdKind], int] = {}
        self._nursery: trio.Nursery | None = None
        #: the channel for messages we start (SET_BACKEND_REQ_FD)
        self._backend: trio.socket.SocketType | None = None

    # -- QueueHost ------------------------------------------------------------------
    def vring_fd(self, index: int, kind: FdKind) -> int | None:
        return self._vring_fds.get((index, kind))

    # -- lifecycle ------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve until the frontend goes away; log why; always clean up."""
        structlog.contextvars.bind_contextvars(vm=self.vm)
        self.metrics.connected.labels(vm=self.vm).set(1)
        log.info("frontend_connected")
        why = "frontend_closed"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._read_loop()
                except VhostUserError as err:
                    why = "protocol_error"
                    self.metrics.protocol_errors.labels(vm=self.vm, reason=err.reason).inc()
                    log.error(
                        "connection_closed_on_error",
                        reason=err.reason,
                        error=str(err),
                        **err.values,
                    )
                finally:
                    nursery.cancel_scope.cancel()
        except (trio.Cancelled, KeyboardInterrupt):
            why = "shutdown"
            raise
        except Exception as err:
            why = "internal_error"
            self.metrics.protocol_errors.labels(vm=self.vm, reason="internal_error").inc()
            log.exception("connection_crashed", error=repr(err))
        finally:
            self._teardown()
            log.info("frontend_disconnected", why=why)

    def _teardown(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self.metrics.balloon_target_bytes.labels(vm=self.vm).set(0)
        self.metrics.balloon_actual_bytes.labels(vm=self.vm).set(0)
        for runner in self.runners.values():
            runner.cancel_scope.cancel()
        self.runners.clear()
        for fd in self._vring_fds.values():
            trio.lowlevel.notify_closing(fd)
        close_fds(self._vring_fds.values())
        self._vring_fds.clear()
        self.memory.close()
        close_fds(self.decoder.take_fds())
        self.sock.close()
        self.metrics.connected.labels(vm=self.vm).set(0)
        self.metrics.negotiated_features.labels(vm=self.vm).set(0)
        self.metrics.guest_stats.clear(self.vm)

    # -- reading --------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            msg = await self._receive()
            if msg is None:
                return
            await self._dispatch(msg)

    async def _receive(self) -> Message | None:
        while True:
            try:
                msg = self.decoder.next_message()
            except VhostUserError as err:
                close_fds(err.fds)
                if not err.recoverable:
                    raise
                await self._refuse(err, err.values.get("request", 0), err.need_reply)
                continue
            if msg is not None:
                return msg
            deadline = (
                trio.current_time() + MESSAGE_TIMEOUT_S if self.decoder.in_message else float("inf")
            )
            with trio.move_on_at(deadline) as waiting:
                data, ancdata, flags, _ = await self.sock.recvmsg(
                    self.decoder.bytes_wanted(), _ANCBUF, socket.MSG_CMSG_CLOEXEC
                )
            if waiting.cancelled_caught:
                raise HeaderError(
                    f"the frontend sent part of a message and nothing more for "
                    f"{MESSAGE_TIMEOUT_S:g} s",
                    reason="message_timeout",
                )
            fds = _take_fds(ancdata)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise FdCountError(
                    f"the frontend sent more file descriptors than {MAX_FDS}; the kernel "
                    "dropped some",
                    reason="too_many_fds",
                )
            if not data:
                close_fds(fds)
                if self.decoder.in_message:
                    raise HeaderError(
                        "the frontend closed the connection in the middle of a message",
                        reason="truncated_message",
                    )
                return None
            self.decoder.feed(data, fds)

    async def _refuse(self, err: VhostUserError, request: object, need_reply: bool) -> None:
        self.metrics.protocol_errors.labels(vm=self.vm, reason=err.reason).inc()
        log.warning("request_refused", reason=err.reason, error=str(err), **err.values)
        reply = self.session.failure_reply(
            int(request) if isinstance(request, int) else 0, need_reply
        )
        if reply is not None:
            await self._send(reply)

    # -- handling -------------------------------------------------------------------
    async def _dispatch(self, msg: Message) -> None:
        lock = contextlib.nullcontext() if msg.request in LOCK_FREE_REQUESTS else self.ring_lock
        async with lock:
            try:
                outcome = self.session.handle(msg)
            except VhostUserError as err:
                close_fds(msg.fds)
                if not err.recoverable:
                    raise
                await self._refuse(err, msg.request, msg.need_reply)
                return
            kept = outcome.kept_fds()
            close_fds(fd for fd in msg.fds if fd not in kept)
            for effect in outcome.effects:
                await self._apply(effect)
            if msg.request is Request.SET_FEATURES:
                self.metrics.negotiated_features.labels(vm=self.vm).set(self.session.features)
            elif msg.request is Request.SET_CONFIG:
                self.metrics.balloon_actual_bytes.labels(vm=self.vm).set(
                    self.device.config.actual * GUEST_PAGE_SIZE
                )
        if outcome.reply is not None:
            await self._send(outcome.reply)

    async def _apply(self, effect: Effect) -> None:
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
            case RemoveRegion(region=region, memory=memory):
                self.memory.remove(region, memory)
            case SetVringFd(index=index, kind=kind, fd=fd):
                self._set_vring_fd(index, kind, fd)
            case StartQueue(index=index, role=role, queue=queue):
                assert self.memory.memory is not None
                queue.load_used_index(self.memory.memory)
                if role is None:
                    return
                runner = QueueRunner(self, index, role, queue)
                self.runners[index] = runner
                assert self._nursery is not None
                await self._nursery.start(runner.run)
                log.info("queue_started", queue=index, role=role.value, size=queue.size)
            case StopQueue(index=index):
                stopped = self.runners.pop(index, None)
                if stopped is not None:
                    stopped.cancel_scope.cancel()
                    log.info(
                        "queue_stopped",
                        queue=index,
                        role=stopped.role.value,
                        last_avail_idx=stopped.queue.last_avail_idx,
                    )
            case EnableQueue(index=index, enabled=enabled):
                target = self.runners.get(index)
                if target is not None:
                    target.enabled = enabled
                    if enabled:
                        await target.service()  # anything kicked before the enable
            case ResetDevice():
                for each in self.runners.values():
                    each.cancel_scope.cancel()
                self.runners.clear()
                for index, kind in list(self._vring_fds):
                    self._set_vring_fd(index, kind, None)
                self.memory.close()
                log.info("device_reset")
            case Notice(event=event, message=message):
                log.warning(event, message=message)
            case SetBackendChannel(fd=fd):
                if self._backend is not None:
                    self._backend.close()
                self._backend = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    async def set_target(self, nbytes: int) -> None:
        """Ask the guest to put ``nbytes`` into the balloon (0: give everything back).

        The new num_pages is in the config space at once; the config-change message
        on the backend channel makes QEMU raise a config interrupt, and the guest reads
        it and inflates or deflates. Without the channel (BACKEND_REQ not negotiated)
        the guest would only see the target when it next reads its config."""
        if self._backend is None:
            raise VhostUserError(
                f"VM {self.vm}: QEMU opened no backend channel (BACKEND_REQ), so the guest "
                "cannot be told about a new balloon size",
                reason="no_backend_channel",
            )
        self.device.set_target(nbytes // GUEST_PAGE_SIZE)
        self.metrics.balloon_target_bytes.labels(vm=self.vm).set(
            self.device.config.num_pages * GUEST_PAGE_SIZE
        )
        data = encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG)
        view = memoryview(data)
        while view:
            view = view[await self._backend.send(view) :]
        log.info("balloon_target_set", target_bytes=self.device.config.num_pages * GUEST_PAGE_SIZE)

    def _set_vring_fd(self, index: int, kind: FdKind, fd: int | None) -> None:
        old = self._vring_fds.pop((index, kind), None)
        if old is not None:
            # Wake a runner waiting on the old kick fd before the number can be reused.
            trio.lowlevel.notify_closing(old)
            close_fds([old])
        if fd is not None:
            os.set_blocking(fd, False)
            self._vring_fds[(index, kind)] = fd

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds
