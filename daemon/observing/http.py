"""A small HTTP endpoint on trio for ``GET /metrics`` (Prometheus text format).

It speaks just enough HTTP/1.x for a scraper or ``curl``: one request per
connection, bounded in size and time, so a slow or hostile client cannot hold
anything for long.

A scrape saves the totals and collects every series in the event loop, one after the
other with nothing in between, holding the lock under which the discard threads count
reports (what Prometheus sees is never more than what a next process starts from),
and then writes the page from that snapshot in a worker thread: at 256 VMs the
writing is the larger part (~40-60 ms), and a vCPU waiting on GET_CONFIG must not
wait for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Final

import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

__all__ = [
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_S",
    "open_metrics_listeners",
    "receive_until",
    "serve_metrics",
]

log = structlog.get_logger()

#: A scrape request is a few hundred bytes; anything past this is not one.
MAX_REQUEST_BYTES: Final = 8192
#: How long a client may take to send its request.
REQUEST_TIMEOUT_S: Final = 5.0

_INDEX = (
    b"<html><head><title>vhost-user-balloon</title></head><body>"
    b"<h1>vhost-user-balloon</h1><p><a href='/metrics'>Metrics</a></p></body></html>\n"
)


async def receive_until(stream: trio.SocketStream, end: bytes, limit: int, timeout: float) -> bytes:
    """What a client sends until ``end``, at most about ``limit`` bytes and ``timeout``
    seconds: a slow or endless client gets cut off, not waited for."""
    data = b""
    with trio.move_on_after(timeout):
        while end not in data and len(data) < limit:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data


def _response(status: str, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


async def _handle(
    stream: trio.SocketStream,
    registry: CollectorRegistry,
    before_scrape: Callable[[], None] | None = None,
    lock: threading.Lock | None = None,
) -> None:
    try:
        data = await receive_until(stream, b"\r\n\r\n", MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S)
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            reply = _response("400 Bad Request", "text/plain", b"bad request\n", False)
        else:
            head_only = parts[0] == b"HEAD"
            path = parts[1].split(b"?", 1)[0]
            if path == b"/metrics":
                with lock or contextlib.nullcontext():  # nor in another thread
                    if before_scrape is not None:
                        before_scrape()  # nothing runs between this and the collecting
                    collected = Collected(list(registry.collect()))
                page = await trio.to_thread.run_sync(generate_latest, collected)
                reply = _response("200 OK", CONTENT_TYPE_LATEST, page, head_only)
            elif path == b"/":
                reply = _response("200 OK", "text/html", _INDEX, head_only)
            else:
                reply = _response("404 Not Found", "text/plain", b"not found\n", head_only)
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away; nothing to do
    finally:
        await stream.aclose()


class Collected:
    """Series already collected, for ``generate_latest`` to write out (in a thread:
    the snapshot is the thread's alone)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


async def open_metrics_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the metrics address (port 0 picks a free one); ``OSError`` if it cannot."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve_metrics(
    listeners: list[trio.SocketListener],
    registry: CollectorRegistry,
    before_scrape: Callable[[], None] | None = None,
    lock: threading.Lock | None = None,
) -> None:
    """Answer scrapes on ``listeners`` forever; ``before_scrape`` runs before each,
    and it and the collecting under ``lock`` (what is counted outside the event loop
    takes it too)."""

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, registry, before_scrape, lock)

    await trio.serve_listeners(handler, listeners)
