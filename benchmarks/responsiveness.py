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
from tests.frontend import FakeFrontend, GuestMemfd, MiB

#: Idle and loaded samples are taken in this many turns each.
ROUNDS = 5


class BusyGuest:
    """A VM that reports 32 x 4 MiB again and again, its memory refilled each time by
    a process of its own (its vCPU), while something else is measured."""

    def __init__(self, fe: FakeFrontend, guest: GuestMemfd) -> None:
        self.fe = fe
        self.blocks = [(REPORT_BASE + i * 4 * MiB, 4 * MiB) for i in range(32)]
        self.filler = Helper(guest, self.blocks)
        self.reports = 0

    async def under_load(self, target: FakeFrontend, n: int) -> list[float]:
        """``n`` GET_CONFIG round trips to ``target`` while this VM reports."""
        stop = trio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                await trio.to_thread.run_sync(self.filler.run, "fill")
                await self.fe.report(3, self.blocks)
                self.reports += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hammer)
            await trio.sleep(0.2)
            measured = await round_trips(target, n)
            stop.set()
        return measured


async def responsiveness(samples: int) -> dict[str, object]:
    """GET_CONFIG round trips to a VM: idle; while another VM reports without pause;
    and while the same VM does (its own reports completed on the same event loop)."""
    idle: list[float] = []
    other: list[float] = []
    same: list[float] = []
    counts = {"other": 0, "same": 0}
    with daemon_process(["busy", "probe"]) as (_, tmp):
        async with (
            attached(tmp / "busy.sock", REPORT_BASE + 128 * MiB) as (busy_fe, busy_guest),
            attached(tmp / "probe.sock", 16 * MiB) as (probe, _),
        ):
            busy = BusyGuest(busy_fe, busy_guest)
            try:
                # The three, taken in turns, so that the machine's own ups and downs
                # fall on all of them alike.
                for _ in range(ROUNDS):
                    idle += await round_trips(probe, samples // ROUNDS)
                    for key, target, into in (("other", probe, other), ("same", busy_fe, same)):
                        before = busy.reports
                        into.extend(await busy.under_load(target, samples // ROUNDS))
                        counts[key] += busy.reports - before
            finally:
                busy.filler.close()
    return _figures(idle, other, same, counts)


def _figures(
    idle: list[float], other: list[float], same: list[float], counts: dict[str, int]
) -> dict[str, object]:
    print(f"GET_CONFIG idle:               {spread(idle)}  p99 {p99(idle) * 1e3:.3f} ms")
    print(
        f"GET_CONFIG, another VM busy:   {spread(other)}  p99 {p99(other) * 1e3:.3f} ms "
        f"({counts['other']} reports of 128 MiB meanwhile)"
    )
    print(
        f"GET_CONFIG, the same VM busy:  {spread(same)}  p99 {p99(same) * 1e3:.3f} ms "
        f"({counts['same']} reports of 128 MiB meanwhile)"
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
