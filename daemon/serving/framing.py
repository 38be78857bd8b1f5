"""Moving vhost-user messages over a frontend's sockets: peek, read, take out, send.

Theory of operation. A message is first *peeked*: it stays in the socket while the
connection applies it, and is taken out (``consume``) only after the state that
includes it is saved for a hand-over (handover/records.py). A message that is not all in
the socket yet, or whose fds cannot be told apart from the next message's, is read
the ordinary way instead: exactly the bytes the decoder wants (the 12-byte header
with its SCM_RIGHTS fds, then the payload), so fds always land on the message they
came with.

Every write to a peer goes through ``send_all``; a peer that has gone away raises
``PeerGone``, which belongs to that peer's VM and nobody else.
"""

from __future__ import annotations

import select
import socket
from dataclasses import dataclass
from typing import Final

import trio

from vhost_user_balloon.protocol import (
    HEADER_SIZE,
    MAX_FDS,
    BackendRequest,
    FdCountError,
    Header,
    HeaderError,
    Message,
    MessageDecoder,
    VhostUserError,
    encode_backend_request,
)

from ..linux.fds import close_fds, take_fds

__all__ = [
    "MESSAGE_TIMEOUT_S",
    "BackendChannel",
    "FrontendStream",
    "PeerGone",
    "Received",
    "Refused",
]

#: Room for more fds than any message may carry: the kernel silently closes fds that
#: do not fit, and we want to see (and refuse) a message that sent too many.
_ANCBUF: Final = socket.CMSG_SPACE(253 * 4)
#: Seconds a started message may take to arrive whole. QEMU writes each message with
#: one sendmsg, so a peer that stops halfway is stuck or hostile. (An idle peer between
#: messages is normal and waits forever: a running VM may not talk for days.)
MESSAGE_TIMEOUT_S: Final = 10.0
#: How far past a peeked message we look to find where the write carrying its fds ends.
_PEEK_REACH: Final = 64 * 1024
#: What a peer that went away looks like when we write to it.
_GONE: Final = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    trio.ClosedResourceError,
)


class PeerGone(Exception):
    """The peer closed its end while we were writing to it."""


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``; ``PeerGone`` if the peer has closed its end."""
    view = memoryview(data)
    while view:
        try:
            sent = await sock.send(view)
        except _GONE as err:
            raise PeerGone(str(err) or type(err).__name__) from err
        view = view[sent:]


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded message; ``raw`` is its bytes if it is still in the socket (peeked),
    else ``b""`` (read the ordinary way)."""

    message: Message
    raw: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """A message the decoder refused but the connection can go on after (its fds are
    closed already); ``raw`` as in ``Received``."""

    error: VhostUserError
    raw: bytes


def _readable_now(fd: int) -> bool:
    """Whether ``fd`` has something to read (or its peer is gone), without waiting.
    poll, not select: select cannot take fds from 1024 up, which a daemon serving
    many VMs has (the service allows 16384)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class FrontendStream:
    """The vhost-user socket of one frontend."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.decoder = MessageDecoder()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        close_fds(self.decoder.take_fds())
        self.sock.close()

    async def send(self, data: bytes) -> None:
        await send_all(self.sock, data)

    def has_unread(self) -> bool:
        """Whether QEMU has sent something not taken out of the socket yet (a message
        being handled is taken out when its reply goes), seen without waiting."""
        fd = self.sock.fileno()
        return fd >= 0 and _readable_now(fd)

    async def receive(self) -> Received | Refused | None:
        """The next message (or refusal), or ``None`` at an EOF between messages.
        Raises a ``VhostUserError`` that ends the connection."""
        while True:
            if not self.decoder.in_message:
                peeked = await self._peek()
                if isinstance(peeked, _Eof):
                    return None
                if peeked is not None:
                    return peeked
            piece = await self._read_piece()
            if isinstance(piece, _Eof):
                return None
            if piece is not None:
                return piece

    async def consume(self, length: int) -> None:
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

    async def at_head(self, raw: bytes) -> bool:
        """Whether ``raw`` is what the socket holds next (without waiting: nothing to
        read means no)."""
        if not raw or not _readable_now(self.fileno()):
            return False
        head, _, _, _ = await self.sock.recvmsg(len(raw), 0, socket.MSG_PEEK)
        return head == raw

    # -- reading -----------------------------------------------------------------------
    async def _peek(self) -> Received | Refused | _Eof | None:
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
        return _decode(decoder, data)

    async def _read_piece(self) -> Received | Refused | _Eof | None:
        """A message read the ordinary way, ``_EOF``, or ``None`` when more is needed."""
        done = _decode(self.decoder, b"")
        if done is not None:
            return done
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


class _Eof:
    """The frontend closed the connection between two messages."""


_EOF: Final = _Eof()


def _decode(decoder: MessageDecoder, raw: bytes) -> Received | Refused | None:
    """The decoder's next message, a refusal the connection can go on after, or
    ``None`` if it has no whole message yet."""
    try:
        msg = decoder.next_message()
    except VhostUserError as err:
        close_fds(err.fds)
        if not err.keeps_connection:
            raise
        return Refused(err, raw)
    return None if msg is None else Received(msg, raw)


class BackendChannel:
    """The socket for messages the backend starts (SET_BACKEND_REQ_FD)."""

    def __init__(self, fd: int) -> None:
        self.sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def closed_by_peer(self) -> bool:
        """Whether QEMU has closed its end (it does when the device is unplugged),
        seen without reading or waiting."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))

    async def config_changed(self) -> None:
        """Tell QEMU the config space changed (it raises the guest's config interrupt).
        ``PeerGone`` if QEMU has closed the channel (the device was unplugged)."""
        await send_all(self.sock, encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG))
