"""Framing of vhost-user messages: header, fd rules, a feed-style decoder, encoders.

A message is a 12-byte header (request, flags, payload size), the payload, and the
file descriptors the sender attached with SCM_RIGHTS to the message's first byte.
``MessageDecoder`` takes bytes and fds as they come off the socket and hands out
``Message`` objects or typed errors. ``bytes_wanted`` says how many bytes finish the
piece being read, so a caller that reads exactly that many never reads across two
messages and always knows which message its fds belong to.

fd ownership: every fd fed to the decoder comes back out, either in a ``Message`` or
in the ``fds`` attribute of the error that rejected it. The caller closes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

from .codes import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    VERSION,
    BackendRequest,
    HeaderFlag,
    Request,
)
from .errors import FdCountError, HeaderError, UnknownRequestError, VhostUserError
from .payloads import MemoryTable, Payload, VringFile
from .requests import REQUESTS

__all__ = [
    "Header",
    "Message",
    "MessageDecoder",
    "decode_payload",
    "encode_backend_request",
    "encode_message",
    "encode_reply",
]

_HEADER = struct.Struct("=III")
# int(): the complement of an IntFlag stays inside its members and would hide bits.
_KNOWN_FLAGS = int(HeaderFlag.VERSION_MASK | HeaderFlag.REPLY | HeaderFlag.NEED_REPLY)


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte header, checked: known flag bits, version 1, size within bounds."""

    request: int
    flags: int
    size: int

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        request, flags, size = _HEADER.unpack(data)
        if flags & ~_KNOWN_FLAGS:
            raise HeaderError(
                f"header flags {flags:#x} set reserved bits (only bits 0-3 are defined)",
                reason="bad_flags",
                request=request,
                flags=flags,
            )
        if flags & HeaderFlag.VERSION_MASK != VERSION:
            raise HeaderError(
                f"header says protocol version {flags & HeaderFlag.VERSION_MASK}; "
                f"only version {VERSION} exists",
                reason="bad_version",
                request=request,
                flags=flags,
            )
        if flags & HeaderFlag.REPLY:
            raise HeaderError(
                "the frontend sent a message with the reply bit set",
                reason="unexpected_reply",
                request=request,
                flags=flags,
            )
        if size > MAX_PAYLOAD_SIZE:
            raise HeaderError(
                f"payload size {size} exceeds the {MAX_PAYLOAD_SIZE}-byte limit",
                reason="oversized_message",
                request=request,
                size=size,
                limit=MAX_PAYLOAD_SIZE,
            )
        return cls(request, flags, size)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded front-end request with its payload and the fds that came with it."""

    request: Request
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    def to_bytes(self) -> bytes:
        """The exact bytes on the wire (without the fds, which travel beside them)."""
        body = self.payload.to_bytes()
        return Header(self.request, self.flags, len(body)).to_bytes() + body


def _check_fds(request: Request, payload: Payload, nfds: int) -> None:
    rule = REQUESTS[request].fds
    if rule is not None:
        low, high = rule
    elif isinstance(payload, MemoryTable):
        low = high = len(payload.regions)
    else:
        assert isinstance(payload, VringFile)
        low = high = 0 if payload.nofd else 1
    if not low <= nfds <= high:
        expected = str(low) if low == high else f"{low} to {high}"
        raise FdCountError(
            f"{request.name} carried {nfds} file descriptors, expected {expected}",
            reason="bad_fd_count",
            request=request.name,
            nfds=nfds,
            expected=expected,
        )


def decode_payload(header: Header, body: bytes, fds: tuple[int, ...]) -> Message:
    """Turn a checked header, its payload and its fds into a ``Message`` or a typed error."""
    try:
        request = Request(header.request)
    except ValueError:
        raise UnknownRequestError(
            f"unknown request {header.request} (payload of {header.size} bytes skipped)",
            request=header.request,
            size=header.size,
        ) from None
    payload = REQUESTS[request].payload.from_bytes(body)
    _check_fds(request, payload, len(fds))
    return Message(request, header.flags, payload, fds)


class MessageDecoder:
    """Feed-style decoder: bytes and fds in, messages or typed errors out.

    Fds fed while a message is being read belong to that message; fds fed at a
    message boundary belong to the next one. After an error that leaves the stream
    out of step (a bad header: where the next message starts is unknown) the decoder
    refuses further use.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._header: Header | None = None
        self._broken: VhostUserError | None = None

    def feed(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        self._fds.extend(fds)
        self._buffer += data

    def bytes_wanted(self) -> int:
        """Bytes that complete the header or payload now being read (>= 1)."""
        if self._header is None:
            return max(HEADER_SIZE - len(self._buffer), 1)
        return max(self._header.size - len(self._buffer), 1)

    @property
    def in_message(self) -> bool:
        """True when part of a message has been read (an EOF now truncates it)."""
        return bool(self._buffer) or self._header is not None or bool(self._fds)

    def take_fds(self) -> tuple[int, ...]:
        """Hand back every fd still held (for the caller to close on teardown)."""
        fds, self._fds = tuple(self._fds), []
        return fds

    def next_message(self) -> Message | None:
        """The next whole message, or ``None`` if more bytes are needed."""
        if self._broken is not None:
            raise HeaderError(
                f"decoder is out of sync after an earlier error: {self._broken}",
                reason="decoder_broken",
            )
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            try:
                self._header = Header.from_bytes(bytes(self._buffer[:HEADER_SIZE]))
            except VhostUserError as err:
                err.request_code = _HEADER.unpack_from(self._buffer)[0]
                self._fail(err, in_step=False)
            del self._buffer[:HEADER_SIZE]
        header = self._header
        if len(self._buffer) < header.size:
            return None
        body = bytes(self._buffer[: header.size])
        del self._buffer[: header.size]
        self._header = None
        if len(self._fds) > MAX_FDS:
            self._fail(
                FdCountError(
                    f"message carried {len(self._fds)} file descriptors; at most {MAX_FDS}",
                    reason="too_many_fds",
                    nfds=len(self._fds),
                    limit=MAX_FDS,
                ),
                in_step=True,
            )
        fds = self.take_fds()
        try:
            return decode_payload(header, body, fds)
        except VhostUserError as err:
            err.fds = fds
            err.need_reply = header.need_reply
            err.request_code = header.request
            # The payload was consumed whole, so the stream is still in step; the
            # connection goes on only if the error allows it.
            self._broken = None if err.keeps_connection else err
            raise

    def _fail(self, err: VhostUserError, *, in_step: bool) -> NoReturn:
        """Raise ``err`` with the fds read so far. ``in_step``: the message was skipped
        whole and the next one starts where the decoder stands."""
        err.fds = self.take_fds()
        if in_step:
            self._header = None
        else:
            self._broken = err
        raise err


def encode_message(request: Request, payload: Payload, *, need_reply: bool = False) -> bytes:
    """A front-end request as bytes (for test frontends and fuzzers)."""
    flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return Message(request, flags, payload).to_bytes()


def encode_backend_request(
    request: BackendRequest, payload: Payload | None = None, *, need_reply: bool = False
) -> bytes:
    """A message the backend starts, on the backend channel (SET_BACKEND_REQ_FD)."""
    body = payload.to_bytes() if payload is not None else b""
    flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return Header(request, flags, len(body)).to_bytes() + body


def encode_reply(request: int, payload: Payload) -> bytes:
    """A backend reply: the request code echoed, version 1 and the reply bit."""
    body = payload.to_bytes()
    return Header(request, VERSION | HeaderFlag.REPLY, len(body)).to_bytes() + body
