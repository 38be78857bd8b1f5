"""``scale``: 64 VMs on one daemon, each reporting 128 MiB every 2 s: service times,
daemon CPU per GiB reclaimed, daemon memory without guest RAM; and 8 idle VMs for
10 s (CPU time, wakeups)."""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass, field

import trio

from benchmarks.common import (
    REPORT_BASE,
    Options,
    attached,
    cpu_seconds,
    daemon_process,
    p99,
    populate,
    spread,
    status,
    timed_report,
)
from tests.frontend import FakeFrontend, GuestMemfd, MiB


@dataclass
class Load:
    """Every VM reporting ``per_report`` bytes every 2 s for ``seconds``."""

    seconds: float
    per_report: int
    service_times: list[float] = field(default_factory=list)
    reclaimed: int = 0

    async def vm(self, fe: FakeFrontend, guest: GuestMemfd, offset: float) -> None:
        blocks = [(REPORT_BASE + i * 4 * MiB, 4 * MiB) for i in range(self.per_report // (4 * MiB))]
        await trio.sleep(offset)
        end = trio.current_time() + self.seconds
        while trio.current_time() < end:
            tick = trio.current_time()
            await trio.to_thread.run_sync(populate, guest, REPORT_BASE, self.per_report)
            self.service_times.append(await timed_report(fe, blocks))
            self.reclaimed += self.per_report
            await trio.sleep_until(tick + 2.0)


async def scale(vms: int, seconds: float) -> dict[str, object]:
    """``vms`` VMs on one daemon, each reporting every 2 s; 8 GiB per 2 s in all (128
    MiB each for 64 VMs, 32 MiB each for 256), which is what two cores can punch."""
    names = [f"vm{i:03d}" for i in range(vms)]
    load = Load(seconds, max(4, 8192 // vms // 4 * 4) * MiB)
    with daemon_process(names) as (proc, tmp):
        rss_before = status(proc.pid, "VmRSS") - status(proc.pid, "RssShmem")
        async with contextlib.AsyncExitStack() as stack:
            fronts = [
                await stack.enter_async_context(
                    attached(tmp / f"{n}.sock", REPORT_BASE + load.per_report)
                )
                for n in names
            ]
            cpu0 = cpu_seconds(proc.pid)
            async with trio.open_nursery() as nursery:
                for i, (fe, guest) in enumerate(fronts):
                    nursery.start_soon(load.vm, fe, guest, 2.0 * i / vms)
            cpu = cpu_seconds(proc.pid) - cpu0
            rss = status(proc.pid, "VmRSS") - status(proc.pid, "RssShmem")
    times, gib = load.service_times, load.reclaimed / (1 << 30)
    print(f"{vms} VMs x {load.per_report // MiB} MiB every 2 s for {seconds:.0f} s: "
          f"{len(times)} reports served, {gib:.1f} GiB reclaimed")  # fmt: skip
    print(f"  service time {spread(times)}  p99 {p99(times) * 1e3:.1f} ms")
    print(f"  daemon CPU {cpu:.2f} s = {cpu / gib:.3f} CPU s per GiB reclaimed")
    print(f"  daemon RSS without guest RAM: {rss / 1024:.1f} MiB (at start "
          f"{rss_before / 1024:.1f} MiB; target <= 64 MiB)")  # fmt: skip
    idle = await idle_cost(8, 10.0)
    return {
        "reports": len(times),
        "p99_ms": p99(times) * 1e3,
        "cpu_s_per_gib": cpu / gib,
        "rss_mib": rss / 1024,
        **idle,
    }


async def idle_cost(vms: int, seconds: float) -> dict[str, float]:
    names = [f"idle{i}" for i in range(vms)]
    with daemon_process(names) as (proc, tmp):
        async with contextlib.AsyncExitStack() as stack:
            for n in names:
                await stack.enter_async_context(attached(tmp / f"{n}.sock", 16 * MiB))
            await trio.sleep(0.5)
            cpu0 = cpu_seconds(proc.pid)
            sw0 = status(proc.pid, "voluntary_ctxt_switches") + status(
                proc.pid, "nonvoluntary_ctxt_switches"
            )
            await trio.sleep(seconds)
            cpu = cpu_seconds(proc.pid) - cpu0
            wakeups = (
                status(proc.pid, "voluntary_ctxt_switches")
                + status(proc.pid, "nonvoluntary_ctxt_switches")
                - sw0
            )
    print(
        f"{vms} idle VMs for {seconds:.0f} s: daemon CPU {cpu * 1e3:.0f} ms, "
        f"{wakeups} context switches (main thread)"
    )
    return {"idle_cpu_ms": cpu * 1e3, "idle_wakeups": wakeups}


def run(options: Options) -> dict[str, object]:
    # Each VM holds ~15 fds here and in the daemon (which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    return trio.run(scale, 16 if options.quick else options.vms, 6.0 if options.quick else 20.0)
