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


async def lateness(during: Callable[[], Awaitable[None]]) -> list[float]:
    """How late a task that sleeps a millisecond at a time wakes, while ``during`` runs."""
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


def busy_metrics(vms: int) -> Metrics:
    """The series of ``vms`` VMs that each served a report."""
    m = Metrics()
    for i in range(vms):
        m.for_vm(f"vm{i}").record_report(
            {9: (16, 32 * MiB), 10: (16, 64 * MiB)}, 96 * MiB, {"unaligned": 4096}, 0.01
        )
    return m


async def scrape_stall(vms: int, scrapes: int) -> dict[str, float]:
    """How long the event loop stops while /metrics is scraped at ``vms`` VMs: a task
    that wakes every millisecond records how late it wakes, while the daemon's metrics
    endpoint (daemon/observing/http.py) answers ``scrapes`` scrapes; against the same
    task while the page is written in the loop, as it was before (the baseline)."""
    m = busy_metrics(vms)
    state = StateFile.create("bench", TOTALS_SLOT_BYTES)

    def save() -> None:  # what Daemon.save_totals does before every scrape
        state.write_json(f'{{"format":1,"totals":{m.export_totals_json()}}}')

    listeners = await open_metrics_listeners("127.0.0.1", 0)
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/metrics"

    def get() -> None:
        with urllib.request.urlopen(url, timeout=30) as r:
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
