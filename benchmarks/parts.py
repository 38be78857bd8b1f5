"""``parts``: each step of serving one report (walk, check, plan, punch, complete),
timed in this process: the CPU a report costs; and the hand-off of a job to a worker
thread and back, trio.to_thread against DiscardPool."""

from __future__ import annotations

import os
import statistics
import time

import trio

from benchmarks.common import REPORT_BASE, Options, spread
from tests.fakes import DriverRing
from tests.frontend import GuestMemfd, MiB
from vhost_user_balloon.daemon.serving.discard import DiscardGate, DiscardPool
from vhost_user_balloon.daemon.serving.guestram import VmMemory
from vhost_user_balloon.daemon.serving.passthrough import PeerScans, PinWatch
from vhost_user_balloon.protocol import BalloonDevice, GuestMemory
from vhost_user_balloon.protocol.balloon import report_ranges
from vhost_user_balloon.protocol.virtqueue import SplitQueue


def parts(repeats: int) -> dict[str, float]:
    """Each step of serving one 32 x 2 MiB report, timed in this process (no daemon, no
    threads, no wake-ups): what a discard thread spends on it, the rest of a report's
    service time being hand-offs."""
    guest = GuestMemfd(REPORT_BASE + 64 * MiB)
    memory = VmMemory()
    memory.replace(GuestMemory(guest.memory_regions()), [os.dup(guest.fd)])
    mem = memory.memory
    assert mem is not None
    ring = DriverRing(guest.ram, 0x1000, 64, index=3)
    queue = SplitQueue(ring.layout())
    # a device that does not poison, and a QEMU whose open files hold no VFIO device
    watch = PinWatch("bench", os.getpid(), PeerScans())
    gate = DiscardGate(memory, BalloonDevice(), watch, enabled=True)
    blocks = [(REPORT_BASE + i * 2 * MiB, 2 * MiB, True) for i in range(32)]
    steps: dict[str, list[float]] = {
        "walk the chain": [], "check the entries": [], "plan": [],
        "punch (unpopulated, passthrough look)": [], "complete": [],
    }  # fmt: skip
    for _ in range(repeats):
        ring.add_chain(blocks)
        t0 = time.perf_counter()
        chain = queue.pop(mem)
        assert chain is not None
        t1 = time.perf_counter()
        ranges = report_ranges(chain)
        t2 = time.perf_counter()
        plan = gate.plan(ranges)
        t3 = time.perf_counter()
        gate.carry_out(plan)
        t4 = time.perf_counter()
        queue.complete(mem, chain.head)
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


def run(options: Options) -> dict[str, object]:
    return dict(parts(200 if options.quick else 2000))
