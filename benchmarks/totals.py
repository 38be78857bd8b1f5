"""``totals``: saving the metric totals for the next process at 256 VMs (done in the
event loop before every scrape), against rendering the /metrics page."""

from __future__ import annotations

import os
import statistics
import time

from prometheus_client import generate_latest

from benchmarks.common import Options, spread
from benchmarks.scrape import busy_metrics
from tests.frontend import MiB
from vhost_user_balloon.daemon.handover.store import TOTALS_SLOT_BYTES, StateFile


def totals(vms: int, repeats: int) -> dict[str, float]:
    """Saving the metric totals for the next process (done in the event loop before
    every scrape), against rendering the same /metrics page (the baseline)."""
    m = busy_metrics(vms)
    children = [m.for_vm(f"vm{i}") for i in range(vms)]
    for i in range(vms):
        m.protocol_errors.labels(vm=f"vm{i}", reason="bad_flags").inc()
        m.balloon_inflated_bytes.labels(vm=f"vm{i}").inc(4096)
    state = StateFile.create("bench", TOTALS_SLOT_BYTES)

    def save() -> None:  # what Daemon.save_totals does
        state.write_json(f'{{"format":1,"totals":{m.export_totals_json()}}}')

    changed, unchanged, render = [], [], []
    collect_changed, collect_unchanged = [], []
    for _ in range(repeats):
        for vm in children:  # every VM reported since the last scrape
            vm.record_report({9: (16, 32 * MiB)}, 32 * MiB, {}, 0.01)
        t = time.perf_counter()
        save()
        changed.append(time.perf_counter() - t)
        t = time.perf_counter()
        list(m.registry.collect())  # what a scrape collects in the loop after the save
        collect_changed.append(time.perf_counter() - t)
        t = time.perf_counter()
        save()
        unchanged.append(time.perf_counter() - t)
        t = time.perf_counter()
        list(m.registry.collect())
        collect_unchanged.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate_latest(m.registry)
        render.append(time.perf_counter() - t)
    size = len(m.export_totals_json())
    os.close(state.fd)
    print(f"save totals, {vms} VMs ({size >> 10} KiB), every VM changed: {spread(changed)}")
    print(f"save totals, {vms} VMs, nothing changed:          {spread(unchanged)}")
    print(f"render /metrics, {vms} VMs (baseline):            {spread(render)}")
    print(f"collect the series, every VM changed:             {spread(collect_changed)}")
    print(f"collect the series, nothing changed:              {spread(collect_unchanged)}")
    ratio = statistics.median(changed) / statistics.median(render)
    print(f"  ratio save/render: {ratio:.2f}")
    return {
        "save_ms": statistics.median(changed) * 1000,
        "save_unchanged_ms": statistics.median(unchanged) * 1000,
        "ratio": ratio,
        "collect_ms": statistics.median(collect_changed) * 1000,
        "collect_unchanged_ms": statistics.median(collect_unchanged) * 1000,
    }


def run(options: Options) -> dict[str, object]:
    return dict(totals(256, 5 if options.quick else 20))
