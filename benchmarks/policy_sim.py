"""Simulate the automatic balloon policy on 200 synthetic VMs, side by side with the
rules operators run today (Proxmox VE's auto-ballooning, oVirt MOM's balloon policy)
on the same traces, under three budgets, and print what each does.

    .venv/bin/python -m benchmarks policy [--seeds 1 2 3] [--vms 200] [--hours 2]
                                          [--before DIR] [--json FILE]

``--before DIR``: also run the policy of another checkout (its ``policy/`` package),
e.g. ``git worktree add /tmp/before <rev>``: "before" beside "after" on the same traces.

The guest model (one step per 10 s): each VM has RAM = kernel (64 MiB) + anon + cache
+ free + balloon. Its anonymous memory follows a trace (idle, cache-heavy, growing,
bursty); cache grows by a rate while the guest reads, into free memory, and is dropped
when anon memory or the balloon needs room. Free memory is reported and leaves the
host within a step, so the host holds kernel + anon + cache. Inflating takes free
memory first, then cache; deflating gives free memory back. A guest whose anon memory
cannot fit even with all its cache dropped is "in pressure" that step (a real guest
would stall, swap or OOM). Its statistics: MemAvailable = free + cache, MemFree = free,
MemTotal = RAM - balloon; the host counts "used" as the guests' resident sum.

The rules (each decides from the state after the step; targets apply the next step):

``before``/``after``  this daemon's policy (policy/auto.py), default settings but the
    budget; ``after`` is this checkout's, ``before`` the one ``--before`` names.

``proxmox``  Proxmox VE's auto-ballooning as its status daemon (pvestatd) runs it, read
    from its AutoBalloon module and the pvestatd loop: every 10 s, the goal is 80% of
    the host's memory less what the host uses (positive: give memory to guests,
    negative: take it); it is spread over the VMs in proportion to their shares (1000
    each here) above each VM's configured minimum, each VM's memory moving at most
    100 MiB per round, never under the minimum nor over its maximum. When taking, the
    VMs with "enough free" memory go first: more free than a quarter of their minimum,
    by the guest's free memory as QEMU reports it (page cache counts as used); only
    if they cannot, the others. Goals within 10 MiB of zero do nothing. Here the host's
    memory is budget / 0.8, so its 80% line is the budget, and each VM's minimum is
    half its RAM (a usual setting; Proxmox has no default).

``mom``  oVirt's Memory Overcommit Manager with its shipped balloon rules (balloon.rules):
    every 15 s, the host is under pressure when its free memory is under 20% of its
    memory (here host memory = budget / 0.8 again, so 20% free is the budget). Under
    pressure every guest shrinks: 5% of its current memory per round, but never under
    the memory it uses (its current memory less its unused memory) plus a free share
    that scales with the host's free percentage (below 5% free, a negative share that
    forces the guest to swap). Without pressure every ballooned guest grows 5% per
    round, and at once to what it uses plus 20% of its maximum if that is more.
    Changes under 0.25% of the current memory are skipped.

Budgets (the fleet's resident sum under it): ``tight``, what the fleet needs at its
peak without any cache, plus 10% (met only by taking cache); ``reachable``, the most
the fleet holds at any step with half its cache; ``loose``, 90% of the most it holds
without any balloon. Printed per budget, seed and rule: when the resident sum first
went over the budget and how long it took to come back under, the share of time over
it, the peak overshoot, VM-steps in pressure, target changes per minute.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import vhost_user_balloon.policy as after_policy

MiB: Final = 1 << 20
GiB: Final = 1 << 30
STEP_S: Final = 10.0
KERNEL: Final = 64 * MiB
WARMUP_STEPS: Final = 60
RULES: Final = ("before", "after", "proxmox", "mom")
BUDGETS: Final = ("tight", "reachable", "loose")


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


# -- the rules -------------------------------------------------------------------------
Decide = Callable[[list[Vm], float], None]


def ours(module: ModuleType, budget: int) -> Decide:
    """This daemon's policy (``module``: its policy package), default settings."""
    policy = module.Policy(module.PolicyConfig(budget_bytes=budget, interval_s=STEP_S))

    def view(vm: Vm) -> Any:
        stats = module.GuestStats(available_bytes=vm.free + vm.cache,
                                  total_bytes=vm.ram - vm.balloon, free_bytes=vm.free)  # fmt: skip
        return module.GuestView(vm.name, vm.ram, vm.resident, vm.target, vm.balloon, stats, 1.0)

    def decide(vms: list[Vm], t: float) -> None:
        out = policy.decide(module.HostView(), [view(vm) for vm in vms])
        for vm, d in zip(vms, out.decisions, strict=True):
            vm.target = d.target_bytes

    return decide


def proxmox(budget: int) -> Decide:
    """pvestatd's auto-ballooning (see the docstring), in VM memory sizes: a VM's
    "balloon" there is the memory it has (RAM less our balloon)."""
    maxchange = 100 * MiB
    shares = 1000

    def spread(size: dict[str, int], was: dict[str, int], vms: list[Vm], amount: int) -> int:
        """Move ``amount`` bytes (positive: to the VMs) over ``vms``: each VM's share
        of everything above the minimums, by shares, clamped to its minimum and
        maximum, reached by at most ``maxchange`` from where it was; repeated while
        that makes progress. What could not be moved."""
        rest, done, again = amount, set(), True
        while rest and again:
            again = False
            open_ = [vm for vm in vms if vm.name not in done]
            above = sum(size[vm.name] - vm.ram // 2 for vm in open_) + rest
            moved = 0
            for vm in open_:
                lo, hi = vm.ram // 2, vm.ram
                desired = lo + int(above / (shares * len(open_)) * shares)
                clamped = min(hi, max(lo, desired))
                again |= clamped != desired
                old = was[vm.name]
                if amount > 0 and clamped > old:
                    new = min(old + maxchange, clamped)
                elif clamped < old:
                    new = max(old - maxchange, clamped)
                else:
                    done.add(vm.name)
                    continue
                change = new - size[vm.name]
                size[vm.name] = new
                if change:
                    moved += change
                    again = True
            if not moved:
                break
            rest -= moved
        return rest

    def decide(vms: list[Vm], t: float) -> None:
        goal = budget - sum(vm.resident for vm in vms)
        if abs(goal) <= 10 * MiB:
            return
        was = {vm.name: vm.ram - vm.balloon for vm in vms}
        size = dict(was)
        # growing: the VMs short of free memory first; taking: the ones with enough
        first = [vm for vm in vms if enough_free(vm) != (goal > 0)]
        rest = spread(size, was, first, goal)
        if (goal > 0 and rest >= goal) or (goal < 0 and rest <= goal):  # no progress
            spread(size, was, vms, rest)
        for vm in vms:
            vm.target = vm.ram - size[vm.name]

    def enough_free(vm: Vm) -> bool:
        return vm.free > (vm.ram // 2) * 0.25 and vm.ram - vm.balloon >= vm.ram // 2

    return decide


def mom(budget: int) -> Decide:
    """MOM's balloon.rules (see the docstring), every 15 s."""
    host = budget / 0.8
    last = {"round": -1}

    def decide(vms: list[Vm], t: float) -> None:
        if int(t // 15) == last["round"]:
            return
        last["round"] = int(t // 15)
        host_free = (host - sum(vm.resident for vm in vms)) / host
        for vm in vms:
            cur = vm.ram - vm.balloon
            used = cur - vm.free  # mem_unused is MemFree: cache counts as used
            if host_free < 0.20:
                share = host_free if host_free > 0.05 else host_free - 0.05
                size = max(cur * 0.95, used + share * cur)
                if size > cur:
                    continue
            elif cur < vm.ram:
                size = max(min(cur * 1.05, vm.ram), used + 0.20 * vm.ram)
            else:
                continue
            if abs(size - cur) > 0.0025 * cur:
                vm.target = max(0, min(vm.ram, vm.ram - int(size)))

    return decide


# -- a run -----------------------------------------------------------------------------
def fleet(n: int, seed: int) -> list[Vm]:
    rng = random.Random(seed)
    kinds = ["idle", "cache", "growing", "bursty"]
    vms = [Vm(f"vm{i}", kinds[i % 4], rng.choice([2, 4, 8]) * GiB, rng.random()) for i in range(n)]
    for i in range(WARMUP_STEPS):  # ten minutes without any balloon
        for vm in vms:
            advance(vm, i * STEP_S)
    return vms


def budgets(n: int, seed: int, hours: float) -> dict[str, int]:
    vms = fleet(n, seed)
    steps = int(hours * 3600 / STEP_S)
    need = sum(KERNEL + max(demand(vm, i * STEP_S)[0] for i in range(steps)) for vm in vms)
    half_cache = held = 0
    for i in range(steps):
        for vm in vms:
            advance(vm, i * STEP_S)
        half_cache = max(half_cache, sum(KERNEL + vm.anon + vm.cache // 2 for vm in vms))
        held = max(held, sum(vm.resident for vm in vms))
    return {"tight": int(need * 1.10), "reachable": half_cache, "loose": int(held * 0.9)}


def run(decide: Decide, vms: list[Vm], budget: int, hours: float) -> dict[str, float]:
    steps = int(hours * 3600 / STEP_S)
    exceeded: float | None = None
    back: float | None = None
    over_steps = overshoot = pressure = changes = 0
    for i in range(steps):
        t = i * STEP_S
        pressure += sum(advance(vm, t) for vm in vms)
        before = [vm.target for vm in vms]
        decide(vms, t)
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
        "peak_overshoot_gib": overshoot / GiB,
        "pressure_vm_steps": float(pressure),
        "changes_per_min": changes / (steps * STEP_S / 60),
    }


def rule_for(rule: str, budget: int, before: ModuleType | None) -> Decide:
    if rule == "proxmox":
        return proxmox(budget)
    if rule == "mom":
        return mom(budget)
    module = after_policy if rule == "after" else before
    assert module is not None, "'before' needs --before"
    return ours(module, budget)


def load_policy(checkout: Path) -> ModuleType:
    """Another checkout's policy package, under its own name."""
    init = checkout / "policy" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "policy_before", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no policy package in {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["policy_before"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks policy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--vms", type=int, default=200)
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--before", type=Path, help="a checkout whose policy runs as 'before'")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    before = load_policy(args.before) if args.before else None
    rules = [r for r in RULES if r != "before" or before is not None]
    results: dict[str, Any] = {}
    header = (f"{'budget':9} {'seed':>4} {'rule':8} {'budget GiB':>10} {'first over s':>12} "
              f"{'back under s':>12} {'over %':>7} {'peak over GiB':>13} "
              f"{'pressure':>8} {'changes/min':>11}")  # fmt: skip
    print(f"{args.vms} VMs, {args.hours:g} h in {STEP_S:g} s steps\n{header}")
    for seed in args.seeds:
        levels = budgets(args.vms, seed, args.hours)
        for name in BUDGETS:
            budget = levels[name]
            for rule in rules:
                decide = rule_for(rule, budget, before)
                r = run(decide, fleet(args.vms, seed), budget, args.hours)
                results.setdefault(name, {}).setdefault(str(seed), {})[rule] = r
                print(f"{name:9} {seed:4} {rule:8} {budget / GiB:10.1f} {r['first_over_s']:12.0f} "
                      f"{r['back_under_s']:12.0f} {r['over_budget_pct']:7.1f} "
                      f"{r['peak_overshoot_gib']:13.1f} {r['pressure_vm_steps']:8.0f} "
                      f"{r['changes_per_min']:11.1f}", flush=True)  # fmt: skip
    print(verdict(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def verdict(results: dict[str, Any]) -> str:
    """The issue's targets for 'after', checked per budget and seed."""
    lines = ["\ntargets for 'after' (every budget and seed):"]
    for name, seeds in results.items():
        for seed, rules in seeds.items():
            ours_ = rules["after"]
            base = [rules[r] for r in ("proxmox", "mom")]
            best_over = min(b["over_budget_pct"] for b in base)
            best_pressure = min(b["pressure_vm_steps"] for b in base)
            checks = [
                ("over <= half the best baseline's",
                 ours_["over_budget_pct"] <= best_over / 2),
                ("pressure <= 1/5 of the best baseline's",
                 ours_["pressure_vm_steps"] <= best_pressure / 5),
            ]  # fmt: skip
            if name == "reachable":
                checks.append(("over <= 10%", ours_["over_budget_pct"] <= 10))
            if "before" in rules:
                fewer = ours_["changes_per_min"] <= rules["before"]["changes_per_min"]
                checks.append(("changes/min <= before's", fewer))
            for what, ok in checks:
                lines.append(f"  {name:9} seed {seed}: {what:40} {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
