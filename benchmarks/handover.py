"""``handover``: what keeping connections across restarts costs: GET_CONFIG round
trips without a keeper and under ``supervise`` (every message is then peeked and its
state saved twice); and how long a GET_CONFIG sent just after kill -9 (or a planned
restart) waits for the next process to answer it, with the standby the supervisor
keeps ready and without one (``supervise --no-standby``, the baseline)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import trio

from benchmarks.common import (
    REPORT_BASE,
    Options,
    attached,
    daemon_process,
    log_events,
    p99,
    populate,
    round_trips,
    spread,
)
from tests.daemon_helpers import children
from tests.frontend import FakeFrontend, MiB


async def settled(sup: int, folder: Path, standby: bool) -> int:
    """The serving daemon's pid, once the last restart is all done (and, with a
    standby, once the next one is armed: what a restart some time later finds)."""
    with trio.fail_after(20):
        while True:
            await trio.sleep(0.05)
            started = log_events(folder, "daemon_started")
            active = int(started[-1]["pid"])  # type: ignore[call-overload]
            kids = children(sup)
            armed = {int(r["pid"]) for r in log_events(folder, "standby_armed")}  # type: ignore[call-overload]
            waiting = armed.intersection(kids) - {active}
            if active in kids and (waiting or not standby) and len(kids) == 1 + standby:
                await trio.sleep(0.3)
                return active


async def restart_stalls(fe: FakeFrontend, sup: int, folder: Path, standby: bool,
                         restarts: int) -> dict[str, list[float]]:  # fmt: skip
    """How long a GET_CONFIG sent just as the old process is gone waits for the next one."""
    stalls: dict[str, list[float]] = {"kill -9": [], "SIGUSR2": []}
    for _ in range(restarts):
        for how, signum in (("kill -9", 9), ("SIGUSR2", 12)):
            old = await settled(sup, folder, standby)
            os.kill(old if signum == 9 else sup, signum)
            # From the moment the old process is gone (a planned stop first finishes
            # what it has in hand), a vCPU reading the balloon's config waits for the
            # next process.
            while (
                Path(f"/proc/{old}/stat").exists()
                and " Z " not in Path(f"/proc/{old}/stat").read_text()
            ):
                await trio.sleep(0.0005)
            t0 = time.perf_counter()
            await fe.get_config()
            stalls[how].append(time.perf_counter() - t0)
    return stalls


async def handover(samples: int, restarts: int) -> dict[str, object]:
    with daemon_process(["vm"]) as (_, tmp):
        async with attached(tmp / "vm.sock", 16 * MiB) as (fe, _):
            plain = await round_trips(fe, samples)
    kept: list[float] = []
    stalls: dict[str, dict[str, list[float]]] = {}
    for standby in (False, True):
        mode = "standby" if standby else "no standby"
        with daemon_process(["vm"], supervise=[] if standby else ["--no-standby"]) as (sup, tmp):
            async with attached(tmp / "vm.sock", REPORT_BASE + 16 * MiB) as (fe, guest):
                if standby:
                    kept = await round_trips(fe, samples)
                stalls[mode] = await restart_stalls(fe, sup.pid, tmp, standby, restarts)
                populate(guest, REPORT_BASE, 4 * MiB)
                await fe.report(3, [(REPORT_BASE, 4 * MiB)])  # still served after it all
            used = [r for r in log_events(tmp, "daemon_started") if r.get("standby")]
            assert len(used) == (2 * restarts if standby else 0), used
    ratio = p99(kept) / p99(plain)
    print(f"GET_CONFIG, no keeper:       {spread(plain)}  p99 {p99(plain) * 1e3:.3f} ms")
    print(f"GET_CONFIG, under supervise: {spread(kept)}  p99 {p99(kept) * 1e3:.3f} ms")
    print(f"  p99 ratio kept/plain: {ratio:.2f}")
    out: dict[str, object] = {
        "plain_p99_ms": p99(plain) * 1e3, "kept_p99_ms": p99(kept) * 1e3, "ratio": ratio,
    }  # fmt: skip
    for how in ("kill -9", "SIGUSR2"):
        for mode, by_how in stalls.items():
            print(f"GET_CONFIG sent as the old process ends ({how}, {mode}): answered in "
                  f"{spread(by_how[how])}")  # fmt: skip
            out[f"{how} {mode} stall_s"] = statistics.median(by_how[how])
        base, now = (statistics.median(stalls[m][how]) for m in ("no standby", "standby"))
        print(f"  ratio standby / no standby: {now / base:.3f}")
    return out


def run(options: Options) -> dict[str, object]:
    return trio.run(handover, 100 if options.quick else 1000, 2 if options.quick else 10)
