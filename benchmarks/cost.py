"""``cost``: our own cost per free page report: 32 x 2 MiB of unpopulated memory, where
the kernel has almost nothing to do, served many times; wall time (kick to call, as
the guest sees it) and the CPU time of every thread of the daemon (per-thread
schedstat). With ``--against CHECKOUT`` a daemon run from that checkout is measured
in turns with this one, report by report, and the ratios printed: on this shared
2-core host wall-clock ratios swing 10-20% between runs, CPU time far less.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import trio

from benchmarks.common import (
    REPORT_BASE,
    ROOT,
    Options,
    attached,
    daemon_process,
    spread,
    thread_cpu_ns,
    timed_report,
)
from tests.frontend import FakeFrontend, GuestMemfd, MiB

BLOCKS = [(REPORT_BASE + i * 2 * MiB, 2 * MiB) for i in range(32)]


async def our_cost(
    vms: dict[str, tuple[FakeFrontend, GuestMemfd]], pids: dict[str, int], repeats: int
) -> dict[str, dict[str, float]]:
    """``repeats`` reports to each daemon, in turns; per daemon the median wall time
    and the mean CPU time per report (ms)."""
    wall: dict[str, list[float]] = {name: [] for name in vms}
    cpu_ns = dict.fromkeys(vms, 0)
    for fe, _ in vms.values():  # warm up: threads started, code paths taken
        for _ in range(10):
            await timed_report(fe, BLOCKS)
    order = list(vms.items())
    for _ in range(repeats):
        order.reverse()  # each daemon goes first every other time
        for name, (fe, _) in order:
            before = thread_cpu_ns(pids[name])
            wall[name].append(await timed_report(fe, BLOCKS))
            cpu_ns[name] += thread_cpu_ns(pids[name]) - before
    out: dict[str, dict[str, float]] = {}
    for name in vms:
        cpu_ms = cpu_ns[name] / repeats / 1e6
        print(f"32 x 2 MiB unpopulated ({name}): wall {spread(wall[name])}; "
              f"daemon CPU {cpu_ms:.3f} ms per report (n={repeats})")  # fmt: skip
        out[name] = {"wall_ms": statistics.median(wall[name]) * 1e3, "cpu_ms": cpu_ms}
    if len(out) == 2:
        this, other = out.values()
        print(f"  this tree / against: CPU {this['cpu_ms'] / other['cpu_ms']:.3f}, "
              f"wall {this['wall_ms'] / other['wall_ms']:.3f}")  # fmt: skip
    return out


async def cost(repeats: int, against: Path | None) -> dict[str, dict[str, float]]:
    trees = {"this tree": ROOT, **({"against": against} if against else {})}
    with contextlib.ExitStack() as stack:
        daemons = {
            name: stack.enter_context(daemon_process(["svc"], cwd=tree))
            for name, tree in trees.items()
        }
        async with contextlib.AsyncExitStack() as frontends:
            vms = {
                name: await frontends.enter_async_context(
                    attached(folder / "svc.sock", REPORT_BASE + 128 * MiB)
                )
                for name, (_, folder) in daemons.items()
            }
            return await our_cost(vms, {n: p.pid for n, (p, _) in daemons.items()}, repeats)


def run(options: Options) -> dict[str, object]:
    return dict(trio.run(cost, 100 if options.quick else 600, options.against))
