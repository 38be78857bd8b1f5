#!/usr/bin/env python3
"""Benchmarks for vhost-user-balloon: each figure beside a baseline from the same run.

    .venv/bin/python benchmarks/bench.py [service|responsiveness|scale|guest|handover|all]
                                         [--quick]

service         the daemon's whole path (kick, ring walk, punch, used ring, call) for
                reports of 32 x 2 MiB and 32 x 4 MiB of populated memory, against a raw
                fallocate(PUNCH_HOLE) loop over the same ranges in this process; and the
                per-report cost of our code alone (unpopulated memory, where the kernel
                does almost nothing)
parts           each step of serving one report (walk, check, plan, punch, complete),
                timed in this process: the CPU a report costs; and the hand-off of a
                job to a worker thread and back, trio.to_thread against DiscardPool
responsiveness  GET_CONFIG round trips to one VM, idle, while another VM reports
                without pause, and while the same VM does
scale           64 VMs on one daemon, each reporting 128 MiB every 2 s: service times,
                daemon CPU per GiB reclaimed, daemon memory without guest RAM; and
                8 idle VMs for 10 s (CPU time, wakeups)
guest           a real guest under QEMU's built-in balloon and under the daemon, same
                workload, alternating: time until the memory is back, final level
scrape          how long the event loop stops while /metrics is scraped at 256 VMs,
                against the page written in the loop as before
handover        what keeping connections across restarts costs: GET_CONFIG round trips
                without a keeper and under `supervise` (every message is then peeked
                and its state saved twice); and how long a GET_CONFIG sent just after
                kill -9 (or a planned restart) waits for the next process to answer
                it, with the standby the supervisor keeps ready and without one
                (`supervise --no-standby`, the baseline)

The daemon runs as its own process (the installed command), the Python frontend
from tests/frontend.py plays QEMU. These machines are noisy: each figure is a
median over repeats, with its spread (min..max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import trio
from prometheus_client import generate_latest

from vhost_user_balloon.daemon.handover.store import TOTALS_SLOT_BYTES, StateFile
from vhost_user_balloon.daemon.observing.http import open_metrics_listeners, serve_metrics
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.serving.discard import DiscardPool, execute, plan_discards
from vhost_user_balloon.daemon.serving.guestram import VmMemory
from vhost_user_balloon.protocol import GuestMemory
from vhost_user_balloon.protocol.balloon import report_ranges
from vhost_user_balloon.protocol.virtqueue import SplitQueue

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "qemu-config")]

from daemon_helpers import children  # noqa: E402
from fakes import DriverRing  # noqa: E402
from frontend import FakeFrontend, GuestMemfd, MiB  # noqa: E402
from guestrun import GuestSpec, run_guest  # noqa: E402

REPORT_BASE = 64 * MiB  # reported blocks live above the rings
#: responsiveness: idle and loaded samples are taken in this many turns each
ROUNDS = 5


def spread(values: list[float], unit: str = "ms", scale: float = 1e3) -> str:
    v = sorted(values)
    return (
        f"median {statistics.median(v) * scale:8.3f} {unit}  "
        f"({v[0] * scale:.3f}..{v[-1] * scale:.3f}, n={len(v)})"
    )


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]


# -- the daemon as a process ----------------------------------------------------------
@contextlib.contextmanager
def daemon_process(
    names: list[str], *, supervise: list[str] | None = None, cwd: Path = ROOT
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The daemon as a process, run from the checkout ``cwd`` (``supervise``: under
    the supervisor, with these options of its own); its JSON log lines go to ``log``
    in the folder yielded."""
    with tempfile.TemporaryDirectory(prefix="vub-bench-") as tmp, open(f"{tmp}/log", "wb") as out:
        args = [a for n in names for a in ("--vm", f"{n}={tmp}/{n}.sock")]
        command = [sys.executable, "-m", "vhost_user_balloon"]
        if supervise is not None:
            command += ["supervise", *supervise]
        proc = subprocess.Popen(
            [*command, *args,
             "--metrics-listen", "none", "--log-format", "json", "--log-level", "warning"],
            stdout=out, stderr=subprocess.DEVNULL, cwd=cwd,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not all(Path(f"{tmp}/{n}.sock").exists() for n in names):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.02)
            yield proc, Path(tmp)
        finally:
            proc.terminate()
            proc.wait(10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextlib.asynccontextmanager
async def attached(sock: Path, size: int) -> AsyncIterator[tuple[FakeFrontend, GuestMemfd]]:
    guest = GuestMemfd(size)
    fe = await FakeFrontend.connect(str(sock), guest)
    try:
        await fe.handshake()
        await fe.start()
        yield fe, guest
    finally:
        await fe.aclose()
        guest.close()


def populate(guest: GuestMemfd, start: int, length: int) -> None:
    os.posix_fallocate(guest.fd, start, length)  # allocates (zeroed) pages, fast


async def timed_report(fe: FakeFrontend, blocks: list[tuple[int, int]]) -> float:
    """Seconds from the kick to the call eventfd, for one report (the guest's view)."""
    ring = fe.rings[3]
    ring.add_chain([(gpa, n, True) for gpa, n in blocks])
    t0 = time.perf_counter()
    fe.kick(3)
    await fe.wait_call(3, timeout=30)
    elapsed = time.perf_counter() - t0
    ring.take_used()
    return elapsed


_HELPER = """
import os, sys, time
from vhost_user_balloon.daemon.linux.syscalls import punch_hole
fd = os.open(sys.argv[1], os.O_RDWR)
ranges = [tuple(map(int, r.split(":"))) for r in sys.argv[2:]]
for line in sys.stdin:
    t0 = time.perf_counter()
    for offset, length in ranges:
        if line.startswith("punch"):
            punch_hole(fd, offset, length)
        else:
            os.posix_fallocate(fd, offset, length)
    print(time.perf_counter() - t0, flush=True)
"""


class Helper:
    """A process of its own that fills or punches the same ranges of a guest's memfd.

    As the raw loop it is the baseline: a bare fallocate(PUNCH_HOLE) loop in another
    process than the one that allocated the pages, like the daemon. As the filler it
    plays the guest's vCPUs, which run apart from the daemon too.
    """

    def __init__(self, guest: GuestMemfd, blocks: list[tuple[int, int]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HELPER, f"/proc/{os.getpid()}/fd/{guest.fd}",
             *(f"{gpa}:{n}" for gpa, n in blocks)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, command: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- 1. service time against the kernel's punch-hole limit -------------------------------
async def service(repeats: int, against: Path | None = None) -> dict[str, object]:
    """With ``against``: a second daemon run from that checkout (e.g. a worktree of the
    commit before a change, its compiled extension copied in) is measured in turns
    with this one, against the same raw loop."""
    trees = {"this tree": ROOT, **({"against": against} if against else {})}
    results: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        socks = {
            name: stack.enter_context(daemon_process(["svc"], cwd=tree))[1] / "svc.sock"
            for name, tree in trees.items()
        }
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
                results["fixed_cost_ms"] = await fixed_cost(vms, 20 * repeats)
    return results


async def fixed_cost(
    vms: dict[str, tuple[FakeFrontend, GuestMemfd]], repeats: int
) -> dict[str, float]:
    """Our cost per report, the two daemons in turns: 32 x 2 MiB of unpopulated memory,
    where the kernel has almost nothing to do, many times (the figure is small, the
    host's noise is not)."""
    blocks = [(REPORT_BASE + i * 2 * MiB, 2 * MiB) for i in range(32)]
    times: dict[str, list[float]] = {name: [] for name in vms}
    for _ in range(repeats):
        for name, (fe, _) in vms.items():
            times[name].append(await timed_report(fe, blocks))
    for name, values in times.items():
        print(f"32 x 2 MiB unpopulated, in turns ({name}): {spread(values)}")
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


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


def parts(repeats: int) -> dict[str, float]:
    """Each step of serving one 32 x 2 MiB report, timed in this process (no daemon, no
    threads, no wake-ups): what the event loop and the discard thread each spend, the
    rest of a report's service time being hand-offs."""
    guest = GuestMemfd(REPORT_BASE + 64 * MiB)
    memory = VmMemory()
    memory.replace(GuestMemory(guest.memory_regions()), [os.dup(guest.fd)])
    mem = memory.memory
    assert mem is not None
    ring = DriverRing(guest.ram, 0x1000, 64, index=3)
    addr = ring.vring_addr()
    queue = SplitQueue(64, addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
    blocks = [(REPORT_BASE + i * 2 * MiB, 2 * MiB, True) for i in range(32)]
    steps: dict[str, list[float]] = {
        "walk the chain": [], "check the entries": [], "plan": [],
        "punch (unpopulated)": [], "complete": [],
    }  # fmt: skip
    for _ in range(repeats):
        ring.add_chain(blocks)
        t0 = time.perf_counter()
        chain = queue.pop(mem)
        assert chain is not None
        t1 = time.perf_counter()
        ranges = report_ranges(chain)
        t2 = time.perf_counter()
        plan = plan_discards(ranges, memory, poisoned=False, blocked=None)
        t3 = time.perf_counter()
        execute(plan)
        t4 = time.perf_counter()
        queue.push(mem, chain.head, 0)
        queue.should_notify(mem)
        t5 = time.perf_counter()
        ring.take_used()
        marks = (t0, t1, t2, t3, t4, t5)
        for name, a, b in zip(steps, marks, marks[1:], strict=False):
            steps[name].append(b - a)
    memory.close()
    guest.close()
    steps.update(trio.run(hand_offs, repeats))
    for name, values in steps.items():
        print(f"{name:36} {spread(values, 'us', 1e6)}")
    return {name: statistics.median(v) * 1e6 for name, v in steps.items()}


async def hand_offs(repeats: int) -> dict[str, list[float]]:
    """An empty job to a worker thread and back, as the daemon used to hand a discard
    over (trio.to_thread) and as it does now (DiscardPool), taken in turns."""
    pool = DiscardPool(2)
    out: dict[str, list[float]] = {"hand-off, trio.to_thread": [], "hand-off, DiscardPool": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(int)
        t1 = time.perf_counter()
        await pool.run(int)
        t2 = time.perf_counter()
        out["hand-off, trio.to_thread"].append(t1 - t0)
        out["hand-off, DiscardPool"].append(t2 - t1)
    return out


# -- 2. responsiveness under load --------------------------------------------------------
async def round_trips(fe: FakeFrontend, n: int) -> list[float]:
    """GET_CONFIG round trips, what a vCPU reading the balloon's config waits for."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fe.get_config()
        out.append(time.perf_counter() - t0)
        await trio.sleep(0.001)
    return out


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


# -- hand-over ---------------------------------------------------------------------------
def log_events(folder: Path, event: str) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in (folder / "log").read_text().splitlines())
    return [r for r in lines if r.get("event") == event]


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


# -- 3. scale ----------------------------------------------------------------------------
async def scale(vms: int, seconds: float) -> dict[str, object]:
    """``vms`` VMs on one daemon, each reporting every 2 s; 8 GiB per 2 s in all (128
    MiB each for 64 VMs, 32 MiB each for 256), which is what two cores can punch."""
    names = [f"vm{i:03d}" for i in range(vms)]
    per_report = max(4, 8192 // vms // 4 * 4) * MiB
    service_times: list[float] = []
    reclaimed = 0
    with daemon_process(names) as (proc, tmp):
        rss_before = status(proc.pid, "VmRSS") - status(proc.pid, "RssShmem")
        async with contextlib.AsyncExitStack() as stack:
            fronts = [
                await stack.enter_async_context(
                    attached(tmp / f"{n}.sock", REPORT_BASE + per_report)
                )
                for n in names
            ]
            cpu0 = cpu_seconds(proc.pid)
            blocks = [(REPORT_BASE + i * 4 * MiB, 4 * MiB) for i in range(per_report // (4 * MiB))]

            async def vm_loop(fe: FakeFrontend, guest: GuestMemfd, offset: float) -> None:
                nonlocal reclaimed
                await trio.sleep(offset)
                end = trio.current_time() + seconds
                while trio.current_time() < end:
                    tick = trio.current_time()
                    await trio.to_thread.run_sync(populate, guest, REPORT_BASE, per_report)
                    service_times.append(await timed_report(fe, blocks))
                    reclaimed += per_report
                    await trio.sleep_until(tick + 2.0)

            async with trio.open_nursery() as nursery:
                for i, (fe, guest) in enumerate(fronts):
                    nursery.start_soon(vm_loop, fe, guest, 2.0 * i / vms)
            cpu = cpu_seconds(proc.pid) - cpu0
            rss = status(proc.pid, "VmRSS") - status(proc.pid, "RssShmem")
    gib = reclaimed / (1 << 30)
    print(
        f"{vms} VMs x {per_report // MiB} MiB every 2 s for {seconds:.0f} s: "
        f"{len(service_times)} reports "
        f"served, {gib:.1f} GiB reclaimed"
    )
    print(f"  service time {spread(service_times)}  p99 {p99(service_times) * 1e3:.1f} ms")
    print(f"  daemon CPU {cpu:.2f} s = {cpu / gib:.3f} CPU s per GiB reclaimed")
    print(
        f"  daemon RSS without guest RAM: {rss / 1024:.1f} MiB (at start "
        f"{rss_before / 1024:.1f} MiB; target <= 64 MiB)"
    )
    idle = await idle_cost(8, 10.0)
    return {
        "reports": len(service_times),
        "p99_ms": p99(service_times) * 1e3,
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


# -- 4. real guest, side by side ---------------------------------------------------------
def guest(repeats: int) -> dict[str, object]:
    rows: dict[str, list[tuple[float, int, int]]] = {"builtin": [], "daemon": []}
    for _ in range(repeats):
        for balloon in ("builtin", "daemon"):  # alternate, so drift hits both
            run = run_guest(GuestSpec(kernel="6.1", balloon=balloon, settle_s=20))
            secs = run.reclaim_seconds()
            assert secs is not None, f"{balloon}: memory never came back"
            rows[balloon].append((secs, run.final(), run.held_beyond_use()))
    for balloon, vals in rows.items():
        print(
            f"{balloon:8} free -> back within 64 MiB: "
            f"{spread([v[0] for v in vals], 's', 1)}; final level "
            f"{[round(v[1] / MiB, 1) for v in vals]} MiB, of which beyond the guest's own "
            f"use {[round(v[2] / MiB, 1) for v in vals]} MiB"
        )
    t_ratio = statistics.median([v[0] for v in rows["daemon"]]) / statistics.median(
        [v[0] for v in rows["builtin"]]
    )
    f_ours = statistics.median([v[1] for v in rows["daemon"]])
    f_ref = statistics.median([v[1] for v in rows["builtin"]])
    b_ours = statistics.median([v[2] for v in rows["daemon"]])
    b_ref = statistics.median([v[2] for v in rows["builtin"]])
    print(f"  time ratio daemon/built-in: {t_ratio:.3f} (target <= 1.05)")
    print(
        f"  final level: daemon {f_ours / MiB:.1f} MiB, built-in {f_ref / MiB:.1f} MiB; held "
        f"beyond the guest's use: daemon {b_ours / MiB:.1f}, built-in {b_ref / MiB:.1f} MiB "
        f"= {(b_ours - b_ref) / f_ref * 100:+.1f}% of the final level (target within 2%)"
    )
    return {
        "time_ratio": t_ratio,
        "final_mib": [f_ours / MiB, f_ref / MiB],
        "beyond_use_diff_pct": (b_ours - b_ref) / f_ref * 100,
    }


def totals(vms: int, repeats: int) -> dict[str, float]:
    """Saving the metric totals for the next process (done in the event loop before
    every scrape), against rendering the same /metrics page (the baseline), and against
    the way it was saved before (the whole export through json.dumps)."""
    m = Metrics()
    children = []
    for i in range(vms):
        vm = m.for_vm(f"vm{i}")
        vm.record_report(
            {9: (16, 32 * MiB), 10: (16, 64 * MiB)}, 96 * MiB, {"unaligned": 4096}, 0.01
        )
        m.protocol_errors.labels(vm=f"vm{i}", reason="bad_flags").inc()
        m.balloon_inflated_bytes.labels(vm=f"vm{i}").inc(4096)
        children.append(vm)
    state = StateFile.create("bench", TOTALS_SLOT_BYTES)

    def save() -> None:  # what Daemon.save_totals does
        state.write_json(f'{{"format":1,"totals":{m.export_totals_json()}}}')

    changed, unchanged, before, render = [], [], [], []
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
        state.write({"format": 1, "totals": m.export_totals()})
        before.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate_latest(m.registry)
        render.append(time.perf_counter() - t)
    size = len(m.export_totals_json())
    os.close(state.fd)
    print(f"save totals, {vms} VMs ({size >> 10} KiB), every VM changed: {spread(changed)}")
    print(f"save totals, {vms} VMs, nothing changed:          {spread(unchanged)}")
    print(f"save totals the way before (json.dumps of all):   {spread(before)}")
    print(f"render /metrics, {vms} VMs (baseline):            {spread(render)}")
    print(f"collect the series, every VM changed:             {spread(collect_changed)}")
    print(f"collect the series, nothing changed:              {spread(collect_unchanged)}")
    ratio = statistics.median(changed) / statistics.median(render)
    gain = statistics.median(before) / statistics.median(changed)
    print(f"  ratio save/render: {ratio:.2f}; before/now: {gain:.1f}x")
    return {
        "save_ms": statistics.median(changed) * 1000,
        "save_unchanged_ms": statistics.median(unchanged) * 1000,
        "before_ms": statistics.median(before) * 1000,
        "ratio": ratio,
        "collect_ms": statistics.median(collect_changed) * 1000,
        "collect_unchanged_ms": statistics.median(collect_unchanged) * 1000,
    }


async def scrape_stall(vms: int, scrapes: int) -> dict[str, float]:
    """How long the event loop stops while /metrics is scraped at ``vms`` VMs: a task
    that wakes every millisecond records how late it wakes, while the daemon's metrics
    endpoint (daemon/http.py) answers ``scrapes`` scrapes; against the same task while
    the page is written in the loop, as it was before (the baseline, same run)."""
    m = Metrics()
    for i in range(vms):
        m.for_vm(f"vm{i}").record_report(
            {9: (16, 32 * MiB), 10: (16, 64 * MiB)}, 96 * MiB, {"unaligned": 4096}, 0.01
        )
    state = StateFile.create("bench", TOTALS_SLOT_BYTES)

    def save() -> None:
        state.write_json(f'{{"format":1,"totals":{m.export_totals_json()}}}')

    async def lateness(during: Callable[[], Awaitable[None]]) -> list[float]:
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

    listeners = await open_metrics_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]

    def get() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=(
            "service",
            "parts",
            "responsiveness",
            "scale",
            "guest",
            "handover",
            "totals",
            "scrape",
            "all",
        ),
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--vms", type=int, default=64, help="VMs for scale (default 64)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument(
        "--against",
        type=Path,
        metavar="CHECKOUT",
        help="service: also measure a daemon run from this checkout, in turns (its "
        "compiled extension copied in: vhost_user_balloon/daemon/linux/_syscalls.abi3.so)",
    )
    args = p.parse_args()
    q = args.quick
    out: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30}"
        " GiB",
        "python": sys.version.split()[0],
    }
    if args.which in ("service", "all"):
        print("== service time")
        out["service"] = trio.run(service, 5 if q else 30, args.against)
    if args.which in ("parts", "all"):
        print("== a report's steps, one by one")
        out["parts"] = parts(200 if q else 2000)
    if args.which in ("responsiveness", "all"):
        print("== responsiveness")
        out["responsiveness"] = trio.run(responsiveness, 100 if q else 1000)
    if args.which in ("scale", "all"):
        print("== scale")
        # Each VM holds ~15 fds here and in the daemon (which inherits the limit).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
        out["scale"] = trio.run(scale, 16 if q else args.vms, 6.0 if q else 20.0)
    if args.which in ("handover", "all"):
        print("== hand-over")
        out["handover"] = trio.run(handover, 100 if q else 1000, 2 if q else 10)
    if args.which in ("totals", "all"):
        print("== metric totals")
        out["totals"] = totals(256, 5 if q else 20)
    if args.which in ("scrape", "all"):
        print("== the event loop during a scrape")
        out["scrape"] = trio.run(scrape_stall, 256, 5 if q else 20)
    if args.which in ("guest", "all"):
        print("== real guest, side by side")
        out["guest"] = guest(1 if q else 3)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
