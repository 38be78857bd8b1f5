"""Runs the automatic balloon policy (policy/auto.py) inside the daemon.

Every interval: describe each attached VM (its RAM, the host memory its RAM files hold,
its balloon, the guest's last statistics and their age) and the host (MemAvailable,
memory pressure), ask the policy, count and log each decision with its inputs, and
apply the targets through the same path as ``vhost-user-balloon balloon``. A target
set by hand pins that VM (the policy leaves it) until released through the control
socket. In observe-only mode nothing is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from vhost_user_balloon.policy import (
    DEFAULT_SHARES,
    Decision,
    Direction,
    GuestStats,
    GuestView,
    HostView,
    Policy,
    Round,
)
from vhost_user_balloon.protocol import BalloonFeature, BalloonStat

from ..config import AutoBalloon, VmSpec
from ..observing.metrics import PREFIX
from ..serving.connection import BalloonTargetError, VmConnection
from .hostmem import host_view

__all__ = ["AutoBalloonMetrics", "AutoBalloonRunner"]

log = structlog.get_logger()


class AutoBalloonMetrics:
    """The policy's series, registered when it is turned on (``unregister``: when it is
    turned off again, so that it can be turned on again)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = f"{PREFIX}_auto_balloon"
        self.budget = Gauge(f"{ns}_budget_bytes", "The policy's budget for the guests' "
                            "host-resident RAM, summed.", registry=registry)  # fmt: skip
        self.resident = Gauge(f"{ns}_resident_bytes", "The guests' host-resident RAM, summed, "
                              "as the policy last saw it.", registry=registry)  # fmt: skip
        self.shortfall = Gauge(
            f"{ns}_shortfall_bytes", "What the budget lacks after every guest gave what it "
            "can without crossing its floor (0: met or on its way).", registry=registry,
        )  # fmt: skip
        self.reclaimable = Gauge(
            f"{ns}_reclaimable_bytes", "What the policy counts a guest can give: MemAvailable "
            "above its floor plus one step.", ["vm"], registry=registry,
        )  # fmt: skip
        self.floor = Gauge(
            f"{ns}_floor_bytes", "A guest's floor: under it the policy deflates its balloon.",
            ["vm"], registry=registry,
        )  # fmt: skip
        self.shares = Gauge(
            f"{ns}_shares", "A VM's weight when several can give memory back: more shares, "
            "asked later (the [[vm]] key shares).", ["vm"], registry=registry,
        )  # fmt: skip
        self.reason = Gauge(
            f"{ns}_reason", "1 for the reason of the policy's latest decision on a VM (its "
            "target and why, for vhost-user-balloon status).", ["vm", "reason"],
            registry=registry,
        )  # fmt: skip
        self._reasons: dict[str, str] = {}
        self.decisions = Counter(
            f"{ns}_decisions", "Targets the policy moved, by direction and reason.",
            ["vm", "direction", "reason"], registry=registry,
        )  # fmt: skip

    def unregister(self) -> None:
        for series in (self.budget, self.resident, self.shortfall, self.reclaimable,
                       self.floor, self.shares, self.reason, self.decisions):  # fmt: skip
            self.registry.unregister(series)

    def latest(self, vm: str, reason: str) -> None:
        """The reason of the latest decision on ``vm``: one series per VM at a time."""
        old = self._reasons.get(vm)
        if old == reason:
            return
        if old is not None:
            self.reason.remove(vm, old)
        self.reason.labels(vm=vm, reason=reason).set(1)
        self._reasons[vm] = reason


@dataclass
class AutoBalloonRunner:
    """The policy's loop. ``connections`` and ``vms`` are read afresh each interval, so
    VMs attached, detached, added or removed (SIGHUP) are seen at the next one."""

    settings: AutoBalloon
    registry: CollectorRegistry
    connections: Callable[[], Mapping[str, VmConnection]]
    vms: Callable[[], Mapping[str, VmSpec]]
    #: VMs whose target was set by hand
    pins: set[str]
    host: Callable[[], HostView] = host_view
    policy: Policy = field(init=False)
    _metrics: AutoBalloonMetrics = field(init=False)
    _short: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.policy = Policy(self.settings.policy)
        self._metrics = AutoBalloonMetrics(self.registry)
        self._metrics.budget.set(self.settings.policy.budget_bytes)

    async def run(self) -> None:
        log.info(
            "auto_balloon_started",
            budget_bytes=self.settings.policy.budget_bytes,
            interval_s=self.settings.policy.interval_s,
            observe_only=self.settings.observe_only,
        )
        while True:
            await trio.sleep(self.settings.policy.interval_s)
            await self.step()

    def stop(self) -> None:
        """The policy is turned off: its series go (the loop is cancelled apart)."""
        self._metrics.unregister()

    def reconfigure(self, settings: AutoBalloon) -> None:
        """New settings (SIGHUP): the next interval decides with them."""
        self.settings = settings
        self.policy.config = settings.policy
        self._metrics.budget.set(settings.policy.budget_bytes)
        log.info("auto_balloon_reconfigured", budget_bytes=settings.policy.budget_bytes,
                 observe_only=settings.observe_only)  # fmt: skip

    async def step(self) -> Round:
        """One interval: decide, record, apply."""
        conns = dict(self.connections())
        guests = list(self._guests(conns))
        decided = self.policy.decide(self.host(), guests)
        self._record(decided, guests)
        for decision in decided.decisions:
            if decision.direction is Direction.HOLD or self.settings.observe_only:
                continue
            conn = conns.get(decision.vm)
            if conn is None:
                continue
            try:
                await conn.set_target(decision.target_bytes)
            except BalloonTargetError as err:
                log.warning("auto_balloon_not_applied", vm=decision.vm, error=str(err))
        return decided

    def _guests(self, conns: Mapping[str, VmConnection]) -> Iterator[GuestView]:
        specs = self.vms()
        for name, conn in sorted(conns.items()):
            view = conn.view()
            if view.ram_bytes == 0:  # no memory table yet: nothing to decide on
                continue
            spec = specs.get(name)
            yield GuestView(
                vm=name,
                ram_bytes=view.ram_bytes,
                resident_bytes=view.resident_bytes,
                target_bytes=view.target_bytes,
                actual_bytes=view.actual_bytes,
                stats=None if view.guest_stats is None else _stats(view.guest_stats),
                stats_age_s=view.stats_age_s,
                min_memory_bytes=spec.min_memory if spec is not None else 0,
                shares=spec.shares if spec is not None else DEFAULT_SHARES,
                opted_out=spec is not None and not spec.auto_balloon,
                pinned=name in self.pins,
                balloon_in_total=bool(view.features & BalloonFeature.DEFLATE_ON_OOM),
            )

    def _record(self, decided: Round, guests: list[GuestView]) -> None:
        m = self._metrics
        m.resident.set(decided.resident_bytes)
        m.shortfall.set(decided.shortfall_bytes)
        views = {g.vm: g for g in guests}
        for d in decided.decisions:
            m.reclaimable.labels(vm=d.vm).set(d.reclaimable_bytes)
            m.floor.labels(vm=d.vm).set(d.floor_bytes)
            m.shares.labels(vm=d.vm).set(views[d.vm].shares)
            m.latest(d.vm, d.reason)
            if d.direction is not Direction.HOLD:
                m.decisions.labels(vm=d.vm, direction=d.direction.value, reason=d.reason).inc()
                _log_decision(d, views[d.vm], self.settings.observe_only)
        short = decided.shortfall_bytes > 0
        if short != self._short:
            self._short = short
            if short:
                log.warning(
                    "auto_balloon_budget_unreachable",
                    shortfall_bytes=decided.shortfall_bytes,
                    resident_bytes=decided.resident_bytes,
                    budget_bytes=self.settings.policy.budget_bytes,
                    message="the guests cannot give more without going under their floors",
                )
            else:
                log.info("auto_balloon_budget_reachable", resident_bytes=decided.resident_bytes)


def _log_decision(d: Decision, g: GuestView, observe_only: bool) -> None:
    log.info(
        "auto_balloon_decision",
        vm=d.vm,
        direction=d.direction.value,
        reason=d.reason,
        target_bytes=d.target_bytes,
        previous_target_bytes=g.target_bytes,
        actual_bytes=g.actual_bytes,
        resident_bytes=g.resident_bytes,
        available_bytes=None if g.stats is None else g.stats.available_bytes,
        floor_bytes=d.floor_bytes,
        reclaimable_bytes=d.reclaimable_bytes,
        applied=not observe_only,
    )


def _stats(tags: Mapping[int, int]) -> GuestStats | None:
    """The guest's statistics as the policy reads them (None without MemAvailable)."""
    if BalloonStat.AVAIL not in tags:
        return None
    return GuestStats(
        available_bytes=tags[BalloonStat.AVAIL],
        total_bytes=tags.get(BalloonStat.MEMTOT, 0),
        free_bytes=tags.get(BalloonStat.MEMFREE, 0),
        caches_bytes=tags.get(BalloonStat.CACHES, 0),
        swap_in_bytes=tags.get(BalloonStat.SWAP_IN, 0),
        major_faults=tags.get(BalloonStat.MAJFLT, 0),
        alloc_stalls=tags.get(BalloonStat.ALLOC_STALL, 0),
        oom_kills=tags.get(BalloonStat.OOM_KILL, 0),
    )
