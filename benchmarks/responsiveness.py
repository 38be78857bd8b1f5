"""``responsiveness``: GET_CONFIG round trips to one VM, idle, while another VM
reports without pause, and while the same VM does."""

from __future__ import annotations

import trio

from benchmarks.common import (
    REPORT_BASE,
    Helper,
    Options,
    attached,
    daemon_process,
    p99,
    round_trips,
    spread,
)
from tests.frontend import FakeFrontend, MiB

#: Idle and loaded samples are taken in this many turns each.
ROUNDS = 5


async def responsiveness(samples: int) -> dict[str, object]:
    """GET_CONFIG round trips to a VM: idle; while another VM reports without pause;
    and while the same VM does (its own reports completed on the same event loop)."""
    with daemon_process(["busy", "probe"]) as (_, tmp):
        async with (
            attached(tmp / "busy.sock", REPORT_BASE + 128 * MiB) as (busy, bguest),
            attached(tmp / "probe.sock", 16 * MiB) as (probe, _),
        ):
            blocks = [(REPORT_BASE + i * 4 * MiB, 4 * MiB) for i in range(32)]
            filler = Helper(bguest, blocks)  # the busy guest's vCPU, in its own process
            reports = 0

            async def under_load(target: FakeFrontend, n: int) -> list[float]:
                nonlocal reports
                stop = trio.Event()

                async def hammer() -> None:
                    nonlocal reports
                    while not stop.is_set():
                        await trio.to_thread.run_sync(filler.run, "fill")
                        await busy.report(3, blocks)
                        reports += 1

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hammer)
                    await trio.sleep(0.2)
                    measured = await round_trips(target, n)
                    stop.set()
                return measured

            # The three, taken in turns, so that the machine's own ups and downs fall
            # on all of them alike.
            idle: list[float] = []
            other: list[float] = []
            same: list[float] = []
            other_reports = same_reports = 0
            try:
                for _ in range(ROUNDS):
                    idle += await round_trips(probe, samples // ROUNDS)
                    reports = 0
                    other += await under_load(probe, samples // ROUNDS)
                    other_reports += reports
                    reports = 0
                    same += await under_load(busy, samples // ROUNDS)
                    same_reports += reports
            finally:
                filler.close()
    print(f"GET_CONFIG idle:               {spread(idle)}  p99 {p99(idle) * 1e3:.3f} ms")
    print(
        f"GET_CONFIG, another VM busy:   {spread(other)}  p99 {p99(other) * 1e3:.3f} ms "
        f"({other_reports} reports of 128 MiB meanwhile)"
    )
    print(
        f"GET_CONFIG, the same VM busy:  {spread(same)}  p99 {p99(same) * 1e3:.3f} ms "
        f"({same_reports} reports of 128 MiB meanwhile)"
    )
    ratio, same_ratio = p99(other) / p99(idle), p99(same) / p99(idle)
    print(f"  p99 ratio other VM/idle: {ratio:.2f}; same VM/idle: {same_ratio:.2f} (target <= 2)")
    return {
        "idle_p99_ms": p99(idle) * 1e3,
        "loaded_p99_ms": p99(other) * 1e3,
        "same_vm_p99_ms": p99(same) * 1e3,
        "ratio": ratio,
        "same_vm_ratio": same_ratio,
    }


def run(options: Options) -> dict[str, object]:
    return trio.run(responsiveness, 100 if options.quick else 1000)
