"""``service``: the daemon's whole path (kick, ring walk, punch, used ring, call) for
reports of 32 x 2 MiB and 32 x 4 MiB of populated memory, against a raw
fallocate(PUNCH_HOLE) loop over the same ranges in another process; and the
per-report cost of our code alone (unpopulated memory, where the kernel does almost
nothing). With ``--against CHECKOUT`` a daemon run from that checkout is measured in
turns with this one."""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import trio

from benchmarks.common import (
    REPORT_BASE,
    ROOT,
    Helper,
    Options,
    attached,
    daemon_process,
    populate,
    spread,
    timed_report,
)
from benchmarks.cost import our_cost
from tests.frontend import MiB


async def service(repeats: int, against: Path | None = None) -> dict[str, object]:
    """With ``against``: a second daemon run from that checkout (e.g. a worktree of the
    commit before a change, its compiled extension copied in) is measured in turns
    with this one, against the same raw loop."""
    trees = {"this tree": ROOT, **({"against": against} if against else {})}
    results: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        daemons = {
            name: stack.enter_context(daemon_process(["svc"], cwd=tree))
            for name, tree in trees.items()
        }
        socks = {name: folder / "svc.sock" for name, (_, folder) in daemons.items()}
        async with contextlib.AsyncExitStack() as frontends:
            vms = {
                name: await frontends.enter_async_context(attached(sock, REPORT_BASE + 128 * MiB))
                for name, sock in socks.items()
            }
            for order, block in ((9, 2 * MiB), (10, 4 * MiB)):
                blocks = [(REPORT_BASE + i * block, block) for i in range(32)]
                total = 32 * block
                daemon_t: dict[str, list[float]] = {name: [] for name in trees}
                idle_t: dict[str, list[float]] = {name: [] for name in trees}
                raw_t: list[float] = []
                raw = Helper(vms["this tree"][1], blocks)
                try:
                    for _ in range(repeats):
                        for name, (fe, guest) in vms.items():
                            populate(guest, REPORT_BASE, total)
                            daemon_t[name].append(await timed_report(fe, blocks))
                        populate(vms["this tree"][1], REPORT_BASE, total)
                        raw_t.append(raw.run("punch"))
                        for name, (fe, _) in vms.items():  # our cost alone
                            idle_t[name].append(await timed_report(fe, blocks))
                finally:
                    raw.close()
                print(f"32 x {block // MiB} MiB populated, raw fallocate loop:   {spread(raw_t)}")
                for name in trees:
                    key = f"order{order}" + ("" if name == "this tree" else f" {name}")
                    results[key] = service_figures(name, block, daemon_t[name], raw_t, idle_t[name])
            if against is not None:
                pids = {name: proc.pid for name, (proc, _) in daemons.items()}
                results["our_cost"] = await our_cost(vms, pids, 20 * repeats)
    return results


def service_figures(
    name: str, block: int, daemon_t: list[float], raw_t: list[float], idle_t: list[float]
) -> dict[str, float]:
    ratio = statistics.median(raw_t) / statistics.median(daemon_t)
    # Each repeat's daemon and raw figures are taken one right after the other: the
    # median of their ratios is less moved by the host's noise, which drifts over
    # seconds, than the ratio of the two medians.
    paired = statistics.median(r / d for r, d in zip(raw_t, daemon_t, strict=True))
    gib_s = 32 * block / statistics.median(daemon_t) / (1 << 30)
    size = f"32 x {block // MiB} MiB"
    print(f"{size} populated, daemon ({name}, kick->call): {spread(daemon_t)} = {gib_s:.2f} GiB/s")
    print(f"  throughput ratio daemon/raw: {ratio:.3f}, paired {paired:.3f}  (target >= 0.95)")
    print(f"{size} unpopulated, daemon ({name}, our cost): {spread(idle_t)}")
    return {
        "daemon_ms": statistics.median(daemon_t) * 1e3,
        "raw_ms": statistics.median(raw_t) * 1e3,
        "ratio": ratio,
        "paired_ratio": paired,
        "unpopulated_ms": statistics.median(idle_t) * 1e3,
    }


def run(options: Options) -> dict[str, object]:
    return trio.run(service, 5 if options.quick else 30, options.against)
