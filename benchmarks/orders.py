"""``orders``: the guest's reporting order, measured. One real guest per order (9, the
kernel's default; 7; 5; 10), each with its own daemon, all four side by side so that
the host's load is the same for each: a 1 GiB Debian 6.12 guest booted with
``page_reporting.page_reporting_order=N`` runs the test bed's mixed workload (64 tmpfs
files rewritten with sizes of 64 KiB to 4 MiB, a disk read and the page cache dropped
every 50 files) for ``--seconds``, then idles 70 s so that every churn check of
what it reported comes in. Per order: the MiB given back while the workload ran, the
share of it the guest had taken again 10 s and 60 s later (the daemon's churn sample,
and that share applied to what was given back), reports per second, and the daemon's
CPU per second (utime + stime of its process)."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import cpu_seconds
from testbed.guestrun import Env, GuestRun, GuestSpec, MiB, Sample, Scrape, run_guest

ORDERS = (9, 7, 5, 10)
SETTLE_S = 70
#: the daemon's families read here
DISCARDED = "vhost_user_balloon_discarded_bytes_total"
REPORTS = "vhost_user_balloon_reports_total"
CHECKED = "vhost_user_balloon_churn_checked_bytes_total"
RESIDENT = "vhost_user_balloon_churn_resident_bytes_total"


@dataclass
class Window:
    """What one guest's daemon said at the workload's start and end, and at the end."""

    order: int
    start: tuple[float, float, Scrape] | None = None  # (time, CPU seconds, scrape)
    end: tuple[float, float, Scrape] | None = None
    settled: Scrape | None = None
    markers: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def on_sample(self, run: GuestRun, sample: Sample) -> None:
        if not sample.metrics:
            return
        cpu = cpu_seconds(run.daemon_pid())
        if self.start is None and "mixed start" in run.markers:
            self.start = (sample.t, cpu, sample.metrics)
        if self.end is None and "mixed done" in run.markers:
            self.end = (sample.t, cpu, sample.metrics)
        done = run.markers.get("mixed done")
        if done is not None and sample.t > done + 62:  # every 60 s check is in
            self.settled = sample.metrics

    def row(self) -> dict[str, float]:
        assert self.start and self.end and self.settled, f"order {self.order}: {self.error}"
        (t0, cpu0, m0), (t1, cpu1, m1), end = self.start, self.end, self.settled
        seconds = t1 - t0
        given = m1.total(DISCARDED) - m0.total(DISCARDED)
        row = {
            "order": self.order,
            "seconds": seconds,
            "given_back_mib": given / MiB,
            "reports_per_s": (m1.total(REPORTS) - m0.total(REPORTS)) / seconds,
            "daemon_cpu_ms_per_s": (cpu1 - cpu0) / seconds * 1000,
        }
        for window in ("10s", "60s"):
            checked = end.total(CHECKED, window=window)
            share = end.total(RESIDENT, window=window) / checked if checked else 0.0
            row[f"taken_again_{window}_share"] = share
            row[f"taken_again_{window}_mib"] = share * given / MiB
            row[f"checked_{window}_mib"] = checked / MiB
        return row


def one(order: int, seconds: int, env: Env, disk: Path, window: Window) -> None:
    spec = GuestSpec(
        kernel="6.12", mem_mib=1024, rounds=0, settle_s=SETTLE_S, idle_s=3,
        append=f"page_reporting.page_reporting_order={order} vub.mixed={seconds}",
        qemu_extra=("-drive", f"file={env.inside(disk)},if=virtio,format=raw,readonly=on"),
        timeout_s=seconds + SETTLE_S + 400,
    )  # fmt: skip
    try:
        run = run_guest(spec, env, on_sample=window.on_sample,
                        stop_when=lambda r: window.settled is not None)  # fmt: skip
        window.markers = dict(run.markers)
        if window.settled is None:
            window.error = f"no end: markers {sorted(run.markers)}, {run.console[-5:]}"
    except Exception as err:  # reported with the row, the other orders go on
        window.error = repr(err)


def orders(seconds: int, chosen: Sequence[int]) -> list[dict[str, float]]:
    env = Env.load()
    folder = env.run_dir()
    windows = [Window(o) for o in chosen]
    threads = []
    for w in windows:
        disk = folder / f"disk-{w.order}.img"
        with open(disk, "wb") as f:
            f.truncate(1024 * MiB)
        threads.append(threading.Thread(target=one, args=(w.order, seconds, env, disk, w)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in windows:
        set_to = [k for k in w.markers if k.startswith("page_reporting_order=")]
        print(f"order {w.order}: the guest says {set_to or 'nothing'} {w.error}")
    rows = [w.row() for w in windows if not w.error]
    print(f"{'order':>5} {'given back':>11} {'again 10 s':>16} {'again 60 s':>16} "
          f"{'reports/s':>9} {'CPU ms/s':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['order']:5d} {r['given_back_mib']:9.0f} M "
              f"{r['taken_again_10s_mib']:7.0f} M ({r['taken_again_10s_share']:4.0%}) "
              f"{r['taken_again_60s_mib']:7.0f} M ({r['taken_again_60s_share']:4.0%}) "
              f"{r['reports_per_s']:9.1f} {r['daemon_cpu_ms_per_s']:8.1f}")  # fmt: skip
    for w in windows:
        if w.error:
            print(f"order {w.order} failed: {w.error}")
    return rows


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks orders", description=__doc__)
    p.add_argument("--seconds", type=int, default=180, help="the workload's length")
    p.add_argument("--orders", default=",".join(map(str, ORDERS)),
                   help=f"the orders to run, side by side (default {ORDERS})")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = orders(args.seconds, [int(o) for o in args.orders.split(",")])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if len(rows) == len(args.orders.split(",")) else 1
