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

Surviving a restart (handover.py). With a keeper, a message is first *peeked*: it
stays in the socket while it is applied, and is taken out only after the state that
includes it is saved, together with the reply it needs. A process killed at any
point leaves either the message in the socket and the old state (the next process
applies it), or the new state and the reply still owed (the next process takes the
message out if it is still there and sends the reply). What is left: a kill in the
microseconds between sending a reply and saving that it was sent makes the next
process send it again. A message not sent in one piece (QEMU always sends one) is
read the ordinary way and is lost if the process dies while handling it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from typing import Final

import structlog
import trio

from vhost_user_balloon.protocol import (
    DEFAULT_FEATURES,
    GUEST_PAGE_SIZE,
    HEADER_SIZE,
    MAX_FDS,
    AddRegion,
    BackendRequest,
    BalloonDevice,
    Effect,
    EnableQueue,
    FdCountError,
    FdKind,
    Header,
    HeaderError,
    LocalProtocolError,
    Message,
    MessageDecoder,
    Notice,
    QueueState,
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

from .fds import close_fds, take_fds
from .guestram import VmMemory
from .handover import FdStore, StateFile, StoredVm, VmKeeper
from .metrics import Metrics
from .queues import QueueRunner

__all__ = ["LOCK_FREE_REQUESTS", "AdoptError", "VmConnection"]

log = structlog.get_logger()

#: Requests that touch neither memory nor rings: answered at once, never behind a
#: discard in progress (GET_CONFIG holds a vCPU until we reply).
LOCK_FREE_REQUESTS: Final = frozenset(
    {Request.GET_CONFIG, Request.SET_CONFIG, Request.GET_FEATURES,
     Request.GET_PROTOCOL_FEATURES}
)  # fmt: skip
#: Requests that change nothing we save: after them only the owed reply is written.
READ_ONLY_REQUESTS: Final = frozenset(
    {Request.GET_CONFIG, Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
     Request.GET_MAX_MEM_SLOTS}
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
#: How far past a peeked message we look to find where the write carrying its fds ends.
_PEEK_REACH: Final = 64 * 1024
#: Version of the saved connection record (the session inside has its own).
RECORD_FORMAT = 1


class _Eof:
    """The frontend closed the connection between two messages."""


_EOF: Final = _Eof()


class _Refused:
    """A message the decoder refused, already answered."""


_REFUSED: Final = _Refused()


class _FrontendGone(Exception):
    """The frontend closed its end while we were writing to it."""


class AdoptError(Exception):
    """A stored connection cannot be taken up; the message says why."""


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
        keeper: VmKeeper | None = None,
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
        #: holds our fds across a restart (None: no keeper, a restart ends the VM's link)
        self.keeper = keeper
        #: set by ``adopt``: a message applied and a reply owed by the process before
        self._owed: dict[str, str | None] | None = None
        self._adopted = False
        #: the last record saved (what ``_save`` writes again when nothing changed)
        self._record: dict[str, object] | None = None

    # -- QueueHost ------------------------------------------------------------------
    def vring_fd(self, index: int, kind: FdKind) -> int | None:
        return self._vring_fds.get((index, kind))

    # -- lifecycle ------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve until the frontend goes away; log why; always clean up."""
        structlog.contextvars.bind_contextvars(vm=self.vm)
        self.metrics.connected.labels(vm=self.vm).set(1)
        log.info("frontend_adopted" if self._adopted else "frontend_connected")
        why = "shutdown"  # unless the frontend or an error ends it first
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if self._adopted:
                        await self._resume()
                    elif self.keeper is not None:
                        self.keeper.put_fixed("conn", self.sock.fileno())
                        self._save(None)
                    await self._read_loop()
                    why = "frontend_closed"
                except _FrontendGone:
                    why = "frontend_closed"
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
        except* Exception as group:
            # (except*: an error that comes with a cancellation is still logged, and
            # the cancellation still goes on.)
            why = "internal_error"
            self.metrics.protocol_errors.labels(vm=self.vm, reason="internal_error").inc()
            for problem in group.exceptions:
                log.error("connection_crashed", error=repr(problem), exc_info=problem)
        finally:
            self._teardown(keep=why == "shutdown")
            log.info("frontend_disconnected", why=why, kept=why == "shutdown" and bool(self.keeper))

    def _teardown(self, *, keep: bool = False) -> None:
        """Close everything. With ``keep``, the keeper goes on holding the connection
        for the next process; otherwise it lets go too and QEMU sees the end."""
        if self.keeper is not None:
            if keep:
                self.keeper.close()
            else:
                self.keeper.release_all()
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

    # -- hand-over --------------------------------------------------------------------
    def _save(self, owed: dict[str, str | None] | None, *, changed: bool = True) -> None:
        """Write this connection's state for the next process (no-op without a keeper).
        Called with every change applied and nothing of it sent to QEMU yet. Without
        ``changed`` (nothing but ``owed`` differs) the last record is written again."""
        keeper = self.keeper
        if keeper is None:
            return
        if not changed and self._record is not None:
            keeper.state.write({**self._record, "owed": owed})
            return
        regions = [keeper.keep(m.fd) for m in self.memory.by_index]
        vrings = [(i, kind.value, keeper.keep(fd)) for (i, kind), fd in self._vring_fds.items()]
        backend = None if self._backend is None else keeper.keep(self._backend.fileno())
        record = {
            "format": RECORD_FORMAT,
            "vm": self.vm,
            "session": self.session.export_state(),
            "regions": regions,
            "vrings": vrings,
            "backend": backend,
            "owed": owed,
        }
        self._record = record
        keeper.save(record, [*regions, *(v[2] for v in vrings), *([backend] if backend else [])])

    @classmethod
    def adopt(
        cls, stored: StoredVm, metrics: Metrics, store: FdStore, **options: object
    ) -> VmConnection:
        """Take up a connection a previous process served, from the fds the keeper
        passed. On failure every fd is closed and the keeper told to let go."""
        state_fd, conn_fd = stored.get("state"), stored.get("conn")
        keeper = VmKeeper(store, stored.vm, StateFile(state_fd if state_fd is not None else -1))
        for name, fd in stored.fds.items():
            keeper.adopt(name, fd)
        try:
            if state_fd is None or conn_fd is None:
                raise AdoptError("the keeper holds no saved state or no connection for it")
            record = keeper.state.read()
            if record is None or record.get("format") != RECORD_FORMAT:
                raise AdoptError("its saved state is unreadable or from another version")
            sock = socket.socket(fileno=os.dup(conn_fd))
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.close()
                raise AdoptError(f"stored fd {conn_fd} is not a unix stream socket")
            session = Session.restore(record["session"])
            conn = cls(
                stored.vm,
                trio.socket.from_stdlib_socket(sock),
                metrics,
                features=session.device.features,
                keeper=keeper,
                **options,  # type: ignore[arg-type]
            )
            try:
                conn._restore(session, record, stored.fds)
            except BaseException:
                conn._teardown()
                raise
        except (AdoptError, LocalProtocolError, VhostUserError, OSError) as err:
            keeper.release_all()
            raise AdoptError(f"VM {stored.vm}: cannot take up its connection: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            keeper.release_all()
            raise AdoptError(f"VM {stored.vm}: its saved state is malformed: {err!r}") from err
        return conn

    def _restore(self, session: Session, record: dict[str, object], fds: dict[str, int]) -> None:
        self.session, self.device = session, session.device
        if session.memory is not None:
            names = record["regions"]
            assert isinstance(names, list)
            dups = [os.dup(fds[str(name)]) for name in names]
            try:
                self.memory.replace(session.memory, dups)
            except BaseException:
                close_fds(dups)
                raise
        vrings = record["vrings"]
        assert isinstance(vrings, list)
        for index, kind, name in vrings:
            self._set_vring_fd(int(index), FdKind(kind), os.dup(fds[str(name)]))
        if record["backend"] is not None:
            fd = os.dup(fds[str(record["backend"])])
            self._backend = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        owed = record["owed"]
        self._owed = None if owed is None else dict(owed)  # type: ignore[call-overload]
        self._adopted = True
        self.metrics.negotiated_features.labels(vm=self.vm).set(session.features)
        self.metrics.balloon_target_bytes.labels(vm=self.vm).set(
            self.device.config.num_pages * GUEST_PAGE_SIZE
        )
        self.metrics.balloon_actual_bytes.labels(vm=self.vm).set(
            self.device.config.actual * GUEST_PAGE_SIZE
        )

    async def _resume(self) -> None:
        """Finish what the previous process left: the reply it owed, then every started
        queue from where the guest's used ring says it got to."""
        owed, self._owed = self._owed, None
        if owed is not None:
            message = bytes.fromhex(owed.get("message") or "")
            # Still at the head of the socket, or already taken out? (Nothing to read
            # means taken: QEMU sends nothing more while it waits for a reply.)
            readable = select.select([self.sock.fileno()], [], [], 0)[0]
            still_there = False
            if message and readable:
                head, _, _, _ = await self.sock.recvmsg(len(message), 0, socket.MSG_PEEK)
                still_there = head == message
                if still_there:
                    await self._consume(len(message))
            reply = owed.get("reply")
            if reply:
                await self._send(bytes.fromhex(reply))
            log.info(
                "owed_reply_sent" if reply else "owed_message_done",
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
                continue
            runner = QueueRunner(self, v.index, role, v.queue)
            runner.enabled = v.enabled
            self.runners[v.index] = runner
            assert self._nursery is not None
            await self._nursery.start(runner.run)
            log.info("queue_resumed", queue=v.index, role=role.value, outstanding=waiting)
            done = v.queue.used_idx
            async with self.ring_lock:
                await runner.service()
            if v.queue.used_idx == done:
                # The last process may have handed chains back without the interrupt
                # (a spare one is harmless: the guest finds nothing new).
                runner.signal_call()

    # -- reading --------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            incoming = await self._receive()
            if incoming is None:
                return
            await self._dispatch(*incoming)

    async def _receive(self) -> tuple[Message, bytes] | None:
        """The next message, and its bytes if they are still in the socket (peeked)."""
        while True:
            if not self.decoder.in_message:
                peeked = await self._peek()
                if isinstance(peeked, _Eof):
                    return None
                if peeked is not None:
                    decoder, raw = peeked
                    msg = await self._decode(decoder, raw)
                    if isinstance(msg, Message):
                        return msg, raw
                    continue  # refused and answered
            piece = await self._read_piece()
            if isinstance(piece, _Eof):
                return None
            if piece is not None:
                return piece, b""

    async def _peek(self) -> tuple[MessageDecoder, bytes] | _Eof | None:
        """A whole message seen without taking it from the socket, ``_EOF``, or ``None``
        if it is not all there yet (it is then read piece by piece)."""
        head, _, _, _ = await self.sock.recvmsg(HEADER_SIZE, 0, socket.MSG_PEEK)
        if not head:
            return _EOF
        if len(head) < HEADER_SIZE:
            return None
        try:
            total = HEADER_SIZE + Header.from_bytes(head).size
        except VhostUserError:
            return None  # the piecewise read reports it
        data, ancdata, flags, _ = await self.sock.recvmsg(
            total, _ANCBUF, socket.MSG_PEEK | socket.MSG_CMSG_CLOEXEC
        )
        fds = take_fds(ancdata)
        if len(data) < total or flags & socket.MSG_CTRUNC:
            close_fds(fds)
            return None
        if fds:
            # A peek hands out the fds of the first fd-carrying write at or after the
            # start, even one beyond the bytes asked for. They are this message's only
            # if that write ends where the message does (a peek stops after it).
            reach, _, _, _ = await self.sock.recvmsg(total + _PEEK_REACH, 0, socket.MSG_PEEK)
            if len(reach) != total:
                close_fds(fds)
                return None
        decoder = MessageDecoder()
        decoder.feed(data, fds)
        return decoder, data

    async def _consume(self, length: int) -> None:
        """Take a peeked message out of the socket; the fds it carries again are dups."""
        while length > 0:
            data, ancdata, _, _ = await self.sock.recvmsg(length, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
            close_fds(take_fds(ancdata))
            if not data:
                raise HeaderError(
                    "the frontend's socket ended inside a message already read",
                    reason="truncated_message",
                )
            length -= len(data)

    async def _decode(self, decoder: MessageDecoder, raw: bytes) -> Message | _Refused | None:
        """The decoder's next message, ``None`` if it has none yet, or ``_REFUSED`` for
        one we can carry on after (answered here)."""
        try:
            return decoder.next_message()
        except VhostUserError as err:
            close_fds(err.fds)
            if not err.recoverable:
                raise
            await self._finish(
                raw, self._refusal(err, err.values.get("request", 0), err.need_reply)
            )
            return _REFUSED

    async def _read_piece(self) -> Message | _Eof | None:
        """A message, ``_EOF``, or ``None`` when more bytes are needed."""
        msg = await self._decode(self.decoder, b"")
        if isinstance(msg, _Refused):
            return None  # the next message may be peeked again
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
                f"the frontend sent part of a message and nothing more for {MESSAGE_TIMEOUT_S:g} s",
                reason="message_timeout",
            )
        fds = take_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise FdCountError(
                f"the frontend sent more file descriptors than {MAX_FDS}; the kernel dropped some",
                reason="too_many_fds",
            )
        if not data:
            close_fds(fds)
            if self.decoder.in_message:
                raise HeaderError(
                    "the frontend closed the connection in the middle of a message",
                    reason="truncated_message",
                )
            return _EOF
        self.decoder.feed(data, fds)
        return None

    def _refusal(self, err: VhostUserError, request: object, need_reply: bool) -> bytes | None:
        self.metrics.protocol_errors.labels(vm=self.vm, reason=err.reason).inc()
        log.warning("request_refused", reason=err.reason, error=str(err), **err.values)
        return self.session.failure_reply(
            int(request) if isinstance(request, int) else 0, need_reply
        )

    # -- handling -------------------------------------------------------------------
    async def _dispatch(self, msg: Message, raw: bytes) -> None:
        lock = contextlib.nullcontext() if msg.request in LOCK_FREE_REQUESTS else self.ring_lock
        reply: bytes | None
        async with lock:
            try:
                outcome = self.session.handle(msg)
            except VhostUserError as err:
                close_fds(msg.fds)
                if not err.recoverable:
                    raise
                reply = self._refusal(err, msg.request, msg.need_reply)
            else:
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
                reply = outcome.reply
        await self._finish(raw, reply, changed=msg.request not in READ_ONLY_REQUESTS)

    async def _finish(self, raw: bytes, reply: bytes | None, *, changed: bool = False) -> None:
        """Save what the message changed with the reply it owes, take it out of the
        socket (if peeked), answer, and save that nothing is owed. Not cancellable:
        a stop in the middle would leave QEMU waiting."""
        with trio.CancelScope(shield=True):
            if self.keeper is not None:
                owed = {"message": raw.hex(), "reply": None if reply is None else reply.hex()}
                self._save(owed, changed=changed)
            if raw:
                await self._consume(len(raw))
            if reply is not None:
                await self._send(reply)
            if self.keeper is not None:
                self._save(None, changed=False)

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
        self._save(None)
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
            try:
                sent = await self.sock.send(view)
            except (BrokenPipeError, ConnectionResetError) as err:
                raise _FrontendGone from err
            view = view[sent:]
