"""Simulate the automatic balloon policy on 200 synthetic VMs, against a Proxmox-style
rule on the same traces, and print what each does.

    .venv/bin/python -m benchmarks policy [--vms 200] [--hours 2] [--seed 1]

The guest model (one step per policy interval, 10 s): each VM has RAM = anon + cache +
free + balloon. Its anonymous memory follows a trace (idle, cache-heavy, growing,
bursty); cache grows by a rate while the guest reads, into free memory, and is dropped
when anon memory or the balloon needs room. Free memory is reported and leaves the host
within a step, so the host holds anon + cache (+ 64 MiB of kernel). Inflating takes
free memory first, then cache; deflating gives free memory back. A guest whose anon
memory cannot fit even with all cache dropped is "in pressure" that step (a real guest
would stall, swap or OOM). Its statistics say MemAvailable = free + cache.

The Proxmox-style rule (its auto-ballooning, as documented): above 80% of the host's
memory, shrink every guest toward its minimum (here 50% of its RAM) by equal shares of
the excess, blind to what the guest uses; below, grow them back by a step. Here "the
host's memory" is the budget / 0.8, so both aim at the same resident sum.

The budget is what the fleet needs at its peak without any cache, plus 10%: met only
by taking cache. Printed per rule: when the resident sum first went over the budget and
how long it took to come back under, the share of time over it, the peak overshoot,
VM-steps in pressure, and target changes per minute.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vhost_user_balloon.policy import (
    GuestStats,
    GuestView,
    HostView,
    Policy,
    PolicyConfig,
)

MiB = 1 << 20
GiB = 1 << 30
STEP_S = 10.0
KERNEL = 64 * MiB


@dataclass
class Vm:
    name: str
    kind: str
    ram: int
    phase: float
    anon: int = 0
    cache: int = 0
    balloon: int = 0
    target: int = 0

    @property
    def free(self) -> int:
        return max(0, self.ram - KERNEL - self.anon - self.cache - self.balloon)

    @property
    def resident(self) -> int:
        return KERNEL + self.anon + self.cache


def demand(vm: Vm, t: float) -> tuple[int, int]:
    """(anon bytes wanted, cache bytes read per step) of this VM's trace at time t."""
    r = vm.ram
    if vm.kind == "idle":
        return int(0.10 * r), 2 * MiB
    if vm.kind == "cache":
        return int(0.15 * r), 40 * MiB
    if vm.kind == "growing":
        return int(r * (0.2 + 0.5 * min(1.0, t / 5400))), 8 * MiB
    burst = math.sin(2 * math.pi * (t / 900 + vm.phase)) > 0.6  # a burst every 15 min
    return int(r * (0.6 if burst else 0.15)), 8 * MiB


def advance(vm: Vm, t: float) -> bool:
    """One step of the guest: the balloon moves toward its target, anon memory follows
    the trace, cache grows. True if the guest is in pressure."""
    want, read = demand(vm, t)
    # balloon: inflate from free, then cache; deflate to free
    if vm.target > vm.balloon:
        take = vm.target - vm.balloon
        from_free = min(take, vm.free)
        from_cache = min(take - from_free, vm.cache)
        vm.cache -= from_cache
        vm.balloon += from_free + from_cache
    else:
        vm.balloon = vm.target
    room = vm.ram - KERNEL - vm.balloon
    pressure = want > room
    vm.anon = min(want, room)
    vm.cache = min(vm.cache, room - vm.anon)
    vm.cache = min(vm.cache + read, room - vm.anon)
    return pressure


def view(vm: Vm, age: float) -> GuestView:
    stats = GuestStats(available_bytes=vm.free + vm.cache, total_bytes=vm.ram - vm.balloon)
    return GuestView(vm.name, vm.ram, vm.resident, vm.target, vm.balloon, stats, age)


def ours(config: PolicyConfig) -> Callable[[list[Vm]], None]:
    policy = Policy(config)

    def decide(vms: list[Vm]) -> None:
        out = policy.decide(HostView(), [view(vm, 1.0) for vm in vms])
        for vm, d in zip(vms, out.decisions, strict=True):
            vm.target = d.target_bytes

    return decide


def proxmox(budget: int, step: int) -> Callable[[list[Vm]], None]:
    def decide(vms: list[Vm]) -> None:
        resident = sum(vm.resident for vm in vms)
        if resident > budget:  # above 80% of "host memory" = budget / 0.8
            share = (resident - budget) // len(vms)
            for vm in vms:
                vm.target = min(vm.ram // 2, vm.target + share)
        elif resident < budget - 256 * MiB:
            for vm in vms:
                vm.target = max(0, vm.target - step)

    return decide


def run(rule: str, vms: list[Vm], budget: int, hours: float, step: int) -> dict[str, float]:
    config = PolicyConfig(budget_bytes=budget, interval_s=STEP_S, step_bytes=step)
    decide = ours(config) if rule == "policy" else proxmox(budget, step)
    steps = int(hours * 3600 / STEP_S)
    exceeded: float | None = None
    back: float | None = None
    over_steps = 0
    overshoot = 0
    pressure = 0
    changes = 0
    for i in range(steps):
        t = i * STEP_S
        pressure += sum(advance(vm, t) for vm in vms)
        before = [vm.target for vm in vms]
        decide(vms)
        changes += sum(a != vm.target for a, vm in zip(before, vms, strict=True))
        resident = sum(vm.resident for vm in vms)
        if resident > budget:
            over_steps += 1
            overshoot = max(overshoot, resident - budget)
            exceeded = t if exceeded is None else exceeded
        elif exceeded is not None and back is None:
            back = t - exceeded
    return {
        "first_over_s": -1.0 if exceeded is None else exceeded,
        "back_under_s": -1.0 if back is None else back,
        "over_budget_pct": 100.0 * over_steps / steps,
        "peak_overshoot_mib": overshoot / MiB,
        "pressure_vm_steps": float(pressure),
        "changes_per_min": changes / (steps * STEP_S / 60),
        "final_resident_gib": sum(vm.resident for vm in vms) / GiB,
    }


def fleet(n: int, seed: int) -> list[Vm]:
    rng = random.Random(seed)
    kinds = ["idle", "cache", "growing", "bursty"]
    return [Vm(f"vm{i}", kinds[i % 4], rng.choice([2, 4, 8]) * GiB, rng.random()) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks policy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--vms", type=int, default=200)
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    # Warm up one fleet without any balloon for 10 minutes: that resident sum, less a
    # quarter, is the budget.
    warm = fleet(args.vms, args.seed)
    for i in range(60):
        for vm in warm:
            advance(vm, i * STEP_S)
    # The budget: what the fleet needs at the end of the run without any cache (every
    # VM's kernel and anon memory at its peak demand), plus 10%: reachable only by
    # taking cache, never by squeezing what guests use.
    need = sum(KERNEL + max(demand(vm, t * 60)[0] for t in range(int(args.hours * 60)))
               for vm in warm)  # fmt: skip
    budget = int(need * 1.10)
    results = {}
    for rule in ("policy", "proxmox"):
        vms = fleet(args.vms, args.seed)
        for i in range(60):
            for vm in vms:
                advance(vm, i * STEP_S)
        results[rule] = run(rule, vms, budget, args.hours, 128 * MiB)
    start = sum(vm.resident for vm in warm)
    print(f"{args.vms} VMs, {args.hours:g} h, budget {budget / GiB:.1f} GiB (their peak "
          f"anon memory + 10%; {start / GiB:.1f} GiB resident after 10 minutes)")  # fmt: skip
    print(f"{'':32} {'this policy':>14} {'Proxmox-style':>14}")
    for key, label in (
        ("first_over_s", "resident first over budget (s)"),
        ("back_under_s", "back under it after (s)"),
        ("over_budget_pct", "time over budget (%)"),
        ("peak_overshoot_mib", "peak overshoot (MiB)"),
        ("pressure_vm_steps", "VM-steps in pressure"),
        ("changes_per_min", "target changes per minute"),
        ("final_resident_gib", "resident at the end (GiB)"),
    ):
        a, b = results["policy"][key], results["proxmox"][key]
        print(f"{label:32} {a:14.1f} {b:14.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
