"""``scrape``: how long the event loop stops while /metrics is scraped at 256 VMs,
against the page written in the loop as before."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Awaitable, Callable

import trio
from prometheus_client import generate_latest

from benchmarks.common import Options, p99
from tests.frontend import MiB
from vhost_user_balloon.daemon.handover.store import TOTALS_SLOT_BYTES, StateFile
from vhost_user_balloon.daemon.observing.http import open_metrics_listeners, serve_metrics
from vhost_user_balloon.daemon.observing.metrics import Metrics


async def scrape_stall(vms: int, scrapes: int) -> dict[str, float]:
    """How long the event loop stops while /metrics is scraped at ``vms`` VMs: a task
    that wakes every millisecond records how late it wakes, while the daemon's metrics
    endpoint (daemon/http.py) answers ``scrapes`` scrapes; against the same task while
    the page is written in the loop, as it was before (the baseline, same run)."""
    m = Metrics()
    for i in range(vms):
        m.for_vm(f"vm{i}").record_report(
            {9: (16, 32 * MiB), 10: (16, 64 * MiB)}, 96 * MiB, {"unaligned": 4096}, 0.01
        )
    state = StateFile.create("bench", TOTALS_SLOT_BYTES)

    def save() -> None:
        state.write_json(f'{{"format":1,"totals":{m.export_totals_json()}}}')

    async def lateness(during: Callable[[], Awaitable[None]]) -> list[float]:
        late: list[float] = []
        done = False

        async def ticker() -> None:
            while not done:
                t = time.perf_counter()
                await trio.sleep(0.001)
                late.append(time.perf_counter() - t - 0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await during()
            done = True
        return late

    listeners = await open_metrics_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]

    def get() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            r.read()

    async def scrape_now() -> None:
        for _ in range(scrapes):
            await trio.to_thread.run_sync(get)

    async def render_in_loop() -> None:
        for _ in range(scrapes):
            save()
            generate_latest(m.registry)
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_metrics, listeners, m.registry, save, m.lock)
        now = await lateness(scrape_now)
        before = await lateness(render_in_loop)
        nursery.cancel_scope.cancel()
    os.close(state.fd)
    print(f"loop late during scrapes, {vms} VMs:        max {max(now) * 1e3:6.1f} ms  "
          f"p99 {p99(now) * 1e3:.2f} ms")  # fmt: skip
    print(f"loop late, page written in the loop (before): max {max(before) * 1e3:6.1f} ms  "
          f"p99 {p99(before) * 1e3:.2f} ms")  # fmt: skip
    return {"max_ms": max(now) * 1e3, "before_max_ms": max(before) * 1e3}


def run(options: Options) -> dict[str, object]:
    return dict(trio.run(scrape_stall, 256, 5 if options.quick else 20))
