"""A scrape saves the totals and collects with nothing counted in between, not even by
a discard thread (which counts reports now): what Prometheus sees is never more than
what the next process starts from. The real endpoint, over TCP, in this process."""

from __future__ import annotations

import threading
import urllib.request

import trio

from vhost_user_balloon.daemon.observing.http import open_metrics_listeners, serve_metrics
from vhost_user_balloon.daemon.observing.metrics import Metrics

REPORTS = 'vhost_user_balloon_reports_total{vm="web1"}'


async def test_a_report_counted_during_a_scrape_waits_for_the_next() -> None:
    metrics = Metrics()
    vm = metrics.for_vm("web1")
    vm.record_report({9: (1, 2 << 20)}, 2 << 20, {}, 0.001)
    saved: list[str] = []
    counted = threading.Event()

    def count_in_a_thread() -> None:  # as a discard thread does, mid-scrape
        vm.record_report({9: (1, 2 << 20)}, 2 << 20, {}, 0.001)
        counted.set()

    def save() -> None:
        saved.append(metrics.export_totals_json())
        thread = threading.Thread(target=count_in_a_thread)
        thread.start()
        thread.join(0.3)  # it waits for the lock the scrape holds, or it counts now

    listeners = await open_metrics_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_metrics, listeners, metrics.registry, save, metrics.lock)
        page = await trio.to_thread.run_sync(scrape)
        assert f"{REPORTS} 1.0" in page  # what was saved, not the report counted meanwhile
        assert '"vm":"web1"},1.0]' in saved[0]
        assert await trio.to_thread.run_sync(counted.wait, 5)
        assert f"{REPORTS} 2.0" in await trio.to_thread.run_sync(scrape)  # the next one
        nursery.cancel_scope.cancel()
