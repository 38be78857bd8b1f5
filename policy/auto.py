"""The automatic balloon policy: hold the guests' host-resident RAM under a budget.

Theory of operation. Free page reporting gives back what a guest frees; what it keeps
(page cache, slab, idle allocations) stays resident on the host. Inflating the balloon
makes the guest give some of it up, deflating gives it back. Once per interval the
daemon describes each VM (``GuestView``: RAM, host-resident bytes, balloon target and
actual, the guest's latest statistics and their age) and the host (``HostView``), and
``Policy.decide`` answers with a target per VM and the reason. The rules, in order:

1. A VM the operator opted out, or whose target was set by hand (pinned), is left as
   it is.
2. A guest under pressure is deflated at once, whatever the host's state, back to its
   floor plus a step and by at least a step: its MemAvailable below its floor, or
   since the last interval swap-ins, allocation stalls or an OOM kill, or more major
   faults than ``major_faults_per_interval``.
3. The host is short when the guests' resident bytes add up to more than the budget,
   or the host's own memory pressure (PSI some avg10) or MemAvailable crosses its
   threshold. Then the guests inflate, in one decision, by two parts:

   - *its free memory the host does not hold*: a balloon fills from the guest's free
     memory before the guest drops any cache, and free memory the guest already
     reported costs the host nothing (its RAM less its resident bytes less its
     balloon, no more than the guest says is free). Taking it gives the host nothing
     and costs the guest nothing it uses, so it is taken at once instead of step by
     step;
   - *resident memory*: what the budget lacks, shared out to the guests that can give
     the most, in the order of what they can give divided by their ``shares`` (more
     shares, later), each giving at most ``max_reclaim_bytes`` per interval (under
     host pressure alone, with no excess to size it, one step each). What it lacks
     (``_need``): the excess down to the bottom of the hysteresis band, plus what the
     guests under pressure are given back now, plus the growth the last two
     intervals both saw beyond what the policy expected, less the resident memory
     earlier targets will still free.

   What a guest can give of resident memory: its MemAvailable (page cache included)
   above its floor plus one step plus the room kept for its recent peak use, less the
   free memory above, and no more than is resident beyond what it uses; under 16 MiB
   it is not worth a move, and a guest with nothing to give is not inflated at all (an
   idle guest whose free memory went back already is left alone). The room kept for
   a recent peak is asked for only when every guest gave what it could without it.
   No target goes past RAM minus ``min_memory``. A guest whose statistics are missing
   or older than three intervals is never inflated, nor one whose resident bytes rose
   by more than a step since the last decision (it is taking memory now; its
   statistics may predate that).
4. With room again (resident bytes under the budget by the margin, no host pressure),
   a balloon is deflated by one step per interval, toward 0, only if its guest may
   need the memory: less than half a step above its floor (inflating leaves it a step
   above), or saying nothing (statistics stale or missing). A guest with memory to
   spare keeps its balloon: the free memory it would get back, it is not asking for.
   Between the budget and budget - margin nothing moves: that band is the hysteresis.
5. What the budget still lacks after every guest gave what it could is the shortfall:
   reported, not forced.

A guest's floor is max(``min_free_bytes``, ``min_free_percent`` of its RAM): under it
the guest is deflated; inflating stops one step above it (the band between is the
per-guest hysteresis). A guest's recent peak use is the most it used (MemTotal less
MemAvailable), fading toward what it uses now with a one-hour time constant: a guest
that needed memory lately keeps room for it (a burst every quarter of an hour finds
its memory there), unless the budget cannot be met otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "DEFAULT_SHARES",
    "Decision",
    "Direction",
    "GuestStats",
    "GuestView",
    "HostView",
    "Policy",
    "PolicyConfig",
    "Round",
    "floor_bytes",
]

MiB = 1 << 20
#: Statistics older than this many intervals are stale.
STALE_INTERVALS = 3
#: A guest that can give less than this is not inflated: not worth its balloon moving.
MIN_INFLATE = 16 * MiB
#: A VM's weight when none is configured.
DEFAULT_SHARES = 1000
#: How long a guest's peak use is remembered (the time constant of its fading).
PEAK_MEMORY_S = 3600.0


@dataclass(frozen=True, slots=True)
class GuestStats:
    """What the guest last said about its memory (virtio balloon statistics); the
    counters are cumulative since its boot."""

    available_bytes: int
    total_bytes: int = 0
    free_bytes: int = 0
    caches_bytes: int = 0
    swap_in_bytes: int = 0
    major_faults: int = 0
    alloc_stalls: int = 0
    oom_kills: int = 0


@dataclass(frozen=True, slots=True)
class GuestView:
    """One VM as the daemon sees it at the start of an interval."""

    vm: str
    ram_bytes: int
    resident_bytes: int
    target_bytes: int
    actual_bytes: int
    stats: GuestStats | None = None
    #: seconds since ``stats`` arrived (None: never)
    stats_age_s: float | None = None
    #: the guest keeps at least this much memory: the balloon never exceeds RAM minus it
    min_memory_bytes: int = 0
    #: the operator opted this VM out of the policy
    opted_out: bool = False
    #: its target was set by hand and is kept until released
    pinned: bool = False
    #: the guest counts its balloon in MemTotal (with DEFLATE_ON_OOM, Linux keeps
    #: balloon pages in MemTotal; without it, MemTotal shrinks as the balloon grows)
    balloon_in_total: bool = False
    #: its weight when several guests can give: more shares, asked later (as
    #: Proxmox's ``shares``; 1000 is the default)
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True, slots=True)
class HostView:
    """The host's own state (None: not read)."""

    mem_available_bytes: int | None = None
    #: /proc/pressure/memory (or a cgroup's memory.pressure) "some avg10", percent
    psi_some_avg10: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The operator's knobs ([auto_balloon] in the configuration file)."""

    #: the guests' host-resident RAM should add up to at most this
    budget_bytes: int
    #: seconds between decisions (stale statistics are measured in these)
    interval_s: float = 10.0
    #: how far a balloon deflates in one interval (and inflates under host pressure
    #: alone); also the band above a guest's floor where inflating stops
    step_bytes: int = 128 * MiB
    #: the most resident memory one VM is asked to give in one interval
    max_reclaim_bytes: int = 512 * MiB
    #: deflating starts only this far under the budget (hysteresis)
    margin_bytes: int = 256 * MiB
    #: a guest's floor: at least this much MemAvailable ...
    min_free_bytes: int = 128 * MiB
    #: ... and at least this percentage of its RAM
    min_free_percent: float = 10.0
    #: host pressure: PSI some avg10 above this (percent; None: not used)
    host_psi_some: float | None = 10.0
    #: host pressure: MemAvailable under this (None: not used)
    host_min_available_bytes: int | None = None
    #: guest pressure: more major faults than this since the last interval
    major_faults_per_interval: int = 2000


class Direction(Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class Decision:
    """A VM's target for this interval and why."""

    vm: str
    target_bytes: int
    direction: Direction
    reason: str
    #: MemAvailable above the floor plus one step (0 with no fresh statistics)
    reclaimable_bytes: int
    floor_bytes: int


@dataclass(frozen=True, slots=True)
class Round:
    """Everything decided in one interval."""

    decisions: tuple[Decision, ...]
    resident_bytes: int
    #: what the budget lacks after every guest gave what it can now (0: met or on its way)
    shortfall_bytes: int
    host_short: bool


def floor_bytes(ram_bytes: int, config: PolicyConfig) -> int:
    """The MemAvailable a guest of ``ram_bytes`` keeps whatever the host needs."""
    return max(config.min_free_bytes, int(ram_bytes * config.min_free_percent / 100))


@dataclass
class Policy:
    """Decides targets interval after interval; remembers each guest's last statistics
    (to see its pressure counters rise) and recent peak use, and what the resident sum
    was expected to be (to see the fleet's growth)."""

    config: PolicyConfig
    _last: dict[str, GuestStats] = field(default_factory=dict)
    #: the most each guest used recently (fading: see ``_remember_peaks``)
    _peaks: dict[str, float] = field(default_factory=dict)
    #: the resident sum the last decisions lead to expect, and how far the one before
    #: was off (see ``_need``)
    _expected: int | None = None
    _drift: int = 0
    #: each guest's resident bytes at the last decision
    _resident: dict[str, int] = field(default_factory=dict)

    def decide(self, host: HostView, guests: Sequence[GuestView]) -> Round:
        cfg = self.config
        self._remember_peaks(guests)
        resident = sum(g.resident_bytes for g in guests)
        over = resident - cfg.budget_bytes
        host_short = over > 0 or self._host_pressure(host)
        room = resident < cfg.budget_bytes - cfg.margin_bytes and not host_short
        decided: dict[str, Decision] = {}
        candidates: list[GuestView] = []
        for g in guests:
            early = self._first_rules(g)
            if early is not None:
                decided[g.vm] = early
            elif host_short:
                candidates.append(g)
            elif room and g.target_bytes > 0 and self._may_need(g):
                decided[g.vm] = self._move(g, max(0, g.target_bytes - cfg.step_bytes), "room")
            elif room and g.target_bytes > 0:
                decided[g.vm] = self._move(g, g.target_bytes, "not_needed")
            else:
                decided[g.vm] = self._move(g, g.target_bytes, "within_band")
        # Inflation asked for and not done yet frees resident memory still to come:
        # counting it keeps a slow guest from being asked again for the same bytes.
        coming = sum(self._coming(g) for g in guests)
        # Memory given back to guests under pressure now is memory they will use.
        relieved = [g for g in guests
                    if g.vm in decided and decided[g.vm].reason.startswith("guest_")]  # fmt: skip
        given = sum(g.target_bytes - decided[g.vm].target_bytes for g in relieved)
        asked = self._ask(candidates, self._need(over, resident, coming, given), decided)
        capacity = sum(max(0, self._giveable(g, headroom=False) - self._coming(g))
                       for g in candidates)  # fmt: skip
        self._last = {g.vm: g.stats for g in guests if g.stats is not None}
        self._resident = {g.vm: g.resident_bytes for g in guests}
        self._expected = resident - asked + given
        return Round(
            tuple(decided[g.vm] for g in guests),
            resident,
            shortfall_bytes=max(0, over - coming - capacity),
            host_short=host_short,
        )

    def _ask(
        self, candidates: Sequence[GuestView], need: int | None, decided: dict[str, Decision]
    ) -> int:
        """Inflate the candidates, the guests that can give most first, until ``need``
        is met (None: a step each); their decisions go into ``decided``. The resident
        bytes asked for in all."""
        ranked = sorted(candidates, key=self._rank, reverse=True)
        taken_from: dict[str, int] = {}
        for g in ranked:
            decided[g.vm], taken_from[g.vm] = self._inflate(g, need)
            if need is not None:
                need -= taken_from[g.vm]
        # Still short after every guest gave what it can while keeping room for its
        # recent peak: that room is asked for too, in the same order (max_reclaim
        # still bounds what one guest gives in the interval).
        for g in ranked:
            left = min(need or 0, self.config.max_reclaim_bytes - taken_from[g.vm])
            if left > 0 and need is not None:
                decision, taken = self._inflate(g, left, decided[g.vm].target_bytes, False)
                if taken:
                    decided[g.vm], need = decision, need - taken
                    taken_from[g.vm] += taken
        return sum(taken_from.values())

    # -- the rules -----------------------------------------------------------------
    def _need(self, over: int, resident: int, coming: int, given: int) -> int | None:
        """The resident bytes to ask of the guests this interval (None: the host's own
        pressure alone, with no excess to size it by). Over the budget: the excess,
        down to the bottom of the hysteresis band (landing on the budget's edge, the
        next interval's growth would take it over again), plus what the guests under
        pressure are given now, plus the growth the last two intervals both saw (what
        the resident sum gained beyond what the policy expected: guests filling their
        cache; a one-off jump such as a guest's burst is in the excess already), less
        what earlier targets will still free."""
        drift = max(0, resident - self._expected) if self._expected is not None else 0
        sustained, self._drift = min(drift, self._drift), drift
        if over <= 0:
            return None
        return max(0, over + self.config.margin_bytes + given + sustained - coming)

    def _first_rules(self, g: GuestView) -> Decision | None:
        """Opted out, pinned, or a guest under pressure: decided whatever the host."""
        if g.opted_out:
            return self._move(g, g.target_bytes, "opted_out")
        if g.pinned:
            return self._move(g, g.target_bytes, "pinned")
        why = self._guest_pressure(g)
        if why is not None:
            return self._move(g, max(0, g.target_bytes - self._relief(g)), why)
        return None

    def _remember_peaks(self, guests: Sequence[GuestView]) -> None:
        """Each guest's recent peak use: the most it used (MemTotal less MemAvailable),
        fading toward what it uses now with a time constant of ``PEAK_MEMORY_S``. A
        guest that needed memory lately may need it again: inflating leaves it room."""
        fade = math.exp(-self.config.interval_s / PEAK_MEMORY_S)
        peaks = {}
        for g in guests:
            if g.stats is None or not self._fresh(g):
                if g.vm in self._peaks:
                    peaks[g.vm] = self._peaks[g.vm]
                continue
            used = self._used(g)
            before = self._peaks.get(g.vm, used)
            peaks[g.vm] = max(used, used + (before - used) * fade)
        self._peaks = peaks

    def _headroom(self, g: GuestView) -> int:
        """What the guest used lately beyond what it uses now."""
        peak = self._peaks.get(g.vm)
        return 0 if peak is None else max(0, int(peak) - self._used(g))

    def _relief(self, g: GuestView) -> int:
        """How far a guest under pressure is deflated at once: back to its floor plus a
        step (where inflating stops), and at least a step."""
        cfg = self.config
        lacking = 0
        if g.stats is not None:
            lacking = floor_bytes(g.ram_bytes, cfg) + cfg.step_bytes - g.stats.available_bytes
        return max(cfg.step_bytes, lacking)

    def _may_need(self, g: GuestView) -> bool:
        """With room again, is this guest's balloon worth giving back? Only to a guest
        that may need memory: less than half a step above its floor (inflating leaves
        it a step above: one under that has started using what it had), or whose
        statistics say nothing (stale or missing). Free memory it is not asking for
        stays where it is (the host does not hold it either way)."""
        if g.stats is None or not self._fresh(g):
            return True
        keep = floor_bytes(g.ram_bytes, self.config) + self.config.step_bytes // 2
        return g.stats.available_bytes < keep

    def _inflate(
        self, g: GuestView, need: int | None, base: int | None = None, headroom: bool = True
    ) -> tuple[Decision, int]:
        """The guest's free memory the host does not hold, at once, and resident memory
        up to ``max_reclaim`` (a step under host pressure alone), no more than is
        needed, from ``base`` (the target decided so far; its current one); the
        decision, and the resident bytes it asks for beyond ``base``. ``headroom``
        False: the room kept for its recent peak may be taken too."""
        base = g.target_bytes if base is None else base
        if not self._fresh(g):
            return self._move(g, base, "stale_statistics"), 0
        if g.resident_bytes - self._resident.get(g.vm, g.resident_bytes) > self.config.step_bytes:
            # What the host holds of it rose by more than a step since the last
            # decision: the guest is taking memory now, and its statistics may predate
            # that (seen: a guest inflated in the middle of allocating 1 GiB, because
            # statistics from before counted the new pages as free). Next interval.
            return self._move(g, base, "growing"), 0
        giveable = self._giveable(g, headroom)
        if giveable == 0:
            return self._move(g, base, "nothing_to_reclaim"), 0
        cfg = self.config
        step = cfg.step_bytes if need is None else min(cfg.max_reclaim_bytes, need)
        # the balloon takes the free memory the host does not hold first; what the
        # target asks beyond that (and beyond what it asks already) is resident memory
        free = self._free_gone(g, headroom)
        start = max(base, g.actual_bytes + free)
        ceiling = min(g.actual_bytes + free + giveable, g.ram_bytes - g.min_memory_bytes)
        target = max(base, min(start + max(step, 0), ceiling))
        taken = max(0, target - start)
        if target > g.target_bytes:
            reason = "over_budget" if need is not None else "host_pressure"
            return self._move(g, target, reason), taken
        return self._move(g, target, "budget_met" if step <= 0 else "nothing_to_reclaim"), 0

    def _rank(self, g: GuestView) -> float:
        """Who gives first: what it can give, divided by its shares."""
        return self._giveable(g) * DEFAULT_SHARES / max(1, g.shares)

    def _used(self, g: GuestView) -> int:
        """What the guest uses (MemTotal less MemAvailable): resident for sure."""
        if g.stats is None:
            return 0
        total = g.stats.total_bytes or g.ram_bytes - g.actual_bytes
        if g.balloon_in_total and g.stats.total_bytes:
            total -= g.actual_bytes  # balloon pages are not resident: not "used" here
        return max(0, total - g.stats.available_bytes)

    def _free_gone(self, g: GuestView, headroom: bool = True) -> int:
        """The guest's free memory the host does not hold: RAM less resident bytes
        less the balloon, no more than the guest says is free (and no more than it
        can give without going under its floor). A balloon fills from free memory
        first, so this much is taken before the guest drops anything resident."""
        if g.stats is None or not self._fresh(g):
            return 0
        not_held = max(0, g.ram_bytes - g.resident_bytes - g.actual_bytes)
        return min(g.stats.free_bytes, not_held, self._reclaimable(g, headroom))

    def _coming(self, g: GuestView) -> int:
        """Resident memory this guest's target will still free: inflation asked for and
        not done yet, less the part its free memory the host does not hold fills."""
        return max(0, g.target_bytes - g.actual_bytes - self._free_gone(g))

    def _giveable(self, g: GuestView, headroom: bool = True) -> int:
        """What inflating this guest can give back to the host of resident memory: its
        reclaimable memory less the free memory a balloon takes first (which gives the
        host nothing), and no more than is resident beyond what the guest uses (cache
        and free memory it has not reported). Free memory it did report is not
        resident any more: an idle guest whose free memory went back already is left
        alone."""
        if g.stats is None:
            return 0
        room = self._reclaimable(g, headroom) - self._free_gone(g, headroom)
        giveable = min(room, max(0, g.resident_bytes - self._used(g)))
        return giveable if giveable >= MIN_INFLATE else 0

    def _guest_pressure(self, g: GuestView) -> str | None:
        """Why this guest needs memory back now (None: it does not)."""
        if g.stats is None or not self._fresh(g):
            return None
        s = g.stats
        if s.available_bytes < floor_bytes(g.ram_bytes, self.config):
            return "guest_below_floor"
        last = self._last.get(g.vm)
        if last is None:
            return None
        if s.oom_kills > last.oom_kills:
            return "guest_oom_kill"
        if s.alloc_stalls > last.alloc_stalls:
            return "guest_alloc_stalls"
        if s.swap_in_bytes > last.swap_in_bytes:
            return "guest_swap_in"
        if s.major_faults - last.major_faults > self.config.major_faults_per_interval:
            return "guest_major_faults"
        return None

    def _host_pressure(self, host: HostView) -> bool:
        cfg = self.config
        psi, limit = host.psi_some_avg10, cfg.host_psi_some
        if psi is not None and limit is not None and psi > limit:
            return True
        low = cfg.host_min_available_bytes
        return (
            low is not None
            and host.mem_available_bytes is not None
            and (host.mem_available_bytes < low)
        )

    def _fresh(self, g: GuestView) -> bool:
        return (
            g.stats is not None
            and g.stats_age_s is not None
            and g.stats_age_s <= STALE_INTERVALS * self.config.interval_s
        )

    def _reclaimable(self, g: GuestView, headroom: bool = True) -> int:
        """MemAvailable above the floor plus one step (and, with ``headroom``, the
        room kept for the guest's recent peak): inflating stops a step above the
        floor, deflating starts under it, and a guest between the two is left alone
        (the hysteresis that keeps a guest near its floor from flapping)."""
        if g.stats is None or not self._fresh(g):
            return 0
        keep = floor_bytes(g.ram_bytes, self.config) + self.config.step_bytes
        if headroom:
            keep += self._headroom(g)
        return max(0, g.stats.available_bytes - keep)

    def _move(self, g: GuestView, target: int, reason: str) -> Decision:
        direction = (
            Direction.INFLATE if target > g.target_bytes
            else Direction.DEFLATE if target < g.target_bytes
            else Direction.HOLD
        )  # fmt: skip
        return Decision(
            g.vm, target, direction, reason, self._reclaimable(g),
            floor_bytes(g.ram_bytes, self.config),
        )  # fmt: skip
